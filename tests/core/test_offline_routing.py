"""Issue 12 phase 2: the resolver routes each record by what it is (service/core/membership.py `Resolver`).

Offline events are never mistaken for membership events and vice versa, for JSON, schemaless Avro and Confluent
Avro; the offline settings used are those of the current mappings; the `offline_events:` section of the mappings
file is parsed strictly (service/core/mappings.py).
"""

from __future__ import annotations

import copy
import io
from pathlib import Path
from typing import Any

import fastavro
import orjson
import pytest

from service.core.mappings import Mappings, MappingsError, parse_mappings
from service.core.membership import NOT_AUDIENCE_EVENT, Processed, Resolver, ResolverSettings
from service.core.model import AudienceChange, DlqReason, Rejected
from service.core.offline import UNMAPPED_EVENT, OfflineEvent, OfflineSettings
from service.core.schemas import SchemaError, SchemaStore, load_canonical_schema, load_offline_schema

FIXTURES = Path(__file__).parents[1] / "fixtures"
ADVERTISER = "7654321098765432109"
EVENT_SET = "7000000000000000001"
DEFAULT_SET = "7000000000000000009"
NOW = 1_714_990_300.0  # 28 s after the fixtures' event time


def fixture(name: str) -> dict[str, Any]:
    data: dict[str, Any] = orjson.loads((FIXTURES / name).read_bytes())
    return data


def mappings(section: dict[str, Any] | None) -> Mappings:
    doc: dict[str, Any] = {"audiences": {"vip": {"advertiser_id": ADVERTISER, "audience_id": "101"}}}
    if section is not None:
        doc["offline_events"] = section
    return parse_mappings(doc, "m.yaml")


CONFIGURED = {"default_event_set_id": DEFAULT_SET, "event_sets": {ADVERTISER: EVENT_SET}}


def resolver(section: dict[str, Any] | None = CONFIGURED, store: SchemaStore | None = None) -> Resolver:
    return Resolver(
        ResolverSettings(default_advertiser_id=ADVERTISER),
        mappings(section),
        store or SchemaStore(),
        wall=lambda: NOW,
    )


def membership() -> dict[str, Any]:
    return {"audience_key": "vip", "action": "add", "email": "testing@testing.com"}


def engage_track() -> dict[str, Any]:
    """A Segment Engage audience track event (personas present): membership, whatever the offline config."""
    return {
        "type": "track",
        "event": "Audience Entered",
        "messageId": "m-1",
        "timestamp": "2024-05-06T10:11:12.345Z",
        "context": {
            "traits": {"email": "testing@testing.com"},
            "personas": {"computation_key": "vip", "computation_class": "audience"},
        },
        "properties": {"vip": True},
    }


def avro(schema: dict[str, Any], record: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, fastavro.parse_schema(copy.deepcopy(schema)), record)
    return buf.getvalue()


def confluent(schema_id: int, body: bytes) -> bytes:
    return b"\x00" + schema_id.to_bytes(4, "big") + body


def outcome(r: Resolver, raw: bytes) -> Any:
    p = r.process(raw, None)
    assert isinstance(p, Processed)
    return p.outcome


# -- JSON ------------------------------------------------------------------------------------------------------


def test_canonical_offline_json_becomes_an_offline_event_of_the_configured_set() -> None:
    ev = outcome(resolver(), orjson.dumps(fixture("offline_event.json")))
    assert isinstance(ev, OfflineEvent)
    assert ev.event == "CompletePayment"
    assert ev.event_set_id in (EVENT_SET, DEFAULT_SET)


def test_canonical_offline_json_unconfigured_is_dead_lettered_missing_event_set_id() -> None:
    record = fixture("offline_event.json")
    record.pop("event_set_id", None)
    out = outcome(resolver(None), orjson.dumps(record))
    assert isinstance(out, Rejected) and out.reason is DlqReason.MISSING_EVENT_SET_ID


def test_membership_json_stays_membership_with_offline_configured() -> None:
    out = outcome(resolver(), orjson.dumps(membership()))
    assert isinstance(out, AudienceChange) and out.audience_id == "101"


def test_a_membership_record_carrying_offline_event_is_still_membership() -> None:
    out = outcome(resolver(), orjson.dumps({**membership(), "offline_event": True}))
    assert isinstance(out, AudienceChange)


def test_segment_order_is_offline_only_when_enabled() -> None:
    raw = orjson.dumps(fixture("segment_order_completed.json"))
    assert outcome(resolver(None), raw) is NOT_AUDIENCE_EVENT
    assert outcome(resolver({"match_keys": ["email"]}), raw) is NOT_AUDIENCE_EVENT  # a section, but no event set
    ev = outcome(resolver(), raw)
    assert isinstance(ev, OfflineEvent) and ev.event == "CompletePayment" and ev.source == "segment"


def test_segment_engage_events_stay_membership_with_offline_enabled() -> None:
    out = outcome(resolver(), orjson.dumps(engage_track()))
    assert isinstance(out, AudienceChange) and out.audience_key == "vip"


def test_unmapped_segment_track_is_skipped_not_dead_lettered() -> None:
    raw = orjson.dumps({**fixture("segment_order_completed.json"), "event": "Button Hovered"})
    assert outcome(resolver(), raw) is UNMAPPED_EVENT


def test_event_names_of_the_mappings_file_are_used() -> None:
    raw = orjson.dumps(fixture("segment_order_completed.json"))
    ev = outcome(resolver({**CONFIGURED, "event_names": {"Order Completed": "PlaceAnOrder"}}), raw)
    assert isinstance(ev, OfflineEvent) and ev.event == "PlaceAnOrder"
    assert outcome(resolver({**CONFIGURED, "event_names": {"Order Completed": None}}), raw) is UNMAPPED_EVENT


def test_a_mappings_reload_swaps_the_offline_settings() -> None:
    record = fixture("offline_event.json")
    record.pop("event_set_id", None)
    record.pop("advertiser_id", None)
    raw = orjson.dumps(record)
    r = resolver(None)
    assert outcome(r, raw).reason is DlqReason.MISSING_EVENT_SET_ID
    r.mappings = mappings({"default_event_set_id": DEFAULT_SET})
    ev = outcome(r, raw)
    assert isinstance(ev, OfflineEvent) and ev.event_set_id == DEFAULT_SET
    r.mappings = mappings(None)
    assert outcome(r, raw).reason is DlqReason.MISSING_EVENT_SET_ID


def test_the_wall_clock_is_the_resolvers() -> None:
    raw = orjson.dumps(fixture("offline_event.json"))
    r = resolver()
    r._wall = lambda: NOW + 29 * 86_400
    out = outcome(r, raw)
    assert isinstance(out, Rejected) and out.reason is DlqReason.EVENT_TOO_OLD


def test_match_errors_of_offline_keys_are_reported() -> None:
    record = {**fixture("offline_event.json"), "email": "not an email", "external_id": "x-1"}
    p = resolver().process(orjson.dumps(record), None)
    assert isinstance(p.outcome, OfflineEvent)
    assert [e.id_type for e in p.match_errors] == ["email"]


def test_resolver_offline_fallback_settings() -> None:
    r = Resolver(
        ResolverSettings(),
        Mappings.empty(),
        SchemaStore(),
        offline=OfflineSettings(default_event_set_id=DEFAULT_SET),
        wall=lambda: NOW,
    )
    ev = outcome(r, orjson.dumps(fixture("segment_order_completed.json")))
    assert isinstance(ev, OfflineEvent) and ev.event_set_id == DEFAULT_SET


# -- schemaless Avro -------------------------------------------------------------------------------------------


def test_schemaless_offline_avro_becomes_an_offline_event() -> None:
    raw = avro(load_offline_schema(), fixture("offline_event.json"))
    assert raw[0] == 0x01
    ev = outcome(resolver(), raw)
    assert isinstance(ev, OfflineEvent) and ev.event == "CompletePayment"


def test_schemaless_membership_avro_stays_membership() -> None:
    raw = avro(load_canonical_schema(), membership())
    out = outcome(resolver(), raw)
    assert isinstance(out, AudienceChange) and out.audience_id == "101"


# -- Confluent Avro --------------------------------------------------------------------------------------------


def test_confluent_offline_avro_identical_layout() -> None:
    store = SchemaStore()
    entry = store.add(7, orjson.dumps(load_offline_schema()))
    assert entry.kind == "offline" and entry.reader is None
    ev = outcome(resolver(store=store), confluent(7, avro(load_offline_schema(), fixture("offline_event.json"))))
    assert isinstance(ev, OfflineEvent) and ev.event == "CompletePayment"


def test_confluent_offline_avro_of_a_producers_own_schema_resolves() -> None:
    writer = copy.deepcopy(load_offline_schema())
    writer["name"], writer["namespace"] = "Conversion", "com.example.shop"
    writer["fields"] = [f for f in writer["fields"] if f["name"] not in ("shop_id", "contents")]
    record = {k: v for k, v in fixture("offline_event.json").items() if k not in ("shop_id", "contents")}
    store = SchemaStore()
    entry = store.add(8, orjson.dumps(writer))
    assert entry.kind == "offline" and entry.reader is not None
    ev = outcome(resolver(store=store), confluent(8, avro(writer, record)))
    assert isinstance(ev, OfflineEvent) and ev.shop_id is None and ev.event_time == record["event_time"] // 1000


def test_confluent_membership_avro_stays_membership() -> None:
    store = SchemaStore()
    assert store.add(9, orjson.dumps(load_canonical_schema())).kind == "membership"
    out = outcome(resolver(store=store), confluent(9, avro(load_canonical_schema(), membership())))
    assert isinstance(out, AudienceChange)


def test_an_offline_writer_schema_missing_required_fields_is_refused() -> None:
    writer = copy.deepcopy(load_offline_schema())
    writer["fields"] = [f for f in writer["fields"] if f["name"] != "event"]
    with pytest.raises(SchemaError, match="event of the offline event"):
        SchemaStore().add(10, orjson.dumps(writer))


# -- the mappings file section ---------------------------------------------------------------------------------


def test_offline_section_is_parsed() -> None:
    m = mappings(
        {
            "default_event_set_id": 7000000000000000009,
            "event_sets": {ADVERTISER: EVENT_SET},
            "event_names": {"Lead Captured": "Lead", "Product Viewed": None},
            "match_keys": ["email", "phone"],
        }
    )
    assert m.offline is not None
    assert m.offline.default_event_set_id == DEFAULT_SET
    assert dict(m.offline.event_set_ids) == {ADVERTISER: EVENT_SET}
    assert m.offline.event_map["Lead Captured"] == "Lead" and "Product Viewed" not in m.offline.event_map
    assert m.offline.event_map["Order Completed"] == "CompletePayment"  # defaults kept
    assert m.offline.enabled_keys == frozenset({"email", "phone"})
    assert mappings(None).offline is None


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"default_event_set_id": "abc"}, "offline_events.default_event_set_id"),
        ({"event_sets": {ADVERTISER: "x1"}}, f"offline_events.event_sets.{ADVERTISER}"),
        ({"event_sets": {"adv": EVENT_SET}}, "offline_events.event_sets: advertiser id"),
        ({"event_names": {"Order Completed": "Bought"}}, "offline_events.event_names"),
        ({"match_keys": ["email", "shoe_size"]}, "offline_events.match_keys: unknown key 'shoe_size'"),
        ({"match_keys": []}, "offline_events.match_keys"),
        ({"event_set": EVENT_SET}, "offline_events: unknown field(s) event_set"),
        ([1], "offline_events: must be a mapping"),
    ],
)
def test_offline_section_errors_name_file_and_field(section: Any, message: str) -> None:
    with pytest.raises(MappingsError, match=r"m\.yaml") as info:
        mappings(section)
    assert message in str(info.value)
