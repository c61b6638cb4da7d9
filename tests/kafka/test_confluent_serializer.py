"""Confluent's own Avro encoding, decoded by the service.

The records here are framed by confluent-kafka's `AvroSerializer` (the code Confluent's own producers run),
with the canonical schema of schemas/audience_membership.avsc, against Confluent's `mock://` registry client and
against its real HTTP client talking to a registry stand-in on 127.0.0.1. The bytes then go through the
service's own path: the schema id read from the frame, the writer schema put in a `SchemaStore` (taken from
the registry Confluent registered it with, or fetched by `fetch_schema` over HTTP), `decode_event`, and
`Resolver.process` down to the `AudienceChange`. So the wire format is checked against Confluent's code, not
only against the framing the other tests write themselves.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import struct
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroSerializer
from confluent_kafka.serialization import MessageField, SerializationContext

from service.core.events import CONFLUENT_AVRO, Event, decode_event
from service.core.mappings import parse_mappings
from service.core.membership import Resolver, ResolverSettings
from service.core.model import Action, AudienceChange
from service.core.schemas import CANONICAL_AVRO_PATH, SchemaNotLoaded, SchemaStore
from service.kafka.schema_registry import fetch_schema
from tests.core.test_events import avro, confluent

AVSC_PATH = Path(__file__).resolve().parents[2] / "schemas" / "audience_membership.avsc"
AVSC = AVSC_PATH.read_text()
TOPIC = "audience-membership"
SUBJECT = f"{TOPIC}-value"  # Confluent's default TopicNameStrategy
ADVERTISER = "7654321098765432109"
MAPPINGS = parse_mappings(
    {"audiences": {"high_value_customers": {"advertiser_id": ADVERTISER, "audience_id": "1234567"}}},
    "/etc/audience-sync/mappings.yaml",
)


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def canonical(**fields: Any) -> dict[str, Any]:
    """A full canonical record (every optional field present, as a typed producer writes it)."""
    record: dict[str, Any] = {
        "audience_key": "high_value_customers",
        "action": "add",
        "event_id": None,
        "event_time": None,
        "user_id": None,
        "audience_id": None,
        "advertiser_id": None,
        "email": None,
        "phone": None,
        "idfa": None,
        "aaid": None,
    }
    record.update(fields)
    return record


HASHED_EMAIL = sha("hashed@example.com").upper()
WHEN = datetime(2026, 11, 22, 1, 30, 0, 123000, tzinfo=UTC)
WHEN_MS = (WHEN - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(
    milliseconds=1
)  # 64 hex characters pass through, lower-cased

# (record as a Confluent producer hands it to AvroSerializer, the AudienceChange the service must resolve)
CASES: dict[str, tuple[dict[str, Any], AudienceChange]] = {
    "mapped add, every identifier, event_time as epoch ms": (
        canonical(
            event_id="evt-1",
            event_time=1714990272345,
            user_id="u-42",
            email="  Testing@Testing.com ",
            phone="+15555555555",
            idfa="5F3A2B18-9C4D-4E7F-B8E2-17D3A1E69B25",
        ),
        AudienceChange(
            ADVERTISER,
            "1234567",
            Action.ADD,
            (
                ("EMAIL_SHA256", sha("testing@testing.com")),
                ("PHONE_SHA256", sha("+15555555555")),
                ("IDFA_SHA256", sha("5f3a2b18-9c4d-4e7f-b8e2-17d3a1e69b25")),
            ),
            "high_value_customers",
            1714990272345,
        ),
    ),
    "explicit ids, delete, event_time as an aware datetime": (
        canonical(
            audience_key="churned",
            action="delete",
            event_time=WHEN,
            audience_id="1100000042",
            advertiser_id="7000000000000000001",
            phone="+44 20 7946 0018",
        ),
        AudienceChange(
            "7000000000000000001",
            "1100000042",
            Action.DELETE,
            (("PHONE_SHA256", sha("+442079460018")),),
            "churned",
            WHEN_MS,
        ),
    ),
    "pre-hashed email and an AAID, no event_time": (
        canonical(email=HASHED_EMAIL, aaid="CDDA802E-FB9C-47AD-9866-0794D394C912", user_id="ü-ser/ñ"),
        AudienceChange(
            ADVERTISER,
            "1234567",
            Action.ADD,
            (
                ("EMAIL_SHA256", HASHED_EMAIL.lower()),
                ("AAID_SHA256", sha("cdda802e-fb9c-47ad-9866-0794d394c912")),
            ),
            "high_value_customers",
            None,
        ),
    ),
}


def resolver(store: SchemaStore) -> Resolver:
    return Resolver(ResolverSettings(), MAPPINGS, store)


def frame(value: bytes) -> tuple[int, bytes]:
    """Confluent wire format: magic byte 0, the schema id as a 4-byte big-endian integer, the Avro body."""
    assert value[0] == 0, "magic byte"
    (schema_id,) = struct.unpack(">I", value[1:5])
    return schema_id, value[5:]


def serialize(serializer: AvroSerializer, record: dict[str, Any]) -> bytes:
    value = serializer(record, SerializationContext(TOPIC, MessageField.VALUE))
    assert isinstance(value, bytes)
    return value


def test_the_schema_file_is_the_one_the_service_bundles() -> None:
    assert orjson.loads(AVSC) == orjson.loads(CANONICAL_AVRO_PATH.read_bytes())


@pytest.mark.parametrize("case", list(CASES))
def test_confluent_serializer_output_resolves_to_the_audience_change(case: str) -> None:
    record, want = CASES[case]
    registry = SchemaRegistryClient.new_client({"url": "mock://"})
    value = serialize(AvroSerializer(registry, AVSC), record)

    schema_id, body = frame(value)
    registered = registry.get_latest_version(SUBJECT)  # auto-registered under the topic's value subject
    assert registered.schema_id == schema_id
    # The Avro body is plain schemaless Avro of the canonical schema: the same bytes as the tests' own encoder.
    assert value == confluent(schema_id, avro(record))
    assert body == avro(record)

    store = SchemaStore()
    with pytest.raises(SchemaNotLoaded) as info:  # the service asks for the id Confluent wrote
        resolver(store).process(value, None)
    assert info.value.schema_id == schema_id
    schema_str = registry.get_schema(schema_id).schema_str
    assert schema_str is not None
    store.add(schema_id, schema_str)

    decoded = decode_event(value, None, store)
    assert isinstance(decoded, Event) and decoded.format == CONFLUENT_AVRO
    assert decoded.data["audience_key"] == record["audience_key"]
    assert decoded.data["user_id"] == record["user_id"]
    processed = resolver(store).process(value, [("content-type", b"application/vnd.confluent.avro")])
    assert processed.event_format == CONFLUENT_AVRO
    assert processed.match_errors == ()
    assert processed.outcome == want


def test_a_producer_schema_of_its_own_resolves_by_field_name() -> None:
    """A producer that registers the canonical fields under its own record name and namespace, with a field the
    service does not know, and the second version of the subject (id 2): resolved by field name."""
    writer = copy.deepcopy(orjson.loads(AVSC))
    writer["name"], writer["namespace"] = "MembershipChanged", "com.example.cdp"
    writer["fields"].append({"name": "source", "type": ["null", "string"], "default": None})
    registry = SchemaRegistryClient.new_client({"url": "mock://"})
    first = serialize(AvroSerializer(registry, AVSC), canonical(email="first@example.com"))
    record, want = CASES["explicit ids, delete, event_time as an aware datetime"]
    value = serialize(AvroSerializer(registry, orjson.dumps(writer).decode()), dict(record, source="crm"))

    assert frame(first)[0] != frame(value)[0]
    schema_id = frame(value)[0]
    assert registry.get_latest_version(SUBJECT).schema_id == schema_id
    store = SchemaStore()
    entry = store.add(schema_id, registry.get_schema(schema_id).schema_str or "")
    assert entry.reader is not None  # not the canonical layout: read through the canonical reader schema
    assert resolver(store).process(value, None).outcome == want


class Registry:
    """The Schema Registry REST calls both sides make: Confluent's client registers
    (`POST /subjects/{subject}/versions`), the service fetches (`GET /schemas/ids/{id}`)."""

    FIRST_ID = 0x01020304  # every byte of the big-endian id differs, so a wrong byte order cannot pass

    def __init__(self) -> None:
        self.schemas: dict[int, str] = {}
        self.subjects: dict[str, list[int]] = {}
        self.requests: list[str] = []

    async def register(self, request: web.Request) -> web.Response:
        self.requests.append(f"{request.method} {request.path}")
        body = await request.json()
        assert body.get("schemaType", "AVRO") == "AVRO"
        schema = body["schema"]
        schema_id = next((i for i, s in self.schemas.items() if s == schema), None)
        if schema_id is None:
            schema_id = self.FIRST_ID + len(self.schemas)
            self.schemas[schema_id] = schema
        versions = self.subjects.setdefault(request.match_info["subject"], [])
        if schema_id not in versions:
            versions.append(schema_id)
        return web.json_response({"id": schema_id}, content_type="application/vnd.schemaregistry.v1+json")

    async def by_id(self, request: web.Request) -> web.Response:
        self.requests.append(f"{request.method} {request.path}")
        schema = self.schemas.get(int(request.match_info["id"]))
        if schema is None:
            return web.json_response({"error_code": 40403, "message": "Schema not found"}, status=404)
        return web.json_response({"schema": schema}, content_type="application/vnd.schemaregistry.v1+json")


@pytest.fixture
async def http_registry() -> AsyncIterator[tuple[Registry, str]]:
    state = Registry()
    app = web.Application()
    app.router.add_post("/subjects/{subject}/versions", state.register)
    app.router.add_get("/schemas/ids/{id}", state.by_id)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield state, str(server.make_url("")).rstrip("/")
    finally:
        await server.close()


async def test_confluent_http_client_registers_and_the_service_fetches(
    http_registry: tuple[Registry, str],
) -> None:
    state, url = http_registry
    records = [CASES[c][0] for c in CASES]

    def produce_side() -> list[bytes]:
        client = SchemaRegistryClient({"url": url})
        serializer = AvroSerializer(client, Schema(AVSC, "AVRO"))
        return [serialize(serializer, r) for r in records]

    # Confluent's client is synchronous: off the event loop that serves the stand-in.
    values = await asyncio.to_thread(produce_side)
    assert {frame(v)[0] for v in values} == {Registry.FIRST_ID}
    assert state.subjects == {SUBJECT: [Registry.FIRST_ID]}
    assert orjson.loads(state.schemas[Registry.FIRST_ID]) == orjson.loads(AVSC)

    store = SchemaStore()
    async with aiohttp.ClientSession() as session:
        entry = await fetch_schema(session, url, Registry.FIRST_ID, store)
    assert entry is not None and entry.reader is None  # the canonical layout: decoded without resolution
    assert state.requests[-1] == f"GET /schemas/ids/{Registry.FIRST_ID}"
    for value, case in zip(values, CASES, strict=True):
        assert resolver(store).process(value, None).outcome == CASES[case][1], case
