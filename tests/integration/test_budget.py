"""TikTok's per-app rate budget, end to end: the service at its defaults against a sandbox that enforces the
Basic tier (10 QPS, 600 QPM on every path, a QPM overrun pausing the app) — tansu, real HTTP, real process."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from service.devtools.sample import expected_membership, generate
from service.devtools.sandbox import SandboxThread
from service.devtools.sandbox.faults import FaultPlan
from tests.conftest import ServiceProcess, Topics, produce, wait_until
from tests.integration.test_pipeline import membership

pytestmark = pytest.mark.integration

BASIC_TIER = {"rate_limit_qps": 10, "rate_limit_qpm": 600, "quota_pause_s": 300, "rate_limit_path": "*"}


def test_a_backlog_at_the_defaults_stays_inside_the_basic_tier_with_big_requests(
    broker: object,
    topics: Topics,
    sandbox: SandboxThread,
    service_env: Callable[..., dict[str, str]],
    services: Callable[[dict[str, str]], ServiceProcess],
) -> None:
    """No TIKTOK_MAX_QPS, BATCH_MAX_ROWS or in-flight tuning: a 40,000-event backlog drains without a single
    40100 (the default leaves room under 10 QPS / 600 QPM), and requests grow past BATCH_MAX_ROWS (1,000)."""
    sandbox.set_faults(BASIC_TIER)
    events = list(generate(40_000, seed=5, users=20_000, identifiers="email"))
    expected = expected_membership(events)
    produce(broker, topics.source, [(e.key, e.value) for e in events])  # type: ignore[arg-type]
    svc = services(service_env(sandbox.url))
    wait_until(lambda: membership(sandbox) == expected, 90, "membership to match last-action-wins")
    plan = sandbox.faults
    assert isinstance(plan, FaultPlan)
    assert plan.refused == {"qps": 0, "qpm": 0, "paused": 0}, "the service overran TikTok's Basic tier"
    rows = [int(r["rows"] or 0) for r in sandbox.state.requests("/segment/mapping/") if r["code"] == 0]
    assert max(rows) > 1000, f"requests never grew past BATCH_MAX_ROWS under the QPS cap: {rows}"
    assert svc.metric("audience_sync_tiktok_answers_total", code="40100") == 0
    assert svc.stop() == 0
