"""The in-memory broker's own controls: scheduled revokes, lost partitions, crashes, group balancing, auto-commit,
the injected clock. (Behaviour shared with the real consumer is in test_source_contract.py.)"""

from __future__ import annotations

import asyncio
import logging
import zlib
from dataclasses import dataclass, field

import pytest
from confluent_kafka import (
    OFFSET_BEGINNING,
    OFFSET_END,
    OFFSET_STORED,
    TIMESTAMP_CREATE_TIME,
    KafkaError,
    KafkaException,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.core.types import RecordRef, TopicPartition
from service.kafka.memory import InMemoryBroker, InMemoryConsumer, InMemoryMessage, ManualClock
from service.kafka.source import SourceConsumer, SourceMessage

T = "topic"


def tp(p: int, topic: str = T) -> TopicPartition:
    return TopicPartition(topic, p)


@dataclass
class Hooks:
    answer: dict[TopicPartition, int] = field(default_factory=dict)
    pause: set[TopicPartition] = field(default_factory=set)
    events: list[tuple[str, list[TopicPartition]]] = field(default_factory=list)
    assigned_seen: list[set[TopicPartition]] = field(default_factory=list)
    consumer: InMemoryConsumer | None = None

    def _seen(self) -> None:
        if self.consumer is not None:
            self.assigned_seen.append(set(self.consumer.assigned))

    async def on_assign(self, tps: list[TopicPartition]) -> list[TopicPartition]:
        self.events.append(("assign", tps))
        self._seen()
        return [t for t in tps if t in self.pause]

    async def on_revoke(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        self.events.append(("revoke", tps))
        self._seen()
        return {t: self.answer[t] for t in tps if t in self.answer}

    async def on_lost(self, tps: list[TopicPartition]) -> None:
        self.events.append(("lost", tps))
        self._seen()


def make(
    broker: InMemoryBroker, group: str = "g", hooks: Hooks | None = None, **kw: object
) -> tuple[InMemoryConsumer, Hooks]:
    h = hooks or Hooks()
    c = InMemoryConsumer(
        broker,
        group,
        [T],
        on_assign=h.on_assign,
        on_revoke=h.on_revoke,
        on_lost=h.on_lost,
        **kw,  # type: ignore[arg-type]
    )
    h.consumer = c
    return c, h


def filled(partitions: int = 2, per_partition: int = 3) -> InMemoryBroker:
    b = InMemoryBroker(clock=ManualClock(1_700_000_000.0))
    b.create_topic(T, partitions)
    for i in range(per_partition):
        for p in range(partitions):
            b.produce(T, f"v{p}-{i}".encode(), partition=p)
    return b


def offsets(msgs: list[InMemoryMessage]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for m in msgs:
        if m.error() is None:
            out.setdefault(m.partition(), []).append(m.offset())
    return out


async def drain(c: InMemoryConsumer, rounds: int = 5) -> list[InMemoryMessage]:
    out: list[InMemoryMessage] = []
    for _ in range(rounds):
        out.extend(await c.consume(1000, 1.0))
    return out


# -- broker ------------------------------------------------------------------------------------------------------


def test_produce_partitions_like_librdkafka_and_normalises_headers() -> None:
    b = InMemoryBroker(clock=ManualClock(12.5))
    b.create_topic(T, 3)
    ref = b.produce(T, b"v", b"user-1", headers={"a": "é", "b": None})
    assert ref == RecordRef(T, zlib.crc32(b"user-1") % 3, 0)
    assert b.produce(T, b"w", b"user-1").partition == ref.partition, "same key, same partition"
    assert [b.produce(T, b"x").partition for _ in range(4)] == [0, 1, 2, 0], "null keys round-robin"
    rec = b.record(ref.tp, 0)
    assert rec.headers == (("a", "é".encode()), ("b", None))
    assert (rec.timestamp_type, rec.timestamp_ms) == (TIMESTAMP_CREATE_TIME, 12_500), "injected clock"
    assert b.record(ref.tp, 1).headers is None
    assert b.records(TopicPartition(T, 0), start=1)[0].offset() == 1
    assert b.end_offset(TopicPartition(T, 0)) == 2
    assert b.topics() == {T: 3}


def test_unknown_topics_and_partitions_are_refused() -> None:
    b = InMemoryBroker()
    with pytest.raises(KafkaException):
        b.produce("nope", b"v")
    b.create_topic(T, 1)
    b.create_topic(T, 1)  # idempotent
    with pytest.raises(ValueError):
        b.create_topic(T, 2)
    with pytest.raises(KafkaException):
        b.produce(T, b"v", partition=1)
    with pytest.raises(KafkaException):
        b.end_offset(tp(1))
    with pytest.raises(ValueError):
        b.commit("g", {tp(0): -2})


def test_the_types_satisfy_the_protocols() -> None:
    b = filled(1, 1)
    c, _ = make(b)
    assert isinstance(c, SourceConsumer)
    assert isinstance(b.records(tp(0))[0], SourceMessage)


# -- scheduled rebalances ------------------------------------------------------------------------------------


async def test_scheduled_revoke_commits_the_hooks_answer_and_keeps_the_partition_unowned() -> None:
    b = filled()
    c, h = make(b, hooks=Hooks(answer={tp(0): 2}))
    await c.start()
    assert offsets(await drain(c)) == {0: [0, 1, 2], 1: [0, 1, 2]}
    c.schedule_revoke([tp(0)])
    assert c.assigned == {tp(0), tp(1)}, "nothing happens before the next consume()"
    b.produce(T, b"late", partition=0)
    assert await drain(c) == []
    assert h.events[-1] == ("revoke", [tp(0)])
    assert h.assigned_seen[-1] == {tp(0), tp(1)}, "still assigned while the hook runs"
    assert c.assigned == {tp(1)}
    assert b.committed("g", tp(0)) == 2
    assert b.assignment("g") == {tp(1): c}

    b.rebalance_group("g")
    got = await drain(c)
    assert offsets(got) == {0: [2, 3]}, "given back at the next re-balance, from the committed offset"
    assert h.events[-1] == ("assign", [tp(0)])


async def test_scheduled_lost_commits_nothing_and_drops_stored_offsets() -> None:
    b = filled()
    c, h = make(b, hooks=Hooks(answer={tp(0): 3}))
    await c.start()
    await drain(c)
    c.store({tp(0): 3, tp(1): 3})
    c.schedule_lost([tp(0)])
    await c.consume(10, 0)
    assert h.events[-1] == ("lost", [tp(0)])
    assert h.assigned_seen[-1] == {tp(1)}, "gone from `assigned` before the hook, as in the real consumer"
    await c.commit()
    assert b.committed_offsets("g") == {tp(1): 3}, "the lost partition's stored offset is gone"
    c.schedule_assign([tp(0)])
    assert offsets(await drain(c)) == {0: [0, 1, 2]}, "re-assigned: from the committed offset (none: earliest)"


async def test_lost_and_revoked_and_assigned_in_one_consume_run_in_that_order() -> None:
    b = InMemoryBroker()
    b.create_topic(T, 3)
    c, h = make(b, auto_assign=False)
    await c.start()
    c.schedule_assign([tp(0), tp(1)])
    await c.consume(10, 0)
    b.rebalance(c, lost=[tp(0)], revoke=[tp(1)], assign=[tp(2)])
    await c.consume(10, 0)
    assert h.events == [("assign", [tp(0), tp(1)]), ("lost", [tp(0)]), ("revoke", [tp(1)]), ("assign", [tp(2)])]
    assert c.assigned == {tp(2)}


async def test_a_moved_partition_is_revoked_by_its_owner_before_the_new_owner_gets_it() -> None:
    b = filled(2, 2)
    a, ha = make(b, hooks=Hooks(answer={tp(0): 1}), auto_assign=False, name="a")
    z, hz = make(b, auto_assign=False, name="z")
    await a.start()
    await z.start()
    a.schedule_assign([tp(0), tp(1)])
    assert offsets(await drain(a)) == {0: [0, 1], 1: [0, 1]}
    z.schedule_assign([tp(0)])
    assert await drain(z) == [], "z waits: a still owns it"
    assert b.assignment("g")[tp(0)] is a
    await a.consume(10, 0)
    assert ha.events[-1] == ("revoke", [tp(0)])
    assert offsets(await drain(z)) == {0: [1]}, "z resumes at what a's revoke committed"
    assert hz.events == [("assign", [tp(0)])]
    assert b.assignment("g") == {tp(0): z, tp(1): a}


async def test_pause_from_on_assign_and_pause_state_ends_with_the_assignment() -> None:
    b = filled(2, 1)
    c, _ = make(b, hooks=Hooks(pause={tp(0)}))
    await c.start()
    assert offsets(await drain(c)) == {1: [0]}
    assert c.paused == {tp(0)}
    c.schedule_revoke([tp(0)])
    await c.consume(10, 0)
    assert c.paused == set()
    c.pause([tp(0)])  # not assigned: ignored
    assert c.paused == set()


# -- crashes and the group ---------------------------------------------------------------------------------------


async def test_crash_loses_stored_offsets_and_the_group_hands_partitions_to_the_survivor() -> None:
    b = filled(2, 3)
    a, ha = make(b, name="a")
    await a.start()
    await drain(a)
    a.store({tp(0): 3, tp(1): 3})
    await a.commit()
    survivor, hs = make(b, name="survivor")
    await survivor.start()
    await drain(a)  # a revokes what moves
    await drain(survivor)
    assert len(a.assigned) == len(survivor.assigned) == 1
    b.produce(T, b"new0", partition=0)
    b.produce(T, b"new1", partition=1)
    kept = next(iter(a.assigned))
    a.store({kept: 4})  # never committed
    a.crash()
    assert a.closed and not a.assigned
    assert ("revoke", [kept]) not in ha.events, "no hook on a crash"
    assert b.committed("g", kept) == 3
    assert b.members("g") == [survivor]
    got = await drain(survivor)
    assert kept == tp(0), "sticky: the first member keeps the first partition"
    assert offsets(got) == {0: [3], 1: [3]}, "the survivor's own new record, and the crashed one's from committed 3"
    assert survivor.assigned == {tp(0), tp(1)}
    assert hs.events[-1] == ("assign", [kept])
    with pytest.raises(RuntimeError):
        await a.consume(10, 0)
    a.crash()  # idempotent
    await a.close()  # and close after a crash is a no-op


async def test_a_new_member_after_a_crash_starts_from_the_committed_offsets() -> None:
    b = filled(1, 5)
    a, _ = make(b)
    await a.start()
    await drain(a)
    a.store({tp(0): 2})
    await a.commit()
    a.store({tp(0): 5})
    a.crash()
    nxt, _ = make(b)
    await nxt.start()
    assert offsets(await drain(nxt)) == {0: [2, 3, 4]}


async def test_balancing_is_even_and_sticky() -> None:
    b = InMemoryBroker()
    b.create_topic(T, 7)
    members = [make(b, name=n)[0] for n in "abc"]
    for m in members:
        await m.start()
    for _ in range(3):
        await asyncio.gather(*(m.consume(10, 0) for m in members))
    sizes = sorted(len(m.assigned) for m in members)
    assert sizes == [2, 2, 3]
    assert set().union(*(m.assigned for m in members)) == set(b.partitions(T))
    before = {m.name: set(m.assigned) for m in members}
    await members[2].close()
    for _ in range(3):
        await asyncio.gather(*(m.consume(10, 0) for m in members[:2]))
    for m in members[:2]:
        assert before[m.name] <= m.assigned, "survivors keep what they had"
    assert sorted(len(m.assigned) for m in members[:2]) == [3, 4]


async def test_a_topic_created_after_subscribing_is_assigned() -> None:
    b = InMemoryBroker()
    c, h = make(b)
    await c.start()
    assert await drain(c) == [] and not c.assigned
    b.create_topic(T, 2)
    b.produce(T, b"x", partition=1)
    assert offsets(await drain(c)) == {1: [0]}
    assert h.events == [("assign", [tp(0), tp(1)])]


async def test_latest_reset_starts_new_partitions_at_the_end() -> None:
    b = filled(1, 3)
    c, _ = make(b, auto_offset_reset="latest")
    await c.start()
    assert await drain(c) == []
    b.produce(T, b"after", partition=0)
    assert offsets(await drain(c)) == {0: [3]}


# -- offsets -------------------------------------------------------------------------------------------------------


async def test_committed_offsets_move_only_by_commits() -> None:
    b = filled(1, 5)
    c, _ = make(b)
    await c.start()
    await drain(c)
    await c.commit()
    assert b.committed("g", tp(0)) is None, "nothing stored: commit() is a no-op"
    c.store({tp(0): 4})
    await c.seek(tp(0), 0)
    await drain(c)
    assert b.committed("g", tp(0)) is None, "store, seek and consume do not commit"
    await c.commit()
    assert b.committed("g", tp(0)) == 4
    c.store({tp(0): 1})
    await c.commit()
    assert b.committed("g", tp(0)) == 1, "an explicit commit may go backwards"
    b.commit("g", {tp(0): 3})
    await c.close()
    nxt, _ = make(b)
    await nxt.start()
    assert offsets(await drain(nxt)) == {0: [3, 4]}


async def test_seek_takes_logical_offsets_and_resets_past_the_end() -> None:
    b = filled(1, 4)
    b.commit("g", {tp(0): 1})
    c, _ = make(b)
    await c.start()
    assert offsets(await drain(c)) == {0: [1, 2, 3]}
    await c.seek(tp(0), OFFSET_BEGINNING)
    assert offsets(await drain(c)) == {0: [0, 1, 2, 3]}
    await c.seek(tp(0), OFFSET_STORED)
    assert offsets(await drain(c)) == {0: [1, 2, 3]}
    await c.seek(tp(0), OFFSET_END)
    assert await drain(c) == []
    await c.seek(tp(0), 99)
    assert offsets(await drain(c)) == {0: [0, 1, 2, 3]}, "out of range: auto_offset_reset (earliest)"
    with pytest.raises(ValueError):
        await c.seek(tp(0), -5)


async def test_auto_commit_on_the_injected_clock_and_at_revoke_and_close() -> None:
    clock = ManualClock()
    b = filled(2, 3)
    c, _ = make(b, auto_commit_interval_s=5.0, clock=clock)
    await c.start()
    await drain(c)
    c.store({tp(0): 2, tp(1): 1})
    await c.consume(10, 0)
    assert b.committed_offsets("g") == {}, "interval not reached"
    clock.advance(5)
    await c.consume(10, 0)
    assert b.committed_offsets("g") == {tp(0): 2, tp(1): 1}
    c.store({tp(0): 3})
    c.schedule_revoke([tp(0)])
    await c.consume(10, 0)
    assert b.committed("g", tp(0)) == 3, "stored offsets of revoked partitions are committed"
    c.store({tp(1): 3})
    await c.close()
    assert b.committed("g", tp(1)) == 3, "and at close"


# -- consume(): time, order, EOF -----------------------------------------------------------------------------------


async def test_consume_returns_at_once_unless_a_sleep_is_injected() -> None:
    b = filled(1, 0)
    clock = ManualClock()
    c, _ = make(b, clock=clock)
    await c.start()
    assert await c.consume(10, 5.0) == []
    assert clock() == 0.0

    slept, _ = make(b, group="g2", sleep=clock.sleep, clock=clock)
    await slept.start()
    assert await slept.consume(10, 5.0) == []
    assert clock() == 5.0, "the timeout was spent on the injected clock"

    async def produce_later() -> None:
        await asyncio.sleep(0)
        b.produce(T, b"during", partition=0)

    task = asyncio.create_task(produce_later())
    got = await slept.consume(10, 1.0)
    await task
    assert [m.value() for m in got] == [b"during"], "what arrives while waiting is returned"
    assert clock() == 6.0


async def test_partitions_are_served_round_robin_and_max_messages_is_respected() -> None:
    b = filled(3, 4)
    c, _ = make(b)
    await c.start()
    first = await c.consume(5, 0)
    assert [(m.partition(), m.offset()) for m in first] == [(0, 0), (1, 0), (2, 0), (0, 1), (1, 1)]
    second = await c.consume(5, 0)
    assert [(m.partition(), m.offset()) for m in second] == [(1, 2), (2, 1), (0, 2), (1, 3), (2, 2)]
    with pytest.raises(ValueError):
        await c.consume(0, 0)


async def test_partition_eof_once_per_arrival_at_the_end_and_never_while_paused() -> None:
    b = filled(2, 1)
    c, _ = make(b, partition_eof=True)
    await c.start()
    got = await drain(c)
    eofs = [(m.partition(), m.offset()) for m in got if m.error() is not None]
    assert eofs == [(0, 1), (1, 1)]
    err = got[-1].error()
    assert err is not None and err.code() == KafkaError._PARTITION_EOF
    assert await drain(c) == [], "not repeated"
    c.pause([tp(1)])
    b.produce(T, b"x", partition=0)
    b.produce(T, b"y", partition=1)
    got = await drain(c)
    assert [(m.partition(), m.offset(), m.error() is not None) for m in got] == [(0, 1, False), (0, 2, True)]


# -- hooks that misbehave ------------------------------------------------------------------------------------------


async def test_failing_hooks_are_logged_and_the_consumer_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    b = filled(1, 2)

    async def bad_assign(tps: list[TopicPartition]) -> list[TopicPartition]:
        raise RuntimeError("boom")

    async def bad_revoke(tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        raise RuntimeError("boom")

    c = InMemoryConsumer(b, "g", [T], on_assign=bad_assign, on_revoke=bad_revoke)
    await c.start()
    with caplog.at_level(logging.ERROR, "service.kafka.memory"):
        assert offsets(await drain(c)) == {0: [0, 1]}, "assigned and not paused despite the failure"
        c.store({tp(0): 2})
        await c.close()
    assert b.committed_offsets("g") == {}, "a failed revoke hook commits nothing"
    assert [r.getMessage() for r in caplog.records] == ["assign hook failed", "revoke hook failed"]


async def test_a_hook_past_its_timeout_is_left_running(caplog: pytest.LogCaptureFixture) -> None:
    b = filled(1, 1)
    release = asyncio.Event()
    finished: list[bool] = []

    async def slow_revoke(tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        await release.wait()
        finished.append(True)
        return {tps[0]: 1}

    c = InMemoryConsumer(b, "g", [T], on_revoke=slow_revoke, hook_timeout_s=0.01)
    await c.start()
    await drain(c)
    with caplog.at_level(logging.ERROR, "service.kafka.memory"):
        await c.close()
    assert "still running" in caplog.text
    assert b.committed_offsets("g") == {}
    release.set()
    await asyncio.sleep(0.01)
    assert finished == [True], "not cancelled, as with the real consumer"


async def test_a_crash_while_a_hook_runs_commits_nothing() -> None:
    b = filled(1, 1)
    holder: list[InMemoryConsumer] = []

    async def revoke_then_die(tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        holder[0].crash()
        return {tps[0]: 1}

    c = InMemoryConsumer(b, "g", [T], on_revoke=revoke_then_die)
    holder.append(c)
    await c.start()
    await drain(c)
    c.schedule_revoke([tp(0)])
    assert await c.consume(10, 0) == []
    assert b.committed_offsets("g") == {} and c.closed and b.members("g") == []


# -- at-least-once under random rebalances and crashes ---------------------------------------------------------------

OPS = st.lists(
    st.sampled_from(["consume_a", "consume_b", "commit_a", "commit_b", "crash", "revoke", "lost", "join", "produce"]),
    max_size=40,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS)
def test_no_record_is_skipped_and_order_holds_within_an_assignment(ops: list[str]) -> None:
    """Whatever the interleaving of rebalances, crashes and commits: within one assignment a partition's
    records come in increasing, gap-free offsets starting at the committed offset, commits never pass what was
    delivered, and after everything settles every record was delivered at least once."""

    async def run() -> None:
        b = filled(3, 4)
        delivered: set[tuple[int, int]] = set()
        expect_next: dict[tuple[str, TopicPartition], int] = {}
        members: dict[str, InMemoryConsumer] = {}

        def member(name: str) -> InMemoryConsumer:
            async def on_assign(tps: list[TopicPartition]) -> list[TopicPartition]:
                for t in tps:
                    expect_next[(name, t)] = b.committed("g", t) or 0
                return []

            async def on_revoke(tps: list[TopicPartition]) -> dict[TopicPartition, int]:
                return {t: expect_next.pop((name, t)) for t in tps}

            async def on_lost(tps: list[TopicPartition]) -> None:
                for t in tps:
                    expect_next.pop((name, t), None)

            return InMemoryConsumer(b, "g", [T], on_assign=on_assign, on_revoke=on_revoke, on_lost=on_lost, name=name)

        async def consume(name: str) -> None:
            c = members.get(name)
            if c is None:
                return
            for m in await c.consume(3, 0):
                t = TopicPartition(m.topic(), m.partition())
                assert m.offset() == expect_next[(name, t)], "in order, no gap, from the committed offset"
                expect_next[(name, t)] = m.offset() + 1
                delivered.add((m.partition(), m.offset()))

        async def commit(name: str) -> None:
            c = members.get(name)
            if c is not None:
                c.store({t: off for (n, t), off in expect_next.items() if n == name})
                await c.commit()

        async def join(name: str) -> None:
            if name not in members:
                c = members[name] = member(name)
                await c.start()

        await join("a")
        for op in ops:
            if op == "consume_a":
                await consume("a")
            elif op == "consume_b":
                await consume("b")
            elif op == "commit_a":
                await commit("a")
            elif op == "commit_b":
                await commit("b")
            elif op == "crash" and "a" in members:
                members.pop("a").crash()
                for key in [k for k in expect_next if k[0] == "a"]:
                    del expect_next[key]
                await join("a")
            elif op == "revoke" and "a" in members:
                members["a"].schedule_revoke(sorted(members["a"].assigned)[:1])
            elif op == "lost" and "b" in members:
                members["b"].schedule_lost(sorted(members["b"].assigned)[:1])
            elif op == "join":
                await join("b")
            elif op == "produce":
                b.produce(T, b"more")
            for t, off in b.committed_offsets("g").items():
                assert off <= b.end_offset(t)
        b.rebalance_group("g")
        for _ in range(30):
            for name in list(members):
                await consume(name)
        everything = {(t.partition, o) for t in b.partitions(T) for o in range(b.end_offset(t))}
        assert delivered == everything, "at least once: nothing skipped"

    asyncio.run(run())
