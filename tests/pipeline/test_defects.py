"""One scenario per defect of issue 10, each on the real `Pipeline` and the in-memory broker.

Every scenario drives the pipeline from the outside only (records in the source topic, TikTok's answers, the
stand-ins of tests/pipeline/harness.py, rebalances) and asserts on what the outside world can see: TikTok's
cells and requests, the dead-letter topic, committed offsets, paused partitions, metrics. So the same test runs
on the design before issue 10 (commit 9962537), where each of them fails.

Timing: real asyncio time with millisecond settings; every wait is bounded (`Rig.until`), so a regression
fails in seconds instead of hanging.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable

import orjson
import pytest

from service import metrics as m
from service.core.answers import Answer, classify
from service.core.dlq_guard import DlqGuard
from service.core.retry import Backoff
from service.core.types import TopicPartition
from service.pipeline.loop import Pipeline
from tests.pipeline.harness import (
    ADV_B,
    MADE,
    PARTITIONS,
    SRC,
    event,
    mappings,
    partition_of,
)
from tests.pipeline.rig import (
    P0,
    P1,
    P2,
    POOL,
    RATE_LIMITED,
    REFUSED,
    UNAVAILABLE,
    FailingCreator,
    HangingRegistry,
    Request,
    Rig,
    SlowCreator,
    SmallDlq,
    Tik,
    users_on,
)

pytestmark = pytest.mark.timeout(30)


# -- 1. create-on-demand race ---------------------------------------------------------------------------------


async def test_1_a_record_consumed_while_creation_finishes_does_not_overtake_the_held_ones() -> None:
    creator = SlowCreator()
    user = POOL[0]
    tp = TopicPartition(SRC, partition_of(user))
    async with Rig(creator=creator) as rig:
        rig.produce(user, MADE[0], entered=True)  # held: the audience does not exist yet
        await rig.start()
        assert await rig.until(creator.in_window.is_set, 2), "creation never started"
        rig.produce(user, MADE[0], entered=False)  # consumed while the store already knows the id
        assert await rig.until(lambda: rig.consumer.position(tp) == 2, 2), "the exit was not consumed"
        await asyncio.sleep(0.05)  # let it be resolved, routed and (old design) uploaded
        creator.finish.set()
        assert await rig.until(rig.all_committed, 2), f"uncommitted {rig.uncommitted()}"
        await asyncio.sleep(0.02)
        assert rig.tiktok.member(MADE[0], user) is not True, "the user exited last, yet TikTok has them in"
        assert rig.letters() == []


# -- 2. uploads after revoke ----------------------------------------------------------------------------------


async def test_2_no_request_carries_a_revoked_partition_after_on_revoke_returned() -> None:
    tiktok = Tik(delay=0.05)
    async with Rig(tiktok=tiktok, max_qps=2, max_inflight=1, max_rows=2, linger_s=0.001) as rig:
        for u in users_on(0, 10):
            rig.produce(u, "a1")
        await rig.start()
        assert await rig.until(lambda: tiktok.requests >= 1, 1)
        await asyncio.sleep(0.08)  # the next batch is cut and waits for a token (2 per second)
        rig.broker.rebalance(rig.consumer, revoke=[P0])
        assert await rig.until(lambda: P0 not in rig.consumer.assigned, 2), "the revoke never ran"
        await asyncio.sleep(1.2)  # queued batches would be sent by now
        assert not tiktok.fence_violations, tiktok.fence_violations[:3]


# -- 4. one bad audience poisons an advertiser ----------------------------------------------------------------


def deleted_102(tik: Tik, req: Request) -> Answer | None:
    return Answer(classify(200, 40007), 200, 40007, "object does not exist") if "102" in req.audiences else None


async def test_4a_a_deleted_audience_dead_letters_only_its_rows() -> None:
    tiktok = Tik(rule=deleted_102)
    async with Rig(tiktok=tiktok, max_rows=20, linger_s=0.01) as rig:
        healthy, broken = POOL[:6], POOL[6:12]
        refs = {u: rig.produce(u, "a1") for u in healthy}
        bad = {(r.partition, r.offset) for r in (rig.produce(u, "a2") for u in broken)}
        await rig.start()
        assert await rig.until(rig.all_committed, 3), f"uncommitted {rig.uncommitted()}"
        assert any({"101", "102"} <= r.audiences for r in tiktok.log), "the scenario needs a mixed batch"
        assert rig.lettered_offsets() == bad, f"dead-lettered {rig.lettered_offsets()}, only {bad} are broken"
        assert {h["dlq.reason"] for h in rig.letters()} == {"missing_audience_id"}
        assert all(tiktok.member("a1", u) for u in refs), "the healthy audience's rows were not uploaded"


def refuse_101(tik: Tik, req: Request) -> Answer | None:
    return REFUSED if "101" in req.audiences else None


async def test_4b_a_refusal_of_the_whole_request_costs_the_bisection_budget_not_2n_minus_1() -> None:
    tiktok = Tik(rule=refuse_101)
    async with Rig(tiktok=tiktok, max_rows=1000, linger_s=0.05, consume_batch=1000, max_inflight=4) as rig:
        for u in POOL[:1000]:
            rig.produce(u, "a1")
        await rig.start()
        assert await rig.until(rig.all_committed, 10), f"uncommitted {rig.uncommitted()}"
        assert tiktok.log[0].rows == 1000, "the scenario needs one 1,000-row batch"
        assert tiktok.requests <= 81, f"{tiktok.requests} requests for one refused batch (budget: 81)"
        assert len(rig.letters()) == 1000
        assert {h["dlq.reason"] for h in rig.letters()} == {"tiktok_rejected"}


async def test_4c_an_html_404_dead_letters_nothing_and_uploads_resume_when_tiktok_answers() -> None:
    tiktok = Tik()
    tiktok.mode = "html"
    async with Rig(tiktok=tiktok, max_rows=4) as rig:
        users = POOL[:8]
        for u in users:
            rig.produce(u, "a1")
        await rig.start()
        assert await rig.until(lambda: tiktok.requests >= 1, 1)
        await asyncio.sleep(0.2)
        assert rig.letters() == [], f"{len(rig.letters())} rows dead-lettered for a wrong endpoint"
        tiktok.mode = "ok"
        assert await rig.until(rig.all_committed, 2), f"uncommitted {rig.uncommitted()}"
        assert rig.letters() == []
        assert all(tiktok.member("a1", u) for u in users)


# -- 5. unbounded memory --------------------------------------------------------------------------------------


async def test_5_one_slow_advertiser_does_not_make_tracked_records_grow_without_bound() -> None:
    b_down = True

    def b_fails(tik: Tik, req: Request) -> Answer | None:
        return UNAVAILABLE if b_down and req.advertiser == ADV_B else None

    tiktok = Tik(rule=b_fails)
    max_pending, consume_batch = 20, 8
    async with Rig(
        tiktok=tiktok,
        max_pending=max_pending,
        consume_batch=consume_batch,
        backoff=Backoff(0.001, 0.005, 60.0, random.Random(7)),
        max_rows=10,
        linger_s=0.002,
    ) as rig:
        for p in range(PARTITIONS):
            rig.produce(users_on(p, 1)[0], "b1")  # the head of every partition waits for advertiser B
            for u in users_on(p, 40, skip=1):
                rig.produce(u, "a1")
        tps = rig.broker.partitions(SRC)

        def consumed_not_committable() -> int:
            stored = rig.consumer.stored
            return sum(
                (rig.consumer.position(tp) or 0) - max(stored.get(tp, 0), rig.committed(tp))
                for tp in tps
                if tp in rig.consumer.assigned
            )

        peak = 0

        def sample() -> bool:
            nonlocal peak
            peak = max(peak, consumed_not_committable())
            return False

        await rig.start()
        await rig.until(sample, 0.5)
        assert peak <= max_pending + consume_batch, f"{peak} records consumed and not committable"
        assert rig.consumer.paused, "consumption goes on while advertiser B holds every partition's head"
        b_down = False
        assert await rig.until(rig.all_committed, 3), f"uncommitted {rig.uncommitted()}"


# -- 6. an auth outage whose probing batch was revoked ----------------------------------------------------------


async def test_6_an_auth_outage_ends_even_when_the_probing_batch_was_revoked() -> None:
    tiktok = Tik()
    tiktok.mode = "auth"
    async with Rig(tiktok=tiktok) as rig:
        first = users_on(0, 2)
        for u in first:
            rig.produce(u, "a1")
        await rig.start()
        assert await rig.until(lambda: tiktok.requests >= 1, 1)
        rig.broker.rebalance(rig.consumer, revoke=[P0])
        assert await rig.until(lambda: P0 not in rig.consumer.assigned, 2), "the revoke never ran"
        tiktok.mode = "ok"
        await asyncio.sleep(0.1)
        rig.broker.rebalance(rig.consumer, assign=[P0])
        assert await rig.until(lambda: P0 in rig.consumer.assigned, 2)
        later = users_on(0, 2, skip=2) + users_on(1, 2) + users_on(2, 2)
        for u in later:
            rig.produce(u, "a1")
        assert await rig.until(rig.all_committed, 2), f"nothing uploads after the outage: {rig.uncommitted()}"
        assert all(tiktok.member("a1", u) for u in first + later)


# -- 7. creation raising an unexpected exception ----------------------------------------------------------------


async def test_7_an_exception_from_audience_creation_ends_the_hold() -> None:
    creator = FailingCreator(RuntimeError("unexpected"))
    async with Rig(creator=creator) as rig:
        held = [rig.produce(u, MADE[0]) for u in POOL[:2]]
        await rig.start()
        assert await rig.until(lambda: creator.calls == 1, 1)
        await asyncio.sleep(0.02)
        creator.go.set()  # creation raises
        await asyncio.sleep(0.05)
        later = POOL[2]
        rig.produce(later, MADE[0])  # a later record of the key must not hang behind the dead hold
        assert await rig.until(rig.all_committed, 2), f"held records never finished: {rig.uncommitted()}"
        lettered = rig.lettered_offsets()
        assert all((r.partition, r.offset) in lettered for r in held)
        assert rig.tiktok.member(MADE[0], later) is True


# -- 8. a partition paused by on_assign under backpressure ------------------------------------------------------


async def test_8_a_partition_assigned_under_backpressure_is_resumed_with_the_others() -> None:
    tiktok = Tik()
    tiktok.hold = asyncio.Event()  # TikTok does not answer: backpressure builds
    armed = False

    def wrap(p: Pipeline) -> Callable[[list[TopicPartition]], Awaitable[list[TopicPartition]]]:
        async def on_assign(tps: list[TopicPartition]) -> list[TopicPartition]:
            paused = await p.on_assign(tps)
            if armed:  # the cause clears while the assignment is being served, before the loop's next turn
                assert tiktok.hold is not None
                tiktok.hold.set()
                for _ in range(250):
                    if sum(tiktok.cells.values()) >= 8:
                        break
                    await asyncio.sleep(0.002)
            return paused

        return on_assign

    async with Rig(
        tiktok=tiktok,
        auto_assign=False,
        wrap_assign=wrap,
        max_pending=6,
        consume_batch=4,
        max_inflight=1,
        max_rows=2,
        linger_s=0.001,
    ) as rig:
        for u in users_on(0, 5) + users_on(1, 5):
            rig.produce(u, "a1")
        await rig.start(assign=[P0, P1])
        assert await rig.until(lambda: rig.consumer.paused == {P0, P1}, 2), "no backpressure"
        assert rig.consumer.position(P0) == rig.consumer.position(P1) == 4  # 8 records wait for TikTok
        newcomers = users_on(2, 3)
        for u in newcomers:
            rig.produce(u, "a1")
        armed = True
        rig.broker.rebalance(rig.consumer, assign=[P2])
        assert await rig.until(lambda: P2 in rig.consumer.assigned, 2)
        assert await rig.until(lambda: rig.all_committed() and not rig.consumer.paused, 2), (
            f"paused {sorted(rig.consumer.paused)}, uncommitted {rig.uncommitted()}"
        )
        assert all(tiktok.member("a1", u) for u in newcomers)


# -- 9. a dead letter larger than the producer's max ------------------------------------------------------------


async def test_9_a_dead_letter_too_large_for_the_producer_is_written_shrunk() -> None:
    async with Rig(dlq=SmallDlq) as rig:
        dlq = rig.dlq
        assert isinstance(dlq, SmallDlq)
        big = orjson.loads(event(POOL[0], "nope", True, 1))  # "nope" is not mapped: missing_audience_id
        big["properties"]["padding"] = "x" * 5_000
        ref = rig.produce(POOL[0], "nope", value=orjson.dumps(big))
        await rig.start()
        tp = TopicPartition(SRC, ref.partition)
        assert await rig.until(lambda: rig.committed(tp) == ref.offset + 1, 2), (
            f"the letter was refused {dlq.refused} times and never written"
        )
        (letter,) = rig.letters()
        assert letter["dlq.reason"] == "missing_audience_id"
        assert (letter.get("dlq.value.omitted") or "").startswith("too_large"), letter


# -- 10. a row blocked behind an in-flight change to its cell ---------------------------------------------------


async def test_10_a_blocked_row_does_not_turn_every_new_row_into_a_one_row_batch() -> None:
    tiktok = Tik(delay=0.2)
    async with Rig(tiktok=tiktok, max_inflight=8, max_rows=100, linger_s=0.02) as rig:
        x = POOL[0]
        rig.produce(x, "a1", entered=True)
        await rig.start()
        assert await rig.until(lambda: tiktok.requests == 1, 1)  # X's add is in flight
        rig.produce(x, "a1", entered=False)  # blocked behind it
        others = POOL[1:31]
        for u in others:
            rig.produce(u, "a1", entered=False)
            await asyncio.sleep(0.004)
        assert await rig.until(rig.all_committed, 3), f"uncommitted {rig.uncommitted()}"
        singles = [r for r in tiktok.log if r.rows == 1 and x not in r.users]
        sizes = [r.rows for r in tiktok.log]
        assert len(singles) <= 2, f"{len(singles)} one-row requests; request sizes {sizes}"
        assert tiktok.member("a1", x) is False


# -- 12. a Schema Registry that does not answer -----------------------------------------------------------------


async def test_12_an_unanswering_schema_registry_stalls_only_its_partition() -> None:
    registry = HangingRegistry()
    async with Rig(schema_fetcher=registry) as rig:
        avro = b"\x00" + (4242).to_bytes(4, "big") + b"\x02x"  # Confluent framing, schema not loaded
        rig.broker.produce(SRC, avro, b"k", partition=0)
        await rig.start()
        assert await rig.until(lambda: registry.calls >= 1, 1)
        users = users_on(1, 3) + users_on(2, 3)
        for u in users:
            rig.produce(u, "a1")
        assert await rig.until(lambda: rig.all_committed([P1, P2]), 1), (
            f"partitions 1 and 2 wait for the registry: {rig.uncommitted()}"
        )
        assert all(rig.tiktok.member("a1", u) for u in users)
        assert rig.committed(P0) == 0


# -- extras -----------------------------------------------------------------------------------------------------


async def test_the_cooldown_timer_of_an_old_trip_does_not_release_a_new_trip() -> None:
    loop = asyncio.get_running_loop()
    cooldown = 0.8
    guard = DlqGuard(4, cooldown, loop.time)
    async with Rig(guard=guard) as rig:
        for u in POOL[:4]:
            rig.produce(u, "nope")  # not mapped: missing_audience_id, four in a row trip the guard
        await rig.start()
        assert await rig.until(lambda: guard.tripped, 1), "the guard never tripped"
        first_trip = loop.time()
        await asyncio.sleep(0.4)
        rig.pipeline.set_mappings(mappings(late=False))  # released by a reload
        assert not guard.tripped
        for u in POOL[4:8]:
            rig.produce(u, "nope")
        assert await rig.until(lambda: guard.tripped, 0.3), "the guard did not trip again"
        second_trip = loop.time()
        await asyncio.sleep(first_trip + cooldown + 0.1 - loop.time())
        assert guard.tripped, "the first trip's cooldown timer released the second trip"
        assert await rig.until(lambda: not guard.tripped, second_trip + cooldown + 0.3 - loop.time())
        assert await rig.until(rig.all_committed, 2), f"uncommitted {rig.uncommitted()}"


async def test_concurrent_rate_limited_answers_halve_the_rate_once() -> None:
    arrived = 0
    all_in = asyncio.Event()
    rates: list[float] = []

    def qps() -> float:
        return float(m.RATE_LIMIT_QPS._value.get())

    def four_at_once(tik: Tik, req: Request) -> Answer | None:
        nonlocal arrived
        rates.append(qps())
        arrived += 1
        if arrived <= 4:
            if arrived == 4:
                all_in.set()
            return RATE_LIMITED
        return None

    tiktok = Tik(rule=four_at_once)

    async def hold_until_four(body: bytes) -> Answer:
        answer = await Tik.post_mapping(tiktok, body)
        if answer is RATE_LIMITED or answer.code == 40100:
            await asyncio.wait_for(all_in.wait(), 1)  # the four answers come back together
        return answer

    tiktok.post_mapping = hold_until_four  # type: ignore[method-assign]
    async with Rig(tiktok=tiktok, max_qps=100, max_inflight=4, max_rows=1, linger_s=0.001) as rig:
        users = POOL[:4]
        for u in users:
            rig.produce(u, "a1")
        await rig.start()
        assert await rig.until(rig.all_committed, 3), f"uncommitted {rig.uncommitted()}"
        assert rates[0] == 100
        retried = rates[4:]
        assert retried, "no request after the rate-limited ones"
        assert min(retried) >= 40, f"rate after four concurrent rate-limited answers: {min(retried):.2f} (from 100)"
        assert all(tiktok.member("a1", u) for u in users)


async def test_8b_a_pause_plan_made_while_an_assignment_is_served_does_not_strand_the_new_partition() -> None:
    """The narrower form of defect 8: the upload gate reopens (a `_changed` pause plan) inside the assign hook,
    before the consumer paused the new partition on the hook's answer; the partition stayed paused for good.
    Seen failing before the fix (consumer.paused == {P2} forever)."""
    tiktok = Tik()
    tiktok.mode = "auth"

    def wrap(p: Pipeline) -> Callable[[list[TopicPartition]], Awaitable[list[TopicPartition]]]:
        async def on_assign(tps: list[TopicPartition]) -> list[TopicPartition]:
            paused = await p.on_assign(tps)
            if P2 in tps:
                tiktok.mode = "ok"
                for _ in range(500):
                    if p.gate.is_open:
                        break
                    await asyncio.sleep(0.002)
            return paused

        return on_assign

    async with Rig(tiktok=tiktok, auto_assign=False, wrap_assign=wrap, max_rows=2, linger_s=0.001) as rig:
        for u in users_on(0, 2):
            rig.produce(u, "a1")
        await rig.start(assign=[P0, P1])
        assert await rig.until(lambda: rig.consumer.paused == {P0, P1}, 2), "the auth outage pauses consumption"
        newcomers = users_on(2, 2)
        for u in newcomers:
            rig.produce(u, "a1")
        rig.broker.rebalance(rig.consumer, assign=[P2])
        assert await rig.until(lambda: rig.all_committed() and not rig.consumer.paused, 3), (
            f"paused {sorted(rig.consumer.paused)}, uncommitted {rig.uncommitted()}"
        )
        assert all(tiktok.member("a1", u) for u in newcomers)
