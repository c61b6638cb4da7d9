"""Schema Registry fetches against a tiny aiohttp server on 127.0.0.1: 404 is "unknown", down is "retry"."""

from __future__ import annotations

import asyncio
import gc
import socket
import time
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
    clock = Clock()
    client = SchemaRegistryClient(session, url, SchemaStore(), clock=clock)
    results = await asyncio.gather(*(client.ensure(30) for _ in range(3)), return_exceptions=True)
    assert all(isinstance(r, RegistryUnavailable) for r in results)
    assert len(state.requests) == 1
    # Remembered only for the retry interval, never as unknown: once it is over, the next record retries.
    state.responses[30] = (200, {"schema": CANONICAL})
    clock.now += 5.0
    await client.ensure(30)
    assert len(state.requests) == 2


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_unavailable_is_remembered_within_the_retry_interval(
    registry: tuple[Registry, str], session: aiohttp.ClientSession
) -> None:
    """Defect 12: a registry in trouble must cost one request per retry interval, not one per record."""
    state, url = registry
    state.responses[40] = (503, b"unavailable")
    client = SchemaRegistryClient(session, url, SchemaStore())
    with pytest.raises(RegistryUnavailable, match="HTTP 503"):
        await client.ensure(40)
    started = time.monotonic()
    with pytest.raises(RegistryUnavailable, match="HTTP 503"):
        await client.ensure(40)
    assert time.monotonic() - started < 0.05
    assert state.requests == ["/schemas/ids/40"]


async def test_a_hanging_registry_costs_one_timeout_per_interval(
    registry: tuple[Registry, str], session: aiohttp.ClientSession
) -> None:
    state, url = registry
    state.delay = 30.0  # never answers within the timeout
    client = SchemaRegistryClient(session, url, SchemaStore(), timeout_s=0.2)
    started = time.monotonic()
    results = await asyncio.gather(*(client.ensure(41) for _ in range(5)), return_exceptions=True)
    assert all(isinstance(r, RegistryUnavailable) and "TimeoutError" in str(r) for r in results)
    assert 0.15 < time.monotonic() - started < 2.0  # one timeout, shared
    started = time.monotonic()
    for _ in range(20):  # every later record of the partition: no I/O, no wait
        with pytest.raises(RegistryUnavailable, match="TimeoutError"):
            await client.ensure(41)
    assert time.monotonic() - started < 0.05
    assert state.requests == ["/schemas/ids/41"]
    assert client.failed_recently(41) and not client.is_loaded(41)


async def test_a_new_fetch_after_the_retry_interval(
    registry: tuple[Registry, str], session: aiohttp.ClientSession
) -> None:
    state, url = registry
    state.responses[42] = (503, b"unavailable")
    clock = Clock()
    client = SchemaRegistryClient(session, url, SchemaStore(), retry_interval_s=5.0, clock=clock)
    with pytest.raises(RegistryUnavailable):
        await client.ensure(42)
    clock.now += 4.9
    assert client.failed_recently(42)
    with pytest.raises(RegistryUnavailable, match=r"HTTP 503.*retried in 0\.1s"):
        await client.ensure(42)
    assert len(state.requests) == 1
    clock.now += 0.1
    assert not client.failed_recently(42)
    with pytest.raises(RegistryUnavailable):  # still down: a new fetch, remembered again
        await client.ensure(42)
    assert len(state.requests) == 2
    clock.now += 5.0
    state.responses[42] = (200, {"schema": CANONICAL})
    await client.ensure(42)
    assert len(state.requests) == 3
    assert client.is_loaded(42) and not client.failed_recently(42)
    await client.ensure(42)
    assert len(state.requests) == 3


async def test_other_ids_are_not_held_back_by_a_failed_one(
    registry: tuple[Registry, str], session: aiohttp.ClientSession
) -> None:
    state, url = registry
    state.responses[43] = (503, b"unavailable")
    state.responses[44] = (200, {"schema": CANONICAL})
    client = SchemaRegistryClient(session, url, SchemaStore())
    with pytest.raises(RegistryUnavailable):
        await client.ensure(43)
    await client.ensure(44)
    assert client.is_loaded(44) and not client.failed_recently(44)
    assert state.requests == ["/schemas/ids/43", "/schemas/ids/44"]


async def test_prefetch_fetches_in_the_background_once(
    registry: tuple[Registry, str], session: aiohttp.ClientSession
) -> None:
    state, url = registry
    state.responses[50] = (200, {"schema": CANONICAL})
    state.delay = 0.1
    client = SchemaRegistryClient(session, url, SchemaStore())
    started = time.monotonic()
    client.prefetch(50)  # not a coroutine: returns at once, the request runs in the background
    assert time.monotonic() - started < 0.01
    client.prefetch(50)
    assert client.is_fetching(50) and not client.is_loaded(50)
    await client.ensure(50)  # joins the prefetch's request
    assert client.is_loaded(50) and not client.is_fetching(50)
    client.prefetch(50)  # loaded: nothing to do
    await asyncio.sleep(0.15)
    assert state.requests == ["/schemas/ids/50"]


async def test_prefetch_of_an_unknown_id_is_remembered(
    registry: tuple[Registry, str], session: aiohttp.ClientSession
) -> None:
    state, url = registry
    store = SchemaStore()
    client = SchemaRegistryClient(session, url, store)
    client.prefetch(51)
    await _settled(client, 51)
    assert client.is_loaded(51) and store.unknown_reason(51) is not None
    client.prefetch(51)
    await client.ensure(51)
    assert state.requests == ["/schemas/ids/51"]


async def test_a_failed_prefetch_is_remembered_and_logged_nowhere(
    registry: tuple[Registry, str], session: aiohttp.ClientSession
) -> None:
    state, url = registry
    state.responses[52] = (503, b"unavailable")
    clock = Clock()
    client = SchemaRegistryClient(session, url, SchemaStore(), clock=clock)
    errors: list[dict[str, Any]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: errors.append(ctx))
    client.prefetch(52)
    await _settled(client, 52)
    assert client.failed_recently(52) and not client.is_loaded(52)
    client.prefetch(52)  # failed recently: no I/O
    with pytest.raises(RegistryUnavailable, match="HTTP 503"):
        await client.ensure(52)
    assert state.requests == ["/schemas/ids/52"]
    clock.now += 5.0
    state.responses[52] = (200, {"schema": CANONICAL})
    client.prefetch(52)  # the interval is over: fetch again
    await _settled(client, 52)
    assert client.is_loaded(52)
    assert len(state.requests) == 2
    gc.collect()  # "Task exception was never retrieved" would be reported here
    await asyncio.sleep(0)
    assert errors == []


async def test_a_cancelled_waiter_does_not_cancel_the_shared_fetch(
    registry: tuple[Registry, str], session: aiohttp.ClientSession
) -> None:
    state, url = registry
    state.responses[53] = (200, {"schema": CANONICAL})
    state.delay = 0.1
    client = SchemaRegistryClient(session, url, SchemaStore())
    first = asyncio.ensure_future(client.ensure(53))
    second = asyncio.ensure_future(client.ensure(53))
    await asyncio.sleep(0.02)
    first.cancel()
    await second
    assert first.cancelled() and client.is_loaded(53)
    assert state.requests == ["/schemas/ids/53"]


async def _settled(client: SchemaRegistryClient, schema_id: int) -> None:
    for _ in range(200):
        if not client.is_fetching(schema_id):
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"fetch of schema id {schema_id} still running")
