"""Dead-letter writing, with the DLQ guard in front of it.

Invariants (tests/pipeline/test_dead_letters.py and the model-based suite):
- a record is finished as dead-lettered only after the broker acknowledged its letter (the offset waits);
- a letter is retried until acknowledged while its record is live; a letter the broker can never take (above
  message.max.bytes) is written shrunk (`fit_dead_letter`, with a header saying what was left out), never
  retried as is forever;
- while the guard is tripped, letters wait (their records stay unfinished, consumption is paused) and are
  resolved again when it opens: a mapping fix turns them into uploads instead of letters;
- exactly one cooldown timer exists per trip: releasing the guard cancels it, so an old timer never releases
  a later trip.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, Protocol

from service import metrics as m
from service.core.dead_letters import DeadLetter, dead_letter_headers, fit_dead_letter
from service.core.dlq_guard import DlqGuard
from service.core.model import DlqReason
from service.core.retry import Backoff
from service.core.types import Headers
from service.kafka.producer import DeliveryError, LetterTooLarge

log = logging.getLogger(__name__)


class LetterProducer(Protocol):
    @property
    def max_message_bytes(self) -> int: ...

    async def send(
        self,
        topic: str,
        *,
        key: bytes | None,
        value: bytes | None,
        headers: Headers | None = None,
        timestamp_ms: int | None = None,
    ) -> None: ...


class DeadLetterWriter:
    def __init__(
        self,
        producer: LetterProducer,
        topic: str,
        guard: DlqGuard,
        *,
        is_live: Callable[[Any], bool],
        finish: Callable[[Any], None],
        after_hold: Callable[[Any, DeadLetter], DeadLetter | None],
        on_change: Callable[[], None],
        wall: Callable[[], float],
        backoff: Backoff,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.producer = producer
        self._backoff = backoff
        self.topic = topic
        self.guard = guard
        self._is_live = is_live
        self._finish = finish
        self._after_hold = after_hold
        self._on_change = on_change
        self._wall = wall
        self._sleep = sleep
        self._open = asyncio.Event()
        self._open.set()
        self._cooldown: asyncio.Task[None] | None = None

    async def write(self, src: Any, letter: DeadLetter) -> None:
        """Write the letter, retrying until the broker acks it, then finish the record."""
        if self.guard.failed(letter.reason) and self._open.is_set():
            self._trip(letter.reason)
        if not self._open.is_set():
            await self._open.wait()
            if not self._is_live(src):
                return
            held = self._after_hold(src, letter)
            if held is None:
                return  # it resolves now: routed to an upload instead
            letter = held
        headers = dead_letter_headers(src.headers, src.ref, letter, datetime.fromtimestamp(self._wall(), UTC))
        key, value = src.key, src.value
        attempt = 0
        while self._is_live(src):
            try:
                await self.producer.send(
                    self.topic, key=key, value=value, headers=headers, timestamp_ms=src.timestamp_ms
                )
            except LetterTooLarge as exc:
                fitted = fit_dead_letter(key, value, headers, self.producer.max_message_bytes)
                if fitted.dropped == () or (fitted.key, fitted.value, fitted.headers) == (key, value, headers):
                    fitted = fit_dead_letter(key, value, headers, exc.size // 2 or 1)  # the broker's limit is lower
                log.warning(
                    "%s[%d]@%d: dead letter too large (%d bytes, limit %d): written without %s",
                    *src.ref,
                    exc.size,
                    exc.limit,
                    ", ".join(fitted.dropped) or "nothing",
                    extra=_context(src, letter),
                )
                key, value, headers = fitted.key, fitted.value, fitted.headers
                continue
            except DeliveryError as exc:
                attempt += 1
                m.DEAD_LETTER_FAILURES.inc()
                log.error("dead-letter write failed (attempt %d): %s", attempt, exc, extra=_context(src, letter))
                await self._sleep(self._backoff.delay(attempt))  # never gives up: the offset waits
                continue
            m.EVENTS_DEAD_LETTERED.labels(letter.reason.value).inc()
            self._finish(src)
            return

    # -- the guard ------------------------------------------------------------------------------------------

    @property
    def tripped(self) -> bool:
        return self.guard.tripped

    def _trip(self, reason: DlqReason) -> None:
        log.error(
            "DLQ guard tripped: %s dead-lettered as %s; holding dead letters and pausing "
            "consumption until the mappings file changes or %.0fs pass (see README runbook-%s)",
            self.guard.trip_cause,
            reason.value,
            self.guard.cooldown_s,
            reason.value,
        )
        self._open.clear()
        m.DLQ_GUARD_TRIPPED.set(1)
        if self._cooldown is not None:
            self._cooldown.cancel()
        self._cooldown = asyncio.create_task(self._cool_down(), name="dlq-guard-cooldown")
        self._on_change()

    async def _cool_down(self) -> None:
        await self._sleep(self.guard.cooldown_s)
        self._cooldown = None
        self.release("cooldown over")

    def release(self, why: str) -> None:
        if not self.guard.tripped:
            return
        log.warning("DLQ guard released (%s): re-resolving held records", why)
        if self._cooldown is not None and self._cooldown is not asyncio.current_task():
            self._cooldown.cancel()
        self._cooldown = None
        self.guard.reset()
        m.DLQ_GUARD_TRIPPED.set(0)
        self._open.set()
        self._on_change()

    def close(self) -> None:
        if self._cooldown is not None:
            self._cooldown.cancel()


def _context(src: Any, letter: DeadLetter) -> dict[str, object]:
    """Structured-log context of a letter (LOG_FORMAT=json keys): where the record came from and why."""
    return {
        "topic": src.ref.topic,
        "partition": src.ref.partition,
        "offset": src.ref.offset,
        "reason": letter.reason.value,
        "tiktok_code": letter.tiktok_code,
        "tiktok_request_id": letter.tiktok_request_id,
    }
