"""Offline conversion events: recognition both ways, mapping, every validation rule, hashing vectors, event ids,
the `/event/track/` body byte for byte, and no raw match key in any error text (service/core/offline.py)."""

from __future__ import annotations

import copy
import hashlib
import io
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import fastavro
import jsonschema
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.core.events import CANONICAL_JSON, decode_event
from service.core.mappings import Mappings
from service.core.membership import NOT_AUDIENCE_EVENT, Resolver, ResolverSettings
from service.core.model import AudienceChange, DlqReason, MatchError, Rejected, Skipped
from service.core.offline import (
    DEFAULT_EVENT_MAP,
    MATCH_KEYS,
    MAX_EVENT_AGE_S,
    MAX_EVENTS_PER_REQUEST,
    NOT_OFFLINE_EVENT,
    OFFLINE_EVENT_SET_EVENTS,
    TIKTOK_STANDARD_EVENTS,
    UNMAPPED_EVENT,
    Content,
    OfflineEvent,
    OfflineParsed,
    OfflineParser,
    OfflineSettings,
    build_event_map,
    derive_event_id,
    event_track_body,
    is_canonical_offline,
)
from service.core.schemas import (
    CANONICAL_JSON_SCHEMA_PATH,
    OFFLINE_JSON_SCHEMA_PATH,
    SchemaStore,
    load_canonical_schema,
    load_offline_schema,
)

FIXTURES = Path(__file__).parents[1] / "fixtures"

# docs/tiktok-api.md §1.7 vectors.
TESTING_EMAIL = "584c4423c421df49955759498a71495aba49b8780eb9387dff333b6f0982c777"
JANEDOE = "d6117306485ed0e50afab3ac871e98f81699151f30281527d63ff5f233656c69"
PLUS_15555555555 = "910a625c4ba147b544e6bd2f267e130ae14c591b6ba9c25cb8573322dedbebd0"
LOYALTY_42 = "d4dcc94d936c08a562c2e02a369b9bf605ef79d18f7904c25de46be00a2afce7"  # sha256("loyalty-42")
U_42 = "16ec525b74b75626eb93ecad8acc749885fcf4e83c95b139342769a4ab1828a3"  # sha256("u-42")

ADVERTISER = "7654321098765432109"
EVENT_SET = "7000000000000000001"
DEFAULT_SET = "7000000000000000009"
NOW = 1_714_990_300.0  # 2024-05-06T10:11:40Z, 28 s after the fixtures' event time
EVENT_TIME_S = 1_714_990_272
DAY = 86_400

# Raw values that must never show up in an error text.
PII = {
    "email": "victim.person@example.com",
    "phone": "+1 (415) 555-0123",
    "ip": "198.51.100.23",
    "user_agent": "Mozilla/5.0 (SecretPhone; rv:1) Gecko/20100101 Firefox/99.0",
    "ttclid": "E.C.P.secret-click-id-0451",
    "ttp": "2QXy1secret-cookie-id",
    "external_id": "loyalty-secret-998877",
}


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def fixture(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((FIXTURES / name).read_text())
    return data


def parser(**kw: Any) -> OfflineParser:
    kw.setdefault("event_set_ids", {ADVERTISER: EVENT_SET})
    kw.setdefault("default_event_set_id", DEFAULT_SET)
    return OfflineParser(OfflineSettings(**kw))


def parse(record: dict[str, Any], now: float = NOW, **kw: Any) -> OfflineParsed:
    return parser(**kw).parse(record, now=now)


def event(parsed: OfflineParsed) -> OfflineEvent:
    assert isinstance(parsed.outcome, OfflineEvent), parsed
    return parsed.outcome


def rejected(parsed: OfflineParsed, reason: DlqReason) -> str:
    assert isinstance(parsed.outcome, Rejected), parsed
    assert parsed.outcome.reason is reason, parsed
    return parsed.outcome.error


def canonical(**changes: Any) -> dict[str, Any]:
    record = fixture("offline_event.json")
    for key, value in changes.items():
        if value is KeyError:
            record.pop(key, None)
        else:
            record[key] = value
    return record


def segment(event_name: str = "Order Completed", **properties: Any) -> dict[str, Any]:
    record = fixture("segment_order_completed.json")
    record["event"] = event_name
    record["properties"].update(properties)
    return record


# -- recognition, both directions ---------------------------------------------------------------------------


def test_canonical_fixture_is_offline_and_parses() -> None:
    record = fixture("offline_event.json")
    assert is_canonical_offline(record)
    parsed = parse(record)
    assert parsed.source == "canonical" and parsed.match_errors == ()
    assert event(parsed) == OfflineEvent(
        event_set_id=EVENT_SET,
        event="CompletePayment",
        event_time=EVENT_TIME_S,
        event_id=derive_event_id("CompletePayment", "pos-7f3c2a"),
        email=(TESTING_EMAIL,),
        phone=(PLUS_15555555555,),
        external_id=(LOYALTY_42,),
        contents=(Content("sku-1", "Tee", "product", "Apparel", "Acme", 12.5, 2),),
        currency="USD",
        value=25.0,
        order_id="order-1001",
        shop_id="store-7",
        channel="in_store",
        advertiser_id=ADVERTISER,
        source="canonical",
        event_id_from="message_id",
    )
    assert event(parsed).match_keys == ("email", "phone", "external_id")


@pytest.mark.parametrize(
    "name",
    [
        "canonical_event.json",
        "segment_amc_audience_entered.json",
        "segment_identify.json",
        "segment_snap_android.json",
        "tiktok_add_to_audience.json",
        "tiktok_sync_audience.json",
        "tiktok_sync_journey_step.json",
    ],
)
def test_membership_records_are_never_offline_events(name: str) -> None:
    record = fixture(name)
    assert not is_canonical_offline(record)
    assert parse(record).outcome is NOT_OFFLINE_EVENT


def test_engage_event_named_like_an_order_is_still_not_offline() -> None:
    engage = fixture("segment_amc_audience_entered.json")
    engage["event"] = "Order Completed"  # context.personas: the membership stream's, whatever its name
    assert parse(engage).outcome is NOT_OFFLINE_EVENT


@pytest.mark.parametrize("key", ["audience_key", "action", "type"])
def test_a_membership_key_makes_a_record_not_offline(key: str) -> None:
    record = canonical(**{key: "add"})
    assert not is_canonical_offline(record)
    assert parse(record).outcome is NOT_OFFLINE_EVENT


def test_other_segment_calls_and_shapes_are_not_offline() -> None:
    assert parse({**segment(), "type": "identify"}).outcome is NOT_OFFLINE_EVENT
    assert parse({**segment(), "type": "page"}).outcome is NOT_OFFLINE_EVENT
    assert parse({**segment(), "event": None}).outcome is NOT_OFFLINE_EVENT
    assert parse({"foo": 1}) == OfflineParsed(NOT_OFFLINE_EVENT, (), "unknown")


def membership_resolver() -> Resolver:
    return Resolver(ResolverSettings(default_advertiser_id=ADVERTISER), Mappings.empty(), SchemaStore())


def test_the_membership_path_never_reads_an_offline_json_record() -> None:
    # Phase 2 (issue 12): the record decodes, and the resolver routes it to the offline parser, never to membership.
    raw = orjson.dumps(fixture("offline_event.json"))
    decoded = decode_event(raw, None, SchemaStore())
    assert decoded.format == CANONICAL_JSON
    outcome = membership_resolver().process(raw, None).outcome
    assert not isinstance(outcome, AudienceChange)
    assert isinstance(outcome, Rejected) and outcome.reason in (DlqReason.MISSING_EVENT_SET_ID, DlqReason.EVENT_TOO_OLD)


def test_the_membership_path_skips_a_segment_order() -> None:
    raw = orjson.dumps(fixture("segment_order_completed.json"))
    assert membership_resolver().process(raw, None).outcome is NOT_AUDIENCE_EVENT


def offline_avro(record: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, fastavro.parse_schema(copy.deepcopy(load_offline_schema())), record)
    return buf.getvalue()


def membership_avro(record: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, fastavro.parse_schema(copy.deepcopy(load_canonical_schema())), record)
    return buf.getvalue()


def test_offline_avro_starts_with_0x01_and_the_membership_path_refuses_it() -> None:
    raw = offline_avro(fixture("offline_event.json"))
    assert raw[0] == 0x01
    first = load_offline_schema()["fields"][0]
    assert (first["name"], first["type"]) == ("offline_event", "boolean")
    outcome = membership_resolver().process(raw, None).outcome
    assert not isinstance(outcome, AudienceChange)  # decoded with the offline schema, parsed as an offline event
    assert isinstance(outcome, Rejected) and outcome.reason in (DlqReason.MISSING_EVENT_SET_ID, DlqReason.EVENT_TOO_OLD)


@given(st.text(min_size=1, max_size=300))
def test_membership_avro_never_starts_with_the_offline_byte(audience_key: str) -> None:
    raw = membership_avro({"audience_key": audience_key, "action": "add", "email": "testing@testing.com"})
    assert raw[0] % 2 == 0 and raw[0] != 0  # a zig-zag string length: even, never 0x01 (nor 0x00)


def test_offline_avro_round_trip_parses_like_json() -> None:
    record = fixture("offline_event.json")
    raw = offline_avro(record)
    with_types = fastavro.schemaless_reader(
        io.BytesIO(raw), fastavro.parse_schema(copy.deepcopy(load_offline_schema()))
    )
    assert event(parse(with_types)) == event(parse(record))  # event_time came back as a datetime


def test_json_schemas_exclude_each_other() -> None:
    offline_schema = json.loads(OFFLINE_JSON_SCHEMA_PATH.read_text())
    membership_schema = json.loads(CANONICAL_JSON_SCHEMA_PATH.read_text())
    jsonschema.Draft202012Validator.check_schema(offline_schema)
    offline, membership = fixture("offline_event.json"), fixture("canonical_event.json")
    jsonschema.validate(offline, offline_schema)
    jsonschema.validate(membership, membership_schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(offline, membership_schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(membership, offline_schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**membership, "offline_event": True}, membership_schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**offline, "audience_key": "vip"}, offline_schema)


def test_avro_and_json_schemas_have_the_same_fields() -> None:
    avro_fields = [f["name"] for f in load_offline_schema()["fields"]]
    json_fields = list(json.loads(OFFLINE_JSON_SCHEMA_PATH.read_text())["properties"])
    assert avro_fields == json_fields
    assert not {"audience_key", "action", "type"} & set(avro_fields)
    assert "offline_event" not in {f["name"] for f in load_canonical_schema()["fields"]}


# -- mapping --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "tiktok"), sorted(DEFAULT_EVENT_MAP.items()))
def test_default_event_map(name: str, tiktok: str) -> None:
    assert event(parse(segment(name))).event == tiktok


def test_default_map_targets_are_offline_event_set_names() -> None:
    assert set(DEFAULT_EVENT_MAP.values()) <= OFFLINE_EVENT_SET_EVENTS <= TIKTOK_STANDARD_EVENTS
    assert DEFAULT_EVENT_MAP["Order Completed"] == "CompletePayment"
    # Amperity's list (docs/tiktok-api.md §8.2) and the 2025 names are all accepted.
    assert {"AddPaymentInfo", "AddToCart", "CompletePayment", "CompleteRegistration", "Contact", "Download"} | {
        "PlaceAnOrder",
        "Subscribe",
        "Purchase",
        "Lead",
    } <= TIKTOK_STANDARD_EVENTS


def test_event_names_match_ignoring_case_and_spaces() -> None:
    assert event(parse(segment(" order COMPLETED "))).event == "CompletePayment"


def test_unmapped_segment_names_are_skipped_not_dead_lettered() -> None:
    parsed = parse(segment("Cart Viewed"))
    assert parsed.outcome is UNMAPPED_EVENT and isinstance(parsed.outcome, Skipped)
    assert parsed.source == "segment"
    assert parse({**segment(), "event": "Audience Entered", "context": {}}).outcome is UNMAPPED_EVENT


def test_overridden_event_map() -> None:
    table = build_event_map({"order completed": "PlaceAnOrder", "Lead Captured": "Lead", "Product Viewed": None})
    assert table["Lead Captured"] == "Lead" and "Product Viewed" not in table and "Order Completed" not in table
    assert event(parse(segment("Order Completed"), event_map=table)).event == "PlaceAnOrder"
    assert event(parse(segment("Lead Captured"), event_map=table)).event == "Lead"
    assert parse(segment("Product Viewed"), event_map=table).outcome is UNMAPPED_EVENT
    assert event(parse(segment("Checkout Started"), event_map=table)).event == "InitiateCheckout"
    assert event(parse(segment("Lead Captured"), event_map={"Lead Captured": "SubmitForm"})).event == "SubmitForm"
    assert parse(segment("Order Completed"), event_map={"Lead Captured": "SubmitForm"}).outcome is UNMAPPED_EVENT


def test_bad_event_maps_fail_at_startup() -> None:
    with pytest.raises(ValueError, match="not a TikTok standard event name"):
        build_event_map({"Order Completed": "Purchased"})
    with pytest.raises(ValueError, match="empty"):
        build_event_map({" ": "Lead"})
    with pytest.raises(ValueError, match="not a TikTok standard event name"):
        parser(event_map={"Order Completed": "Bought"})
    with pytest.raises(ValueError, match="mapped twice"):
        parser(event_map={"Order Completed": "Purchase", "order completed": "PlaceAnOrder"})


def test_bad_settings_fail_at_startup() -> None:
    with pytest.raises(ValueError, match="unknown"):
        parser(enabled_keys=frozenset({"email", "fax"}))
    with pytest.raises(ValueError, match="PHONE_DEFAULT_REGION"):
        parser(phone_default_region="XX")
    with pytest.raises(ValueError, match="digits"):
        parser(event_set_ids={ADVERTISER: "pixel-code"})
    with pytest.raises(ValueError, match="digits"):
        parser(default_event_set_id="D17TA5JC77UDOT6CA5FG")


def test_segment_order_completed_fields() -> None:
    parsed = parse(fixture("segment_order_completed.json"))
    assert parsed.source == "segment" and parsed.match_errors == ()
    e = event(parsed)
    assert (e.event, e.event_time, e.event_set_id) == ("CompletePayment", EVENT_TIME_S, DEFAULT_SET)
    assert e.event_id == derive_event_id("CompletePayment", "ajs-next-1714990272345-6f2e1c")
    assert e.event_id_from == "message_id"
    assert (e.email, e.phone, e.external_id) == ((JANEDOE,), (PLUS_15555555555,), (U_42,))
    assert (e.ip, e.user_agent) == ("203.0.113.7", "Mozilla/5.0 (X11; Linux x86_64) Gecko/20100101 Firefox/125.0")
    assert (e.currency, e.value, e.order_id) == ("USD", 25.0, "50314b8e9bcf000000000000")  # revenue before total
    assert e.contents == (
        Content("507f1f77bcf86cd799439011", "Monopoly: 3rd Edition", "product", "Games", "Hasbro", 19, 1),
        Content("505bd76785ebb509fc183733", "Uno Card Game", "product", "Games", "Mattel", 3, 2),
    )


def test_segment_value_precedence_and_single_product_events() -> None:
    assert event(parse(segment(value=30))).value == 30
    no_revenue = segment()
    del no_revenue["properties"]["revenue"]
    assert event(parse(no_revenue)).value == 27.5
    viewed = segment("Product Viewed", products=None, product_id=None, sku="45790-32", name="Monopoly", price="19.99")
    del viewed["properties"]["products"]
    assert event(parse(viewed)).contents == (Content("45790-32", "Monopoly", "product", None, None, 19.99, None),)


def test_segment_ids_from_properties() -> None:
    e = event(parse(segment(event_set_id="7000000000000000003", event_id="evt-9", event_channel="crm")))
    assert (e.event_set_id, e.event_id, e.event_id_from, e.channel) == (
        "7000000000000000003",
        "evt-9",
        "upstream",
        "crm",
    )
    assert event(parse(segment(advertiser_id=ADVERTISER))).event_set_id == EVENT_SET
    assert event(parse(segment(external_id="Loyalty-42"))).external_id == (LOYALTY_42,)  # wins over userId


def test_segment_email_and_phone_places() -> None:
    record = segment(email="testing@testing.com")
    assert event(parse(record)).email == (JANEDOE,)  # context.traits first
    del record["context"]["traits"]
    assert event(parse(record)).email == (TESTING_EMAIL,)
    record["traits"] = {"email": "janedoe@gmail.com"}
    assert event(parse(record)).email == (JANEDOE,)  # traits before properties
    no_time = segment()
    no_time["originalTimestamp"] = no_time.pop("timestamp")
    assert event(parse(no_time)).event_time == EVENT_TIME_S


# -- validation: every rule -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["Purchased", "completepayment", "", None, 7, "Audience Entered"])
def test_canonical_event_name_must_be_standard(name: object) -> None:
    error = rejected(parse(canonical(event=name)), DlqReason.INVALID_EVENT)
    assert "TikTok standard event name" in error
    if name == "Purchased":
        assert '"Purchased"' in error


@pytest.mark.parametrize("name", sorted(TIKTOK_STANDARD_EVENTS))
def test_every_standard_name_is_accepted(name: str) -> None:
    assert event(parse(canonical(event=name))).event == name


@pytest.mark.parametrize("flag", [False, "true", 1, None])
def test_offline_event_must_be_true(flag: object) -> None:
    assert "must be true" in rejected(parse(canonical(offline_event=flag)), DlqReason.INVALID_EVENT)


@pytest.mark.parametrize("value", [KeyError, None, 1714990272.5, "yesterday", [1], True])
def test_event_time_is_required_and_a_time(value: object) -> None:
    assert "event_time must be" in rejected(parse(canonical(event_time=value)), DlqReason.INVALID_EVENT)


def test_iso_event_time() -> None:
    assert event(parse(canonical(event_time="2024-05-06T10:11:12.345Z"))).event_time == EVENT_TIME_S
    assert event(parse(canonical(event_time="2024-05-06T12:11:12+02:00"))).event_time == EVENT_TIME_S
    assert event(parse(canonical(event_time="2024-05-06T10:11:12"))).event_time == EVENT_TIME_S  # naive is UTC


def test_future_time_beyond_the_skew_is_invalid() -> None:
    at = (NOW + 300) * 1000
    assert event(parse(canonical(event_time=int(at)))).event_time == NOW + 300
    error = rejected(parse(canonical(event_time=int(at) + 1000)), DlqReason.INVALID_EVENT)
    assert "301 s in the future" in error
    assert event(parse(canonical(event_time=int(NOW * 1000)), future_skew_s=0)).event_time == NOW
    assert rejected(parse(canonical(event_time=int(NOW * 1000) + 1000), future_skew_s=0), DlqReason.INVALID_EVENT)


def test_older_than_28_days_is_too_old() -> None:
    assert MAX_EVENT_AGE_S == 28 * DAY
    limit = NOW - 28 * DAY
    assert event(parse(canonical(event_time=int(limit * 1000)))).event_time == limit
    error = rejected(parse(canonical(event_time=int(limit * 1000) - 1000)), DlqReason.EVENT_TOO_OLD)
    assert "28.0 days old" in error and "last 28 days" in error
    seconds = rejected(parse(canonical(event_time=EVENT_TIME_S)), DlqReason.EVENT_TOO_OLD)
    assert "looks like seconds" in seconds


@pytest.mark.parametrize(
    ("currency", "expected"),
    [("USD", "USD"), ("eur", "EUR"), (" gbp ", "GBP"), (None, None), ("", None)],
)
def test_currency_normalised(currency: object, expected: str | None) -> None:
    assert event(parse(canonical(currency=currency))).currency == expected


@pytest.mark.parametrize("currency", ["US", "DOLLARS", "U$D", "ÜSD", 840, ["USD"]])
def test_bad_currency(currency: object) -> None:
    assert "ISO 4217" in rejected(parse(canonical(currency=currency)), DlqReason.INVALID_EVENT)


@pytest.mark.parametrize(("value", "expected"), [(25, 25), (25.5, 25.5), ("19.99", 19.99), (0, 0), (None, None)])
def test_value_numeric(value: object, expected: object) -> None:
    assert event(parse(canonical(value=value))).value == expected


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("abc", "must be a number"),
        ([25], "must be a number"),
        (True, "must be a number"),
        ({"amount": 1}, "must be a number"),
        ("nan", "finite"),
        ("inf", "finite"),
        (-1, "negative"),
    ],
)
def test_bad_value(value: object, fragment: str) -> None:
    assert fragment in rejected(parse(canonical(value=value)), DlqReason.INVALID_EVENT)


@pytest.mark.parametrize(
    ("contents", "fragment"),
    [
        ({"content_id": "x"}, "contents must be an array"),
        (["sku-1"], "contents[0] must be an object"),
        ([{"content_id": "a"}, {"price": "free"}], "contents[1].price must be a number"),
        ([{"quantity": 1.5}], "contents[0].quantity must be a whole number"),
        ([{"quantity": -2}], "contents[0].quantity must not be negative"),
        ([{"content_name": ["x"]}], "contents[0].content_name must be a string"),
    ],
)
def test_bad_contents(contents: object, fragment: str) -> None:
    assert fragment in rejected(parse(canonical(contents=contents)), DlqReason.INVALID_EVENT)


def test_contents_normalised() -> None:
    e = event(parse(canonical(contents=[{"content_id": 17, "quantity": 2.0, "price": "3.5"}, {}])))
    assert e.contents == (Content(content_id="17", quantity=2, price=3.5), Content())
    bad = segment(products=[{"product_id": "p", "price": "cheap"}])
    assert "properties.products[0].price must be a number" in rejected(parse(bad), DlqReason.INVALID_EVENT)


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [
        ("channel", "store", "channel must be one of"),
        ("channel", ["crm"], "channel must be a string"),
        ("event_set_id", "ES-1", "event_set_id must be a TikTok id"),
        ("event_set_id", 1.5, "event_set_id must be a TikTok id"),
        ("advertiser_id", "acme", "advertiser_id must be a TikTok id"),
        ("event_id", {"id": 1}, "event_id must be a string"),
        ("message_id", [1], "message_id must be a string"),
        ("order_id", 1.25, "order_id must be a string"),
        ("shop_id", True, "shop_id must be a string"),
    ],
)
def test_bad_fields(field: str, value: object, fragment: str) -> None:
    assert fragment in rejected(parse(canonical(**{field: value})), DlqReason.INVALID_EVENT)


NO_KEYS = {k: KeyError for k in MATCH_KEYS}


def test_no_match_key_is_invalid() -> None:
    error = rejected(parse(canonical(**NO_KEYS)), DlqReason.INVALID_EVENT)
    assert error.startswith("no match key: looked at email, phone, external_id, ttclid, ttp, ip, user_agent; none")
    dropped = rejected(parse(canonical(**{**NO_KEYS, "email": "not-an-email"})), DlqReason.INVALID_EVENT)
    assert "1 dropped as invalid (email: invalid_email)" in dropped
    bare = segment()
    bare["context"] = {}
    del bare["userId"]
    seg = rejected(parse(bare), DlqReason.INVALID_EVENT)
    assert "email: context.traits.email, traits.email, properties.email" in seg


ONE_KEY = {
    "email": "testing@testing.com",
    "phone": "+15555555555",
    "external_id": "u-42",
    "ttclid": "E.C.P.click",
    "ttp": "2QXy1cookie",
    "ip": "198.51.100.1",
    "user_agent": "UA/1.0",
}


@pytest.mark.parametrize("key", MATCH_KEYS)
def test_any_single_match_key_is_enough(key: str) -> None:
    assert event(parse(canonical(**{**NO_KEYS, key: ONE_KEY[key]}))).match_keys == (key,)


def test_match_key_toggles() -> None:
    e = event(parse(canonical(ip="198.51.100.1"), enabled_keys=frozenset({"phone", "ip"})))
    assert e.match_keys == ("phone", "ip")
    off = rejected(parse(canonical(phone=KeyError), enabled_keys=frozenset({"phone"})), DlqReason.INVALID_EVENT)
    assert off.startswith("no match key: looked at phone; none present")
    assert "not sending email, external_id, ttclid, ttp, ip, user_agent (settings)" in off


def test_missing_event_set_id() -> None:
    error = rejected(
        parse(canonical(advertiser_id=KeyError), default_event_set_id=None), DlqReason.MISSING_EVENT_SET_ID
    )
    assert "event_set_id absent" in error and "no advertiser" in error and "replay" in error
    unknown_adv = canonical(advertiser_id="123")
    error = rejected(parse(unknown_adv, default_event_set_id=None), DlqReason.MISSING_EVENT_SET_ID)
    assert "no event set for advertiser 123" in error
    assert event(parse(unknown_adv)).event_set_id == DEFAULT_SET
    assert event(parse(canonical(event_set_id="42"), default_event_set_id=None)).event_set_id == "42"
    assert event(parse(canonical(event_set_id=42))).event_set_id == "42"


def test_reason_precedence() -> None:
    old = int((NOW - 40 * DAY) * 1000)
    # invalid beats too old, too old beats a missing event set (a mapping fix would not help it).
    assert rejected(parse(canonical(event_time=old, currency="XX")), DlqReason.INVALID_EVENT)
    assert rejected(parse(canonical(event_time=old, **NO_KEYS)), DlqReason.INVALID_EVENT)
    assert rejected(
        parse(canonical(event_time=old, advertiser_id=KeyError), default_event_set_id=None), DlqReason.EVENT_TOO_OLD
    )


class Exploding(dict[str, Any]):
    def get(self, key: str, default: Any = None) -> Any:
        raise RuntimeError("boom")


def test_parse_never_raises() -> None:
    parsed = parser().parse(Exploding(offline_event=True), now=NOW)
    assert "could not be processed (RuntimeError)" in rejected(parsed, DlqReason.INVALID_EVENT)
    weird = {"type": "track", "event": "Order Completed", "context": [1], "properties": "x", "timestamp": 5}
    assert isinstance(parse(weird).outcome, Rejected)


# -- hashing ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "raw", "expected"),
    [
        ("email", " Testing@Testing.COM ", TESTING_EMAIL),
        ("email", "janedoe@gmail.com", JANEDOE),
        ("email", TESTING_EMAIL.upper(), TESTING_EMAIL),  # already hashed: passes through lowercased
        ("phone", "+15555555555", PLUS_15555555555),  # E.164 fast path
        ("phone", "(555) 555-5555", PLUS_15555555555),  # region default US
        ("phone", "1-555-555-5555", PLUS_15555555555),
        ("phone", PLUS_15555555555, PLUS_15555555555),
        ("external_id", "Loyalty-42", LOYALTY_42),
        ("external_id", " LOYALTY-42 ", LOYALTY_42),
        ("external_id", LOYALTY_42.upper(), LOYALTY_42),
    ],
)
def test_hashing_vectors(field: str, raw: str, expected: str) -> None:
    e = event(parse(canonical(**{**NO_KEYS, field: raw})))
    assert getattr(e, field) == (expected,)


def test_phone_region_default() -> None:
    e = event(parse(canonical(**{**NO_KEYS, "phone": "07700 900123"}), phone_default_region="GB"))
    assert e.phone == (sha("+447700900123"),)


def test_lists_of_values_are_hashed_each_and_deduplicated() -> None:
    parsed = parse(canonical(email=["testing@testing.com", " TESTING@testing.com", "janedoe@gmail.com", "nope", 5]))
    assert event(parsed).email == (TESTING_EMAIL, JANEDOE)
    assert parsed.match_errors == (MatchError("email", "invalid_email"), MatchError("email", "not_a_string"))


def test_unhashed_keys_are_sent_as_given() -> None:
    e = event(parse(canonical(ip=" 2001:db8::1", user_agent="UA/1.0 ", ttclid="E.C.P.abc", ttp="2QXy1")))
    assert (e.ip, e.user_agent, e.ttclid, e.ttp) == (" 2001:db8::1", "UA/1.0 ", "E.C.P.abc", "2QXy1")
    parsed = parse(canonical(ip=123, user_agent=" "))
    assert event(parsed).ip is None and event(parsed).user_agent is None
    assert parsed.match_errors == (MatchError("ip", "not_a_string"),)


# -- event ids -----------------------------------------------------------------------------------------------------


def test_derived_event_id_is_pinned() -> None:
    # Changing the derivation would make TikTok count replays of old messages twice: keep this vector.
    assert derive_event_id("CompletePayment", "pos-7f3c2a") == "367bfd2abcaaf57c5960ddb99941cb1b"


def test_event_id_stability() -> None:
    a = event(parse(canonical(message_id="m-1")))
    assert a.event_id == event(parse(canonical(message_id="m-1", value=99))).event_id  # same message, same id
    assert a.event_id != event(parse(canonical(message_id="m-2"))).event_id
    assert a.event_id != event(parse(canonical(message_id="m-1", event="PlaceAnOrder"))).event_id
    assert len(a.event_id) == 32 and all(c in "0123456789abcdef" for c in a.event_id)
    assert event(parse(segment())).event_id == event(parse(segment(order_id="changed"))).event_id
    other = fixture("segment_order_completed.json")
    other["messageId"] = "ajs-other"
    assert event(parse(other)).event_id != event(parse(segment())).event_id


def test_upstream_event_id_wins() -> None:
    e = event(parse(canonical(event_id=" evt-1 ")))
    assert (e.event_id, e.event_id_from) == ("evt-1", "upstream")
    assert event(parse(canonical(event_id=12345))).event_id == "12345"


def test_content_derived_event_id() -> None:
    record = canonical(message_id=KeyError)
    a = event(parse(record))
    assert a.event_id_from == "content" and len(a.event_id) == 32
    reordered = dict(reversed(list(record.items())))
    assert event(parse(reordered)).event_id == a.event_id
    assert event(parse(canonical(message_id=KeyError, email="testing@testing.com"))).event_id == a.event_id
    assert event(parse(canonical(message_id=KeyError, value=26))).event_id != a.event_id
    assert event(parse(canonical(message_id=KeyError, event_time=1714990273000))).event_id != a.event_id
    assert event(parse(canonical(message_id=KeyError, event_set_id="42"))).event_id != a.event_id


# -- the request body ----------------------------------------------------------------------------------------------


def test_body_byte_exact() -> None:
    e = event(parse(canonical(ip="203.0.113.7")))
    expected = (
        b'{"event_source":"offline","event_source_id":"7000000000000000001","partner_name":"Acme",'
        b'"data":[{"event":"CompletePayment","event_time":1714990272,"event_id":"367bfd2abcaaf57c5960ddb99941cb1b",'
        b'"user":{"email":["584c4423c421df49955759498a71495aba49b8780eb9387dff333b6f0982c777"],'
        b'"phone":["910a625c4ba147b544e6bd2f267e130ae14c591b6ba9c25cb8573322dedbebd0"],'
        b'"external_id":["d4dcc94d936c08a562c2e02a369b9bf605ef79d18f7904c25de46be00a2afce7"],"ip":"203.0.113.7"},'
        b'"properties":{"contents":[{"content_id":"sku-1","content_name":"Tee","content_type":"product",'
        b'"content_category":"Apparel","brand":"Acme","price":12.5,"quantity":2}],"currency":"USD","value":25.0,'
        b'"order_id":"order-1001","shop_id":"store-7","event_channel":"in_store"}}]}'
    )
    assert event_track_body(EVENT_SET, [e], partner_name="Acme") == expected


def test_body_leaves_absent_fields_out() -> None:
    minimal = OfflineEvent(EVENT_SET, "Contact", 1714990272, "evt-1", external_id=(LOYALTY_42,))
    assert event_track_body(EVENT_SET, [minimal, replace(minimal, event_id="evt-2")]) == (
        b'{"event_source":"offline","event_source_id":"7000000000000000001","data":['
        b'{"event":"Contact","event_time":1714990272,"event_id":"evt-1","user":{"external_id":["'
        + LOYALTY_42.encode()
        + b'"]}},{"event":"Contact","event_time":1714990272,"event_id":"evt-2","user":{"external_id":["'
        + LOYALTY_42.encode()
        + b'"]}}]}'
    )


def test_body_limits() -> None:
    assert MAX_EVENTS_PER_REQUEST == 1000
    one = OfflineEvent(EVENT_SET, "Contact", 1714990272, "evt", ip="198.51.100.1")
    body = orjson.loads(event_track_body(EVENT_SET, [one] * 1000))
    assert len(body["data"]) == 1000 and body["event_source"] == "offline"
    with pytest.raises(ValueError, match="1 to 1000"):
        event_track_body(EVENT_SET, [one] * 1001)
    with pytest.raises(ValueError, match="1 to 1000"):
        event_track_body(EVENT_SET, [])
    with pytest.raises(ValueError, match="event set"):
        event_track_body("42", [one])


# -- privacy ---------------------------------------------------------------------------------------------------------


def _bad_records() -> list[dict[str, Any]]:
    """Invalid records that carry raw match keys, some of them in the very field that is wrong."""
    with_pii = canonical(**PII)
    records = [
        {**with_pii, "event": PII["email"]},
        {**with_pii, "event": PII["phone"]},
        {**with_pii, "currency": PII["email"]},
        {**with_pii, "currency": PII["ip"]},
        {**with_pii, "value": PII["phone"]},
        {**with_pii, "channel": PII["email"]},
        {**with_pii, "event_set_id": PII["phone"]},
        {**with_pii, "advertiser_id": PII["ip"]},
        {**with_pii, "event_time": PII["user_agent"]},
        {**with_pii, "contents": [{"price": PII["phone"]}]},
        {**with_pii, "contents": PII["email"]},
        {**with_pii, "order_id": {"email": PII["email"]}},
        {**with_pii, "value": [PII["email"]]},
        {**with_pii, "currency": [PII["phone"]]},
        {**with_pii, "channel": [PII["email"]]},
        {**with_pii, "event_id": {"e": PII["email"]}},
        {**with_pii, "event_set_id": [PII["ip"]]},
        {**with_pii, "contents": [{"price": {"x": PII["ip"]}, "quantity": [PII["phone"]]}]},
        {**with_pii, "contents": [PII["user_agent"]]},
        {**with_pii, "event_time": 1000},
        {**with_pii, "event_time": int((NOW + DAY) * 1000)},
        {**with_pii, "advertiser_id": "1", "event_set_id": None},
        canonical(**{**NO_KEYS, "email": PII["ip"], "phone": PII["email"], "external_id": [3.5]}),
        canonical(**{**NO_KEYS, "ip": 7, "user_agent": ["x"]}),
        {**with_pii, "offline_event": PII["email"]},
    ]
    seg = fixture("segment_order_completed.json")
    seg["context"].update(
        ip=PII["ip"], userAgent=PII["user_agent"], traits={"email": PII["email"], "phone": PII["phone"]}
    )
    seg["properties"].update(ttclid=PII["ttclid"], ttp=PII["ttp"], external_id=PII["external_id"])
    records += [
        {**seg, "timestamp": PII["email"]},
        {**seg, "properties": {**seg["properties"], "currency": PII["phone"]}},
        {**seg, "properties": {**seg["properties"], "revenue": PII["ip"]}},
        {**seg, "properties": {**seg["properties"], "products": [{"product_id": "p", "quantity": PII["phone"]}]}},
    ]
    return records


def test_no_raw_match_key_in_any_error_text() -> None:
    texts = []
    for record in _bad_records():
        parsed = parse(record, default_event_set_id=None)
        assert isinstance(parsed.outcome, Rejected), record
        texts.append(parsed.outcome.error)
        texts.extend(f"{m.id_type} {m.reason}" for m in parsed.match_errors)
    assert len(texts) >= len(_bad_records())
    blob = "\n".join(texts).lower()
    for raw in PII.values():
        assert raw.lower() not in blob
    for fragment in ("victim", "415", "0123", "198.51.100", "secret", "mozilla"):
        assert fragment not in blob


def test_repr_hides_match_keys() -> None:
    e = event(parse(canonical(**PII)))
    text = repr(e) + str(e) + repr(parse(canonical(**PII)))
    assert e.ip == PII["ip"] and e.user_agent == PII["user_agent"]
    for raw in (PII["ip"], PII["user_agent"], PII["ttclid"], PII["ttp"], *e.email, *e.phone, *e.external_id):
        assert raw not in text
