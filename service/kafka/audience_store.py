"""Created TikTok audience ids, shared by every replica through a compacted Kafka topic (no new database).

The topic has one partition, so its log is a total order every replica reads the same way. To create an
audience a replica appends a *claim* and reads the log up to it: the earliest live claim for that
(advertiser, name) wins and *holds* the creation for `claim_ttl_s`. Only the holder calls TikTok, then appends
the *result*; the others wait for it. Claims are judged by owner, not by offset alone: a later claim by the
holder itself (its retry after a 5xx) renews the hold instead of losing to its own earlier claim, and a claim by
another replica while the hold is live loses and keeps no place in line. A hold without a result after
`claim_ttl_s` (its owner died or gave up) lapses; the replicas waiting on it claim again and the first of those
claims wins. The new holder first looks for an audience of that name at TikTok, so a crash between "created" and
"recorded" does not create a duplicate. Compaction keeps the latest record per key, which is the result once
there is one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Producer
from confluent_kafka import TopicPartition as KTP
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

log = logging.getLogger(__name__)

AudienceRef = tuple[str, str]  # advertiser id, audience name (as configured, before TikTok's truncation)


@dataclass(frozen=True, slots=True)
class Claim:
    offset: int
    replica: str
    at: float  # the claiming replica's wall clock


@dataclass(frozen=True, slots=True)
class Hold:
    """The replica that may create the audience, until `until` (wall clock) unless it claims again."""

    replica: str
    offset: int  # the claim that won the hold
    until: float


def next_hold(hold: Hold | None, claim: Claim, ttl_s: float) -> Hold:
    """The claim rule, applied to each claim in log order (so every replica computes the same holder).

    A claim made when no hold is live (none yet, or the holder's last claim is `ttl_s` old) wins a new hold; a
    claim by the holder renews it, so a replica retrying its own creation never waits for itself; a claim by
    anyone else while the hold is live loses. Judging by the claim's own time, not the reader's, keeps the
    answer the same for every reader, whenever it reads.
    """
    if hold is None or claim.at >= hold.until:
        return Hold(claim.replica, claim.offset, claim.at + ttl_s)
    if claim.replica == hold.replica:
        return Hold(hold.replica, hold.offset, max(hold.until, claim.at + ttl_s))
    return hold


def holder(claims: Iterable[Claim], ttl_s: float) -> Hold | None:
    """The hold after `claims` (in log order): `next_hold` folded over them."""
    hold: Hold | None = None
    for claim in claims:
        hold = next_hold(hold, claim, ttl_s)
    return hold


@dataclass(slots=True)
class _Entry:
    hold: Hold | None = None  # `next_hold` folded over the claims read so far
    audience_id: str | None = None
    created_at: float = 0.0


def record_key(ref: AudienceRef) -> bytes:
    return f"{ref[0]}\x1f{ref[1]}".encode()


class AudienceStore:
    """The shared record of created audiences, and who may create a missing one.

    Invariant: every replica folds the same single-partition log with the same rule (`next_hold`), so for each
    (advertiser, name) they agree on one holder at a time; `claim` is True only for the holder of a live hold and
    `publish` records the id before anyone else uses it. Why: two replicas must never both call TikTok's create,
    and a replica that died while holding must only delay creation by `claim_ttl_s`, never block it.
    """

    def __init__(
        self,
        conf: dict[str, Any],
        topic: str,
        *,
        claim_ttl_s: float = 60.0,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._conf = conf
        self.topic = topic
        self.claim_ttl_s = claim_ttl_s
        self._wall = wall
        self.replica = uuid.uuid4().hex[:12]
        self._entries: dict[AudienceRef, _Entry] = {}
        self.ids: dict[AudienceRef, str] = {}  # read by the resolver on the loop thread
        self._next_offset = 0
        self._lock = threading.Lock()
        self._changed = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._stop = threading.Event()
        self._caught_up = threading.Event()
        self._thread: threading.Thread | None = None
        self._producer: Producer | None = None
        self._started = False
        self._starting = asyncio.Lock()

    # -- lifecycle ------------------------------------------------------------------------------------------

    async def ensure_started(self) -> None:
        """Started on first use: deployments without create-on-demand never touch the topic."""
        async with self._starting:
            if not self._started:
                await self.start()
                self._started = True

    async def start(self, timeout_s: float = 30.0) -> None:
        """Safe to call again after it failed: a second call waits for the same tail rather than start another."""
        if self._thread is None:
            await asyncio.to_thread(self._ensure_topic)
            self._producer = Producer({**self._conf, "enable.idempotence": True, "acks": "all", "linger.ms": 0})
            self._thread = threading.Thread(target=self._tail, name="audience-store", daemon=True)
            self._thread.start()
        if not await asyncio.to_thread(self._caught_up.wait, timeout_s):
            raise TimeoutError(f"could not read the audience store topic {self.topic} within {timeout_s}s")
        log.info("audience store %s: %d created audience(s) known", self.topic, len(self.ids))

    def _ensure_topic(self) -> None:
        admin = AdminClient(self._conf)
        if self.topic in admin.list_topics(timeout=10).topics:
            return
        futures = admin.create_topics(
            [NewTopic(self.topic, 1, -1, config={"cleanup.policy": "compact"})]  # -1: broker default RF
        )
        for fut in futures.values():
            try:
                fut.result(timeout=10)
            except KafkaException as exc:
                if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                    raise

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._producer is not None:
            self._producer.flush(5)
            self._producer = None  # librdkafka's threads go with it, rather than reconnect to a broker long gone

    # -- the tail (its own thread) --------------------------------------------------------------------------

    def _tail(self) -> None:
        consumer = Consumer(
            {
                **self._conf,
                "group.id": f"audience-store-{self.replica}",  # never commits: the log is re-read at start
                "enable.auto.commit": False,
                "enable.partition.eof": True,
            }
        )
        consumer.assign([KTP(self.topic, 0, OFFSET_BEGINNING)])
        try:
            while not self._stop.is_set():
                msg = consumer.poll(0.2)
                if msg is None:
                    continue
                err = msg.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        self._caught_up.set()
                    continue
                self._apply(msg.offset() or 0, msg.key(), msg.value())
        finally:
            consumer.close()

    def _apply(self, offset: int, key: Any, value: bytes | None) -> None:
        try:
            doc = orjson.loads(value or b"")
            ref: AudienceRef = (str(doc["advertiser_id"]), str(doc["name"]))
        except (orjson.JSONDecodeError, KeyError, TypeError):
            log.warning("audience store: unreadable record at offset %d ignored", offset)
            return
        with self._lock:
            entry = self._entries.setdefault(ref, _Entry())
            if doc.get("type") == "result" and isinstance(doc.get("audience_id"), str):
                entry.audience_id = doc["audience_id"]
                entry.created_at = float(doc.get("created_at") or 0.0)
                self.ids[ref] = entry.audience_id
            elif doc.get("type") == "claim":
                claim = Claim(offset, str(doc.get("replica")), float(doc.get("at") or 0.0))
                entry.hold = next_hold(entry.hold, claim, self.claim_ttl_s)
            self._next_offset = offset + 1
        self._loop.call_soon_threadsafe(self._changed.set)

    # -- the protocol ---------------------------------------------------------------------------------------

    def created_at(self, audience_id: str) -> float | None:
        with self._lock:
            for entry in self._entries.values():
                if entry.audience_id == audience_id:
                    return entry.created_at
        return None

    async def _append(self, ref: AudienceRef, doc: dict[str, Any]) -> int:
        assert self._producer is not None, "start() first"
        fut: asyncio.Future[int] = self._loop.create_future()
        loop = self._loop

        def delivered(err: KafkaError | None, msg: Any) -> None:
            if err is not None:
                loop.call_soon_threadsafe(_fail, fut, KafkaException(err))
            else:
                loop.call_soon_threadsafe(_done, fut, msg.offset())

        payload = {"advertiser_id": ref[0], "name": ref[1], **doc}
        self._producer.produce(self.topic, key=record_key(ref), value=orjson.dumps(payload), on_delivery=delivered)
        while not fut.done():
            self._producer.poll(0)
            await asyncio.sleep(0.005)
        return await fut

    async def _read_past(self, offset: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            with self._lock:
                if self._next_offset > offset:
                    return
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"audience store did not show offset {offset} within {timeout_s}s")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(left, 0.5)):  # not wait_for: see pipeline/uploads.py
                    await self._changed.wait()

    def _hold(self, ref: AudienceRef) -> tuple[str | None, Hold | None]:
        with self._lock:
            entry = self._entries.get(ref)
            return (entry.audience_id, entry.hold) if entry is not None else (None, None)

    async def claim(self, ref: AudienceRef) -> bool:
        """Append a claim and read up to it; True when this replica holds the creation (won or renewed)."""
        mine = await self._append(ref, {"type": "claim", "replica": self.replica, "at": self._wall()})
        await self._read_past(mine, 30.0)
        audience_id, hold = self._hold(ref)
        return audience_id is None and hold is not None and hold.replica == self.replica and self._wall() < hold.until

    async def publish(self, ref: AudienceRef, audience_id: str) -> None:
        offset = await self._append(
            ref, {"type": "result", "audience_id": audience_id, "replica": self.replica, "created_at": self._wall()}
        )
        await self._read_past(offset, 30.0)

    async def wait_for(self, ref: AudienceRef, timeout_s: float) -> str | None:
        """The id once recorded, or None after `timeout_s`."""
        return await self._wait(ref, timeout_s, until_released=False)

    async def wait_for_holder(self, ref: AudienceRef, timeout_s: float) -> str | None:
        """The id once the holder records it; None after `timeout_s` or as soon as no other replica holds a live
        claim (it died, or gave up): the caller claims again then, and the first claim after the lapse wins."""
        return await self._wait(ref, timeout_s, until_released=True)

    async def _wait(self, ref: AudienceRef, timeout_s: float, *, until_released: bool) -> str | None:
        deadline = time.monotonic() + timeout_s
        while True:
            self._changed.clear()  # before looking, so a record applied meanwhile wakes the wait below
            got = self.ids.get(ref)
            if got is not None:
                return got
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            if until_released:
                _, hold = self._hold(ref)
                now = self._wall()
                if hold is None or hold.replica == self.replica or now >= hold.until:
                    return None
                left = min(left, hold.until - now)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(0.5, left)):  # not wait_for: see pipeline/uploads.py
                    await self._changed.wait()


def _done(fut: asyncio.Future[int], offset: int) -> None:
    if not fut.done():
        fut.set_result(offset)


def _fail(fut: asyncio.Future[int], exc: Exception) -> None:
    if not fut.done():
        fut.set_exception(exc)
