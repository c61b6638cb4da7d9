"""The upload gate's probe timer: how long each kind of closure waits before a batch may probe again."""

from __future__ import annotations

import asyncio

from service import metrics as m
from service.core.answers import Answer, classify
from service.pipeline.gate import UploadGate

RATE_LIMITED = Answer(classify(200, 40100), 200, 40100, "too frequent")
BAD_TOKEN = Answer(classify(200, 40105), 200, 40105, "bad token")


class Sleeps:
    def __init__(self) -> None:
        self.asked: list[float] = []

    async def __call__(self, s: float) -> None:
        self.asked.append(s)
        await asyncio.sleep(0)


async def _probe_wait(reason: str, answer: Answer) -> tuple[list[float], bool]:
    sleeps = Sleeps()
    gate = UploadGate(15.0, quota_pause_s=310.0, sleep=sleeps)
    gate.close(reason, answer)  # type: ignore[arg-type]
    paused = m.TIKTOK_QUOTA_PAUSED._value.get() == 1
    waiter = asyncio.create_task(gate.wait_turn())
    await asyncio.wait_for(waiter, 1)  # the probe ticket
    gate.open()
    return sleeps.asked, paused


async def test_a_quota_pause_probes_after_tiktoks_five_minutes_not_after_the_auth_retry() -> None:
    before = m.TIKTOK_QUOTA_PAUSES._value.get()
    asked, paused = await _probe_wait("quota", RATE_LIMITED)
    assert asked and set(asked) == {310.0} and paused
    assert m.TIKTOK_QUOTA_PAUSES._value.get() == before + 1
    assert m.TIKTOK_QUOTA_PAUSED._value.get() == 0, "open() ends the pause"


async def test_an_auth_outage_probes_every_retry_interval() -> None:
    asked, paused = await _probe_wait("auth", BAD_TOKEN)
    assert asked and set(asked) == {15.0} and not paused
