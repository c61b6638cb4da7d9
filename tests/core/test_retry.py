import random

import pytest

from service.core.retry import Backoff, TokenBucket


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_full_jitter_bounds() -> None:
    b = Backoff(base_s=0.5, max_s=30.0, budget_s=300, rng=random.Random(7))
    for attempt in range(1, 20):
        cap = min(30.0, 0.5 * 2 ** (attempt - 1))
        for _ in range(50):
            assert 0 <= b.delay(attempt) <= cap


def test_retry_after_is_a_floor_even_above_max_but_sanely_bounded() -> None:
    b = Backoff(base_s=0.5, max_s=30.0, rng=random.Random(1))
    assert b.delay(1, retry_after_s=5) >= 5
    assert b.delay(1, retry_after_s=45) == 45
    assert b.delay(1, retry_after_s=86_400) == 600


def test_budget() -> None:
    b = Backoff(budget_s=10)
    assert not b.exhausted(0, 5, 4.9)
    assert b.exhausted(0, 5, 5.1)


def test_bucket_limits_rate_with_injected_clock() -> None:
    clock = Clock()
    bucket = TokenBucket(10.0, clock=clock, burst=1)
    granted = 0
    for _ in range(1000):  # 10 simulated seconds in 10 ms steps
        if bucket.acquire() == 0:
            granted += 1
        clock.t += 0.01
    assert 95 <= granted <= 101


def test_bucket_wait_hint() -> None:
    clock = Clock()
    bucket = TokenBucket(4.0, clock=clock, burst=1)
    assert bucket.acquire() == 0
    wait = bucket.acquire()
    assert 0.24 <= wait <= 0.26


def test_aimd_halves_then_recovers() -> None:
    clock = Clock()
    bucket = TokenBucket(40.0, clock=clock, recover_per_s=2.0, throttle_window_s=0.0)
    bucket.throttled()
    assert bucket.rate == 20.0
    bucket.throttled()
    assert bucket.rate == 10.0
    clock.t += 5
    bucket.acquire()
    assert bucket.rate == 20.0
    clock.t += 100
    bucket.acquire()
    assert bucket.rate == 40.0


def test_aimd_floor() -> None:
    clock = Clock()
    bucket = TokenBucket(1.0, clock=clock, min_rate=0.5)
    for _ in range(10):
        bucket.throttled()
        clock.t += 1.0
    assert bucket.rate == 0.5


def test_concurrent_rate_limited_answers_halve_the_rate_once() -> None:
    """Four requests in flight hit the limit together: one signal. Failed before the fix: 40 → 2.5 (1/16)."""
    clock = Clock()
    bucket = TokenBucket(40.0, clock=clock, recover_per_s=0.0001)
    cuts = [bucket.throttled() for _ in range(4)]
    assert cuts == [True, False, False, False]
    assert bucket.rate == 20.0
    clock.t += 1.0
    assert bucket.throttled(), "a limit hit again a window later is a new signal"
    assert bucket.rate == pytest.approx(10.0, abs=0.001)


def test_available_and_next_token_in_do_not_take_tokens() -> None:
    clock = Clock()
    bucket = TokenBucket(4.0, clock=clock, burst=2)
    assert bucket.available() == 2 and bucket.available() == 2
    assert bucket.next_token_in() == 0 and bucket.next_token_in(after=2) == 0.25
    assert bucket.acquire() == 0 and bucket.acquire() == 0
    assert bucket.available() == 0 and bucket.next_token_in() == 0.25
    clock.t += 0.25
    assert bucket.available() == 1
