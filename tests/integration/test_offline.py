"""Offline conversions end to end on the real broker (tansu) and the sandbox's `/event/track/` (issue 12):
one topic carrying membership AND offline events; a `kill -9` mid-stream; a replay of fixed offline letters."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from service.commands import replay
from service.core.dead_letters import header_value
from service.devtools.broker import LocalBroker
from service.devtools.sample import expected_membership, generate
from service.devtools.sandbox import SandboxThread
from tests.conftest import ServiceProcess, Topics, committed, produce, read_all, wait_until
from tests.integration.test_pipeline import membership

pytestmark = pytest.mark.integration

ADVERTISER = "7000000000000000100"
OTHER_ADVERTISER = "7000000000000000200"  # no event set configured for it
EVENT_SET = "7100000000000000001"


def mappings(tmp_path: Path, *, default: bool = False) -> Path:
    text = f'audiences: {{}}\noffline_events:\n  event_sets:\n    "{ADVERTISER}": "{EVENT_SET}"\n'
    if default:
        text += f'  default_event_set_id: "{EVENT_SET}"\n'
    path = tmp_path / "mappings.yaml"
    path.write_text(text)
    return path


def now_ms() -> int:
    return int(time.time() * 1000)


def canonical(i: int, **over: Any) -> bytes:
    record: dict[str, Any] = {
        "offline_event": True,
        "event": "CompletePayment",
        "event_time": now_ms() - 3_600_000,
        "event_id": f"pos-{i}",
        "advertiser_id": ADVERTISER,
        "channel": "in_store",
        "email": f"shopper{i}@example.com",
        "currency": "USD",
        "value": 20.0 + i,
        "order_id": f"o-{i}",
    }
    record.update(over)
    return orjson.dumps({k: v for k, v in record.items() if v is not None})


def segment_order(i: int) -> bytes:
    return orjson.dumps(
        {
            "type": "track",
            "event": "Order Completed",
            "messageId": f"seg-msg-{i}",
            "userId": f"user-{i}",
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 600)),
            "context": {"traits": {"email": f"buyer{i}@example.com"}, "ip": "203.0.113.7"},
            "properties": {"order_id": f"so-{i}", "revenue": 12.5, "currency": "EUR", "advertiser_id": ADVERTISER},
        }
    )


def received(sandbox: SandboxThread) -> dict[str, Any]:
    return sandbox.state.events(EVENT_SET)


def test_mixed_topic_valid_conversions_once_bad_ones_dead_lettered_audiences_unaffected(
    broker: LocalBroker,
    topics: Topics,
    sandbox: SandboxThread,
    service_env: Callable[..., dict[str, str]],
    services: Callable[[dict[str, str]], ServiceProcess],
    tmp_path: Path,
) -> None:
    audience = list(generate(400, seed=41, users=120))
    records: list[tuple[bytes | None, bytes | None]] = [(e.key, e.value) for e in audience[:200]]
    records += [(f"c{i}".encode(), canonical(i)) for i in range(30)]
    records += [(f"s{i}".encode(), segment_order(i)) for i in range(10)]
    bad = {
        b"bad-name": canonical(900, event="BoughtSomething"),
        b"bad-old": canonical(901, event_time=now_ms() - 40 * 86_400_000),
        b"bad-set": canonical(902, advertiser_id=OTHER_ADVERTISER),
    }
    records += list(bad.items())
    records += [(b"unmapped-seg", orjson.dumps({**orjson.loads(segment_order(99)), "event": "Button Hovered"}))]
    records += [(e.key, e.value) for e in audience[200:]]
    produce(broker, topics.source, records)

    svc = services(service_env(sandbox.url, MAPPINGS_FILE=str(mappings(tmp_path))))
    expected_audiences = expected_membership(audience)
    wait_until(lambda: membership(sandbox) == expected_audiences, 60, "audience membership unaffected")
    wait_until(lambda: received(sandbox)["received"] >= 40, 60, "the 40 valid conversions")
    letters = read_all(broker, topics.dlq, 3)
    reasons = {m.key(): header_value(m.headers(), "dlq.reason") for m in letters}
    assert reasons == {
        b"bad-name": "invalid_event",
        b"bad-old": "event_too_old",
        b"bad-set": "missing_event_set_id",
    }
    wait_until(
        lambda: svc.metric("audience_sync_offline_events_total", event="CompletePayment", outcome="sent") == 40,
        20,
        "40 conversions counted as sent",
    )
    assert svc.metric("audience_sync_events_skipped_total", reason="unmapped_event_name") == 1
    assert svc.metric("audience_sync_offline_match_keys_total", key="email") == 40
    assert svc.stop() == 0
    got = received(sandbox)
    assert got["received"] == 40 and got["duplicates"] == 0
    ids = [str(e["event_id"]) for e in got["events"]]
    assert len(set(ids)) == 40, "each conversion once"
    assert {f"pos-{i}" for i in range(30)} <= set(ids)
    derived = set(ids) - {f"pos-{i}" for i in range(30)}
    assert len(derived) == 10 and all(len(i) == 32 for i in derived), "Segment ones got ids derived from messageId"
    ends = committed(broker, topics.group, topics.source, topics.partitions)
    assert sum(max(0, v) for v in ends.values()) == len(records), "every record finished and committed"


def test_kill_9_mid_stream_then_restart_conversions_are_deduplicated_by_event_id(
    broker: LocalBroker,
    topics: Topics,
    sandbox: SandboxThread,
    service_env: Callable[..., dict[str, str]],
    services: Callable[[dict[str, str]], ServiceProcess],
    tmp_path: Path,
) -> None:
    total = 3000
    env = service_env(
        sandbox.url,
        MAPPINGS_FILE=str(mappings(tmp_path)),
        BATCH_MAX_ROWS="20",
        BATCH_MAX_ROWS_CEILING="20",  # at most 20 events a request, 10 requests a second: about 15 s in all
        BATCH_LINGER_MS="50",
        TIKTOK_EVENTS_MAX_QPS="10",
    )
    svc = services(env)
    wait_until(lambda: svc.http_status("/readyz") == 200, 30, "service ready")
    produce(broker, topics.source, [(f"c{i}".encode(), canonical(i)) for i in range(total)])
    wait_until(lambda: received(sandbox)["received"] >= 200, 30, "uploads under way")
    svc.kill9()
    assert received(sandbox)["received"] < total - 500, "killed mid-stream"
    svc2 = services(env)
    wait_until(lambda: received(sandbox)["received"] == total, 90, "every conversion after kill -9 and restart")

    def all_committed() -> bool:
        ends = committed(broker, topics.group, topics.source, topics.partitions)
        return sum(max(0, v) for v in ends.values()) == total

    wait_until(all_committed, 30, "the restarted service to commit everything")
    assert svc2.stop() == 0
    got = received(sandbox)
    assert got["received"] == total, got["received"]  # re-deliveries were counted as duplicates, not twice
    assert len({str(e["event_id"]) for e in got["events"]}) == total


def test_replay_of_fixed_offline_letters_sends_them(
    broker: LocalBroker,
    topics: Topics,
    sandbox: SandboxThread,
    service_env: Callable[..., dict[str, str]],
    services: Callable[[dict[str, str]], ServiceProcess],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """No event set for OTHER_ADVERTISER: letters `missing_event_set_id`; add a default event set; replay."""
    path = mappings(tmp_path)
    produce(broker, topics.source, [(f"o{i}".encode(), canonical(i, advertiser_id=OTHER_ADVERTISER)) for i in range(8)])
    env = service_env(sandbox.url, MAPPINGS_FILE=str(path))
    svc = services(env)
    letters = read_all(broker, topics.dlq, 8)
    assert {header_value(m.headers(), "dlq.reason") for m in letters} == {"missing_event_set_id"}
    assert svc.stop() == 0
    assert received(sandbox)["received"] == 0

    mappings(tmp_path, default=True)  # the operator's fix
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    capsys.readouterr()
    rc = replay.main(["--json", "--idle-timeout", "5", "--mode", "process"])
    out = capsys.readouterr().out.strip()
    doc = orjson.loads(out) if out else {}
    assert rc == 0, doc
    assert doc["selected"] == 8 and doc["failed"] == 0, doc
    got = received(sandbox)
    assert got["received"] == 8
    assert sorted(str(e["event_id"]) for e in got["events"]) == sorted(f"pos-{i}" for i in range(8))
