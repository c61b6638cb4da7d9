"""The `SourceConsumer` contract, one suite run against both implementations.

- "memory": `service.kafka.memory.InMemoryConsumer` on an `InMemoryBroker` (milliseconds, deterministic);
- "tansu": the real consumer (`service.kafka.consumer`, confluent-kafka on its own thread) on the local
  Kafka-protocol broker, configured like the service (`CONSUMER_DEFAULTS`: earliest, explicit offset store,
  cooperative-sticky).

A test here states behaviour the pipeline relies on; if the in-memory consumer passes it, so must the real one.
Both backends commit only through `commit()` and the revoke hook's answer (the real one with
`enable.auto.commit=false`), so what is committed never depends on timing. A "crash" is `InMemoryConsumer.crash()`
in memory; the real consumer cannot be killed in-process, so there it leaves the group with a revoke hook that
answers nothing — with auto-commit off, exactly what a `kill -9` would leave committed.

tansu notes: a group join takes about half of `session.timeout.ms` (2 s here, so ~1 s per join); an idle fetch
is answered at `fetch.wait.max.ms` (50 ms here). Waits on the real broker are bounded (`patience_s`), and
"nothing arrives" is checked over a fixed quiet period (`quiet_s`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from confluent_kafka import TIMESTAMP_CREATE_TIME, KafkaError, KafkaException, Producer

from service.config import CONSUMER_DEFAULTS
from service.core.types import TopicPartition
from service.devtools.broker import LocalBroker
from service.kafka.consumer import KafkaSourceConsumer
from service.kafka.memory import InMemoryBroker, InMemoryConsumer
from service.kafka.source import SourceConsumer, SourceMessage
from tests.conftest import committed as committed_on_broker

pytestmark = pytest.mark.timeout(90)


@dataclass
class Rec:
    partition: int
    value: bytes | None
    key: bytes | None = None
    headers: list[tuple[str, bytes | None]] | None = None
    timestamp_ms: int | None = None


@dataclass
class Hooks:
    """Records hook calls in `events` (with the records, so order can be checked) and answers them."""

    pause_on_assign: set[TopicPartition] = field(default_factory=set)
    answer: dict[TopicPartition, int] = field(default_factory=dict)  # what on_revoke returns
    crashed: bool = False  # on_revoke answers nothing: the real backend's stand-in for kill -9
    events: list[tuple[str, Any]] = field(default_factory=list)
    assigned_in_hook: list[set[TopicPartition]] = field(default_factory=list)
    consumer: SourceConsumer | None = None

    async def on_assign(self, tps: list[TopicPartition]) -> list[TopicPartition]:
        self.events.append(("assign", set(tps)))
        if self.consumer is not None:
            self.assigned_in_hook.append(set(self.consumer.assigned))
        return [tp for tp in tps if tp in self.pause_on_assign]

    async def on_revoke(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        self.events.append(("revoke", set(tps)))
        if self.crashed:
            return {}
        return {tp: self.answer[tp] for tp in tps if tp in self.answer}

    async def on_lost(self, tps: list[TopicPartition]) -> None:
        self.events.append(("lost", set(tps)))

    def revoked(self) -> set[TopicPartition]:
        return {tp for kind, tps in self.events if kind == "revoke" for tp in tps}


class Backend:
    name: str
    patience_s: float  # how long to wait for something that must happen
    quiet_s: float  # how long to watch for something that must not happen

    def __init__(self) -> None:
        self.consumers: list[tuple[SourceConsumer, Hooks]] = []

    def new_topic(self, partitions: int) -> tuple[str, str]:
        raise NotImplementedError

    def produce(self, topic: str, records: Sequence[Rec]) -> None:
        raise NotImplementedError

    def make(self, topic: str, group: str, hooks: Hooks, *, partition_eof: bool) -> SourceConsumer:
        raise NotImplementedError

    async def crash(self, consumer: SourceConsumer, hooks: Hooks) -> None:
        raise NotImplementedError

    def committed(self, group: str, topic: str, partitions: int) -> dict[int, int | None]:
        raise NotImplementedError

    async def consumer(
        self, topic: str, group: str, hooks: Hooks | None = None, *, partition_eof: bool = False
    ) -> tuple[SourceConsumer, Hooks]:
        hooks = hooks or Hooks()
        c = self.make(topic, group, hooks, partition_eof=partition_eof)
        hooks.consumer = c
        await c.start()
        self.consumers.append((c, hooks))
        return c, hooks


class MemoryBackend(Backend):
    name = "memory"
    patience_s = 2.0
    quiet_s = 0.0

    def __init__(self) -> None:
        super().__init__()
        self.broker = InMemoryBroker()

    def new_topic(self, partitions: int) -> tuple[str, str]:
        topic = f"audience-{uuid.uuid4().hex[:8]}"
        self.broker.create_topic(topic, partitions)
        return topic, f"sync-{uuid.uuid4().hex[:8]}"

    def produce(self, topic: str, records: Sequence[Rec]) -> None:
        for r in records:
            self.broker.produce(
                topic, r.value, r.key, partition=r.partition, headers=r.headers, timestamp_ms=r.timestamp_ms
            )

    def make(self, topic: str, group: str, hooks: Hooks, *, partition_eof: bool) -> SourceConsumer:
        return InMemoryConsumer(
            self.broker,
            group,
            [topic],
            on_assign=hooks.on_assign,
            on_revoke=hooks.on_revoke,
            on_lost=hooks.on_lost,
            partition_eof=partition_eof,
        )

    async def crash(self, consumer: SourceConsumer, hooks: Hooks) -> None:
        assert isinstance(consumer, InMemoryConsumer)
        consumer.crash()

    def committed(self, group: str, topic: str, partitions: int) -> dict[int, int | None]:
        return {p: self.broker.committed(group, TopicPartition(topic, p)) for p in range(partitions)}


class TansuBackend(Backend):
    name = "tansu"
    patience_s = 20.0
    quiet_s = 1.0

    def __init__(self, broker: LocalBroker) -> None:
        super().__init__()
        self.broker = broker

    def new_topic(self, partitions: int) -> tuple[str, str]:
        topic = f"audience-{uuid.uuid4().hex[:8]}"
        self.broker.create_topics({topic: partitions})
        return topic, f"sync-{uuid.uuid4().hex[:8]}"

    def produce(self, topic: str, records: Sequence[Rec]) -> None:
        p = Producer({"bootstrap.servers": self.broker.bootstrap, "enable.idempotence": True, "linger.ms": 5})
        for r in records:
            kw: dict[str, Any] = {"partition": r.partition, "key": r.key, "value": r.value}
            if r.headers is not None:
                kw["headers"] = r.headers
            if r.timestamp_ms is not None:
                kw["timestamp"] = r.timestamp_ms
            p.produce(topic, **kw)
        assert p.flush(30) == 0

    def make(self, topic: str, group: str, hooks: Hooks, *, partition_eof: bool) -> SourceConsumer:
        conf: dict[str, Any] = {
            "bootstrap.servers": self.broker.bootstrap,
            "group.id": group,
            **CONSUMER_DEFAULTS,  # earliest, enable.auto.offset.store=false, cooperative-sticky: as the service
            "enable.auto.commit": False,  # commits only by commit() and the revoke hook: deterministic
            "session.timeout.ms": 2000,  # tansu joins take ~half of this
            "heartbeat.interval.ms": 250,
            "fetch.wait.max.ms": 50,  # tansu answers an idle fetch only at this
            "enable.partition.eof": partition_eof,
        }
        consumer: SourceConsumer = KafkaSourceConsumer(
            conf, [topic], on_assign=hooks.on_assign, on_revoke=hooks.on_revoke, on_lost=hooks.on_lost
        )
        return consumer

    async def crash(self, consumer: SourceConsumer, hooks: Hooks) -> None:
        hooks.crashed = True
        await consumer.close()

    def committed(self, group: str, topic: str, partitions: int) -> dict[int, int | None]:
        got = committed_on_broker(self.broker, group, topic, partitions)
        return {p: (off if off >= 0 else None) for p, off in got.items()}


@pytest.fixture(
    params=["memory", pytest.param("tansu", marks=pytest.mark.integration)],
)
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    b: Backend = MemoryBackend() if request.param == "memory" else TansuBackend(request.getfixturevalue("broker"))
    yield b
    for c, _ in b.consumers:
        if not getattr(c, "closed", False):
            with contextlib.suppress(Exception):  # closing twice is an error for the real one
                await asyncio.wait_for(c.close(), 30)


# -- helpers ---------------------------------------------------------------------------------------------------


def records_of(msgs: Sequence[SourceMessage]) -> list[SourceMessage]:
    return [m for m in msgs if m.error() is None]


def tp_of(m: SourceMessage) -> TopicPartition:
    return TopicPartition(m.topic() or "", m.partition() or 0)


def by_partition(msgs: Sequence[SourceMessage]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for m in msgs:
        out.setdefault(m.partition() or 0, []).append(m.offset() or 0)
    return out


async def poll(c: SourceConsumer, hooks: Hooks | None = None) -> list[SourceMessage]:
    got = await c.consume(100, 0.1)
    if hooks is not None:
        hooks.events.extend(("record", tp_of(m)) for m in records_of(got))
    return list(got)


async def collect(
    b: Backend,
    c: SourceConsumer,
    want: int,
    hooks: Hooks | None = None,
    *,
    errors: bool = False,
    what: str = "records",
) -> list[SourceMessage]:
    """Consume until `want` records (or events, with `errors`) arrived, then watch `quiet_s` more for extras."""
    out: list[SourceMessage] = []
    deadline = time.monotonic() + b.patience_s
    while len(out) < want:
        assert time.monotonic() < deadline, f"{b.name}: {len(out)}/{want} {what} after {b.patience_s}s"
        got = await poll(c, hooks)
        out.extend(got if errors else records_of(got))
    out.extend(await quiet(b, c, hooks, errors=errors))
    return out


async def quiet(b: Backend, c: SourceConsumer, hooks: Hooks | None = None, *, errors: bool = False) -> list[Any]:
    """Whatever arrives over `quiet_s` (and at least a few polls)."""
    out: list[SourceMessage] = []
    end = time.monotonic() + b.quiet_s
    polls = 0
    while polls < 3 or time.monotonic() < end:
        got = await poll(c, hooks)
        out.extend(got if errors else records_of(got))
        polls += 1
    return out


async def until(b: Backend, cond: Callable[[], bool], what: str, *consumers: SourceConsumer) -> None:
    """Poll `consumers` (all of them each round, as the real ones must poll for their rebalances) until `cond`."""
    deadline = time.monotonic() + b.patience_s
    while not cond():
        assert time.monotonic() < deadline, f"{b.name}: timed out after {b.patience_s}s waiting for {what}"
        await asyncio.gather(*(poll(c) for c in consumers))


def recs(partitions: int, per_partition: int, tag: str = "v") -> list[Rec]:
    return [
        Rec(p, f"{tag}-{p}-{i}".encode(), key=f"k{i}".encode()) for i in range(per_partition) for p in range(partitions)
    ]


# -- the contract --------------------------------------------------------------------------------------------------


async def test_every_record_arrives_once_in_offset_order_per_partition(backend: Backend) -> None:
    topic, group = backend.new_topic(3)
    backend.produce(topic, recs(3, 10))
    c, _ = await backend.consumer(topic, group)
    got = await collect(backend, c, 30)
    assert by_partition(got) == {p: list(range(10)) for p in range(3)}, "in order, each exactly once"
    for m in got:
        assert m.topic() == topic
        assert m.value() == f"v-{m.partition()}-{m.offset()}".encode()
    assert set(c.assigned) == {TopicPartition(topic, p) for p in range(3)}


async def test_keys_values_headers_and_timestamps_round_trip(backend: Backend) -> None:
    topic, group = backend.new_topic(1)
    ts = 1_700_000_000_123
    sent = [
        Rec(0, b"v0", key=b"k0", headers=[("a", b"1"), ("b", b"two"), ("a", b"3")], timestamp_ms=ts),
        Rec(0, b"v1", key=None, headers=None, timestamp_ms=ts + 1),
        Rec(0, None, key=b"tombstone", headers=[("empty", b""), ("null", None)], timestamp_ms=ts + 2),
        Rec(0, b"", key=b"", timestamp_ms=ts + 3),
    ]
    backend.produce(topic, sent)
    c, _ = await backend.consumer(topic, group)
    got = await collect(backend, c, len(sent))
    assert [m.offset() for m in got] == [0, 1, 2, 3]
    for m, r in zip(got, sent, strict=True):
        assert m.key() == r.key
        assert m.value() == r.value
        assert m.headers() == r.headers, "repeated and null-valued headers kept, in order"
        assert m.timestamp() == (TIMESTAMP_CREATE_TIME, r.timestamp_ms)


async def test_on_assign_runs_before_the_first_record_of_its_partitions(backend: Backend) -> None:
    topic, group = backend.new_topic(3)
    backend.produce(topic, recs(3, 2))
    c, hooks = await backend.consumer(topic, group)
    await collect(backend, c, 6, hooks)
    assigned_at: dict[TopicPartition, int] = {}
    for i, (kind, what) in enumerate(hooks.events):
        if kind == "assign":
            assigned_at.update(dict.fromkeys(what, i))
        elif kind == "record":
            assert what in assigned_at, f"a record of {what} before on_assign gave it: {hooks.events}"
    everything = {TopicPartition(topic, p) for p in range(3)}
    assert set(assigned_at) == everything
    assert hooks.assigned_in_hook and hooks.assigned_in_hook[-1] == everything, "assigned already includes them"


async def test_partitions_returned_by_on_assign_start_paused(backend: Backend) -> None:
    topic, group = backend.new_topic(2)
    backend.produce(topic, recs(2, 3))
    p0, p1 = TopicPartition(topic, 0), TopicPartition(topic, 1)
    c, _ = await backend.consumer(topic, group, Hooks(pause_on_assign={p0}))
    got = await collect(backend, c, 3)
    assert by_partition(got) == {1: [0, 1, 2]}, "p0 paused before its first record"
    c.resume([p0])
    assert by_partition(await collect(backend, c, 3)) == {0: [0, 1, 2]}
    assert p1 in c.assigned


async def test_pause_stops_a_partition_and_resume_continues_where_it_stopped(backend: Backend) -> None:
    topic, group = backend.new_topic(2)
    backend.produce(topic, recs(2, 3))
    c, _ = await backend.consumer(topic, group)
    await collect(backend, c, 6)
    p0 = TopicPartition(topic, 0)
    c.pause([p0])
    backend.produce(topic, recs(2, 3, tag="more"))
    got = await collect(backend, c, 3)
    assert by_partition(got) == {1: [3, 4, 5]}, "nothing from the paused partition"
    c.resume([p0])
    got = await collect(backend, c, 3)
    assert by_partition(got) == {0: [3, 4, 5]}
    assert [m.value() for m in got] == [b"more-0-0", b"more-0-1", b"more-0-2"]


async def test_seek_rewinds_a_partition(backend: Backend) -> None:
    topic, group = backend.new_topic(2)
    backend.produce(topic, recs(2, 5))
    c, _ = await backend.consumer(topic, group)
    await collect(backend, c, 10)
    await c.seek(TopicPartition(topic, 1), 2)
    got = await collect(backend, c, 3)
    assert by_partition(got) == {1: [2, 3, 4]}, "re-read from the seek, the other partition untouched"


async def test_seek_on_a_partition_not_assigned_raises_and_store_ignores_it(backend: Backend) -> None:
    topic, group = backend.new_topic(1)
    backend.produce(topic, recs(1, 2))
    c, _ = await backend.consumer(topic, group)
    await collect(backend, c, 2)
    stranger = TopicPartition(topic, 7)
    with pytest.raises(KafkaException) as err:
        await c.seek(stranger, 0)
    assert err.value.args[0].code() == KafkaError._STATE, "librdkafka: a subscribed topic's partition not assigned"
    with pytest.raises(KafkaException) as err:
        await c.seek(TopicPartition(f"{topic}-other", 0), 0)
    assert err.value.args[0].code() == KafkaError._UNKNOWN_PARTITION, "librdkafka: a partition it does not know"
    c.store({stranger: 5, TopicPartition(topic, 0): 1})
    c.pause([stranger])
    c.resume([stranger])
    await c.commit()
    assert backend.committed(group, topic, 1) == {0: 1}


async def test_committed_offsets_are_where_the_next_member_of_the_group_starts(backend: Backend) -> None:
    topic, group = backend.new_topic(2)
    backend.produce(topic, recs(2, 5))
    c, _ = await backend.consumer(topic, group)
    await collect(backend, c, 10)
    c.store({TopicPartition(topic, 0): 3, TopicPartition(topic, 1): 5})
    await c.commit()
    assert backend.committed(group, topic, 2) == {0: 3, 1: 5}
    await c.close()
    assert backend.committed(group, topic, 2) == {0: 3, 1: 5}, "close commits nothing the revoke hook did not return"

    nxt, _ = await backend.consumer(topic, group)
    got = await collect(backend, nxt, 2)
    assert by_partition(got) == {0: [3, 4]}


async def test_records_not_committed_are_delivered_again_after_a_crash(backend: Backend) -> None:
    topic, group = backend.new_topic(1)
    backend.produce(topic, recs(1, 6))
    tp = TopicPartition(topic, 0)
    c, hooks = await backend.consumer(topic, group)
    await collect(backend, c, 6)
    c.store({tp: 2})
    await c.commit()
    c.store({tp: 5})  # stored, never committed: lost with the process
    await backend.crash(c, hooks)
    assert backend.committed(group, topic, 1) == {0: 2}

    nxt, _ = await backend.consumer(topic, group)
    got = await collect(backend, nxt, 4)
    assert by_partition(got) == {0: [2, 3, 4, 5]}


async def test_close_runs_on_revoke_and_commits_exactly_its_answer(backend: Backend) -> None:
    topic, group = backend.new_topic(2)
    backend.produce(topic, recs(2, 4))
    p0, p1 = TopicPartition(topic, 0), TopicPartition(topic, 1)
    c, hooks = await backend.consumer(topic, group, Hooks(answer={p0: 4, p1: 2}))
    await collect(backend, c, 8)
    c.store({p0: 1, p1: 1})  # superseded by the hook's answer
    await c.close()
    assert hooks.revoked() == {p0, p1}
    assert backend.committed(group, topic, 2) == {0: 4, 1: 2}


async def test_a_joining_member_takes_partitions_over_through_revoke_and_committed_offsets(backend: Backend) -> None:
    topic, group = backend.new_topic(4)
    backend.produce(topic, recs(4, 3))
    everything = {TopicPartition(topic, p) for p in range(4)}
    a, hooks_a = await backend.consumer(topic, group, Hooks(answer=dict.fromkeys(everything, 3)))
    await collect(backend, a, 12)

    b, hooks_b = await backend.consumer(topic, group)

    def handed_over() -> bool:
        return bool(b.assigned) and set(a.assigned) | set(b.assigned) == everything

    await until(backend, handed_over, "the second member to get partitions", a, b)
    assert not set(a.assigned) & set(b.assigned), "a partition has one owner"
    moved = set(b.assigned)
    assert hooks_a.revoked() == moved, "only what moved was revoked"
    assert {tp for kind, tps in hooks_b.events if kind == "assign" for tp in tps} == moved
    assert {kind for kind, _ in hooks_a.events} == {"assign", "revoke"}, "revoked, not lost"
    assert backend.committed(group, topic, 4) == dict.fromkeys(range(4), None) | {tp.partition: 3 for tp in moved}

    backend.produce(topic, [Rec(p, f"new-{p}".encode()) for p in range(4)])
    got_a: list[SourceMessage] = []
    got_b: list[SourceMessage] = []

    async def both() -> None:
        got_a.extend(records_of(await poll(a)))
        got_b.extend(records_of(await poll(b)))

    deadline = time.monotonic() + backend.patience_s
    while len(got_a) + len(got_b) < 4:
        assert time.monotonic() < deadline, f"{backend.name}: only {len(got_a) + len(got_b)}/4 new records"
        await both()
    for _ in range(3):
        await both()
    assert {tp_of(m) for m in got_b} == moved, "the new owner resumes at the committed offsets: only new records"
    assert {tp_of(m) for m in got_a} == everything - moved
    assert sorted(m.offset() or 0 for m in got_a + got_b) == [3, 3, 3, 3]


async def test_partition_eof_is_reported_when_enabled(backend: Backend) -> None:
    topic, group = backend.new_topic(2)
    backend.produce(topic, [Rec(0, b"a"), Rec(0, b"b"), Rec(1, b"c")])
    c, _ = await backend.consumer(topic, group, partition_eof=True)
    got = await collect(backend, c, 5, errors=True, what="records and EOF events")
    eofs = [m for m in got if m.error() is not None]
    for m in eofs:
        err = m.error()
        assert err is not None and err.code() == KafkaError._PARTITION_EOF
    assert sorted((m.partition(), m.offset()) for m in eofs) == [(0, 2), (1, 1)], "once per partition, at its end"
    assert len(records_of(got)) == 3
