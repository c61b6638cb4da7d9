"""Rebalances and backpressure on the real broker: cooperative-sticky hand-over and bounded buffering."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from service.devtools.broker import LocalBroker
from service.devtools.sample import expected_membership, generate
from service.devtools.sandbox import SandboxThread
from tests.conftest import ServiceProcess, Topics, produce, wait_until
from tests.integration.test_pipeline import mapping_requests, membership

pytestmark = pytest.mark.integration


def test_second_replica_joins_mid_stream_and_partitions_are_handed_over_cleanly(
    broker: LocalBroker,
    topics: Topics,
    sandbox: SandboxThread,
    service_env: Callable[..., dict[str, str]],
    services: Callable[[dict[str, str]], ServiceProcess],
) -> None:
    events = list(generate(8000, seed=31, users=600))
    expected = expected_membership(events)
    env = service_env(sandbox.url, BATCH_MAX_ROWS="100")
    a = services(env)
    wait_until(lambda: a.http_status("/readyz") == 200, 30, "first replica ready")
    produce(broker, topics.source, [(e.key, e.value) for e in events[:4000]])
    wait_until(lambda: mapping_requests(sandbox) >= 3, 30, "uploads under way")
    b = services(service_env(sandbox.url, BATCH_MAX_ROWS="100"))
    wait_until(lambda: a.metric("audience_sync_rebalances_total", event="revoke") >= 1, 30, "a revoke on replica A")
    produce(broker, topics.source, [(e.key, e.value) for e in events[4000:]])
    wait_until(lambda: membership(sandbox) == expected, 90, "exact membership across the hand-over")
    assert b.metric("audience_sync_events_consumed_total") > 0, "the new replica took partitions"
    assert a.stop() == 0
    assert b.stop() == 0


def test_backpressure_pauses_partitions_and_bounds_pending_events(
    broker: LocalBroker,
    topics: Topics,
    sandbox: SandboxThread,
    service_env: Callable[..., dict[str, str]],
    services: Callable[[dict[str, str]], ServiceProcess],
) -> None:
    events = list(generate(3000, seed=41, users=2000))
    expected = expected_membership(events)
    sandbox.set_faults({"rules": [{"kind": "slow", "delay_s": 0.2}]})
    env = service_env(sandbox.url, MAX_PENDING_EVENTS="200", BATCH_MAX_ROWS="50", MAX_INFLIGHT_REQUESTS="1")
    svc = services(env)
    wait_until(lambda: svc.http_status("/readyz") == 200, 30, "service ready")
    produce(broker, topics.source, [(e.key, e.value) for e in events])
    peak = {"pending": 0.0, "paused": 0.0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak["pending"] = max(peak["pending"], svc.metric("audience_sync_pending_events"))
            peak["paused"] = max(peak["paused"], svc.metric("audience_sync_paused_partitions"))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        wait_until(lambda: peak["paused"] > 0, 30, "partitions paused under backpressure")
        sandbox.set_faults({"rules": []})
        wait_until(lambda: membership(sandbox) == expected, 90, "everything synced after the pressure")
    finally:
        done.set()
        sampler.join()
    assert peak["pending"] <= 200 + 200 // 4 + 1, f"pending peaked at {peak['pending']}"
    wait_until(lambda: svc.metric("audience_sync_paused_partitions") == 0, 10, "partitions resumed")
    assert svc.stop() == 0
