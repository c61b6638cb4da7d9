"""File audiences end to end against the real TikTok sandbox over 127.0.0.1 (service/pipeline/file_uploads.py):
a real `FileBatcher`, `UploadGate`, `TokenBucket` and `Backoff`, the real `CustomerFilesApi` on a `TikTokClient`
and an aiohttp session, and a recording `FileOutcomes` whose liveness the test controls.

- APPEND and REMOVE of one netted batch land at TikTok; every record is finished exactly once;
- TikTok's 1,000-user rule refuses a REMOVE: only the records needing it are dead-lettered, with the rule named
  and no identifier in the error, while the APPEND records of the batch finish;
- a retryable refusal is retried within the budget, and dead-lettered `retries_exhausted` past it;
- an auth outage closes the shared gate without spending the retry budget; the gate reopens by itself;
- the revocation fence: a partition revoked after the cut never reaches TikTok in an update;
- create on demand (customer-file create from the batch's APPEND files), reuse of an unrecorded audience of the
  same name, and the next batch updating the created audience;
- on the whole `Pipeline` (in-memory broker): offsets of file records are committed only after the sandbox
  applied their update, and the audience ends with last-action-wins membership.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import random
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from typing import Any, cast

import aiohttp
import pytest

from service.core.batcher import Batcher
from service.core.customer_files import FileContract, IdentifierFile, files_from_hashes
from service.core.dead_letters import DeadLetter
from service.core.file_batcher import FileBatcher, FileChange, FileKey, FileRow
from service.core.mappings import Mappings, parse_mappings
from service.core.membership import Resolver, ResolverSettings
from service.core.model import Action, DlqReason, IdType
from service.core.retry import Backoff, TokenBucket
from service.core.schemas import SchemaStore
from service.core.types import RecordRef, TopicPartition
from service.devtools.sandbox import SandboxThread
from service.kafka.audience_store import AudienceRef, AudienceStore
from service.kafka.memory import InMemoryBroker, InMemoryConsumer
from service.metrics import REGISTRY
from service.pipeline.audience_creation import AudienceCreator
from service.pipeline.file_uploads import FileUploads
from service.pipeline.gate import UploadGate
from service.pipeline.loop import Pipeline, PipelineOptions
from service.tiktok.audiences_api import AudiencesApi
from service.tiktok.client import ControlLimiter, TikTokClient
from service.tiktok.customer_files_api import CustomerFilesApi, UploadedFile
from tests.pipeline.harness import email, email_hash, event

pytestmark = pytest.mark.timeout(30)

ADV = "7000000000000000042"
STREAM_AUDIENCE = "101"  # a Partner audience, for the pipeline test's streaming records
TOKEN = "sandbox-token"
CONTRACT: FileContract = "EMAIL_SHA256"
ID_TYPE: IdType = "EMAIL_SHA256"  # the streaming id type of the contract
KEY = "crm_vips"  # the mappings entry's audience key
NAME = "CRM VIPs (file)"
UPDATE = "/dmp/custom_audience/update/"
SRC, DLQ, GROUP, PARTITIONS = "src", "dlq", "g", 3
TP0, TP1 = TopicPartition(SRC, 0), TopicPartition(SRC, 1)
WAIT_S = 5.0


sha = email_hash  # a user's email hash, as the service computes it


def hashes(users: Iterable[str]) -> set[str]:
    return {sha(u) for u in users}


def users(prefix: str, n: int) -> list[str]:
    return [f"{prefix}{i}" for i in range(n)]


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def until(cond: Callable[[], bool], timeout_s: float = WAIT_S) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not cond():
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(0.005)
    return True


# -- stand-ins for the pipeline's side -------------------------------------------------------------------------


class Outcomes:
    """The pipeline's side of `FileUploads`: liveness by partition, finished rows and dead letters recorded."""

    def __init__(self) -> None:
        self.live: set[TopicPartition] = {TopicPartition(SRC, p) for p in range(PARTITIONS)}
        self.finished: list[FileRow] = []
        self.letters: list[tuple[Any, DeadLetter]] = []

    def is_live(self, row: FileRow) -> bool:
        return row.ref.tp in self.live

    def uploaded(self, rows: list[FileRow]) -> None:
        self.finished.extend(rows)

    async def dead_letter(self, source: Any, letter: DeadLetter) -> None:
        await asyncio.sleep(0)  # as the real writer: an ack comes later
        self.letters.append((source, letter))

    def finished_refs(self) -> list[RecordRef]:
        return sorted(r.ref for r in self.finished)

    def lettered_refs(self) -> list[RecordRef]:
        return sorted(cast(RecordRef, s) for s, _ in self.letters)


class Batches(FileBatcher):
    """The real batcher, counting the batches that reached their outcome (`done`)."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.done_calls: list[tuple[FileKey, str | None]] = []

    def done(self, key: FileKey, audience_id: str | None = None, audience_name: str | None = None) -> None:
        self.done_calls.append((key, audience_id))
        super().done(key, audience_id, audience_name)


class FakeStore:
    """What `AudienceCreator` uses of `AudienceStore`, in process (the Kafka-backed store is covered by the
    integration tests): one replica, so every claim is won until an id is recorded."""

    claim_ttl_s = 1.0

    def __init__(self) -> None:
        self.ids: dict[AudienceRef, str] = {}
        self.claims: list[AudienceRef] = []
        self.published: list[tuple[AudienceRef, str]] = []

    async def ensure_started(self) -> None:
        await asyncio.sleep(0)

    async def claim(self, ref: AudienceRef) -> bool:
        self.claims.append(ref)
        return ref not in self.ids

    async def publish(self, ref: AudienceRef, audience_id: str) -> None:
        self.published.append((ref, audience_id))
        self.ids[ref] = audience_id

    async def wait_for_holder(self, ref: AudienceRef, timeout_s: float) -> str | None:
        return self.ids.get(ref)

    def created_at(self, audience_id: str) -> float | None:
        return None


class RevokingApi(CustomerFilesApi):
    """The real API; `after_upload` runs once, right after the first file upload TikTok accepted."""

    after_upload: Callable[[], None] | None = None

    async def upload(self, advertiser_id: str, file: IdentifierFile) -> UploadedFile:
        uploaded = await super().upload(advertiser_id, file)
        hook, self.after_upload = self.after_upload, None
        if hook is not None:
            hook()
        return uploaded


# -- fixtures --------------------------------------------------------------------------------------------------


@pytest.fixture
def sb() -> Iterator[SandboxThread]:
    with SandboxThread(
        host="127.0.0.1", port=0, advertisers=[ADV], audiences=[(ADV, STREAM_AUDIENCE)], tokens=[TOKEN]
    ) as s:
        yield s


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


class Files:
    """`FileUploads` on the sandbox, its dispatcher running, with a creator on an in-process store."""

    def __init__(
        self,
        sb: SandboxThread,
        session: aiohttp.ClientSession,
        *,
        budget_s: float = 0.3,
        gate_retry_s: float = 0.05,
        control: ControlLimiter | None = None,
    ) -> None:
        loop = asyncio.get_running_loop()
        self.sb = sb
        self.token = TOKEN
        self.client = TikTokClient(session, sb.url, lambda: self.token, timeout_s=5, control=control)
        self.api = RevokingApi(self.client, upload_timeout_s=5)
        self.outcomes = Outcomes()
        self.batcher = Batches(interval_s=60.0, max_rows=100_000, clock=loop.time)
        self.gate_log: list[str | None] = []
        self.gate = UploadGate(gate_retry_s, on_change=lambda: self.gate_log.append(self.gate.reason))
        self.store = FakeStore()
        self.creator = AudienceCreator(
            cast(AudienceStore, self.store),
            AudiencesApi(self.client),
            Backoff(0.01, 0.05, 2.0, random.Random(3)),
            auth_retry_s=0.05,
            clock=loop.time,
        )
        self.uploads = FileUploads(
            batcher=self.batcher,
            api=self.api,
            outcomes=self.outcomes,
            gate=self.gate,
            backoff=Backoff(0.01, 0.05, budget_s, random.Random(7)),
            bucket=TokenBucket(1000.0, clock=loop.time),
            creator=self.creator,
            pressure=lambda: False,
            clock=loop.time,
        )
        self.uploads.force = 1  # every buffer is cut as soon as the dispatcher looks (creates: once 1,000 users)
        self._offsets: collections.Counter[TopicPartition] = collections.Counter()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Files:
        self._task = asyncio.create_task(self.uploads.run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.uploads.close()
        self.gate.close_all()

    # -- records -------------------------------------------------------------------------------------------

    def add(
        self,
        user: str,
        action: Action,
        tp: TopicPartition = TP0,
        *,
        audience_id: str | None = None,
        name: str | None = None,
    ) -> FileRow:
        offset = self._offsets[tp]
        self._offsets[tp] += 1
        ref = RecordRef(tp.topic, tp.partition, offset)
        change = FileChange(ADV, KEY, audience_id, name, CONTRACT, action, ((ID_TYPE, sha(user)),))
        return self.batcher.add(ref, change, ref)

    def add_all(self, names: Iterable[str], action: Action, tp: TopicPartition = TP0, **kw: Any) -> list[FileRow]:
        return [self.add(u, action, tp, **kw) for u in names]

    async def batch(self, timeout_s: float = WAIT_S) -> None:
        """Wake the dispatcher and wait until one more batch reached its outcome."""
        before = len(self.batcher.done_calls)
        self.uploads.wake()
        ended = await until(lambda: len(self.batcher.done_calls) > before, timeout_s)
        assert ended, f"no batch ended; buffers waiting for 1,000 users: {self.batcher.waiting_for_users()}"

    # -- the sandbox ---------------------------------------------------------------------------------------

    async def audience(self, name: str, members: Iterable[str]) -> str:
        """A customer-file audience created earlier (through the same API), holding `members`."""
        files = files_from_hashes(hashes(members), CONTRACT, stem="setup")
        paths = [(await self.api.upload(ADV, f)).file_path for f in files]
        return await self.api.create(ADV, name, CONTRACT, paths)

    def members(self, audience_id: str) -> set[str]:
        return set(self.sb.state.members(audience_id).get(CONTRACT, []))

    def updates(self, audience_id: str) -> list[tuple[str, int]]:
        """(action, size after) of every create / update the sandbox applied to the audience."""
        got = self.sb.state.customer_files()["updates"]
        assert isinstance(got, list)
        return [(u["action"], u["size_after"]) for u in got if u["audience_id"] == audience_id]

    def update_codes(self) -> list[int | None]:
        return [cast(int | None, r["code"]) for r in self.sb.state.requests(UPDATE)]


def refs(rows: Iterable[FileRow]) -> list[RecordRef]:
    return sorted(r.ref for r in rows)


def assert_no_identifier(text: str, names: Iterable[str]) -> None:
    for u in names:
        assert email(u) not in text and sha(u) not in text, "a dead letter's error carries an identifier"


# -- 1. APPEND and REMOVE of one netted batch ------------------------------------------------------------------


async def test_append_and_remove_of_one_netted_batch(sb: SandboxThread, session: aiohttp.ClientSession) -> None:
    async with Files(sb, session) as f:
        existing = users("old", 1200)
        aid = await f.audience("VIPs", existing)
        uploads_before = metric("audience_sync_file_uploads_total", outcome="uploaded")
        appended_before = metric("audience_sync_file_updates_total", action="APPEND", outcome="accepted")
        removed_before = metric("audience_sync_file_updates_total", action="REMOVE", outcome="accepted")

        new, leaving, flip = users("new", 10), existing[:5], users("flip", 3)
        rows = f.add_all(new, Action.ADD, TP0, audience_id=aid)
        rows += f.add_all(leaving, Action.DELETE, TP1, audience_id=aid)
        for u in flip:  # enter then exit in one batch: nets to REMOVE, never to "nothing"
            rows += [f.add(u, Action.ADD, TP0, audience_id=aid), f.add(u, Action.DELETE, TP0, audience_id=aid)]
        await f.batch()

        assert f.members(aid) == hashes(existing[5:]) | hashes(new)
        assert len(f.members(aid)) == 1200 + 10 - 5
        assert f.updates(aid) == [("CREATE", 1200), ("APPEND", 1210), ("REMOVE", 1205)]
        assert f.outcomes.finished_refs() == refs(rows) and len(f.outcomes.finished) == len(rows) == 21
        assert not f.outcomes.letters
        assert metric("audience_sync_file_uploads_total", outcome="uploaded") - uploads_before == 2
        assert metric("audience_sync_file_updates_total", action="APPEND", outcome="accepted") - appended_before == 1
        assert metric("audience_sync_file_updates_total", action="REMOVE", outcome="accepted") - removed_before == 1
        await asyncio.sleep(0.05)
        assert len(f.outcomes.finished) == 21, "a record was finished twice"
        assert f.batcher.pending_rows == 0 and f.batcher.pending_users == 0


# -- 2. the 1,000-user rule ------------------------------------------------------------------------------------


async def test_a_remove_leaving_fewer_than_1000_users_dead_letters_only_its_records(
    sb: SandboxThread, session: aiohttp.ClientSession
) -> None:
    async with Files(sb, session) as f:
        existing = users("old", 1000)
        aid = await f.audience("Exactly 1000", existing)
        refused_before = metric("audience_sync_file_updates_total", action="REMOVE", outcome="refused")

        joining = users("new", 3)
        appends = f.add_all(joining, Action.ADD, TP1, audience_id=aid)
        removes = f.add_all(existing[:5], Action.DELETE, TP0, audience_id=aid)
        flips = [f.add("flip0", Action.ADD, TP0, audience_id=aid), f.add("flip0", Action.DELETE, TP0, audience_id=aid)]
        await f.batch()

        # APPEND went first (1,003 users), then REMOVE of 6 would leave 997: refused, nothing removed.
        assert f.members(aid) == hashes(existing) | hashes(joining)
        assert f.updates(aid) == [("CREATE", 1000), ("APPEND", 1003)]
        assert f.update_codes() == [0, 40002]
        assert f.outcomes.finished_refs() == refs(appends)
        assert f.outcomes.lettered_refs() == refs(removes + flips)
        for _, letter in f.outcomes.letters:
            assert letter.reason is DlqReason.TIKTOK_REJECTED
            assert letter.tiktok_code == 40002 and letter.tiktok_request_id
            assert "1,000 users" in letter.error and "REMOVE" in letter.error, letter.error
            assert_no_identifier(letter.error, [*existing, *joining, "flip0"])
        assert metric("audience_sync_file_updates_total", action="REMOVE", outcome="refused") - refused_before == 1


# -- 3. retryable failures -------------------------------------------------------------------------------------


async def test_a_transient_update_failure_is_retried_then_accepted(
    sb: SandboxThread, session: aiohttp.ClientSession
) -> None:
    async with Files(sb, session) as f:
        existing = users("old", 1100)
        aid = await f.audience("Transient", existing)
        retried_before = metric("audience_sync_file_updates_total", action="APPEND", outcome="retried")
        sb.set_faults({"rules": [{"kind": "code", "code": 51003, "path": UPDATE, "count": 1}]})

        rows = f.add_all(users("new", 4), Action.ADD, TP0, audience_id=aid)
        rows += f.add_all(existing[:2], Action.DELETE, TP1, audience_id=aid)
        await f.batch()

        assert f.update_codes() == [51003, 0, 0]  # APPEND refused once, then APPEND and REMOVE accepted
        assert f.members(aid) == hashes(existing[2:]) | hashes(users("new", 4))
        assert f.outcomes.finished_refs() == refs(rows)
        assert not f.outcomes.letters
        assert metric("audience_sync_file_updates_total", action="APPEND", outcome="retried") - retried_before == 1


async def test_a_failure_past_the_retry_budget_dead_letters_retries_exhausted(
    sb: SandboxThread, session: aiohttp.ClientSession
) -> None:
    async with Files(sb, session, budget_s=0.3) as f:
        existing = users("old", 1100)
        aid = await f.audience("Persistent", existing)
        sb.set_faults({"rules": [{"kind": "code", "code": 51003, "path": UPDATE}]})

        rows = f.add_all(users("new", 4), Action.ADD, TP0, audience_id=aid)
        rows += f.add_all(existing[:2], Action.DELETE, TP1, audience_id=aid)
        loop = asyncio.get_running_loop()
        started = loop.time()
        await f.batch()

        assert loop.time() - started < 2.0, "the retry budget bounds the batch"
        codes = f.update_codes()
        assert len(codes) >= 2 and set(codes) == {51003}, codes
        assert f.members(aid) == hashes(existing)
        assert not f.outcomes.finished
        assert f.outcomes.lettered_refs() == refs(rows)
        for _, letter in f.outcomes.letters:
            assert letter.reason is DlqReason.RETRIES_EXHAUSTED, letter
            assert "retry budget" in letter.error and letter.tiktok_code == 51003
            assert_no_identifier(letter.error, [*existing[:2], *users("new", 4)])


# -- 4. auth outage --------------------------------------------------------------------------------------------


async def test_an_auth_outage_closes_the_gate_without_spending_the_retry_budget(
    sb: SandboxThread, session: aiohttp.ClientSession
) -> None:
    async with Files(sb, session, budget_s=0.2, gate_retry_s=0.05) as f:
        existing = users("old", 1100)
        aid = await f.audience("Auth", existing)
        f.token = "revoked-token"  # TikTok answers 40105 to everything until the token is fixed

        rows = f.add_all(users("new", 3), Action.ADD, TP0, audience_id=aid)
        rows += f.add_all(existing[:2], Action.DELETE, TP1, audience_id=aid)
        f.uploads.wake()
        assert await until(lambda: f.gate.reason == "auth"), "the gate did not close"
        await asyncio.sleep(0.5)  # longer than the retry budget: an outage must not spend it
        assert sb.state.rejected_counts[40105] >= 2, "the gate probes while closed"
        assert not f.gate.is_open and not f.outcomes.letters and not f.outcomes.finished
        assert f.updates(aid) == [("CREATE", 1100)]

        f.token = TOKEN
        await f.batch()
        assert f.gate.is_open
        assert f.gate_log[0] == "auth" and f.gate_log[-1] is None
        assert f.members(aid) == hashes(existing[2:]) | hashes(users("new", 3))
        assert f.outcomes.finished_refs() == refs(rows)
        assert not f.outcomes.letters


# -- 5. the revocation fence -----------------------------------------------------------------------------------


async def test_records_revoked_after_the_cut_never_reach_an_update(
    sb: SandboxThread, session: aiohttp.ClientSession
) -> None:
    async with Files(sb, session) as f:
        existing = users("old", 1200)
        aid = await f.audience("Fence", existing)

        live = f.add_all(users("a", 5), Action.ADD, TP0, audience_id=aid)
        live += f.add_all(existing[:3], Action.DELETE, TP0, audience_id=aid)
        live.append(f.add("both", Action.ADD, TP0, audience_id=aid))
        revoked = f.add_all(users("b", 4), Action.ADD, TP1, audience_id=aid)
        revoked += f.add_all(existing[3:5], Action.DELETE, TP1, audience_id=aid)
        # "both": entered on P0, then exited on P1: nets to REMOVE, which only the revoked record asked for.
        revoked.append(f.add("both", Action.DELETE, TP1, audience_id=aid))

        # Revoked after the batch was cut and its first file uploaded, before the update request.
        f.api.after_upload = lambda: f.outcomes.live.discard(TP1)
        await f.batch()

        assert f.members(aid) == (hashes(existing) - hashes(existing[:3])) | hashes([*users("a", 5), "both"])
        # Every update sent carries only users of live records.
        live_users = hashes([*users("a", 5), *existing[:3], "both"])
        got = sb.state.customer_files()["updates"]
        assert isinstance(got, list)
        sent = [u for u in got if u["audience_id"] == aid and u["action"] != "CREATE"]
        assert [u["action"] for u in sent] == ["APPEND", "REMOVE"]
        for u in sent:
            ids = {h for p in u["file_paths"] for h in sb.state.file_identifiers(p)}
            assert ids <= live_users, "an update carries a user of a revoked record"
        # The fence fired: the APPEND file uploaded before the revoke (with the revoked users) was never used,
        # and the files were rebuilt from the live records.
        files = sb.state.customer_files()["files"]
        assert isinstance(files, list)
        stale, *rebuilt = [fl["file_path"] for fl in files][-3:]
        assert set(sb.state.file_identifiers(stale)) == hashes([*users("a", 5), *users("b", 4)])
        assert {p for u in sent for p in u["file_paths"]} == set(rebuilt)
        assert f.outcomes.finished_refs() == refs(live)
        assert not f.outcomes.letters
        await asyncio.sleep(0.05)
        assert not set(refs(revoked)) & set(f.outcomes.finished_refs())


# -- 6. create on demand ---------------------------------------------------------------------------------------


async def test_an_audience_is_created_on_demand_then_updated(sb: SandboxThread, session: aiohttp.ClientSession) -> None:
    async with Files(sb, session) as f:
        created_before = metric("audience_sync_file_updates_total", action="CREATE", outcome="accepted")
        joining = users("new", 1005)
        few = f.add_all(joining[:500], Action.ADD, TP0, name=NAME)
        await asyncio.sleep(0.05)
        f.uploads.wake()
        await asyncio.sleep(0.05)
        assert not f.batcher.done_calls and f.batcher.waiting_for_users() == [((ADV, KEY, CONTRACT), 500)]
        rows = few + f.add_all(joining[500:], Action.ADD, TP1, name=NAME)
        rows += f.add_all(users("gone", 2), Action.DELETE, TP0, name=NAME)
        rows += [f.add("flip", Action.ADD, TP1, name=NAME), f.add("flip", Action.DELETE, TP1, name=NAME)]
        await f.batch()

        [aid] = [a for a, au in sb.state.audiences.items() if au.name == NAME]
        assert sb.state.audiences[aid].audience_type == "Customer File Audience"
        assert f.members(aid) == hashes(joining), "the new audience holds exactly the APPEND users"
        assert f.updates(aid) == [("CREATE", 1005)]
        assert f.store.ids == {(ADV, NAME): aid} and f.store.published == [((ADV, NAME), aid)]
        assert f.batcher.done_calls[-1] == ((ADV, KEY, CONTRACT), aid)
        assert f.outcomes.finished_refs() == refs(rows) and not f.outcomes.letters
        assert metric("audience_sync_file_updates_total", action="CREATE", outcome="accepted") - created_before == 1

        # The next records of the entry still carry no id (the mappings entry has none): the batch goes to the
        # created audience as an APPEND, without a second create and without waiting for 1,000 new users.
        later = f.add_all(users("later", 5), Action.ADD, TP0, name=NAME)
        await f.batch()
        assert f.updates(aid) == [("CREATE", 1005), ("APPEND", 1010)]
        assert f.members(aid) == hashes(joining) | hashes(users("later", 5))
        assert [a for a, au in sb.state.audiences.items() if au.name == NAME] == [aid]
        assert f.outcomes.finished_refs() == refs(rows + later) and not f.outcomes.letters


async def test_an_unrecorded_audience_of_the_same_name_is_reused(
    sb: SandboxThread, session: aiohttp.ClientSession
) -> None:
    async with Files(sb, session) as f:
        existing = users("old", 1100)
        aid = await f.audience(NAME, existing)  # created by a run that crashed before recording it
        assert f.store.ids == {}

        joining = users("new", 1000)
        rows = f.add_all(joining, Action.ADD, TP0, name=NAME)
        rows += f.add_all(existing[:4], Action.DELETE, TP1, name=NAME)
        await f.batch()

        assert [a for a, au in sb.state.audiences.items() if au.name == NAME] == [aid], "a duplicate was created"
        assert f.store.ids == {(ADV, NAME): aid}
        assert f.updates(aid) == [("CREATE", 1100), ("APPEND", 2100), ("REMOVE", 2096)]
        assert f.members(aid) == hashes(existing[4:]) | hashes(joining)
        assert f.outcomes.finished_refs() == refs(rows) and not f.outcomes.letters


class RevokeOnTurn:
    """A control limiter that revokes partitions while a chosen control-plane turn waits (a slow limiter and a
    rebalance coinciding): the fence must come after the wait, not before it."""

    def __init__(self, on_turn: int, revoke: Callable[[], None]) -> None:
        self.on_turn, self.revoke, self.turns = on_turn, revoke, 0

    async def turn(self) -> None:
        self.turns += 1
        if self.turns == self.on_turn:
            self.revoke()
        await asyncio.sleep(0)


async def test_records_revoked_while_the_create_waits_for_its_turn_are_not_in_the_new_audience(
    sb: SandboxThread, session: aiohttp.ClientSession
) -> None:
    # Turn 1 is the list that looks for an unrecorded audience, turn 2 the create's own.
    holder: list[Files] = []
    limiter = RevokeOnTurn(2, lambda: holder[0].outcomes.live.discard(TP1))
    async with Files(sb, session, control=cast(ControlLimiter, limiter)) as f:
        holder.append(f)
        kept = f.add_all(users("kept", 1005), Action.ADD, TP0, name=NAME)
        revoked = f.add_all(users("revoked", 10), Action.ADD, TP1, name=NAME)
        await f.batch()

        [aid] = [a for a, au in sb.state.audiences.items() if au.name == NAME]
        assert f.members(aid) == hashes(users("kept", 1005)), "a revoked record's user reached the new audience"
        assert f.outcomes.finished_refs() == refs(kept) and not f.outcomes.letters
        assert not set(refs(revoked)) & set(f.outcomes.finished_refs())


# -- 7. the whole pipeline on the in-memory broker -------------------------------------------------------------


def file_mappings(audience_id: str) -> Mappings:
    return parse_mappings(
        {
            "audiences": {
                "streamed": {"advertiser_id": ADV, "audience_id": STREAM_AUDIENCE},
                KEY: {"advertiser_id": ADV, "audience_id": audience_id, "mode": "file", "id_types": ["EMAIL_SHA256"]},
            }
        },
        "test-mappings.yaml",
    )


async def test_pipeline_commits_file_records_only_after_the_sandbox_applied_them(
    sb: SandboxThread, session: aiohttp.ClientSession
) -> None:
    loop = asyncio.get_running_loop()
    client = TikTokClient(session, sb.url, lambda: TOKEN, timeout_s=5)
    api = CustomerFilesApi(client, upload_timeout_s=5)
    existing = users("old", 1200)
    paths = [(await api.upload(ADV, fl)).file_path for fl in files_from_hashes(hashes(existing), CONTRACT)]
    aid = await api.create(ADV, NAME, CONTRACT, paths)

    broker = InMemoryBroker(clock=lambda: 1_764_500_000.0)
    broker.create_topics({SRC: PARTITIONS, DLQ: 1})
    seq = itertools.count(1)
    first_file: dict[TopicPartition, int] = {}
    expected = {u: True for u in existing}

    def produce(user: str, key: str, entered: bool, partition: int) -> None:
        ref = broker.produce(SRC, event(user, key, entered, next(seq)), user.encode(), partition=partition)
        if key == KEY:
            first_file.setdefault(ref.tp, ref.offset)
            expected[user] = entered

    streamed = users("s", 6)
    for i, u in enumerate(streamed):  # streaming records ahead of the file records in every partition
        produce(u, "streamed", True, i % PARTITIONS)
    script: list[tuple[str, bool]] = [(u, True) for u in users("new", 10)]
    script += [(u, False) for u in existing[:5]]
    script += [(u, e) for u in users("flip", 3) for e in (True, False)]  # enter, then exit: absent
    script += [(existing[5], False), (existing[5], True)]  # exit, then enter again: still a member
    script += [("new0", True)]  # a repeat
    placed: dict[str, int] = {}
    for u, entered in script:  # a user's records stay in one partition, in order
        part = placed.setdefault(u, len(placed) % PARTITIONS)
        produce(u, KEY, entered, part)
    for u in users("t", 3):  # and streaming records behind them
        produce(u, "streamed", True, 0)

    sb.set_faults({"rules": [{"kind": "slow", "delay_s": 1.5, "path": UPDATE, "count": 1}]})
    pipeline = Pipeline(
        resolver=Resolver(ResolverSettings(), file_mappings(aid), SchemaStore()),
        batcher=Batcher(max_rows=50, linger_s=0.005, clock=loop.time),
        uploader=client,
        dlq=_Dlq(broker),
        dlq_topic=DLQ,
        backoff=Backoff(0.01, 0.05, 2.0, random.Random(7)),
        options=PipelineOptions(
            max_inflight=2,
            max_pending=1000,
            consume_batch=100,
            consume_timeout_s=0.002,
            drain_timeout_s=1.0,
            auth_retry_s=0.05,
            max_qps=100_000,
        ),
        files_api=api,
        file_batcher=FileBatcher(interval_s=0.05, max_rows=100_000, clock=loop.time),
        clock=loop.time,
    )
    consumer = InMemoryConsumer(
        broker,
        GROUP,
        [SRC],
        on_assign=pipeline.on_assign,
        on_revoke=pipeline.on_revoke,
        on_lost=pipeline.on_lost,
        sleep=asyncio.sleep,
        clock=loop.time,
        auto_commit_interval_s=0.005,
    )
    stop = asyncio.Event()
    task = asyncio.create_task(pipeline.run(consumer, stop))
    tps = broker.partitions(SRC)

    def committed(tp: TopicPartition) -> int:
        return broker.committed(GROUP, tp) or 0

    def applied() -> int:
        return sum(1 for a, _ in _updates(sb, aid) if a in ("APPEND", "REMOVE"))

    try:
        # The update is parked at the sandbox for 1.5 s: TikTok has not accepted it yet.
        assert await until(lambda: sb.state.open_requests[UPDATE] > 0), "no update reached the sandbox"
        assert await until(lambda: all(committed(tp) == first_file[tp] for tp in tps), 1.0), (
            "the streaming records ahead of the file records were not committed",
            {tp.partition: (committed(tp), first_file[tp]) for tp in tps},
        )
        assert applied() == 0 and _members(sb, aid) == hashes(existing)
        # The streaming records behind the file records are uploaded, yet not committed: the file records hold
        # their partition's offset.
        everyone = hashes([*streamed, *users("t", 3)])
        assert await until(lambda: set(sb.state.members(STREAM_AUDIENCE).get("EMAIL_SHA256", [])) == everyone, 1.0)
        assert all(committed(tp) == first_file[tp] for tp in tps) and sb.state.open_requests[UPDATE] == 1

        # No offset passes a file record before the sandbox applied its update; then every offset reaches the end.
        def done() -> bool:
            for tp in tps:
                assert committed(tp) <= first_file[tp] or applied() > 0, "committed before TikTok accepted"
            return all(committed(tp) == broker.end_offset(tp) for tp in tps)

        assert await until(done), {tp.partition: (committed(tp), broker.end_offset(tp)) for tp in tps}
        assert task.done() is False
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)

    assert _members(sb, aid) == {sha(u) for u, member in expected.items() if member}
    assert hashes(users("flip", 3)).isdisjoint(_members(sb, aid)) and sha(existing[5]) in _members(sb, aid)
    assert len(_members(sb, aid)) == 1200 + 10 - 5
    assert broker.records(TopicPartition(DLQ, 0)) == []


def _updates(sb: SandboxThread, audience_id: str) -> list[tuple[str, int]]:
    got = sb.state.customer_files()["updates"]
    assert isinstance(got, list)
    return [(u["action"], u["size_after"]) for u in got if u["audience_id"] == audience_id]


def _members(sb: SandboxThread, audience_id: str) -> set[str]:
    return set(sb.state.members(audience_id).get(CONTRACT, []))


class _Dlq:
    """The dead-letter producer, writing into the in-memory broker."""

    max_message_bytes = 1_000_000

    def __init__(self, broker: InMemoryBroker) -> None:
        self.broker = broker

    async def send(
        self, topic: str, *, key: bytes | None, value: bytes | None, headers: Any = None, timestamp_ms: Any = None
    ) -> None:
        await asyncio.sleep(0)
        self.broker.produce(topic, value, key, partition=0, headers=headers, timestamp_ms=timestamp_ms)
