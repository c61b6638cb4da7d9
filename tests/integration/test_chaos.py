"""Chaos: a stream of membership events, 10 % retryable TikTok faults, and `kill -9` of the service at seeded
random moments, restarted each time. At the end TikTok holds exactly the last-action-wins state, nothing is
dead-lettered (every fault was retryable), and every offset is committed.

Seed with CHAOS_SEED (default fixed); size with CHAOS_EVENTS. `pytest -s` prints the figures.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from confluent_kafka import Producer

from service.core.dead_letters import header_value
from service.core.model import DlqReason
from service.devtools.broker import LocalBroker, free_port
from service.devtools.sample import ADVERTISER_ID, DEFAULT_AUDIENCES, SampleEvent, expected_membership, generate
from service.devtools.sandbox import SandboxThread
from tests.conftest import ServiceProcess, Topics, committed, wait_until
from tests.integration.helpers_failures import MAPPING, membership, plan, read_topic, reasons

pytestmark = pytest.mark.integration

SEED = int(os.environ.get("CHAOS_SEED", "20241121"))
EVENTS = int(os.environ.get("CHAOS_EVENTS", "30000"))
KILLS = 4
PRODUCE_S = 50.0  # the stream is spread over this long
FAULT_RATE = 0.10
FAULT_MIX = (
    {"kind": "code", "code": 40100},
    {"kind": "code", "code": 50000},
    {"kind": "http", "status": 503},
    {"kind": "reset"},
)
DEADLINE_S = 170.0


def fault_rules(rate: float) -> list[dict[str, Any]]:
    """Equal shares of `rate` for each kind; the plan takes the first rule that fires, so odds are conditional."""
    rules, left = [], 1.0
    share = rate / len(FAULT_MIX)
    for rule in FAULT_MIX:
        rules.append({**rule, "probability": share / left})
        left -= share
    return rules


def stream(broker: LocalBroker, topic: str, events: list[SampleEvent], seconds: float, done: threading.Event) -> None:
    p = Producer({"bootstrap.servers": broker.bootstrap, "enable.idempotence": True, "linger.ms": 20})
    chunks = 60
    size = -(-len(events) // chunks)
    start = time.monotonic()
    try:
        for i in range(chunks):
            for e in events[i * size : (i + 1) * size]:
                while True:
                    try:
                        p.produce(topic, key=e.key, value=e.value)
                        break
                    except BufferError:
                        p.poll(0.05)
            p.poll(0)
            ahead = start + seconds * (i + 1) / chunks - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
        assert p.flush(30) == 0
    finally:
        done.set()


def test_chaos_kill9_and_faults_end_in_last_action_wins_state(
    broker: LocalBroker,
    topics: Topics,
    service_env: Callable[..., dict[str, str]],
    services: Callable[[dict[str, str]], ServiceProcess],
) -> None:
    t0 = time.monotonic()
    rng = random.Random(SEED)
    events = list(generate(EVENTS, seed=SEED, users=4000))
    expected = expected_membership(events)
    # Kill moments: seeded, a random 0.5-4 s after each incarnation got its partitions, so it dies mid-work.
    kill_after = [rng.uniform(0.5, 4.0) for _ in range(KILLS)]

    audiences = [(a.advertiser_id, a.audience_id) for a in DEFAULT_AUDIENCES]
    with SandboxThread(host="127.0.0.1", port=0, advertisers=[ADVERTISER_ID], audiences=audiences) as sb:
        sb.set_faults(plan(*fault_rules(FAULT_RATE), seed=SEED))
        extra = {"BATCH_MAX_ROWS": "500", "RETRY_BASE_S": "0.1", "RETRY_MAX_S": "2", "BATCH_LINGER_MS": "200"}
        svc = services(service_env(sb.url, **extra))
        done = threading.Event()
        producer = threading.Thread(
            target=stream, args=(broker, topics.source, events, PRODUCE_S, done), name="chaos-producer", daemon=True
        )
        start = time.monotonic()
        producer.start()
        retries_seen = 0.0
        uploads_before_kill: list[float] = []
        kill_at: list[float] = []
        for delay in kill_after:
            wait_until(lambda svc=svc: svc.http_status("/readyz") == 200, 40, "incarnation assigned")
            time.sleep(delay)
            kill_at.append(time.monotonic() - start)
            retries_seen += max(0.0, svc.metric("audience_sync_upload_retries_total"))
            uploads_before_kill.append(svc.metric("audience_sync_events_uploaded_total"))
            svc.kill9()
            svc = services(service_env(sb.url, **extra, HTTP_PORT=str(free_port())))
        producer.join(PRODUCE_S + 60)
        assert done.is_set() and not producer.is_alive(), "producer finished"

        wait_until(lambda: svc.http_status("/readyz") == 200, 40, "the last incarnation assigned")
        left = DEADLINE_S - (time.monotonic() - t0)
        try:
            wait_until(
                lambda: membership(sb, DEFAULT_AUDIENCES) == expected,
                max(10.0, left - 25),
                "last-action-wins membership",
            )
            diff = ""
        except AssertionError:
            got = membership(sb, DEFAULT_AUDIENCES)
            diff = "; ".join(
                f"{aud}/{t}: missing {len(want - have)}, extra {len(have - want)}"
                for aud in sorted(set(expected) | set(got))
                for t in sorted(set(expected.get(aud, {})) | set(got.get(aud, {})))
                for want, have in [(expected.get(aud, {}).get(t, set()), got.get(aud, {}).get(t, set()))]
                if want != have
            )
        snapshot = sb.state.snapshot()
        requests = len(sb.state.requests(MAPPING))
        retries_seen += max(0.0, svc.metric("audience_sync_upload_retries_total"))
        code = svc.stop()

    letters = read_topic(broker, topics.dlq, expect=0, idle_s=1.5)
    ends = committed(broker, topics.group, topics.source, topics.partitions)
    duration = time.monotonic() - t0
    print(
        f"\nchaos seed={SEED}: events={len(events)} kills={KILLS} at {[round(k, 1) for k in kill_at]}s "
        f"(uploaded by each victim: {uploads_before_kill}); mapping requests={requests} "
        f"faults injected={snapshot['faults']} rejected codes={snapshot['rejected']}; "
        f"retries seen={retries_seen:.0f}; dead letters={dict(reasons(letters))}; "
        f"committed={sum(max(0, v) for v in ends.values())}; duration={duration:.1f}s"
    )
    assert not diff, f"final membership is not last-action-wins: {diff}"
    assert code == 0, f"exit code {code}; log: {svc.log()}"
    stable = {r.value for r in DlqReason}
    assert all(header_value(m.headers(), "dlq.reason") in stable for m in letters), "each dead letter has a reason"
    assert letters == [], "every fault was retryable: nothing may be dead-lettered"
    assert sum(max(0, v) for v in ends.values()) == len(events), "every offset committed after the final stop"
    assert sum(snapshot["faults"].values()) > 0 and retries_seen > 0
    assert duration < 180
