"""Format detection and decoding: JSON, schemaless Avro, Confluent wire format, and every way bytes go wrong."""

from __future__ import annotations

import copy
import io
import struct
from typing import Any

import fastavro
import orjson
import pytest

from service.core.events import (
    CANONICAL_AVRO,
    CANONICAL_JSON,
    CONFLUENT_AVRO,
    SEGMENT,
    UNKNOWN,
    Event,
    Undecodable,
    decode_event,
)
from service.core.schemas import (
    CANONICAL_JSON_SCHEMA_PATH,
    SchemaError,
    SchemaNotLoaded,
    SchemaStore,
    load_canonical_schema,
)

RECORD: dict[str, Any] = {
    "audience_key": "high_value_customers",
    "action": "add",
    "event_id": "evt-1",
    "event_time": 1714990272345,
    "user_id": "u-42",
    "audience_id": "1234567",
    "advertiser_id": "7654321098765432109",
    "email": "jane@example.com",
    "phone": None,
    "idfa": None,
    "aaid": None,
}


def avro(record: dict[str, Any], schema: dict[str, Any] | None = None) -> bytes:
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, fastavro.parse_schema(copy.deepcopy(schema or load_canonical_schema())), record)
    return buf.getvalue()


def confluent(schema_id: int, body: bytes) -> bytes:
    return b"\x00" + struct.pack(">I", schema_id) + body


def decoded(value: bytes | None, headers: Any = None, store: SchemaStore | None = None, **kw: Any) -> Event:
    result = decode_event(value, headers, store if store is not None else SchemaStore(), **kw)
    assert isinstance(result, Event), result
    return result


def undecodable(value: bytes | None, headers: Any = None, store: SchemaStore | None = None, **kw: Any) -> str:
    result = decode_event(value, headers, store if store is not None else SchemaStore(), **kw)
    assert isinstance(result, Undecodable), result
    return result.error


# -- schema files ---------------------------------------------------------------------------------------------


def test_canonical_schema_shape() -> None:
    schema = load_canonical_schema()
    assert schema["name"] == "AudienceMembershipEvent"
    assert schema["namespace"] == "tiktok_audience_sync"
    names = [f["name"] for f in schema["fields"]]
    assert names == [
        "audience_key",
        "action",
        "event_id",
        "event_time",
        "user_id",
        "audience_id",
        "advertiser_id",
        "email",
        "phone",
        "idfa",
        "aaid",
    ]
    assert schema["fields"][0]["type"] == "string"
    assert schema["fields"][1]["type"]["symbols"] == ["add", "delete"]
    for field in schema["fields"][2:]:
        assert field["type"][0] == "null" and field["default"] is None
    assert "0x00" in schema["doc"]


def test_json_schema_matches_avro_fields() -> None:
    json_schema = orjson.loads(CANONICAL_JSON_SCHEMA_PATH.read_bytes())
    avro_names = {f["name"] for f in load_canonical_schema()["fields"]}
    assert set(json_schema["properties"]) == avro_names
    assert json_schema["required"] == ["audience_key", "action"]


@pytest.mark.parametrize("key_length", [1, 5, 16, 63, 64, 65, 200, 5000])
def test_schemaless_avro_never_starts_with_zero_or_brace(key_length: int) -> None:
    body = avro({"audience_key": "k" * key_length, "action": "delete"})
    assert body[0] not in (0x00, 0x7B)


# -- JSON -----------------------------------------------------------------------------------------------------


def test_segment_json() -> None:
    event = decoded(b'{"type": "track", "event": "Audience Entered"}')
    assert event.format == SEGMENT
    assert event.data["event"] == "Audience Entered"


def test_canonical_json() -> None:
    event = decoded(orjson.dumps(RECORD))
    assert event.format == CANONICAL_JSON
    assert event.data == RECORD


@pytest.mark.parametrize("prefix", [b" ", b"\n", b"\r\n\t ", b"\xef\xbb\xbf", b"\xef\xbb\xbf  "])
def test_json_after_whitespace_or_bom(prefix: bytes) -> None:
    assert decoded(prefix + orjson.dumps(RECORD)).format == CANONICAL_JSON


def test_json_array_is_sniffed_as_json() -> None:
    assert undecodable(b'[{"type": "track"}]') == "JSON value is an array, expected an object"


def test_json_object_of_neither_kind() -> None:
    assert "neither a Segment event" in undecodable(b'{"hello": "world"}')


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        (b"[1, 2]", "JSON value is an array"),
        (b'"str"', "JSON value is a string"),
        (b"42", "JSON value is a number"),
        (b"null", "JSON value is null"),
        (b"true", "JSON value is a boolean"),
        (b'{"type": "track",}', "invalid JSON"),
        (b'{"type": "track"} trailing', "invalid JSON: unexpected content after document"),
        (b'{"email": "jane@\xff\xfe.com"}', "invalid JSON"),
        (b'{"a": ' * 10000 + b"1" + b"}" * 10000, "invalid JSON"),
        (b"[" * 10000 + b"]" * 10000, "invalid JSON"),
        (b"{", "invalid JSON"),
    ],
)
def test_bad_json(value: bytes, fragment: str) -> None:
    # Content type forces JSON for the non-"{" ones; sniffing would call them Avro.
    error = undecodable(value, [("content-type", b"application/json")])
    assert fragment in error
    assert "jane" not in error


def test_json_errors_do_not_echo_payload() -> None:
    error = undecodable(b'{"email": jane.secret@example.com}')
    assert "jane" not in error and "secret" not in error
    assert error.startswith("invalid JSON")


# -- content-type ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["content-type", "Content-Type", "CONTENT-TYPE"])
@pytest.mark.parametrize(
    "value",
    [b"application/json", b"application/json; charset=utf-8", b"application/vnd.segment+json", b"Application/JSON"],
)
def test_json_content_type(key: str, value: bytes) -> None:
    assert decoded(orjson.dumps(RECORD), [("other", b"x"), (key, value)]).format == CANONICAL_JSON


@pytest.mark.parametrize("value", [b"avro/binary", b"application/avro", b"application/vnd.confluent.avro"])
def test_avro_content_type_with_confluent_framing(value: bytes) -> None:
    store = SchemaStore()
    store.add(7, load_canonical_schema())
    assert decoded(confluent(7, avro(RECORD)), [("content-type", value)], store).format == CONFLUENT_AVRO


@pytest.mark.parametrize("value", [b"avro/binary", b"application/avro"])
def test_avro_content_type_schemaless(value: bytes) -> None:
    assert decoded(avro(RECORD), [("content-type", value)]).format == CANONICAL_AVRO


def test_content_type_wins_over_sniffing() -> None:
    # Looks like JSON, but the header says Avro: decoded (and rejected) as Avro.
    error = undecodable(orjson.dumps(RECORD), [("content-type", b"avro/binary")])
    assert error.startswith("schemaless Avro")
    # Looks like Avro, header says JSON.
    assert undecodable(avro(RECORD), [("content-type", b"application/json")]).startswith("invalid JSON")


def test_confluent_content_type_without_magic_byte() -> None:
    error = undecodable(avro(RECORD), [("content-type", b"application/vnd.confluent.avro")])
    assert "magic" in error


def test_unknown_content_type_and_null_header_fall_back_to_sniffing() -> None:
    headers = [("content-type", None), ("content-type", b"text/plain")]
    assert decoded(orjson.dumps(RECORD), headers).format == CANONICAL_JSON
    assert decoded(avro(RECORD), [("content-type", b"application/octet-stream")]).format == CANONICAL_AVRO


# -- schemaless Avro ------------------------------------------------------------------------------------------


def test_schemaless_avro_roundtrip() -> None:
    event = decoded(avro(RECORD))
    assert event.format == CANONICAL_AVRO
    assert event.data == RECORD  # event_time stays int ms (no datetime detour)


def test_schemaless_avro_key_starting_with_whitespace_byte() -> None:
    # A 16-character key encodes its length as 0x20 (a space): the JSON sniff must not claim it.
    record = dict(RECORD, audience_key="{" * 16)
    body = avro(record)
    assert body[0] == 0x20
    event = decoded(body)
    assert event.format == CANONICAL_AVRO
    assert event.data["audience_key"] == "{" * 16


def test_truncated_avro_at_every_length() -> None:
    body = avro(RECORD)
    for cut in range(1, len(body)):
        result = decode_event(body[:cut], None, SchemaStore())
        assert isinstance(result, Undecodable), cut
        assert "jane" not in result.error


def test_trailing_garbage() -> None:
    assert "3 trailing byte(s)" in undecodable(avro(RECORD) + b"abc")


def test_invalid_utf8_in_avro_string() -> None:
    body = avro(dict(RECORD, audience_key="ab"))
    bad = body[:1] + b"\xff\xfe" + body[3:]
    error = undecodable(bad)
    assert error == "schemaless Avro: Avro string is not valid UTF-8"


def test_bad_enum_index() -> None:
    body = bytearray(avro({"audience_key": "k", "action": "add"}))
    body[2] = 0x08  # enum index 4
    assert "truncated or corrupt" in undecodable(bytes(body))


# -- Confluent wire format ------------------------------------------------------------------------------------


def test_confluent_with_bundled_schema_skips_resolution() -> None:
    store = SchemaStore()
    entry = store.add(1, orjson.dumps(load_canonical_schema()).decode())
    assert entry.reader is None
    event = decoded(confluent(1, avro(RECORD)), store=store)
    assert event.format == CONFLUENT_AVRO
    assert event.data == RECORD


def test_confluent_newer_writer_with_extra_field_and_other_names() -> None:
    writer = copy.deepcopy(load_canonical_schema())
    writer["name"] = "AudienceMembership"
    writer["namespace"] = "com.acme.cdp"
    writer["fields"][1]["type"]["name"] = "MembershipAction"
    writer["fields"].append({"name": "source_system", "type": "string"})
    store = SchemaStore()
    assert store.add(2, writer).reader is not None
    event = decoded(confluent(2, avro(dict(RECORD, source_system="warehouse"), writer)), store=store)
    assert "source_system" not in event.data
    assert event.data["audience_key"] == "high_value_customers"
    assert event.data["action"] == "add"
    assert event.data["email"] == "jane@example.com"


def test_confluent_older_writer_missing_optional_fields() -> None:
    writer = {
        "type": "record",
        "name": "AudienceMembershipEvent",
        "namespace": "tiktok_audience_sync",
        "fields": [
            {"name": "audience_key", "type": "string"},
            {"name": "action", "type": {"type": "enum", "name": "Action", "symbols": ["add", "delete"]}},
            {"name": "email", "type": "string"},  # v1: required, resolves into ["null", "string"]
        ],
    }
    store = SchemaStore()
    store.add(3, writer)
    event = decoded(
        confluent(3, avro({"audience_key": "k", "action": "delete", "email": "a@b.co"}, writer)), store=store
    )
    assert event.data["action"] == "delete"
    assert event.data["email"] == "a@b.co"
    assert event.data["phone"] is None and event.data["audience_id"] is None


def test_confluent_incompatible_writer() -> None:
    writer = {
        "type": "record",
        "name": "X",
        "fields": [{"name": "audience_key", "type": "string"}, {"name": "action", "type": "int"}],
    }
    store = SchemaStore()
    store.add(4, writer)
    error = undecodable(confluent(4, avro({"audience_key": "k", "action": 1}, writer)), store=store)
    assert error == "schema id 4: writer schema does not resolve to the canonical event schema"


def test_schema_not_loaded_is_raised() -> None:
    with pytest.raises(SchemaNotLoaded) as info:
        decode_event(confluent(99, avro(RECORD)), None, SchemaStore())
    assert info.value.schema_id == 99


def test_unknown_schema_id_is_rejected_until_the_mark_expires() -> None:
    now = [1000.0]
    store = SchemaStore(unknown_ttl_s=60, clock=lambda: now[0])
    store.mark_unknown(99)
    assert undecodable(confluent(99, avro(RECORD)), store=store) == "unknown schema id 99"
    now[0] += 61
    with pytest.raises(SchemaNotLoaded):
        decode_event(confluent(99, avro(RECORD)), None, store)


def test_confluent_short_header_and_corrupt_body() -> None:
    store = SchemaStore()
    store.add(1, load_canonical_schema())
    assert "5-byte header" in undecodable(b"\x00\x00\x00", store=store)
    assert "schema id 1: truncated" in undecodable(confluent(1, avro(RECORD)[:-3]), store=store)
    assert "trailing" in undecodable(confluent(1, avro(RECORD) + b"\x00"), store=store)


@pytest.mark.parametrize(
    "schema",
    [
        "not json",
        '"string"',
        '{"type": "record", "name": "X", "fields": [{"name": "audience_key", "type": "string"}]}',
        '{"type": "record", "name": "X", "fields": '
        '[{"name": "audience_key", "type": "strin"}, {"name": "action", "type": "string"}]}',
    ],
)
def test_unusable_writer_schemas_raise_schema_error(schema: str) -> None:
    with pytest.raises(SchemaError, match="schema id 5"):
        SchemaStore().add(5, schema)


# -- size and emptiness ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [None, b""])
def test_null_or_empty(value: bytes | None) -> None:
    assert "empty" in undecodable(value)


def test_oversized_record_is_not_parsed() -> None:
    big = b'{"type": "track", "pad": "' + b"x" * 2000 + b'"}'
    assert "over the 1000-byte limit" in undecodable(big, max_bytes=1000)
    assert decoded(big, max_bytes=len(big)).format == SEGMENT


def test_unknown_format_label_for_undecodable_json() -> None:
    result = decode_event(b"[]", [("content-type", b"application/json")], SchemaStore())
    assert isinstance(result, Undecodable) and result.format == UNKNOWN
