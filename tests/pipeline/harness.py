"""In-process stand-ins for the pipeline's outside world: TikTok (membership per cell, scripted answers, the
revocation fence), its customer-file side (uploaded files, members per file audience, scripted answers, the same
fence), the dead-letter producer (into the in-memory broker) and audience creation on demand.

Shared by the model-based suite (test_model.py) and the defect scenarios (test_defects.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import orjson

from service.core.answers import Answer, Verdict, classify
from service.core.customer_files import FileAction, FileContract, IdentifierFile
from service.core.mappings import AudienceMapping, Mappings
from service.core.model import DlqReason
from service.core.offline import OfflineSettings
from service.core.types import TopicPartition
from service.kafka.memory import InMemoryBroker
from service.kafka.producer import DeliveryError
from service.pipeline.audience_creation import CreationFailed
from service.tiktok.audiences_api import TikTokApiError
from service.tiktok.customer_files_api import (
    FILE_AUDIENCE_UPDATE,
    FILE_UPLOAD,
    CustomerFilesApi,
    FileAudience,
    UploadedFile,
)

SRC, DLQ, GROUP, PARTITIONS = "src", "dlq", "g", 3
ADV_A, ADV_B = "7000000000000000001", "7000000000000000002"
# The model's users, two per partition (`partition_of`), so every partition's revoke or loss meets records.
USERS = ["u0", "u2", "u5", "u6", "u7", "u10"]
BAD_USER = "u5"  # refused by TikTok while the `refuse_user` rule is on
# audience key → (advertiser, audience id); "late" is mapped by a reload, "made" is created on demand.
MAPPED = {"a1": (ADV_A, "101"), "a2": (ADV_A, "102"), "b1": (ADV_B, "201")}
LATE = ("late", ADV_B, "202")
MADE = ("made", ADV_A, "301")
KEYS = [*MAPPED, LATE[0], MADE[0]]
MODES = ["ok", "5xx", "rate", "auth", "html", "timeout", "deleted_102", "refuse_user", "too_many", "permission_b"]
# The `mode: file` entry (`mappings(file=True)`): audience key, advertiser, audience id. Not in KEYS: only the
# model asks for it.
FILE = ("f1", ADV_A, "401")
# Answers of the customer-file side (`Files.mode`): "hang" keeps every call waiting until the mode changes (then
# answers as the new one), so revokes, losses and crashes land mid-upload; "lost" applies the update and answers a
# timeout; "gone" is TikTok having lost the uploaded files (40910: upload again); "upload_5xx" fails uploads only.
FILE_MODES = ["ok", "hang", "rate", "5xx", "lost", "gone", "auth", "refuse", "deleted", "permission", "upload_5xx"]
MAX_PENDING, CONSUME_BATCH = 30, 8
EVENT_SET = "7300000000000000001"  # the offline event set of the mappings


def email(user: str) -> str:
    return f"{user}@example.com"


def email_hash(user: str) -> str:
    return hashlib.sha256(email(user).encode()).hexdigest()


HASH_USER = {email_hash(u): u for u in USERS}


def partition_of(user: str) -> int:
    return zlib.crc32(user.encode()) % PARTITIONS


def event(user: str, key: str, entered: bool, seq: int) -> bytes:
    return orjson.dumps(
        {
            "type": "track",
            "event": "Audience Entered" if entered else "Audience Exited",
            "userId": user,
            "messageId": f"m{seq}",
            "timestamp": "2026-11-30T12:00:00.000Z",
            "context": {
                "personas": {"computation_class": "audience", "computation_key": key},
                "traits": {"email": email(user)},
            },
            "properties": {"audience_key": key, key: entered},
        }
    )


def offline_event(user: str, seq: int) -> bytes:
    """A canonical offline conversion of `user` (message id `o<seq>`), happened now (wall clock: the 28-day rule)."""
    return orjson.dumps(
        {
            "offline_event": True,
            "event": "CompletePayment",
            "event_time": int(time.time() * 1000),
            "message_id": f"o{seq}",
            "email": email(user),
            "currency": "USD",
            "value": 9.5,
        }
    )


def mappings(*, late: bool, offline: bool = False, file: bool = False) -> Mappings:
    """The audience keys of the harness; `offline` adds the default offline event set, `file` the `mode: file`
    entry `FILE` (one id type: EMAIL_SHA256)."""
    entries = {k: AudienceMapping(k, adv, aud) for k, (adv, aud) in MAPPED.items()}
    entries[MADE[0]] = AudienceMapping(MADE[0], MADE[1], None, "made audience", True)
    if late:
        entries[LATE[0]] = AudienceMapping(LATE[0], LATE[1], LATE[2])
    if file:
        entries[FILE[0]] = AudienceMapping(FILE[0], FILE[1], FILE[2], mode="file", id_types=("EMAIL_SHA256",))
    return Mappings(entries, offline=OfflineSettings(default_event_set_id=EVENT_SET) if offline else None)


class TikTok:
    """Membership per (audience id, hash); answers by `mode`; checks the revocation fence at each request."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.cells: dict[tuple[str, str], bool] = {}
        self.requests = 0
        self.fence_violations: list[str] = []
        self.assigned: Any = lambda: set()  # unused by the fence: kept for callers that read it
        # Partitions whose on_revoke/on_lost returned and that were not assigned again since: the fence.
        self.fenced: set[TopicPartition] = set()
        self.history: list[str] = []
        self.current: Any = None
        self.conversions: dict[str, int] = {}  # event_id → times accepted (TikTok de-duplicates them)

    async def post_event_track(self, body: bytes) -> Answer:
        """`/event/track/`: the same fence and answer modes as mappings (a refused user fails the request)."""
        self.requests += 1
        doc = orjson.loads(body)
        users = [HASH_USER[e["user"]["email"][0]] for e in doc["data"]]
        for user in users:
            tp = TopicPartition(SRC, partition_of(user))
            if tp in self.fenced:
                self.fence_violations.append(f"event/track with a user of revoked {tp}; history {self.history[-8:]}")
        mode = self.mode
        if mode == "refuse_user" and BAD_USER in users:
            answer = Answer(classify(200, 40002), 200, 40002, "invalid")
        elif mode in ("5xx", "rate", "auth", "html", "timeout"):
            answer = self._answer({}, [])
        else:
            answer = Answer(Verdict.SUCCESS, 200, 0, "OK", "req")
        await asyncio.sleep(0)
        if answer.verdict is Verdict.SUCCESS:
            for e in doc["data"]:
                self.conversions[e["event_id"]] = self.conversions.get(e["event_id"], 0) + 1
        return answer

    async def post_mapping(self, body: bytes) -> Answer:
        self.requests += 1
        doc = orjson.loads(body)
        cells = [(aud, c["id"]) for row in doc["batch_data"] for c in row if c for aud in c["audience_ids"]]
        for _, h in cells:
            tp = TopicPartition(SRC, partition_of(HASH_USER[h]))
            if tp in self.fenced:
                self.fence_violations.append(f"request with a user of revoked {tp}; history {self.history[-8:]}")
        answer = self._answer(doc, cells)
        await asyncio.sleep(0)
        if answer.verdict is Verdict.SUCCESS:
            for aud, h in cells:
                self.cells[(aud, h)] = doc["action"] == "add"
        return answer

    def hooks(self, p: Any) -> dict[str, Any]:
        """The pipeline's rebalance hooks, wrapped to keep `fenced` (what the pipeline has been told).

        Only the newest pipeline counts: a crashed one's hook finishing late says nothing about the new owner.
        """
        self.current = p
        self.fenced.clear()

        async def on_assign(tps: list[TopicPartition]) -> list[TopicPartition]:
            if self.current is p:
                self.fenced.difference_update(tps)
            self.history.append(f"assign {[t.partition for t in tps]} to {id(p):x}")
            paused: list[TopicPartition] = await p.on_assign(tps)
            return paused

        async def on_revoke(tps: list[TopicPartition]) -> dict[TopicPartition, int]:
            offsets: dict[TopicPartition, int] = await p.on_revoke(tps)
            if self.current is p:
                self.fenced.update(tps)
            self.history.append(f"revoked {[t.partition for t in tps]} from {id(p):x}")
            return offsets

        async def on_lost(tps: list[TopicPartition]) -> None:
            await p.on_lost(tps)
            if self.current is p:
                self.fenced.update(tps)
            self.history.append(f"lost {[t.partition for t in tps]} from {id(p):x}")

        return {"on_assign": on_assign, "on_revoke": on_revoke, "on_lost": on_lost}

    def _answer(self, doc: dict[str, Any], cells: list[tuple[str, str]]) -> Answer:
        mode = self.mode
        if mode == "5xx":
            return Answer(classify(503, None), 503, None, "unavailable")
        if mode == "rate":
            return Answer(classify(200, 40100), 200, 40100, "too frequent")
        if mode == "auth":
            return Answer(classify(200, 40105), 200, 40105, "token")
        if mode == "html":
            return Answer(classify(404, None), 404, None, "HTTP 404, body is not TikTok's envelope")
        if mode == "timeout":
            return Answer(Verdict.RETRY, None, None, "timeout: no answer in time")
        if mode == "deleted_102" and any(aud == "102" for aud, _ in cells):
            return Answer(classify(200, 40007), 200, 40007, "object does not exist")
        if mode == "refuse_user" and any(HASH_USER[h] == BAD_USER for _, h in cells):
            return Answer(classify(200, 40002), 200, 40002, "invalid")
        if mode == "too_many" and len(doc["batch_data"]) > 2:
            return Answer(classify(200, 40061), 200, 40061, "too many")
        if mode == "permission_b" and doc["advertiser_ids"] == [ADV_B]:
            return Answer(classify(200, 40001), 200, 40001, "no permission")
        return Answer(Verdict.SUCCESS, 200, 0, "OK", "req")


class Files:
    """TikTok's customer-file side (the `CustomerFilesApi` calls the pipeline makes): uploaded files by path,
    members per audience id, answers by `mode`. Each update checks the revocation fence of `tiktok` (an upload
    may still carry a revoked user: the pipeline fences the update, which is what changes membership).

    What a real TikTok would refuse as malformed is kept in `problems` (an assertion would be swallowed by the
    pipeline's catch-all, which dead-letters the batch), for the model to check.
    """

    def __init__(self, tiktok: TikTok) -> None:
        self.tiktok = tiktok
        self.mode = "ok"
        self.files: dict[str, tuple[str, FileContract, frozenset[str]]] = {}  # path → advertiser, contract, hashes
        self.members: dict[str, set[str]] = {}  # audience id → hashes
        self.uploads = 0
        self.inflight = 0  # requests started and not answered yet
        self.updates: dict[str, int] = {}  # outcome → count: "APPEND"/"REMOVE" accepted, or the mode refusing
        self.problems: list[str] = []

    def api(self) -> CustomerFilesApi:
        """This fake as the pipeline's `files_api` (it implements the calls the pipeline makes)."""
        return cast(CustomerFilesApi, self)

    def has(self, audience_id: str, user: str) -> bool:
        return email_hash(user) in self.members.get(audience_id, ())

    async def upload(self, advertiser_id: str, file: IdentifierFile) -> UploadedFile:
        self.tiktok.requests += 1
        await self._answer_time()
        if self.mode == "upload_5xx":
            raise TikTokApiError(FILE_UPLOAD, Answer(classify(503, None), 503, None, "unavailable"))
        lines = file.content.decode().splitlines()
        if hashlib.md5(file.content, usedforsecurity=False).hexdigest() != file.md5:
            self.problems.append(f"{file.name}: file_signature is not the MD5 of the content")
        if len(lines) != file.rows or len(set(lines)) != len(lines):
            self.problems.append(f"{file.name}: {len(lines)} lines ({len(set(lines))} distinct), rows={file.rows}")
        unknown = [h for h in lines if h not in HASH_USER]
        if unknown:
            self.problems.append(f"{file.name}: {len(unknown)} lines are no user's email hash: {unknown[:1]}")
        self.uploads += 1
        path = f"{advertiser_id}/{self.uploads}/{file.name}"
        self.files[path] = (advertiser_id, file.contract, frozenset(lines))
        return UploadedFile(path, file.contract, file.name, file.md5, file.rows)

    async def update(
        self,
        advertiser_id: str,
        audience_id: str,
        file_paths: Sequence[str],
        action: FileAction,
        *,
        paced: bool = True,
    ) -> None:
        self.tiktok.requests += 1
        hashes: set[str] = set()
        for path in file_paths:
            adv, contract, held = self.files.get(path, ("", "EMAIL_SHA256", frozenset()))
            if adv != advertiser_id or contract != "EMAIL_SHA256":
                self.problems.append(f"update of {audience_id} with {path}: not an EMAIL_SHA256 file of {adv}")
            hashes |= held
        if action not in (FileAction.APPEND, FileAction.REMOVE) or (advertiser_id, audience_id) != FILE[1:]:
            self.problems.append(f"update {action} of {advertiser_id}/{audience_id}")
        tiktok = self.tiktok
        for h in hashes:  # the fence: checked when the request starts, as for segment/mapping
            tp = TopicPartition(SRC, partition_of(HASH_USER.get(h, "")))
            if h in HASH_USER and tp in tiktok.fenced:
                tiktok.fence_violations.append(f"file {action} with a user of revoked {tp}; {tiktok.history[-8:]}")
        await self._answer_time()
        mode = self.mode
        if mode in ("ok", "upload_5xx", "lost"):
            members = self.members.setdefault(audience_id, set())
            if action is FileAction.APPEND:
                members |= hashes
            else:
                members -= hashes
        if mode in ("ok", "upload_5xx"):
            self.updates[action.value] = self.updates.get(action.value, 0) + 1
            return
        self.updates[mode] = self.updates.get(mode, 0) + 1
        raise TikTokApiError(FILE_AUDIENCE_UPDATE, _FILE_ANSWERS[mode])

    async def _answer_time(self) -> None:
        """A request is answered on the next loop turn, or when the mode stops being "hang"."""
        self.inflight += 1
        try:
            await asyncio.sleep(0)
            while self.mode == "hang":
                await asyncio.sleep(0.002)
        finally:
            self.inflight -= 1

    async def create(
        self,
        advertiser_id: str,
        name: str,
        contract: FileContract,
        file_paths: Sequence[str],
        *,
        retention_in_days: int | None = None,
    ) -> str:
        raise NotImplementedError("the harness's file audience has an audience_id: nothing is created")

    async def get(self, advertiser_id: str, audience_ids: Sequence[str]) -> list[FileAudience]:
        raise NotImplementedError("the harness's file audience has an audience_id: nothing is looked up")


_FILE_ANSWERS = {
    "rate": Answer(classify(200, 40100), 200, 40100, "too frequent"),
    "5xx": Answer(classify(500, 50000), 500, 50000, "internal error"),
    "lost": Answer(Verdict.RETRY, None, None, "timeout: no answer in time"),  # TikTok applied it nonetheless
    "gone": Answer(classify(200, 40910), 200, 40910, "file expired"),
    "auth": Answer(classify(200, 40105), 200, 40105, "token"),
    "refuse": Answer(classify(200, 40002), 200, 40002, "the audience would have fewer than 1,000 users"),
    "deleted": Answer(classify(200, 40007), 200, 40007, "object does not exist"),
    "permission": Answer(classify(200, 40001), 200, 40001, "no permission"),
}


class Dlq:
    """The dead-letter producer, writing into the in-memory broker; `down` refuses (retriable) until lifted."""

    max_message_bytes = 1_000_000

    def __init__(self, broker: InMemoryBroker) -> None:
        self.broker = broker
        self.down = False

    async def send(
        self, topic: str, *, key: bytes | None, value: bytes | None, headers: Any = None, timestamp_ms: Any = None
    ) -> None:
        await asyncio.sleep(0)
        if self.down:
            raise DeliveryError("broker down", retriable=True)
        self.broker.produce(topic, value, key, partition=0, headers=headers, timestamp_ms=timestamp_ms)


@dataclass
class FakeStore:
    created: dict[str, float] = field(default_factory=dict)
    ids: dict[tuple[str, str], str] = field(default_factory=dict)  # (advertiser, name) → id: read for file audiences

    def created_at(self, audience_id: str) -> float | None:
        return self.created.get(audience_id)

    async def ensure_started(self) -> None:
        """The audience store's start (reading its topic): nothing to read here."""


class Creator:
    """Audience creation that finishes when the test says: with the id, or with a failure."""

    def __init__(self) -> None:
        self.store = FakeStore()
        self.outcome: asyncio.Future[str | CreationFailed] | None = None
        self.calls = 0
        self.healthy = False  # at quiescence: every call succeeds at once

    async def ensure(self, ref: tuple[str, str]) -> str | CreationFailed:
        self.calls += 1
        if self.healthy:
            self.store.created[MADE[2]] = 0.0
            return MADE[2]
        if self.outcome is None or self.outcome.done():
            self.outcome = asyncio.get_running_loop().create_future()
        return await asyncio.shield(self.outcome)

    def finish(self, ok: bool) -> None:
        if self.outcome is not None and not self.outcome.done():
            if ok:
                self.store.created[MADE[2]] = 0.0
                self.outcome.set_result(MADE[2])
            else:
                self.outcome.set_result(CreationFailed(DlqReason.RETRIES_EXHAUSTED, "creating: gave up"))
