"""An in-process Kafka for tests and simulations: `InMemoryBroker` plus `InMemoryConsumer`, a `SourceConsumer`.

Why: the pipeline's hard parts — rebalances in the middle of a batch, paused partitions, rewinds, crashes and
what gets committed — should be testable in milliseconds and deterministically, without a broker process or
timing luck. The in-memory consumer keeps the real consumer's contract (`service.kafka.source.SourceConsumer`,
tested against both in tests/kafka/test_source_contract.py) and adds driver controls a real broker cannot offer:
schedule a revoke, a lost partition or an assignment at the next `consume()`, crash a member.

Determinism: nothing here reads the wall clock except through an injected `clock`, nothing runs in a thread, and
`consume()` never waits on real time — it yields once to the event loop (`await asyncio.sleep(0)`), serves
rebalances, and returns what is ready, immediately. Only when nothing is ready *and* a `sleep` function was
injected does it await `sleep(timeout_s)` once (e.g. `ManualClock.sleep`, which advances fake time), then look
again. Partitions are served round-robin in a fixed order, so the same inputs always give the same batches.

Invariants (the contract, for one group member):

- Assignment changes happen only inside `consume()` (as librdkafka fires rebalance callbacks inside poll): lost
  partitions first (`on_lost`, nothing committed), then revoked ones (`on_revoke` while still assigned; the
  offsets it returns are committed), then new ones (`on_assign` before any of their records; the partitions it
  returns are paused before the first fetch).
- A partition is owned by at most one member of a group at a time: a partition moving between members is
  first revoked by its old owner (at the old owner's next `consume()`), then assigned to the new one.
- A partition's records are delivered in offset order, each exactly once per assignment, unless `seek()` moves
  the position. A newly assigned partition starts at the group's committed offset, else at the beginning
  (`auto_offset_reset="earliest"`, the service's setting) or the end ("latest").
- Paused partitions deliver nothing (not even partition EOF); `resume()` continues from the same position.
  Pause state, stored offsets and positions belong to an assignment: they are dropped when it ends.
- Committed offsets change only through a commit: `commit()`, the revoke hook's answer, auto-commit when enabled
  (`auto_commit_interval_s`), or `InMemoryBroker.commit`. Consuming, seeking, pausing and crashing never move
  them, and a commit takes exactly the offset given, so they move backwards only when a commit says so.
- `store()` ignores partitions not assigned (librdkafka refuses them); `seek()` on one raises `KafkaException`
  with librdkafka's code: `_STATE` for a partition of a subscribed topic, `_UNKNOWN_PARTITION` otherwise.
- `crash()` is `kill -9`: the member leaves at once, with no hook, no commit; stored offsets are lost and the
  next owner starts from the committed offsets, so records not committed are delivered again.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import zlib
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, TypeVar

from confluent_kafka import (
    OFFSET_BEGINNING,
    OFFSET_END,
    OFFSET_STORED,
    TIMESTAMP_CREATE_TIME,
    TIMESTAMP_NOT_AVAILABLE,
    KafkaError,
    KafkaException,
)

from service.core.types import Headers, RecordRef, TopicPartition
from service.kafka.source import AssignHook, LostHook, RevokeHook, SourceConsumer, SourceHeaders, SourceMessage

__all__ = ["InMemoryBroker", "InMemoryConsumer", "InMemoryMessage", "ManualClock", "StoredRecord"]

log = logging.getLogger(__name__)

T = TypeVar("T")
Header = tuple[str, bytes | None]  # one entry of `Headers`
OffsetReset = Literal["earliest", "latest"]


class ManualClock:
    """Fake time for deterministic runs: `clock()` reads it, `advance()` and `sleep()` move it.

    Pass the instance where a `clock: Callable[[], float]` is wanted and its `sleep` where an async sleep is
    (e.g. `InMemoryConsumer(sleep=clock.sleep)`): waiting then costs no real time, and yields to the loop once.
    """

    def __init__(self, start: float = 0.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("time does not go backwards")
        self.now += seconds

    async def sleep(self, seconds: float) -> None:
        self.advance(max(seconds, 0.0))
        await asyncio.sleep(0)


@dataclass(frozen=True, slots=True)
class StoredRecord:
    """One record in a partition's log."""

    key: bytes | None
    value: bytes | None
    headers: tuple[Header, ...] | None
    timestamp_ms: int
    timestamp_type: int = TIMESTAMP_CREATE_TIME


class InMemoryMessage:
    """A consumed event, shaped like `confluent_kafka.Message` (implements `SourceMessage`).

    A record has `error()` None; a partition-EOF event carries a real `KafkaError(_PARTITION_EOF)` so code that
    compares `err.code()` against confluent's constants works unchanged. `headers()` returns a fresh list on each
    call, as confluent does.
    """

    __slots__ = ("_error", "_headers", "_key", "_offset", "_partition", "_timestamp", "_topic", "_value")

    def __init__(
        self,
        topic: str,
        partition: int,
        offset: int,
        key: bytes | None = None,
        value: bytes | None = None,
        headers: Iterable[Header] | None = None,
        timestamp: tuple[int, int] = (TIMESTAMP_NOT_AVAILABLE, -1),
        error: KafkaError | None = None,
    ) -> None:
        self._topic = topic
        self._partition = partition
        self._offset = offset
        self._key = key
        self._value = value
        self._headers = tuple(headers) if headers is not None else None
        self._timestamp = timestamp
        self._error = error

    @classmethod
    def of(cls, tp: TopicPartition, offset: int, rec: StoredRecord) -> InMemoryMessage:
        return cls(
            tp.topic, tp.partition, offset, rec.key, rec.value, rec.headers, (rec.timestamp_type, rec.timestamp_ms)
        )

    def topic(self) -> str:
        return self._topic

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset

    def key(self) -> bytes | None:
        return self._key

    def value(self) -> bytes | None:
        return self._value

    def headers(self) -> Headers | None:
        return list(self._headers) if self._headers is not None else None

    def timestamp(self) -> tuple[int, int]:
        return self._timestamp

    def error(self) -> KafkaError | None:
        return self._error

    def __repr__(self) -> str:
        what = f"error={self._error.name()}" if self._error is not None else f"key={self._key!r}"
        return f"InMemoryMessage({self._topic}[{self._partition}]@{self._offset} {what})"


class _Group:
    """A consumer group's state on the broker: members, desired and actual owners, committed offsets."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.members: list[InMemoryConsumer] = []
        self.target: dict[TopicPartition, InMemoryConsumer] = {}  # who should own each partition
        self.owner: dict[TopicPartition, InMemoryConsumer] = {}  # who owns it now (changes inside consume())
        self.committed: dict[TopicPartition, int] = {}


class InMemoryBroker:
    """Topics → partitions → records, and consumer groups with committed offsets. Single event loop, no I/O.

    `produce()` appends to a partition's log (offsets 0, 1, 2, ...); the partition is the given one, else
    CRC32(key) mod partitions (librdkafka's default for keyed records), else round-robin for null keys
    (librdkafka picks at random; round-robin keeps runs reproducible). Timestamps default to `clock()` (epoch
    seconds, `time.time` unless injected) as create time.

    Groups assign partitions to their members like a cooperative-sticky coordinator: on every membership change
    (a member starts, closes or crashes) and when a subscribed topic is created, partitions are balanced over
    the members with `auto_assign=True`, each keeping what it had as far as balance allows. Members hand partitions
    over inside their own `consume()` calls (see the module docstring). `rebalance()` moves chosen partitions
    by hand; `rebalance_group()` re-balances now.
    """

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._logs: dict[str, list[list[StoredRecord]]] = {}
        self._groups: dict[str, _Group] = {}
        self._next_null_key: dict[str, int] = {}

    # -- topics and records ---------------------------------------------------------------------------------

    def create_topic(self, topic: str, partitions: int = 1) -> None:
        """Create `topic` (idempotent for the same partition count); groups subscribed to it re-balance."""
        if partitions < 1:
            raise ValueError("a topic needs at least one partition")
        existing = self._logs.get(topic)
        if existing is not None:
            if len(existing) != partitions:
                raise ValueError(f"topic {topic} exists with {len(existing)} partitions, not {partitions}")
            return
        self._logs[topic] = [[] for _ in range(partitions)]
        for g in self._groups.values():
            if any(topic in m.topics for m in g.members):
                self._rebalance(g)

    def create_topics(self, topics: Mapping[str, int]) -> None:
        """Like `LocalBroker.create_topics`: name → partition count."""
        for topic, partitions in topics.items():
            self.create_topic(topic, partitions)

    def topics(self) -> dict[str, int]:
        return {t: len(parts) for t, parts in self._logs.items()}

    def partitions(self, topic: str) -> list[TopicPartition]:
        """The topic's partitions, in order; [] for a topic that does not exist."""
        return [TopicPartition(topic, p) for p in range(len(self._logs.get(topic, ())))]

    def produce(
        self,
        topic: str,
        value: bytes | None = None,
        key: bytes | None = None,
        *,
        partition: int | None = None,
        headers: SourceHeaders | None = None,
        timestamp_ms: int | None = None,
    ) -> RecordRef:
        """Append one record; returns where it landed. Header values given as `str` are stored UTF-8 encoded
        (as librdkafka sends them); no headers, or an empty list, reads back as `headers() is None`."""
        parts = self._log(topic)
        if partition is None:
            if key is not None:
                partition = zlib.crc32(key) % len(parts)
            else:
                partition = self._next_null_key.get(topic, 0) % len(parts)
                self._next_null_key[topic] = partition + 1
        elif not 0 <= partition < len(parts):
            raise KafkaException(KafkaError(KafkaError._UNKNOWN_PARTITION, f"{topic} has no partition {partition}"))
        items = headers.items() if isinstance(headers, Mapping) else (headers or ())
        hdrs = tuple((k, v.encode() if isinstance(v, str) else v) for k, v in items) or None
        ts = int(self.clock() * 1000) if timestamp_ms is None else timestamp_ms
        log_ = parts[partition]
        log_.append(StoredRecord(key, value, hdrs, ts))
        return RecordRef(topic, partition, len(log_) - 1)

    def produce_all(
        self,
        topic: str,
        records: Iterable[tuple[bytes | None, bytes | None]],
        *,
        partition: int | None = None,
        headers: SourceHeaders | None = None,
    ) -> list[RecordRef]:
        """`(key, value)` pairs, like tests/conftest.py's `produce`; the options apply to every record."""
        return [self.produce(topic, v, k, partition=partition, headers=headers) for k, v in records]

    def end_offset(self, tp: TopicPartition) -> int:
        """The high watermark: the offset the next record of `tp` will get."""
        return len(self._log(tp.topic)[self._check(tp)])

    def record(self, tp: TopicPartition, offset: int) -> StoredRecord:
        return self._log(tp.topic)[self._check(tp)][offset]

    def records(self, tp: TopicPartition, start: int = 0) -> list[InMemoryMessage]:
        """The partition's records from `start`, as consumed messages (reading commits nothing)."""
        log_ = self._log(tp.topic)[self._check(tp)]
        return [InMemoryMessage.of(tp, off, log_[off]) for off in range(start, len(log_))]

    def _log(self, topic: str) -> list[list[StoredRecord]]:
        try:
            return self._logs[topic]
        except KeyError:
            raise KafkaException(KafkaError(KafkaError._UNKNOWN_TOPIC, f"unknown topic {topic}")) from None

    def _check(self, tp: TopicPartition) -> int:
        if not 0 <= tp.partition < len(self._log(tp.topic)):
            raise KafkaException(KafkaError(KafkaError._UNKNOWN_PARTITION, f"unknown partition {tp}"))
        return tp.partition

    # -- groups ---------------------------------------------------------------------------------------------

    def committed(self, group: str, tp: TopicPartition) -> int | None:
        g = self._groups.get(group)
        return None if g is None else g.committed.get(tp)

    def committed_offsets(self, group: str) -> dict[TopicPartition, int]:
        g = self._groups.get(group)
        return {} if g is None else dict(g.committed)

    def commit(self, group: str, offsets: Mapping[TopicPartition, int]) -> None:
        """Set committed offsets as given (an admin's explicit commit; it may move them backwards)."""
        for tp, off in offsets.items():
            self._check(tp)
            if off < 0:
                raise ValueError(f"cannot commit logical offset {off} for {tp}")
        self._group(group).committed.update(offsets)

    def members(self, group: str) -> list[InMemoryConsumer]:
        g = self._groups.get(group)
        return [] if g is None else list(g.members)

    def assignment(self, group: str) -> dict[TopicPartition, InMemoryConsumer]:
        """Who owns each partition right now (the hand-over completes inside members' `consume()` calls)."""
        g = self._groups.get(group)
        return {} if g is None else dict(g.owner)

    def rebalance(
        self,
        consumer: InMemoryConsumer,
        *,
        assign: Iterable[TopicPartition] = (),
        revoke: Iterable[TopicPartition] = (),
        lost: Iterable[TopicPartition] = (),
    ) -> None:
        """Move partitions by hand; each change takes effect at `consumer`'s next `consume()`.

        - `assign`: `consumer` should own these (a current owner revokes them at its own next `consume()`, and
          `consumer` picks each up at the first `consume()` after that).
        - `revoke`: `consumer` gives these up in an orderly way; nobody owns them until the next re-balance
          (`rebalance_group()`, a membership change) or an `assign`.
        - `lost`: `consumer` loses these without a revoke (`on_lost`, nothing committed); nobody owns them
          until the next re-balance or an `assign`.
        """
        g = consumer._joined_group()
        for tp in lost:
            self._check(tp)
            consumer._pending_lost.add(tp)
            if g.target.get(tp) is consumer:
                del g.target[tp]
        for tp in revoke:
            self._check(tp)
            if g.target.get(tp) is consumer:
                del g.target[tp]
        for tp in assign:
            self._check(tp)
            g.target[tp] = consumer

    def rebalance_group(self, group: str) -> None:
        """Re-balance the group's partitions over its `auto_assign` members now (as a membership change does)."""
        self._rebalance(self._group(group))

    def _group(self, name: str) -> _Group:
        g = self._groups.get(name)
        if g is None:
            g = self._groups[name] = _Group(name)
        return g

    def _join(self, consumer: InMemoryConsumer) -> _Group:
        g = self._group(consumer.group)
        g.members.append(consumer)
        self._rebalance(g)
        return g

    def _leave(self, consumer: InMemoryConsumer) -> None:
        g = self._group(consumer.group)
        if consumer in g.members:
            g.members.remove(consumer)
        for table in (g.owner, g.target):
            for tp in [tp for tp, m in table.items() if m is consumer]:
                del table[tp]
        self._rebalance(g)

    def _rebalance(self, g: _Group) -> None:
        """Balanced and sticky, per topic: with n partitions over k eligible members, each member keeps up to
        n // k of its current partitions, n % k members may keep one more, the rest go to the least loaded.
        Partitions held by members with `auto_assign=False` stay where they are."""
        auto = [m for m in g.members if m.auto_assign]
        target = {tp: m for tp, m in g.target.items() if m in g.members and not m.auto_assign}
        load = dict.fromkeys(auto, 0)
        for topic in sorted({t for m in auto for t in m.topics}):
            eligible = [m for m in auto if topic in m.topics]
            free = [tp for tp in self.partitions(topic) if tp not in target]
            if not eligible or not free:
                continue
            base, extra = divmod(len(free), len(eligible))
            count = dict.fromkeys(eligible, 0)
            rest: list[TopicPartition] = []
            for tp in free:  # first pass: keep up to `base`
                cur = g.target.get(tp)
                if cur in count and count[cur] < base:
                    target[tp] = cur
                    count[cur] += 1
                else:
                    rest.append(tp)
            left: list[TopicPartition] = []
            topped: set[InMemoryConsumer] = set()
            for tp in rest:  # second pass: `extra` members may keep one more
                cur = g.target.get(tp)
                if cur in count and extra > 0 and cur not in topped and count[cur] == base:
                    target[tp] = cur
                    count[cur] += 1
                    topped.add(cur)
                    extra -= 1
                else:
                    left.append(tp)
            for tp in left:
                m = min(eligible, key=lambda c: (count[c], load[c], eligible.index(c)))
                target[tp] = m
                count[m] += 1
            for m, n in count.items():
                load[m] += n
        g.target = target


_member_ids = itertools.count(1)


async def _no_pause(tps: list[TopicPartition]) -> list[TopicPartition]:
    return []


async def _no_offsets(tps: list[TopicPartition]) -> dict[TopicPartition, int]:
    return {}


async def _nothing(tps: list[TopicPartition]) -> None:
    return None


class InMemoryConsumer:
    """One member of a consumer group on an `InMemoryBroker`, implementing `SourceConsumer` (see the module
    docstring for the invariants). Built like the real consumer: topics plus the three rebalance hooks.

    Options:
    - `auto_offset_reset`: where a partition with no committed offset starts ("earliest", the service's setting).
    - `partition_eof`: emit a `_PARTITION_EOF` error event each time a partition's position reaches its end, like
      librdkafka with `enable.partition.eof=true` (once per arrival at the end; paused partitions emit none).
    - `auto_commit_interval_s`: None (default) commits only on `commit()` and revoke; a number commits stored
      offsets during `consume()` once that much `clock()` time has passed, and when partitions are revoked or the
      consumer closes, as librdkafka's `enable.auto.commit=true` does.
    - `sleep`: awaited with `timeout_s` when `consume()` finds nothing (default: return at once).
    - `auto_assign`: take part in the group's automatic balancing (default); False gets partitions only through
      `schedule_assign()` / `InMemoryBroker.rebalance()`.
    - `hook_timeout_s`: like the real consumer's: a hook still running then is logged and left running, and the
      consumer goes on as if it had failed (no pause, nothing committed).

    `consume()`, `commit()`, `seek()` and `close()` are serialised (the real consumer runs them on one thread),
    so a hook must not await them; `store()`, `pause()` and `resume()` act at once.
    """

    def __init__(
        self,
        broker: InMemoryBroker,
        group: str,
        topics: Sequence[str],
        *,
        on_assign: AssignHook = _no_pause,
        on_revoke: RevokeHook = _no_offsets,
        on_lost: LostHook = _nothing,
        auto_offset_reset: OffsetReset = "earliest",
        partition_eof: bool = False,
        auto_commit_interval_s: float | None = None,
        sleep: Callable[[float], Awaitable[None]] | None = None,
        clock: Callable[[], float] = time.monotonic,
        auto_assign: bool = True,
        hook_timeout_s: float | None = 30.0,
        name: str | None = None,
    ) -> None:
        if auto_offset_reset not in ("earliest", "latest"):
            raise ValueError(f"auto_offset_reset must be earliest or latest, not {auto_offset_reset!r}")
        self.broker = broker
        self.group = group
        self.topics: tuple[str, ...] = tuple(topics)
        self.name = name or f"{group}/member-{next(_member_ids)}"
        self.auto_assign = auto_assign
        self._pending_lost: set[TopicPartition] = set()
        self._on_assign = on_assign
        self._on_revoke = on_revoke
        self._on_lost = on_lost
        self._reset: OffsetReset = auto_offset_reset
        self._eof = partition_eof
        self._auto_commit = auto_commit_interval_s
        self._sleep = sleep
        self._clock = clock
        self._hook_timeout = hook_timeout_s
        self._g: _Group | None = None
        self._lock = asyncio.Lock()
        self._closed = False
        self._assigned: set[TopicPartition] = set()
        self._position: dict[TopicPartition, int] = {}
        self._stored: dict[TopicPartition, int] = {}
        self._paused: set[TopicPartition] = set()
        self._eof_sent: set[TopicPartition] = set()
        self._rr = 0
        self._last_commit = clock()

    def __repr__(self) -> str:
        return f"InMemoryConsumer({self.name}, assigned={sorted(self._assigned)})"

    # -- SourceConsumer ---------------------------------------------------------------------------------------

    @property
    def assigned(self) -> AbstractSet[TopicPartition]:
        return self._assigned

    async def start(self) -> None:
        """Join the group; the group re-balances, and partitions arrive at the next `consume()`."""
        if self._closed:
            raise RuntimeError("consumer closed")
        if self._g is None:
            self._g = self.broker._join(self)

    async def consume(self, max_messages: int, timeout_s: float) -> list[InMemoryMessage]:
        """Serve rebalances, then up to `max_messages` events round-robin over unpaused assigned partitions.

        Yields to the loop once first. Returns at once; only if nothing is ready and a `sleep` was injected does it
        await `sleep(timeout_s)` and look once more."""
        if max_messages < 1:
            raise ValueError("max_messages must be at least 1")
        async with self._lock:
            self._usable()
            await asyncio.sleep(0)
            out = await self._poll(max_messages)
            if not out and self._sleep is not None and timeout_s > 0 and not self._closed:
                await self._sleep(timeout_s)
                out = await self._poll(max_messages)
            return out

    def store(self, offsets: Mapping[TopicPartition, int]) -> None:
        for tp, off in offsets.items():
            if tp in self._assigned:
                self._stored[tp] = off

    async def commit(self) -> None:
        """Commit stored offsets of assigned partitions that differ from the committed ones (none: a no-op, as
        librdkafka's `_NO_OFFSET` is ignored by the real consumer)."""
        async with self._lock:
            self._usable()
            self._commit_stored(self._assigned)

    def pause(self, tps: Sequence[TopicPartition]) -> None:
        self._paused.update(tp for tp in tps if tp in self._assigned)

    def resume(self, tps: Sequence[TopicPartition]) -> None:
        self._paused.difference_update(tps)

    async def seek(self, tp: TopicPartition, offset: int) -> None:
        """Next delivery from `tp` is `offset`; also takes confluent's `OFFSET_BEGINNING`, `OFFSET_END` and
        `OFFSET_STORED` (the committed offset). A position past the end is reset by `auto_offset_reset` when
        fetched, as librdkafka does for out-of-range offsets."""
        async with self._lock:
            self._usable()
            if tp not in self._assigned:  # librdkafka's codes: a subscribed topic's partition vs any other
                code = KafkaError._STATE if tp.topic in self.topics else KafkaError._UNKNOWN_PARTITION
                raise KafkaException(KafkaError(code, f"Failed to seek to offset {offset}: {tp} not assigned"))
            if offset == OFFSET_BEGINNING:
                offset = 0
            elif offset == OFFSET_END:
                offset = self.broker.end_offset(tp)
            elif offset == OFFSET_STORED:
                offset = self._start_offset(tp)
            elif offset < 0:
                raise ValueError(f"unsupported logical offset {offset}")
            self._position[tp] = offset
            self._eof_sent.discard(tp)

    async def close(self) -> None:
        """Revoke everything (hook runs, its offsets are committed; with auto-commit, stored offsets too), then
        leave the group, which re-balances the rest. Idempotent."""
        async with self._lock:
            if self._closed:
                return
            if self._g is not None:
                await self._revoke(sorted(self._assigned))
                if not self._closed:  # crash() during the hook: it already left
                    self.broker._leave(self)
            self._closed = True
            self._g = None

    # -- driver controls ----------------------------------------------------------------------------------------

    def schedule_assign(self, tps: Iterable[TopicPartition]) -> None:
        """At the next `consume()` (once any other owner has revoked them), these are assigned to this member."""
        self.broker.rebalance(self, assign=tps)

    def schedule_revoke(self, tps: Iterable[TopicPartition]) -> None:
        """At the next `consume()`, `on_revoke` runs for these and its offsets are committed; then nobody owns
        them until the group re-balances."""
        self.broker.rebalance(self, revoke=tps)

    def schedule_lost(self, tps: Iterable[TopicPartition]) -> None:
        """At the next `consume()`, these are lost: `on_lost` runs, nothing is committed, stored offsets drop."""
        self.broker.rebalance(self, lost=tps)

    def crash(self) -> None:
        """`kill -9`: leave the group now, no hook, no commit. The group re-balances; consume() then raises."""
        if self._closed:
            return
        self._closed = True
        if self._g is not None:
            self._drop(list(self._assigned))
            self.broker._leave(self)
            self._g = None

    # -- introspection (tests) ----------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def paused(self) -> AbstractSet[TopicPartition]:
        return frozenset(self._paused)

    @property
    def stored(self) -> dict[TopicPartition, int]:
        return dict(self._stored)

    def position(self, tp: TopicPartition) -> int | None:
        """The offset the next record of assigned `tp` will have; None when not assigned."""
        return self._position.get(tp)

    def _joined_group(self) -> _Group:
        if self._g is None:
            raise RuntimeError(f"{self.name}: start() first (or the consumer is closed)")
        return self._g

    # -- internals ----------------------------------------------------------------------------------------------

    def _usable(self) -> None:
        if self._closed:
            raise RuntimeError("consumer closed")
        self._joined_group()

    async def _poll(self, max_messages: int) -> list[InMemoryMessage]:
        await self._serve_rebalance()
        if self._closed:
            return []
        if self._auto_commit is not None and self._clock() - self._last_commit >= self._auto_commit:
            self._commit_stored(self._assigned)
        return self._fetch(max_messages)

    async def _serve_rebalance(self) -> None:
        g = self._joined_group()
        lost = sorted(self._pending_lost & self._assigned)
        self._pending_lost.clear()
        if lost:
            self._drop(lost)
            for tp in lost:
                if g.owner.get(tp) is self:
                    del g.owner[tp]
            await self._hook("lost", self._on_lost, lost)
            if self._closed:
                return
        revoke = sorted(tp for tp in self._assigned if g.target.get(tp) is not self)
        if revoke:
            await self._revoke(revoke)
            if self._closed:
                return
        assign = sorted(tp for tp, m in g.target.items() if m is self and tp not in g.owner)
        if assign:
            for tp in assign:
                g.owner[tp] = self
                self._assigned.add(tp)
                self._position[tp] = self._start_offset(tp)
            to_pause = await self._hook("assign", self._on_assign, assign)
            if to_pause and not self._closed:
                self.pause(to_pause)

    async def _revoke(self, tps: list[TopicPartition]) -> None:
        """The hook runs while the partitions are still assigned; then its offsets are stored and committed."""
        if not tps:
            return
        offsets = await self._hook("revoke", self._on_revoke, tps)
        if self._closed:  # crashed meanwhile: nothing is committed
            return
        revoked = set(tps)
        if offsets:
            stray = sorted(tp for tp in offsets if tp not in revoked)
            if stray:
                log.warning("revoke hook returned offsets for partitions not revoked, ignored: %s", stray)
            mine = {tp: off for tp, off in offsets.items() if tp in revoked}
            self._stored.update(mine)
            self._commit(mine)
        if self._auto_commit is not None:
            self._commit_stored(revoked)
        g = self._joined_group()
        for tp in tps:
            if g.owner.get(tp) is self:
                del g.owner[tp]
        self._drop(tps)

    async def _hook(
        self, what: str, hook: Callable[[list[TopicPartition]], Awaitable[T]], tps: list[TopicPartition]
    ) -> T | None:
        try:
            task = asyncio.ensure_future(hook(list(tps)))
        except Exception:
            log.exception("%s hook failed", what)
            return None
        done, _ = await asyncio.wait({task}, timeout=self._hook_timeout)
        if not done:
            log.error("%s hook still running after %ss; going on without its answer", what, self._hook_timeout)
            return None
        try:
            return task.result()
        except Exception:
            log.exception("%s hook failed", what)
            return None

    def _drop(self, tps: Iterable[TopicPartition]) -> None:
        for tp in tps:
            self._assigned.discard(tp)
            self._position.pop(tp, None)
            self._stored.pop(tp, None)
            self._paused.discard(tp)
            self._eof_sent.discard(tp)

    def _start_offset(self, tp: TopicPartition) -> int:
        committed = self._joined_group().committed.get(tp)
        if committed is not None:
            return committed
        return 0 if self._reset == "earliest" else self.broker.end_offset(tp)

    def _commit_stored(self, tps: AbstractSet[TopicPartition]) -> None:
        committed = self._joined_group().committed
        self._commit({tp: off for tp, off in self._stored.items() if tp in tps and committed.get(tp) != off})

    def _commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        if offsets:
            self._joined_group().committed.update(offsets)
        self._last_commit = self._clock()

    def _fetch(self, max_messages: int) -> list[InMemoryMessage]:
        order = sorted(self._assigned)
        if not order:
            return []
        start = self._rr % len(order)
        self._rr += 1
        active = [tp for tp in order[start:] + order[:start] if tp not in self._paused]
        out: list[InMemoryMessage] = []
        while active and len(out) < max_messages:
            again: list[TopicPartition] = []
            for tp in active:
                if len(out) >= max_messages:
                    break
                log_ = self.broker._log(tp.topic)[tp.partition]
                pos = self._position[tp]
                if pos > len(log_):
                    pos = 0 if self._reset == "earliest" else len(log_)
                    log.warning("%s: offset %d out of range, reset to %d", tp, self._position[tp], pos)
                if pos < len(log_):
                    out.append(InMemoryMessage.of(tp, pos, log_[pos]))
                    self._position[tp] = pos + 1
                    self._eof_sent.discard(tp)
                    again.append(tp)
                else:
                    self._position[tp] = pos
                    if self._eof and tp not in self._eof_sent:
                        self._eof_sent.add(tp)
                        err = KafkaError(
                            KafkaError._PARTITION_EOF,
                            f"Fetch from broker 0 reached end of partition at offset {pos} (HighwaterMark {pos})",
                        )
                        out.append(InMemoryMessage(tp.topic, tp.partition, pos, error=err))
            active = again
        return out


if TYPE_CHECKING:  # mypy proves the in-memory types satisfy the protocols

    def _message_conforms(m: InMemoryMessage) -> SourceMessage:
        return m

    def _consumer_conforms(c: InMemoryConsumer) -> SourceConsumer:
        return c
