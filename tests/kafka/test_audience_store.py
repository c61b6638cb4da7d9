"""The audience store's claim rule (who may create an audience), as a pure function and on the real broker."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from service.devtools.broker import LocalBroker
from service.kafka.audience_store import AudienceRef, AudienceStore, Claim, Hold, holder, next_hold

TTL = 60.0
REF: AudienceRef = ("7000000000000000001", "Seed")


def claims(*made: tuple[str, float]) -> list[Claim]:
    """Claims in log order from (replica, wall time) pairs; offsets follow the order."""
    return [Claim(offset, replica, at) for offset, (replica, at) in enumerate(made)]


def test_the_first_claim_wins_and_others_lose_while_it_is_live() -> None:
    assert holder([], TTL) is None
    assert holder(claims(("a", 0.0), ("b", 0.1), ("c", 59.9)), TTL) == Hold("a", 0, 60.0)


def test_the_holder_retrying_its_own_creation_renews_its_hold() -> None:
    # a wins, TikTok answers 5xx, b claims meanwhile, a retries: a must not lose to (or wait for) itself
    log = claims(("a", 0.0), ("b", 5.0), ("a", 6.0), ("a", 62.0), ("b", 65.0))
    assert holder(log[:3], TTL) == Hold("a", 0, 66.0)
    # its retries outlast the first claim's TTL: still a's, and b's claim in between took no place in line
    assert holder(log, TTL) == Hold("a", 0, 122.0)


def test_a_lapsed_hold_goes_to_the_next_claim() -> None:
    assert holder(claims(("a", 0.0), ("b", 60.0)), TTL) == Hold("b", 1, 120.0)
    # a claim that lost earlier keeps no place: the first claim after the lapse wins, not the oldest loser
    assert holder(claims(("a", 0.0), ("b", 30.0), ("c", 61.0)), TTL) == Hold("c", 2, 121.0)


def test_two_waiters_of_a_dead_holder_do_not_hand_the_claim_back_and_forth() -> None:
    # a dies holding; b and c lost to it and claim again when its hold lapses: b (first in the log) wins, and c's
    # claims, even after b's first claim would have expired, do not take it over while b keeps it renewed
    log = claims(("a", 0.0), ("b", 1.0), ("c", 2.0), ("b", 60.0), ("c", 60.01), ("c", 61.5))
    assert holder(log, TTL) == Hold("b", 3, 120.0)


def test_every_reader_agrees_whatever_the_time_it_reads() -> None:
    # judged by each claim's own time: the same log gives the same holder at every prefix, for every reader
    log = claims(("a", 0.0), ("b", 30.0), ("a", 50.0), ("c", 111.0), ("a", 112.0))
    hold: Hold | None = None
    seen = []
    for claim in log:
        hold = next_hold(hold, claim, TTL)
        seen.append(hold.replica)
    assert seen == ["a", "a", "a", "c", "c"]


def test_a_late_delivered_claim_is_judged_by_when_it_was_made() -> None:
    # a claim written at t=10 that reaches the log after b's (t=61, once a's hold lapsed) loses to b's hold
    log = [Claim(0, "a", 0.0), Claim(1, "b", 61.0), Claim(2, "c", 10.0)]
    assert holder(log, TTL) == Hold("b", 1, 121.0)


@pytest.mark.integration
def test_the_holder_wins_its_own_retry_and_waiters_see_the_lapse(broker: LocalBroker) -> None:
    async def scenario() -> tuple[list[bool], float, str | None]:
        topic = f"store-{uuid.uuid4().hex[:8]}"
        conf = {"bootstrap.servers": broker.bootstrap}
        a, b = AudienceStore(conf, topic, claim_ttl_s=TTL), AudienceStore(conf, topic, claim_ttl_s=TTL)
        short = AudienceStore(conf, f"{topic}-short", claim_ttl_s=1.0)
        other = AudienceStore(conf, f"{topic}-short", claim_ttl_s=1.0)
        try:
            for s in (a, b, short, other):
                await s.ensure_started()
            wins = [await a.claim(REF), await b.claim(REF), await a.claim(REF), await b.claim(REF)]
            # a waiter wakes (None) as soon as the holder's hold lapses, without waiting out its own timeout
            assert await short.claim(REF)
            assert not await other.claim(REF)
            started = time.monotonic()
            lapsed = await other.wait_for_holder(REF, 30.0)
            assert lapsed is None
            waited = time.monotonic() - started
            assert await other.claim(REF), "the first claim after the lapse wins"
            await a.publish(REF, "4242")
            got = await b.wait_for_holder(REF, 5.0)
        finally:
            for s in (a, b, short, other):
                s.close()
        return wins, waited, got

    wins, waited, got = asyncio.run(scenario())
    assert wins == [True, False, True, False]
    assert waited < 3.0
    assert got == "4242"
