"""Schema Registry fetches against a tiny aiohttp server on 127.0.0.1: 404 is "unknown", down is "retry"."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from service.core.schemas import SchemaStore, load_canonical_schema
from service.kafka.schema_registry import RegistryUnavailable, SchemaRegistryClient, fetch_schema

CANONICAL = orjson.dumps(load_canonical_schema()).decode()


class Registry:
    """Answers by schema id from `responses`: (status, body) or an exception-like behaviour."""

    def __init__(self) -> None:
        self.responses: dict[int, tuple[int, Any]] = {}
        self.requests: list[str] = []
        self.delay = 0.0

    async def handle(self, request: web.Request) -> web.Response:
        self.requests.append(request.path)
        if self.delay:
            await asyncio.sleep(self.delay)
        schema_id = int(request.match_info["id"])
        status, body = self.responses.get(schema_id, (404, {"error_code": 40403, "message": "Schema not found"}))
        raw = body if isinstance(body, bytes) else orjson.dumps(body)
        return web.Response(status=status, body=raw, content_type="application/vnd.schemaregistry.v1+json")


@pytest.fixture
async def registry() -> AsyncIterator[tuple[Registry, str]]:
    state = Registry()
    app = web.Application()
    app.router.add_get("/schemas/ids/{id}", state.handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield state, str(server.make_url("")).rstrip("/")
    finally:
        await server.close()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def test_fetch_fills_the_store(registry: tuple[Registry, str], session: aiohttp.ClientSession) -> None:
    state, url = registry
    state.responses[12] = (200, {"schema": CANONICAL})
    store = SchemaStore()
    entry = await fetch_schema(session, url + "/", 12, store)
    assert entry is not None and entry.reader is None
    assert store.get(12) is entry
    assert state.requests == ["/schemas/ids/12"]


async def test_404_marks_unknown(registry: tuple[Registry, str], session: aiohttp.ClientSession) -> None:
    _, url = registry
    store = SchemaStore()
    assert await fetch_schema(session, url, 13, store) is None
    reason = store.unknown_reason(13)
    assert reason is not None and reason.startswith("unknown schema id 13")
    assert 13 not in store


@pytest.mark.parametrize(
    ("response", "fragment"),
    [
        ((200, {"schema": '{"type": "string"}'}), "not an Avro record schema"),
        ((200, {"schema": "{}", "schemaType": "PROTOBUF"}), "is a PROTOBUF schema, not Avro"),
        ((200, {"schema": CANONICAL, "references": [{"name": "x", "subject": "y", "version": 1}]}), "references"),
        ((200, {"schema": '{"type": "record", "name": "X", "fields": []}'}), "has no field audience_key, action"),
    ],
)
async def test_unusable_schemas_are_marked_unknown(
    registry: tuple[Registry, str], session: aiohttp.ClientSession, response: tuple[int, Any], fragment: str
) -> None:
    state, url = registry
    state.responses[5] = response
    store = SchemaStore()
    assert await fetch_schema(session, url, 5, store) is None
    reason = store.unknown_reason(5)
    assert reason is not None and fragment in reason


@pytest.mark.parametrize(
    ("response", "fragment"),
    [
        ((500, {"message": "boom"}), "answered HTTP 500"),
        ((503, b"unavailable"), "answered HTTP 503"),
        ((401, {"message": "unauthorized"}), "answered HTTP 401"),
        ((200, b"<html>proxy</html>"), "non-JSON"),
        ((200, {"no": "schema"}), "without a schema"),
    ],
)
async def test_registry_trouble_raises_and_marks_nothing(
    registry: tuple[Registry, str], session: aiohttp.ClientSession, response: tuple[int, Any], fragment: str
) -> None:
    state, url = registry
    state.responses[6] = response
    store = SchemaStore()
    with pytest.raises(RegistryUnavailable, match=fragment):
        await fetch_schema(session, url, 6, store)
    assert store.unknown_reason(6) is None and 6 not in store


async def test_connection_refused_raises_without_credentials(session: aiohttp.ClientSession) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    store = SchemaStore()
    with pytest.raises(RegistryUnavailable) as info:
        await fetch_schema(session, f"http://user:s3cret@127.0.0.1:{port}", 1, store)
    assert "s3cret" not in str(info.value)
    assert f"127.0.0.1:{port}" in str(info.value)
    assert store.unknown_reason(1) is None


async def test_timeout_raises(registry: tuple[Registry, str], session: aiohttp.ClientSession) -> None:
    state, url = registry
    state.delay = 1.0
    with pytest.raises(RegistryUnavailable, match="TimeoutError"):
        await fetch_schema(session, url, 1, SchemaStore(), timeout_s=0.05)


async def test_client_dedupes_concurrent_fetches(
    registry: tuple[Registry, str], session: aiohttp.ClientSession
) -> None:
    state, url = registry
    state.responses[21] = (200, {"schema": CANONICAL})
    state.delay = 0.05
    store = SchemaStore()
    client = SchemaRegistryClient(session, url, store)
    await asyncio.gather(*(client.ensure(21) for _ in range(10)))
    assert state.requests == ["/schemas/ids/21"]
    assert 21 in store
    await client.ensure(21)  # cached: no request
    await client.ensure(22)  # 404 → unknown
    await client.ensure(22)  # remembered: no second request
    assert state.requests == ["/schemas/ids/21", "/schemas/ids/22"]


async def test_client_propagates_unavailable_to_every_waiter(
    registry: tuple[Registry, str], session: aiohttp.ClientSession
) -> None:
    state, url = registry
    state.responses[30] = (502, b"bad gateway")
    state.delay = 0.05
    client = SchemaRegistryClient(session, url, SchemaStore())
    results = await asyncio.gather(*(client.ensure(30) for _ in range(3)), return_exceptions=True)
    assert all(isinstance(r, RegistryUnavailable) for r in results)
    assert len(state.requests) == 1
    # Not remembered: the next record retries.
    state.responses[30] = (200, {"schema": CANONICAL})
    await client.ensure(30)
    assert len(state.requests) == 2
