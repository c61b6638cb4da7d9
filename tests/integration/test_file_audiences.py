"""File audiences (`mode: file`) end to end on the real broker (tansu), the sandbox over loopback HTTP and the
service as a real process: membership events netted per user into customer-file uploads and APPEND / REMOVE
updates (service/core/file_batcher.py, service/pipeline/file_uploads.py).

- a `kill -9` mid-stream, then a restart: the audience ends as seed + last-action-wins, nothing dead-lettered;
- create on demand: one customer-file audience named after the key, its id recorded (audience store topic) so
  later exits are REMOVEs on that audience, also after a restart;
- TikTok's 1,000-user rule: a REMOVE that would leave fewer is refused, its records are dead-lettered
  `tiktok_rejected` and their offsets still committed; once the audience has grown, `replay --mode process`
  applies those letters as a REMOVE, writes no new letter and commits its group to the DLQ's end;
- the entry's one contract: events carrying email and phone upload only EMAIL_SHA256 files.
"""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest

from service.core.dead_letters import header_value
from service.devtools.broker import LocalBroker
from service.devtools.sample import ADVERTISER_ID
from service.devtools.sandbox import SandboxThread
from service.devtools.sandbox.state import CUSTOMER_FILE, FilePart
from tests.conftest import ROOT, ServiceProcess, Topics, committed, produce, read_all, wait_until

pytestmark = pytest.mark.integration

ADV = ADVERTISER_ID  # registered by the `sandbox` fixture
EMAIL: str = "EMAIL_SHA256"
FILE_UPLOAD = "/dmp/custom_audience/file/upload/"
FILE_UPDATE = "/dmp/custom_audience/update/"
FILE_CREATE = "/dmp/custom_audience/create/"
Records = list[tuple[bytes | None, bytes | None]]
EnvFactory = Callable[..., dict[str, str]]
Start = Callable[[dict[str, str]], ServiceProcess]


# -- helpers ------------------------------------------------------------------------------------------------------


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def email_hash(raw: str) -> str:
    """What the service sends for an email: SHA-256 of the trimmed, lowercased address."""
    return sha(raw.strip().lower())


def messy(email: str, i: int) -> str:
    """Some emails as CDPs send them (spaces, capitals): the hash must not change."""
    return f"  {email.upper()} " if i % 5 == 0 else email


def event(key: str, action: str, user: str, email: str, n: int, phone: str | None = None) -> bytes:
    """A canonical membership event (schemas/audience_membership.json); the advertiser comes from the mappings."""
    doc: dict[str, Any] = {
        "audience_key": key,
        "action": action,
        "event_id": f"ev-{n}",
        "event_time": int(time.time() * 1000) - 60_000 + n,
        "user_id": user,
        "email": email,
    }
    if phone is not None:
        doc["phone"] = phone
    return orjson.dumps(doc)


def mappings(tmp_path: Path, entries: dict[str, dict[str, Any]]) -> Path:
    path = tmp_path / "mappings.yaml"
    path.write_text(json.dumps({"audiences": entries}))  # JSON is YAML
    return path


def file_entry(audience_id: str | None = None, **more: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {"advertiser_id": ADV, "mode": "file", "id_types": [EMAIL], **more}
    if audience_id is not None:
        entry["audience_id"] = audience_id
    return entry


def sandbox_file(sb: SandboxThread, hashes: set[str], name: str) -> str:
    """The path of a file of `hashes` uploaded straight into the sandbox's state (set-up, not under test)."""
    content = "".join(h + "\n" for h in sorted(hashes)).encode()
    body: dict[str, object] = {
        "advertiser_id": ADV,
        "calculate_type": EMAIL,
        "file_signature": hashlib.md5(content, usedforsecurity=False).hexdigest(),
        "file": FilePart(name, content),
    }
    return str(sb.state.upload_file(body)["file_path"])


def file_audience(sb: SandboxThread, members: set[str], name: str) -> str:
    """A customer-file audience holding `members` (hashes), made through the sandbox's own upload and create
    (as tests/commands/test_refresh.py does); the set-up's file and CREATE are forgotten afterwards."""
    path = sandbox_file(sb, members, "seed.csv")
    created = sb.state.create_file_audience(
        {"advertiser_id": ADV, "custom_audience_name": name, "calculate_type": EMAIL, "file_paths": [path]}
    )
    sb.state.files.clear()
    sb.state.file_updates.clear()
    return str(created["custom_audience_id"])


def members(sb: SandboxThread, audience_id: str) -> set[str]:
    got = sb.state.members(audience_id)
    assert set(got) <= {EMAIL}, f"identifier types other than {EMAIL} in the audience: {sorted(got)}"
    return set(got.get(EMAIL, []))


def updates(sb: SandboxThread, audience_id: str | None = None) -> list[dict[str, Any]]:
    """Creates and updates the sandbox applied, oldest first (optionally of one audience)."""
    done: list[dict[str, Any]] = sb.state.customer_files()["updates"]  # type: ignore[assignment]
    return [u for u in done if audience_id is None or u["audience_id"] == audience_id]


def file_audiences_named(sb: SandboxThread, name: str) -> list[str]:
    audiences: dict[str, dict[str, Any]] = sb.state.snapshot()["audiences"]  # type: ignore[assignment]
    return [aid for aid, a in audiences.items() if a["name"] == name and a["type"] == CUSTOMER_FILE]


def committed_total(broker: LocalBroker, topics: Topics) -> int:
    return sum(max(0, v) for v in committed(broker, topics.group, topics.source, topics.partitions).values())


def file_metrics(svc: ServiceProcess) -> str:
    """The service's file-audience and pending gauges and counters, for failure messages."""
    try:
        text = svc.metrics()
    except OSError as exc:
        return f"(metrics unavailable: {exc})"
    wanted = ("audience_sync_file_updates_total", "audience_sync_file_pending", "audience_sync_file_audiences_wait")
    return "\n".join(line for line in text.splitlines() if line.startswith(wanted))


def wait_committed(broker: LocalBroker, topics: Topics, total: int, timeout_s: float, svc: ServiceProcess) -> None:
    try:
        wait_until(lambda: committed_total(broker, topics) == total, timeout_s, f"{total} offsets committed")
    except AssertionError as exc:
        ends = committed(broker, topics.group, topics.source, topics.partitions)
        raise AssertionError(
            f"{exc}; committed {ends}; metrics:\n{file_metrics(svc)}\nservice log tail:\n{svc.log()}"
        ) from None


def dead_letters(broker: LocalBroker, topics: Topics, expect: int, timeout_s: float = 10.0) -> list[Any]:
    return read_all(broker, topics.dlq, expect, timeout_s=timeout_s)


def wait_members(
    sb: SandboxThread, audience_id: str, expected: set[str], timeout_s: float, svc: ServiceProcess
) -> None:
    try:
        wait_until(lambda: members(sb, audience_id) == expected, timeout_s, "the audience's members")
    except AssertionError as exc:
        got = members(sb, audience_id)
        raise AssertionError(
            f"{exc}: {len(got)} members, {len(expected)} expected, {len(got - expected)} extra, "
            f"{len(expected - got)} missing; metrics:\n{file_metrics(svc)}\nservice log tail:\n{svc.log()}"
        ) from None


def file_env(service_env: EnvFactory, sb: SandboxThread, path: Path, **extra: str) -> dict[str, str]:
    return service_env(
        sb.url,
        MAPPINGS_FILE=str(path),
        FILE_INTERVAL_S="1",
        RETRY_BASE_S="0.1",
        TIKTOK_MAX_QPS="50",
        **extra,
    )


# -- 1. kill -9 mid-stream ----------------------------------------------------------------------------------------


def test_kill_9_mid_stream_then_restart_audience_is_seed_plus_last_action_wins(
    broker: LocalBroker,
    topics: Topics,
    sandbox: SandboxThread,
    service_env: EnvFactory,
    services: Start,
    tmp_path: Path,
) -> None:
    key = "crm_buyers"
    seed_emails = [f"crm{i}@example.com" for i in range(1500)]
    seed = {email_hash(e) for e in seed_emails}
    audience_id = file_audience(sandbox, seed, "CRM buyers")

    # 2,000 users: 300 of them already in the audience, 1,700 new; three events each, alternating enter / exit
    # from a random start, interleaved at random but in order per user (keyed by user: one partition each).
    rng = random.Random(2024)
    people = seed_emails[:300] + [f"fan{i}@example.com" for i in range(1700)]
    actions: dict[int, list[str]] = {}
    for u in range(len(people)):
        first = rng.choice(["add", "delete"])
        other = "delete" if first == "add" else "add"
        actions[u] = [first, other, first]
    order = [u for u in range(len(people)) for _ in range(3)]
    rng.shuffle(order)
    records: Records = []
    last: dict[int, str] = {}
    step = dict.fromkeys(actions, 0)
    for n, u in enumerate(order):
        action = actions[u][step[u]]
        step[u] += 1
        last[u] = action
        records.append((f"user-{u}".encode(), event(key, action, f"user-{u}", messy(people[u], u), n)))
    assert len(records) == 6000
    expected = set(seed)
    for u, action in last.items():
        h = email_hash(people[u])
        if action == "add":
            expected.add(h)
        else:
            expected.discard(h)
    assert expected != seed and len(expected) >= 1000

    # Slow updates so the kill lands with batches cut but not yet accepted (and offsets not yet committed).
    sandbox.set_faults({"rules": [{"kind": "slow", "path": FILE_UPDATE, "delay_s": 0.15}]})
    path = mappings(tmp_path, {key: file_entry(audience_id)})
    env = file_env(service_env, sandbox, path, FILE_MAX_ROWS="150")
    svc = services(env)
    wait_until(lambda: svc.http_status("/readyz") == 200, 30, "service ready")
    produce(broker, topics.source, records[:3000])
    wait_until(
        lambda: any(u["action"] in ("APPEND", "REMOVE") for u in updates(sandbox, audience_id)),
        30,
        "a first file update applied",
    )
    svc.kill9()
    at_kill = committed_total(broker, topics)
    applied_at_kill = len(updates(sandbox, audience_id))
    assert at_kill < 3000, f"killed mid-stream: {at_kill} of the first 3,000 records were already committed"

    produce(broker, topics.source, records[3000:])
    sandbox.set_faults(None)
    svc2 = services(env)
    wait_committed(broker, topics, len(records), 90, svc2)
    wait_members(sandbox, audience_id, expected, 10, svc2)
    assert svc2.stop() == 0

    assert members(sandbox, audience_id) == expected, "seed + last action wins per user"
    assert dead_letters(broker, topics, 0, timeout_s=3) == [], "nothing dead-lettered"
    done = updates(sandbox, audience_id)
    assert len(done) - applied_at_kill >= 2, "the restarted service applied updates of its own"
    assert {u["action"] for u in done} <= {"APPEND", "REMOVE"}, "no REPLACE, no create: the audience existed"
    assert len(done) >= 4, f"FILE_MAX_ROWS=150 splits 2,000 users into several updates, got {len(done)}"
    assert file_audiences_named(sandbox, key) == [], "no audience created for the key"


# -- 2. create on demand ------------------------------------------------------------------------------------------

SIGNUPS = "crm_signups"


class Created:
    """An audience the service created on demand from 1,200 users entering, and how to go on with it."""

    def __init__(
        self, broker: LocalBroker, topics: Topics, sandbox: SandboxThread, service_env: EnvFactory, tmp_path: Path
    ) -> None:
        self.broker, self.topics, self.sandbox = broker, topics, sandbox
        self.store = f"{topics.source}.audiences"
        self.people = [f"signup{i}@example.com" for i in range(1200)]
        self.hashes = [email_hash(e) for e in self.people]
        path = mappings(tmp_path, {SIGNUPS: file_entry(None, create_if_missing=True)})
        self.env = file_env(service_env, sandbox, path, AUDIENCE_STORE_TOPIC=self.store)
        self.produced = 0
        self.audience_id = ""

    def send(self, records: Records) -> None:
        produce(self.broker, self.topics.source, records)
        self.produced += len(records)

    def exits(self, users: range, n0: int) -> Records:
        return [(f"u{i}".encode(), event(SIGNUPS, "delete", f"u{i}", self.people[i], n0 + i)) for i in users]

    def create(self, services: Start) -> ServiceProcess:
        """1,200 users enter: exactly one customer-file audience named after the key, holding exactly them, its
        id recorded in the audience store topic."""
        sb = self.sandbox
        self.send(
            [(f"u{i}".encode(), event(SIGNUPS, "add", f"u{i}", messy(e, i), i)) for i, e in enumerate(self.people)]
        )
        svc = services(self.env)
        wait_until(lambda: len(file_audiences_named(sb, SIGNUPS)) >= 1, 45, "an audience named after the key")
        [self.audience_id] = file_audiences_named(sb, SIGNUPS)
        wait_members(sb, self.audience_id, set(self.hashes), 30, svc)
        wait_committed(self.broker, self.topics, self.produced, 30, svc)
        assert sb.state.members(self.audience_id).keys() == {EMAIL}
        creates = [u for u in updates(sb) if u["action"] == "CREATE"]
        assert [u["audience_id"] for u in creates] == [self.audience_id], "exactly one create"
        assert creates[0]["size_after"] >= 1000, "created once at least 1,000 users were to be added"
        results = [orjson.loads(m.value()) for m in read_all(self.broker, self.store, 1, timeout_s=10)]
        assert any(r.get("type") == "result" and r.get("audience_id") == self.audience_id for r in results), (
            f"the new id is recorded in the audience store {self.store}: {results}"
        )
        return svc

    def check_one_audience(self) -> None:
        sb = self.sandbox
        assert file_audiences_named(sb, SIGNUPS) == [self.audience_id], "no second audience"
        assert len(sb.state.requests(FILE_CREATE)) == 1, "one create request in all"
        later = [u["action"] for u in updates(sb) if u["action"] != "CREATE"]
        assert later and set(later) <= {"APPEND", "REMOVE"} and "REMOVE" in later, later
        assert {u["audience_id"] for u in updates(sb)} == {self.audience_id}, "every update on the created audience"
        assert dead_letters(self.broker, self.topics, 0, timeout_s=3) == [], "nothing dead-lettered"


def test_create_on_demand_one_audience_named_after_the_key_then_exits_remove_from_it(
    broker: LocalBroker,
    topics: Topics,
    sandbox: SandboxThread,
    service_env: EnvFactory,
    services: Start,
    tmp_path: Path,
) -> None:
    c = Created(broker, topics, sandbox, service_env, tmp_path)
    svc = c.create(services)
    # Exits only: nothing to create an audience from, so they go out only because the new id is known.
    c.send(c.exits(range(100), 10_000))
    wait_members(sandbox, c.audience_id, set(c.hashes[100:]), 30, svc)
    wait_committed(broker, topics, c.produced, 30, svc)
    assert svc.stop() == 0
    c.check_one_audience()


def test_create_on_demand_a_restarted_service_learns_the_id_from_the_store(
    broker: LocalBroker,
    topics: Topics,
    sandbox: SandboxThread,
    service_env: EnvFactory,
    services: Start,
    tmp_path: Path,
) -> None:
    c = Created(broker, topics, sandbox, service_env, tmp_path)
    assert c.create(services).stop() == 0
    # A new process: the id is only in the audience store topic. Exits only, again REMOVEs on the same audience.
    c.send(c.exits(range(50), 20_000))
    svc2 = services(c.env)
    wait_members(sandbox, c.audience_id, set(c.hashes[50:]), 45, svc2)
    wait_committed(broker, topics, c.produced, 30, svc2)
    assert svc2.stop() == 0
    c.check_one_audience()


# -- 3. the 1,000-user rule ---------------------------------------------------------------------------------------


@dataclass
class Refused:
    """10 exits from an audience of exactly 1,000 members, refused by TikTok and dead-lettered (the service stopped)."""

    people: list[str]
    seed: set[str]
    audience_id: str
    exits: Records
    letters: list[Any]
    env: dict[str, str]

    @classmethod
    def run(
        cls,
        broker: LocalBroker,
        topics: Topics,
        sandbox: SandboxThread,
        service_env: EnvFactory,
        services: Start,
        tmp_path: Path,
    ) -> Refused:
        key = "crm_small"
        people = [f"member{i}@example.com" for i in range(1000)]
        seed = {email_hash(e) for e in people}
        audience_id = file_audience(sandbox, seed, "CRM small")
        exits: Records = [(f"m{i}".encode(), event(key, "delete", f"m{i}", people[i], i)) for i in range(10)]
        produce(broker, topics.source, exits)
        env = file_env(service_env, sandbox, mappings(tmp_path, {key: file_entry(audience_id)}))
        svc = services(env)
        letters = dead_letters(broker, topics, len(exits), timeout_s=45)
        wait_committed(broker, topics, len(exits), 30, svc)
        assert svc.stop() == 0
        return cls(people, seed, audience_id, exits, letters, env)


def test_remove_below_1000_users_is_dead_lettered_tiktok_rejected_and_offsets_move_on(
    broker: LocalBroker,
    topics: Topics,
    sandbox: SandboxThread,
    service_env: EnvFactory,
    services: Start,
    tmp_path: Path,
) -> None:
    r = Refused.run(broker, topics, sandbox, service_env, services, tmp_path)
    people, seed, audience_id, exits, letters = r.people, r.seed, r.audience_id, r.exits, r.letters
    got_keys = sorted(bytes(m.key()) for m in letters)
    assert got_keys == sorted(bytes(k or b"") for k, _ in exits), "each refused record dead-lettered once"
    by_value = {m.value() for m in letters}
    assert by_value == {v for _, v in exits}, "original values unchanged"
    for m in letters:
        headers = m.headers()
        assert header_value(headers, "dlq.reason") == "tiktok_rejected"
        assert header_value(headers, "dlq.source.topic") == topics.source
        assert header_value(headers, "dlq.tiktok.code") == "40002", header_value(headers, "dlq.tiktok.code")
        error = header_value(headers, "dlq.error") or ""
        assert "1,000" in error or "1000" in error, error
        assert not any(e in error for e in people[:10]), "no PII in the error"
    assert members(sandbox, audience_id) == seed, "the audience keeps its 1,000"
    assert updates(sandbox, audience_id) == [], "no update applied"
    refused = [r for r in sandbox.state.requests(FILE_UPDATE) if r["code"] == 40002]
    assert len(refused) == 1, f"one refused REMOVE, not retried: {sandbox.state.requests(FILE_UPDATE)}"


# -- 4. one contract: only email hashes ---------------------------------------------------------------------------


def test_email_only_entry_uploads_only_email_hashes_from_events_with_email_and_phone(
    broker: LocalBroker,
    topics: Topics,
    sandbox: SandboxThread,
    service_env: EnvFactory,
    services: Start,
    tmp_path: Path,
) -> None:
    key = "crm_newsletter"
    seed = {email_hash(f"reader{i}@example.com") for i in range(1000)}
    audience_id = file_audience(sandbox, seed, "CRM newsletter")
    people = [(f"buyer{i}@example.com", f"+1415{2_000_000 + i:07d}") for i in range(300)]
    email_hashes = [email_hash(e) for e, _ in people]
    phone_hashes = {sha(p) for _, p in people}
    records: Records = [
        (f"b{i}".encode(), event(key, "add", f"b{i}", messy(e, i), i, phone=p)) for i, (e, p) in enumerate(people)
    ]
    records += [
        (f"b{i}".encode(), event(key, "delete", f"b{i}", people[i][0], 1000 + i, phone=people[i][1])) for i in range(50)
    ]
    produce(broker, topics.source, records)
    svc = services(file_env(service_env, sandbox, mappings(tmp_path, {key: file_entry(audience_id)})))

    expected = seed | set(email_hashes[50:])
    wait_members(sandbox, audience_id, expected, 45, svc)
    wait_committed(broker, topics, len(records), 30, svc)
    assert svc.stop() == 0

    files: list[dict[str, Any]] = sandbox.state.customer_files()["files"]  # type: ignore[assignment]
    assert files, "files were uploaded"
    assert {f["calculate_type"] for f in files} == {EMAIL}, files
    sent: set[str] = set()
    for f in files:
        sent.update(sandbox.state.file_identifiers(str(f["file_path"])))
    assert not sent & phone_hashes, "no phone hash in any file"
    assert set(email_hashes[50:]) <= sent <= set(email_hashes), "only the events' email hashes, every enterer's"
    assert sandbox.state.members(audience_id).keys() == {EMAIL}
    assert {u["action"] for u in updates(sandbox, audience_id)} <= {"APPEND", "REMOVE"}
    assert len(sandbox.state.requests(FILE_UPLOAD)) == len(files)
    assert dead_letters(broker, topics, 0, timeout_s=3) == [], "nothing dead-lettered"


# -- 5. replaying the refused REMOVE once the audience is big enough ----------------------------------------------

REPLAY_TIMEOUT_S = 60.0


def grow_file_audience(sb: SandboxThread, audience_id: str, more: set[str]) -> None:
    """Add `more` (hashes) to a customer-file audience through the sandbox's own upload and APPEND (as
    `file_audience` seeds one); the set-up's file and update are forgotten afterwards."""
    path = sandbox_file(sb, more, "grow.csv")
    sb.state.update_file_audience(
        {"advertiser_id": ADV, "custom_audience_id": audience_id, "action": "APPEND", "file_paths": [path]}
    )
    sb.state.files.clear()
    sb.state.file_updates.clear()


def ends_of(letters: list[Any]) -> dict[int, int]:
    """Per partition, the offset after the last record read (not ListOffsets: tansu's latest offset can be short,
    docs/design.md "A real broker for tests and `make run`")."""
    ends: dict[int, int] = {}
    for m in letters:
        ends[m.partition()] = max(ends.get(m.partition(), 0), m.offset() + 1)
    return ends


def run_replay(env: dict[str, str], *args: str) -> tuple[int, dict[str, Any], str]:
    """`audience-sync replay ARGS --json` as a real process, bounded by REPLAY_TIMEOUT_S: exit code, summary,
    stderr."""
    cmd = [sys.executable, "-m", "service", "replay", *args, "--json", "--no-progress"]
    try:
        done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, timeout=REPLAY_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as exc:
        err = (exc.stderr or b"").decode(errors="replace")[-5000:]
        raise AssertionError(f"{' '.join(cmd[1:])} did not finish within {REPLAY_TIMEOUT_S}s; stderr:\n{err}") from None
    out, err = done.stdout.decode(errors="replace").strip(), done.stderr.decode(errors="replace")
    doc: dict[str, Any] = orjson.loads(out) if out.startswith("{") else {"stdout": out}
    return done.returncode, doc, err[-5000:]


def test_replayed_file_audience_letters_apply_once_the_audience_is_big_enough(
    broker: LocalBroker,
    topics: Topics,
    sandbox: SandboxThread,
    service_env: EnvFactory,
    services: Start,
    tmp_path: Path,
) -> None:
    # As in the 1,000-user rule test: 10 exits from an audience of exactly 1,000, refused and dead-lettered.
    r = Refused.run(broker, topics, sandbox, service_env, services, tmp_path)
    people, seed, audience_id, exits, letters, env = r.people, r.seed, r.audience_id, r.exits, r.letters, r.env
    assert len(letters) == len(exits)
    assert {header_value(m.headers(), "dlq.reason") for m in letters} == {"tiktok_rejected"}
    assert members(sandbox, audience_id) == seed, "the audience keeps its 1,000"

    # The audience grows to 1,100 at TikTok: removing the 10 now leaves 1,090.
    grown = seed | {email_hash(f"newcomer{i}@example.com") for i in range(100)}
    grow_file_audience(sandbox, audience_id, grown - seed)
    assert len(members(sandbox, audience_id)) == 1100

    # The operator replays the refused letters; process mode resolves and uploads them itself (no service).
    dlq_end = ends_of(letters)
    assert dlq_end == {0: len(exits)}, dlq_end
    replay_started = time.monotonic()
    rc, doc, err = run_replay(env, "--mode", "process", "--reason", "tiktok_rejected", "--idle-timeout", "5")
    replay_s = time.monotonic() - replay_started
    assert rc == 0, f"replay exit {rc}: {doc}\nstderr:\n{err}"
    assert (doc["selected"], doc["processed"], doc["failed"]) == (10, 10, 0), doc

    expected = grown - {email_hash(e) for e in people[:10]}
    got = members(sandbox, audience_id)
    assert len(expected) == 1090
    assert got == expected, f"{len(got)} members, {len(got - expected)} extra, {len(expected - got)} missing"
    done = updates(sandbox, audience_id)
    assert done and {u["action"] for u in done} == {"REMOVE"}, done
    assert (done[0]["size_before"], done[-1]["size_after"]) == (1100, 1090), done
    after = dead_letters(broker, topics, len(exits), timeout_s=3)
    assert sorted((m.partition(), m.offset()) for m in after) == sorted((m.partition(), m.offset()) for m in letters), (
        "no new dead letter: the DLQ holds only the original 10"
    )
    replay_group = f"{topics.group}.replay"
    assert committed(broker, replay_group, topics.dlq, 1) == dlq_end, "the replay committed to the DLQ's end"
    assert replay_s < REPLAY_TIMEOUT_S, f"the replay took {replay_s:.1f}s"
