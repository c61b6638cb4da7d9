"""`audience-sync replay` on the real broker and the sandbox over loopback: both modes, every filter, dry run,
resume, and the ping-pong guard.

Every letter's original is in the source topic at the position its `dlq.source.*` headers name, as in production:
replay reads from there to check for newer events (tests/commands/test_replay_supersession.py covers that check).
"""

from __future__ import annotations

import random
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from confluent_kafka import Consumer, Producer

from service.commands import replay
from service.core.dead_letters import header_value
from service.core.model import DlqReason
from service.devtools.broker import LocalBroker
from service.devtools.sample import ADVERTISER_ID, SampleUser, make_users
from service.devtools.sandbox import SandboxThread
from service.kafka import dlq_reader
from tests.commands.test_dlq_inspect import MAPPED, UNMAPPED, event_value, letter, operator_env, produce_letters
from tests.conftest import Topics, committed, read_all

pytestmark = pytest.mark.integration


def mappings_file(tmp_path: Path, *audiences: Any) -> Path:
    lines = ["audiences:"]
    for a in audiences:
        lines += [f"  {a.key}:", f'    advertiser_id: "{a.advertiser_id}"', f'    audience_id: "{a.audience_id}"']
    if not audiences:
        lines = ["audiences: {}"]
    path = tmp_path / "mappings.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def run_replay(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, Any]]:
    capsys.readouterr()
    rc = replay.main(["--json", "--idle-timeout", "5", *args])
    out = capsys.readouterr().out.strip()
    return rc, (orjson.loads(out) if out else {})


def produce_originals(broker: LocalBroker, topic: str, records: list[tuple[bytes, bytes, int]]) -> list[int]:
    """Produce (key, value, partition) records to the source topic, as upstream did; the offset of each."""
    p = Producer({"bootstrap.servers": broker.bootstrap, "enable.idempotence": True, "linger.ms": 5})
    offsets: list[int] = [-1] * len(records)
    for i, (key, value, partition) in enumerate(records):

        def done(err: Any, msg: Any, i: int = i) -> None:
            assert err is None, err
            offsets[i] = msg.offset()

        p.produce(topic, key=key, value=value, partition=partition, on_delivery=done)
    assert p.flush(30) == 0
    return offsets


def letters_with_originals(
    broker: LocalBroker, topics: Topics, values: list[tuple[SampleUser, bytes]], partition: int | None = None, **kw: Any
) -> list[dict[str, Any]]:
    """Letters for these users' events, their originals produced first (to `partition`, else spread over the
    source partitions) so that each letter's `dlq.source.*` headers name a real record."""
    parts = [i % topics.partitions if partition is None else partition for i in range(len(values))]
    offsets = produce_originals(
        broker, topics.source, [(u.user_id.encode(), v, p) for (u, v), p in zip(values, parts, strict=True)]
    )
    return [
        letter(topics, v, key=u.user_id.encode(), partition=p, offset=o, **kw)
        for (u, v), p, o in zip(values, parts, offsets, strict=True)
    ]


def unmapped_letters(broker: LocalBroker, topics: Topics, users: list[SampleUser]) -> list[dict[str, Any]]:
    """Letters as the service writes them for an audience key with no mapping, spread over source partitions."""
    out = letters_with_originals(
        broker, topics, [(u, event_value(u, UNMAPPED)) for u in users], reason=DlqReason.MISSING_AUDIENCE_ID
    )
    for i, rec in enumerate(out):
        rec["headers"].insert(0, ("trace", f"t-{i}".encode()))
    return out


def replayed(broker: LocalBroker, topics: Topics, total: int, timeout_s: float = 30.0) -> list[Any]:
    """The records replay republished to the source topic (they carry `replay.count`; the originals do not);
    `total` is how many records the source topic should hold, originals included."""
    everything = read_all(broker, topics.source, total, timeout_s)
    return [m for m in everything if header_value(m.headers(), "replay.count") is not None]


def expected_hashes(users: list[SampleUser]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for u in users:
        for t, h in u.expected_hashes().items():
            out.setdefault(t, set()).add(h)
    return out


def members(sandbox: SandboxThread, audience_id: str) -> dict[str, set[str]]:
    return {t: set(hs) for t, hs in sandbox.state.members(audience_id).items() if hs}


def replay_offsets(broker: LocalBroker, topics: Topics) -> int:
    return committed(broker, f"{topics.group}.replay", topics.dlq, 1)[0]


def test_republish_restores_key_value_timestamp_headers_and_partition_then_commits(
    broker: LocalBroker, topics: Topics, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    operator_env(monkeypatch, broker, topics)
    users = make_users(8, random.Random(1))
    letters = unmapped_letters(broker, topics, users)
    ts = int((datetime.now(UTC) - timedelta(hours=2)).timestamp() * 1000)
    produce_letters(broker, topics.dlq, letters, timestamp=ts)

    rc, doc = run_replay(capsys)
    assert rc == 0, doc
    assert doc["republished"] == doc["selected"] == doc["read"] == 8
    assert doc["failed"] == doc["skipped_filter"] == doc["skipped_max_replays"] == doc["superseded"] == 0
    assert doc["unverifiable"] == 0 and doc["source_records_checked"] == 4, "the originals after each first letter"
    assert doc["to_topics"] == {topics.source: 8}
    out = {m.key(): m for m in replayed(broker, topics, 16)}
    assert len(out) == 8
    for i, (u, sent) in enumerate(zip(users, letters, strict=True)):
        msg = out[u.user_id.encode()]
        assert msg.value() == sent["value"], "value unchanged"
        assert msg.timestamp()[1] == ts, "original timestamp kept"
        assert msg.partition() == i % topics.partitions, "back to the partition it was first read from"
        names = [k for k, _ in msg.headers()]
        assert not [n for n in names if n.startswith(("dlq.", "__connect.errors."))], names
        assert header_value(msg.headers(), "trace") == f"t-{i}", "original headers kept"
        assert header_value(msg.headers(), "replay.count") == "1"
    assert replay_offsets(broker, topics) == 8, "the replay group committed past every handled letter"

    rc, doc = run_replay(capsys)
    assert rc == 0 and doc["read"] == 0 and doc["republished"] == 0, "a second run finds nothing new"
    assert len(replayed(broker, topics, 16)) == 8, "nothing republished twice"


def test_dry_run_says_what_would_happen_and_changes_nothing(
    broker: LocalBroker,
    topics: Topics,
    sandbox: SandboxThread,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = mappings_file(tmp_path, MAPPED)
    operator_env(
        monkeypatch,
        broker,
        topics,
        MAPPINGS_FILE=str(path),
        TIKTOK_API_URL=sandbox.url,
        TIKTOK_ACCESS_TOKEN="sandbox-token",
    )
    users = make_users(6, random.Random(2))
    produce_letters(broker, topics.dlq, unmapped_letters(broker, topics, users))

    rc, doc = run_replay(capsys, "--dry-run")
    assert rc == 0 and doc["dry_run"] is True
    assert doc["republished"] == 6 and doc["to_topics"] == {topics.source: 6}
    assert doc["with_current_mappings"] == {"fail again (missing_audience_id)": 6}, "the mapping is still missing"

    path.write_text(mappings_file(tmp_path, MAPPED, UNMAPPED).read_text())
    for mode in ("republish", "process"):
        rc, doc = run_replay(capsys, "--dry-run", "--mode", mode)
        assert rc == 0 and doc["selected"] == 6
        assert doc["with_current_mappings"] == {"sync": 6}, "with the mapping added they would go through"
    assert len(read_all(broker, topics.source, 6)) == 6, "nothing produced: only the originals are there"
    assert replay_offsets(broker, topics) < 0, "nothing committed"
    assert sandbox.state.requests("/segment/mapping/") == [], "nothing uploaded"
    assert len(read_all(broker, topics.dlq, 6)) == 6, "nothing dead-lettered again"


def test_each_filter_selects_its_letters_and_skipped_ones_are_committed_past(
    broker: LocalBroker, topics: Topics, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    operator_env(monkeypatch, broker, topics)
    users = make_users(12, random.Random(3))
    t9 = datetime(2024, 5, 1, 9, 0, tzinfo=UTC)
    t11 = datetime(2024, 5, 1, 11, 0, tzinfo=UTC)
    values = [event_value(u, UNMAPPED) for u in users[:8]]
    values += [event_value(u, MAPPED, with_ids=True) for u in users[8:10]]
    at = produce_originals(
        broker, topics.source, [(u.user_id.encode(), v, 0) for u, v in zip(users[:10], values, strict=True)]
    )
    recs = [  # offsets 0-3: unmapped audience at 09h, 4-7: unmapped at 11h, 8-9: rejected (MAPPED) at 11h
        letter(topics, values[i], reason=DlqReason.MISSING_AUDIENCE_ID, key=u.user_id.encode(), offset=at[i],
               failed_at=(t9 if i < 4 else t11) + timedelta(minutes=i))
        for i, u in enumerate(users[:8])
    ]  # fmt: skip
    recs += [
        letter(topics, values[i], reason=DlqReason.TIKTOK_REJECTED, key=u.user_id.encode(), offset=at[i],
               failed_at=t11 + timedelta(minutes=30))
        for i, u in enumerate(users[8:10], start=8)
    ]  # fmt: skip
    produce_letters(broker, topics.dlq, recs)

    cases: list[tuple[list[str], int]] = [
        (["--reason", "tiktok_rejected"], 2),
        (["--reason", "tiktok_rejected", "--reason", "missing_audience_id"], 10),
        (["--audience-key", UNMAPPED.key], 8),
        (["--advertiser", ADVERTISER_ID], 2),
        (["--since", "2024-05-01T10:00:00Z"], 6),
        (["--until", "2024-05-01T10:00:00Z"], 4),
        (["--since", "2024-05-01T11:00:00Z", "--until", "2024-05-01T11:10:00"], 4),
        (["--offsets", "0:2-5"], 4),
        (["--offsets", "0:0-0", "--offsets", "0:9-"], 2),
        (["--audience-key", UNMAPPED.key, "--since", "2024-05-01T11:00:00Z", "--offsets", "0:0-5"], 2),
    ]
    for args, want in cases:
        rc, doc = run_replay(capsys, "--dry-run", *args)
        assert rc == 0, args
        assert (doc["selected"], doc["skipped_filter"]) == (want, 10 - want), args

    rc, doc = run_replay(capsys, "--reason", "tiktok_rejected")
    assert rc == 0 and doc["republished"] == 2 and doc["skipped_filter"] == 8
    assert sorted(m.key() for m in replayed(broker, topics, 12)) == sorted(r["key"] for r in recs[8:10])
    assert replay_offsets(broker, topics) == 10, "filtered letters are committed past too"


def test_max_replays_guard_stops_ping_pong(
    broker: LocalBroker, topics: Topics, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    operator_env(monkeypatch, broker, topics)
    users = make_users(3, random.Random(4))
    at = produce_originals(broker, topics.source, [(u.user_id.encode(), event_value(u, UNMAPPED), 0) for u in users])
    recs = [
        letter(topics, event_value(u, UNMAPPED), reason=DlqReason.MISSING_AUDIENCE_ID, key=u.user_id.encode(),
               offset=o, replay_count=n)
        for u, n, o in zip(users, (None, 2, 3), at, strict=True)
    ]  # fmt: skip
    produce_letters(broker, topics.dlq, recs)
    rc, doc = run_replay(capsys, "--dry-run", "--max-replays", "2")
    assert rc == 0 and (doc["selected"], doc["skipped_max_replays"]) == (1, 2)

    rc, doc = run_replay(capsys)
    assert rc == 0 and (doc["republished"], doc["skipped_max_replays"]) == (2, 1)
    counts = {m.key(): header_value(m.headers(), "replay.count") for m in replayed(broker, topics, 5)}
    assert counts == {users[0].user_id.encode(): "1", users[1].user_id.encode(): "3"}
    assert replay_offsets(broker, topics) == 3, "the over-limit letter is reported once, not forever"

    capsys.readouterr()
    assert replay.main(["--idle-timeout", "3", "--dry-run", "--group", "another"]) == 0
    table = capsys.readouterr().out
    assert "skipped for max replays" in table and "would be republished" in table


def test_interrupted_replay_resumes_where_it_stopped(
    broker: LocalBroker, topics: Topics, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    operator_env(monkeypatch, broker, topics)
    users = make_users(10, random.Random(5))
    produce_letters(broker, topics.dlq, unmapped_letters(broker, topics, users))
    rc, doc = run_replay(capsys, "--max-records", "4")
    assert rc == 0 and doc["republished"] == 4, doc
    assert replay_offsets(broker, topics) == 4
    rc, doc = run_replay(capsys, "--max-records", "4")
    assert rc == 0 and doc["republished"] == 4, doc
    rc, doc = run_replay(capsys)
    assert rc == 0 and doc["republished"] == 2 and doc["read"] == 2, doc
    keys = [m.key() for m in replayed(broker, topics, 20)]
    assert sorted(keys) == sorted(u.user_id.encode() for u in users), "each letter republished exactly once"


class _EofWithRecords(Consumer):
    """A consumer that never returns records without an end-of-partition event after them in the same batch: the
    real consumer does that only when the EOF arrives within the same consume() call (timing-dependent)."""

    def consume(self, num_messages: int = 1, timeout: float = -1) -> list[Any]:
        got = list(super().consume(num_messages, timeout))
        deadline = time.monotonic() + 10
        while got and got[-1].error() is None and time.monotonic() < deadline:
            got += super().consume(num_messages, 0.1)
        return got


def test_records_arriving_with_their_end_of_partition_are_replayed(
    broker: LocalBroker, topics: Topics, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Regression: an EOF in the same batch as the records before it marked the partition done, and the check and
    the republisher then skipped those records as if held (republished 0; 1 run in 8 of the test above)."""
    operator_env(monkeypatch, broker, topics)
    monkeypatch.setattr(dlq_reader, "Consumer", _EofWithRecords)
    users = make_users(6, random.Random(10))
    produce_letters(broker, topics.dlq, unmapped_letters(broker, topics, users))
    rc, doc = run_replay(capsys, "--max-records", "4")
    assert rc == 0 and (doc["read"], doc["republished"], doc["partitions_stopped_at_newer_letters"]) == (4, 4, 0), doc
    assert replay_offsets(broker, topics) == 4
    rc, doc = run_replay(capsys)
    assert rc == 0 and (doc["read"], doc["republished"], doc["partitions_stopped_at_newer_letters"]) == (2, 2, 0), doc
    assert replay_offsets(broker, topics) == 6
    assert sorted(m.key() for m in replayed(broker, topics, 12)) == sorted(u.user_id.encode() for u in users)


def test_process_mode_syncs_with_current_mappings_and_dead_letters_failures_again(
    broker: LocalBroker,
    topics: Topics,
    sandbox: SandboxThread,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = mappings_file(tmp_path, UNMAPPED)  # the fix for UNMAPPED is in; OTHER stays unmapped
    other = type(UNMAPPED)("still_unmapped", "1100000077")
    operator_env(
        monkeypatch,
        broker,
        topics,
        MAPPINGS_FILE=str(path),
        TIKTOK_API_URL=sandbox.url,
        TIKTOK_ACCESS_TOKEN="sandbox-token",
        BATCH_LINGER_MS="100",
        DRAIN_TIMEOUT_S="15",
    )
    users = make_users(9, random.Random(6))
    fixed = unmapped_letters(broker, topics, users[:6])
    broken = letters_with_originals(
        broker, topics, [(u, event_value(u, other)) for u in users[6:]], partition=2,
        reason=DlqReason.MISSING_AUDIENCE_ID,
    )  # fmt: skip
    produce_letters(broker, topics.dlq, fixed + broken)

    rc, doc = run_replay(capsys, "--mode", "process")
    assert rc == 0, doc
    assert (doc["selected"], doc["processed"], doc["failed"]) == (9, 6, 3), doc
    assert doc["failed_by_reason"] == {"missing_audience_id": 3}
    assert members(sandbox, UNMAPPED.audience_id) == expected_hashes(users[:6])
    dlq = read_all(broker, topics.dlq, 12)
    assert len(dlq) == 12, "the 3 failures were dead-lettered again, and not re-processed in the same run"
    again = dlq[9:]
    for m in again:
        assert header_value(m.headers(), "replay.count") == "1"
        assert header_value(m.headers(), "replay.origin.topic") == topics.source
        assert header_value(m.headers(), "replay.origin.partition") == "2"
        assert header_value(m.headers(), "dlq.reason") == "missing_audience_id"
    assert replay_offsets(broker, topics) == 9, "committed up to the letters written by this run"

    requests = len(sandbox.state.requests("/segment/mapping/"))
    rc, doc = run_replay(capsys, "--mode", "process", "--max-replays", "1")
    assert rc == 0 and (doc["read"], doc["skipped_max_replays"], doc["processed"]) == (3, 3, 0), doc
    assert len(sandbox.state.requests("/segment/mapping/")) == requests, "nothing uploaded again"
    assert len(read_all(broker, topics.dlq, 12)) == 12


def test_bad_arguments_and_config_are_one_line_exit_2(
    broker: LocalBroker, topics: Topics, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    operator_env(monkeypatch, broker, topics)
    bad = [
        ["--offsets", "zero:1-2"],
        ["--offsets", "0:9-3"],
        ["--since", "yesterday"],
        ["--since", "2024-05-02", "--until", "2024-05-01"],
        ["--mode", "sideways"],
        ["--max-replays", "0"],
        ["--mode", "process", "--to-topic", "x"],
        ["--to-topic", topics.dlq],
        ["--topic", "no-such-topic"],
        ["--mode", "process"],  # no TIKTOK_ACCESS_TOKEN
    ]
    for args in bad:
        capsys.readouterr()
        code = exit_code(args)
        err = capsys.readouterr().err.strip()
        assert code == 2, (args, err)
        assert len(err.splitlines()) == 1, (args, err)
    monkeypatch.setenv("TIKTOK_ACCESS_TOKEN", "s3cret-token-value")
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "")
    capsys.readouterr()
    assert replay.main(["--mode", "process"]) == 2
    err = capsys.readouterr().err
    assert "KAFKA_BOOTSTRAP_SERVERS" in err and "s3cret" not in err


def exit_code(args: list[str]) -> int:
    """`main`'s status, also when argparse exits (it does for unparsable values)."""
    try:
        return replay.main(args)
    except SystemExit as exc:
        return int(exc.code or 0)


def test_letter_without_source_topic_stops_its_partition_until_to_topic_is_given(
    broker: LocalBroker, topics: Topics, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    operator_env(monkeypatch, broker, topics)
    users = make_users(2, random.Random(8))
    foreign = {"key": b"k0", "value": event_value(users[0], UNMAPPED), "headers": [("dlq.reason", b"tiktok_rejected")]}
    produce_letters(broker, topics.dlq, [foreign, *unmapped_letters(broker, topics, users[1:])])
    # No source position: it cannot be checked for newer events, so by default nothing is replayed.
    rc, doc = run_replay(capsys)
    assert rc == 1 and (doc["unverifiable"], doc["selected"], doc["republished"]) == (1, 1, 0), doc
    assert doc["unverifiable_by_cause"] == {"no dlq.source.* headers": 1}
    assert "--unverifiable" in doc["error"]
    assert replay_offsets(broker, topics) < 0, "nothing committed"
    # Replayed anyway, it still needs a target topic.
    rc, doc = run_replay(capsys, "--unverifiable", "replay")
    assert rc == 1 and doc["failed"] == 1 and doc["republished"] == 0
    assert "--to-topic" in doc["error"]
    assert replay_offsets(broker, topics) < 0, "nothing committed past the letter that could not be sent"
    rc, doc = run_replay(capsys, "--to-topic", topics.source, "--unverifiable", "replay")
    assert rc == 0 and doc["republished"] == 2 and doc["to_topics"] == {topics.source: 2}
    assert doc["unverifiable"] == 1 and doc["unverifiable_policy"] == "replay"
    assert replay_offsets(broker, topics) == 2


def test_process_mode_resumes_after_max_records(
    broker: LocalBroker,
    topics: Topics,
    sandbox: SandboxThread,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = mappings_file(tmp_path, UNMAPPED)
    token = {"TIKTOK_API_URL": sandbox.url, "TIKTOK_ACCESS_TOKEN": "sandbox-token", "BATCH_LINGER_MS": "100"}
    operator_env(monkeypatch, broker, topics, MAPPINGS_FILE=str(path), **token)
    users = make_users(8, random.Random(9))
    produce_letters(broker, topics.dlq, unmapped_letters(broker, topics, users))
    rc, doc = run_replay(capsys, "--mode", "process", "--max-records", "3")
    assert rc == 0 and (doc["read"], doc["processed"]) == (3, 3), doc
    assert replay_offsets(broker, topics) == 3
    rc, doc = run_replay(capsys, "--mode", "process")
    assert rc == 0 and (doc["read"], doc["processed"]) == (5, 5), doc
    assert members(sandbox, UNMAPPED.audience_id) == expected_hashes(users)
    assert replay_offsets(broker, topics) == 8


def test_progress_bar_only_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty = Tty()
    monkeypatch.setattr("sys.stderr", tty)
    bar = replay.Progress(True)
    bar.update(3)
    bar.close()
    assert "3rec" in tty.getvalue().replace(" ", "")
    quiet = replay.Progress(False)
    quiet.update(3)
    quiet.close()
    monkeypatch.setattr("sys.stderr", io.StringIO())
    assert replay.Progress(True)._bar is None
