"""Per-record format detection and decoding: bytes + headers → a JSON-like dict, or a reason it is not one.

Detection is per record, because one topic may carry several producers. A `content-type` header wins;
otherwise the first byte decides: 0x00 is the Confluent magic byte, `{` is JSON, anything else is schemaless
Avro. The canonical schema keeps a non-empty string first, so schemaless Avro never starts with 0x00 or `{`;
the offline-event schema keeps the boolean `offline_event` (always true) first, so a schemaless offline record
starts with 0x01, which no membership record (the even length of a non-empty string) starts with.
Error texts describe the problem and never echo payload bytes (they end up in `dlq.error`).
"""

from __future__ import annotations

from dataclasses import dataclass
from io import BytesIO
from typing import Any, Final, NamedTuple

import orjson
from fastavro import schemaless_reader
from fastavro.read import SchemaResolutionError

from service.core.schemas import OFFLINE, SchemaNotLoaded, SchemaStore
from service.core.types import new_tuple

SEGMENT: Final = "segment"
CANONICAL_JSON: Final = "canonical_json"
CANONICAL_AVRO: Final = "canonical_avro"
CONFLUENT_AVRO: Final = "confluent_avro"
UNKNOWN: Final = "unknown"

DEFAULT_MAX_RECORD_BYTES: Final = 1_048_576

_BOM: Final = b"\xef\xbb\xbf"
_JSON_WS: Final = b" \t\r\n"

# Parsed content types (media type only, lower case) → how to decode.
_JSON, _AVRO, _CONFLUENT = 1, 2, 3
_CONTENT_TYPES: Final[dict[str, int]] = {
    "application/json": _JSON,
    "text/json": _JSON,
    "application/vnd.segment+json": _JSON,
    "avro/binary": _AVRO,
    "application/avro": _AVRO,
    "application/x-avro": _AVRO,
    "application/x-avro-binary": _AVRO,
    "application/vnd.apache.avro+binary": _AVRO,
    "application/vnd.confluent.avro": _CONFLUENT,
}

_JSON_TYPE_NAMES: Final[dict[type, str]] = {
    list: "an array",
    str: "a string",
    int: "a number",
    float: "a number",
    bool: "a boolean",
    type(None): "null",
}


class Event(NamedTuple):
    """A decoded record: `data` is a dict as JSON would give it (Avro records decode to the same shape).

    A NamedTuple, not a frozen dataclass: one is made per record, and a frozen dataclass's `__init__` costs
    several times a tuple's.
    """

    format: str
    data: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Undecodable:
    """A record that is not an event in any supported format: dead-lettered as `invalid_payload`."""

    format: str
    error: str


def _content_kind(headers: list[tuple[str, bytes | None]]) -> int | None:
    for key, value in headers:
        if value is not None and key.lower() == "content-type":
            media_type = value.split(b";", 1)[0].strip().lower().decode("latin-1")
            kind = _CONTENT_TYPES.get(media_type)
            if kind is None and media_type.endswith("+json"):
                kind = _JSON
            return kind  # unrecognised content type: fall back to sniffing the first byte
    return None


def decode_event(
    value: bytes | None,
    headers: list[tuple[str, bytes | None]] | None,
    schemas: SchemaStore,
    max_bytes: int = DEFAULT_MAX_RECORD_BYTES,
) -> Event | Undecodable:
    """Decode one record; raises only `SchemaNotLoaded` (fetch the writer schema, then retry the record)."""
    if not value:
        return Undecodable(UNKNOWN, "record value is empty (null or zero bytes)")
    size = len(value)
    if size > max_bytes:
        return Undecodable(UNKNOWN, f"record value is {size} bytes, over the {max_bytes}-byte limit")
    kind = _content_kind(headers) if headers else None
    first = value[0]
    if kind == _JSON:
        return _decode_json(value)
    if kind == _CONFLUENT or first == 0:
        return _decode_confluent(value, schemas)
    if kind == _AVRO:
        return _decode_schemaless(value, schemas)
    if first == 0x7B or first == 0x5B:  # "{", or "[" (odd: never a first Avro byte) for a clearer error
        return _decode_json(value)
    if first in _JSON_WS or first == 0xEF:
        stripped = value[3:] if value.startswith(_BOM) else value
        if stripped.lstrip(_JSON_WS)[:1] == b"{":
            event = _decode_json(value)
            # A space (0x20) or newline (0x0A) is also a valid first Avro byte (key length 16 or 5).
            if isinstance(event, Undecodable) and first in b" \n":
                avro = _decode_schemaless(value, schemas)
                if isinstance(avro, Event):
                    return avro
            return event
    return _decode_schemaless(value, schemas)


def _decode_json(value: bytes) -> Event | Undecodable:
    if value.startswith(_BOM):
        value = value[3:]
    try:
        data = orjson.loads(value)
    except orjson.JSONDecodeError as exc:  # also orjson's depth limit; its messages never quote the input
        return Undecodable(UNKNOWN, f"invalid JSON: {exc.msg} (at byte {exc.pos})")
    if type(data) is not dict:
        kind = _JSON_TYPE_NAMES.get(type(data), type(data).__name__)
        return Undecodable(UNKNOWN, f"JSON value is {kind}, expected an object")
    if "type" in data:
        return new_tuple(Event, (SEGMENT, data))
    if "audience_key" in data or "action" in data or "offline_event" in data:
        return new_tuple(Event, (CANONICAL_JSON, data))  # membership or offline: the resolver tells them apart
    return Undecodable(
        UNKNOWN,
        'JSON object is neither a Segment event (no "type") nor a canonical event (no "audience_key", '
        'no "offline_event")',
    )


def _read_avro(value: bytes, offset: int, writer: Any, reader: Any | None, fmt: str, what: str) -> Event | Undecodable:
    fo = BytesIO(value)
    if offset:
        fo.seek(offset)
    try:
        data = schemaless_reader(fo, writer, reader)
    except (EOFError, IndexError):
        return Undecodable(fmt, f"{what}: truncated or corrupt Avro body")
    except UnicodeDecodeError:
        return Undecodable(fmt, f"{what}: Avro string is not valid UTF-8")
    except SchemaResolutionError:
        return Undecodable(fmt, f"{what}: writer schema does not resolve to the canonical event schema")
    except Exception as exc:  # fastavro raises assorted types for corrupt input
        return Undecodable(fmt, f"{what}: Avro body does not decode ({type(exc).__name__})")
    trailing = len(value) - fo.tell()
    if trailing:
        return Undecodable(fmt, f"{what}: {trailing} trailing byte(s) after the Avro record")
    if type(data) is not dict:
        return Undecodable(fmt, f"{what}: Avro value is not a record")
    return Event(fmt, data)


def _decode_schemaless(value: bytes, schemas: SchemaStore) -> Event | Undecodable:
    if value[0] == 0x01:  # `offline_event: true`, the offline schema's first field (module docstring)
        return _read_avro(value, 0, schemas.offline_decode_schema, None, CANONICAL_AVRO, "schemaless offline Avro")
    return _read_avro(value, 0, schemas.decode_schema, None, CANONICAL_AVRO, "schemaless Avro")


def _decode_confluent(value: bytes, schemas: SchemaStore) -> Event | Undecodable:
    if value[0] != 0:
        return Undecodable(CONFLUENT_AVRO, "content-type is Confluent Avro but the first byte is not the magic 0")
    if len(value) < 5:
        return Undecodable(CONFLUENT_AVRO, "Confluent Avro record shorter than its 5-byte header")
    schema_id = int.from_bytes(value[1:5], "big")
    entry = schemas.get(schema_id)
    if entry is None:
        reason = schemas.unknown_reason(schema_id)
        if reason is not None:
            return Undecodable(CONFLUENT_AVRO, reason)
        raise SchemaNotLoaded(schema_id)
    if entry.reader is None:  # canonical layout: no resolution, and event_time stays int ms
        layout = schemas.offline_decode_schema if entry.kind == OFFLINE else schemas.decode_schema
        return _read_avro(value, 5, layout, None, CONFLUENT_AVRO, f"schema id {schema_id}")
    return _read_avro(value, 5, entry.writer, entry.reader, CONFLUENT_AVRO, f"schema id {schema_id}")
