"""The `quix` row's baseline: a plain Quix Streams application doing the service's job on the email backlog.

What it does, per record, with Quix Streams' own building blocks and defaults (quixstreams from PyPI, pinned to
QUIX_VERSION): consume the topic (earliest, a new consumer group), decode the value with Quix's JSON
deserializer (orjson), read the Segment "Audience Entered/Exited" event (email in `context.traits.email` or
`properties.email`, the audience from `properties.audience_key`, entered/exited from `properties[<key>]` or the
event name), normalise the email (strip + lower) and SHA-256 it; a `BatchingSink` keeps the rows per
topic-partition until Quix's checkpoint (default commit interval, 5 s) calls its `write()`, which groups them
by advertiser/action and POSTs chunks of up to 1,000 rows to the sandbox's `/segment/mapping/` (the body
service/tiktok/payloads.py builds, EMAIL_SHA256 only); a non-zero TikTok code raises, so Quix commits the
checkpoint only after every POST succeeded. The audience ids come from the command line (the harness passes
service.devtools.sample.DEFAULT_AUDIENCES, the ids the workload uses); this file imports nothing from the
service, because it runs in its own virtualenv: quixstreams pins a confluent-kafka the service's does not.

Measured by the application itself, on CLOCK_MONOTONIC (the harness's `time.monotonic()` reads the same clock):
`t_first` when the first record reaches the pipeline, `t_done` when every one of the N records is posted (or
skipped) *and* the group's committed offsets sum to N (a monitor thread polls them with OffsetFetch once every
row is posted: the topic is pre-produced by a plain producer, so offsets run from 0 without gaps), and the
process's CPU time (os.times, every thread) between the two. It writes `started.json` at the first record and
`result.json` at the end into --status-dir, then stops the application.

The harness side (`ensure_venv`) builds the virtualenv lazily under artifacts/bench/quix-venv and reuses it.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

QUIX_VERSION = "3.28.1"
REQUIREMENTS = (f"quixstreams=={QUIX_VERSION}", "requests")
MAX_ROWS = 1000  # rows per POST, the service's default BATCH_MAX_ROWS
ENTERED = "Audience Entered"


class InstallError(Exception):
    """The quixstreams virtualenv could not be created or installed."""


# -- harness side: the virtualenv ------------------------------------------------------------------------------


def ensure_venv(venv: Path, log: Path, timeout_s: float = 600.0) -> Path:
    """The venv's python, after `python -m venv` + `pip install quixstreams==QUIX_VERSION requests` if needed.

    Reused when its marker file says the pinned version was installed and quixstreams imports.
    """
    py = venv / "bin" / "python"
    marker = venv / f".bench-installed-quixstreams-{QUIX_VERSION}"
    log.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout_s

    def run(argv: list[str]) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise InstallError(f"installing quixstreams: timeout after {timeout_s:.0f}s")
        with open(log, "ab") as out:
            out.write(f"$ {' '.join(argv)}\n".encode())
            out.flush()
            try:
                r = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, timeout=left)
            except (OSError, subprocess.SubprocessError) as e:
                raise InstallError(f"{argv[0]}: {e}") from e
        if r.returncode != 0:
            raise InstallError(f"`{' '.join(argv[:4])} …` exited with {r.returncode} (see {log})")

    if marker.exists() and py.exists():
        return py
    if not py.exists():
        run([sys.executable, "-m", "venv", str(venv)])
    run([str(py), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *REQUIREMENTS])
    run([str(py), "-c", "import quixstreams, requests, orjson, confluent_kafka; print(quixstreams.__version__)"])
    marker.write_text(QUIX_VERSION + "\n")
    return py


# -- the application (runs in the quixstreams virtualenv) -------------------------------------------------------


class Progress:
    """Counters shared by the pipeline, the sink and the monitor thread."""

    def __init__(self, events: int, status_dir: Path) -> None:
        self.events = events
        self.status_dir = status_dir
        self.lock = threading.Lock()
        self.consumed = 0
        self.skipped = 0
        self.posted = 0
        self.requests = 0
        self.t_first: float | None = None
        self.cpu_first = 0.0
        self.t_consumed_all: float | None = None
        self.t_posted_all: float | None = None
        self.all_posted = threading.Event()

    def first(self) -> None:
        self.t_first = time.monotonic()
        self.cpu_first = _cpu()
        write_json(self.status_dir / "started.json", {"t_first": self.t_first, "pid": os.getpid()})

    def finished_some(self, posted: int = 0, skipped: int = 0, requests: int = 0) -> None:
        with self.lock:
            self.posted += posted
            self.skipped += skipped
            self.requests += requests
            if self.posted + self.skipped >= self.events and self.t_posted_all is None:
                self.t_posted_all = time.monotonic()
                self.all_posted.set()

    def result(self, t_done: float, cpu_done: float, **extra: Any) -> dict[str, Any]:
        """`result.json` of a finished run: the window the harness measures and the counts it checks."""
        assert self.t_first is not None
        return {
            "ok": True,
            "events": self.events,
            "t_first": self.t_first,
            "t_consumed_all": self.t_consumed_all,
            "t_posted_all": self.t_posted_all,
            "t_done": t_done,
            "cpu_s": cpu_done - self.cpu_first,
            "consumed": self.consumed,
            "posted": self.posted,
            "skipped": self.skipped,
            "python": sys.version.split()[0],
            **extra,
        }


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


def write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)  # atomic: the harness never reads half a file


def _parse_audiences(values: list[str]) -> dict[str, tuple[str, str]]:
    out = {}
    for v in values:
        key, _, ids = v.partition("=")
        adv, _, aud = ids.partition(":")
        if not key or not adv or not aud:
            raise SystemExit(f"--audience {v!r}: expected KEY=ADVERTISER_ID:AUDIENCE_ID")
        out[key] = (adv, aud)
    return out


def baseline_parser(description: str | None) -> argparse.ArgumentParser:
    """The command line of both baselines (this one and bench/bare_baseline.py): the harness passes the same."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bootstrap", required=True)
    p.add_argument("--topic", required=True)
    p.add_argument("--group", required=True)
    p.add_argument("--url", required=True, help="TikTok API base, e.g. http://127.0.0.1:PORT/open_api/v1.3")
    p.add_argument("--token", required=True)
    p.add_argument("--audience", action="append", default=[], metavar="KEY=ADVERTISER_ID:AUDIENCE_ID")
    p.add_argument("--events", type=int, required=True, help="records in the topic (N)")
    p.add_argument("--status-dir", type=Path, required=True)
    p.add_argument(
        "--consumer-config",
        action="append",
        default=[],
        metavar="PROPERTY=VALUE",
        help="librdkafka consumer property (the harness passes the service's session.timeout.ms)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = baseline_parser(__doc__).parse_args(argv)
    audiences = _parse_audiences(args.audience)
    args.status_dir.mkdir(parents=True, exist_ok=True)

    # Only in the quixstreams virtualenv (mypy runs from the service's, which has neither quixstreams nor requests).
    import orjson
    import quixstreams  # type: ignore[import-not-found,unused-ignore]
    import requests  # type: ignore[import-untyped,unused-ignore]
    from confluent_kafka import Consumer, TopicPartition
    from quixstreams import Application
    from quixstreams.sinks import BatchingSink, SinkBatch  # type: ignore[import-not-found,unused-ignore]

    progress = Progress(args.events, args.status_dir)
    mapping_url = args.url.rstrip("/") + "/segment/mapping/"

    class MappingSink(BatchingSink):  # type: ignore[misc,unused-ignore]
        """Rows batched by Quix per topic-partition; each checkpoint's flush POSTs them before the commit."""

        def __init__(self) -> None:
            super().__init__()
            self.session = requests.Session()
            self.session.headers.update({"Access-Token": args.token, "Content-Type": "application/json"})

        def write(self, batch: SinkBatch) -> None:
            groups: dict[tuple[str, str], list[tuple[str, str]]] = {}
            for item in batch:
                adv, action, aud, digest = item.value
                groups.setdefault((adv, action), []).append((aud, digest))
            for (adv, action), rows in groups.items():
                for i in range(0, len(rows), MAX_ROWS):
                    chunk = rows[i : i + MAX_ROWS]
                    body = {
                        "advertiser_ids": [adv],
                        "action": action,
                        "id_schema": ["EMAIL_SHA256"],
                        "batch_data": [[{"id": digest, "audience_ids": [aud]}] for aud, digest in chunk],
                    }
                    r = self.session.post(mapping_url, data=orjson.dumps(body), timeout=30)
                    r.raise_for_status()
                    answer = r.json()
                    if answer.get("code") != 0:  # raising aborts the checkpoint: nothing is committed
                        raise RuntimeError(f"segment/mapping answered {answer.get('code')}: {answer.get('message')}")
                    progress.finished_some(posted=len(chunk), requests=1)

    def to_row(ev: Any) -> tuple[str, str, str, str] | None:
        """Segment event → (advertiser, action, audience, sha256 of the normalised email), or None to skip."""
        if progress.t_first is None:
            progress.first()
        progress.consumed += 1
        if progress.consumed == progress.events:
            progress.t_consumed_all = time.monotonic()
        row = None
        if isinstance(ev, dict):
            props = ev.get("properties") or {}
            key = props.get("audience_key")
            target = audiences.get(key) if isinstance(key, str) else None
            traits = (ev.get("context") or {}).get("traits") or {}
            email = traits.get("email") or props.get("email")
            if target is not None and isinstance(email, str) and email.strip():
                member = props.get(key)
                entered = member if isinstance(member, bool) else ev.get("event") == ENTERED
                digest = hashlib.sha256(email.strip().lower().encode()).hexdigest()
                row = (target[0], "add" if entered else "delete", target[1], digest)
        if row is None:
            progress.finished_some(skipped=1)
        return row

    app = Application(
        broker_address=args.bootstrap,
        consumer_group=args.group,
        auto_offset_reset="earliest",
        state_dir=str(args.status_dir / "state"),
        consumer_extra_config=dict(kv.split("=", 1) for kv in args.consumer_config),
    )
    topic = app.topic(args.topic, value_deserializer="json")
    sdf = app.dataframe(topic)
    sdf = sdf.apply(to_row).filter(lambda row: row is not None)
    sdf.sink(MappingSink())

    def monitor() -> None:
        """Once every row is posted: poll the group's committed offsets until they cover all N records."""
        progress.all_posted.wait()
        c = Consumer({"bootstrap.servers": args.bootstrap, "group.id": args.group, "enable.auto.commit": False})
        try:
            meta = c.list_topics(args.topic, timeout=10).topics[args.topic]
            tps = [TopicPartition(args.topic, part) for part in meta.partitions]
            while True:
                committed = c.committed(tps, timeout=10)
                if sum(max(tp.offset, 0) for tp in committed) >= args.events:
                    break
                time.sleep(0.02)
            t_done, cpu_done = time.monotonic(), _cpu()
        finally:
            with contextlib.suppress(Exception):
                c.close()
        write_json(
            args.status_dir / "result.json",
            progress.result(t_done, cpu_done, requests=progress.requests, quixstreams=quixstreams.__version__),
        )
        app.stop()

    def guarded_monitor() -> None:
        try:
            monitor()
        except Exception as e:  # the harness reads the failure instead of waiting for its timeout
            write_json(args.status_dir / "result.json", {"ok": False, "error": f"monitor: {e!r}"})
            app.stop(fail=True)

    threading.Thread(target=guarded_monitor, name="bench-monitor", daemon=True).start()
    app.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
