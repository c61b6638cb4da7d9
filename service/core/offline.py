"""Offline conversion events: recognise, map, validate and hash them, and build TikTok's `/event/track/` body.

Pure: no I/O, and the clock is the `now` argument (epoch seconds), so every rule is unit-testable with literals.
Facts and sources are in docs/tiktok-api.md §8.2 and §8.4.

Two inputs become one `OfflineEvent`:
- the canonical offline event (schemas/offline_event.avsc / .json, decoded from JSON or Avro into a dict),
  recognised by its `offline_event` key and by carrying none of the membership event's `audience_key` / `action`
  nor Segment's `type` (`is_canonical_offline`);
- a Segment `track` event of the e-commerce spec ("Order Completed", "Product Added", ...) whose name is in the
  event map (`DEFAULT_EVENT_MAP`, overridable). Segment events carrying `context.personas` are Engage audience
  events and belong to the membership stream, never to this one.
Everything else is `NOT_OFFLINE_EVENT`; a Segment track event whose name the map does not know is
`UNMAPPED_EVENT` (skipped and counted, not dead-lettered).

Validation gives stable dead-letter reasons, checked in this order so a record only goes to an operator for a
configuration fix when the fix will let it through: `invalid_event` (shape, event name, time in the future, currency,
value, contents, no match key), then `event_too_old` (older than 28 days), then `missing_event_set_id`. Error texts
name fields and describe values by kind; they never quote an email, phone, IP address, user agent or any other
match key.

`event_id`: the upstream's own id when it has one. Otherwise it is derived, never from a Kafka offset:
- from the upstream message id (Segment `messageId`, canonical `message_id`) and the TikTok event name, so a
  re-delivery or a replay of the same message gets the same id and TikTok counts it once (48-hour window);
- failing that, from the hashed content of the event (everything sent except the id). Trade-off: a re-delivery is
  still de-duplicated, but two genuinely distinct conversions that are identical in every field sent (same
  person, same second, same products and value) collapse into one, and a resend whose content changed at all (a
  corrected value, a re-formatted phone) is counted twice. Producers should send `event_id` or `message_id`.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, Final, Literal

import orjson

from service.core.identifiers import hash_email, hash_external_id, hash_phone, is_supported_region
from service.core.model import DlqReason, MatchError, Rejected, Skipped

# -- TikTok's vocabulary (docs/tiktok-api.md §8.4) -------------------------------------------------------------

EVENT_SOURCE: Final = "offline"
MAX_EVENTS_PER_REQUEST: Final = 1000
MAX_EVENT_AGE_S: Final = 28 * 24 * 3600
FUTURE_SKEW_S: Final = 300  # clocks of producers and of this service may disagree by a few minutes
DEDUP_WINDOW_S: Final = 48 * 3600  # TikTok counts the same event + event_id once within this window

# TikTok help, "Supported events for offline event sets".
OFFLINE_EVENT_SET_EVENTS: Final[frozenset[str]] = frozenset(
    {
        "AddPaymentInfo",
        "AddToCart",
        "AddToWishlist",
        "ClickButton",
        "CompletePayment",
        "CompleteRegistration",
        "Contact",
        "Download",
        "InitiateCheckout",
        "PlaceAnOrder",
        "Search",
        "SubmitForm",
        "Subscribe",
        "ViewContent",
    }
)
# TikTok help, "About supported standard events" (names unified across web, offline and CRM from May 2025;
# CompletePayment and SubmitForm were renamed Purchase and Lead, the old names are still converted).
UNIFIED_STANDARD_EVENTS: Final[frozenset[str]] = frozenset(
    {
        "AddPaymentInfo",
        "AddToCart",
        "AddToWishlist",
        "ApplicationApproval",
        "CompleteRegistration",
        "Contact",
        "CustomizeProduct",
        "Download",
        "FindLocation",
        "InitiateCheckout",
        "Lead",
        "Purchase",
        "Schedule",
        "Search",
        "StartTrial",
        "SubmitApplication",
        "Subscribe",
        "ViewContent",
    }
)
TIKTOK_STANDARD_EVENTS: Final[frozenset[str]] = OFFLINE_EVENT_SET_EVENTS | UNIFIED_STANDARD_EVENTS

# Segment e-commerce (and Segment's own offline presets) → TikTok. Sources: Segment's tiktok-offline-conversions
# presets (Order Completed → CompletePayment, Form Submitted → SubmitForm, ...), Segment's tiktok-conversions
# presets and RudderStack's tiktok_ads map (docs/tiktok-api.md §8.4). Override per deployment with `build_event_map`.
DEFAULT_EVENT_MAP: Final[Mapping[str, str]] = MappingProxyType(
    {
        "Order Completed": "CompletePayment",
        "Checkout Started": "InitiateCheckout",
        "Payment Info Entered": "AddPaymentInfo",
        "Product Added": "AddToCart",
        "Product Added to Wishlist": "AddToWishlist",
        "Product Viewed": "ViewContent",
        "Products Searched": "Search",
        "Signed Up": "CompleteRegistration",
        "Form Submitted": "SubmitForm",
        "User Contacted Call Center": "Contact",
        "User Subscribed In Store": "Subscribe",
    }
)

EVENT_CHANNELS: Final[frozenset[str]] = frozenset({"email", "website", "phone_call", "in_store", "crm", "other"})

MatchKey = Literal["email", "phone", "external_id", "ttclid", "ttp", "ip", "user_agent"]
MATCH_KEYS: Final[tuple[MatchKey, ...]] = ("email", "phone", "external_id", "ttclid", "ttp", "ip", "user_agent")
HASHED_MATCH_KEYS: Final[tuple[MatchKey, ...]] = ("email", "phone", "external_id")

SEGMENT: Final = "segment"
CANONICAL: Final = "canonical"
UNKNOWN: Final = "unknown"

NOT_OFFLINE_EVENT: Final = Skipped("not_offline_event")
UNMAPPED_EVENT: Final = Skipped("unmapped_event_name")

_INVALID: Final = DlqReason.INVALID_EVENT
_MEMBERSHIP_KEYS: Final = ("audience_key", "action", "type")
_SAFE_NAME: Final = re.compile(r"[A-Za-z][A-Za-z _]{0,63}")  # letters only: no address or number gets through
_CURRENCY: Final = re.compile(r"[A-Z]{3}")
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_EVENT_ID_CHARS: Final = 32  # TikTok recommends a 32-character alphanumeric event_id (docs/tiktok-api.md §8.2)
_MESSAGE_NS: Final = b"tiktok-audience-sync/offline/v1/message\x00"
_CONTENT_NS: Final = b"tiktok-audience-sync/offline/v1/content\x00"
_EMPTY: Final[dict[str, Any]] = {}
_KINDS: Final[dict[type, str]] = {
    list: "an array",
    dict: "an object",
    float: "a number",
    int: "a number",
    bool: "a boolean",
    str: "a string",
}


# -- values ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Content:
    """One product or service of a conversion (TikTok's `properties.contents[]` item)."""

    content_id: str | None = None
    content_name: str | None = None
    content_type: str | None = None
    content_category: str | None = None
    brand: str | None = None
    price: int | float | None = None
    quantity: int | None = None


@dataclass(frozen=True, slots=True)
class OfflineEvent:
    """A validated conversion, match keys normalised and hashed, ready for `event_track_body`.

    `event_time` is epoch seconds. `email`, `phone` and `external_id` hold SHA-256 lowercase hex digests;
    `ttclid`, `ttp`, `ip` and `user_agent` are as the upstream gave them and are left out of `repr` (never
    logged). `source` is "segment" or "canonical"; `event_id_from` says where `event_id` came from:
    "upstream", "message_id" or "content".
    """

    event_set_id: str
    event: str
    event_time: int
    event_id: str
    email: tuple[str, ...] = field(default=(), repr=False)
    phone: tuple[str, ...] = field(default=(), repr=False)
    external_id: tuple[str, ...] = field(default=(), repr=False)
    ttclid: str | None = field(default=None, repr=False)
    ttp: str | None = field(default=None, repr=False)
    ip: str | None = field(default=None, repr=False)
    user_agent: str | None = field(default=None, repr=False)
    contents: tuple[Content, ...] = ()
    currency: str | None = None
    value: int | float | None = None
    order_id: str | None = None
    shop_id: str | None = None
    channel: str | None = None
    advertiser_id: str | None = None
    source: str = CANONICAL
    event_id_from: str = "upstream"

    @property
    def match_keys(self) -> tuple[MatchKey, ...]:
        """The match key types present, in `MATCH_KEYS` order (for metrics: never their values)."""
        present = (
            bool(self.email),
            bool(self.phone),
            bool(self.external_id),
            self.ttclid is not None,
            self.ttp is not None,
            self.ip is not None,
            self.user_agent is not None,
        )
        return tuple(k for k, on in zip(MATCH_KEYS, present, strict=True) if on)


@dataclass(frozen=True, slots=True)
class OfflineParsed:
    """What the pipeline needs per record: the outcome, match keys dropped as invalid, and the input kind.

    `match_errors` name the key ("email", "phone", ...) and a reason code, never a value.
    """

    outcome: OfflineEvent | Skipped | Rejected
    match_errors: tuple[MatchError, ...]
    source: str  # "segment" | "canonical" | "unknown"


def _default_event_map() -> Mapping[str, str]:
    return DEFAULT_EVENT_MAP


def _empty_event_set_ids() -> Mapping[str, str]:
    return MappingProxyType({})


def _all_match_keys() -> frozenset[str]:
    return frozenset(MATCH_KEYS)


@dataclass(frozen=True, slots=True)
class OfflineSettings:
    """Configuration of offline events (the mappings file and the environment fill it; validated by the parser).

    - `event_map`: upstream (Segment) event name → TikTok event name, matched ignoring case and surrounding
      spaces; build it with `build_event_map` to keep the defaults and override some names;
    - `enabled_keys`: match keys read and sent; the others are ignored as if absent;
    - `event_set_ids`: advertiser id → event set id; `default_event_set_id` for records naming no known advertiser.
    """

    event_map: Mapping[str, str] = field(default_factory=_default_event_map)
    enabled_keys: frozenset[str] = field(default_factory=_all_match_keys)
    event_set_ids: Mapping[str, str] = field(default_factory=_empty_event_set_ids)
    default_event_set_id: str | None = None
    phone_default_region: str = "US"
    max_age_s: int = MAX_EVENT_AGE_S
    future_skew_s: int = FUTURE_SKEW_S


def build_event_map(overrides: Mapping[str, str | None] | None = None) -> dict[str, str]:
    """`DEFAULT_EVENT_MAP` with `overrides` applied: a name maps to a TikTok event, or to None to drop a default.

    Raises ValueError for a target that is not a TikTok standard event name, or an empty upstream name.
    """
    table = dict(DEFAULT_EVENT_MAP)
    folded = {_fold(k): k for k in table}
    for name, target in (overrides or {}).items():
        key = _fold(name)
        if not key:
            raise ValueError("event map: an upstream event name is empty")
        existing = folded.pop(key, None)
        if existing is not None:
            del table[existing]
        if target is None:
            continue
        if target not in TIKTOK_STANDARD_EVENTS:
            raise ValueError(f"event map: {name!r} maps to {target!r}, which is not a TikTok standard event name")
        table[name.strip()] = target
        folded[key] = name.strip()
    return table


def is_canonical_offline(data: Mapping[str, Any]) -> bool:
    """Whether a decoded record is a canonical offline event (not a membership event, not a Segment event).

    Canonical membership records are those with `audience_key` or `action` (service/core/events.py); Segment
    records have `type`. An offline record has `offline_event` and none of these, so no record is both.
    """
    return "offline_event" in data and not any(k in data for k in _MEMBERSHIP_KEYS)


def derive_event_id(event: str, message_id: str) -> str:
    """The `event_id` of a message that has none: 32 hex characters from the TikTok event name and message id.

    The same message always gets the same id (so TikTok de-duplicates re-deliveries and replays within 48 hours);
    different messages, or one message mapped to two event names, get different ids.
    """
    digest = hashlib.sha256(_MESSAGE_NS + event.encode() + b"\x00" + message_id.encode()).hexdigest()
    return digest[:_EVENT_ID_CHARS]


# -- the request body -------------------------------------------------------------------------------------------


def _content_wire(c: Content) -> dict[str, object]:
    item: dict[str, object] = {}
    if c.content_id is not None:
        item["content_id"] = c.content_id
    if c.content_name is not None:
        item["content_name"] = c.content_name
    if c.content_type is not None:
        item["content_type"] = c.content_type
    if c.content_category is not None:
        item["content_category"] = c.content_category
    if c.brand is not None:
        item["brand"] = c.brand
    if c.price is not None:
        item["price"] = c.price
    if c.quantity is not None:
        item["quantity"] = c.quantity
    return item


def _wire(e: OfflineEvent, *, with_id: bool = True) -> dict[str, object]:
    """One `data[]` item of `/event/track/`: absent fields are left out, never sent as null."""
    user: dict[str, object] = {}
    if e.email:
        user["email"] = list(e.email)
    if e.phone:
        user["phone"] = list(e.phone)
    if e.external_id:
        user["external_id"] = list(e.external_id)
    if e.ttclid is not None:
        user["ttclid"] = e.ttclid
    if e.ttp is not None:
        user["ttp"] = e.ttp
    if e.ip is not None:
        user["ip"] = e.ip
    if e.user_agent is not None:
        user["user_agent"] = e.user_agent
    item: dict[str, object] = {"event": e.event, "event_time": e.event_time}
    if with_id:
        item["event_id"] = e.event_id
    item["user"] = user
    props: dict[str, object] = {}
    if e.contents:
        props["contents"] = [_content_wire(c) for c in e.contents]
    if e.currency is not None:
        props["currency"] = e.currency
    if e.value is not None:
        props["value"] = e.value
    if e.order_id is not None:
        props["order_id"] = e.order_id
    if e.shop_id is not None:
        props["shop_id"] = e.shop_id
    if e.channel is not None:
        props["event_channel"] = e.channel
    if props:
        item["properties"] = props
    return item


def event_wire(e: OfflineEvent) -> dict[str, object]:
    """One event's `data[]` item of the `/event/track/` body (the batcher sizes requests with it)."""
    return _wire(e)


def event_track_body(event_set_id: str, events: Sequence[OfflineEvent], *, partner_name: str | None = None) -> bytes:
    """The JSON body of `POST /event/track/` for 1..`MAX_EVENTS_PER_REQUEST` events of one event set.

    Raises ValueError for an empty or oversized batch or an event of another event set (a caller bug).
    """
    n = len(events)
    if not 0 < n <= MAX_EVENTS_PER_REQUEST:
        raise ValueError(f"an /event/track/ request carries 1 to {MAX_EVENTS_PER_REQUEST} events, not {n}")
    data = []
    for e in events:
        if e.event_set_id != event_set_id:
            raise ValueError("every event of an /event/track/ request must belong to its event set")
        data.append(_wire(e))
    body: dict[str, object] = {"event_source": EVENT_SOURCE, "event_source_id": event_set_id}
    if partner_name is not None:
        body["partner_name"] = partner_name
    body["data"] = data
    return orjson.dumps(body)


# -- parsing helpers (each returns the value or a Rejected; none echoes a value) -------------------------------


def _fold(name: str) -> str:
    return name.strip().casefold()


def _kind(value: object) -> str:
    if type(value) is str:
        return "a non-numeric string" if value.strip() else "an empty string"
    return _KINDS.get(type(value), type(value).__name__)


def _invalid(error: str) -> Rejected:
    return Rejected(_INVALID, error)


def _text(value: object, label: str) -> str | Rejected | None:
    """A free-text field (ids, names): a string, or an integer as its digits; blank → absent."""
    if value is None:
        return None
    if type(value) is str:
        text = value.strip()
        return text or None
    if type(value) is int:
        return str(value)
    return _invalid(f"{label} must be a string, got {_kind(value)}")


def _tiktok_id(value: object, label: str) -> str | Rejected | None:
    if value is None:
        return None
    if type(value) is int and value >= 0:
        return str(value)
    if type(value) is str:
        text = value.strip()
        if not text:
            return None
        if text.isascii() and text.isdigit():
            return text
        return _invalid(f"{label} must be a TikTok id (digits only), got a string with other characters")
    return _invalid(f"{label} must be a TikTok id (digits only), got {_kind(value)}")


def _number(value: object, label: str) -> int | float | Rejected | None:
    """A non-negative finite number; a numeric string (Segment sends some) becomes a float."""
    if value is None:
        return None
    number: int | float
    if type(value) is int or type(value) is float:
        number = value
    elif type(value) is str:
        text = value.strip()
        if not text:
            return None
        try:
            number = float(text)
        except ValueError:
            return _invalid(f"{label} must be a number, got a non-numeric string")
    else:
        return _invalid(f"{label} must be a number, got {_kind(value)}")
    if not math.isfinite(number):
        return _invalid(f"{label} must be a finite number")
    if number < 0:
        return _invalid(f"{label} must not be negative")
    return number


def _quantity(value: object, label: str) -> int | Rejected | None:
    number = _number(value, label)
    if number is None or isinstance(number, Rejected):
        return number
    if isinstance(number, float):
        if not number.is_integer():
            return _invalid(f"{label} must be a whole number")
        return int(number)
    return number


def _currency(value: object, label: str) -> str | Rejected | None:
    if value is None:
        return None
    if type(value) is not str:
        return _invalid(f"{label} must be an ISO 4217 code such as USD, got {_kind(value)}")
    code = value.strip().upper()
    if not code:
        return None
    if not (code.isascii() and _CURRENCY.fullmatch(code)):
        return _invalid(f"{label} must be an ISO 4217 code such as USD (three letters), got {len(code)} characters")
    return code


def _iso_ms(text: str) -> int | None:
    try:
        dt = datetime.fromisoformat(text.strip())
    except ValueError:
        return None
    return _dt_ms(dt)


def _dt_ms(dt: datetime) -> int:
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    delta = dt - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1000 + delta.microseconds // 1000


def _time_ms(value: object) -> int | None:
    if type(value) is int:
        return value
    if isinstance(value, datetime):  # Avro decoded with its timestamp-millis logical type
        return _dt_ms(value)
    if type(value) is str:
        return _iso_ms(value)
    return None


def _event_name(value: object) -> str:
    """An event name as an error text may show it: only when it looks like one, so no value leaks through it."""
    if type(value) is str and _SAFE_NAME.fullmatch(value):
        return f'"{value}"'
    return "the given name"


def _dict(value: object) -> dict[str, Any]:
    return value if type(value) is dict else _EMPTY


def _present(value: object) -> bool:
    return value is not None and not (type(value) is str and not value.strip())


def _first(*values: object) -> object:
    for v in values:
        if _present(v):
            return v
    return None


@dataclass(slots=True)
class _Fields:
    """One record's raw values and the names error texts use for them (they differ between the two inputs)."""

    source: str
    event: str
    time: object
    time_label: str
    event_id: object
    message_id: object
    event_set_id: object = None
    advertiser_id: object = None
    channel: object = None
    email: object = None
    phone: object = None
    external_id: object = None
    ttclid: object = None
    ttp: object = None
    ip: object = None
    user_agent: object = None
    contents: object = None
    contents_label: str = "contents"
    currency: object = None
    value: object = None
    value_label: str = "value"
    order_id: object = None
    shop_id: object = None
    labels: dict[str, str] = field(default_factory=dict)

    def label(self, name: str) -> str:
        return self.labels.get(name, name)


_SEGMENT_LABELS: Final[dict[str, str]] = {
    "event_id": "properties.event_id",
    "message_id": "messageId",
    "event_set_id": "properties.event_set_id",
    "advertiser_id": "properties.advertiser_id",
    "channel": "properties.event_channel",
    "currency": "properties.currency",
    "order_id": "properties.order_id",
    "shop_id": "properties.shop_id",
}
_SEGMENT_KEY_FIELDS: Final[dict[str, str]] = {
    "email": "context.traits.email, traits.email, properties.email",
    "phone": "context.traits.phone, traits.phone, properties.phone",
    "external_id": "properties.external_id, userId",
    "ttclid": "properties.ttclid",
    "ttp": "properties.ttp",
    "ip": "context.ip",
    "user_agent": "context.userAgent",
}
# Segment product fields → TikTok content fields (Segment e-commerce spec v2).
_PRODUCT_TEXT: Final = (
    ("content_name", "name"),
    ("content_category", "category"),
    ("brand", "brand"),
)


class OfflineParser:
    """Canonical offline events and mapped Segment e-commerce events → `OfflineEvent`, `Skipped` or `Rejected`.

    `settings` is validated here, so a bad configuration fails at startup; it is a plain attribute so the
    pipeline can swap in a reloaded mappings file between records.
    """

    def __init__(self, settings: OfflineSettings) -> None:
        if not is_supported_region(settings.phone_default_region):
            raise ValueError(f"PHONE_DEFAULT_REGION: unknown region {settings.phone_default_region!r}")
        unknown = sorted(set(settings.enabled_keys) - set(MATCH_KEYS))
        if unknown:
            raise ValueError(f"offline match keys: unknown {unknown}; known: {', '.join(MATCH_KEYS)}")
        events: dict[str, str] = {}
        for name, target in settings.event_map.items():
            if target not in TIKTOK_STANDARD_EVENTS:
                raise ValueError(f"event map: {name!r} maps to {target!r}, which is not a TikTok standard event name")
            key = _fold(name)
            if not key:
                raise ValueError("event map: an upstream event name is empty")
            if events.get(key, target) != target:
                raise ValueError(f"event map: {name!r} is mapped twice (names match ignoring case) to different events")
            events[key] = target
        for adv, set_id in settings.event_set_ids.items():
            if not (adv.isascii() and adv.isdigit()) or not (set_id.isascii() and set_id.isdigit()):
                raise ValueError("offline event sets: advertiser ids and event set ids must be digits")
        default = settings.default_event_set_id
        if default is not None and not (default.isascii() and default.isdigit()):
            raise ValueError("default offline event set id must be digits")
        if settings.max_age_s <= 0 or settings.future_skew_s < 0:
            raise ValueError("offline event age limit must be positive and the clock skew not negative")
        self.settings = settings
        self._events = events
        self._enabled = frozenset(settings.enabled_keys)
        self._region = settings.phone_default_region
        disabled = [k for k in MATCH_KEYS if k not in self._enabled]
        self._disabled_note = f"; not sending {', '.join(disabled)} (settings)" if disabled else ""

    def parse(self, data: Mapping[str, Any], *, now: float) -> OfflineParsed:
        """One decoded record (a dict from JSON or Avro) → outcome; never raises. `now` is epoch seconds."""
        source = UNKNOWN
        fields: _Fields | Skipped | Rejected
        try:
            if "type" in data:
                source = SEGMENT
                fields = self._segment(data)
            elif is_canonical_offline(data):
                source = CANONICAL
                fields = self._canonical(data)
            else:
                return OfflineParsed(NOT_OFFLINE_EVENT, (), UNKNOWN)
            if not isinstance(fields, _Fields):
                return OfflineParsed(fields, (), source)
            outcome, errors = self._build(fields, now)
            return OfflineParsed(outcome, errors, source)
        except Exception as exc:  # last line of defence: a bug dead-letters one record, it does not stop a partition
            return OfflineParsed(_invalid(f"offline event could not be processed ({type(exc).__name__})"), (), source)

    # -- the two inputs ------------------------------------------------------------------------------------------

    def _canonical(self, ev: Mapping[str, Any]) -> _Fields | Rejected:
        if ev.get("offline_event") is not True:
            return _invalid('canonical offline event: "offline_event" must be true')
        name = ev.get("event")
        if type(name) is not str or name not in TIKTOK_STANDARD_EVENTS:
            return _invalid(
                f'"event": {_event_name(name)} is not a TikTok standard event name (docs/tiktok-api.md §8.4)'
            )
        return _Fields(
            source=CANONICAL,
            event=name,
            time=ev.get("event_time"),
            time_label="event_time",
            event_id=ev.get("event_id"),
            message_id=ev.get("message_id"),
            event_set_id=ev.get("event_set_id"),
            advertiser_id=ev.get("advertiser_id"),
            channel=ev.get("channel"),
            email=ev.get("email"),
            phone=ev.get("phone"),
            external_id=ev.get("external_id"),
            ttclid=ev.get("ttclid"),
            ttp=ev.get("ttp"),
            ip=ev.get("ip"),
            user_agent=ev.get("user_agent"),
            contents=ev.get("contents"),
            currency=ev.get("currency"),
            value=ev.get("value"),
            order_id=ev.get("order_id"),
            shop_id=ev.get("shop_id"),
        )

    def _segment(self, ev: Mapping[str, Any]) -> _Fields | Skipped:
        if ev.get("type") != "track":
            return NOT_OFFLINE_EVENT
        context = _dict(ev.get("context"))
        if "personas" in context:  # an Engage audience event: the membership stream's
            return NOT_OFFLINE_EVENT
        name = ev.get("event")
        if type(name) is not str:
            return NOT_OFFLINE_EVENT
        target = self._events.get(_fold(name))
        if target is None:
            return UNMAPPED_EVENT
        props = _dict(ev.get("properties"))
        traits = _dict(ev.get("traits"))
        ctx_traits = _dict(context.get("traits"))
        time, time_label = ev.get("timestamp"), "timestamp"
        if not _present(time):
            time, time_label = ev.get("originalTimestamp"), "originalTimestamp"
        value, value_label = None, "properties.value"
        for key in ("value", "revenue", "total"):
            if _present(props.get(key)):
                value, value_label = props[key], f"properties.{key}"
                break
        if isinstance(props.get("products"), list):
            contents: object = props["products"]
            contents_label = "properties.products"
        elif any(_present(props.get(k)) for k in ("product_id", "sku")):
            contents, contents_label = [props], "properties"  # a single-product event: the product is the event
        else:
            contents, contents_label = None, "properties.products"
        return _Fields(
            source=SEGMENT,
            event=target,
            time=time,
            time_label=time_label,
            event_id=props.get("event_id"),
            message_id=ev.get("messageId"),
            event_set_id=props.get("event_set_id"),
            advertiser_id=props.get("advertiser_id"),
            channel=props.get("event_channel"),
            email=_first(ctx_traits.get("email"), traits.get("email"), props.get("email")),
            phone=_first(ctx_traits.get("phone"), traits.get("phone"), props.get("phone")),
            external_id=_first(props.get("external_id"), ev.get("userId")),
            ttclid=props.get("ttclid"),
            ttp=props.get("ttp"),
            ip=context.get("ip"),
            user_agent=context.get("userAgent"),
            contents=contents,
            contents_label=contents_label,
            currency=props.get("currency"),
            value=value,
            value_label=value_label,
            order_id=props.get("order_id"),
            shop_id=props.get("shop_id"),
            labels=_SEGMENT_LABELS,
        )

    # -- validation, hashing, resolution -------------------------------------------------------------------------

    def _build(self, f: _Fields, now: float) -> tuple[OfflineEvent | Rejected, tuple[MatchError, ...]]:
        ms = _time_ms(f.time)
        if ms is None:
            what = "absent" if f.time is None else f"not a time ({_kind(f.time)})"
            return _invalid(f"{f.time_label} must be epoch milliseconds or an ISO-8601 date-time, got {what}"), ()
        event_time = ms // 1000
        if event_time > now + self.settings.future_skew_s:
            ahead = int(event_time - now)
            return _invalid(f"{f.time_label} is {ahead} s in the future (more than the allowed clock skew)"), ()

        event_set_id = _tiktok_id(f.event_set_id, f.label("event_set_id"))
        if isinstance(event_set_id, Rejected):
            return event_set_id, ()
        advertiser_id = _tiktok_id(f.advertiser_id, f.label("advertiser_id"))
        if isinstance(advertiser_id, Rejected):
            return advertiser_id, ()
        channel = _text(f.channel, f.label("channel"))
        if isinstance(channel, Rejected):
            return channel, ()
        if channel is not None and channel not in EVENT_CHANNELS:
            return _invalid(f"{f.label('channel')} must be one of {', '.join(sorted(EVENT_CHANNELS))}"), ()
        upstream_id = _text(f.event_id, f.label("event_id"))
        if isinstance(upstream_id, Rejected):
            return upstream_id, ()
        message_id = _text(f.message_id, f.label("message_id"))
        if isinstance(message_id, Rejected):
            return message_id, ()
        contents = self._contents(f.contents, f.contents_label, f.source)
        if isinstance(contents, Rejected):
            return contents, ()
        currency = _currency(f.currency, f.label("currency"))
        if isinstance(currency, Rejected):
            return currency, ()
        value = _number(f.value, f.value_label)
        if isinstance(value, Rejected):
            return value, ()
        order_id = _text(f.order_id, f.label("order_id"))
        if isinstance(order_id, Rejected):
            return order_id, ()
        shop_id = _text(f.shop_id, f.label("shop_id"))
        if isinstance(shop_id, Rejected):
            return shop_id, ()

        errors: list[MatchError] = []
        on = self._enabled
        email = self._hashed(f.email, "email", hash_email, errors) if "email" in on else ()
        phone = self._hashed(f.phone, "phone", self._hash_phone, errors) if "phone" in on else ()
        external_id = (
            self._hashed(f.external_id, "external_id", hash_external_id, errors) if "external_id" in on else ()
        )
        ttclid = _plain(f.ttclid, "ttclid", errors) if "ttclid" in on else None
        ttp = _plain(f.ttp, "ttp", errors) if "ttp" in on else None
        ip = _plain(f.ip, "ip", errors) if "ip" in on else None
        user_agent = _plain(f.user_agent, "user_agent", errors) if "user_agent" in on else None
        match_errors = tuple(errors)
        if not (email or phone or external_id or ttclid or ttp or ip or user_agent):
            return self._no_match_key(f.source, match_errors), match_errors

        if now - event_time > self.settings.max_age_s:
            return self._too_old(f.time_label, ms, now), match_errors

        if event_set_id is None:
            event_set_id = self._configured_event_set(advertiser_id)
            if event_set_id is None:
                return self._missing_event_set(f, advertiser_id), match_errors

        event = OfflineEvent(
            event_set_id=event_set_id,
            event=f.event,
            event_time=event_time,
            event_id="",
            email=email,
            phone=phone,
            external_id=external_id,
            ttclid=ttclid,
            ttp=ttp,
            ip=ip,
            user_agent=user_agent,
            contents=contents,
            currency=currency,
            value=value,
            order_id=order_id,
            shop_id=shop_id,
            channel=channel,
            advertiser_id=advertiser_id,
            source=f.source,
        )
        if upstream_id is not None:
            return _with_id(event, upstream_id, "upstream"), match_errors
        if message_id is not None:
            return _with_id(event, derive_event_id(f.event, message_id), "message_id"), match_errors
        return _with_id(event, _content_event_id(event), "content"), match_errors

    def _hash_phone(self, value: object) -> str | MatchError | None:
        return hash_phone(value, self._region)

    @staticmethod
    def _hashed(
        value: object,
        key: MatchKey,
        hasher: Callable[[object], str | MatchError | None],
        errors: list[MatchError],
    ) -> tuple[str, ...]:
        """Hash one value or a list of values; invalid ones are dropped and reported by key and reason only."""
        if value is None:
            return ()
        values = value if type(value) is list else (value,)
        digests: list[str] = []
        for v in values:
            result = hasher(v)
            if isinstance(result, str):
                if result not in digests:
                    digests.append(result)
            elif result is not None:
                errors.append(MatchError(key, result.reason))
        return tuple(digests)

    def _contents(self, value: object, label: str, source: str) -> tuple[Content, ...] | Rejected:
        if value is None:
            return ()
        if type(value) is not list:
            return _invalid(f"{label} must be an array of objects, got {_kind(value)}")
        items: list[Content] = []
        segment = source == SEGMENT
        single = label == "properties"
        for i, raw in enumerate(value):
            where = label if single else f"{label}[{i}]"
            if type(raw) is not dict:
                return _invalid(f"{where} must be an object, got {_kind(raw)}")
            content = _segment_product(raw, where) if segment else _canonical_content(raw, where)
            if isinstance(content, Rejected):
                return content
            items.append(content)
        return tuple(items)

    def _configured_event_set(self, advertiser_id: str | None) -> str | None:
        if advertiser_id is not None:
            configured = self.settings.event_set_ids.get(advertiser_id)
            if configured is not None:
                return configured
        return self.settings.default_event_set_id

    def _no_match_key(self, source: str, errors: tuple[MatchError, ...]) -> Rejected:
        if source == SEGMENT:
            looked = "; ".join(f"{k}: {_SEGMENT_KEY_FIELDS[k]}" for k in MATCH_KEYS if k in self._enabled)
        else:
            looked = ", ".join(k for k in MATCH_KEYS if k in self._enabled)
        looked = looked or "nothing"
        if errors:
            dropped = ", ".join(f"{e.id_type}: {e.reason}" for e in errors)
            detail = f"{len(errors)} dropped as invalid ({dropped})"
        else:
            detail = "none present"
        return _invalid(f"no match key: looked at {looked}; {detail}{self._disabled_note}")

    def _too_old(self, label: str, ms: int, now: float) -> Rejected:
        days = (now - ms / 1000) / 86_400
        limit = self.settings.max_age_s / 86_400
        hint = ""
        if 0 < ms < 100_000_000_000 and now - ms <= self.settings.max_age_s:
            hint = " (it looks like seconds; the canonical schema wants epoch milliseconds)"
        return Rejected(
            DlqReason.EVENT_TOO_OLD,
            f"{label} is {days:.1f} days old; TikTok accepts offline events of the last {limit:g} days{hint}",
        )

    def _missing_event_set(self, f: _Fields, advertiser_id: str | None) -> Rejected:
        if advertiser_id is not None:
            mapping = f"the mappings file has no event set for advertiser {advertiser_id}"
        else:
            mapping = f"the record names no advertiser ({f.label('advertiser_id')} absent)"
        return Rejected(
            DlqReason.MISSING_EVENT_SET_ID,
            f"no TikTok event set id: {f.label('event_set_id')} absent, {mapping}, and no default event set is "
            "configured; add the event set to the mappings file, then replay",
        )


def _plain(value: object, key: MatchKey, errors: list[MatchError]) -> str | None:
    """ttclid, ttp, ip and user agent are sent exactly as given; blank is absent, a non-string is dropped."""
    if value is None:
        return None
    if type(value) is not str:
        errors.append(MatchError(key, "not_a_string"))
        return None
    return value if value.strip() else None


def _segment_product(p: Mapping[str, Any], where: str) -> Content | Rejected:
    """A Segment product (products[] item, or the properties of a single-product event) → TikTok content."""
    content_id = _text(_first(p.get("product_id"), p.get("sku")), f"{where}.product_id")
    if isinstance(content_id, Rejected):
        return content_id
    texts: dict[str, str | None] = {}
    for tiktok_name, segment_name in _PRODUCT_TEXT:
        text = _text(p.get(segment_name), f"{where}.{segment_name}")
        if isinstance(text, Rejected):
            return text
        texts[tiktok_name] = text
    content_type = _text(p.get("content_type"), f"{where}.content_type")
    if isinstance(content_type, Rejected):
        return content_type
    if content_type is None and content_id is not None:
        content_type = "product"  # Segment's TikTok destinations default content_type to "product"
    price = _number(p.get("price"), f"{where}.price")
    if isinstance(price, Rejected):
        return price
    quantity = _quantity(p.get("quantity"), f"{where}.quantity")
    if isinstance(quantity, Rejected):
        return quantity
    return Content(
        content_id=content_id,
        content_name=texts["content_name"],
        content_type=content_type,
        content_category=texts["content_category"],
        brand=texts["brand"],
        price=price,
        quantity=quantity,
    )


def _canonical_content(c: Mapping[str, Any], where: str) -> Content | Rejected:
    texts: dict[str, str | None] = {}
    for name in ("content_id", "content_name", "content_type", "content_category", "brand"):
        text = _text(c.get(name), f"{where}.{name}")
        if isinstance(text, Rejected):
            return text
        texts[name] = text
    price = _number(c.get("price"), f"{where}.price")
    if isinstance(price, Rejected):
        return price
    quantity = _quantity(c.get("quantity"), f"{where}.quantity")
    if isinstance(quantity, Rejected):
        return quantity
    return Content(
        content_id=texts["content_id"],
        content_name=texts["content_name"],
        content_type=texts["content_type"],
        content_category=texts["content_category"],
        brand=texts["brand"],
        price=price,
        quantity=quantity,
    )


def _content_event_id(event: OfflineEvent) -> str:
    """32 hex characters from everything the event sends except its id, and its event set (see the module doc)."""
    payload = orjson.dumps([event.event_set_id, _wire(event, with_id=False)], option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(_CONTENT_NS + payload).hexdigest()[:_EVENT_ID_CHARS]


def _with_id(event: OfflineEvent, event_id: str, origin: str) -> OfflineEvent:
    return replace(event, event_id=event_id, event_id_from=origin)
