"""Strict validation of `POST /event/track/` (TikTok Events API 2.0) bodies for offline event sets.

Pure, like `state.py`: the time to check `event_time` against is passed in. The first failing check raises an
`ApiError` naming the event's index (`data[3].event_time: ...`), so one bad event fails the whole request, as at
TikTok (docs/tiktok-api.md §4.6). Messages name fields and never quote values.

Rules (docs/tiktok-api.md §8.2, §8.4): `event_source` "offline" (the sandbox serves no pixels), a non-empty
`event_source_id`, 1 to 1,000 events (more: 40061 INVALID_BATCH_SIZE, TikTok's batch-size code in its return-code
table); per event a TikTok standard `event` name, an integer `event_time` in Unix seconds neither ahead of the
sandbox clock by more than the client's allowed skew nor older than 28 days, `user.email` / `user.phone` /
`user.external_id` as lists of lowercase hex SHA-256 digests (anything else there: 40062 PII_NOT_HASHED), at least
one match key, a three-upper-case-letter `currency`, numeric `value`, `price` and `quantity`. Unknown fields are
refused (40002) so a misspelt field in the client shows up here rather than being silently dropped.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from datetime import datetime
from typing import Final

from service.core.offline import (
    EVENT_CHANNELS,
    EVENT_SOURCE,
    FUTURE_SKEW_S,
    MAX_EVENT_AGE_S,
    MAX_EVENTS_PER_REQUEST,
    TIKTOK_STANDARD_EVENTS,
)
from service.devtools.sandbox.state import INVALID_BATCH_SIZE, PII_NOT_HASHED, ApiError, TrackRequest, param_error

_BODY_KEYS: Final = frozenset({"event_source", "event_source_id", "partner_name", "data", "test_event_code"})
_EVENT_KEYS: Final = frozenset(
    {"event", "event_time", "event_id", "user", "properties", "page", "limited_data_use", "test_event_code"}
)
_HASHED_USER_KEYS: Final = ("email", "phone", "external_id")
_PLAIN_USER_KEYS: Final = ("ttclid", "ttp", "ip", "user_agent", "lead_id")
_USER_KEYS: Final = frozenset((*_HASHED_USER_KEYS, *_PLAIN_USER_KEYS, "locale"))
_TEXT_PROPERTIES: Final = ("content_type", "query", "description", "order_id", "shop_id")
_PROPERTY_KEYS: Final = frozenset((*_TEXT_PROPERTIES, "contents", "currency", "value", "event_channel"))
_CONTENT_TEXT: Final = ("content_id", "content_name", "content_type", "content_category", "brand")
_CONTENT_KEYS: Final = frozenset((*_CONTENT_TEXT, "price", "quantity"))
_SHA256: Final = re.compile(r"[0-9a-f]{64}")
_CURRENCY: Final = re.compile(r"[A-Z]{3}")


def _unknown(value: Mapping[str, object], allowed: frozenset[str], where: str) -> None:
    extra = set(value) - allowed
    if extra:
        raise param_error(f"{where}: unknown field {sorted(extra)[0]}")


def _optional_str(value: object, where: str) -> None:
    if value is not None and not isinstance(value, str):
        raise param_error(f"{where}: must be a string")


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def validate_event_track(body: object, at: datetime, *, max_events: int = MAX_EVENTS_PER_REQUEST) -> TrackRequest:
    """Every check of `event/track/` at sandbox time `at`; raises ApiError on the first failure."""
    if not isinstance(body, dict):
        raise param_error("request body must be a JSON object")
    _unknown(body, _BODY_KEYS, "request body")
    source = body.get("event_source")
    if source is None:
        raise param_error("event_source: required")
    if source != EVENT_SOURCE:
        raise param_error(f'event_source: must be "{EVENT_SOURCE}" (the sandbox serves offline event sets only)')
    source_id = body.get("event_source_id")
    if not isinstance(source_id, str) or not source_id.strip():
        raise param_error("event_source_id: must be a non-empty string")
    _optional_str(body.get("partner_name"), "partner_name")
    _optional_str(body.get("test_event_code"), "test_event_code")
    data = body.get("data")
    if not isinstance(data, list) or not data:
        raise param_error("data: must be a non-empty list")
    if len(data) > max_events:
        raise ApiError(
            INVALID_BATCH_SIZE, f"INVALID_BATCH_SIZE: data has {len(data)} events, at most {max_events} allowed"
        )
    now = at.timestamp()
    events = tuple(_event(i, ev, now) for i, ev in enumerate(data))
    return TrackRequest(source_id, events, at)


def _event(i: int, ev: object, now: float) -> dict[str, object]:
    where = f"data[{i}]"
    if not isinstance(ev, dict):
        raise param_error(f"{where}: must be an object")
    _unknown(ev, _EVENT_KEYS, where)
    name = ev.get("event")
    if not isinstance(name, str) or name not in TIKTOK_STANDARD_EVENTS:
        raise param_error(f"{where}.event: must be a TikTok standard event name")
    event_time = ev.get("event_time")
    if not isinstance(event_time, int) or isinstance(event_time, bool):
        raise param_error(f"{where}.event_time: must be an integer (Unix seconds)")
    if event_time > now + FUTURE_SKEW_S:
        raise param_error(f"{where}.event_time: is in the future")
    if event_time < now - MAX_EVENT_AGE_S:
        raise param_error(f"{where}.event_time: is older than 28 days")
    event_id = ev.get("event_id")
    if event_id is not None and (not isinstance(event_id, str) or not event_id):
        raise param_error(f"{where}.event_id: must be a non-empty string")
    _user(ev.get("user"), f"{where}.user")
    props = ev.get("properties")
    if props is not None:
        _properties(props, f"{where}.properties")
    if ev.get("page") is not None and not isinstance(ev["page"], dict):
        raise param_error(f"{where}.page: must be an object")
    if ev.get("limited_data_use") is not None and not isinstance(ev["limited_data_use"], bool):
        raise param_error(f"{where}.limited_data_use: must be a boolean")
    _optional_str(ev.get("test_event_code"), f"{where}.test_event_code")
    return ev


def _user(user: object, where: str) -> None:
    if not isinstance(user, dict):
        raise param_error(f"{where}: required object")
    _unknown(user, _USER_KEYS, where)
    keys = 0
    for key in _HASHED_USER_KEYS:
        values = user.get(key)
        if values is None:
            continue
        if not isinstance(values, list):
            raise param_error(f"{where}.{key}: must be a list of SHA-256 digests")
        for j, digest in enumerate(values):
            if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
                raise ApiError(
                    PII_NOT_HASHED, f"PII_NOT_HASHED: {where}.{key}[{j}] is not a lowercase hex SHA-256 digest"
                )
        keys += len(values)
    for key in _PLAIN_USER_KEYS:
        value = user.get(key)
        _optional_str(value, f"{where}.{key}")
        if isinstance(value, str) and value.strip():
            keys += 1
    _optional_str(user.get("locale"), f"{where}.locale")
    if not keys:
        raise param_error(f"{where}: no match key (email, phone, external_id, ttclid, ttp, ip, user_agent, lead_id)")


def _properties(props: object, where: str) -> None:
    if not isinstance(props, dict):
        raise param_error(f"{where}: must be an object")
    _unknown(props, _PROPERTY_KEYS, where)
    currency = props.get("currency")
    if currency is not None and not (isinstance(currency, str) and _CURRENCY.fullmatch(currency)):
        raise param_error(f"{where}.currency: must be an ISO 4217 code (three upper-case letters)")
    if props.get("value") is not None and not _is_number(props["value"]):
        raise param_error(f"{where}.value: must be a number")
    for key in _TEXT_PROPERTIES:
        _optional_str(props.get(key), f"{where}.{key}")
    channel = props.get("event_channel")
    if channel is not None and not (isinstance(channel, str) and channel in EVENT_CHANNELS):
        raise param_error(f"{where}.event_channel: must be one of {', '.join(sorted(EVENT_CHANNELS))}")
    contents = props.get("contents")
    if contents is None:
        return
    if not isinstance(contents, list):
        raise param_error(f"{where}.contents: must be a list")
    for k, item in enumerate(contents):
        at = f"{where}.contents[{k}]"
        if not isinstance(item, dict):
            raise param_error(f"{at}: must be an object")
        _unknown(item, _CONTENT_KEYS, at)
        for key in _CONTENT_TEXT:
            _optional_str(item.get(key), f"{at}.{key}")
        if item.get("price") is not None and not _is_number(item["price"]):
            raise param_error(f"{at}.price: must be a number")
        quantity = item.get("quantity")
        if quantity is not None and (not isinstance(quantity, int) or isinstance(quantity, bool)):
            raise param_error(f"{at}.quantity: must be an integer")
