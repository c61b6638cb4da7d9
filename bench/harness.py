"""The benchmark: `python -m bench [--quick] [--only ROW[,ROW]] [--events N] [--compare-ref REF]` (`make bench`).

Everything runs on this machine over 127.0.0.1: tansu
(service.devtools.broker.LocalBroker), the TikTok sandbox as its own
process (`python -m service sandbox`) and the service as a real subprocess (`python -m service run`) at its
default configuration (service/config.py; SERVICE_CONFIG below sets only what the harness needs, each with its
reason). Every figure is printed beside a baseline measured in the same run, because the box is shared and small
(2 cores). Rows (a full run: email, quix, bare, floor, budget, the other e2e rows, phone-options, latency,
latency-unbound, memory, scaling, profile; `--only` takes any of these names, `e2e` for the five drains):

  ceiling          a bare confluent-kafka consume loop over a row's pre-produced records (messages/s)
  email, phone-national, phone-e164, mixed, avro
                   `audience-sync run` draining a pre-produced backlog of N records through decode → resolve →
                   normalise/hash → batch → HTTP upload → commit: N / (t_done - t_first_consumed), from /metrics
                   polled every 0.5 s (0.05 s before the first record, 0.1 s past 90% finished, so the window's
                   edges are sharp); as a ratio of that row's ceiling; and the service process's CPU µs/event
                   (its CPU time over the window / N). N events over N/2 users and 3 audiences: an event
                   superseded in the buffers by a newer one for the same cell counts as finished
  quix             bench/quix_baseline.py: a plain Quix Streams application (quixstreams, pinned, in its own
                   virtualenv artifacts/bench/quix-venv, created on first use) doing the same job on the email
                   backlog with a new group and a fresh sandbox: JSON, normalise + SHA-256 the email, a BatchingSink
                   that POSTs up to 1,000 rows per advertiser/action at each checkpoint (default commit interval),
                   so Quix commits after the POST. N / (t_done - t_first), t_done = every row posted and the
                   group's committed offsets covering N; its process CPU µs/event over that window; the sandbox's
                   request log must hold exactly N accepted rows. If the install fails the row says so
  bare             bench/bare_baseline.py (the service's virtualenv): the cheapest Python loop doing the job on the
                   email backlog (consume, orjson, SHA-256, lists per advertiser/action, keep-alive POSTs of up to
                   1,000 rows, commit after them) with none of the service's guarantees (ordering across actions,
                   netting, dead letters, retries, rebalances, metrics): a lower bound on Python's CPU per event for
                   this job, measured like quix (status files, process CPU over t_first..t_done, sandbox row check)
  offline          offline conversions (issue 12; bench/workload.py `offline`: half canonical, half Segment
                   e-commerce) drained by the service at its defaults with a default event set configured:
                   events/s and the service's CPU µs/event against this row's own floor (the same records)
  floor            in this process, on (up to 200,000 of) the email backlog's own record values: orjson.loads +
                   strip/lower + SHA-256 hex of the email, thread CPU µs/event, best of 3
  budget           the service with TIKTOK_MAX_QPS=10 against a sandbox whose fault plan enforces 10 QPS and 600
                   QPM on segment/mapping (`rate_limit_qps`, `rate_limit_qpm`; a sandbox that refuses the qpm key
                   gets the qps limit only, noted), draining the email backlog: rows/s accepted by the sandbox over
                   the drain window, mean rows per request (sandbox log and the service's audience_sync_batch_rows
                   histogram), and the 40100 answers (service metric and sandbox log)
  scaling          events/s with 1, 2 and 4 service processes in one group on an 8-partition topic; the group
                   joins on the empty topic first and the backlog is then produced from memory (~1 s), so
                   rebalancing is not in the window
  latency          event time → TikTok ack p50/p99 (the service's histogram, interpolated like histogram_quantile)
                   at half the mixed row's rate, with fresh event timestamps, paced for ~20 s; BATCH_LINGER_MS=200
                   and KAFKA_FETCH_WAIT_MAX_MS=100 (LATENCY_CONFIG: a tansu quirk under live traffic)
  latency-unbound  the same with TIKTOK_MAX_QPS=1000 (info): at the default 8 QPS, half the mixed maximum needs
                   about 9.5 requests/s, so this shows how much of the default row is waiting for request turns
  memory           peak RSS (VmHWM) of the service draining a 1,000,000-event backlog (200,000 with --quick)
  phone-options    national-format phone normalise+hash per second in this process, on the phone-national row's
                   seeded input (same events/users, so the same repeats), each option bounded to --phone-seconds:
                   (a) phonenumbers without the cache, (b) the service's LRU as shipped (warmed to its steady
                   state), (c) a spawned process pool of nproc workers over (a) in chunks, (d) already-E.164 input
                   (the fast path); ratios against (a), plus the LRU hit ratio of the input (bench/phone_options.py)
  profile          py-spy (raw collapsed stacks) of the service draining the email backlog, then the mixed one if
                   the run's budget allows; top frames of each printed

  targets          (computed at the end from the rows of the same run, each with its baseline and PASS/FAIL)
                   e2e email ev/s ≥ 3.5x quix's; service CPU µs/event (email) ≤ 3x the floor; mixed and avro CPU
                   µs/event ≤ 1.5x email's; latency p99 ≤ linger + 250 ms; peak RSS ≤ 300 MB; budget ≥ 60,000
                   rows/s and no 40100; phone-national: the phonenumbers share of its CPU per event (report)

  compare          with --compare-ref REF only: this tree against the git commit REF in the same run, on the same
                   tansu and the same pre-produced backlog: the e2e rows of --compare-rows (default email,mixed;
                   memory too with --compare-memory) drained by this tree's service then REF's (a detached worktree
                   under artifacts/bench/ref-<sha>), --compare-repeats times interleaved; medians of ev/s and of the
                   service's CPU µs/event per side, and their ratio (bench/compare.py). Without --only, a
                   --compare-ref run measures only the comparison; with --only, those rows run after it

Results: a markdown table on stdout and in artifacts/bench/results.md, raw figures in artifacts/bench/results.json,
child logs (logs/, with quix-install.log and quix.log) and the profiles (profile-email.raw.txt,
profile-mixed.raw.txt) under artifacts/bench/; the comparison
in artifacts/bench/compare.md and compare.json (a comparison-only run leaves results.md/json as they were).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from bench import compare, phone_options, procs, profiling, quix_baseline, workload
from bench.procs import Children
from service.devtools.broker import LocalBroker
from service.devtools.sample import DEFAULT_AUDIENCES

ARTIFACTS = procs.ROOT / "artifacts" / "bench"
QUIX_VENV = ARTIFACTS / "quix-venv"
P = "audience_sync_"
POLL_S = 0.5
E2E_ROWS = ("email", "phone-e164", "phone-national", "mixed", "avro")
ALL_ROWS = (
    "email",
    "quix",
    "bare",
    "floor",
    "budget",
    *E2E_ROWS[1:],
    "phone-options",
    "latency",
    "latency-unbound",
    "memory",
    "scaling",
    "profile",
    "offline",
)
EMAIL_USERS = ("quix", "bare", "floor", "budget", "profile")  # rows that read the email backlog after the email row
PROFILE_KINDS = ("email", "mixed")  # email first: the CPU-per-event target is measured on it
SANDBOX_LOG_SIZE = 10_000  # requests the sandbox's request log keeps (SandboxState's default)
FLOOR_SAMPLE = 200_000  # records of the email backlog the floor loop runs over (bounded: they are held in memory)

# The service runs at its defaults (BATCH_MAX_ROWS, TIKTOK_MAX_QPS, MAX_INFLIGHT_REQUESTS, BATCH_LINGER_MS …: see
# service/config.py); what is set here only concerns the harness, not what a drain measures.
SERVICE_CONFIG = {
    # Only SIGTERM at the end of a row waits on it (after the drain is measured): bounds each row's shutdown to
    # 10 s instead of the default 20 s when the last uploads are slow to finish.
    "DRAIN_TIMEOUT_S": "10",
    # No member joins or leaves inside a drain window, so this is outside every measurement. It shortens what
    # happens before one: tansu answers a new group's first join only after seconds that grow with the session
    # timeout (the quix row, which gets the same value, waited ~24 s at librdkafka's 45 s default, ~3 s at 6 s),
    # and it bounds the wait for a member that vanished without a LeaveGroup (the scaling row's groups).
    "KAFKA_SESSION_TIMEOUT_MS": "6000",
    # The default, set explicitly so a LOG_LEVEL in the caller's environment does not change what is measured.
    "LOG_LEVEL": "INFO",
}
# The latency row only. tansu answers a fetch that finds no new data at fetch.wait.max.ms even when data arrives
# meanwhile (Kafka answers as soon as it arrives), which would add up to librdkafka's 500 ms default to
# event→ack latency under live traffic. The throughput rows drain a pre-produced backlog: there a fetch waits
# only when its partitions are at their end, and then Kafka waits just the same, so they keep the default.
LATENCY_CONFIG = {"KAFKA_FETCH_WAIT_MAX_MS": "100"}
LATENCY_LINGER_MS = 200
UNBOUND_QPS = 1000  # the latency-unbound row: requests are never scarce at half the mixed maximum
# The budget row: TikTok's Basic tier (10 QPS / 600 QPM on segment/mapping), enforced by the sandbox.
BUDGET_QPS = 10
BUDGET_QPM = 600

TARGETS = {
    "email_vs_quix": 3.5,  # e2e email ev/s ≥ 3.5 x the Quix Streams baseline's, same run
    "cpu_vs_floor": 3.0,  # service CPU µs/event (email) ≤ 3 x the parse + normalise + hash floor
    "cpu_vs_email": 1.5,  # mixed and avro CPU µs/event ≤ 1.5 x email's
    "latency_p99_over_linger_s": 0.250,
    "memory_peak_mb": 300,
    "budget_rows_per_s": 60_000,  # at TIKTOK_MAX_QPS=10 against a sandbox enforcing 10 QPS / 600 QPM
    "budget_40100": 0,
}


class Interrupted(Exception):
    pass


def _on_signal(signum: int, _frame: Any) -> None:
    raise Interrupted(f"signal {signum}")


@dataclass
class Row:
    name: str
    figure: str
    baseline: str = ""
    ratio: str = ""
    target: str = ""
    result: str = "info"
    cpu: str = ""
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class Service:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.children = Children()
        self.rows: list[Row] = []
        self.notes: list[str] = []
        self.rates: dict[str, float] = {}
        self.cpu_us: dict[str, float] = {}  # e2e row → the service process's CPU µs per event
        self.quix: dict[str, Any] | None = None  # the quix row's result (ev/s, CPU µs/event)
        self.bare: dict[str, Any] | None = None  # the bare row's result (ev/s, CPU µs/event)
        self.floor_us: float | None = None  # the floor row's µs/event
        self.pending: list[str] = []  # selected rows not run yet
        self.topics: dict[str, tuple[str, int]] = {}  # workload kind → (topic, records) already produced
        self.profiles: dict[str, dict[str, Any]] = {}  # workload kind → profiling.summarise()
        self.phone_options: dict[str, Any] | None = None
        self.selected: list[str] = []
        self.superseded: dict[str, float] = {}
        self.t0 = time.monotonic()
        self.broker: LocalBroker | None = None
        self.run_id = time.strftime("%Y%m%d-%H%M%S")
        self.logs = ARTIFACTS / "logs"
        self.comparison: compare.Comparison | None = None

    # -- budget ------------------------------------------------------------------------------------------

    def remaining(self) -> float:
        return float(self.args.budget) - (time.monotonic() - self.t0)

    def timeout(self, wanted: float) -> float:
        """A phase timeout: what it wants, but never past the run's budget (at least 20 s)."""
        return max(20.0, min(wanted, self.remaining()))

    def say(self, msg: str) -> None:
        print(f"[{time.monotonic() - self.t0:6.1f}s] {msg}", file=sys.stderr, flush=True)

    # -- broker, topics, records -------------------------------------------------------------------------

    @property
    def bootstrap(self) -> str:
        assert self.broker is not None
        return self.broker.bootstrap

    def new_topic(self, label: str, partitions: int = 8) -> str:
        assert self.broker is not None
        topic = f"bench-{label}-{uuid.uuid4().hex[:8]}"
        self.broker.create_topics({topic: partitions, topic + ".dlq": 1})
        return topic

    def delete_topic(self, topic: str) -> None:
        """Best effort: tansu keeps topics in memory, so drop a row's records once it is done."""
        with contextlib.suppress(Exception):
            admin = AdminClient({"bootstrap.servers": self.bootstrap, "log_level": 0})
            for fut in admin.delete_topics([topic, topic + ".dlq"], operation_timeout=10).values():
                with contextlib.suppress(Exception):
                    fut.result(timeout=10)

    def produce(self, topic: str, records: Iterable[workload.Record], timeout_s: float) -> tuple[int, float]:
        """As fast as possible: a plain Producer with large linger and batches. Returns (acked, seconds)."""
        p = Producer(
            {
                "bootstrap.servers": self.bootstrap,
                "linger.ms": 100,
                "batch.size": 1_000_000,
                "batch.num.messages": 10_000,
                "queue.buffering.max.messages": 500_000,
                "queue.buffering.max.kbytes": 1_048_576,
                "log_level": 3,
            }
        )
        failed = 0

        def on_delivery(err: Any, _msg: Any) -> None:
            nonlocal failed
            if err is not None:
                failed += 1

        start = time.monotonic()
        deadline = start + timeout_s
        sent = 0
        for key, value, headers in records:
            while True:
                try:
                    p.produce(topic, value, key, headers=headers, on_delivery=on_delivery)
                    break
                except BufferError:
                    p.poll(0.02)
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"producing to {topic}: timeout after {timeout_s:.0f}s") from None
            sent += 1
            if sent % 5000 == 0:
                p.poll(0)
                if time.monotonic() > deadline:
                    raise TimeoutError(f"producing to {topic}: timeout after {timeout_s:.0f}s")
        left = p.flush(max(1.0, deadline - time.monotonic()))
        if left or failed:
            raise RuntimeError(f"producing to {topic}: {left} undelivered, {failed} failed")
        return sent, time.monotonic() - start

    def backlog(self, kind: str, n: int, *, seed: int = 1) -> str:
        """A fresh topic with `n` records of `kind` (cached per kind and size for reuse by other rows)."""
        cached = self.topics.get(kind)
        if cached and cached[1] == n:
            return cached[0]
        topic = self.new_topic(kind)
        t = self.timeout(60 + n / 10_000)
        count, secs = self.produce(topic, workload.generate(kind, n, seed=seed), t)
        self.say(f"produced {count:,} {kind} records to {topic} in {secs:.1f}s")
        self.topics[kind] = (topic, n)
        return topic

    def ceiling(self, topic: str, n: int, runs: int = 3) -> tuple[float | None, list[float | None]]:
        """Best of `runs` bare consume loops over the topic (messages/s), and every run's figure.

        Best of several because one run on this shared box can lose a second to scheduling; each run takes well
        under a second when nothing interferes.
        """
        figures = [self._consume_once(topic, n, 30.0) for _ in range(runs)]
        got = [f for f in figures if f]
        return (max(got) if got else None), figures

    def _consume_once(self, topic: str, n: int, timeout_s: float) -> float | None:
        """consume(1000) like the service, assigned (a group join takes seconds on tansu and is not measured).

        A 10 ms timeout: consume(1000, t) waits the full `t` when fewer than 1000 records are queued, which at
        partition tails would time the timeout rather than the broker.
        """
        c = Consumer(
            {
                "bootstrap.servers": self.bootstrap,
                "group.id": f"ceiling-{uuid.uuid4().hex[:8]}",
                "enable.auto.commit": False,
                "log_level": 3,
            }
        )
        got, t_first, t_last = 0, 0.0, 0.0
        deadline = time.monotonic() + self.timeout(timeout_s)
        try:
            meta = c.list_topics(topic, timeout=10).topics[topic]
            c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in meta.partitions])
            while got < n and time.monotonic() < deadline:
                msgs = c.consume(1000, 0.01)
                if not msgs:
                    continue
                if got == 0:
                    t_first = time.monotonic()
                for msg in msgs:
                    if msg.error() is None:
                        msg.value()
                        got += 1
            t_last = time.monotonic()
        finally:
            c.close()
        if got < n or t_last <= t_first:
            return None
        return n / (t_last - t_first)

    # -- child processes ---------------------------------------------------------------------------------

    def start_sandbox(self, label: str, faults: dict[str, Any] | None = None) -> tuple[subprocess.Popen[bytes], str]:
        """`python -m service sandbox` on a free port, with a fault plan (`--faults FILE.json`) if given."""
        port = procs.free_port()
        argv = [procs.python(), "-m", "service", "sandbox", "--host", "127.0.0.1", "--port", str(port)]
        argv += ["--token", "sandbox-token"]
        for a in workload.sandbox_audiences():
            argv += ["--audience", a]
        if faults is not None:
            plan = self.logs / f"faults-{label}.json"
            plan.write_text(json.dumps(faults))
            argv += ["--faults", str(plan)]
        proc = self.children.popen(argv, log=self.logs / f"sandbox-{label}.log", env=self._env())
        if not procs.wait_for(lambda: proc.poll() is not None or procs.port_open(port), 20):
            raise RuntimeError("sandbox did not listen within 20s")
        if proc.poll() is not None:
            raise RuntimeError(f"sandbox exited with {proc.returncode}: {_tail(self.logs / f'sandbox-{label}.log')}")
        return proc, f"http://127.0.0.1:{port}/open_api/v1.3"

    @staticmethod
    def _env() -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("KAFKA_", "TIKTOK_"))}
        for k in ("SOURCE_TOPIC", "DLQ_TOPIC", "CONSUMER_GROUP", "MAPPINGS_FILE", "DEFAULT_ADVERTISER_ID"):
            env.pop(k, None)
        return env

    def service_env(self, topic: str, group: str, tiktok_url: str, **extra: str) -> dict[str, str]:
        env = self._env()
        env.update(SERVICE_CONFIG)
        env.update(
            KAFKA_BOOTSTRAP_SERVERS=self.bootstrap,
            SOURCE_TOPIC=topic,
            DLQ_TOPIC=topic + ".dlq",
            CONSUMER_GROUP=group,
            TIKTOK_API_URL=tiktok_url,
            TIKTOK_ACCESS_TOKEN="sandbox-token",
            HTTP_HOST="127.0.0.1",
            HTTP_PORT=str(procs.free_port()),
        )
        env.update(extra)
        return env

    def start_service(
        self, env: dict[str, str], label: str, argv_prefix: list[str] | None = None, cwd: Path | None = None
    ) -> Service:
        """`python -m service run` in `cwd` (default this tree; --compare-ref passes its worktree)."""
        log = self.logs / f"service-{label}.log"
        argv = [*(argv_prefix or []), procs.python(), "-m", "service", "run"]
        proc = self.children.popen(argv, log=log, env=env, cwd=cwd)
        return Service(proc, int(env["HTTP_PORT"]), log)

    def wait_ready(self, services: list[Service], timeout_s: float = 60.0) -> None:
        def ready() -> bool:
            for s in services:
                if s.proc.poll() is not None:
                    raise RuntimeError(f"service exited with {s.proc.returncode} before /readyz: {_tail(s.log)}")
            return all(procs.http_status(s.port, "/readyz") == 200 for s in services)

        if not procs.wait_for(ready, self.timeout(timeout_s), 0.2):
            raise TimeoutError(f"service not ready (/readyz) after {timeout_s:.0f}s")

    def stop_services(self, services: list[Service]) -> None:
        for s in services:
            with contextlib.suppress(ProcessLookupError):
                if s.proc.poll() is None:
                    s.proc.send_signal(signal.SIGTERM)
        for s in services:
            Children.stop(s.proc, 20)

    # -- measuring a drain -------------------------------------------------------------------------------

    def drain(
        self,
        services: list[Service],
        n: int,
        timeout_s: float,
        cpu_pids: dict[str, list[int]],
    ) -> dict[str, Any]:
        """Poll /metrics until every record is consumed and finished; N / (t_done - t_first consumed > 0)."""
        start = time.monotonic()
        deadline = start + timeout_s
        t_first: float | None = None
        meter: procs.CpuMeter | None = None
        last: dict[str, float] = {}
        per_process: list[float] = []
        t95: tuple[float, float] | None = None  # (time, finished) when 95% of N was finished
        while True:
            tick = time.monotonic()
            snap = {"consumed": 0.0, "uploaded": 0.0, "superseded": 0.0, "dead_lettered": 0.0, "skipped": 0.0}
            per_process = []
            for s in services:
                text = procs.scrape(s.port)
                if text is None:
                    continue
                m = procs.parse_metrics(text)
                c = procs.total(m, P + "events_consumed_total")
                per_process.append(c)
                snap["consumed"] += c
                snap["uploaded"] += procs.total(m, P + "events_uploaded_total")
                snap["superseded"] += procs.total(m, P + "events_superseded_total")
                snap["dead_lettered"] += procs.total(m, P + "events_dead_lettered_total")
                snap["skipped"] += procs.total(m, P + "events_skipped_total")
                # offline conversions acked by TikTok (their dead letters and skips are counted above)
                snap["uploaded"] += procs.total(m, P + "offline_events_total", outcome="sent")
            now = time.monotonic()
            if snap["consumed"] > 0 or last:
                last = snap
            if t_first is None and snap["consumed"] > 0:
                t_first = now
                meter = procs.CpuMeter(cpu_pids)
            finished = snap["uploaded"] + snap["superseded"] + snap["dead_lettered"] + snap["skipped"]
            if t95 is None and t_first is not None and finished >= 0.95 * n:
                t95 = (now, finished)
            if snap["consumed"] >= n and finished >= n:
                assert t_first is not None and meter is not None
                secs = max(1e-6, now - t_first)
                return {
                    "ok": True,
                    "eps": n / secs,
                    # without the tail (the last partial batches wait for BATCH_LINGER_MS)
                    "eps_95": t95[1] / (t95[0] - t_first) if t95 and t95[0] > t_first else None,
                    "seconds": secs,
                    "counts": snap,
                    "per_process_consumed": per_process,
                    "cpu": meter.read(),
                }
            dead = [s for s in services if s.proc.poll() is not None]
            if dead:
                return {
                    "ok": False,
                    "error": f"service exited with {dead[0].proc.returncode}: {_tail(dead[0].log)}",
                    "counts": last,
                }
            if now > deadline:
                return {
                    "ok": False,
                    "error": f"timeout after {timeout_s:.0f}s",
                    "counts": last,
                    "per_process_consumed": per_process,
                    "cpu": meter.read() if meter else {},
                }
            # 0.5 s in the middle; finer while waiting for the first record and near the end, so the window's
            # edges are known to ~0.1 s (one scrape costs the service about a millisecond)
            interval = POLL_S
            if t_first is None:
                interval = 0.05
            elif finished >= 0.9 * n:
                interval = 0.1
            time.sleep(max(0.0, interval - (time.monotonic() - tick)))

    def pids(self, services: list[Service], sandbox: subprocess.Popen[bytes]) -> dict[str, list[int]]:
        assert self.broker is not None and self.broker._proc is not None
        return {
            "service": [s.proc.pid for s in services],
            "sandbox": [sandbox.pid],
            "broker": [self.broker._proc.pid],
        }

    def needs_backlog(self, kind: str) -> bool:
        """Whether a row still to run reads `kind`'s backlog (the email one: quix, floor, budget, profile)."""
        if kind == "email" and any(r in self.pending for r in EMAIL_USERS):
            return True
        return kind in PROFILE_KINDS and "profile" in self.pending

    def release_backlog(self, kind: str) -> None:
        """Drop `kind`'s topic unless a later row reads it again."""
        if self.needs_backlog(kind):
            return
        kept = self.topics.pop(kind, None)
        if kept:
            self.delete_topic(kept[0])

    # -- rows --------------------------------------------------------------------------------------------

    def row_e2e(self, kind: str) -> None:
        n = self.args.events
        topic = self.backlog(kind, n)
        ceiling, ceiling_runs = self.ceiling(topic, n)
        self.say(f"{kind}: ceiling {_fmt_rate(ceiling)} msg/s (best of {', '.join(map(_fmt_rate, ceiling_runs))})")
        sandbox, url = self.start_sandbox(kind)
        services: list[Service] = []
        try:
            env = self.service_env(topic, f"bench-{kind}-{uuid.uuid4().hex[:6]}", url)
            services = [self.start_service(env, kind)]
            t = self.timeout(self.args.row_timeout)
            d = self.drain(services, n, t, self.pids(services, sandbox))
        finally:
            self.stop_services(services)
            Children.stop(sandbox, 10)
            self.release_backlog(kind)
        if kind == "email" or not any(r.name.startswith("ceiling") for r in self.rows):
            self.rows.append(
                Row(
                    f"ceiling: bare consume loop ({kind} records)",
                    f"{_fmt_rate(ceiling)} msg/s" if ceiling else "timeout after 30s",
                    "",
                    "",
                    "baseline of the e2e rows (best of 3 runs)",
                    "info",
                    data={"events": n, "ceiling_mps": ceiling, "runs": ceiling_runs},
                )
            )
        row = Row(
            f"e2e {kind}",
            "",
            data={"events": n, "ceiling_mps": ceiling, "ceiling_runs": ceiling_runs, "drain": d, "topic": topic},
        )
        if ceiling:
            row.baseline = f"ceiling {_fmt_rate(ceiling)} msg/s"
        if d["ok"]:
            eps = d["eps"]
            self.rates[kind] = eps
            us = self.cpu_us[kind] = _cpu_us(d, n)
            row.data["cpu_us_per_event"] = us
            row.figure = (
                f"{_fmt_rate(eps)} ev/s"
                + (f" (to 95%: {_fmt_rate(d['eps_95'])})" if d["eps_95"] else "")
                + f"; service CPU {us:.1f} µs/event"
            )
            row.cpu = _fmt_cpu(d["cpu"])
            ratio = eps / ceiling if ceiling else None
            row.ratio = f"{ratio:.1%} of ceiling" if ratio is not None else "n/a"
            row.data["ratio"] = ratio
            c = d["counts"]
            row.data["superseded_share"] = c["superseded"] / n
            self.superseded[kind] = c["superseded"] / n
            if c["dead_lettered"] or c["skipped"]:
                self.notes.append(
                    f"e2e {kind}: {c['dead_lettered']:.0f} dead-lettered, {c['skipped']:.0f} skipped (expected 0)"
                )
        else:
            row.figure = d["error"].splitlines()[0][:80]
            row.result = "FAIL" if kind == "email" else "error"
        if kind == "email":
            # the verdict needs the quix row of the same run: Bench.targets() fills it in at the end
            row.target = f"≥ {TARGETS['email_vs_quix']:g}x the quix baseline's ev/s (same run)"
        self.rows.append(row)
        self.say(f"{kind}: {row.figure} ({row.ratio}) {row.result}")

    # -- the Quix Streams baseline, the floor, the TikTok budget ------------------------------------------

    def row_quix(self) -> None:
        """bench/quix_baseline.py in its own virtualenv, draining the email backlog into a fresh sandbox."""
        n = self.args.events
        row = Row("quix baseline (email, Quix Streams)", "")
        self.rows.append(row)
        try:
            t = time.monotonic()
            py = quix_baseline.ensure_venv(QUIX_VENV, self.logs / "quix-install.log", self.timeout(600))
            self.say(f"quix: virtualenv {_rel(QUIX_VENV)} ready in {time.monotonic() - t:.1f}s")
        except quix_baseline.InstallError as e:
            row.figure, row.result = "error: could not install quixstreams", "error"
            row.data = {"error": str(e)}
            self.notes.append(f"quix: could not install quixstreams {quix_baseline.QUIX_VERSION}: {e}")
            self.say(f"quix: {e}")
            return
        env = {k: v for k, v in self._env().items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        res, requests = self._run_baseline(
            "quix", [str(py), str(procs.ROOT / "bench" / "quix_baseline.py")], env, ARTIFACTS
        )
        self.quix = self._baseline_row(row, "quix", res, requests, n)
        row.data["quixstreams"] = quix_baseline.QUIX_VERSION
        if res.get("ok") and res.get("t_consumed_all") and res.get("t_posted_all"):
            row.figure = row.figure.replace(
                " ev/s;", f" ev/s (all consumed at {_fmt_rate(n / max(1e-6, res['t_consumed_all'] - res['t_first']))});"
            )
            self.notes.append(
                f"quix: the {n:,} records were consumed {res['t_consumed_all'] - res['t_first']:.1f} s after the "
                f"first, all rows posted {res['t_posted_all'] - res['t_consumed_all']:.1f} s later and committed "
                f"{res['t_done'] - res['t_posted_all']:.2f} s after that: Quix flushes its sinks (the POSTs) and "
                "commits at each checkpoint, every 5 s by default"
            )
        self.say(f"quix: {row.figure}; {row.target}")

    def _run_baseline(
        self, label: str, cmd: list[str], env: dict[str, str], cwd: Path
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Run a baseline process (quix, bare) on the email backlog against a fresh sandbox: its result file and
        the sandbox's request log."""
        topic = self.backlog("email", self.args.events)
        status = ARTIFACTS / f"{label}-status"
        for f in ("started.json", "result.json"):
            (status / f).unlink(missing_ok=True)
        sandbox, url = self.start_sandbox(label)
        proc: subprocess.Popen[bytes] | None = None
        log = self.logs / f"{label}.log"
        try:
            proc = self.children.popen([*cmd, *self._baseline_args(label, topic, url)], log=log, env=env, cwd=cwd)
            res = self._wait_quix(proc, sandbox, status, log, self.timeout(self.args.row_timeout + 60))
            return res, _sandbox_requests(url)
        finally:
            if proc is not None:
                Children.stop(proc, 20)
            Children.stop(sandbox, 10)
            self.release_backlog("email")

    def _baseline_args(self, label: str, topic: str, url: str) -> list[str]:
        """The command line quix_baseline.py and bare_baseline.py share (status files in artifacts/<label>-status)."""
        argv = ["--bootstrap", self.bootstrap, "--topic", topic, "--group", f"bench-{label}-{uuid.uuid4().hex[:6]}"]
        argv += ["--url", url, "--token", "sandbox-token", "--events", str(self.args.events)]
        argv += ["--status-dir", str(ARTIFACTS / f"{label}-status")]
        # the harness-only consumer setting the service gets too (SERVICE_CONFIG), nothing else
        argv += ["--consumer-config", f"session.timeout.ms={SERVICE_CONFIG['KAFKA_SESSION_TIMEOUT_MS']}"]
        for a in DEFAULT_AUDIENCES:
            argv += ["--audience", f"{a.key}={a.advertiser_id}:{a.audience_id}"]
        return argv

    def _baseline_row(
        self, row: Row, label: str, res: dict[str, Any], requests: list[dict[str, Any]], n: int
    ) -> dict[str, Any] | None:
        """Fill a baseline process's row (quix, bare) from its result file and the sandbox's request log; its
        ev/s and CPU µs/event, or None when it failed or the sandbox did not get exactly N rows."""
        row.data = {"events": n, "result": res}
        if not res.get("ok"):
            row.figure, row.result = f"error: {str(res.get('error'))[:90]}", "error"
            return None
        secs = max(1e-6, res["t_done"] - res["t_first"])
        eps, us = n / secs, res["cpu_s"] * 1e6 / n
        ok_reqs = [r for r in requests if r.get("code") == 0]
        rows_got = sum(r.get("rows") or 0 for r in ok_reqs)
        row.data.update(eps=eps, cpu_us_per_event=us, sandbox_rows=rows_got, sandbox_requests=len(requests))
        row.figure = f"{_fmt_rate(eps)} ev/s; process CPU {us:.1f} µs/event"
        row.cpu = _fmt_cpu(res.get("cpu") or {})
        row.target = (
            f"sandbox got {rows_got:,} rows in {len(ok_reqs):,} accepted requests "
            f"({len(requests) - len(ok_reqs)} refused); expected {n:,}"
        )
        if "email" in self.rates:
            row.baseline = f"e2e email {_fmt_rate(self.rates['email'])} ev/s"
            row.ratio = f"email = {self.rates['email'] / eps:.2f}x {label}"
        if rows_got != n or len(requests) >= SANDBOX_LOG_SIZE:
            row.result = "error"
            row.target += " (log full: may be truncated)" if len(requests) >= SANDBOX_LOG_SIZE else " — MISMATCH"
            return None
        return {"eps": eps, "cpu_us": us}

    def row_bare(self) -> None:
        """bench/bare_baseline.py (the service's virtualenv): the cheapest Python loop doing the job, a lower bound."""
        n = self.args.events
        row = Row("bare loop (email, lower bound)", "")
        self.rows.append(row)
        res, requests = self._run_baseline(
            "bare", [procs.python(), "-m", "bench.bare_baseline"], self._env(), procs.ROOT
        )
        self.bare = self._baseline_row(row, "bare", res, requests, n)
        self.say(f"bare: {row.figure}; {row.target}")

    def _wait_quix(
        self, proc: subprocess.Popen[bytes], sandbox: subprocess.Popen[bytes], status: Path, log: Path, timeout_s: float
    ) -> dict[str, Any]:
        """Poll the baseline's status files; the CPU meter starts when its first record is consumed."""
        assert self.broker is not None and self.broker._proc is not None
        deadline = time.monotonic() + timeout_s
        meter: procs.CpuMeter | None = None
        pids = {"service": [proc.pid], "sandbox": [sandbox.pid], "broker": [self.broker._proc.pid]}
        while True:
            if meter is None and (status / "started.json").exists():
                meter = procs.CpuMeter(pids)
            if (status / "result.json").exists():
                res: dict[str, Any] = json.loads((status / "result.json").read_text())
                res["cpu"] = meter.read() if meter else {}
                return res
            if proc.poll() is not None:
                return {"ok": False, "error": f"exited with {proc.returncode}: {_tail(log)}"}
            if time.monotonic() > deadline:
                return {"ok": False, "error": f"timeout after {timeout_s:.0f}s ({_tail(log, 1)})"}
            time.sleep(0.05 if meter is None else 0.1)

    def row_floor(self) -> None:
        """orjson.loads + strip/lower + SHA-256 hex of the email, per record of the email backlog (best of 3)."""
        n = self.args.events
        topic = self.backlog("email", n)
        try:
            values = self._read_values(topic, min(n, FLOOR_SAMPLE))
        finally:
            self.release_backlog("email")
        runs = [_floor_pass(values) for _ in range(3)]
        best = min(cpu for cpu, _wall in runs)
        us = best * 1e6 / len(values)
        self.floor_us = us
        self.rows.append(
            Row(
                "floor: orjson.loads + strip/lower + SHA-256 (email)",
                f"{us:.2f} µs/event",
                target=f"thread CPU time, best of 3 over {len(values):,} records of the email backlog (this process)",
                data={"records": len(values), "runs_cpu_s": [c for c, _ in runs], "runs_wall_s": [w for _, w in runs]},
            )
        )
        self.say(f"floor: {us:.2f} µs/event over {len(values):,} records")

    def _read_values(self, topic: str, count: int) -> list[bytes]:
        """The first `count` record values of `topic` (every partition from its start)."""
        c = Consumer(
            {
                "bootstrap.servers": self.bootstrap,
                "group.id": f"floor-{uuid.uuid4().hex[:8]}",
                "enable.auto.commit": False,
                "log_level": 3,
            }
        )
        out: list[bytes] = []
        deadline = time.monotonic() + self.timeout(60)
        try:
            meta = c.list_topics(topic, timeout=10).topics[topic]
            c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in meta.partitions])
            while len(out) < count:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"floor: read {len(out):,} of {count:,} records in 60s")
                for msg in c.consume(1000, 0.05):
                    value = msg.value()
                    if msg.error() is None and value is not None and len(out) < count:
                        out.append(value)
        finally:
            c.close()
        return out

    def row_offline(self) -> None:
        """Offline conversions (issue 12): half canonical, half Segment "Order Completed"-style, email + phone on
        half; the service at its defaults with an event set configured; against this row's own floor (orjson.loads
        + SHA-256 of the email of the same records)."""
        n = self.args.events
        topic = self.new_topic("offline")
        produced, secs = self.produce(topic, workload.offline(n), self.timeout(120))
        self.say(f"offline: produced {produced:,} records in {secs:.1f}s")
        values = self._read_values(topic, min(n, FLOOR_SAMPLE))
        floor = min(cpu for cpu, _ in (_floor_pass(values, top_level=True) for _ in range(3))) * 1e6 / len(values)
        mappings = self.logs / "mappings-offline.yaml"
        mappings.write_text(workload.offline_mappings())
        sandbox, url = self.start_sandbox("offline")
        services: list[Service] = []
        try:
            env = self.service_env(topic, f"bench-offline-{uuid.uuid4().hex[:6]}", url, MAPPINGS_FILE=str(mappings))
            services = [self.start_service(env, "offline")]
            d = self.drain(services, n, self.timeout(self.args.row_timeout), self.pids(services, sandbox))
        finally:
            self.stop_services(services)
            Children.stop(sandbox, 10)
            self.delete_topic(topic)
        row = Row("e2e offline conversions", "", data={"events": n, "floor_us": floor, "drain": d})
        row.baseline = f"floor {floor:.2f} µs/event (these records)"
        row.target = "report (issue 12): events/s and CPU per event against the same run's floor"
        if d["ok"]:
            cpu_us = _cpu_us(d, n)
            row.figure = f"{_fmt_rate(d['eps'])} ev/s; service CPU {cpu_us:.1f} µs/event" if cpu_us else ""
            row.ratio = f"{cpu_us / floor:.1f}x floor" if cpu_us else "n/a"
            row.cpu = _fmt_cpu(d["cpu"])
            c = d["counts"]
            if c["dead_lettered"] or c["skipped"]:
                self.notes.append(f"offline: {c['dead_lettered']:.0f} dead-lettered, {c['skipped']:.0f} skipped")
        else:
            row.figure = d["error"].splitlines()[0][:80]
            row.result = "error"
        self.rows.append(row)
        self.say(f"offline: {row.figure} ({row.ratio})")

    def row_budget(self) -> None:
        """The service at TIKTOK_MAX_QPS=10, a sandbox enforcing 10 QPS and 600 QPM, draining the email backlog."""
        n = self.args.events
        topic = self.backlog("email", n)
        plan: dict[str, Any] = {
            "rate_limit_qps": BUDGET_QPS,
            "rate_limit_qpm": BUDGET_QPM,
            "rate_limit_path": "/segment/mapping/",
        }
        services: list[Service] = []
        sandbox: subprocess.Popen[bytes] | None = None
        metrics: dict[str, list[tuple[dict[str, str], float]]] = {}
        try:
            try:
                sandbox, url = self.start_sandbox("budget", plan)
            except RuntimeError as e:
                if "rate_limit_qpm" not in str(e):
                    raise
                plan.pop("rate_limit_qpm")
                self.notes.append(
                    f'budget: this tree\'s sandbox refuses the fault plan key `rate_limit_qpm` ("{_last_clause(e)}"); '
                    f"the row ran with the {BUDGET_QPS} QPS limit only, so a QPM overrun was not enforced"
                )
                sandbox, url = self.start_sandbox("budget-qps", plan)
            env = self.service_env(topic, f"bench-budget-{uuid.uuid4().hex[:6]}", url, TIKTOK_MAX_QPS=str(BUDGET_QPS))
            services = [self.start_service(env, "budget")]
            d = self.drain(services, n, self.timeout(self.args.row_timeout), self.pids(services, sandbox))
            metrics = procs.parse_metrics(procs.scrape(services[0].port) or "")
            requests = _sandbox_requests(url)
        finally:
            self.stop_services(services)
            if sandbox is not None:
                Children.stop(sandbox, 10)
            self.release_backlog("email")
        ok_reqs = [r for r in requests if r.get("code") == 0]
        rows_ok = sum(r.get("rows") or 0 for r in ok_reqs)
        log_40100 = sum(1 for r in requests if r.get("code") == 40100)
        svc_40100 = procs.total(metrics, P + "tiktok_answers_total", code="40100")
        hist_sum = procs.total(metrics, P + "batch_rows_sum")
        hist_count = procs.total(metrics, P + "batch_rows_count")
        window = (
            _max_in_window([float(r["t"]) for r in ok_reqs], 1.0),
            _max_in_window([float(r["t"]) for r in ok_reqs], 60.0),
        )
        limits = f"{BUDGET_QPS} QPS" + (f" / {BUDGET_QPM} QPM" if "rate_limit_qpm" in plan else " (QPM not enforced)")
        data = {
            "events": n,
            "plan": plan,
            "drain": d,
            "sandbox_requests": len(requests),
            "sandbox_rows_accepted": rows_ok,
            "sandbox_40100": log_40100,
            "service_40100": svc_40100,
            "batch_rows_hist": [hist_sum, hist_count],
            "max_accepted_in_1s": window[0],
            "max_accepted_in_60s": window[1],
        }
        rate = Row(f"budget: rows/s at TIKTOK_MAX_QPS={BUDGET_QPS}, sandbox {limits}", "", data=data)
        answers = Row("budget: 40100 answers", "", data=data)
        rate.target = f"≥ {TARGETS['budget_rows_per_s']:,} rows/s"
        answers.target = f"= {TARGETS['budget_40100']}"
        if not d["ok"]:
            rate.figure, rate.result = d["error"].splitlines()[0][:80], "FAIL"
        else:
            per_s = rows_ok / d["seconds"]
            mean_log = rows_ok / len(ok_reqs) if ok_reqs else 0.0
            mean_hist = hist_sum / hist_count if hist_count else 0.0
            data.update(rows_per_s=per_s, mean_rows_per_request=mean_log, mean_rows_histogram=mean_hist)
            rate.figure = (
                f"{_fmt_rate(per_s)} rows/s ({rows_ok:,} rows accepted in {d['seconds']:.1f} s; "
                f"{_fmt_rate(d['eps'])} ev/s)"
            )
            rate.baseline = f"QPS x 1,000 = {BUDGET_QPS * 1000:,} rows/s"
            rate.ratio = (
                f"{mean_log:,.0f} rows/request ({len(ok_reqs)} accepted; service histogram mean {mean_hist:,.0f})"
            )
            rate.cpu = _fmt_cpu(d["cpu"])
            rate.result = "PASS" if per_s >= TARGETS["budget_rows_per_s"] else "FAIL"
        if len(requests) >= SANDBOX_LOG_SIZE:
            self.notes.append(f"budget: the sandbox's request log is full ({SANDBOX_LOG_SIZE:,}): counts may be low")
        answers.figure = f"{svc_40100:.0f} (service metric); sandbox log {log_40100}"
        answers.baseline = (
            f"accepted requests: at most {window[0]} in any 1 s, {window[1]} in any 60 s"
            f" (limits {BUDGET_QPS} / {BUDGET_QPM})"
        )
        answers.result = "PASS" if max(svc_40100, log_40100) <= TARGETS["budget_40100"] else "FAIL"
        self.rows += [rate, answers]
        self.say(f"budget: {rate.figure}; {rate.ratio}; 40100: {answers.figure}")

    # -- targets computed from several rows ----------------------------------------------------------------

    def targets(self) -> None:
        """Verdicts that compare rows of this run: email vs quix, CPU vs floor, mixed/avro vs email, phones."""
        email = next((r for r in self.rows if r.name == "e2e email"), None)
        if email is not None and "email" in self.rates:
            if self.quix:
                ratio = self.rates["email"] / self.quix["eps"]
                email.baseline = "; ".join(x for x in (f"quix {_fmt_rate(self.quix['eps'])} ev/s", email.baseline) if x)
                email.ratio = "; ".join(x for x in (f"{ratio:.2f}x quix", email.ratio) if x)
                email.result = "PASS" if ratio >= TARGETS["email_vs_quix"] else "FAIL"
            else:
                email.result = "n/a (no quix figure in this run)"
        if "email" in self.cpu_us:
            us = self.cpu_us["email"]
            row = Row("CPU per event, email (service process)", f"{us:.1f} µs/event")
            row.target = f"≤ {TARGETS['cpu_vs_floor']:g}x the floor"
            if self.floor_us:
                row.baseline = f"floor {self.floor_us:.2f} µs/event"
                row.ratio = f"{us / self.floor_us:.1f}x floor"
                row.result = "PASS" if us <= TARGETS["cpu_vs_floor"] * self.floor_us else "FAIL"
            else:
                row.result = "n/a (no floor row in this run)"
            if self.quix:
                row.target += f"; quix process {self.quix['cpu_us']:.1f} µs/event"
            if self.bare:
                row.target += f"; bare loop {self.bare['cpu_us']:.1f} µs/event ({us / self.bare['cpu_us']:.1f}x)"
            self.rows.append(row)
        for kind in ("mixed", "avro"):
            if kind not in self.cpu_us:
                continue
            us = self.cpu_us[kind]
            row = Row(f"CPU per event, {kind} (service process)", f"{us:.1f} µs/event")
            row.target = f"≤ {TARGETS['cpu_vs_email']:g}x email's"
            if "email" in self.cpu_us:
                base = self.cpu_us["email"]
                row.baseline = f"email {base:.1f} µs/event"
                row.ratio = f"{us / base:.2f}x email"
                row.result = "PASS" if us <= TARGETS["cpu_vs_email"] * base else "FAIL"
            else:
                row.result = "n/a (no email row in this run)"
            self.rows.append(row)
        self._phone_share()

    def _phone_share(self) -> None:
        """phone-national: what phonenumbers costs per event with the shipped LRU, and what the cache buys."""
        m = self.phone_options
        if not m or any("per_s" not in m[k] for k in ("a_uncached", "b_lru", "d_e164")):
            return
        lru_us = 1e6 / m["b_lru"]["per_s"]
        e164_us = 1e6 / m["d_e164"]["per_s"]
        pn_us = max(0.0, lru_us - e164_us)  # what the national-format path adds over the E.164 fast path
        row = Row("phone-national: phonenumbers share", f"{pn_us:.1f} µs/event in phonenumbers (LRU as shipped)")
        row.ratio = f"the LRU buys {m['b_lru']['per_s'] / m['a_uncached']['per_s']:.2f}x over no cache"
        row.target = "report"
        svc = self.cpu_us.get("phone-national")
        if svc:
            row.figure += f" = {pn_us / svc:.0%} of the service's {svc:.1f} µs/event"
            if "phone-e164" in self.cpu_us:
                row.baseline = (
                    f"service phone-e164 {self.cpu_us['phone-e164']:.1f} µs/event "
                    f"(difference {svc - self.cpu_us['phone-e164']:.1f})"
                )
        else:
            row.figure += f" = {pn_us / lru_us:.0%} of normalise+hash ({lru_us:.1f} µs); no phone-national e2e row"
        row.data = {"phonenumbers_us": pn_us, "lru_us": lru_us, "e164_us": e164_us, "service_us": svc}
        self.rows.append(row)

    def row_latency(self, qps: int | None = None) -> None:
        """p50/p99 event → ack at half the mixed maximum; `qps` overrides TIKTOK_MAX_QPS (the unbound variant: how
        much of the default row's latency is waiting for request turns under the default budget)."""
        if "mixed" not in self.rates:
            self.say("latency: needs the mixed row's max rate: running it first")
            self.row_e2e("mixed")
        if "mixed" not in self.rates:
            self.rows.append(Row("latency", "skipped: no mixed max rate in this run", result="error"))
            return
        rate = self.rates["mixed"] / 2
        warmup, measure = 3.0, self.args.latency_seconds
        topic = self.new_topic("latency")
        sandbox, url = self.start_sandbox("latency")
        services: list[Service] = []
        row = Row(f"latency p99 @ {_fmt_rate(rate)} ev/s", "")
        extra = dict(LATENCY_CONFIG)
        if qps is not None:
            row.name += f", TIKTOK_MAX_QPS={qps} (budget not binding)"
            extra["TIKTOK_MAX_QPS"] = str(qps)
        try:
            env = self.service_env(
                topic,
                f"bench-latency-{uuid.uuid4().hex[:6]}",
                url,
                BATCH_LINGER_MS=str(LATENCY_LINGER_MS),
                **extra,
            )
            services = [self.start_service(env, "latency")]
            self.wait_ready(services)
            svc = services[0]
            meter = procs.CpuMeter(self.pids(services, sandbox))
            p = Producer({"bootstrap.servers": self.bootstrap, "linger.ms": 5, "log_level": 3})
            total_n = int(rate * (warmup + measure))
            gen = workload.generate("mixed", total_n, seed=7)
            start = time.monotonic()
            sent, h0, sent_at_h0 = 0, None, 0
            pending: workload.Record | None = None
            while sent < total_n:
                now = time.monotonic()
                if now - start > warmup + measure + 30:
                    raise TimeoutError("latency: producer fell behind by 30s")
                due = min(total_n, int(rate * (now - start)))
                while sent < due:
                    # generated now, so the event timestamp is fresh
                    key, value, headers = pending or next(gen)
                    try:
                        p.produce(topic, value, key, headers=headers)
                    except BufferError:
                        pending = (key, value, headers)
                        p.poll(0.01)
                        continue
                    pending = None
                    sent += 1
                p.poll(0)
                if h0 is None and now - start >= warmup:
                    text = procs.scrape(svc.port)
                    h0 = procs.histogram_buckets(procs.parse_metrics(text or ""), P + "event_to_ack_seconds")
                    sent_at_h0 = sent
                time.sleep(0.005)
            produce_s = time.monotonic() - start
            p.flush(10)
            # wait for the tail to be acknowledged
            d = self.drain(services, total_n, self.timeout(60), self.pids(services, sandbox))
            text = procs.scrape(svc.port)
            h1 = procs.histogram_buckets(procs.parse_metrics(text or ""), P + "event_to_ack_seconds")
            cpu = meter.read()
        finally:
            self.stop_services(services)
            Children.stop(sandbox, 10)
            self.delete_topic(topic)
        delta = {le: h1.get(le, 0.0) - (h0 or {}).get(le, 0.0) for le in h1}
        p50 = procs.histogram_quantile(0.5, delta)
        p99 = procs.histogram_quantile(0.99, delta)
        limit = LATENCY_LINGER_MS / 1000 + TARGETS["latency_p99_over_linger_s"]
        achieved = sent / produce_s if produce_s else 0
        row.data = {
            "target_rate": rate,
            "achieved_rate": achieved,
            "produced": sent,
            "measured_events": sent - sent_at_h0,
            "p50_s": p50,
            "p99_s": p99,
            "buckets_delta": {str(k): v for k, v in sorted(delta.items())},
            "linger_ms": LATENCY_LINGER_MS,
            "drain": d,
        }
        row.cpu = _fmt_cpu(cpu)
        row.baseline = f"half of mixed max {_fmt_rate(self.rates['mixed'])} ev/s; produced {_fmt_rate(achieved)}/s"
        row.target = f"p99 ≤ linger {LATENCY_LINGER_MS} ms + 250 ms"
        if p50 is None or p99 is None or not d["ok"]:
            row.figure = "no acks observed" if d["ok"] else d["error"].splitlines()[0][:80]
            row.result = "FAIL"
        else:
            lo, hi = _bucket_of(p99, delta)
            row.figure = f"p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms (bucket {lo:g}-{hi:g} s)"
            row.ratio = f"p99 = {p99 / limit:.2f}x limit"
            row.result = "PASS" if p99 <= limit else "FAIL"
            if qps is not None:
                row.result = f"info ({row.result.lower()} against the limit; the target is at the defaults)"
        self.rows.append(row)
        self.say(f"latency: {row.figure} {row.result}")

    def row_memory(self) -> None:
        n = self.args.memory_events
        topic = self.new_topic("memory")
        t = self.timeout(60 + n / 10_000)
        count, secs = self.produce(topic, workload.generate("mixed", n, seed=3), t)
        self.say(f"memory: produced {count:,} mixed records in {secs:.1f}s")
        sandbox, url = self.start_sandbox("memory")
        services: list[Service] = []
        row = Row(f"memory peak RSS, {n:,}-event backlog", "")
        startup_kb = None
        try:
            env = self.service_env(topic, f"bench-memory-{uuid.uuid4().hex[:6]}", url)
            services = [self.start_service(env, "memory")]
            svc = services[0]
            procs.wait_for(lambda: svc.proc.poll() is not None or procs.port_open(svc.port), 30, 0.05)
            startup_kb = procs.proc_status_kb(svc.proc.pid, "VmRSS")
            t = self.timeout(self.args.row_timeout * n / self.args.events)
            d = self.drain(services, n, t, self.pids(services, sandbox))
            peak_kb = procs.proc_status_kb(svc.proc.pid, "VmHWM")
            end_kb = procs.proc_status_kb(svc.proc.pid, "VmRSS")
        finally:
            self.stop_services(services)
            Children.stop(sandbox, 10)
            self.delete_topic(topic)
        row.data = {"events": n, "startup_rss_kb": startup_kb, "peak_rss_kb": peak_kb, "end_rss_kb": end_kb, "drain": d}
        row.target = f"≤ {TARGETS['memory_peak_mb']} MB"
        row.cpu = _fmt_cpu(d.get("cpu") or {})
        if peak_kb is None:
            row.figure, row.result = "no VmHWM (service gone)", "FAIL"
        else:
            mb = peak_kb / 1024
            row.figure = f"{mb:.0f} MB" + ("" if d["ok"] else f" ({d['error'].splitlines()[0][:60]})")
            if startup_kb:
                row.baseline = f"RSS at startup {startup_kb / 1024:.0f} MB"
                row.ratio = f"{peak_kb / startup_kb:.1f}x startup"
            if d["ok"]:
                row.baseline += f"; drained at {_fmt_rate(d['eps'])} ev/s"
            row.result = "PASS" if mb <= TARGETS["memory_peak_mb"] and d["ok"] else "FAIL"
        if n < 1_000_000:
            row.target += " (target is for 1,000,000)"
        self.rows.append(row)
        self.say(f"memory: {row.figure} {row.result}")

    def row_scaling(self) -> None:
        n = self.args.events
        records = list(workload.generate("email", n, seed=5))
        self.say(f"scaling: {n:,} email records generated; nproc={os.cpu_count()}")
        results: dict[int, dict[str, Any]] = {}
        for k in (1, 2, 4):
            if self.remaining() < 30:
                results[k] = {"ok": False, "error": "skipped: over the run's time budget"}
                continue
            topic = self.new_topic(f"scale{k}")
            group = f"bench-scale{k}-{uuid.uuid4().hex[:6]}"
            sandbox, url = self.start_sandbox(f"scale{k}")
            services: list[Service] = []
            try:
                env0 = self.service_env(topic, group, url)
                for i in range(k):
                    env = dict(env0, HTTP_PORT=str(procs.free_port()))
                    services.append(self.start_service(env, f"scale{k}-{i}"))
                # join the group on an empty topic first, so rebalancing is not in the measurement
                self.wait_ready(services, 90)
                self._wait_group_settled(services)
                # produce the backlog from memory (fast) in a thread while the drain is polled
                result: dict[str, Any] = {}

                def produce(_t: str = topic, _r: dict[str, Any] = result, _recs: list[Any] = records) -> None:
                    try:
                        _r["produce"] = self.produce(_t, _recs, 120)
                    except Exception as e:
                        _r["error"] = repr(e)

                producer = threading.Thread(target=produce, name="bench-producer", daemon=True)
                producer.start()
                d = self.drain(services, n, self.timeout(self.args.row_timeout), self.pids(services, sandbox))
                producer.join(130)
                d["produce_s"] = result.get("produce", (0, 0.0))[1]
                if "error" in result:
                    d = {"ok": False, "error": "producing: " + result["error"]}
                results[k] = d
            except (TimeoutError, RuntimeError) as e:
                results[k] = {"ok": False, "error": str(e)}
            finally:
                self.stop_services(services)
                Children.stop(sandbox, 10)
                self.delete_topic(topic)
            self.say(f"scaling {k}: {_fmt_rate(results[k].get('eps'))} ev/s {results[k].get('error', '')[:80]}")
        del records
        ncpu = os.cpu_count() or 1
        parts = []
        for k, d in results.items():
            if d.get("ok"):
                c = d["cpu"]
                parts.append(
                    f"{k}: box {c['box']:.0f}% of {100 * ncpu}% (services {c['service']:.0f}, sandbox "
                    f"{c['sandbox']:.0f}, broker {c['broker']:.0f}, others' load {c['other']:.0f})"
                )
        if parts:
            four = results.get(4, {})
            verdict = ""
            if four.get("ok"):
                busy = four["cpu"]["box"]
                verdict = (
                    " → the cores are the limit (every process competes for them)"
                    if busy >= 0.85 * 100 * ncpu
                    else " → cores not saturated: the limit is elsewhere (sandbox, broker, or per-process waits)"
                )
            self.notes.append(f"scaling: nproc={ncpu}; CPU during each drain: " + "; ".join(parts) + verdict)
        base = results.get(1, {}).get("eps")
        for k, d in results.items():
            row = Row(f"scaling {k} process{'es' if k > 1 else ''} (email)", "", data={"events": n, "drain": d})
            if d.get("ok"):
                row.figure = f"{_fmt_rate(d['eps'])} ev/s"
                row.cpu = _fmt_cpu(d["cpu"])
                if base:
                    row.baseline = f"1 process {_fmt_rate(base)} ev/s"
                    row.ratio = f"{d['eps'] / base:.2f}x"
                split = ", ".join(f"{c:,.0f}" for c in d.get("per_process_consumed", []))
                row.target = f"consumed per process: {split}"
            else:
                row.figure = str(d.get("error", "error")).splitlines()[0][:80]
                row.result = "error"
            self.rows.append(row)

    def _wait_group_settled(self, services: list[Service], quiet_s: float = 3.0, timeout_s: float = 40.0) -> None:
        """Until the rebalance counters of every member have not moved for `quiet_s` (bounded)."""
        deadline = time.monotonic() + timeout_s
        last, since = None, time.monotonic()
        while time.monotonic() < deadline:
            now_counts = []
            for s in services:
                m = procs.parse_metrics(procs.scrape(s.port) or "")
                now_counts.append(procs.total(m, P + "rebalances_total"))
            if now_counts != last:
                last, since = now_counts, time.monotonic()
            elif time.monotonic() - since >= quiet_s and all(
                procs.http_status(s.port, "/readyz") == 200 for s in services
            ):
                return
            time.sleep(0.25)
        self.notes.append(f"scaling {len(services)}: group did not settle within {timeout_s:.0f}s")

    def rows_profile(self) -> None:
        """The email drain under py-spy (the failing target), then mixed while the run's budget allows."""
        for kind in PROFILE_KINDS:
            if kind != PROFILE_KINDS[0] and self.remaining() < 60:
                self.rows.append(Row(f"profile ({kind})", "skipped: run budget nearly used up", result="skipped"))
                kept = self.topics.pop(kind, None)
                if kept:
                    self.delete_topic(kept[0])
                continue
            try:
                self.row_profile(kind)
            except (TimeoutError, RuntimeError) as e:
                self.rows.append(Row(f"profile ({kind})", f"{e}".splitlines()[0][:100], result="FAIL"))
                self.say(f"profile {kind}: {e}")

    def row_profile(self, kind: str) -> None:
        n = self.args.events
        spy = profiling.py_spy_binary()
        if spy is None:
            self.rows.append(Row(f"profile ({kind})", "py-spy not installed (pip install py-spy)", result="error"))
            return
        topic = self.backlog(kind, n)
        out = ARTIFACTS / f"profile-{kind}.raw.txt"
        out.unlink(missing_ok=True)
        sandbox, url = self.start_sandbox(f"profile-{kind}")
        services: list[Service] = []
        spy_proc: subprocess.Popen[bytes] | None = None
        mode = "attach"
        spy_argv = [spy, "record", "--format", "raw", "--rate", "100", "--nonblocking", "-o", str(out)]
        spy_log = self.logs / f"py-spy-{kind}.log"
        try:
            env = self.service_env(topic, f"bench-profile-{kind}-{uuid.uuid4().hex[:6]}", url)
            svc = self.start_service(env, f"profile-{kind}")
            services = [svc]
            procs.wait_for(lambda: svc.proc.poll() is not None or procs.port_open(svc.port), 30, 0.05)
            spy_proc = self.children.popen([*spy_argv, "--pid", str(svc.proc.pid)], log=spy_log)
            time.sleep(1.5)
            if spy_proc.poll() is not None:
                # no ptrace: let py-spy start the service itself
                mode = "launch"
                self.stop_services(services)
                env = dict(env, HTTP_PORT=str(procs.free_port()))
                spy_proc = self.children.popen(
                    [*spy_argv, "--", procs.python(), "-m", "service", "run"], log=spy_log, env=env
                )
                services = [Service(spy_proc, int(env["HTTP_PORT"]), spy_log)]
            d = self.drain(services, n, self.timeout(self.args.row_timeout * 2), self.pids(services, sandbox))
        finally:
            if spy_proc is not None and mode == "attach":
                Children.stop(spy_proc, 20, signal.SIGINT)
            self.stop_services(services)
            if spy_proc is not None:
                Children.stop(spy_proc, 20)
            Children.stop(sandbox, 10)
            self.delete_topic(topic)
            self.topics.pop(kind, None)
        row = Row(f"profile ({kind}, py-spy 100 Hz)", "", data={"mode": mode, "drain": d, "artifact": str(out)})
        if d["ok"]:
            row.figure = f"{_fmt_rate(d['eps'])} ev/s under py-spy"
            row.cpu = _fmt_cpu(d["cpu"])
            if kind in self.rates:
                row.baseline = f"{kind} {_fmt_rate(self.rates[kind])} ev/s"
                row.ratio = f"{d['eps'] / self.rates[kind]:.2f}x"
        else:
            row.figure = d["error"].splitlines()[0][:80]
            row.result = "error"
        if out.exists() and out.stat().st_size:
            prof = self.profiles[kind] = profiling.summarise(out)
            row.target = f"{_rel(out)} ({prof['samples']} samples, {mode})"
        else:
            row.target = f"no profile written ({mode}); see {spy_log}"
            row.result = "error"
        self.rows.append(row)
        self.say(f"profile {kind}: {row.figure}; {row.target}")

    def row_phone_options(self) -> None:
        """National-format phone normalise+hash options on the phone-national row's input (bench/phone_options.py)."""
        n = self.args.events
        self.say(f"phone-options: {n:,}-event phone-national sequence, {self.args.phone_seconds:g} s per option")
        m = phone_options.measure(n, seconds=self.args.phone_seconds)
        base = m["a_uncached"]["per_s"]
        window = f"events {m['window'][0]:,}-{m['window'][1]:,} of the phone-national input"
        specs = [
            ("a_uncached", "(a) phonenumbers, no cache", f"{window}; every call parses"),
            (
                "b_lru",
                f"(b) LRU {m['cache_size']:,} as shipped",
                f"hit ratio {m['b_lru']['hit_ratio']:.1%} in the window, {m['lru_hit_ratio_all']:.1%} over all "
                f"{m['events']:,} events ({m['users']:,} users)",
            ),
            (
                "c_pool",
                f"(c) process pool, {os.cpu_count()} workers",
                f"uncached, chunks of {phone_options.CHUNK:,}; spawn {m['c_pool'].get('startup_s', 0):.1f} s not timed",
            ),
            ("d_e164", "(d) already-E.164 input (fast path)", "reference: the phone-e164 row's path"),
        ]
        for key, label, target in specs:
            r = m[key]
            row = Row(f"phone options {label}", "", data=r)
            if "per_s" not in r:
                row.figure, row.result = r.get("error", "error"), "error"
                self.rows.append(row)
                continue
            row.figure = f"{_fmt_rate(r['per_s'])} phones/s normalise+hash"
            row.baseline = f"(a) no cache {_fmt_rate(base)}/s"
            row.ratio = f"{r['per_s'] / base:.2f}x of (a)"
            row.target = target + f"; {r['items']:,} in {r['seconds']:.1f} s"
            row.cpu = _fmt_cpu(r["cpu"])
            self.rows.append(row)
        self.notes.append(
            f"phone options: LRU hit ratio of the phone-national input {m['lru_hit_ratio_all']:.1%} "
            f"({m['events']:,} events over {m['users']:,} users, {m['distinct_numbers']:,} distinct numbers, "
            f"cache {m['cache_size']:,}); measured in the harness process with no service running; the pool's "
            "workers are counted as harness CPU, and in the service they would compete with the sandbox and broker "
            "for the same cores"
        )
        self.phone_options = m
        self.say(
            "phone-options: "
            + ", ".join(f"{k[0]} {_fmt_rate(m[k].get('per_s'))}/s" for k, _, _ in specs)
            + f"; LRU hits {m['lru_hit_ratio_all']:.1%} ({m['total_s']:.1f} s)"
        )

    # -- run ---------------------------------------------------------------------------------------------

    def run(self, selected: list[str]) -> int:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        for old in self.logs.glob("*.log"):
            old.unlink()
        self.selected = selected
        self.pending = list(selected)
        self.notes.append(f"nproc={os.cpu_count()}; load average at start {_loadavg()}")
        self.broker = LocalBroker(log_path=self.logs / "tansu.log").start()
        self.say(f"tansu on {self.bootstrap}")
        if self.args.compare_ref:
            compare.run(self)
        for name in selected:
            self.pending.remove(name)
            if self.remaining() < 30:
                self.rows.append(Row(name, f"skipped: run budget {self.args.budget:.0f}s used up", result="skipped"))
                continue
            self.say(f"--- {name}")
            try:
                if name in E2E_ROWS:
                    self.row_e2e(name)
                elif name == "latency":
                    self.row_latency()
                elif name == "latency-unbound":
                    self.row_latency(qps=UNBOUND_QPS)
                elif name == "memory":
                    self.row_memory()
                elif name == "scaling":
                    self.row_scaling()
                elif name == "profile":
                    self.rows_profile()
                elif name == "phone-options":
                    self.row_phone_options()
                elif name == "quix":
                    self.row_quix()
                elif name == "bare":
                    self.row_bare()
                elif name == "floor":
                    self.row_floor()
                elif name == "budget":
                    self.row_budget()
                elif name == "offline":
                    self.row_offline()
            except (TimeoutError, RuntimeError) as e:
                self.rows.append(Row(name, f"{e}".splitlines()[0][:100], result="FAIL"))
                self.say(f"{name}: {e}")
        self.targets()
        self.notes.append(f"load average at end {_loadavg()}")
        return 0


# -- output ----------------------------------------------------------------------------------------------


def _bucket_of(x: float, buckets: dict[float, float]) -> tuple[float, float]:
    lo = 0.0
    for b in sorted(buckets):
        if x <= b:
            return lo, b
        lo = b
    return lo, float("inf")


def _cpu_us(d: dict[str, Any], n: int) -> float:
    """The service process's CPU µs per event over a drain window (its CPU % of a core x window / N)."""
    return float(d["cpu"].get("service", 0.0)) * float(d["seconds"]) * 1e6 / n / 100


def _floor_pass(values: list[bytes], *, top_level: bool = False) -> tuple[float, float]:
    """(thread CPU s, wall s) of orjson.loads + strip/lower + SHA-256 hex of the email over every value.

    `top_level`: also look at a top-level `email` (canonical offline events carry it there)."""
    loads, sha256 = orjson.loads, hashlib.sha256
    cpu0, wall0 = time.thread_time(), time.perf_counter()
    for v in values:
        ev = loads(v)
        email = (ev.get("email") if top_level else None) or (
            ((ev.get("context") or {}).get("traits") or {}).get("email") or (ev.get("properties") or {}).get("email")
        )
        if email:
            sha256(email.strip().lower().encode()).hexdigest()
    return time.thread_time() - cpu0, time.perf_counter() - wall0


def _sandbox_requests(url: str) -> list[dict[str, Any]]:
    """The sandbox's request log for segment/mapping (`GET /_sandbox/requests`), oldest first."""
    base = url.split("/open_api/", 1)[0]
    try:
        with urllib.request.urlopen(f"{base}/_sandbox/requests?path=/segment/mapping/", timeout=30) as r:
            body: dict[str, Any] = json.loads(r.read())
    except OSError:
        return []
    return list(body.get("requests", []))


def _max_in_window(ts: list[float], width: float) -> int:
    """The most timestamps in any half-open window of `width` seconds."""
    ts = sorted(ts)
    best, lo = 0, 0
    for hi, t in enumerate(ts):
        while ts[lo] <= t - width:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


def _last_clause(e: Exception) -> str:
    """`sandbox exited with 2: sandbox: bad fault plan F: fault plan: unknown field X` → `fault plan: unknown …`."""
    parts = str(e).splitlines()[0].split(": ")
    return ": ".join(parts[-2:])


def _fmt_rate(x: float | None) -> str:
    if x is None:
        return "n/a"
    return f"{x:,.0f}"


def _fmt_cpu(cpu: dict[str, float]) -> str:
    if not cpu:
        return ""
    keys = ("service", "sandbox", "broker", "harness", "other")
    return " / ".join(f"{cpu.get(k, 0):.0f}" for k in keys) + f" (box {cpu.get('box', 0):.0f})"


def _rel(path: Path) -> str:
    try:
        return str(path.relative_to(procs.ROOT))
    except ValueError:
        return str(path)


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def _tail(path: Path, n: int = 3) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return " | ".join(lines[-n:])


def render(bench: Bench, elapsed: float) -> str:
    a = bench.args
    out = [
        f"# audience-sync benchmark ({time.strftime('%Y-%m-%d %H:%M:%S')}, {elapsed:.0f} s)",
        "",
        f"Machine: {os.cpu_count()} cores (`nproc`), Python {platform.python_version()}, tansu in memory, "
        f"everything on 127.0.0.1. N = {a.events:,} events per throughput row.",
        "Service config: the defaults (service/config.py), plus for the harness only "
        + ", ".join(f"{k}={v}" for k, v in SERVICE_CONFIG.items())
        + f"; the latency row BATCH_LINGER_MS={LATENCY_LINGER_MS}, "
        + ", ".join(f"{k}={v}" for k, v in LATENCY_CONFIG.items())
        + f"; the budget row TIKTOK_MAX_QPS={BUDGET_QPS}. The quix row is bench/quix_baseline.py (quixstreams "
        f"{quix_baseline.QUIX_VERSION}, its own virtualenv); its CPU % sits in the svc column.",
        "",
        "| row | figure | baseline (same run) | ratio | target | result "
        "| CPU % svc / sandbox / broker / harness / other |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in bench.rows:
        out.append(f"| {r.name} | {r.figure} | {r.baseline} | {r.ratio} | {r.target} | {r.result} | {r.cpu} |")
    out += [
        "",
        "CPU % is of one core over the row's drain window (100 = one core busy; the box has "
        f"{os.cpu_count()} cores = {100 * (os.cpu_count() or 1)}). Broker, sandbox and service share the same "
        "cores, so an end-to-end figure is bounded by the box, not only the service: when svc+sandbox+broker "
        "approaches the box total, the cores are the limit.",
    ]
    if a.events < 200_000:
        out += ["", f"N = {a.events:,} is a smoke run: startup and the last linger tail weigh on every figure."]
    if bench.superseded:
        share = ", ".join(f"{k} {v:.1%}" for k, v in bench.superseded.items())
        bench.notes.append(f"share of events superseded in the buffers (not uploaded): {share}")
    if bench.notes:
        out += ["", "Notes:", *[f"- {n}" for n in bench.notes]]
    for kind, pr in bench.profiles.items():
        out += ["", f"## CPU profile, e2e {kind}: top frames ({pr['samples']} samples, idle excluded)", ""]
        out += ["Self time by function:"]
        out += [f"  {pct:5.1f}%  {name}" for name, pct in pr["self_by_function"]]
        out += ["", "Inclusive time, service/ functions:"]
        out += [f"  {pct:5.1f}%  {name}" for name, pct in pr["inclusive_service"]]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="small N for a smoke run (memory: 200,000 events)")
    p.add_argument("--only", help=f"comma-separated rows: {', '.join(ALL_ROWS)} (e2e = all five end-to-end rows)")
    p.add_argument("--events", type=int, help="records per throughput row (default 500,000; --quick 50,000)")
    p.add_argument("--memory-events", type=int, help="backlog of the memory row (default 1,000,000; --quick 200,000)")
    p.add_argument("--latency-seconds", type=float, help="measured seconds of paced traffic (default 20; --quick 8)")
    p.add_argument("--row-timeout", type=float, help="drain timeout per throughput row in seconds (default 120)")
    p.add_argument(
        "--phone-seconds", type=float, help="wall seconds per phone normalisation option (default 2; --quick 1)"
    )
    p.add_argument(
        "--budget",
        type=float,
        default=900.0,
        help="whole-run budget in seconds (default 900: the rows run at the service's defaults, plus quix, floor "
        "and budget)",
    )
    p.add_argument(
        "--compare-ref",
        metavar="REF",
        help="also run this tree against git commit REF, interleaved (artifacts/bench/compare.md); without --only, "
        "only the comparison runs",
    )
    p.add_argument(
        "--compare-rows",
        help=f"rows compared with --compare-ref: {', '.join(compare.ROWS)} (default {','.join(compare.DEFAULT_ROWS)})",
    )
    p.add_argument("--compare-repeats", type=int, default=2, help="drains per side and row, interleaved (default 2)")
    p.add_argument("--compare-memory", action="store_true", help="compare the memory row too (peak RSS)")
    args = p.parse_args(argv)
    args.events = args.events or (50_000 if args.quick else 500_000)
    args.memory_events = args.memory_events or (200_000 if args.quick else 1_000_000)
    args.latency_seconds = args.latency_seconds or (8.0 if args.quick else 20.0)
    args.row_timeout = args.row_timeout or (60.0 if args.quick else 120.0)
    args.phone_seconds = args.phone_seconds or (1.0 if args.quick else 2.0)
    selected = list(ALL_ROWS)
    if args.only:
        selected = []
        for name in (x.strip() for x in args.only.split(",")):
            if name == "e2e":
                selected += list(E2E_ROWS)
            elif name in ALL_ROWS:
                selected.append(name)
            elif name == "ceiling":
                selected.append("email")
            else:
                p.error(f"unknown row {name!r}; one of {', '.join(ALL_ROWS)}, e2e")
    if not args.compare_ref and (args.compare_memory or args.compare_rows):
        p.error("--compare-rows/--compare-memory need --compare-ref")
    rows = [x.strip() for x in (args.compare_rows or ",".join(compare.DEFAULT_ROWS)).split(",") if x.strip()]
    rows += ["memory"] if args.compare_memory and "memory" not in rows else []
    if any(r not in compare.ROWS for r in rows):
        p.error(f"--compare-rows: one of {', '.join(compare.ROWS)}")
    args.compare_rows = rows
    if args.compare_repeats < 1:
        p.error("--compare-repeats must be at least 1")
    if args.compare_ref and not args.only:
        selected = []

    bench = Bench(args)
    old = {s: signal.signal(s, _on_signal) for s in (signal.SIGTERM, signal.SIGHUP)}
    start = time.monotonic()
    rc = 1
    try:
        rc = bench.run(selected)
    except (KeyboardInterrupt, Interrupted) as e:
        bench.notes.append(f"interrupted: {e!r}")
    finally:
        bench.children.kill_all()
        if bench.broker is not None:
            bench.broker.stop()
        for s, h in old.items():
            signal.signal(s, h)
    elapsed = time.monotonic() - start
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    if bench.comparison is not None:
        print(compare.write(bench, bench.comparison, ARTIFACTS))
        print(f"(comparison written to {ARTIFACTS / 'compare.md'} and compare.json)", file=sys.stderr)
    if not selected:
        return rc
    text = render(bench, elapsed)
    (ARTIFACTS / "results.md").write_text(text)
    (ARTIFACTS / "results.json").write_text(
        json.dumps(
            {
                "started": bench.run_id,
                "elapsed_s": elapsed,
                "args": vars(args),
                "nproc": os.cpu_count(),
                "service_config": SERVICE_CONFIG,
                "latency_config": LATENCY_CONFIG,
                "targets": TARGETS,
                "rows": [r.__dict__ for r in bench.rows],
                "notes": bench.notes,
                "profiles": bench.profiles,
                "phone_options": bench.phone_options,
            },
            indent=2,
            default=str,
        )
    )
    print(text)
    print(f"(written to {ARTIFACTS / 'results.md'} and results.json; logs in {bench.logs})", file=sys.stderr)
    return rc
