"""TikTok's rate budget on the real `Pipeline` (in-memory broker, scripted TikTok, real asyncio time).

- When the QPS cap binds under a backlog, rows per request grow toward the ceiling instead of rows waiting,
  so the drain rate is QPS x rows per request, not QPS x `BATCH_MAX_ROWS`; a trickle still leaves in small
  batches within the linger time.
- A rate-limit answer that persists is read as the app's per-minute quota: uploads pause for TikTok's
  5-minute penalty instead of retrying every few seconds, and nothing is dead-lettered meanwhile.
"""

from __future__ import annotations

import asyncio

import pytest

from service import metrics as m
from service.core.answers import Answer
from service.core.retry import Backoff
from tests.pipeline.harness import ADV_B
from tests.pipeline.rig import POOL, RATE_LIMITED, Request, Rig, Tik

pytestmark = pytest.mark.timeout(30)


class Timed(Tik):
    """`Tik` that also notes when each request arrived (loop time)."""

    def __init__(self) -> None:
        super().__init__()
        self.times: list[float] = []

    async def post_mapping(self, body: bytes) -> Answer:
        self.times.append(asyncio.get_running_loop().time())
        return await super().post_mapping(body)


async def test_rows_per_request_grow_toward_the_ceiling_when_the_qps_cap_binds() -> None:
    """6,000 rows at 10 QPS with BATCH_MAX_ROWS=100: the old scheduler sent 60 requests of 100 rows (6 s);
    requests are the scarce resource, so each one carries what gathered meanwhile, up to the ceiling."""
    tik = Tik()
    async with Rig(
        tiktok=tik, max_qps=10, max_rows=100, max_rows_scarce=2000, max_pending=20_000, consume_batch=500
    ) as rig:
        for key in ("a1", "a2"):  # one batch key: same advertiser, action and column layout
            for u in POOL:
                rig.produce(u, key)
        await rig.start()
        assert await rig.until(rig.all_committed, 10), f"uncommitted {rig.uncommitted()}"
        sizes = [r.rows for r in tik.log]
        assert sum(sizes) == 6000
        assert len(sizes) <= 12, f"{len(sizes)} requests for 6,000 rows at 10 QPS: {sizes}"
        assert max(sizes) > 100 and max(sizes) <= 2000, sizes
        assert rig.pipeline.uploads.scarce
        assert m.BATCH_ROWS_LIMIT._value.get() == 2000
        assert not rig.letters()


async def test_a_trickle_under_the_same_cap_leaves_in_small_batches_within_the_linger() -> None:
    tik = Timed()
    linger = 0.05
    async with Rig(tiktok=tik, max_qps=10, max_rows=100, max_rows_scarce=2000, linger_s=linger) as rig:
        await rig.start()
        produced: list[float] = []
        for u in POOL[:12]:  # ~6.7 records/s: fewer than the 10 requests/s the cap allows
            rig.produce(u, "a1")
            produced.append(rig.loop.time())
            await asyncio.sleep(0.15)
        assert await rig.until(rig.all_committed, 3), f"uncommitted {rig.uncommitted()}"
        assert [r.rows for r in tik.log] == [1] * 12, "each record left alone, at linger"
        waits = [t - p for t, p in zip(tik.times, produced, strict=True)]
        assert max(waits) < linger + 0.1, f"event → request waits {waits}"
        assert not rig.pipeline.uploads.scarce
        assert m.BATCH_ROWS_LIMIT._value.get() == 100


async def test_a_small_buffer_gets_its_turn_while_a_big_one_keeps_refilling() -> None:
    """Requests scarce, two advertisers: B's 3 rows, consumed early in A's 6,000-row backlog, leave with the
    next request or two (first come, first served), not after the backlog (which keeps A's buffer the biggest)."""
    tik = Timed()
    async with Rig(tiktok=tik, max_qps=5, max_rows=50, max_rows_scarce=500, max_pending=20_000) as rig:
        for i, u in enumerate(POOL):
            rig.produce(u, "a1")
            if i == 600:
                for b in POOL[:3]:
                    rig.produce(b, "b1")
        for u in POOL:
            rig.produce(u, "a2")
        await rig.start()
        assert await rig.until(rig.all_committed, 10), f"uncommitted {rig.uncommitted()}"
        advertisers = [r.advertiser for r in tik.log]
        first_b = advertisers.index(ADV_B)
        assert first_b <= 3, f"advertiser B's rows waited behind {first_b} of {len(advertisers)} requests"


async def test_a_persistent_rate_limit_pauses_uploads_for_the_quota_instead_of_retrying() -> None:
    """TikTok answers 40100 for 1.2 s (a spent per-minute quota, scaled down): after `quota_after_s` of nothing
    else the uploads stop for `quota_pause_s`; then they resume and everything syncs, nothing dead-lettered."""
    limited = True

    def quota(tik: Tik, req: Request) -> Answer | None:
        return RATE_LIMITED if limited else None

    tik = Tik(rule=quota)
    pauses_before = m.TIKTOK_QUOTA_PAUSES._value.get()
    async with Rig(
        tiktok=tik,
        max_qps=200,
        max_rows=5,
        quota_after_s=0.2,
        quota_pause_s=0.5,
        backoff=Backoff(0.005, 0.02, 30.0),
    ) as rig:
        for u in POOL[:20]:
            rig.produce(u, "a1")
        await rig.start()
        assert await rig.until(lambda: m.TIKTOK_QUOTA_PAUSED._value.get() == 1, 3), "no quota pause"
        await asyncio.sleep(1.0)
        during = tik.requests
        limited = False
        assert await rig.until(rig.all_committed, 5), f"uncommitted {rig.uncommitted()}"
        assert m.TIKTOK_QUOTA_PAUSED._value.get() == 0
        assert m.TIKTOK_QUOTA_PAUSES._value.get() > pauses_before
        assert not rig.letters(), "a quota pause spends no retry budget"
        # 4 batches retrying every 5-20 ms for 1.2 s would be ~300 requests; the pause leaves the first 0.2 s
        # of retries and one probe per pause.
        assert during <= 60, f"{during} requests while TikTok answered only rate limits"
