"""Resolver.process end to end over every input form, resolution order, error texts and hostile input."""

from __future__ import annotations

import copy
import hashlib
import io
import json
import random
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fastavro
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.core.file_batcher import FileChange
from service.core.mappings import Mappings, parse_mappings
from service.core.membership import NOT_AUDIENCE_EVENT, Processed, Resolver, ResolverSettings
from service.core.model import (
    ID_TYPES,
    Action,
    AudienceChange,
    AudienceNeeded,
    DlqReason,
    MatchError,
    Rejected,
    Skipped,
)
from service.core.schemas import SchemaNotLoaded, SchemaStore, load_canonical_schema

FIXTURES = Path(__file__).parents[1] / "fixtures"

TESTING_EMAIL = "584c4423c421df49955759498a71495aba49b8780eb9387dff333b6f0982c777"
PLUS_15555555555 = "910a625c4ba147b544e6bd2f267e130ae14c591b6ba9c25cb8573322dedbebd0"
MAID = "83dc3f5f32b9472613b0f038d36f22585a609d018af6f6067f50da318bf354bd"
HASH_4242 = "0315b4020af3eccab7706679580ac87a710d82970733b8719e70af9b57e7b9e6"

MAPPINGS = parse_mappings(
    {
        "audiences": {
            "high_value_customers": {"advertiser_id": "7654321098765432109", "audience_id": "1234567"},
            "new_lookalike_seed": {
                "advertiser_id": "7654321098765432109",
                "audience_name": "Lookalike seed - Q4",
                "create_if_missing": True,
            },
            "no_advertiser": {"audience_id": "55"},
        }
    },
    "/etc/audience-sync/mappings.yaml",
)


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def fixture(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((FIXTURES / name).read_text())
    return data


def make_resolver(mappings: Mappings | None = None, store: SchemaStore | None = None, **kw: Any) -> Resolver:
    return Resolver(
        ResolverSettings(**kw),
        mappings if mappings is not None else MAPPINGS,
        store if store is not None else SchemaStore(),
    )


def run(event: Any, resolver: Resolver | None = None, **kw: Any) -> Processed:
    resolver = resolver or make_resolver(**kw)
    return resolver.process(json.dumps(event).encode(), None)


def change(processed: Processed) -> AudienceChange:
    assert isinstance(processed.outcome, AudienceChange), processed
    return processed.outcome


def rejected(processed: Processed, reason: DlqReason) -> str:
    assert isinstance(processed.outcome, Rejected), processed
    assert processed.outcome.reason is reason, processed
    return processed.outcome.error


def segment_track(
    membership: object = True,
    *,
    key: str = "high_value_customers",
    event: str = "Audience Entered",
    personas: dict[str, Any] | None = None,
    properties: dict[str, Any] | None = None,
    traits: dict[str, Any] | None = None,
) -> dict[str, Any]:
    props: dict[str, Any] = {"audience_key": key}
    if membership is not None:
        props[key] = membership
    props.update(properties or {})
    return {
        "type": "track",
        "event": event,
        "userId": "u-1",
        "timestamp": "2024-05-06T10:11:12.345Z",
        "properties": props,
        "context": {
            "personas": {"computation_class": "audience", "computation_key": key, **(personas or {})},
            "traits": traits if traits is not None else {"email": "testing@testing.com"},
        },
    }


def avro(record: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, fastavro.parse_schema(copy.deepcopy(load_canonical_schema())), record)
    return buf.getvalue()


# -- Segment forms --------------------------------------------------------------------------------------------


def test_track_with_boolean_property() -> None:
    processed = run(segment_track(True))
    assert processed.event_format == "segment"
    assert processed.match_errors == ()
    assert change(processed) == AudienceChange(
        advertiser_id="7654321098765432109",
        audience_id="1234567",
        action=Action.ADD,
        identifiers=(("EMAIL_SHA256", TESTING_EMAIL),),
        audience_key="high_value_customers",
        event_time_ms=1714990272345,
    )


def test_boolean_wins_over_event_name() -> None:
    assert change(run(segment_track(False, event="Audience Entered"))).action is Action.DELETE
    assert change(run(segment_track(True, event="Audience Exited"))).action is Action.ADD


def test_identify_with_traits_boolean() -> None:
    result = change(run(fixture("segment_identify.json")))
    assert result.action is Action.DELETE
    assert result.identifiers == (
        ("EMAIL_SHA256", sha("jane.doe@example.com")),
        ("PHONE_SHA256", PLUS_15555555555),
    )
    assert (result.audience_id, result.advertiser_id) == ("1234567", "7654321098765432109")


def test_identify_without_boolean_is_skipped() -> None:
    event = fixture("segment_identify.json")
    del event["traits"]["high_value_customers"]
    assert run(event).outcome == NOT_AUDIENCE_EVENT


@pytest.mark.parametrize(
    ("name", "expected"),
    [("Audience Entered", Action.ADD), ("Audience Exited", Action.DELETE), ("Audience Renamed", None)],
)
def test_event_name_fallback(name: str, expected: Action | None) -> None:
    processed = run(segment_track(None, event=name))
    if expected is None:
        assert processed.outcome == Skipped("not_audience_event")
    else:
        assert change(processed).action is expected


def test_custom_event_names() -> None:
    resolver = make_resolver(enter_event_names=("Joined", "Entered"), exit_event_names=("Left",))
    assert change(run(segment_track(None, event="Entered"), resolver)).action is Action.ADD
    assert change(run(segment_track(None, event="Left"), resolver)).action is Action.DELETE
    assert run(segment_track(None, event="Audience Entered"), resolver).outcome == NOT_AUDIENCE_EVENT


def test_journey_step_fixture() -> None:
    result = change(run(fixture("tiktok_sync_journey_step.json")))
    assert (result.action, result.audience_id, result.advertiser_id) == (Action.ADD, "12345", "123")
    assert result.audience_key == "journey_step_key"


def test_amazon_amc_fixture() -> None:
    processed = run(fixture("segment_amc_audience_entered.json"))
    assert change(processed) == AudienceChange(
        advertiser_id="585806696618602999",
        audience_id="379909525712777677",
        action=Action.ADD,
        identifiers=(("EMAIL_SHA256", sha("test@twilio.com")),),
        audience_key="amazon_ads_audience_6_may_24",
        event_time_ms=1714992998511,
    )


def test_snap_fixture_android_device_is_aaid() -> None:
    result = change(run(fixture("segment_snap_android.json"), default_advertiser_id="999"))
    assert result.identifiers == (
        ("EMAIL_SHA256", sha("test11111111@gmail.com")),
        ("PHONE_SHA256", sha("+1111111111")),
        ("AAID_SHA256", sha("advertising_id_1")),
    )
    assert (result.audience_id, result.advertiser_id) == ("123456789", "999")
    assert result.event_time_ms == 1725192000000  # originalTimestamp when timestamp is absent


def test_tiktok_add_to_audience_fixture() -> None:
    # Segment's own fixture has no computation_class: accepted, membership from the event name. Its audience's
    # "ID Type" is EMAIL_SHA256, so only the email is sent (Segment sends every enabled identifier whatever the ID
    # Type; this service honours the audience's declared type: README "Per-entry identifier contract").
    result = change(run(fixture("tiktok_add_to_audience.json")))
    assert result.action is Action.ADD
    assert result.identifiers == (("EMAIL_SHA256", TESTING_EMAIL),)
    assert (result.audience_id, result.advertiser_id, result.audience_key) == ("12345", "123", None)
    # Without the ID Type, every identifier goes, phones in E.164 (where Segment hashes the raw "1234567890").
    untyped = fixture("tiktok_add_to_audience.json")
    del untyped["context"]["personas"]["audience_settings"]["idType"]
    assert change(run(untyped)).identifiers == (
        ("EMAIL_SHA256", TESTING_EMAIL),
        ("PHONE_SHA256", sha("+11234567890")),
        ("IDFA_SHA256", HASH_4242),
    )


@pytest.mark.parametrize(("membership", "action"), [(True, Action.ADD), (False, Action.DELETE)])
def test_tiktok_sync_audience_fixture(membership: bool, action: Action) -> None:
    event = fixture("tiktok_sync_audience.json")
    event["properties"]["test_audience_key"] = membership
    result = change(run(event))
    assert result.action is action
    assert [t for t, _ in result.identifiers] == ["EMAIL_SHA256", "PHONE_SHA256", "IDFA_SHA256"]


def test_device_type_decides_ad_id_type() -> None:
    base = segment_track(True, traits={})
    for device, os_name, expected in [
        ({"advertisingId": "5F3A2B18-9C4D-4E7F-B8E2-17D3A1E69B25", "type": "ios"}, None, "IDFA_SHA256"),
        ({"advertisingId": "5f3a2b18-9c4d-4e7f-b8e2-17d3a1e69b25", "type": "Android"}, None, "AAID_SHA256"),
        ({"advertisingId": "5f3a2b18-9c4d-4e7f-b8e2-17d3a1e69b25"}, "Android", "AAID_SHA256"),
        ({"advertisingId": "5f3a2b18-9c4d-4e7f-b8e2-17d3a1e69b25"}, None, "IDFA_SHA256"),
    ]:
        event = copy.deepcopy(base)
        event["context"]["device"] = device
        if os_name:
            event["context"]["os"] = {"name": os_name}
        assert change(run(event)).identifiers == ((expected, MAID),)


def test_identifier_sources_in_order() -> None:
    event = segment_track(
        True,
        traits={"email": "  "},
        properties={"email": "props@example.com", "phone": "+15555555555"},
    )
    event["traits"] = {"email": "traits@example.com"}
    result = change(run(event))
    assert result.identifiers == (("EMAIL_SHA256", sha("traits@example.com")), ("PHONE_SHA256", PLUS_15555555555))


@pytest.mark.parametrize(
    "event",
    [
        {"type": "page", "name": "Home", "context": {"personas": {"computation_class": "audience"}}},
        {"type": "screen"},
        {"type": "alias", "previousId": "a"},
        {"type": "group"},
        {"type": "track", "event": "Order Completed", "properties": {}},
        {"type": "track", "event": "Audience Entered"},  # no personas
        {"type": "track", "event": "Audience Entered", "context": {}},
        {"type": "track", "event": "Audience Entered", "context": {"personas": {"computation_class": "trait"}}},
        {"type": "identify", "traits": {"email": "a@b.co"}},
        {"type": None},
        {"type": ["track"]},
    ],
)
def test_non_audience_events_are_skipped(event: dict[str, Any]) -> None:
    processed = run(event)
    assert processed.outcome == Skipped("not_audience_event")
    assert processed.event_format == "segment"


# -- canonical forms ------------------------------------------------------------------------------------------

CANONICAL_CHANGE = AudienceChange(
    advertiser_id="7654321098765432109",
    audience_id="1234567",
    action=Action.ADD,
    identifiers=(("EMAIL_SHA256", TESTING_EMAIL), ("PHONE_SHA256", PLUS_15555555555), ("IDFA_SHA256", MAID)),
    audience_key="high_value_customers",
    event_time_ms=1714990272345,
)


def test_canonical_json() -> None:
    processed = run(fixture("canonical_event.json"))
    assert processed.event_format == "canonical_json"
    assert change(processed) == CANONICAL_CHANGE


def test_canonical_avro_schemaless() -> None:
    processed = make_resolver().process(avro(fixture("canonical_event.json")), None)
    assert processed.event_format == "canonical_avro"
    assert change(processed) == CANONICAL_CHANGE


def test_confluent_avro() -> None:
    store = SchemaStore()
    resolver = make_resolver(store=store)
    value = b"\x00" + struct.pack(">I", 42) + avro(fixture("canonical_event.json"))
    with pytest.raises(SchemaNotLoaded) as info:
        resolver.process(value, None)
    assert info.value.schema_id == 42
    store.add(42, load_canonical_schema())
    processed = resolver.process(value, None)
    assert processed.event_format == "confluent_avro"
    assert change(processed) == CANONICAL_CHANGE


def test_confluent_evolved_writer_keeps_event_time() -> None:
    writer = copy.deepcopy(load_canonical_schema())
    writer["name"] = "Membership"
    writer["fields"].append({"name": "extra", "type": ["null", "string"], "default": None})
    store = SchemaStore()
    store.add(43, writer)
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, fastavro.parse_schema(writer), dict(fixture("canonical_event.json"), extra="x"))
    processed = make_resolver(store=store).process(b"\x00" + struct.pack(">I", 43) + buf.getvalue(), None)
    assert change(processed) == CANONICAL_CHANGE


def test_confluent_unknown_schema_id() -> None:
    store = SchemaStore()
    store.mark_unknown(7)
    processed = make_resolver(store=store).process(
        b"\x00\x00\x00\x00\x07" + avro({"audience_key": "k", "action": "add"}), None
    )
    assert rejected(processed, DlqReason.INVALID_PAYLOAD) == "unknown schema id 7"
    assert processed.event_format == "confluent_avro"


def test_content_type_header_override() -> None:
    value = orjson.dumps(fixture("canonical_event.json"))
    processed = make_resolver().process(value, [("Content-Type", b"avro/binary")])
    assert rejected(processed, DlqReason.INVALID_PAYLOAD).startswith("schemaless Avro")
    ok = make_resolver().process(b"\n" + value, [("content-type", b"application/json")])
    assert change(ok) == CANONICAL_CHANGE


def test_canonical_all_identifier_types_in_id_types_order() -> None:
    event = {
        "audience_key": "high_value_customers",
        "action": "delete",
        "aaid": "a-1",
        "idfa": "i-1",
        "phone": "+15555555555",
        "email": "testing@testing.com",
    }
    result = change(run(event))
    assert result.id_schema == ID_TYPES
    assert result.action is Action.DELETE


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (1714990272345, 1714990272345),
        ("2024-05-06T10:11:12.345Z", 1714990272345),
        ("2024-05-06T10:11:12.345+00:00", 1714990272345),
        ("2024-05-06T12:11:12.345+02:00", 1714990272345),
        ("2024-05-06T10:11:12.345", 1714990272345),  # naive: UTC
        ("yesterday", None),
        (None, None),
        (1.5, None),
        (True, None),
    ],
)
def test_event_time(value: object, expected: int | None) -> None:
    canonical = dict(fixture("canonical_event.json"), event_time=value)
    assert change(run(canonical)).event_time_ms == expected
    if not isinstance(value, int):
        segment = segment_track(True)
        segment["timestamp"] = value
        assert change(run(segment)).event_time_ms == expected


@pytest.mark.parametrize(
    ("patch", "fragment"),
    [
        ({"audience_key": ""}, '"audience_key" must be a non-empty string'),
        ({"audience_key": 5}, '"audience_key" must be a non-empty string'),
        ({"audience_key": None}, '"audience_key" must be a non-empty string'),
        ({"action": "ADD"}, '"action" must be "add" or "delete"'),
        ({"action": None}, '"action" must be "add" or "delete"'),
        ({"action": ["add"]}, '"action" must be "add" or "delete"'),
        ({"audience_id": "aud_123"}, "audience_id must be a TikTok id (digits only), got a non-numeric string"),
        ({"audience_id": 1.5}, "audience_id must be a TikTok id (digits only), got a non-integer number"),
        ({"advertiser_id": True}, "advertiser_id must be a TikTok id (digits only), got a boolean"),
        ({"advertiser_id": -1}, "advertiser_id must be a TikTok id (digits only), got a negative number"),
        ({"advertiser_id": {"id": 1}}, "advertiser_id must be a TikTok id (digits only), got an object"),
    ],
)
def test_canonical_invalid_fields(patch: dict[str, Any], fragment: str) -> None:
    event = dict(fixture("canonical_event.json"), **patch)
    assert fragment in rejected(run(event), DlqReason.INVALID_PAYLOAD)


def test_canonical_json_missing_action() -> None:
    assert "action" in rejected(run({"audience_key": "high_value_customers"}), DlqReason.INVALID_PAYLOAD)


def test_int_ids_are_accepted() -> None:
    event = dict(fixture("canonical_event.json"), audience_id=42, advertiser_id=7654321098765432109)
    result = change(run(event))
    assert (result.audience_id, result.advertiser_id) == ("42", "7654321098765432109")


# -- resolution order -----------------------------------------------------------------------------------------

ORDER_MAPPINGS = parse_mappings({"audiences": {"k": {"advertiser_id": "3", "audience_id": "333"}}}, "m.yaml")


@pytest.mark.parametrize(
    ("explicit", "personas", "mapped", "expected"),
    [
        ("111", "222", True, "111"),
        (None, "222", True, "222"),
        (None, None, True, "333"),
        ("111", None, False, "111"),
        (None, "222", False, "222"),
        (None, None, False, None),
    ],
)
def test_audience_id_order_segment(
    explicit: str | None, personas: str | None, mapped: bool, expected: str | None
) -> None:
    event = segment_track(True, key="k", properties={"external_audience_id": explicit})
    event["context"]["personas"]["external_audience_id"] = personas
    resolver = make_resolver(ORDER_MAPPINGS if mapped else Mappings.empty(), default_advertiser_id="4")
    processed = run(event, resolver)
    if expected is None:
        rejected(processed, DlqReason.MISSING_AUDIENCE_ID)
    else:
        assert change(processed).audience_id == expected


@pytest.mark.parametrize(
    ("explicit", "settings_adv", "mapped", "default", "expected"),
    [
        ("1", "2", True, "4", "1"),
        (None, "2", True, "4", "2"),
        (None, None, True, "4", "3"),
        (None, None, False, "4", "4"),
        (None, None, False, None, None),
        ("1", None, False, None, "1"),
    ],
)
def test_advertiser_id_order_segment(
    explicit: str | None, settings_adv: str | None, mapped: bool, default: str | None, expected: str | None
) -> None:
    event = segment_track(True, key="k", properties={"advertiser_id": explicit})
    personas = event["context"]["personas"]
    personas["external_audience_id"] = "222"
    if settings_adv is not None:
        personas["audience_settings"] = {"advertiserId": settings_adv}
    resolver = make_resolver(ORDER_MAPPINGS if mapped else Mappings.empty(), default_advertiser_id=default)
    processed = run(event, resolver)
    if expected is None:
        rejected(processed, DlqReason.MISSING_ADVERTISER_ID)
    else:
        assert change(processed).advertiser_id == expected


@pytest.mark.parametrize(
    ("audience_id", "advertiser_id", "mapped", "default", "expected"),
    [
        ("111", "1", True, "4", ("111", "1")),
        (None, None, True, "4", ("333", "3")),
        ("111", None, False, "4", ("111", "4")),
        (None, "1", False, "4", None),
    ],
)
def test_resolution_order_canonical(
    audience_id: str | None,
    advertiser_id: str | None,
    mapped: bool,
    default: str | None,
    expected: tuple[str, str] | None,
) -> None:
    event = {"audience_key": "k", "action": "add", "email": "a@b.co"}
    event.update(audience_id=audience_id, advertiser_id=advertiser_id)
    resolver = make_resolver(ORDER_MAPPINGS if mapped else Mappings.empty(), default_advertiser_id=default)
    processed = run(event, resolver)
    if expected is None:
        rejected(processed, DlqReason.MISSING_AUDIENCE_ID)
    else:
        result = change(processed)
        assert (result.audience_id, result.advertiser_id) == expected


def test_audience_key_falls_back_to_properties_audience_key() -> None:
    event = segment_track(True)
    del event["context"]["personas"]["computation_key"]
    event["event"] = "Audience Entered"
    result = change(run(event))
    assert (result.audience_key, result.audience_id) == ("high_value_customers", "1234567")


def test_mappings_are_replaceable_at_runtime() -> None:
    resolver = make_resolver(Mappings.empty())
    event = segment_track(True, key="k")
    rejected(run(event, resolver), DlqReason.MISSING_AUDIENCE_ID)
    resolver.mappings = ORDER_MAPPINGS
    assert change(run(event, resolver)).audience_id == "333"


# -- operator-facing error texts ------------------------------------------------------------------------------


def test_missing_audience_id_text_without_mappings_file() -> None:
    error = rejected(run(segment_track(True), mappings=Mappings.empty()), DlqReason.MISSING_AUDIENCE_ID)
    assert error == (
        'no TikTok audience id for audience_key "high_value_customers": looked for '
        "properties.external_audience_id (absent), context.personas.external_audience_id (absent) and "
        "MAPPINGS_FILE entry audiences.high_value_customers.audience_id (no MAPPINGS_FILE configured); "
        "add the mapping or set external_audience_id in Segment, then replay"
    )


def test_missing_audience_id_text_with_mappings_file() -> None:
    error = rejected(run(segment_track(True, key="other_key")), DlqReason.MISSING_AUDIENCE_ID)
    assert "MAPPINGS_FILE entry audiences.other_key.audience_id (no entry in /etc/audience-sync/mappings.yaml)" in error


def test_missing_audience_id_text_canonical() -> None:
    event = {"audience_key": "other_key", "action": "add", "email": "a@b.co"}
    error = rejected(run(event), DlqReason.MISSING_AUDIENCE_ID)
    assert error.startswith('no TikTok audience id for audience_key "other_key": looked for audience_id (absent)')
    assert error.endswith("add the mapping or set audience_id in the event, then replay")


def test_missing_audience_id_without_audience_key() -> None:
    event = segment_track(True)
    del event["context"]["personas"]["computation_key"]
    del event["properties"]["audience_key"]
    error = rejected(run(event), DlqReason.MISSING_AUDIENCE_ID)
    assert "there is no audience key (context.personas.computation_key, properties.audience_key)" in error


def test_create_if_missing_asks_for_the_audience_until_it_exists() -> None:
    event = segment_track(True, key="new_lookalike_seed")
    resolver = Resolver(ResolverSettings(), MAPPINGS, SchemaStore())
    outcome = resolver.process(orjson.dumps(event), None).outcome
    assert outcome == AudienceNeeded("new_lookalike_seed", "7654321098765432109", "Lookalike seed - Q4")
    resolver.created_audiences = {("7654321098765432109", "Lookalike seed - Q4"): "888"}
    change = resolver.process(orjson.dumps(event), None).outcome
    assert isinstance(change, AudienceChange)
    assert change.audience_id == "888"


def test_create_if_missing_for_canonical_events() -> None:
    doc = {"audience_key": "new_lookalike_seed", "action": "add", "email": "a@b.co"}
    resolver = Resolver(ResolverSettings(), MAPPINGS, SchemaStore())
    assert isinstance(resolver.process(orjson.dumps(doc), None).outcome, AudienceNeeded)


def test_missing_advertiser_text() -> None:
    event = segment_track(True, key="no_advertiser")
    error = rejected(run(event), DlqReason.MISSING_ADVERTISER_ID)
    assert error == (
        'no TikTok advertiser id for audience_key "no_advertiser": looked for properties.advertiser_id (absent), '
        "context.personas.audience_settings.advertiserId (absent), MAPPINGS_FILE entry "
        "audiences.no_advertiser.advertiser_id (entry has no advertiser_id) and DEFAULT_ADVERTISER_ID (not set); "
        "add advertiser_id to the mapping or set DEFAULT_ADVERTISER_ID, then replay"
    )
    assert change(run(event, default_advertiser_id="77")).advertiser_id == "77"


@pytest.mark.parametrize(
    ("where", "value", "fragment"),
    [
        ("properties.external_audience_id", "aud_2g5V", "properties.external_audience_id must be a TikTok id"),
        ("personas.external_audience_id", "THIS_ISNT_REAL", "context.personas.external_audience_id must be"),
        ("personas.external_audience_id", [1], "context.personas.external_audience_id must be a TikTok id"),
        ("properties.advertiser_id", "adv-1", "properties.advertiser_id must be a TikTok id"),
        ("settings.advertiserId", 1.0, "context.personas.audience_settings.advertiserId must be a TikTok id"),
    ],
)
def test_non_numeric_ids_are_invalid_payload(where: str, value: object, fragment: str) -> None:
    event = segment_track(True)
    personas = event["context"]["personas"]
    target = {
        "properties": event["properties"],
        "personas": personas,
        "settings": personas.setdefault("audience_settings", {}),
    }[where.split(".")[0]]
    target[where.split(".")[1]] = value
    error = rejected(run(event), DlqReason.INVALID_PAYLOAD)
    assert fragment in error
    assert str(value) not in error


def test_no_identifiers_text() -> None:
    event = segment_track(True, traits={"email": "not-an-email", "phone": "nope"})
    processed = run(event)
    error = rejected(processed, DlqReason.NO_IDENTIFIERS)
    assert error == (
        "no usable identifier: looked at context.traits.email, traits.email, properties.email, "
        "context.traits.phone, traits.phone, properties.phone, context.device.advertisingId; "
        "2 dropped as invalid (EMAIL_SHA256: invalid_email, PHONE_SHA256: unparsable_phone)"
    )
    assert processed.match_errors == (
        MatchError("EMAIL_SHA256", "invalid_email"),
        MatchError("PHONE_SHA256", "unparsable_phone"),
    )
    empty = rejected(run(segment_track(True, traits={})), DlqReason.NO_IDENTIFIERS)
    assert empty.endswith("; none present")


def test_no_identifiers_is_reported_before_missing_audience() -> None:
    rejected(run(segment_track(True, key="unmapped", traits={})), DlqReason.NO_IDENTIFIERS)


def test_invalid_identifiers_are_dropped_and_counted() -> None:
    event = segment_track(True, traits={"email": "testing@testing.com", "phone": "12"})
    event["context"]["device"] = {"advertisingId": 12345}
    processed = run(event)
    assert change(processed).identifiers == (("EMAIL_SHA256", TESTING_EMAIL),)
    assert processed.match_errors == (
        MatchError("PHONE_SHA256", "invalid_phone"),
        MatchError("IDFA_SHA256", "not_a_string"),
    )


def test_send_toggles() -> None:
    event = fixture("tiktok_sync_audience.json")
    only_phone = change(run(event, send_email=False, send_idfa=False))
    assert only_phone.id_schema == ("PHONE_SHA256",)
    no_ad = change(run(event, send_idfa=False))
    assert no_ad.id_schema == ("EMAIL_SHA256", "PHONE_SHA256")
    # A disabled type is not even validated.
    bad_email = segment_track(True, traits={"email": "nope", "phone": "+15555555555"})
    assert run(bad_email, send_email=False).match_errors == ()
    off = run(event, send_email=False, send_phone=False, send_idfa=False, send_aaid=False)
    error = rejected(off, DlqReason.NO_IDENTIFIERS)
    assert "looked at nothing" in error
    assert "not sending EMAIL_SHA256, PHONE_SHA256, IDFA_SHA256, AAID_SHA256 (settings)" in error
    canonical = fixture("canonical_event.json")
    assert change(run(canonical, send_phone=False, send_idfa=False)).id_schema == ("EMAIL_SHA256",)


PII = ["jane.secret@example.com", "JANE.SECRET@EXAMPLE", "+1 (555) 867-5309", "555-867-5309x", "jane secret@x.com"]


def test_no_raw_identifier_in_any_string() -> None:
    events: list[Any] = []
    for value in PII:
        events.append(segment_track(True, traits={"email": value, "phone": value}))
        events.append(segment_track(True, key="unmapped", traits={"email": value}))
        events.append(segment_track(True, key="no_advertiser", traits={"email": value}))
        events.append(segment_track(True, properties={"external_audience_id": value}, traits={"email": value}))
        events.append({"audience_key": "high_value_customers", "action": "add", "email": value, "phone": value})
        events.append({"audience_key": "x", "action": "add", "audience_id": value, "email": value})
    resolver = make_resolver()
    for event in events:
        processed = run(event, resolver)
        text = repr(processed)
        for value in PII:
            assert value not in text and value.lower() not in text
    for value in PII:
        raw = f'{{"type": "track", "email": {value}}}'.encode()
        text = repr(resolver.process(raw, None))
        assert value not in text


# -- hostile input --------------------------------------------------------------------------------------------

ALLOWED_REJECTIONS = {
    DlqReason.INVALID_PAYLOAD,
    DlqReason.NO_IDENTIFIERS,
    DlqReason.MISSING_AUDIENCE_ID,
    DlqReason.MISSING_ADVERTISER_ID,
}


def check(processed: Processed) -> None:
    assert isinstance(processed, Processed)
    outcome = processed.outcome
    assert isinstance(outcome, AudienceChange | Skipped | Rejected)
    if isinstance(outcome, Rejected):
        assert outcome.reason in ALLOWED_REJECTIONS
        assert "could not be processed" not in outcome.error, outcome.error
    if isinstance(outcome, AudienceChange):
        assert outcome.audience_id.isdigit() and outcome.advertiser_id.isdigit()
        assert [t for t, _ in outcome.identifiers] == [t for t in ID_TYPES if t in outcome.id_schema]


def paths(node: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield (*prefix, key)
            yield from paths(value, (*prefix, key))


def replaced(event: dict[str, Any], path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    clone = copy.deepcopy(event)
    node = clone
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return clone


WRONG_VALUES: list[Any] = [None, [], {}, 0, -1, 1.5, True, False, "", " ", "x", [{"a": 1}], {"k": [1]}, 10**30]


@pytest.mark.parametrize(
    "name",
    [
        "segment_amc_audience_entered.json",
        "segment_snap_android.json",
        "tiktok_add_to_audience.json",
        "segment_identify.json",
        "canonical_event.json",
    ],
)
def test_wrong_types_at_every_level_never_raise(name: str) -> None:
    event = fixture(name)
    resolver = make_resolver(default_advertiser_id="1")
    for path in paths(event):
        for value in WRONG_VALUES:
            check(run(replaced(event, path, value), resolver))


@pytest.mark.parametrize(
    "event",
    [
        {"type": "track", "context": [1, 2]},
        {"type": "track", "context": {"personas": "audience"}},
        {"type": "track", "context": {"personas": {"computation_class": ["audience"]}}},
        {"type": "track", "context": {"personas": {"computation_class": {"a": 1}}}, "event": "Audience Entered"},
        {"type": "track", "event": ["Audience Entered"], "context": {"personas": {"computation_class": "audience"}}},
        {"type": "identify", "traits": [1], "context": {"personas": {"computation_class": "audience"}}},
        {"type": {"x": 1}},
    ],
)
def test_wrong_types_are_skipped(event: dict[str, Any]) -> None:
    assert run(event).outcome == NOT_AUDIENCE_EVENT


def test_wrong_computation_key_type_is_treated_as_absent() -> None:
    event = segment_track(None)
    event["context"]["personas"]["computation_key"] = 5
    result = change(run(event))  # membership from the event name, audience key from properties.audience_key
    assert (result.action, result.audience_key) == (Action.ADD, "high_value_customers")


def test_deeply_nested_json() -> None:
    value = b'{"type": ' * 10000 + b"1" + b"}" * 10000
    processed = make_resolver().process(value, None)
    assert "invalid JSON" in rejected(processed, DlqReason.INVALID_PAYLOAD)
    nested_context = b'{"type": "track", "context": ' + b"[" * 10000 + b"]" * 10000 + b"}"
    rejected(make_resolver().process(nested_context, None), DlqReason.INVALID_PAYLOAD)


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        (b"", "empty"),
        (None, "empty"),
        (b"[]", None),
        (b"\xff\xfe\xfd", None),
        (b'{"email": "\xff"}', "invalid JSON"),
        (b"{" + b" " * 2_000_000 + b"}", "over the 1048576-byte limit"),
    ],
)
def test_bad_payloads_are_invalid_payload(value: bytes | None, fragment: str | None) -> None:
    processed = make_resolver().process(value, None)
    error = rejected(processed, DlqReason.INVALID_PAYLOAD)
    if fragment:
        assert fragment in error


def test_random_bytes_never_raise() -> None:
    rng = random.Random(20240506)
    resolver = make_resolver(default_advertiser_id="1")
    prefixes = [b"", b"{", b"\x02", b" ", b"\xef\xbb\xbf{", b'{"type": "track", ', b"\x00"]
    for i in range(4000):
        value = prefixes[i % len(prefixes)] + rng.randbytes(rng.randrange(0, 120))
        try:
            check(resolver.process(value, None))
        except SchemaNotLoaded:
            assert value[0] == 0 and len(value) >= 5


def test_mutated_avro_never_raises() -> None:
    rng = random.Random(7)
    body = avro(fixture("canonical_event.json"))
    resolver = make_resolver()
    for _ in range(3000):
        mutated = bytearray(body)
        for _ in range(rng.randrange(1, 4)):
            mutated[rng.randrange(len(mutated))] = rng.randrange(1, 256)
        if mutated[0] in (0, 0x7B):
            mutated[0] = 2
        check(resolver.process(bytes(mutated), None))


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_property_process_never_raises_on_arbitrary_bytes(value: bytes) -> None:
    resolver = _HYPOTHESIS_RESOLVER
    try:
        check(resolver.process(value, [("content-type", b"application/json")] if value[:1] == b"[" else None))
    except SchemaNotLoaded:
        assert value[0] == 0


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)
SEGMENT_KEYS = st.sampled_from(
    [
        "type",
        "event",
        "context",
        "properties",
        "traits",
        "personas",
        "computation_class",
        "computation_key",
        "external_audience_id",
        "audience_settings",
        "advertiserId",
        "email",
        "phone",
        "device",
        "advertisingId",
        "audience_key",
        "action",
        "audience_id",
        "advertiser_id",
        "timestamp",
        "event_time",
        "idfa",
        "aaid",
    ]
)
SHAPED = st.recursive(
    JSON_VALUES | st.sampled_from(["track", "identify", "audience", "journey_step", "Audience Entered", "add"]),
    lambda children: st.dictionaries(SEGMENT_KEYS, children, max_size=6),
    max_leaves=30,
)


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(SEGMENT_KEYS, SHAPED, max_size=8))
def test_property_process_never_raises_on_event_shaped_json(event: dict[str, Any]) -> None:
    check(_HYPOTHESIS_RESOLVER.process(orjson.dumps(event), None))


_HYPOTHESIS_RESOLVER = make_resolver(default_advertiser_id="1")


# -- settings -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kw", "fragment"),
    [
        ({"phone_default_region": "XX"}, "PHONE_DEFAULT_REGION"),
        ({"enter_event_names": ("A",), "exit_event_names": ("A",)}, "both enter and exit"),
        ({"default_advertiser_id": "adv-1"}, "DEFAULT_ADVERTISER_ID"),
        ({"max_record_bytes": 0}, "max_record_bytes"),
    ],
)
def test_invalid_settings(kw: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        make_resolver(**kw)


# -- the per-entry contract of the mappings file -------------------------------------------------------------

ENTRY_MAPPINGS = parse_mappings(
    {
        "audiences": {
            "emails_only": {"advertiser_id": "7654321098765432109", "audience_id": "11", "id_types": ["EMAIL_SHA256"]},
            "phones_only": {"advertiser_id": "7654321098765432109", "audience_id": "12", "id_types": ["PHONE_SHA256"]},
            "paused": {"advertiser_id": "7654321098765432109", "audience_id": "13", "enabled": False},
            "crm_file": {
                "advertiser_id": "7654321098765432109",
                "audience_id": "14",
                "mode": "file",
                "id_types": ["EMAIL_SHA256"],
            },
            "uk": {"advertiser_id": "7654321098765432109", "audience_id": "15", "phone_region": "GB"},
        }
    },
    "mappings.yaml",
)


def canonical_for(key: str, **ids: str) -> bytes:
    return orjson.dumps({"audience_key": key, "action": "add", "user_id": "u1", **ids})


def resolve_entry(value: bytes) -> Processed:
    return Resolver(ResolverSettings(), ENTRY_MAPPINGS, SchemaStore()).process(value, None)


def test_id_types_sends_only_the_entrys_identifier_types() -> None:
    out = resolve_entry(canonical_for("emails_only", email="Testing@Example.com", phone="+15555555555"))
    assert isinstance(out.outcome, AudienceChange)
    assert out.outcome.identifiers == (("EMAIL_SHA256", sha("testing@example.com")),)
    segment = resolve_entry(
        orjson.dumps(
            {
                "type": "track",
                "event": "Audience Entered",
                "context": {
                    "personas": {"computation_key": "emails_only"},
                    "traits": {"email": "testing@example.com", "phone": "+15555555555"},
                },
                "properties": {"emails_only": True},
            }
        )
    )
    assert isinstance(segment.outcome, AudienceChange)
    assert segment.outcome.identifiers == (("EMAIL_SHA256", sha("testing@example.com")),)


def test_a_record_with_none_of_the_entrys_types_is_no_identifiers_and_says_why() -> None:
    out = resolve_entry(canonical_for("phones_only", email="testing@example.com"))
    assert isinstance(out.outcome, Rejected) and out.outcome.reason is DlqReason.NO_IDENTIFIERS
    assert "audiences.phones_only.id_types sends only PHONE_SHA256" in out.outcome.error
    assert "testing@example.com" not in out.outcome.error


def test_a_disabled_entry_skips_its_records() -> None:
    assert resolve_entry(canonical_for("paused", email="a@b.co")).outcome == Skipped("audience_disabled")


def test_a_file_entrys_records_become_file_changes_of_its_one_contract() -> None:
    out = resolve_entry(canonical_for("crm_file", email="A@b.co", phone="+15555555555"))
    assert out.outcome == FileChange(
        "7654321098765432109", "crm_file", "14", None, "EMAIL_SHA256", Action.ADD, (("EMAIL_SHA256", sha("a@b.co")),)
    )
    none = resolve_entry(canonical_for("crm_file", phone="+15555555555"))
    assert isinstance(none.outcome, Rejected) and none.outcome.reason is DlqReason.NO_IDENTIFIERS


def test_a_file_entry_to_create_names_its_audience_and_finds_a_recorded_id() -> None:
    mappings = parse_mappings(
        {
            "audiences": {
                "crm": {
                    "advertiser_id": "7654321098765432109",
                    "mode": "file",
                    "id_types": ["AAID_SHA256"],
                    "create_if_missing": True,
                    "file_interval_s": 120,
                    "file_max_rows": 5000,
                }
            }
        },
        "mappings.yaml",
    )
    resolver = Resolver(ResolverSettings(), mappings, SchemaStore())
    value = orjson.dumps(
        {"audience_key": "crm", "action": "delete", "user_id": "u1", "aaid": "6D92078A-8246-4BA4-AE5B-76104861E7DC"}
    )
    out = resolver.process(value, None).outcome
    assert isinstance(out, FileChange)
    assert (out.audience_id, out.audience_name, out.contract, out.action) == (None, "crm", "GAID_SHA256", Action.DELETE)
    assert (out.interval_s, out.max_rows) == (120, 5000)
    resolver.created_audiences = {("7654321098765432109", "crm"): "777"}
    again = resolver.process(value, None).outcome
    assert isinstance(again, FileChange) and again.audience_id == "777"


def test_an_entrys_phone_region_applies_to_its_national_numbers() -> None:
    uk = resolve_entry(canonical_for("uk", phone="020 7946 0958"))
    assert isinstance(uk.outcome, AudienceChange)
    assert uk.outcome.identifiers == (("PHONE_SHA256", sha("+442079460958")),)
    us = resolve_entry(canonical_for("emails_only", phone="020 7946 0958", email="a@b.co"))
    assert isinstance(us.outcome, AudienceChange) and us.outcome.identifiers[0][0] == "EMAIL_SHA256"


def segment_with_id_type(key: str, id_type: object, **personas: object) -> bytes:
    return orjson.dumps(
        {
            "type": "track",
            "event": "Audience Entered",
            "context": {
                "personas": {
                    "computation_key": key,
                    "external_audience_id": "99",
                    "audience_settings": {"advertiserId": "7654321098765432109", "idType": id_type},
                    **personas,
                },
                "traits": {"email": "testing@example.com", "phone": "+15555555555"},
                "device": {"advertisingId": "6D92078A-8246-4BA4-AE5B-76104861E7DC", "type": "android"},
            },
            "properties": {key: True},
        }
    )


@pytest.mark.parametrize(
    ("id_type", "sent"),
    [("EMAIL_SHA256", "EMAIL_SHA256"), ("PHONE_SHA256", "PHONE_SHA256"), ("GAID_SHA256", "AAID_SHA256")],
)
def test_segments_audience_id_type_narrows_what_is_sent(id_type: str, sent: str) -> None:
    out = resolve_entry(segment_with_id_type("no_entry", id_type))
    assert isinstance(out.outcome, AudienceChange)
    assert [t for t, _ in out.outcome.identifiers] == [sent]


def test_segments_id_type_unknown_is_ignored_and_the_entrys_id_types_win() -> None:
    unknown = resolve_entry(segment_with_id_type("no_entry", "MD5_PLEASE"))
    assert isinstance(unknown.outcome, AudienceChange) and len(unknown.outcome.identifiers) == 3
    entry = resolve_entry(segment_with_id_type("emails_only", "PHONE_SHA256"))
    assert isinstance(entry.outcome, AudienceChange)
    assert [t for t, _ in entry.outcome.identifiers] == ["EMAIL_SHA256"]


def test_segments_id_type_with_no_such_identifier_is_no_identifiers_and_says_why() -> None:
    value = orjson.loads(segment_with_id_type("no_entry", "IDFA_SHA256"))
    del value["context"]["device"]
    out = resolve_entry(orjson.dumps(value))
    assert isinstance(out.outcome, Rejected) and out.outcome.reason is DlqReason.NO_IDENTIFIERS
    assert "audience_settings.idType sends only IDFA_SHA256" in out.outcome.error
    assert "testing@example.com" not in out.outcome.error
