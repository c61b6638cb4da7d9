"""fit_dead_letter: a dead letter too big for the producer is shrunk until it is writable (defect 9)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from service.core.dead_letters import (
    DeadLetter,
    FittedLetter,
    dead_letter_headers,
    fit_dead_letter,
    header_value,
    letter_size,
)
from service.core.model import DlqReason
from service.core.types import RecordRef

ERROR = b"field audience_key: " + b"e" * 480  # 500 characters, the most dead_letter_headers keeps
OURS = [
    ("dlq.reason", b"invalid_payload"),
    ("dlq.error", ERROR),
    ("dlq.source.topic", b"audience"),
    ("dlq.source.partition", b"3"),
    ("dlq.source.offset", b"42"),
    ("dlq.failed_at", b"2026-01-02T03:04:05.678Z"),
    ("dlq.attempts", b"1"),
    ("__connect.errors.topic", b"audience"),
    ("__connect.errors.partition", b"3"),
    ("__connect.errors.offset", b"42"),
    ("__connect.errors.exception.class.name", b"invalid_payload"),
    ("__connect.errors.exception.message", ERROR),
]
HEADERS = [("traceparent", b"00-abc-01"), ("replay.count", b"1"), *OURS]
TRIMMED = b"field audience_key: " + b"e" * 80  # FITTED_ERROR_CHARS = 100


def test_letter_size_counts_key_value_and_headers_with_length_prefixes() -> None:
    assert letter_size(b"k", b"vv", [("h", b"abc")]) == 1 + 2 + (1 + 3 + 10)
    assert letter_size(None, None, []) == 0


def test_a_letter_that_fits_is_unchanged() -> None:
    fitted = fit_dead_letter(b"user-1", b"v" * 1000, HEADERS, 10_000)
    assert fitted == FittedLetter(b"user-1", b"v" * 1000, HEADERS, ())


def test_the_limit_keeps_a_margin_for_record_overhead() -> None:
    base = letter_size(b"k", b"", HEADERS)
    at_budget = b"v" * (10_000 - 512 - base)
    assert fit_dead_letter(b"k", at_budget, HEADERS, 10_000).value == at_budget
    assert fit_dead_letter(b"k", at_budget + b"v", HEADERS, 10_000).value is None
    assert fit_dead_letter(b"k", at_budget + b"v", HEADERS, 10_000, margin=0).value == at_budget + b"v"


def test_a_large_value_is_dropped_and_said_so() -> None:
    fitted = fit_dead_letter(b"user-1", b"v" * 20_000, HEADERS, 10_000)
    assert fitted == FittedLetter(b"user-1", None, [*HEADERS, ("dlq.value.omitted", b"too_large:20000")], ("value",))


def test_large_original_headers_are_dropped_and_the_error_trimmed() -> None:
    headers = [("big", b"x" * 20_000), *HEADERS]
    fitted = fit_dead_letter(b"user-1", b"v" * 100, headers, 10_000)
    assert fitted.key == b"user-1"
    assert fitted.value is None
    assert fitted.dropped == ("value", "headers")
    assert fitted.headers == [
        ("replay.count", b"1"),
        ("dlq.reason", b"invalid_payload"),
        ("dlq.error", TRIMMED),
        ("dlq.source.topic", b"audience"),
        ("dlq.source.partition", b"3"),
        ("dlq.source.offset", b"42"),
        ("dlq.failed_at", b"2026-01-02T03:04:05.678Z"),
        ("dlq.attempts", b"1"),
        ("__connect.errors.topic", b"audience"),
        ("__connect.errors.partition", b"3"),
        ("__connect.errors.offset", b"42"),
        ("__connect.errors.exception.class.name", b"invalid_payload"),
        ("__connect.errors.exception.message", TRIMMED),
        ("dlq.value.omitted", b"too_large:100"),
        ("dlq.headers.omitted", b"too_large:20023"),  # big (3 + 20000) + traceparent (11 + 9)
    ]


def test_a_large_key_goes_last() -> None:
    fitted = fit_dead_letter(b"k" * 20_000, b"v", HEADERS, 10_000)
    assert fitted.key is None and fitted.value is None
    assert fitted.dropped == ("value", "headers", "key")
    assert header_value(fitted.headers, "dlq.key.omitted") == "too_large:20000"
    assert header_value(fitted.headers, "dlq.value.omitted") == "too_large:1"
    assert header_value(fitted.headers, "dlq.headers.omitted") == "too_large:20"
    assert header_value(fitted.headers, "dlq.reason") == "invalid_payload"


def test_a_tiny_limit_keeps_only_what_replay_needs() -> None:
    fitted = fit_dead_letter(b"user-1", b"v" * 2000, [("big", b"x" * 2000), *HEADERS], 700)
    assert fitted.dropped == ("value", "headers", "key", "dlq_headers")
    assert fitted.key is None and fitted.value is None
    assert fitted.headers == [
        ("replay.count", b"1"),
        ("dlq.reason", b"invalid_payload"),
        ("dlq.source.topic", b"audience"),
        ("dlq.source.partition", b"3"),
        ("dlq.source.offset", b"42"),
        ("dlq.value.omitted", b"too_large:2000"),
        ("dlq.headers.omitted", b"too_large:2023"),
        ("dlq.key.omitted", b"too_large:6"),
    ]


@pytest.mark.parametrize("limit", [700, 1_000, 2_000, 10_000, 100_000, 1_000_000])
@pytest.mark.parametrize(
    ("key", "value", "extra"),
    [
        (b"u", b"v" * 2_000_000, []),
        (b"u", b"v", [("big", b"x" * 2_000_000)]),
        (b"k" * 2_000_000, None, []),
        (b"k" * 500_000, b"v" * 500_000, [("big", b"x" * 500_000)]),
    ],
)
def test_never_drops_reason_or_source_and_fits_a_sane_limit(
    limit: int, key: bytes, value: bytes | None, extra: list[tuple[str, bytes]]
) -> None:
    fitted = fit_dead_letter(key, value, [*extra, *HEADERS], limit)
    for name in ("dlq.reason", "dlq.source.topic", "dlq.source.partition", "dlq.source.offset", "replay.count"):
        assert header_value(fitted.headers, name) == header_value(HEADERS, name)
    assert letter_size(fitted.key, fitted.value, fitted.headers) <= max(limit - 512, limit // 2)
    assert fit_dead_letter(fitted.key, fitted.value, fitted.headers, limit) == FittedLetter(
        fitted.key, fitted.value, fitted.headers, ()
    )


def test_refitting_to_a_smaller_limit_adds_no_second_marker() -> None:
    first = fit_dead_letter(b"user-1", b"v" * 20_000, [("big", b"x" * 5_000), *HEADERS], 10_000)
    assert first.dropped == ("value",)
    second = fit_dead_letter(first.key, first.value, first.headers, 4_000)
    assert second.dropped == ("headers",)
    assert [k for k, _ in second.headers].count("dlq.value.omitted") == 1
    assert header_value(second.headers, "dlq.value.omitted") == "too_large:20000"
    assert (
        header_value(second.headers, "dlq.headers.omitted") == "too_large:5023"
    )  # big (3 + 5000) + traceparent (11 + 9)


def test_fits_what_dead_letter_headers_builds() -> None:
    original = [("traceparent", b"00-abc-01"), ("blob", None), ("dlq.reason", b"stale")]
    headers = dead_letter_headers(
        original,
        RecordRef("audience", 3, 42),
        DeadLetter(DlqReason.TIKTOK_REJECTED, "audience 42: code 40002", tiktok_code=40002, tiktok_request_id="r-1"),
        datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC),
    )
    fitted = fit_dead_letter(b"user-1", b"v" * 2_000_000, headers, 1_000_000)
    assert fitted.value is None and fitted.key == b"user-1"
    assert fitted.headers == [*headers, ("dlq.value.omitted", b"too_large:2000000")]
    assert header_value(fitted.headers, "dlq.tiktok.request_id") == "r-1"
