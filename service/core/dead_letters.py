"""Dead-letter records: the original record unchanged plus the contract's `dlq.*` headers.

Kafka Connect's `__connect.errors.*` names are added too, so existing DLQ tooling reads our records. Headers
of an earlier dead-lettering (a replayed record failing again) are replaced, not stacked; `replay.count`
survives so replay can refuse to ping-pong a record forever.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from service.core.model import DlqReason
from service.core.watermarks import RecordRef

Headers = list[tuple[str, bytes]]

_OURS = ("dlq.", "__connect.errors.")
MAX_ERROR_CHARS = 500


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """Why one record is dead-lettered; `error` must never carry raw PII (callers build it from field names)."""

    reason: DlqReason
    error: str
    attempts: int = 1
    tiktok_code: int | None = None
    tiktok_request_id: str | None = None


def dead_letter_headers(
    original: list[tuple[str, bytes | None]] | None,
    ref: RecordRef,
    letter: DeadLetter,
    failed_at: datetime,
) -> Headers:
    headers: Headers = [(k, v if v is not None else b"") for k, v in original or () if not k.startswith(_OURS)]
    error = letter.error[:MAX_ERROR_CHARS]
    at = failed_at.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    ours = [
        ("dlq.reason", letter.reason.value),
        ("dlq.error", error),
        ("dlq.source.topic", ref.topic),
        ("dlq.source.partition", str(ref.partition)),
        ("dlq.source.offset", str(ref.offset)),
        ("dlq.failed_at", at),
        ("dlq.attempts", str(letter.attempts)),
    ]
    if letter.tiktok_code is not None:
        ours.append(("dlq.tiktok.code", str(letter.tiktok_code)))
    if letter.tiktok_request_id:
        ours.append(("dlq.tiktok.request_id", letter.tiktok_request_id))
    ours += [
        ("__connect.errors.topic", ref.topic),
        ("__connect.errors.partition", str(ref.partition)),
        ("__connect.errors.offset", str(ref.offset)),
        ("__connect.errors.exception.class.name", letter.reason.value),
        ("__connect.errors.exception.message", error),
    ]
    headers.extend((k, v.encode()) for k, v in ours)
    return headers


def header_value(headers: list[tuple[str, bytes | None]] | None, name: str) -> str | None:
    for k, v in headers or ():
        if k == name and v is not None:
            return v.decode("utf-8", "replace")
    return None
