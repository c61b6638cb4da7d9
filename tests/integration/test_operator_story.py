"""The operator story end to end (real broker, real service process, sandbox over loopback): events for an audience
key nobody mapped → `missing_audience_id` dead letters → `dlq inspect` names the key → the mapping is added →
`replay` → the users are in the right TikTok audience, and replaying again changes nothing.

In republish mode the service keeps running through the whole story: it picks up the edited mappings file live
and syncs the replayed events. In process mode the service is stopped first and the replay itself does the work.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from service.commands import dlq_inspect, replay
from service.core.dead_letters import header_value
from service.devtools.broker import LocalBroker
from service.devtools.sample import ADVERTISER_ID, SampleUser, make_users, segment_event
from service.devtools.sandbox import SandboxThread
from tests.commands.test_dlq_inspect import EMAIL_RE, MAPPED, UNMAPPED, operator_env
from tests.conftest import ServiceProcess, Topics, produce, read_all, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture
def sandbox() -> Iterator[SandboxThread]:
    # The audience exists in TikTok; only the mappings file does not know it yet.
    audiences = [(ADVERTISER_ID, UNMAPPED.audience_id), (ADVERTISER_ID, MAPPED.audience_id)]
    with SandboxThread(host="127.0.0.1", port=0, advertisers=[ADVERTISER_ID], audiences=audiences) as s:
        yield s


def write_mappings(path: Path, *audiences: Any) -> None:
    doc = {"audiences": {a.key: {"advertiser_id": a.advertiser_id, "audience_id": a.audience_id} for a in audiences}}
    path.write_text(orjson.dumps(doc).decode())  # JSON is YAML too


def story_events(users: list[SampleUser]) -> tuple[list[tuple[bytes, bytes]], dict[str, set[str]]]:
    """Everyone enters the unmapped audience, then the first three exit; expected TikTok state after that."""

    def event(u: SampleUser, entered: bool) -> tuple[bytes, bytes]:
        return u.user_id.encode(), orjson.dumps(segment_event(u, UNMAPPED, entered, with_ids=False))

    records = [event(u, True) for u in users] + [event(u, False) for u in users[:3]]
    expected: dict[str, set[str]] = {}
    for u in users[3:]:
        for t, h in u.expected_hashes().items():
            expected.setdefault(t, set()).add(h)
    return records, expected


def members(sandbox: SandboxThread) -> dict[str, set[str]]:
    return {t: set(hs) for t, hs in sandbox.state.members(UNMAPPED.audience_id).items() if hs}


def mapping_requests(sandbox: SandboxThread) -> int:
    return len(sandbox.state.requests("/segment/mapping/"))


def cli_json(capsys: pytest.CaptureFixture[str], fn: Callable[[list[str]], int], *args: str) -> dict[str, Any]:
    capsys.readouterr()
    rc = fn([*args])
    out = capsys.readouterr().out
    assert rc == 0, out
    doc: dict[str, Any] = orjson.loads(out)
    return doc


def dead_letters_for_unmapped_key(
    broker: LocalBroker,
    topics: Topics,
    sandbox: SandboxThread,
    env: dict[str, str],
    services: Callable[[dict[str, str]], ServiceProcess],
    records: list[tuple[bytes, bytes]],
) -> ServiceProcess:
    """Acts 1-2: the service meets an audience key with no mapping and dead-letters every event of it."""
    produce(broker, topics.source, records)
    svc = services(env)
    wait_until(
        lambda: svc.metric("audience_sync_events_dead_lettered_total", reason="missing_audience_id") == len(records),
        60,
        "every event of the unmapped key dead-lettered",
    )
    assert mapping_requests(sandbox) == 0 and members(sandbox) == {}
    return svc


def inspect_shows_the_key(capsys: pytest.CaptureFixture[str], topics: Topics, n: int) -> None:
    """Act 3: `dlq inspect` names the audience key and the reason, and prints no personal data."""
    doc = cli_json(capsys, dlq_inspect.main, "inspect", "--json")
    assert doc["total"] == n
    assert doc["by_reason"] == {"missing_audience_id": n}
    assert doc["by_audience_key"] == {UNMAPPED.key: n}
    assert doc["by_source_topic"] == {topics.source: n}
    assert any(UNMAPPED.key in s["error"] for s in doc["samples"]), "the error says which key to map"
    capsys.readouterr()
    assert dlq_inspect.main(["inspect"]) == 0
    assert not EMAIL_RE.search(capsys.readouterr().out), "no email address in the output"


def test_operator_story_republish(
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
    write_mappings(path, MAPPED)  # the key of the story is missing
    env = service_env(sandbox.url, MAPPINGS_FILE=str(path))
    operator_env(monkeypatch, broker, topics, MAPPINGS_FILE=str(path))
    records, expected = story_events(make_users(12, random.Random(42)))
    svc = dead_letters_for_unmapped_key(broker, topics, sandbox, env, services, records)
    inspect_shows_the_key(capsys, topics, len(records))

    # Act 4: the operator adds the mapping (the running service reloads it), checks with a dry run, then replays.
    write_mappings(path, MAPPED, UNMAPPED)
    wait_until(
        lambda: svc.metric("audience_sync_mappings_reloads_total", outcome="applied") >= 1, 15, "live mappings reload"
    )
    dry = cli_json(capsys, replay.main, "--dry-run", "--json", "--audience-key", UNMAPPED.key)
    # The 3 "entered" letters of users who exited later are superseded by their own "exited" letters.
    assert dry["with_current_mappings"] == {"sync": len(records) - 3} and dry["republished"] == len(records) - 3
    assert dry["superseded"] == 3
    done = cli_json(capsys, replay.main, "--json", "--reason", "missing_audience_id")
    assert (done["republished"], done["superseded"], done["failed"], done["skipped_max_replays"]) == (12, 3, 0, 0)
    back = [m for m in read_all(broker, topics.source, 27) if header_value(m.headers(), "replay.count")]
    assert len(back) == 12

    # Act 5: the same running service, with the reloaded mappings, syncs the replayed events into the audience.
    wait_until(lambda: members(sandbox) == expected, 60, "replayed users in the TikTok audience, exits applied")
    wait_until(lambda: svc.metric("audience_sync_events_consumed_total") == 27, 20, "replayed consumed")
    dead = svc.metric("audience_sync_events_dead_lettered_total")
    assert dead == len(records), "nothing failed again: only the first pass's dead letters"
    assert svc.proc is not None and svc.proc.poll() is None, "no restart"
    requests = mapping_requests(sandbox)

    # Act 6: replaying again changes nothing.
    again = cli_json(capsys, replay.main, "--json", "--reason", "missing_audience_id")
    assert (again["read"], again["republished"]) == (0, 0)
    time.sleep(2)
    assert mapping_requests(sandbox) == requests, "no new mapping requests"
    assert len(read_all(broker, topics.source, 27)) == 27, "nothing republished"
    assert members(sandbox) == expected
    assert svc.stop() == 0


def test_operator_story_process_mode(
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
    write_mappings(path, MAPPED)
    env = service_env(sandbox.url, MAPPINGS_FILE=str(path))
    extra = {"TIKTOK_API_URL": sandbox.url, "TIKTOK_ACCESS_TOKEN": "sandbox-token", "BATCH_LINGER_MS": "100"}
    operator_env(monkeypatch, broker, topics, MAPPINGS_FILE=str(path), **extra)
    records, expected = story_events(make_users(12, random.Random(43)))
    svc = dead_letters_for_unmapped_key(broker, topics, sandbox, env, services, records)
    assert svc.stop() == 0
    inspect_shows_the_key(capsys, topics, len(records))

    # The replay itself loads the current file: no service in this story.
    write_mappings(path, MAPPED, UNMAPPED)
    done = cli_json(capsys, replay.main, "--mode", "process", "--json", "--audience-key", UNMAPPED.key)
    assert (done["processed"], done["superseded"], done["failed"], done["unfinished"]) == (12, 3, 0, 0), done
    assert members(sandbox) == expected
    requests = mapping_requests(sandbox)

    again = cli_json(capsys, replay.main, "--mode", "process", "--json")
    assert (again["read"], again["processed"]) == (0, 0), again
    assert mapping_requests(sandbox) == requests, "no new mapping requests"
    assert len(read_all(broker, topics.dlq, len(records))) == len(records), "nothing dead-lettered again"
    assert read_all(broker, topics.source, len(records)) and members(sandbox) == expected
