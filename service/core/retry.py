"""Backoff and rate limiting, pure with an injected clock and random source.

Exponential backoff with full jitter (AWS architecture blog's recommendation, as Kafka Connect does past its
cap) bounded per attempt and by a total budget; a token bucket whose rate backs off multiplicatively on
TikTok's rate-limit codes and recovers additively (AIMD).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

RETRY_AFTER_CEILING_S = 600.0


@dataclass(slots=True)
class Backoff:
    base_s: float = 0.5
    max_s: float = 30.0
    budget_s: float = 300.0
    rng: random.Random = field(default_factory=random.Random)

    def delay(self, attempt: int, retry_after_s: float | None = None) -> float:
        """Sleep before retry number `attempt` (1-based).

        A `Retry-After` is a floor even above `max_s` (the server said when), bounded only by a sanity ceiling;
        the total budget still decides whether waiting that long is worth it.
        """
        cap = min(self.max_s, self.base_s * (2 ** min(attempt - 1, 30)))
        d = self.rng.uniform(0, cap)
        if retry_after_s is not None:
            d = max(d, min(retry_after_s, RETRY_AFTER_CEILING_S))
        return d

    def exhausted(self, first_failure_at: float, now: float, next_delay: float) -> bool:
        """True when waiting `next_delay` more would pass the total retry budget."""
        return now + next_delay - first_failure_at > self.budget_s


class TokenBucket:
    """Request-rate limiter shared by all in-flight uploads, with AIMD on rate-limit answers."""

    def __init__(
        self,
        rate: float,
        *,
        clock: Callable[[], float],
        burst: float | None = None,
        min_rate: float = 0.5,
        decrease: float = 0.5,
        recover_per_s: float | None = None,
        throttle_window_s: float = 1.0,
    ) -> None:
        self.max_rate = rate
        self.rate = rate
        self.min_rate = min(min_rate, rate)
        self._decrease = decrease
        self._recover = recover_per_s if recover_per_s is not None else max(rate / 20.0, 0.1)
        self._burst = burst if burst is not None else max(1.0, rate / 10.0)
        self._clock = clock
        self._tokens = self._burst
        self._last = clock()
        self._window = throttle_window_s
        self._throttled_at: float | None = None

    def _refill(self, now: float) -> None:
        elapsed = max(0.0, now - self._last)
        self._last = now
        if self.rate < self.max_rate:
            self.rate = min(self.max_rate, self.rate + self._recover * elapsed)
        self._tokens = min(self._burst, self._tokens + elapsed * self.rate)

    def acquire(self) -> float:
        """Take a token; returns 0 when granted, else the seconds to wait before asking again."""
        now = self._clock()
        self._refill(now)
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return 0.0
        return (1.0 - self._tokens) / self.rate

    def available(self) -> int:
        """Whole tokens that `acquire` would grant right now, without taking any."""
        self._refill(self._clock())
        return int(self._tokens)

    def next_token_in(self, after: int = 0) -> float:
        """Seconds until `acquire` would grant a token once `after` more have been taken (0: one is there now)."""
        self._refill(self._clock())
        tokens = self._tokens - after
        return 0.0 if tokens >= 1.0 else (1.0 - tokens) / self.rate

    def throttled(self) -> bool:
        """TikTok said "too frequent": halve the rate (not below `min_rate`) and drop the saved burst.

        Once per `throttle_window_s`: the requests in flight when the limit hit all come back rate-limited
        together, and they are one signal, not four (halving per answer took four at once to 1/16).
        Returns whether the rate was cut.
        """
        now = self._clock()
        self._refill(now)
        self._tokens = min(self._tokens, 0.0)
        if self._throttled_at is not None and now - self._throttled_at < self._window:
            return False
        self._throttled_at = now
        self.rate = max(self.min_rate, self.rate * self._decrease)
        return True
