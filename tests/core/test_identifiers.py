"""Normalisation and hashing, with the vectors from docs/tiktok-api.md §1.7."""

from __future__ import annotations

import hashlib

import phonenumbers
import pytest

from service.core import identifiers
from service.core.identifiers import hash_ad_id, hash_email, hash_external_id, hash_phone, normalise_phone
from service.core.model import MatchError

TESTING_EMAIL = "584c4423c421df49955759498a71495aba49b8780eb9387dff333b6f0982c777"
JANEDOE = "d6117306485ed0e50afab3ac871e98f81699151f30281527d63ff5f233656c69"
PLUS_15555555555 = "910a625c4ba147b544e6bd2f267e130ae14c591b6ba9c25cb8573322dedbebd0"
MAID = "83dc3f5f32b9472613b0f038d36f22585a609d018af6f6067f50da318bf354bd"


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("testing@testing.com", TESTING_EMAIL),
        (" Testing@Testing.COM ", TESTING_EMAIL),
        ("\tTESTING@testing.com\n", TESTING_EMAIL),
        ("janedoe@gmail.com", JANEDOE),
        ("scroogemcduck@disney.com", "77bc071241f37b4736df28c0c1cb0a99163d1050696134325b99246b2183d408"),
        # No +tag / dot stripping: trim + lowercase only (docs/tiktok-api.md §6.3).
        ("Test.User+tag@Testing.com", sha("test.user+tag@testing.com")),
    ],
)
def test_email_vectors(raw: str, expected: str) -> None:
    assert hash_email(raw) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("+15555555555", PLUS_15555555555),
        ("(555) 555-5555", PLUS_15555555555),
        (" +1 (555) 555-5555 ", PLUS_15555555555),
        ("555.555.5555", PLUS_15555555555),
        ("1-555-555-5555", PLUS_15555555555),
        ("+1-555-555-5555", PLUS_15555555555),
    ],
)
def test_phone_vectors_us(raw: str, expected: str) -> None:
    assert hash_phone(raw, "US") == expected


def test_phone_default_region_applies_to_national_numbers() -> None:
    assert normalise_phone("020 7946 0958", "GB") == "+442079460958"
    assert normalise_phone("+44 20 7946 0958", "US") == "+442079460958"


@pytest.mark.parametrize(
    "raw",
    [
        "5F3A2B18-9C4D-4E7F-B8E2-17D3A1E69B25",
        "  5f3a2b18-9c4d-4e7f-b8e2-17d3a1e69b25 ",
        "5f3a2b18-9c4d-4e7f-b8e2-17d3a1e69b25",
    ],
)
@pytest.mark.parametrize("id_type", ["IDFA_SHA256", "AAID_SHA256"])
def test_maid_vector(raw: str, id_type: str) -> None:
    assert hash_ad_id(raw, id_type) == MAID  # type: ignore[arg-type]


def test_64_hex_passes_through_lowercased_for_every_type() -> None:
    upper = TESTING_EMAIL.upper()
    assert hash_email(upper) == TESTING_EMAIL
    assert hash_email(f"  {upper} ") == TESTING_EMAIL
    assert hash_phone(upper) == TESTING_EMAIL
    assert hash_ad_id(upper, "IDFA_SHA256") == TESTING_EMAIL
    assert hash_ad_id(upper, "AAID_SHA256") == TESTING_EMAIL
    # 63 or 65 hex characters are not hashes: an email check applies and fails.
    assert hash_email(TESTING_EMAIL[:63]) == MatchError("EMAIL_SHA256", "invalid_email")


@pytest.mark.parametrize("value", [None, "", "   ", "\t\n"])
def test_absent_values_are_not_errors(value: str | None) -> None:
    assert hash_email(value) is None
    assert hash_phone(value) is None
    assert hash_ad_id(value, "IDFA_SHA256") is None


@pytest.mark.parametrize("value", [5, 5.5, True, ["a@b.co"], {"email": "a@b.co"}])
def test_non_strings_are_match_errors(value: object) -> None:
    assert hash_email(value) == MatchError("EMAIL_SHA256", "not_a_string")
    assert hash_phone(value) == MatchError("PHONE_SHA256", "not_a_string")
    assert hash_ad_id(value, "AAID_SHA256") == MatchError("AAID_SHA256", "not_a_string")


@pytest.mark.parametrize(
    "raw",
    [
        "plainaddress",
        "@no-local.com",
        "no-domain@",
        "two@@signs.com",
        "a@b@c.com",
        "nodot@localhost",
        "sp ace@example.com",
        "jane.secret@example",
    ],
)
def test_invalid_email(raw: str) -> None:
    result = hash_email(raw)
    assert result == MatchError("EMAIL_SHA256", "invalid_email")
    assert raw.strip() not in repr(result)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("not a phone", "unparsable_phone"),
        ("jane@example.com", "unparsable_phone"),
        ("+", "unparsable_phone"),
        ("12", "invalid_phone"),
        ("+1 555", "invalid_phone"),
        ("+1 555 555 555 555 555", "invalid_phone"),
    ],
)
def test_invalid_phone(raw: str, reason: str) -> None:
    result = hash_phone(raw, "US")
    assert result == MatchError("PHONE_SHA256", reason)
    assert raw not in repr(result) and raw not in str(result)


def test_e164_fast_path_skips_phonenumbers(monkeypatch: pytest.MonkeyPatch) -> None:
    identifiers.clear_phone_cache()

    def boom(*_: object, **__: object) -> None:
        raise AssertionError("phonenumbers.parse called on the fast path")

    monkeypatch.setattr(phonenumbers, "parse", boom)
    assert hash_phone("+15555555555") == PLUS_15555555555
    assert hash_phone(" +442079460958 ") == sha("+442079460958")


def test_slow_path_is_cached() -> None:
    identifiers.clear_phone_cache()
    for _ in range(5):
        assert hash_phone("(555) 555-5555") == PLUS_15555555555
    info = identifiers._to_e164.cache_info()
    assert (info.misses, info.hits) == (1, 4)
    assert info.maxsize == identifiers.PHONE_CACHE_SIZE


def test_zero_ad_id_is_dropped_as_match_error() -> None:
    assert hash_ad_id("00000000-0000-0000-0000-000000000000", "IDFA_SHA256") == MatchError("IDFA_SHA256", "zero_ad_id")


def test_ad_id_is_not_validated_beyond_trim_and_lowercase() -> None:
    assert hash_ad_id("4242", "IDFA_SHA256") == "0315b4020af3eccab7706679580ac87a710d82970733b8719e70af9b57e7b9e6"
    assert hash_ad_id(" Advertising_ID_1 ", "AAID_SHA256") == sha("advertising_id_1")


def test_region_support() -> None:
    assert identifiers.is_supported_region("US")
    assert identifiers.is_supported_region("GB")
    assert not identifiers.is_supported_region("XX")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Loyalty-42", sha("loyalty-42")),
        (" LOYALTY-42\n", sha("loyalty-42")),
        (42, sha("42")),
        (sha("x").upper(), sha("x")),  # already hashed: passes through lowercased
        (" ", None),
        (None, None),
        (4.2, MatchError("EXTERNAL_ID_SHA256", "not_a_string")),
        (True, MatchError("EXTERNAL_ID_SHA256", "not_a_string")),
    ],
)
def test_external_id(raw: object, expected: object) -> None:
    """TikTok's `external_id` (offline events): trim + lowercase + SHA-256, like Segment's formatUserIds."""
    assert hash_external_id(raw) == expected
