"""The upload gate: uploads stop while TikTok refuses our token, the endpoint is not TikTok or the app's quota is
spent, and restart alone.

Neither condition is a property of the rows, so nothing is dead-lettered and no retry budget is spent; the loop
pauses consumption while the gate is closed (a global pause reason) and `/readyz` reports why.

Invariants (tests/pipeline/test_gate.py):
- while closed, no new batch is dispatched and a waiting batch sends only when it holds the probe ticket;
- the probe runs on its own timer for as long as the gate is closed, independent of the batch that closed
  it: a ticket goes to some waiting batch every `retry_s`, and when no batch waits (their partitions were
  revoked, say) the gate opens and the next upload is the probe. So a revoke can never leave it closed;
- any answer that proves TikTok accepted token and endpoint opens it;
- a quota pause (`quota`: TikTok answered only rate limits for long) probes after `quota_pause_s`, longer than
  TikTok's 5-minute pause of an app that overran its per-minute quota, instead of every `retry_s`.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Literal

from service import metrics as m
from service.core.answers import Answer

log = logging.getLogger(__name__)

GateReason = Literal["auth", "endpoint", "quota"]

_WHY = {
    "auth": "TikTok rejected the access token",
    "endpoint": "the TikTok endpoint answered with something that is not TikTok's API (check TIKTOK_API_URL)",
    "quota": "TikTok has answered only rate limits (40100) for a while: the app's per-minute quota is spent and "
    "TikTok pauses the app for 5 minutes (lower TIKTOK_MAX_QPS, or ask TikTok for a higher tier)",
}


class UploadGate:
    def __init__(
        self,
        retry_s: float,
        *,
        quota_pause_s: float = 310.0,
        on_change: Callable[[], None] = lambda: None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.retry_s = retry_s
        self.quota_pause_s = quota_pause_s
        self.reason: GateReason | None = None
        self._on_change = on_change
        self._sleep = sleep
        self._waiters: deque[asyncio.Future[bool]] = deque()
        self._prober: asyncio.Task[None] | None = None
        m.AUTH_OK.set(1)

    @property
    def is_open(self) -> bool:
        return self.reason is None

    def close(self, reason: GateReason, answer: Answer) -> None:
        if self.reason != reason:
            log.error(
                "%s (HTTP %s, code %s, request_id=%s): uploads and consumption paused until it works",
                _WHY[reason],
                answer.http_status,
                answer.code,
                answer.request_id,
                extra={"tiktok_code": answer.code, "tiktok_request_id": answer.request_id},
            )
        if reason == "quota" and self.reason != "quota":
            m.TIKTOK_QUOTA_PAUSES.inc()
        self.reason = reason
        m.AUTH_OK.set(0 if reason == "auth" else 1)
        m.TIKTOK_QUOTA_PAUSED.set(1 if reason == "quota" else 0)
        if self._prober is None or self._prober.done():
            self._prober = asyncio.create_task(self._probe_loop(), name="upload-gate-probe")
        self._on_change()

    def open(self) -> None:
        if self.reason is None:
            return
        log.info("TikTok accepts our requests again: resuming")
        self.reason = None
        m.AUTH_OK.set(1)
        m.TIKTOK_QUOTA_PAUSED.set(0)
        while self._waiters:
            w = self._waiters.popleft()
            if not w.done():
                w.set_result(False)
        if self._prober is not None and self._prober is not asyncio.current_task():
            self._prober.cancel()
        self._prober = None
        self._on_change()

    async def wait_turn(self) -> None:
        """Return when the gate is open, or when this caller may send as the probe."""
        while self.reason is not None:
            fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
            if await fut:
                return  # the probe ticket: send once, the answer opens or closes the gate

    async def _probe_loop(self) -> None:
        while self.reason is not None:
            await self._sleep(self.quota_pause_s if self.reason == "quota" else self.retry_s)
            if self.reason is None:
                return
            while self._waiters:
                w = self._waiters.popleft()
                if not w.done():
                    w.set_result(True)
                    break
            else:
                log.info("no held upload to probe with: reopening; the next upload probes")
                self.open()
                return

    def close_all(self) -> None:
        if self._prober is not None:
            self._prober.cancel()
        for w in self._waiters:
            w.cancel()
        self._waiters.clear()
