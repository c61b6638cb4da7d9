"""`audience-sync dlq inspect` on the real broker: counts are right, nothing is committed, nothing personal is
printed. Also holds the helpers the replay and operator-story tests share (dead letters built the way the
pipeline builds them)."""

from __future__ import annotations

import random
import re
import time
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from confluent_kafka import Producer

from service.commands import dlq_inspect
from service.core.dead_letters import DeadLetter, dead_letter_headers
from service.core.model import DlqReason
from service.core.types import RecordRef
from service.devtools.broker import LocalBroker
from service.devtools.sample import ADVERTISER_ID, SampleAudience, SampleUser, make_users, segment_event
from tests.conftest import Topics, committed

pytestmark = pytest.mark.integration

UNMAPPED = SampleAudience("spring_sale_unmapped", "1100000042")
MAPPED = SampleAudience("high_value_customers", "1100000001")
EMAIL_RE = re.compile(r"[\w.+-]+@[\w-]+\.[\w.]+")


def operator_env(monkeypatch: pytest.MonkeyPatch, broker: LocalBroker, topics: Topics, **extra: str) -> None:
    """The environment an operator's shell would have, for commands run in-process through `main(argv)`."""
    import os

    for name in list(os.environ):
        if name.startswith(("KAFKA_", "TIKTOK_", "DLQ_", "SOURCE_", "MAPPINGS_", "CONSUMER_", "DEFAULT_ADV")):
            monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", broker.bootstrap)
    monkeypatch.setenv("SOURCE_TOPIC", topics.source)
    monkeypatch.setenv("DLQ_TOPIC", topics.dlq)
    monkeypatch.setenv("CONSUMER_GROUP", topics.group)
    monkeypatch.setenv("KAFKA_SESSION_TIMEOUT_MS", "6000")
    monkeypatch.setenv("KAFKA_AUTO_COMMIT_INTERVAL_MS", "500")
    for k, v in extra.items():
        monkeypatch.setenv(k, v)


def letter(
    topics: Topics,
    value: bytes,
    *,
    reason: DlqReason,
    key: bytes,
    partition: int = 0,
    offset: int = 0,
    failed_at: datetime | None = None,
    error: str | None = None,
    original: list[tuple[str, bytes | None]] | None = None,
    replay_count: int | None = None,
) -> dict[str, Any]:
    """One dead letter as the pipeline writes it (kwargs for `Producer.produce`)."""
    headers = list(original or [])
    if replay_count is not None:
        headers.append(("replay.count", str(replay_count).encode()))
    hdrs = dead_letter_headers(
        headers,
        RecordRef(topics.source, partition, offset),
        DeadLetter(reason, error or f"{reason.value}: test letter"),
        failed_at or datetime.now(UTC) - timedelta(minutes=5),
    )
    return {"key": key, "value": value, "headers": hdrs}


def event_value(user: SampleUser, audience: SampleAudience, entered: bool = True, *, with_ids: bool = False) -> bytes:
    return orjson.dumps(segment_event(user, audience, entered, with_ids=with_ids))


def produce_letters(broker: LocalBroker, topic: str, letters: Iterable[dict[str, Any]], **kw: Any) -> None:
    p = Producer({"bootstrap.servers": broker.bootstrap, "enable.idempotence": True, "linger.ms": 20})
    for rec in letters:
        p.produce(topic, **rec, **kw)
    assert p.flush(30) == 0


def run_inspect(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    capsys.readouterr()
    rc = dlq_inspect.main(["inspect", *args])
    return rc, capsys.readouterr().out


H1 = datetime(2024, 5, 1, 9, 15, tzinfo=UTC)
H2 = datetime(2024, 5, 1, 11, 40, tzinfo=UTC)


@pytest.fixture
def mixed_letters(broker: LocalBroker, topics: Topics) -> list[SampleUser]:
    """5 unmapped-audience letters at 09h, 3 undecodable at 11h, 2 TikTok rejections (advertiser in the event)."""
    users = make_users(10, random.Random(7))
    recs = [
        letter(topics, event_value(u, UNMAPPED), reason=DlqReason.MISSING_AUDIENCE_ID, key=u.user_id.encode(),
               offset=i, failed_at=H1 + timedelta(minutes=i))
        for i, u in enumerate(users[:5])
    ]  # fmt: skip
    recs += [
        letter(topics, b"{not json " + bytes([i]), reason=DlqReason.INVALID_PAYLOAD, key=b"bad-%d" % i,
               offset=10 + i, failed_at=H2)
        for i in range(3)
    ]  # fmt: skip
    recs += [
        letter(topics, event_value(u, MAPPED, with_ids=True), reason=DlqReason.TIKTOK_REJECTED,
               key=u.user_id.encode(), offset=20 + i, failed_at=H2,
               error=f"TikTok refused this row (HTTP 200, code 40002: contact {u.email} or +14155550100)")
        for i, u in enumerate(users[5:7])
    ]  # fmt: skip
    produce_letters(broker, topics.dlq, recs)
    return users


def test_inspect_counts_by_reason_audience_advertiser_hour_and_commits_nothing(
    broker: LocalBroker,
    topics: Topics,
    mixed_letters: list[SampleUser],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    operator_env(monkeypatch, broker, topics)
    t0 = time.monotonic()
    rc, out = run_inspect(capsys, "--json", "--idle-timeout", "20")
    elapsed = time.monotonic() - t0
    assert rc == 0
    doc = orjson.loads(out)
    assert doc["topic"] == topics.dlq
    assert doc["total"] == 10
    assert doc["by_reason"] == {"missing_audience_id": 5, "invalid_payload": 3, "tiktok_rejected": 2}
    assert doc["by_audience_key"] == {UNMAPPED.key: 5, "unknown": 3, MAPPED.key: 2}
    # No advertiser in the unmapped events and no mapping yet: unknown, never guessed.
    assert doc["by_advertiser"] == {"unknown": 8, ADVERTISER_ID: 2}
    assert doc["by_hour"] == {"2024-05-01T09:00Z": 5, "2024-05-01T11:00Z": 5}
    assert doc["by_source_topic"] == {topics.source: 10}
    assert {s["reason"] for s in doc["samples"]} == {"missing_audience_id", "invalid_payload", "tiktok_rejected"}
    # The end comes from the fetch high watermark (EOF), not from the 20 s idle fallback.
    assert elapsed < 15, f"inspect took {elapsed:.1f}s: end-of-topic detection fell back to the idle timeout"

    rc2, out2 = run_inspect(capsys, "--json")
    assert rc2 == 0 and orjson.loads(out2)["by_reason"] == doc["by_reason"], "a second run sees the same letters"
    for group in (topics.group, f"{topics.group}.replay"):
        assert all(off < 0 for off in committed(broker, group, topics.dlq, 1).values()), f"{group} committed"


def test_inspect_text_output_has_counts_but_no_personal_data(
    broker: LocalBroker,
    topics: Topics,
    mixed_letters: list[SampleUser],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    operator_env(monkeypatch, broker, topics)
    rc, out = run_inspect(capsys)
    assert rc == 0
    assert f"{topics.dlq}: 10 record(s)" in out
    assert UNMAPPED.key in out and "missing_audience_id" in out and "2024-05-01T09:00Z" in out
    assert not EMAIL_RE.search(out), "no email address in the output"
    assert "4155550100" not in out, "no phone number in the output"
    for u in mixed_letters:
        assert u.user_id not in out, "no keys in the output"
        if u.phone:
            assert u.phone not in out


def test_inspect_reason_filter_and_max_records(
    broker: LocalBroker,
    topics: Topics,
    mixed_letters: list[SampleUser],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    operator_env(monkeypatch, broker, topics)
    rc, out = run_inspect(capsys, "--json", "--reason", "invalid_payload", "--reason", "tiktok_rejected")
    assert rc == 0
    doc = orjson.loads(out)
    assert doc["total"] == 5 and doc["read"] == 10
    rc, out = run_inspect(capsys, "--json", "--max-records", "4")
    assert rc == 0
    doc = orjson.loads(out)
    assert doc["total"] == 4 and doc["by_reason"] == {"missing_audience_id": 4}


def test_inspect_empty_topic_and_clear_errors(
    broker: LocalBroker, topics: Topics, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    operator_env(monkeypatch, broker, topics)
    rc, out = run_inspect(capsys, "--json")
    assert rc == 0 and orjson.loads(out)["total"] == 0

    capsys.readouterr()
    assert dlq_inspect.main(["inspect", "--topic", "no-such-topic-here"]) == 2
    err = capsys.readouterr().err
    assert "no-such-topic-here" in err and len(err.strip().splitlines()) == 1

    monkeypatch.delenv("KAFKA_BOOTSTRAP_SERVERS")
    assert dlq_inspect.main(["inspect"]) == 2
    err = capsys.readouterr().err
    assert "KAFKA_BOOTSTRAP_SERVERS" in err and len(err.strip().splitlines()) == 1


def test_inspect_counts_offline_conversion_letters_without_personal_data(
    broker: LocalBroker,
    topics: Topics,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Offline-event letters (issue 12) are counted by their reasons and advertiser, never printing a match key."""
    from service.devtools.sample import offline_event

    rng = random.Random(3)
    users = [u for u in make_users(40, random.Random(5)) if u.email][:4]
    reasons = [DlqReason.MISSING_EVENT_SET_ID, DlqReason.MISSING_EVENT_SET_ID, DlqReason.EVENT_TOO_OLD]
    recs = [
        letter(topics, offline_event(u, rng, i), reason=reason, key=u.user_id.encode(), offset=i, failed_at=H1)
        for i, (u, reason) in enumerate(zip(users, reasons, strict=False))
    ]
    recs.append(letter(topics, b'{"offline_event": true, "event": "Nope"}', reason=DlqReason.INVALID_EVENT,
                       key=b"bad", offset=9, failed_at=H2))  # fmt: skip
    produce_letters(broker, topics.dlq, recs)
    operator_env(monkeypatch, broker, topics)
    rc, out = run_inspect(capsys, "--json", "--idle-timeout", "20")
    assert rc == 0
    doc = orjson.loads(out)
    assert doc["total"] == 4
    assert doc["by_reason"] == {"missing_event_set_id": 2, "event_too_old": 1, "invalid_event": 1}
    assert doc["by_hour"] == {"2024-05-01T09:00Z": 3, "2024-05-01T11:00Z": 1}
    assert doc["by_advertiser"] == {ADVERTISER_ID: 3, "unknown": 1}, "the advertiser an offline event names"
    assert doc["by_audience_key"] == {"unknown": 4}, "offline events have no audience key"
    rc, text = run_inspect(capsys)
    assert rc == 0 and "missing_event_set_id" in text
    for u in users:
        for raw in (u.email, u.phone, u.user_id):
            if raw:
                assert raw not in out and raw not in text, "no match key in the output"
    assert "203.0.113.7" not in out + text, "no IP address in the output"
