import random
import time
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest

from service.core.dlq_guard import DlqGuard
from service.core.model import DlqReason
from service.devtools.broker import LocalBroker
from service.devtools.sample import ADVERTISER_ID, SampleAudience, make_users, segment_event
from service.devtools.sandbox import SandboxThread
from tests.conftest import ServiceProcess, Topics, produce, read_all, wait_until

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


def test_share_rule_catches_a_broken_audience_among_healthy_traffic() -> None:
    g = DlqGuard(1000, 60, Clock(), max_ratio=0.5, window=100)
    tripped = False
    for i in range(300):  # 60% of records fail for one reason, interleaved with good ones: never a run of 1000
        if i % 5 < 3:
            tripped = g.failed(MISSING)
        else:
            g.ok()
        if tripped:
            break
    assert tripped and g.tripped_reason is MISSING
    assert i == 100, "trips at the first failure seen with a full window over the share"
    assert g.trip_cause == "60 of the last 100 records"


def test_share_rule_stays_quiet_at_or_below_the_share_and_counts_per_reason() -> None:
    g = DlqGuard(0, 60, Clock(), max_ratio=0.5, window=100)
    for i in range(10_000):
        if i % 2:
            assert not g.failed(MISSING if i % 4 == 1 else DlqReason.NO_IDENTIFIERS)
        else:
            g.ok()
    assert not g.tripped, "half the records failing (two reasons of a quarter each) is not over 0.5 for one reason"


def test_share_rule_forgets_after_reset() -> None:
    g = DlqGuard(0, 60, Clock(), max_ratio=0.2, window=10)
    for _ in range(9):
        g.ok()
    for _ in range(2):
        g.failed(MISSING)
    assert not g.tripped  # 2 of 10
    assert g.failed(MISSING)  # 3 of the last 10
    g.reset()
    assert not g.failed(MISSING), "a fresh window after release"


def test_share_settings_are_validated() -> None:
    with pytest.raises(ValueError):
        DlqGuard(0, 60, Clock(), max_ratio=1.0)
    with pytest.raises(ValueError):
        DlqGuard(0, 60, Clock(), max_ratio=0.5, window=0)


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


@pytest.mark.integration
def test_the_share_rule_trips_on_one_broken_audience_among_healthy_ones(
    broker: LocalBroker,
    topics: Topics,
    service_env: Callable[..., dict[str, str]],
    services: Callable[[dict[str, str]], ServiceProcess],
    tmp_path: Path,
) -> None:
    path = tmp_path / "mappings.yaml"
    path.write_text('audiences:\n  ok:\n    advertiser_id: "7000000000000000001"\n    audience_id: "1100000008"\n')
    good, broken = SampleAudience("ok", "1100000008"), SampleAudience("vip", "1100000009")
    users = make_users(200, random.Random(3), "email")
    # Two of every three records belong to the unmapped audience: about 67% of any window (the run rule is off).
    records = [
        (u.user_id.encode(), orjson.dumps(segment_event(u, broken if i % 3 else good, True, with_ids=False)))
        for i, u in enumerate(users)
    ]
    audiences = [(ADVERTISER_ID, "1100000008"), (ADVERTISER_ID, "1100000009")]
    with SandboxThread(host="127.0.0.1", port=0, advertisers=[ADVERTISER_ID], audiences=audiences) as sb:
        env = service_env(
            sb.url,
            MAPPINGS_FILE=str(path),
            DLQ_GUARD_MAX_CONSECUTIVE="0",
            DLQ_GUARD_MAX_RATIO="0.5",
            DLQ_GUARD_WINDOW="30",
        )
        svc = services(env)
        produce(broker, topics.source, records)
        wait_until(lambda: svc.metric("audience_sync_dlq_guard_tripped") == 1, 30, "guard to trip on the share")
        assert "of the last 30 records dead-lettered as missing_audience_id" in svc.log()
        path.write_text(
            'audiences:\n  ok:\n    advertiser_id: "7000000000000000001"\n    audience_id: "1100000008"\n'
            '  vip:\n    advertiser_id: "7000000000000000001"\n    audience_id: "1100000009"\n'
        )
        wait_until(lambda: svc.metric("audience_sync_dlq_guard_tripped") == 0, 15, "guard released by the fix")
        n_broken = sum(1 for i in range(len(users)) if i % 3)
        dead = svc.metric("audience_sync_events_dead_lettered_total")
        assert 0 < dead < 30, "only letters of the first window, before the trip, reached the DLQ"

        def synced() -> bool:
            vip = len(sb.state.members("1100000009").get("EMAIL_SHA256", []))
            return vip == n_broken - dead and len(sb.state.members("1100000008").get("EMAIL_SHA256", [])) > 0

        wait_until(synced, 30, "held records synced after the fix")
        assert svc.stop() == 0
