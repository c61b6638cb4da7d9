"""`make run`: the whole thing on this machine: tansu broker, TikTok sandbox, the service, sample traffic.

Prints where to look and, every few seconds, how counts move: events consumed and uploaded, dead letters,
and audience sizes as the sandbox sees them. Ctrl-C stops everything cleanly.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import orjson

from service.devtools.broker import LocalBroker, free_port
from service.devtools.sample import ADVERTISER_ID, DEFAULT_AUDIENCES


def _metric_sum(text: str, name: str, having: str = "") -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            head, _, value = line.rpartition(" ")
            if (head == name or head.startswith(name + "{")) and having in head:
                total += float(value)
    return total


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=2) as resp:
        body: bytes = resp.read()
        return body


DEMO_EVENT_SET = "7100000000000000001"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="audience-sync demo", description=__doc__)
    p.add_argument("--rate", type=float, default=200.0, help="sample events per second (default 200)")
    p.add_argument("--count", type=int, default=1_000_000, help="sample events in total")
    p.add_argument("--users", type=int, default=5000)
    p.add_argument("--duration", type=float, default=0, help="stop after N seconds (0 = until Ctrl-C)")
    p.add_argument("--http-port", type=int, default=8080)
    p.add_argument("--offline", type=float, default=0.1, help="share of offline conversions (default 0.1; 0 = none)")
    args = p.parse_args(argv)

    from service.devtools.sandbox.server import SandboxThread

    workdir = Path(tempfile.mkdtemp(prefix="audience-sync-demo-"))
    procs: list[subprocess.Popen[bytes]] = []
    stopping = False

    def on_signal(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    topic = "audience-membership"
    with LocalBroker(log_path=workdir / "broker.log") as broker:
        broker.create_topics({topic: 6, f"{topic}.dlq": 1})
        audiences = [(a.advertiser_id, a.audience_id) for a in DEFAULT_AUDIENCES]
        with SandboxThread(
            host="127.0.0.1", port=free_port(), advertisers=[ADVERTISER_ID], audiences=audiences
        ) as sandbox:
            # Offline conversions need an event set (docs/design.md "Mappings file"); audiences come from the events.
            mappings = workdir / "mappings.yaml"
            mappings.write_text(f'audiences: {{}}\noffline_events:\n  default_event_set_id: "{DEMO_EVENT_SET}"\n')
            env = dict(os.environ)
            env.update(
                MAPPINGS_FILE=str(mappings),
                KAFKA_BOOTSTRAP_SERVERS=broker.bootstrap,
                SOURCE_TOPIC=topic,
                TIKTOK_API_URL=sandbox.url,
                TIKTOK_ACCESS_TOKEN="sandbox-token",
                HTTP_HOST="127.0.0.1",
                HTTP_PORT=str(args.http_port),
                KAFKA_SESSION_TIMEOUT_MS="6000",
                KAFKA_FETCH_WAIT_MAX_MS="100",  # tansu holds idle fetches to the deadline (README Benchmark)
                BATCH_LINGER_MS="500",
            )
            service_log = open(workdir / "service.log", "ab")  # noqa: SIM115
            procs.append(subprocess.Popen([sys.executable, "-m", "service", "run"], env=env, stderr=service_log))
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "service",
                        "produce-sample",
                        "--rate",
                        str(args.rate),
                        "--count",
                        str(args.count),
                        "--users",
                        str(args.users),
                        "--offline",
                        str(args.offline),
                    ],
                    env=env,
                    stderr=subprocess.DEVNULL,
                )
            )
            metrics_url = f"http://127.0.0.1:{args.http_port}/metrics"
            print(
                f"broker   {broker.bootstrap} (tansu, in memory)\n"
                f"sandbox  {sandbox.url}  (state: {sandbox.base_url}/_sandbox/state)\n"
                f"metrics  {metrics_url}   health: http://127.0.0.1:{args.http_port}/readyz\n"
                f"logs     {workdir}\n"
                f"traffic  {args.rate:.0f} events/s over {args.users} users, {args.offline:.0%} of them offline "
                "conversions; Ctrl-C stops\n",
                flush=True,
            )
            start = time.monotonic()
            last_up = 0.0
            while not stopping and (args.duration <= 0 or time.monotonic() - start < args.duration):
                time.sleep(3)
                if procs[0].poll() is not None:
                    print(f"the service exited ({procs[0].returncode}); see {workdir}/service.log")
                    break
                try:
                    text = _get(metrics_url).decode()
                    state = orjson.loads(_get(f"{sandbox.base_url}/_sandbox/state"))
                except OSError:
                    print("waiting for the service to come up...", flush=True)
                    continue
                consumed = _metric_sum(text, "audience_sync_events_consumed_total")
                uploaded = _metric_sum(text, "audience_sync_events_uploaded_total")
                dead = _metric_sum(text, "audience_sync_events_dead_lettered_total")
                conversions = _metric_sum(text, "audience_sync_offline_events_total", 'outcome="sent"')
                rate = (uploaded - last_up) / 3
                last_up = uploaded
                sizes = ", ".join(
                    f"{aid}: {sum(a.get('members', {}).values())}" for aid, a in sorted(state["audiences"].items())
                )
                print(
                    f"[{time.monotonic() - start:6.0f}s] consumed {consumed:.0f}  uploaded {uploaded:.0f} "
                    f"({rate:.0f}/s)  dead-lettered {dead:.0f}  conversions sent {conversions:.0f}  "
                    f"audience ids hashed in TikTok: {sizes}",
                    flush=True,
                )
            print("stopping...", flush=True)
            for proc in reversed(procs):
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            for proc in procs:
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
            service_log.close()
    print("stopped cleanly")
    return 0
