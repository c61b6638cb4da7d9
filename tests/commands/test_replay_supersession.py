"""Issue 10, defect 3: a replayed dead letter must never override a newer event for the same user and audience key.

End to end on the real broker with the service as a real process and the sandbox over loopback: "entered" events
for an unmapped key are dead-lettered, the mapping is fixed, some of those users exit (their exits are uploaded),
then `replay` runs. The users who exited must stay out of the audience.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest

from service.commands import replay
from service.core.dead_letters import DeadLetter, dead_letter_headers
from service.core.model import DlqReason
from service.core.types import RecordRef
from service.devtools.broker import LocalBroker
from service.devtools.sample import SampleUser, make_users, segment_event
from service.devtools.sandbox import SandboxThread
from tests.commands.test_dlq_inspect import EMAIL_RE, MAPPED, UNMAPPED, operator_env, produce_letters
from tests.commands.test_replay import produce_originals, replay_offsets, replayed
from tests.conftest import ServiceProcess, Topics, committed, produce, wait_until

pytestmark = pytest.mark.integration


def write_mappings(path: Path, *audiences: Any) -> None:
    doc = {"audiences": {a.key: {"advertiser_id": a.advertiser_id, "audience_id": a.audience_id} for a in audiences}}
    path.write_text(orjson.dumps(doc).decode())


def event(u: SampleUser, entered: bool) -> tuple[bytes, bytes]:
    return u.user_id.encode(), orjson.dumps(segment_event(u, UNMAPPED, entered, with_ids=False))


def hashes(users: list[SampleUser]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for u in users:
        for t, h in u.expected_hashes().items():
            out.setdefault(t, set()).add(h)
    return out


def members(sandbox: SandboxThread) -> dict[str, set[str]]:
    return {t: set(hs) for t, hs in sandbox.state.members(UNMAPPED.audience_id).items() if hs}


def cli_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
    capsys.readouterr()
    rc = replay.main(["--json", "--idle-timeout", "5", *args])
    out = capsys.readouterr().out
    assert rc == 0, out
    doc: dict[str, Any] = orjson.loads(out)
    return doc


def test_replay_does_not_re_add_users_who_exited_after_their_letter(
    broker: LocalBroker,
    topics: Topics,
    sandbox: SandboxThread,
    tmp_path: Path,
    service_env: Callable[..., dict[str, str]],
    services: Callable[[dict[str, str]], ServiceProcess],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = tmp_path / "mappings.yaml"
    write_mappings(path, MAPPED)  # the story's key is not mapped yet
    env = service_env(sandbox.url, MAPPINGS_FILE=str(path))
    operator_env(monkeypatch, broker, topics, MAPPINGS_FILE=str(path))
    users = make_users(200, random.Random(1003))
    stayed, exited = users[100:], users[:100]

    # 200 "entered" events for the unmapped key: every one is dead-lettered (missing_audience_id).
    produce(broker, topics.source, [event(u, True) for u in users])
    svc = services(env)
    dead = "audience_sync_events_dead_lettered_total"
    wait_until(lambda: svc.metric(dead, reason="missing_audience_id") == 200, 60, "200 dead letters")

    # The mapping is fixed (picked up live); then 100 of those users exit, and their exits are uploaded.
    write_mappings(path, MAPPED, UNMAPPED)
    wait_until(lambda: svc.metric("audience_sync_mappings_reloads_total", outcome="applied") >= 1, 15, "reload")
    produce(broker, topics.source, [event(u, False) for u in exited])
    wait_until(lambda: svc.metric("audience_sync_events_uploaded_total", action="delete") == 100, 60, "exits uploaded")
    assert members(sandbox) == {}

    # The operator checks with a dry run, then replays the dead letters.
    dry = cli_json(capsys, "--dry-run", "--reason", "missing_audience_id")
    assert (dry["republished"], dry.get("superseded")) == (100, 100), dry
    done = cli_json(capsys, "--reason", "missing_audience_id")
    consumed = 300 + done["republished"]
    wait_until(lambda: svc.metric("audience_sync_events_consumed_total") == consumed, 60, "replayed letters consumed")
    wait_until(lambda: svc.metric("audience_sync_events_uploaded_total", action="add") >= 100, 60, "adds uploaded")
    got = members(sandbox)
    back = sum(1 for u in exited if any(h in got.get(t, set()) for t, h in u.expected_hashes().items()))
    assert back == 0, f"{back} of the 100 users who exited are back in the audience"  # counts only: no ids printed
    assert got == hashes(stayed), "the users who stayed are in the audience"
    assert svc.metric(dead) == 200, "nothing failed again"
    assert (done["republished"], done["superseded"], done["failed"]) == (100, 100, 0), done

    # Replaying every letter again, from a fresh group, changes nothing: the replayed copies are newer events too.
    again = cli_json(capsys, "--group", f"{topics.group}.again", "--reason", "missing_audience_id")
    assert (again["read"], again["republished"], again["superseded"]) == (200, 0, 200), again
    assert members(sandbox) == hashes(stayed)
    assert svc.stop() == 0


# -- on the broker, without the service ---------------------------------------------------------------------------


def dead_letter(value: bytes, key: bytes, topic: str, partition: int, offset: int) -> dict[str, Any]:
    """A `missing_audience_id` letter whose original was at topic/partition/offset."""
    headers = dead_letter_headers(
        [],
        RecordRef(topic, partition, offset),
        DeadLetter(DlqReason.MISSING_AUDIENCE_ID, "missing_audience_id: test letter"),
        datetime.now(UTC) - timedelta(minutes=5),
    )
    return {"key": key, "value": value, "headers": headers}


def not_an_audience_event(u: SampleUser) -> bytes:
    return orjson.dumps({"type": "track", "event": "Order Completed", "context": {"traits": {"email": u.email}}})


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    capsys.readouterr()
    rc = replay.main(["--idle-timeout", "5", *args])
    return rc, capsys.readouterr().out


def test_dry_run_and_summary_count_letters_superseded_by_newer_events(
    broker: LocalBroker, topics: Topics, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    operator_env(monkeypatch, broker, topics)
    a, b, c, d = make_users(4, random.Random(11), identifiers="email")
    key = {u: u.user_id.encode() for u in (a, b, c, d)}
    source = [(key[u], event(u, True)[1], 0) for u in (a, b, c, d)]  # offsets 0-3: the letters' originals
    source += [
        (b"junk", b"\x00\x01 not an event", 0),  # does not decode: ignored
        (key[c], not_an_audience_event(c), 0),  # same user, not a membership change: ignored
        (key[d], orjson.dumps(segment_event(d, MAPPED, False, with_ids=False)), 0),  # same user, another audience
        (key[a], event(a, False)[1], 0),  # a exits: newer than a's letter
        (key[b], event(b, True)[1], 0),  # b enters again: newer too (any newer event wins, whatever its action)
    ]
    at = produce_originals(broker, topics.source, source)
    assert at == list(range(9))
    produce_letters(
        broker,
        topics.dlq,
        [dead_letter(v, k, topics.source, 0, o) for (k, v, _), o in zip(source[:4], at[:4], strict=True)],
    )

    rc, table = run(capsys, "--dry-run")
    assert rc == 0, table
    assert re.search(r"superseded by newer events \(not replayed\) +2\n", table), table
    assert re.search(r"would be republished +2\n", table) and re.search(r"source records checked.* +8\n", table)
    assert "unverifiable" not in table
    assert not EMAIL_RE.search(table), "no identifier printed"
    rc, out = run(capsys, "--dry-run", "--json")
    doc = orjson.loads(out)
    assert (doc["read"], doc["selected"], doc["republished"], doc["superseded"], doc["unverifiable"]) == (4, 2, 2, 2, 0)
    assert replay_offsets(broker, topics) < 0, "a dry run commits nothing"

    rc, table = run(capsys)
    assert rc == 0 and re.search(r"superseded by newer events \(not replayed\) +2\n", table), table
    assert re.search(r"republished +2\n", table), table
    assert sorted(m.key() for m in replayed(broker, topics, 11)) == sorted([key[c], key[d]])
    assert replay_offsets(broker, topics) == 4, "superseded letters are committed past"


def test_unverifiable_letters_stop_the_run_unless_the_operator_decides(
    broker: LocalBroker, topics: Topics, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    operator_env(monkeypatch, broker, topics)
    u0, u1, u2 = make_users(3, random.Random(12))
    gone = f"{topics.source}-deleted"  # the source topic of some letters no longer exists
    [fine] = produce_originals(broker, topics.source, [(u2.user_id.encode(), event(u2, True)[1], 1)])
    letters = [
        dead_letter(event(u0, True)[1], u0.user_id.encode(), gone, 0, 5),
        dead_letter(event(u0, False)[1], u0.user_id.encode(), gone, 0, 9),  # newer: supersedes the one above
        dead_letter(event(u1, True)[1], u1.user_id.encode(), topics.source, 9, 0),  # no partition 9
        dead_letter(event(u2, True)[1], u2.user_id.encode(), topics.source, 1, fine),
    ]
    produce_letters(broker, topics.dlq, letters)
    causes = {f"topic {gone} not found": 1, f"partition 9 of topic {topics.source} not found": 1}

    rc, out = run(capsys, "--json")
    doc = orjson.loads(out)
    assert rc == 1, doc
    assert (doc["republished"], doc["superseded"], doc["unverifiable"], doc["selected"]) == (0, 1, 2, 1), doc
    assert doc["unverifiable_by_cause"] == causes
    assert "--unverifiable replay" in doc["error"] and "--unverifiable skip" in doc["error"]
    assert replayed(broker, topics, 1) == [] and replay_offsets(broker, topics) < 0, "nothing sent or committed"

    rc, table = run(capsys, "--dry-run")
    assert rc == 0 and "a real run stops before replaying anything" in table, table
    assert re.search(r"unverifiable: not checked for newer events \(not replayed\) +2\n", table), table
    assert f"unverifiable: topic {gone} not found" in table

    # Skipping them (a group of its own): the checked letter goes, the rest is committed past.
    skip = f"{topics.group}.skip"
    rc, out = run(capsys, "--json", "--unverifiable", "skip", "--group", skip)
    doc = orjson.loads(out)
    assert rc == 0, doc
    assert (doc["republished"], doc["superseded"], doc["unverifiable"], doc["read"]) == (1, 1, 2, 4), doc
    assert doc["unverifiable_policy"] == "skip"
    assert [m.partition() for m in replayed(broker, topics, 2)] == [1]
    assert committed(broker, skip, topics.dlq, 1)[0] == 4

    # Replaying them anyway: u2's letter is superseded now, by its own replayed copy (a newer event for u2).
    rc, out = run(capsys, "--json", "--unverifiable", "replay", "--to-topic", topics.source)
    doc = orjson.loads(out)
    assert rc == 0, doc
    assert (doc["republished"], doc["superseded"], doc["unverifiable"]) == (2, 2, 2), doc
    assert doc["unverifiable_policy"] == "replay"
    assert len(replayed(broker, topics, 4)) == 3 and replay_offsets(broker, topics) == 4


def test_a_newer_letter_for_the_same_user_wins(
    broker: LocalBroker, topics: Topics, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Both of one user's events were dead-lettered: only the newer one goes back."""
    operator_env(monkeypatch, broker, topics)
    [u] = make_users(1, random.Random(13))
    values = [event(u, True)[1], event(u, False)[1]]
    at = produce_originals(broker, topics.source, [(u.user_id.encode(), v, 2) for v in values])
    produce_letters(
        broker,
        topics.dlq,
        [dead_letter(v, u.user_id.encode(), topics.source, 2, o) for v, o in zip(values, at, strict=True)],
    )
    rc, out = run(capsys, "--json")
    doc = orjson.loads(out)
    assert rc == 0 and (doc["republished"], doc["superseded"]) == (1, 1), doc
    [back] = replayed(broker, topics, 3)
    assert back.value() == values[1] and back.partition() == 2, "the exit, on its partition"


def test_process_mode_does_not_upload_superseded_letters(
    broker: LocalBroker,
    topics: Topics,
    sandbox: SandboxThread,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = tmp_path / "mappings.json"
    write_mappings(path, MAPPED, UNMAPPED)
    extra = {"TIKTOK_API_URL": sandbox.url, "TIKTOK_ACCESS_TOKEN": "sandbox-token", "BATCH_LINGER_MS": "100"}
    operator_env(monkeypatch, broker, topics, MAPPINGS_FILE=str(path), **extra)
    users = make_users(3, random.Random(14))
    source = [(u.user_id.encode(), event(u, True)[1], 0) for u in users] + [
        (users[0].user_id.encode(), event(users[0], False)[1], 0)
    ]
    at = produce_originals(broker, topics.source, source)
    produce_letters(
        broker,
        topics.dlq,
        [dead_letter(v, k, topics.source, 0, o) for (k, v, _), o in zip(source[:3], at[:3], strict=True)],
    )
    rc, out = run(capsys, "--json", "--mode", "process")
    doc = orjson.loads(out)
    assert rc == 0 and (doc["processed"], doc["superseded"], doc["failed"]) == (2, 1, 0), doc
    assert members(sandbox) == hashes(users[1:]), "the user who exited later was not added"
    assert replay_offsets(broker, topics) == 3
