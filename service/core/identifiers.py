"""Normalise and SHA-256 identifiers the way TikTok matches them (docs/tiktok-api.md §1.7, §6.3).

Each `hash_*` function returns the lowercase hex digest, None when the value is absent (None, empty,
whitespace-only), or a `MatchError` naming the type and a reason code. Nothing here ever puts the raw value
in a string: callers may log or dead-letter whatever these functions return.
"""

from __future__ import annotations

import hashlib
import re
from functools import lru_cache
from typing import Final

import phonenumbers

from service.core.model import IdType, MatchError

_HEX64: Final = re.compile(r"[0-9a-fA-F]{64}")
_EMAIL: Final = re.compile(r"[^\s@]+@[^\s@]+\.[^\s@]+")
_E164: Final = re.compile(r"\+[1-9]\d{6,14}")
# Limit-ad-tracking devices report an all-zero id; hashing it would merge every such user into one identifier.
_ZERO_AD_ID: Final = "00000000-0000-0000-0000-000000000000"

_sha256 = hashlib.sha256

PHONE_CACHE_SIZE: Final = 65536


def _error(id_type: IdType, reason: str) -> MatchError:
    return MatchError(id_type, reason)


def _not_a_string(id_type: IdType) -> MatchError:
    return MatchError(id_type, "not_a_string")


def hash_email(value: object) -> str | MatchError | None:
    """Trim + lowercase, then SHA-256; a value that is already 64 hex characters passes through lowercased."""
    if value is None:
        return None
    if not isinstance(value, str):
        return _not_a_string("EMAIL_SHA256")
    email = value.strip().lower()
    if not email:
        return None
    if len(email) == 64 and _HEX64.fullmatch(email):
        return email
    if not _EMAIL.fullmatch(email):  # exactly one @, no whitespace, a dot in the domain
        return _error("EMAIL_SHA256", "invalid_email")
    return _sha256(email.encode()).hexdigest()


@lru_cache(maxsize=PHONE_CACHE_SIZE)
def _to_e164(raw: str, region: str) -> str:
    """E.164 (starts with "+") or a reason code (does not); cached because phonenumbers costs ~10-20 µs."""
    try:
        number = phonenumbers.parse(raw, region)
    except phonenumbers.NumberParseException:
        return "unparsable_phone"
    if not phonenumbers.is_possible_number(number):
        return "invalid_phone"
    result: str = phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
    return result


def normalise_phone(value: str, region: str = "US") -> str | MatchError:
    """E.164 with "+"; input that already looks like E.164 is trusted as-is (the common, fast case)."""
    phone = value.strip()
    if _E164.fullmatch(phone):
        return phone
    result = _to_e164(phone, region)
    if result[0] == "+":
        return result
    return _error("PHONE_SHA256", result)


def hash_phone(value: object, region: str = "US") -> str | MatchError | None:
    """Normalise to E.164 with `region` for numbers without a country code, then SHA-256."""
    if value is None:
        return None
    if not isinstance(value, str):
        return _not_a_string("PHONE_SHA256")
    phone = value.strip()
    if not phone:
        return None
    if len(phone) == 64 and _HEX64.fullmatch(phone):
        return phone.lower()
    e164 = normalise_phone(phone, region)
    if isinstance(e164, MatchError):
        return e164
    return _sha256(e164.encode()).hexdigest()


def hash_ad_id(value: object, id_type: IdType) -> str | MatchError | None:
    """Mobile advertising id (IDFA / AAID): trim + lowercase, then SHA-256."""
    if value is None:
        return None
    if not isinstance(value, str):
        return _not_a_string(id_type)
    ad_id = value.strip().lower()
    if not ad_id:
        return None
    if len(ad_id) == 64 and _HEX64.fullmatch(ad_id):
        return ad_id
    if ad_id == _ZERO_AD_ID:
        return _error(id_type, "zero_ad_id")
    return _sha256(ad_id.encode()).hexdigest()


def hash_external_id(value: object) -> str | MatchError | None:
    """An advertiser's own user id (TikTok's `external_id`): trim + lowercase, then SHA-256.

    Integers are accepted as their decimal text (JSON producers often send numeric user ids); a value that is
    already 64 hex characters passes through lowercased, like every other identifier here.
    """
    if value is None:
        return None
    if type(value) is int:
        value = str(value)
    elif not isinstance(value, str):
        return MatchError("EXTERNAL_ID_SHA256", "not_a_string")
    external_id = value.strip().lower()
    if not external_id:
        return None
    if len(external_id) == 64 and _HEX64.fullmatch(external_id):
        return external_id
    return _sha256(external_id.encode()).hexdigest()


def is_supported_region(region: str) -> bool:
    """Whether phonenumbers knows `region` (validate PHONE_DEFAULT_REGION at startup, not per record)."""
    return region in phonenumbers.SUPPORTED_REGIONS


def clear_phone_cache() -> None:
    _to_e164.cache_clear()
