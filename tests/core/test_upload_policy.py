"""The upload policy: one test per rule of service/core/upload_policy.py, with literal answers, and the cost of
bisection simulated the way service/pipeline/uploads.py carries the decisions out."""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass, replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.core.answers import Answer, classify
from service.core.batcher import SplitBudget
from service.core.model import DlqReason
from service.core.retry import Backoff
from service.core.upload_policy import (
    QUOTA_SUSPECT_S,
    BatchFacts,
    DeadLetter,
    Decision,
    Done,
    RetryAfter,
    Split,
    SplitByAudience,
    WaitForGate,
    bisection_budget,
    decide,
)


def answer(status: int | None, code: int | None, *, retry_after_s: float | None = None) -> Answer:
    return Answer(classify(status, code), status, code, "x", retry_after_s=retry_after_s)


FACTS = BatchFacts(
    rows=10,
    audiences=1,
    attempt=1,
    first_failure_at=0.0,
    now=0.0,
    recently_created=False,
    bisection_left=bisection_budget(10),
)


def facts(**kw: object) -> BatchFacts:
    return replace(FACTS, **kw)  # type: ignore[arg-type]


def backoff() -> Backoff:
    return Backoff(rng=random.Random(0))


def run(a: Answer, f: BatchFacts = FACTS) -> Decision:
    return decide(a, f, backoff())


# -- budget ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("rows", "budget"), [(0, 8), (1, 8), (2, 8), (3, 16), (4, 16), (1000, 80), (1024, 80)])
def test_bisection_budget(rows: int, budget: int) -> None:
    assert bisection_budget(rows) == budget


def test_bisection_budget_affords_four_bad_rows_found_exactly() -> None:
    # Isolating one bad row costs two requests per level; the budget pays for four such paths, whatever N.
    for rows in (2, 3, 10, 1000, 10_000):
        depth = (rows - 1).bit_length()
        assert bisection_budget(rows) >= 4 * 2 * depth


# -- success --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("code", [0, 20001])
def test_success_is_done(code: int) -> None:
    assert run(answer(200, code)) == Done()


# -- gates ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("status", "code"), [(200, 40105), (200, 40101), (401, None), (401, 40104)])
def test_auth_failure_waits_for_the_auth_gate(status: int, code: int | None) -> None:
    assert run(answer(status, code)) == WaitForGate("auth")


def test_auth_failure_waits_even_for_a_fresh_audience_a_single_row_and_no_budget() -> None:
    f = facts(rows=1, audiences=1, recently_created=True, bisection_left=0, attempt=99, now=10_000.0)
    assert run(answer(200, 40105), f) == WaitForGate("auth")


@pytest.mark.parametrize(("status", "code"), [(404, None), (200, None), (400, None), (403, None)])
def test_an_answer_that_is_not_tiktoks_waits_for_the_endpoint_gate(status: int, code: int | None) -> None:
    # an HTML 404 from a wrong TIKTOK_API_URL, a proxy's page: configuration, not the rows
    assert run(answer(status, code)) == WaitForGate("endpoint")
    assert run(answer(status, code), facts(rows=1, audiences=3, bisection_left=0)) == WaitForGate("endpoint")


# -- warm-up --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("code", [40002, 40007])
@pytest.mark.parametrize("audiences", [1, 2])
def test_warmup_codes_for_a_fresh_audience_are_retried(code: int, audiences: int) -> None:
    d = run(answer(200, code), facts(recently_created=True, audiences=audiences))
    assert isinstance(d, RetryAfter)
    assert 0 <= d.delay_s <= 0.5  # attempt 1: full jitter up to `base_s`
    assert not d.rate_limited


def test_warmup_retries_end_as_retries_exhausted() -> None:
    f = facts(recently_created=True, attempt=12, first_failure_at=0.0, now=299.9)
    assert run(answer(200, 40002), replace(f, now=400.0)) == DeadLetter(DlqReason.RETRIES_EXHAUSTED)


def test_other_refusals_of_a_fresh_audience_are_not_warmup() -> None:
    assert run(answer(200, 40000), facts(recently_created=True)) == Split()


# -- 40007 ----------------------------------------------------------------------------------------------------


def test_not_found_on_a_mixed_audience_batch_splits_by_audience() -> None:
    assert run(answer(200, 40007), facts(audiences=2)) == SplitByAudience()


@pytest.mark.parametrize(("rows", "left"), [(1, 8), (10, 80), (10, 0)])
def test_not_found_for_one_audience_dead_letters_missing_audience_id_without_bisection(rows: int, left: int) -> None:
    d = run(answer(200, 40007), facts(rows=rows, audiences=1, bisection_left=left))
    assert isinstance(d, DeadLetter)
    assert d.reason is DlqReason.MISSING_AUDIENCE_ID


# -- refusals -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("status", "code"), [(200, 40002), (200, 40000), (200, 40011), (400, 40002), (400, 12345)])
def test_refusal_of_a_mixed_audience_batch_splits_by_audience(status: int, code: int) -> None:
    assert run(answer(status, code), facts(audiences=3)) == SplitByAudience()
    assert run(answer(status, code), facts(audiences=2, bisection_left=0)) == SplitByAudience()


def test_refusal_of_one_audience_bisects_while_the_budget_lasts() -> None:
    assert run(answer(200, 40002), facts(rows=2, bisection_left=2)) == Split()
    assert run(answer(200, 40002), facts(rows=1000, bisection_left=80)) == Split()


@pytest.mark.parametrize("left", [0, -1])
def test_refusal_of_one_audience_dead_letters_when_the_budget_is_spent(left: int) -> None:
    d = run(answer(200, 40002), facts(rows=500, bisection_left=left))
    assert isinstance(d, DeadLetter)
    assert d.reason is DlqReason.TIKTOK_REJECTED
    assert "budget" in d.note


def test_refusal_of_one_row_dead_letters_it() -> None:
    assert run(answer(200, 40002), facts(rows=1, bisection_left=80)) == DeadLetter(DlqReason.TIKTOK_REJECTED)


# -- too large ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("status", "code"), [(200, 40061), (413, None)])
def test_too_large_splits_in_halves_whatever_the_budget_and_the_audiences(status: int, code: int | None) -> None:
    assert run(answer(status, code), facts(rows=2)) == Split()
    assert run(answer(status, code), facts(rows=1000, bisection_left=0)) == Split()
    assert run(answer(status, code), facts(rows=10, audiences=2)) == Split()


@pytest.mark.parametrize(("status", "code"), [(200, 40061), (413, None)])
def test_too_large_with_one_row_is_a_refusal(status: int, code: int | None) -> None:
    assert run(answer(status, code), facts(rows=1)) == DeadLetter(DlqReason.TIKTOK_REJECTED)


# -- permission -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("status", "code"), [(200, 40001), (200, 40300), (403, 40001), (403, 12345)])
def test_permission_dead_letters_every_row(status: int, code: int) -> None:
    for f in (FACTS, facts(rows=1), facts(audiences=4), facts(recently_created=True)):
        assert run(answer(status, code), f) == DeadLetter(DlqReason.TIKTOK_PERMISSION)


# -- retryable ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "code"), [(200, 50000), (200, 51234), (200, 99999), (500, None), (503, 50002), (408, None), (None, None)]
)
def test_retryable_answers_back_off(status: int | None, code: int | None) -> None:
    d = run(answer(status, code), facts(attempt=3, first_failure_at=0.0, now=5.0))
    assert isinstance(d, RetryAfter)
    assert 0 <= d.delay_s <= 2.0  # attempt 3: full jitter up to base_s * 4
    assert not d.rate_limited


def test_backoff_grows_with_the_attempt_up_to_the_cap() -> None:
    b = Backoff(rng=random.Random(0))
    delays = []
    for attempt in range(1, 12):
        d = decide(answer(200, 50000), facts(attempt=attempt), b)
        assert isinstance(d, RetryAfter)
        delays.append(d.delay_s)
    assert all(0 <= x <= min(30.0, 0.5 * 2 ** (i)) for i, x in enumerate(delays))


def test_retryable_until_the_budget_is_spent_then_retries_exhausted() -> None:
    a = answer(200, 50000)
    assert isinstance(run(a, facts(attempt=20, first_failure_at=100.0, now=100.0)), RetryAfter)
    assert isinstance(run(a, facts(attempt=20, first_failure_at=100.0, now=369.0)), RetryAfter)  # 269 s + ≤30 s
    assert run(a, facts(attempt=20, first_failure_at=100.0, now=400.1)) == DeadLetter(DlqReason.RETRIES_EXHAUSTED)


@pytest.mark.parametrize(("status", "code"), [(200, 40100), (200, 40132), (200, 61000), (429, None), (429, 40100)])
def test_rate_limited_answers_retry_and_say_so(status: int, code: int | None) -> None:
    d = run(answer(status, code))
    assert isinstance(d, RetryAfter)
    assert d.rate_limited


def test_retry_after_is_honoured() -> None:
    d = run(answer(429, None, retry_after_s=42.0))
    assert d == RetryAfter(42.0, True), "jitter at attempt 1 is at most 0.5 s: Retry-After wins"
    d = run(answer(503, None, retry_after_s=7.0))
    assert d == RetryAfter(7.0, False)


def test_retry_after_past_the_retry_budget_dead_letters() -> None:
    d = run(answer(429, None, retry_after_s=250.0), facts(first_failure_at=0.0, now=60.0))
    assert d == DeadLetter(DlqReason.RETRIES_EXHAUSTED), "60 s spent + 250 s asked > 300 s budget"


def test_retry_after_is_bounded_by_a_sanity_ceiling() -> None:
    b = Backoff(budget_s=10_000.0, rng=random.Random(0))
    assert decide(answer(429, None, retry_after_s=86_400.0), FACTS, b) == RetryAfter(600.0, True)


# -- bisection, simulated -------------------------------------------------------------------------------------

REFUSED = answer(200, 40002)
OK = answer(200, 0)


@dataclass
class Outcome:
    requests: int
    uploaded: set[int]
    dead: dict[int, DeadLetter]
    budget_ran_out: bool


def bisect(rows: int, bad: Iterable[int], rng: random.Random | None = None) -> Outcome:
    """Carry out decide()'s answers the way service/pipeline/uploads.py does.

    One audience; a request is refused (40002) when it carries a bad row. A `Split` of a refused batch takes
    two requests from a budget that the batch's halves share (created lazily at the first split); the halves
    are sent concurrently, so the next request to answer is picked at random.
    """
    bad = set(bad)
    queue: list[tuple[list[int], SplitBudget | None]] = [(list(range(rows)), None)]
    out = Outcome(0, set(), {}, False)
    while queue:
        part, budget = queue.pop(rng.randrange(len(queue)) if rng else 0)
        out.requests += 1
        a = REFUSED if bad.intersection(part) else OK
        f = facts(
            rows=len(part),
            audiences=1,
            bisection_left=budget.left if budget is not None else bisection_budget(len(part)),
        )
        d = decide(a, f, backoff())
        if isinstance(d, Done):
            assert not out.uploaded.intersection(part)
            out.uploaded.update(part)
        elif isinstance(d, Split):
            budget = budget or SplitBudget(bisection_budget(len(part)))
            budget.left -= 2
            half = len(part) // 2
            queue += [(part[:half], budget), (part[half:], budget)]
        else:
            assert isinstance(d, DeadLetter), d
            assert d.reason is DlqReason.TIKTOK_REJECTED
            if len(part) > 1:
                out.budget_ran_out = True
            for r in part:
                assert r not in out.dead
                out.dead[r] = d
    return out


def check(rows: int, bad: set[int], out: Outcome) -> None:
    assert out.requests <= 1 + bisection_budget(rows)
    assert out.uploaded | set(out.dead) == set(range(rows)), "every row has an outcome"
    assert not out.uploaded & set(out.dead), "and only one"
    assert not out.uploaded & bad, "a bad row is never uploaded"
    if not out.budget_ran_out:
        assert out.uploaded == set(range(rows)) - bad, "every good row is uploaded unless the budget ran out"
        assert set(out.dead) == bad


@settings(max_examples=200, deadline=None)
@given(data=st.data(), rows=st.integers(1, 1200), seed=st.integers(0, 2**32 - 1))
def test_bisection_costs_at_most_its_budget(data: st.DataObject, rows: int, seed: int) -> None:
    bad = data.draw(st.sets(st.integers(0, rows - 1), max_size=min(rows, 40)))
    out = bisect(rows, bad, random.Random(seed))
    check(rows, bad, out)


@settings(max_examples=200, deadline=None)
@given(data=st.data(), rows=st.integers(1, 10_000), seed=st.integers(0, 2**32 - 1))
def test_bisection_finds_up_to_four_bad_rows_exactly(data: st.DataObject, rows: int, seed: int) -> None:
    bad = data.draw(st.sets(st.integers(0, rows - 1), max_size=min(rows, 4)))
    out = bisect(rows, bad, random.Random(seed))
    check(rows, bad, out)
    assert not out.budget_ran_out
    assert out.uploaded == set(range(rows)) - bad


def test_bisection_of_1000_rows_all_bad_is_bounded() -> None:
    out = bisect(1000, range(1000))
    check(1000, set(range(1000)), out)
    assert out.requests <= 1 + bisection_budget(1000) == 81, "was 2N-1 = 1,999 requests before the budget"
    assert out.budget_ran_out
    assert out.uploaded == set()


def test_bisection_of_one_row_costs_one_request() -> None:
    out = bisect(1, [0])
    assert out.requests == 1
    assert out.dead == {0: DeadLetter(DlqReason.TIKTOK_REJECTED)}


# -- the per-minute quota -------------------------------------------------------------------------------------


def test_a_rate_limit_answer_retries_while_the_streak_is_short() -> None:
    d = run(answer(200, 40100), facts(rate_limited_for_s=QUOTA_SUSPECT_S - 1))
    assert isinstance(d, RetryAfter) and d.rate_limited


def test_a_rate_limit_streak_past_the_threshold_waits_out_the_quota_pause() -> None:
    assert run(answer(200, 40100), facts(rate_limited_for_s=QUOTA_SUSPECT_S)) == WaitForGate("quota")
    assert decide(answer(200, 40100), facts(rate_limited_for_s=0.3), backoff(), quota_after_s=0.2) == WaitForGate(
        "quota"
    )


def test_a_long_outage_that_is_not_a_rate_limit_is_not_a_quota_pause() -> None:
    assert isinstance(run(answer(503, None), facts(rate_limited_for_s=100.0)), RetryAfter)
