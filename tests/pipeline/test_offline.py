"""Offline events on the real `Pipeline` (in-memory broker, scripted TikTok): the second scheduler with the
`OfflineSink` (service/pipeline/uploads.py) next to the audience one, on one topic and one ledger.

- a refused event among 50 is isolated by bisection: only it is dead-lettered `tiktok_rejected`, the others sent;
- an auth outage seen by `/event/track/` closes the one shared gate: audience uploads stop too, nothing is
  dead-lettered, and both resume when the token works again;
- a rate-limit answer is retried on the offline token bucket alone;
- offsets are committed only when every record up to them is finished, whichever stream it belongs to.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
import pytest

from service import metrics as m
from service.core.answers import Answer, classify
from service.core.dlq_guard import DlqGuard
from service.core.mappings import Mappings
from service.core.offline import OfflineSettings
from service.core.types import TopicPartition
from tests.pipeline.harness import SRC, mappings
from tests.pipeline.rig import RATE_LIMITED, REFUSED, Rig, Tik, users_on

pytestmark = pytest.mark.timeout(30)

EVENT_SET = "7000000000000000001"
OK = Answer(classify(200, 0), 200, 0, "OK")
AUTH = Answer(classify(200, 40105), 200, 40105, "access token expired")


def offline_maps() -> Mappings:
    base = mappings(late=False)
    return Mappings({e.audience_key: e for e in base}, "m.yaml", OfflineSettings(default_event_set_id=EVENT_SET))


def conversion(i: int, *, user: str) -> bytes:
    return orjson.dumps(
        {
            "offline_event": True,
            "event": "CompletePayment",
            "event_time": int(time.time() * 1000) - 60_000,
            "event_id": f"evt-{i}",
            "external_id": user,
            "currency": "USD",
            "value": 10.0 + i,
        }
    )


class Events:
    """`/event/track/`: one bad event fails the whole request (as TikTok and the sandbox do)."""

    def __init__(self, *, bad: set[str] | None = None) -> None:
        self.bad = bad or set()
        self.requests: list[list[str]] = []
        self.received: list[str] = []
        self.answers: list[Answer] = []  # scripted answers, used first
        self.auth_down = False  # answer "access token expired" while set

    async def post_event_track(self, body: bytes) -> Answer:
        doc: dict[str, Any] = orjson.loads(body)
        assert doc["event_source"] == "offline" and doc["event_source_id"] == EVENT_SET
        ids = [d["event_id"] for d in doc["data"]]
        self.requests.append(ids)
        await asyncio.sleep(0)
        if self.auth_down:
            return AUTH
        if self.answers:
            return self.answers.pop(0)
        if self.bad & set(ids):
            return REFUSED
        self.received.extend(ids)
        return OK


def produce_conversions(rig: Rig, n: int, partition: int = 0) -> list[str]:
    users = users_on(partition, n)
    for i, u in enumerate(users):
        rig.produce(u, "a1", value=conversion(i, user=u))
    return [f"evt-{i}" for i in range(n)]


async def test_a_refused_event_among_50_is_the_only_one_dead_lettered() -> None:
    events = Events(bad={"evt-17"})
    sent_before = m.OFFLINE_EVENTS.labels("CompletePayment", "sent")._value.get()
    async with Rig(events=events, maps=offline_maps(), linger_s=0.05) as rig:
        ids = produce_conversions(rig, 50)
        for u in users_on(1, 5):
            rig.produce(u, "a1")  # membership events on the same topic
        await rig.start()
        assert await rig.until(rig.all_committed, 10), f"uncommitted {rig.uncommitted()}"
        assert sorted(events.received) == sorted(i for i in ids if i != "evt-17")
        letters = rig.letters()
        assert [h["dlq.reason"] for h in letters] == ["tiktok_rejected"]
        assert len(rig.lettered_offsets()) == 1
        assert len(events.requests) > 1  # bisected
        assert all(rig.tiktok.member("a1", u) for u in users_on(1, 5))  # audiences unaffected
        assert m.OFFLINE_EVENTS.labels("CompletePayment", "sent")._value.get() - sent_before == 49


async def test_membership_and_offline_records_are_never_confused() -> None:
    events = Events()
    async with Rig(events=events, maps=offline_maps()) as rig:
        ids = produce_conversions(rig, 10)
        members = users_on(0, 10, skip=10)
        for u in members:
            rig.produce(u, "a2")
        await rig.start()
        assert await rig.until(rig.all_committed, 10), f"uncommitted {rig.uncommitted()}"
        assert sorted(events.received) == sorted(ids)
        users_sent = {u for r in rig.tiktok.log for u in r.users}
        assert users_sent == set(members)
        assert not rig.letters()


async def test_an_auth_outage_on_event_track_stops_audience_uploads_too() -> None:
    events = Events()
    events.auth_down = True
    tik = Tik()
    async with Rig(tiktok=tik, events=events, maps=offline_maps(), auth_retry_s=0.02) as rig:
        produce_conversions(rig, 5)
        await rig.start()
        assert await rig.until(lambda: not rig.pipeline.gate.is_open, 5)
        # While the shared gate is closed, no audience request goes out, and nothing is dead-lettered.
        for u in users_on(1, 5):
            rig.produce(u, "a1")
        await asyncio.sleep(0.2)
        assert not rig.pipeline.gate.is_open and rig.pipeline.gate.reason == "auth"
        assert not tik.log
        assert not rig.pipeline.auth_ok
        events.auth_down = False
        assert await rig.until(rig.all_committed, 10), f"uncommitted {rig.uncommitted()}"
        assert len(events.received) == 5
        assert all(rig.tiktok.member("a1", u) for u in users_on(1, 5))
        assert not rig.letters()  # an auth outage never dead-letters


async def test_a_rate_limit_is_retried_on_the_offline_bucket_only() -> None:
    events = Events()
    events.answers = [RATE_LIMITED]
    async with Rig(events=events, maps=offline_maps(), events_max_qps=40.0) as rig:
        produce_conversions(rig, 5)
        await rig.start()
        assert await rig.until(rig.all_committed, 10), f"uncommitted {rig.uncommitted()}"
        assert sorted(events.received) == [f"evt-{i}" for i in range(5)]
        assert not rig.letters()
        offline = rig.pipeline.offline_uploads
        assert offline is not None
        assert offline.bucket is not rig.pipeline.uploads.bucket
        assert offline.bucket.rate < 40.0  # throttled after the rate-limit answer
        assert rig.pipeline.uploads.bucket.rate == 100_000


async def test_an_offset_waits_for_an_unfinished_offline_event_behind_it() -> None:
    """Membership records after a held conversion on the same partition are uploaded but not committed."""
    events = Events()
    events.answers = []
    hold = asyncio.Event()
    original = events.post_event_track

    async def held(body: bytes) -> Answer:
        await hold.wait()
        return await original(body)

    events.post_event_track = held  # type: ignore[method-assign]
    async with Rig(events=events, maps=offline_maps()) as rig:
        u = users_on(0, 1)[0]
        rig.produce(u, "a1", value=conversion(0, user=u))
        for v in users_on(0, 3, skip=1):
            rig.produce(v, "a1")
        await rig.start()
        tp = TopicPartition(SRC, 0)
        assert await rig.until(lambda: all(rig.tiktok.member("a1", v) for v in users_on(0, 3, skip=1)), 5)
        await asyncio.sleep(0.05)
        assert rig.committed(tp) == 0
        hold.set()
        assert await rig.until(rig.all_committed, 10), f"uncommitted {rig.uncommitted()}"


async def test_offline_events_without_an_event_set_are_dead_lettered_at_intake() -> None:
    events = Events()
    base = mappings(late=False)
    async with Rig(events=events, maps=base) as rig:
        produce_conversions(rig, 3)
        await rig.start()
        assert await rig.until(rig.all_committed, 10), f"uncommitted {rig.uncommitted()}"
        assert [h["dlq.reason"] for h in rig.letters()] == ["missing_event_set_id"] * 3
        assert not events.requests


async def test_held_missing_event_set_letters_are_sent_after_a_mappings_fix() -> None:
    """The DLQ guard trips on missing_event_set_id (the 4th in a row is held); the reload that adds the event set
    resolves the held record again and sends it."""
    loop = asyncio.get_running_loop()
    guard = DlqGuard(4, 30.0, loop.time)
    events = Events()
    async with Rig(events=events, maps=mappings(late=False), guard=guard) as rig:
        ids = produce_conversions(rig, 4)
        await rig.start()
        assert await rig.until(lambda: guard.tripped, 2), "the guard never tripped"
        assert not events.received
        rig.pipeline.set_mappings(offline_maps())
        assert await rig.until(rig.all_committed, 5), f"uncommitted {rig.uncommitted()}"
        # The letters written before the trip stay letters (replay them); the held one is sent instead.
        assert events.received == ids[3:]
        assert [h["dlq.reason"] for h in rig.letters()] == ["missing_event_set_id"] * 3
