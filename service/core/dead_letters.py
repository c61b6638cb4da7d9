"""Dead-letter records: the original record unchanged plus the contract's `dlq.*` headers.

Kafka Connect's `__connect.errors.*` names are added too, so existing DLQ tooling reads our records. Headers
of an earlier dead-lettering (a replayed record failing again) are replaced, not stacked; `replay.count`
survives so replay can refuse to ping-pong a record forever.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from service.core.model import DlqReason
from service.core.types import Headers, RecordRef

_OURS = ("dlq.", "__connect.errors.")
MAX_ERROR_CHARS = 500

# fit_dead_letter: the headers saying what was left out, each "too_large:<bytes left out>".
VALUE_OMITTED = "dlq.value.omitted"
HEADERS_OMITTED = "dlq.headers.omitted"
KEY_OMITTED = "dlq.key.omitted"
# Bytes kept free below the limit for what the record costs beyond key + value + headers (record and batch
# framing: a record batch header is 61 bytes), so the broker's max.message.bytes takes the letter too when the
# topic's limit equals the producer's.
LETTER_MARGIN = 512
FITTED_ERROR_CHARS = 100
_ERROR_HEADERS = ("dlq.error", "__connect.errors.exception.message")
# Replay needs these to republish, to find where a record came from, and to refuse endless ping-pong.
_NEVER_DROPPED = ("dlq.reason", "dlq.source.", "replay.")
_KEPT_WITH_HEADERS_OMITTED = (*_OURS, "replay.")


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


def header_value(headers: Sequence[tuple[str, bytes | None]] | None, name: str) -> str | None:
    for k, v in headers or ():
        if k == name and v is not None:
            return v.decode("utf-8", "replace")
    return None


@dataclass(frozen=True, slots=True)
class FittedLetter:
    """A dead letter as it will be written; `dropped` names what `fit_dead_letter` left out, in order:
    "value", "headers" (the original ones, with `dlq.error` trimmed), "key", "dlq_headers"."""

    key: bytes | None
    value: bytes | None
    headers: Headers
    dropped: tuple[str, ...] = ()


def letter_size(key: bytes | None, value: bytes | None, headers: Headers) -> int:
    """Key + value + headers in bytes, never below librdkafka's count against message.max.bytes (it adds a
    varint length prefix, at most 5 bytes, to each header name and value)."""
    return len(key or b"") + len(value or b"") + sum(len(k.encode()) + len(v or b"") + 10 for k, v in headers)


def fit_dead_letter(
    key: bytes | None,
    value: bytes | None,
    headers: Headers,
    limit: int,
    *,
    margin: int = LETTER_MARGIN,
) -> FittedLetter:
    """The letter (`key`, `value`, `headers` from `dead_letter_headers`) shrunk to fit `limit` bytes, the
    producer's message.max.bytes, less `margin` for record overhead. Pure: no I/O, no clock.

    Why: the producer refuses a record above message.max.bytes (librdkafka's MSG_SIZE_TOO_LARGE) and sending
    it again never helps, yet the record's offset may only be committed once its letter is written; so a letter
    must always be writable, otherwise its partition stalls behind it forever (defect 9). Steps, each taken
    only while the letter is still too big:

    1. drop the value (value=None) and add `dlq.value.omitted: too_large:<value bytes>`;
    2. drop the original headers (any not `dlq.*`, `__connect.errors.*` or `replay.*`), trim `dlq.error` and
       its `__connect.errors.exception.message` copy to FITTED_ERROR_CHARS, and add
       `dlq.headers.omitted: too_large:<bytes of the dropped headers>`;
    3. drop the key and add `dlq.key.omitted: too_large:<key bytes>`;
    4. keep only `dlq.reason`, `dlq.source.*`, `replay.*` and the `*.omitted` headers (a limit of a few hundred
       bytes; below that nothing more can go and the letter is returned as small as it gets).

    `dlq.reason` and `dlq.source.*` are never dropped: they say why and where from, which replay needs. A
    letter that fits is returned unchanged; fitting a fitted letter again changes nothing.

    Replay: a letter with `dlq.value.omitted` has no value and cannot be republished or reprocessed; replay
    must skip it with a clear message (e.g. "value omitted: <bytes> bytes above the producer's
    message.max.bytes; find the record at dlq.source.topic/partition/offset while retention keeps it"). One
    with `dlq.headers.omitted` or `dlq.key.omitted` lost those parts of the original record as well.
    """
    budget = max(limit - margin, limit // 2)
    dropped: list[str] = []
    if letter_size(key, value, headers) <= budget:
        return FittedLetter(key, value, list(headers))
    headers = list(headers)
    if value is not None:
        headers.append((VALUE_OMITTED, f"too_large:{len(value)}".encode()))
        value = None
        dropped.append("value")
    if letter_size(key, value, headers) > budget:
        originals = [(k, v) for k, v in headers if not k.startswith(_KEPT_WITH_HEADERS_OMITTED)]
        headers = [
            (k, _trim(v, FITTED_ERROR_CHARS) if k in _ERROR_HEADERS and v is not None else v)
            for k, v in headers
            if k.startswith(_KEPT_WITH_HEADERS_OMITTED)
        ]
        if originals:
            size = sum(len(k.encode()) + len(v or b"") for k, v in originals)
            headers.append((HEADERS_OMITTED, f"too_large:{size}".encode()))
        dropped.append("headers")
    if letter_size(key, value, headers) > budget and key is not None:
        headers.append((KEY_OMITTED, f"too_large:{len(key)}".encode()))
        key = None
        dropped.append("key")
    if letter_size(key, value, headers) > budget:
        markers = (VALUE_OMITTED, HEADERS_OMITTED, KEY_OMITTED)
        headers = [(k, v) for k, v in headers if k.startswith(_NEVER_DROPPED) or k in markers]
        dropped.append("dlq_headers")
    return FittedLetter(key, value, headers, tuple(dropped))


def _trim(value: bytes, chars: int) -> bytes:
    text = value.decode("utf-8", "replace")
    return value if len(text) <= chars else text[:chars].encode()
