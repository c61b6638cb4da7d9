"""What a TikTok answer means for the records in the request: one table, data not scattered ifs.

TikTok answers most errors with HTTP 200 and a non-zero `code` (docs/tiktok-api.md §4), so the code decides
when the body parses; the HTTP status decides otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Verdict(StrEnum):
    SUCCESS = "success"  # uploaded: finish the records
    RETRY = "retry"  # transient: back off and resend, within the retry budget
    AUTH = "auth"  # token problem: never dead-letter; pause and wait for a good token
    PERMISSION = "permission"  # advertiser/app not allowed: dead letter `tiktok_permission`
    REJECTED = "rejected"  # the payload is refused: bisect, dead-letter the offending rows `tiktok_rejected`
    SPLIT = "split"  # batch too large: split in halves and resend
    NOT_FOUND = "not_found"  # an object of the request does not exist (40007: a deleted audience, a wrong id)
    ENDPOINT = "endpoint"  # the answer is not TikTok's (an HTML 404, a gateway page): configuration, not rows


# TikTok `code` → verdict. Sources: the official SDK's code table and what RudderStack, Airbyte and Segment do.
CODE_TABLE: dict[int, Verdict] = {
    0: Verdict.SUCCESS,
    20001: Verdict.SUCCESS,  # PARTIAL_OK: logged
    # rate limiting and server-side trouble
    40100: Verdict.RETRY,
    40132: Verdict.RETRY,
    61000: Verdict.RETRY,
    50000: Verdict.RETRY,
    50002: Verdict.RETRY,
    60001: Verdict.RETRY,
    40202: Verdict.RETRY,
    # auth
    40101: Verdict.AUTH,
    40102: Verdict.AUTH,
    40104: Verdict.AUTH,
    40105: Verdict.AUTH,
    40107: Verdict.AUTH,
    40113: Verdict.AUTH,
    40130: Verdict.AUTH,
    # permission / configuration
    40001: Verdict.PERMISSION,
    40003: Verdict.PERMISSION,
    40118: Verdict.PERMISSION,
    40125: Verdict.PERMISSION,
    40300: Verdict.PERMISSION,
    40301: Verdict.PERMISSION,
    40302: Verdict.PERMISSION,
    # payload
    40000: Verdict.REJECTED,
    40002: Verdict.REJECTED,
    40011: Verdict.REJECTED,
    40062: Verdict.REJECTED,
    40061: Verdict.SPLIT,
    # "object does not exist": in segment/mapping the only object named is the audience (docs/tiktok-api.md §4)
    40007: Verdict.NOT_FOUND,
    # customer-file API (docs/tiktok-api.md §3.6): a file that is gone (never uploaded, or expired) is uploaded
    # again by the caller, so resending is transient; a file of the wrong kind is ours to fix; too large: split it.
    40905: Verdict.RETRY,  # FILE_NOT_EXIST
    40910: Verdict.RETRY,  # FILE_EXPIRED
    40906: Verdict.REJECTED,  # FILE_EMPTY
    40908: Verdict.REJECTED,  # FILE_TYPE_ERROR
    40909: Verdict.REJECTED,  # FILE_CALCULATE_TYPE_ERROR
    40907: Verdict.SPLIT,  # FILE_TOO_LARGE
}

# Code ranges: RPC/internal (51xxx) and storage (52xxx) errors are TikTok-side and transient.
CODE_RANGES: tuple[tuple[int, int, Verdict], ...] = (
    (51000, 51999, Verdict.RETRY),
    (52000, 52999, Verdict.RETRY),
)

# Unknown codes retry: the retry budget bounds them and then they end as `retries_exhausted` dead letters,
# so an unknown answer can never silently drop data nor block forever.
UNKNOWN_CODE = Verdict.RETRY

RETRYABLE_HTTP = frozenset({408, 425, 429})
RATE_LIMIT_CODES = frozenset({40100, 40132, 61000})


@dataclass(frozen=True, slots=True)
class Answer:
    """A classified answer. `message` is TikTok's text, truncated; it never holds raw PII (ids are hashed)."""

    verdict: Verdict
    http_status: int | None
    code: int | None
    message: str
    request_id: str | None = None
    retry_after_s: float | None = None

    @property
    def code_label(self) -> str:
        """Bounded label for metrics: a code from the table, its range (`51xxx`), `other`, or `none`."""
        if self.code is None:
            return "none"
        if self.code in CODE_TABLE:
            return str(self.code)
        for lo, hi, _ in CODE_RANGES:
            if lo <= self.code <= hi:
                return f"{lo // 1000}xxx"
        return "other"

    @property
    def status_class(self) -> str:
        """Bounded label for metrics: 2xx/4xx/5xx, or the transport failure kind."""
        if self.http_status is None:
            return self.message.split(":", 1)[0] if self.message else "transport"
        return f"{self.http_status // 100}xx"

    @property
    def rate_limited(self) -> bool:
        return self.code in RATE_LIMIT_CODES or self.http_status == 429


def classify(http_status: int | None, code: int | None) -> Verdict:
    """Verdict for one answer; `http_status` None means the request never got an answer (timeout, reset).

    An answer without TikTok's envelope (`code` None) outside the transient statuses is not TikTok speaking:
    a wrong `TIKTOK_API_URL`, a proxy's or gateway's page. That says nothing about the rows, so it is never a
    refusal (which would dead-letter them) but `ENDPOINT`: uploads stop until a probe gets TikTok again.
    """
    if http_status is None:
        return Verdict.RETRY
    if http_status in RETRYABLE_HTTP or http_status >= 500:
        return Verdict.RETRY
    if 200 <= http_status < 300:
        return Verdict.ENDPOINT if code is None else verdict_for_code(code)
    if http_status == 401:
        return Verdict.AUTH
    if http_status == 413:
        return Verdict.SPLIT
    if code is None:
        return Verdict.ENDPOINT
    if http_status == 403:
        return Verdict.PERMISSION
    return verdict_for_code(code) if code in CODE_TABLE else Verdict.REJECTED


def verdict_for_code(code: int) -> Verdict:
    v = CODE_TABLE.get(code)
    if v is not None:
        return v
    for lo, hi, verdict in CODE_RANGES:
        if lo <= code <= hi:
            return verdict
    return UNKNOWN_CODE
