"""What to do with a batch after TikTok answered: one pure function, next to the answer table.

The scheduler (service/pipeline/uploads.py) only carries decisions out; every choice between finishing,
splitting, dead-lettering, retrying and waiting for the upload gate is made here, from the classified answer
and plain facts about the batch, so each rule is a unit test with literals (tests/core/test_upload_policy.py).

Rules, in order (docs/tiktok-api.md §4 for the codes):
- success → `Done`.
- auth failure → `WaitForGate("auth")`; an answer that is not TikTok's (an HTML 404 from a wrong
  `TIKTOK_API_URL`, a gateway page) → `WaitForGate("endpoint")`. Neither is a property of the rows: uploads
  stop, consumption pauses, a probe reopens the gate, and nothing is dead-lettered or spends retry budget.
- 40002/40007 for an audience created moments ago → retried (TikTok's warm-up after creation).
- a refusal (40002 and other payload codes) or "object does not exist" (40007) of a batch that mixes
  audiences → `SplitByAudience`: TikTok fails the whole request, so first find out which audience it is.
- 40007 for one audience → every row `missing_audience_id` (the audience was deleted or the mapping names a
  wrong id: fix the mapping, replay), without bisection: no row of it can ever succeed.
- a refusal of one audience's rows → bisect (`Split`) while the batch's bisection budget lasts, then
  dead-letter what is left `tiktok_rejected`. The budget bounds the cost of a refusal that is about the
  request, not a row: bisecting N rows that all fail costs 2N-1 requests (1,999 for 1,000 rows).
- too many rows (40061, HTTP 413) → halves, down to one row (a one-row 40061 is a refusal).
- permission → every row `tiktok_permission`.
- a rate-limit answer (40100) when TikTok has answered nothing but rate limits for `QUOTA_SUSPECT_S` →
  `WaitForGate("quota")`: a per-second overrun clears within a second and the limiter has halved its rate by
  then, so a streak this long means the app's per-minute quota is spent, and TikTok pauses such an app for
  five minutes (docs/tiktok-api.md §8.1). Retrying every few seconds meanwhile only spends more of the quota.
- anything retryable → `RetryAfter(delay)` with exponential backoff and jitter, until the retry budget is
  spent, then every row `retries_exhausted`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from service.core.answers import Answer, Verdict
from service.core.model import DlqReason
from service.core.retry import Backoff

# TikTok refuses mappings with these codes for a minute or two after creating an audience (docs/tiktok-api.md §1.5).
WARMUP_CODES = frozenset({40002, 40007})

# Seconds of nothing but rate-limit answers after which the per-minute quota, not the per-second one, is spent.
QUOTA_SUSPECT_S = 20.0


def bisection_budget(rows: int) -> int:
    """Requests one batch may spend isolating refused rows: enough to find up to 4 bad rows exactly."""
    return 8 * max(1, math.ceil(math.log2(max(2, rows))))


@dataclass(frozen=True, slots=True)
class BatchFacts:
    rows: int
    audiences: int  # distinct audience ids in the batch
    attempt: int  # retryable failures so far, this one included (1-based)
    first_failure_at: float  # clock time of the first retryable failure in the current run of them
    now: float
    recently_created: bool  # an audience of the batch was created within the warm-up window
    bisection_left: int  # requests left in the batch's bisection budget
    rate_limited_for_s: float = 0.0  # how long TikTok has answered only rate limits (app-wide), 0 if it has not


@dataclass(frozen=True, slots=True)
class Done:
    pass


@dataclass(frozen=True, slots=True)
class Split:
    """Resend as two halves."""


@dataclass(frozen=True, slots=True)
class SplitByAudience:
    """Resend as one batch per audience."""


@dataclass(frozen=True, slots=True)
class DeadLetter:
    reason: DlqReason
    note: str = ""


@dataclass(frozen=True, slots=True)
class RetryAfter:
    delay_s: float
    rate_limited: bool


@dataclass(frozen=True, slots=True)
class WaitForGate:
    gate: Literal["auth", "endpoint", "quota"]


Decision = Done | Split | SplitByAudience | DeadLetter | RetryAfter | WaitForGate


def decide(answer: Answer, facts: BatchFacts, backoff: Backoff, quota_after_s: float = QUOTA_SUSPECT_S) -> Decision:
    """The next step for a batch given TikTok's answer (module docstring: the rules)."""
    v = answer.verdict
    if v is Verdict.SUCCESS:
        return Done()
    if v is Verdict.AUTH:
        return WaitForGate("auth")
    if v is Verdict.ENDPOINT:
        return WaitForGate("endpoint")
    if answer.code in WARMUP_CODES and facts.recently_created:
        v = Verdict.RETRY
    if v in (Verdict.REJECTED, Verdict.NOT_FOUND) and facts.audiences > 1:
        return SplitByAudience()
    if v is Verdict.NOT_FOUND:
        return DeadLetter(DlqReason.MISSING_AUDIENCE_ID, "TikTok says the audience does not exist")
    if v is Verdict.REJECTED:
        if facts.rows == 1:
            return DeadLetter(DlqReason.TIKTOK_REJECTED)
        if facts.bisection_left <= 0:
            return DeadLetter(DlqReason.TIKTOK_REJECTED, "bisection budget spent; the refusal is not about one row")
        return Split()
    if v is Verdict.SPLIT:
        return Split() if facts.rows > 1 else DeadLetter(DlqReason.TIKTOK_REJECTED)
    if v is Verdict.PERMISSION:
        return DeadLetter(DlqReason.TIKTOK_PERMISSION)
    if answer.rate_limited and facts.rate_limited_for_s >= quota_after_s:
        return WaitForGate("quota")
    delay = backoff.delay(facts.attempt, answer.retry_after_s)
    if backoff.exhausted(facts.first_failure_at, facts.now, delay):
        return DeadLetter(DlqReason.RETRIES_EXHAUSTED)
    return RetryAfter(delay, answer.rate_limited)
