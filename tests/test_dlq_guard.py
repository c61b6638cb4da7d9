import random
import time
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest

from service.broker import LocalBroker
from service.dlq_guard import DlqGuard
from service.model import DlqReason
from service.sample import ADVERTISER_ID, SampleAudience, make_users, segment_event
from service.sandbox import SandboxThread

from .conftest import ServiceProcess, Topics, produce, read_all, wait_until

MISSING = DlqReason.MISSING_AUDIENCE_ID


class Clock:
    t = 0.0

    def __call__(self) -> float:
        return self.t


def test_trips_after_n_consecutive_failures_of_one_reason() -> None:
    g = DlqGuard(3, 60, Clock())
    assert not g.failed(MISSING)
    assert not g.failed(MISSING)
    assert g.failed(MISSING)
    assert g.tripped_reason is MISSING


def test_a_success_breaks_the_run() -> None:
    g = DlqGuard(3, 60, Clock())
    g.failed(MISSING)
    g.failed(MISSING)
    g.ok()
    assert not g.failed(MISSING)
    assert not g.tripped


def test_runs_are_per_reason() -> None:
    g = DlqGuard(3, 60, Clock())
    for _ in range(2):
        g.failed(MISSING)
        g.failed(DlqReason.INVALID_PAYLOAD)
    assert not g.tripped
    assert g.failed(DlqReason.INVALID_PAYLOAD)


def test_zero_disables() -> None:
    g = DlqGuard(0, 60, Clock())
    assert not any(g.failed(MISSING) for _ in range(10_000))


def test_cooldown_and_reset() -> None:
    clock = Clock()
    g = DlqGuard(1, 60, clock)
    g.failed(MISSING)
    clock.t = 45
    assert g.cooldown_left() == 15
    g.reset()
    assert not g.tripped and g.cooldown_left() == 0


@pytest.mark.integration
def test_a_broken_mapping_trips_the_guard_and_a_fix_resumes_without_flooding_the_dlq(
    broker: LocalBroker,
    topics: Topics,
    service_env: Callable[..., dict[str, str]],
    services: Callable[[dict[str, str]], ServiceProcess],
    tmp_path: Path,
) -> None:
    path = tmp_path / "mappings.yaml"
    path.write_text("audiences: {}\n")
    vip = SampleAudience("vip", "1100000009")
    users = make_users(100, random.Random(2), "email")
    records = [(u.user_id.encode(), orjson.dumps(segment_event(u, vip, True, with_ids=False))) for u in users]
    with SandboxThread(
        host="127.0.0.1", port=0, advertisers=[ADVERTISER_ID], audiences=[(ADVERTISER_ID, "1100000009")]
    ) as sb:
        env = service_env(sb.url, MAPPINGS_FILE=str(path), DLQ_GUARD_MAX_CONSECUTIVE="20")
        svc = services(env)
        produce(broker, topics.source, records)
        wait_until(lambda: svc.metric("audience_sync_dlq_guard_tripped") == 1, 30, "guard to trip")
        wait_until(lambda: svc.metric("audience_sync_paused_partitions") > 0, 10, "consumption paused")
        time.sleep(1)
        assert svc.metric("audience_sync_events_dead_lettered_total") == 19, "only the run before the trip"
        path.write_text('audiences:\n  vip:\n    advertiser_id: "7000000000000000001"\n    audience_id: "1100000009"\n')
        wait_until(lambda: svc.metric("audience_sync_dlq_guard_tripped") == 0, 15, "guard released by the fix")
        wait_until(lambda: len(sb.state.members("1100000009").get("EMAIL_SHA256", [])) == 81, 30, "held records synced")
        assert len(read_all(broker, topics.dlq, 19)) == 19
        assert "DLQ guard tripped" in svc.log()
        assert svc.stop() == 0
