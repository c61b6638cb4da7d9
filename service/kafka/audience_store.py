"""Created TikTok audience ids, shared by every replica through a compacted Kafka topic (no new database).

The topic has one partition, so its log is a total order every replica reads the same way. To create an
audience a replica appends a *claim* and reads the log up to it: the earliest live claim for that
(advertiser, name) wins. Only the winner calls TikTok, then appends the *result*; the others wait for it.
A claim that produced no result within `claim_ttl_s` (its owner died) expires and the next claim wins; the new
winner first looks for an audience of that name at TikTok, so a crash between "created" and "recorded" does not
create a duplicate. Compaction keeps the latest record per key, which is the result once there is one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Producer
from confluent_kafka import TopicPartition as KTP
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

log = logging.getLogger(__name__)

AudienceRef = tuple[str, str]  # advertiser id, audience name (as configured, before TikTok's truncation)


@dataclass(slots=True)
class _Entry:
    claims: list[tuple[int, str, float]] = field(default_factory=list)  # (offset, replica, wall time)
    audience_id: str | None = None
    created_at: float = 0.0


def record_key(ref: AudienceRef) -> bytes:
    return f"{ref[0]}\x1f{ref[1]}".encode()


class AudienceStore:
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
                entry.claims.append((offset, str(doc.get("replica")), float(doc.get("at") or 0.0)))
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
                await asyncio.wait_for(self._changed.wait(), min(left, 0.5))

    async def claim(self, ref: AudienceRef) -> bool:
        """Append a claim and read up to it; True when this replica owns the creation."""
        mine = await self._append(ref, {"type": "claim", "replica": self.replica, "at": self._wall()})
        await self._read_past(mine, 30.0)
        now = self._wall()
        with self._lock:
            entry = self._entries.get(ref)
            if entry is None or entry.audience_id is not None:
                return False
            live = [c for c in entry.claims if c[0] == mine or now - c[2] < self.claim_ttl_s]
            return bool(live) and min(live)[0] == mine

    async def publish(self, ref: AudienceRef, audience_id: str) -> None:
        offset = await self._append(
            ref, {"type": "result", "audience_id": audience_id, "replica": self.replica, "created_at": self._wall()}
        )
        await self._read_past(offset, 30.0)

    async def wait_for(self, ref: AudienceRef, timeout_s: float) -> str | None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            got = self.ids.get(ref)
            if got is not None:
                return got
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(0.5, max(0.0, deadline - time.monotonic())))
        return self.ids.get(ref)


def _done(fut: asyncio.Future[int], offset: int) -> None:
    if not fut.done():
        fut.set_result(offset)


def _fail(fut: asyncio.Future[int], exc: Exception) -> None:
    if not fut.done():
        fut.set_exception(exc)
