"""End to end on the real broker (tansu) and the sandbox over loopback HTTP: events in, TikTok state out."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest

from service.core.dead_letters import header_value
from service.devtools.broker import LocalBroker
from service.devtools.sample import DEFAULT_AUDIENCES, SampleEvent, expected_membership, generate
from service.devtools.sandbox import SandboxThread
from tests.conftest import ServiceProcess, Topics, committed, produce, read_all, wait_until

pytestmark = pytest.mark.integration


def membership(sandbox: SandboxThread) -> dict[str, dict[str, set[str]]]:
    out: dict[str, dict[str, set[str]]] = {}
    for a in DEFAULT_AUDIENCES:
        members = sandbox.state.members(a.audience_id)
        got = {t: set(hs) for t, hs in members.items() if hs}
        if got:
            out[a.audience_id] = got
    return out


def mapping_requests(sandbox: SandboxThread) -> int:
    return len(sandbox.state.requests("/segment/mapping/"))


def send(broker: LocalBroker, topics: Topics, events: list[SampleEvent]) -> None:
    produce(broker, topics.source, [(e.key, e.value) for e in events])


def test_events_in_membership_out_offsets_committed_and_no_reupload_after_restart(
    broker: LocalBroker,
    topics: Topics,
    sandbox: SandboxThread,
    service_env: Callable[..., dict[str, str]],
    services: Callable[[dict[str, str]], ServiceProcess],
) -> None:
    events = list(generate(3000, seed=11, users=400))
    expected = expected_membership(events)
    send(broker, topics, events)
    env = service_env(sandbox.url)
    svc = services(env)
    wait_until(lambda: membership(sandbox) == expected, 60, "sandbox membership to match last-action-wins")
    wait_until(lambda: svc.metric("audience_sync_events_consumed_total") == len(events), 20, "all events counted")

    # The sandbox applies a batch when it receives it; the service counts it when the answer is back. Wait for both.
    def settled() -> float:
        return svc.metric("audience_sync_events_uploaded_total") + svc.metric("audience_sync_events_superseded_total")

    wait_until(lambda: settled() >= len(events), 20, "every event uploaded or superseded")
    assert settled() == len(events)
    assert svc.stop() == 0
    ends = committed(broker, topics.group, topics.source, topics.partitions)
    per_partition: dict[int, int] = {}
    for msg in read_all(broker, topics.source, len(events)):
        per_partition[msg.partition()] = max(per_partition.get(msg.partition(), -1), msg.offset() + 1)
    assert ends == per_partition, "every partition committed to its end"

    before = mapping_requests(sandbox)
    svc2 = services(service_env(sandbox.url))
    wait_until(lambda: svc2.http_status("/readyz") == 200, 30, "restarted service to be ready")
    time.sleep(2)
    assert mapping_requests(sandbox) == before, "a clean restart re-uploads nothing"
    assert svc2.stop() == 0


def test_kill_9_mid_stream_then_restart_loses_nothing(
    broker: LocalBroker,
    topics: Topics,
    sandbox: SandboxThread,
    service_env: Callable[..., dict[str, str]],
    services: Callable[[dict[str, str]], ServiceProcess],
) -> None:
    events = list(generate(6000, seed=23, users=500))
    expected = expected_membership(events)
    env = service_env(sandbox.url, BATCH_MAX_ROWS="50", TIKTOK_MAX_QPS="200")
    svc = services(env)
    wait_until(lambda: svc.http_status("/readyz") == 200, 30, "service ready")
    send(broker, topics, events[:3000])
    wait_until(lambda: mapping_requests(sandbox) >= 5, 30, "uploads under way")
    svc.kill9()
    send(broker, topics, events[3000:])
    svc2 = services(env)
    wait_until(lambda: membership(sandbox) == expected, 90, "membership after kill -9 and restart")
    assert svc2.stop() == 0


def test_bad_and_non_audience_records_land_where_the_contract_says(
    broker: LocalBroker,
    topics: Topics,
    sandbox: SandboxThread,
    service_env: Callable[..., dict[str, str]],
    services: Callable[[dict[str, str]], ServiceProcess],
) -> None:
    good = list(generate(50, seed=5, users=30))
    page = orjson.dumps({"type": "page", "name": "Home", "userId": "u1"})
    no_personas = orjson.dumps({"type": "track", "event": "Order Completed", "userId": "u2", "properties": {}})
    unmapped = orjson.loads(generate(1, seed=9, with_ids=False).__next__().value)
    unmapped["context"]["personas"]["computation_key"] = "vip_unmapped"
    unmapped["properties"] = {"audience_key": "vip_unmapped", "vip_unmapped": True}
    rng = random.Random(3)
    records: list[tuple[bytes | None, bytes | None]] = [(e.key, e.value) for e in good[:25]]
    records += [
        (b"bad-1", bytes(rng.getrandbits(8) for _ in range(40)) + b"\x00"),
        (b"bad-2", b"{not json"),
        (b"bad-3", b"\xff\xfe\xfd"),
        (b"skip-1", page),
        (b"skip-2", no_personas),
        (b"unmapped", orjson.dumps(unmapped)),
    ]
    records += [(e.key, e.value) for e in good[25:]]
    produce(broker, topics.source, records, headers=[("trace", b"keep-me")])
    svc = services(service_env(sandbox.url))
    expected = expected_membership(good)
    wait_until(lambda: membership(sandbox) == expected, 60, "good records synced around the bad ones")
    letters = read_all(broker, topics.dlq, 4)
    by_key = {m.key(): m for m in letters}
    assert sorted(by_key) == [b"bad-1", b"bad-2", b"bad-3", b"unmapped"], "each bad record dead-lettered once"
    assert len(letters) == 4
    for key in (b"bad-1", b"bad-2", b"bad-3"):
        assert header_value(by_key[key].headers(), "dlq.reason") == "invalid_payload"
    letter = by_key[b"unmapped"]
    headers = letter.headers()
    assert header_value(headers, "dlq.reason") == "missing_audience_id"
    error = header_value(headers, "dlq.error") or ""
    assert "vip_unmapped" in error and "external_audience_id" in error
    assert header_value(headers, "dlq.source.topic") == topics.source
    assert header_value(headers, "trace") == "keep-me", "original headers are kept"
    assert letter.value() == orjson.dumps(unmapped), "original value unchanged"
    for name in ("dlq.source.partition", "dlq.source.offset", "dlq.failed_at", "dlq.attempts"):
        assert header_value(headers, name) is not None, name
    wait_until(lambda: svc.metric("audience_sync_events_skipped_total") == 2, 10, "two non-audience events skipped")
    wait_until(
        lambda: svc.metric("audience_sync_events_dead_lettered_total", reason="invalid_payload") == 3,
        10,
        "the service to see its three invalid_payload letters acknowledged",
    )
    assert svc.stop() == 0
    ends = committed(broker, topics.group, topics.source, topics.partitions)
    assert sum(max(0, v) for v in ends.values()) == len(records), "skipped and dead-lettered offsets committed"


def test_an_entry_with_id_types_email_only_sends_only_emails(
    broker: LocalBroker,
    topics: Topics,
    sandbox: SandboxThread,
    service_env: Callable[..., dict[str, str]],
    services: Callable[[dict[str, str]], ServiceProcess],
    tmp_path: Path,
) -> None:
    """Mixed identifiers (email, phone, ad ids) for every audience; the mappings entry of one audience says
    `id_types: [EMAIL_SHA256]`: TikTok ends with only email cells there, every type elsewhere."""
    contract, other = DEFAULT_AUDIENCES[0], DEFAULT_AUDIENCES[1]
    path = tmp_path / "mappings.yaml"
    path.write_text(
        f'audiences:\n  {contract.key}:\n    advertiser_id: "{contract.advertiser_id}"\n'
        f'    audience_id: "{contract.audience_id}"\n    id_types: [EMAIL_SHA256]\n'
    )
    events = list(generate(900, seed=31, users=300))
    expected = expected_membership(events)
    expected[contract.audience_id] = {"EMAIL_SHA256": expected[contract.audience_id]["EMAIL_SHA256"]}
    assert {"PHONE_SHA256", "EMAIL_SHA256"} <= set(expected[other.audience_id]), "the input really is mixed"
    send(broker, topics, events)
    svc = services(service_env(sandbox.url, MAPPINGS_FILE=str(path)))
    wait_until(lambda: membership(sandbox) == expected, 60, "only emails in the email-only audience")
    assert svc.stop() == 0
