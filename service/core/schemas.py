"""The bundled canonical event schema, and a cache of Confluent writer schemas by schema id.

The cache is filled by the I/O edge (`service.kafka.schema_registry`); decoding itself never does I/O, it raises
`SchemaNotLoaded` so the edge can fetch the schema and retry the record.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Final

import fastavro
import orjson
from fastavro.schema import to_parsing_canonical_form

SCHEMAS_DIR: Final[Path] = Path(__file__).resolve().parents[2] / "schemas"
CANONICAL_AVRO_PATH: Final[Path] = SCHEMAS_DIR / "audience_membership.avsc"
CANONICAL_JSON_SCHEMA_PATH: Final[Path] = SCHEMAS_DIR / "audience_membership.json"
# The offline conversion event (service/core/offline.py): first field `offline_event`, always true.
OFFLINE_AVRO_PATH: Final[Path] = SCHEMAS_DIR / "offline_event.avsc"
OFFLINE_JSON_SCHEMA_PATH: Final[Path] = SCHEMAS_DIR / "offline_event.json"

# Fields a writer schema must have: without them no record it writes can be resolved.
_REQUIRED_FIELDS: Final[tuple[str, ...]] = ("audience_key", "action")
# ... or, for an offline-event writer schema (recognised by its `offline_event` field).
_OFFLINE_REQUIRED_FIELDS: Final[tuple[str, ...]] = ("offline_event", "event", "event_time")

MEMBERSHIP: Final = "membership"
OFFLINE: Final = "offline"


class SchemaNotLoaded(Exception):
    """The record names a Confluent schema id that is not cached yet: fetch it, then retry the record."""

    def __init__(self, schema_id: int) -> None:
        super().__init__(f"Avro schema id {schema_id} is not loaded yet")
        self.schema_id = schema_id


class SchemaError(ValueError):
    """A writer schema that can never decode into the canonical event (so its records are dead-lettered)."""


@lru_cache(maxsize=1)
def load_canonical_schema() -> dict[str, Any]:
    """The bundled `.avsc` as plain JSON data (fresh parse once; callers must not mutate it)."""
    data: dict[str, Any] = orjson.loads(CANONICAL_AVRO_PATH.read_bytes())
    return data


@lru_cache(maxsize=1)
def load_offline_schema() -> dict[str, Any]:
    """The bundled offline-event `.avsc` as plain JSON data (fresh parse once; callers must not mutate it)."""
    data: dict[str, Any] = orjson.loads(OFFLINE_AVRO_PATH.read_bytes())
    return data


def _strip_logical_types(schema: dict[str, Any]) -> dict[str, Any]:
    """Same binary layout without logical types: `event_time` decodes to int ms, no datetime detour."""

    def strip(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: strip(v) for k, v in node.items() if k != "logicalType"}
        if isinstance(node, list):
            return [strip(v) for v in node]
        return node

    result: dict[str, Any] = strip(schema)
    return result


def _full_name(node: Mapping[str, Any], namespace: str | None) -> str:
    name = str(node.get("name", ""))
    if "." in name:
        return name
    ns = node.get("namespace", namespace)
    return f"{ns}.{name}" if ns else name


def _enum_branch(field_type: Any) -> Mapping[str, Any] | None:
    """The enum definition inside a field type (possibly a union), if any."""
    branches = field_type if isinstance(field_type, list) else [field_type]
    for branch in branches:
        if isinstance(branch, Mapping) and branch.get("type") == "enum":
            return branch
    return None


@dataclass(frozen=True, slots=True)
class WriterSchema:
    """A cached Confluent writer schema, ready for `fastavro.schemaless_reader(fo, writer, reader)`.

    `reader` is None when the writer has the canonical binary layout: no resolution (about 2x faster).
    `kind` is "membership" (resolved against the membership schema) or "offline" (against the offline schema).
    """

    schema_id: int
    writer: Any
    reader: Any | None
    kind: str = MEMBERSHIP


class SchemaStore:
    """Writer schemas by Confluent schema id, plus ids the registry does not know.

    "Unknown" marks expire after `unknown_ttl_s` so a fixed registry (or a replay after fixing
    SCHEMA_REGISTRY_URL) does not need a restart.
    """

    def __init__(
        self,
        *,
        unknown_ttl_s: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.canonical: Final[dict[str, Any]] = copy.deepcopy(load_canonical_schema())
        self.canonical_parsed: Final[Any] = fastavro.parse_schema(copy.deepcopy(self.canonical))
        # Schemaless records and identical-layout Confluent records decode with this one.
        self.decode_schema: Final[Any] = fastavro.parse_schema(_strip_logical_types(self.canonical))
        self._canonical_form = to_parsing_canonical_form(self.canonical_parsed)
        self._record_name = _full_name(self.canonical, None)
        # Offline events: schemaless records starting with 0x01 and identical-layout Confluent ones.
        self.offline: Final[dict[str, Any]] = copy.deepcopy(load_offline_schema())
        self.offline_decode_schema: Final[Any] = fastavro.parse_schema(_strip_logical_types(self.offline))
        self._offline_form = to_parsing_canonical_form(fastavro.parse_schema(copy.deepcopy(self.offline)))
        self._offline_name = _full_name(self.offline, None)
        self._schemas: dict[int, WriterSchema] = {}
        self._unknown: dict[int, tuple[str, float]] = {}
        self._unknown_ttl_s = unknown_ttl_s
        self._clock = clock

    def get(self, schema_id: int) -> WriterSchema | None:
        return self._schemas.get(schema_id)

    def unknown_reason(self, schema_id: int) -> str | None:
        """Why the id cannot be used, if it was marked unknown and the mark has not expired."""
        entry = self._unknown.get(schema_id)
        if entry is None:
            return None
        reason, expires = entry
        if self._clock() >= expires:
            del self._unknown[schema_id]
            return None
        return reason

    def mark_unknown(self, schema_id: int, reason: str | None = None) -> None:
        self._unknown[schema_id] = (
            reason or f"unknown schema id {schema_id}",
            self._clock() + self._unknown_ttl_s,
        )

    def add(self, schema_id: int, schema: str | bytes | Mapping[str, Any]) -> WriterSchema:
        """Parse and cache a writer schema; raises `SchemaError` if it cannot decode canonical events.

        A schema with an `offline_event` field is an offline-event schema, resolved against the offline one.
        """
        try:
            raw: Any = orjson.loads(schema) if isinstance(schema, str | bytes) else copy.deepcopy(schema)
        except orjson.JSONDecodeError as exc:
            raise SchemaError(f"schema id {schema_id} is not valid JSON: {exc.msg}") from None
        if not isinstance(raw, dict) or raw.get("type") != "record":
            raise SchemaError(f"schema id {schema_id} is not an Avro record schema")
        fields = raw.get("fields")
        names = {f.get("name") for f in fields if isinstance(f, dict)} if isinstance(fields, list) else set()
        kind = OFFLINE if "offline_event" in names else MEMBERSHIP
        required = _OFFLINE_REQUIRED_FIELDS if kind == OFFLINE else _REQUIRED_FIELDS
        missing = [f for f in required if f not in names]
        if missing:
            what = "offline event" if kind == OFFLINE else "canonical event"
            raise SchemaError(f"schema id {schema_id} has no field {', '.join(missing)} of the {what}")
        try:
            writer = fastavro.parse_schema(copy.deepcopy(raw))
        except Exception as exc:  # fastavro raises several types for bad schemas
            raise SchemaError(f"schema id {schema_id} is not a valid Avro schema: {exc}") from None
        reader = None
        form = to_parsing_canonical_form(writer)
        if kind == OFFLINE:
            if form != self._offline_form:
                reader = self._offline_reader_for(raw)
        elif form != self._canonical_form:
            reader = self._reader_for(raw)
        entry = WriterSchema(schema_id, writer, reader, kind)
        self._schemas[schema_id] = entry
        self._unknown.pop(schema_id, None)
        return entry

    def _reader_for(self, writer: dict[str, Any]) -> Any:
        """Canonical reader schema with aliases for the writer's record and enum names.

        Resolution then goes by field name only: producers may name their record after their own package.
        """
        reader = copy.deepcopy(self.canonical)
        writer_name = _full_name(writer, None)
        if writer_name != self._record_name:
            reader["aliases"] = [writer_name]
        writer_ns = writer_name.rpartition(".")[0] or None
        for field in writer["fields"]:
            if isinstance(field, dict) and field.get("name") == "action":
                enum = _enum_branch(field.get("type"))
                if enum is not None:
                    for reader_field in reader["fields"]:
                        if reader_field["name"] == "action":
                            reader_field["type"]["aliases"] = [_full_name(enum, writer_ns)]
        return fastavro.parse_schema(reader)

    def _offline_reader_for(self, writer: dict[str, Any]) -> Any:
        """The offline reader schema (logical types stripped: times stay int ms), aliased to the writer's name."""
        reader = _strip_logical_types(self.offline)
        writer_name = _full_name(writer, None)
        if writer_name != self._offline_name:
            reader["aliases"] = [writer_name]
        return fastavro.parse_schema(reader)

    def __contains__(self, schema_id: object) -> bool:
        return schema_id in self._schemas

    def __len__(self) -> int:
        return len(self._schemas)
