"""Confluent-framed Avro through a Schema Registry, in the running service: resolved, cached, and never
dead-lettered while the registry is down (the partition waits and retries instead)."""

from __future__ import annotations

import asyncio
import copy
import io
import json
import struct
import threading
from collections.abc import Callable, Iterator
from typing import Any

import fastavro
import pytest
from aiohttp import web

from service.core.dead_letters import header_value
from service.core.schemas import load_canonical_schema
from service.devtools.broker import LocalBroker, free_port
from service.devtools.sample import ADVERTISER_ID
from service.devtools.sandbox import SandboxThread
from tests.conftest import ServiceProcess, Topics, produce, read_all, wait_until

pytestmark = pytest.mark.integration

AUDIENCE = "1100000042"
SCHEMA_ID = 7


class Registry:
    """A minimal Schema Registry on 127.0.0.1 that can be switched to answering 503."""

    def __init__(self) -> None:
        self.up = False
        self.calls = 0
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._schema = json.dumps(load_canonical_schema())
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    async def _get(self, request: web.Request) -> web.Response:
        self.calls += 1
        if not self.up:
            return web.Response(status=503, text="unavailable")
        if int(request.match_info["id"]) != SCHEMA_ID:
            return web.json_response({"error_code": 40403, "message": "Schema not found"}, status=404)
        return web.json_response({"schema": self._schema})

    def __enter__(self) -> Registry:
        app = web.Application()
        app.router.add_get("/schemas/ids/{id}", self._get)
        self._runner = web.AppRunner(app)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    async def _start(self) -> None:
        assert self._runner is not None
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    def __exit__(self, *_: object) -> None:
        assert self._runner is not None
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


@pytest.fixture
def registry() -> Iterator[Registry]:
    with Registry() as r:
        yield r


def confluent(record: dict[str, Any], schema_id: int = SCHEMA_ID) -> bytes:
    buf = io.BytesIO()
    buf.write(b"\x00" + struct.pack(">I", schema_id))
    fastavro.schemaless_writer(buf, fastavro.parse_schema(copy.deepcopy(load_canonical_schema())), record)
    return buf.getvalue()


def record(i: int) -> dict[str, Any]:
    return {
        "audience_key": "avro_seed",
        "action": "add",
        "event_id": f"e{i}",
        "event_time": None,
        "user_id": f"u{i}",
        "audience_id": AUDIENCE,
        "advertiser_id": ADVERTISER_ID,
        "email": f"avro{i}@example.com",
        "phone": None,
        "idfa": None,
        "aaid": None,
    }


def test_registry_outage_delays_but_never_dead_letters_valid_avro(
    broker: LocalBroker,
    topics: Topics,
    registry: Registry,
    service_env: Callable[..., dict[str, str]],
    services: Callable[[dict[str, str]], ServiceProcess],
) -> None:
    with SandboxThread(
        host="127.0.0.1", port=0, advertisers=[ADVERTISER_ID], audiences=[(ADVERTISER_ID, AUDIENCE)]
    ) as sb:
        svc = services(service_env(sb.url, SCHEMA_REGISTRY_URL=registry.url))
        records = [(f"u{i}".encode(), confluent(record(i))) for i in range(50)]
        records.append((b"unknown-schema", confluent(record(99), schema_id=12345)))
        produce(broker, topics.source, records)
        wait_until(lambda: registry.calls >= 2, 30, "the service to ask the registry (and retry)")
        assert sb.state.members(AUDIENCE) == {} or not any(sb.state.members(AUDIENCE).values())
        assert svc.metric("audience_sync_events_dead_lettered_total") <= 0, "valid data is not dead-lettered"
        registry.up = True
        wait_until(lambda: len(sb.state.members(AUDIENCE).get("EMAIL_SHA256", [])) == 50, 60, "Avro events synced")
        [letter] = read_all(broker, topics.dlq, 1)
        assert letter.key() == b"unknown-schema"
        assert header_value(letter.headers(), "dlq.reason") == "invalid_payload"
        assert "12345" in (header_value(letter.headers(), "dlq.error") or "")
        assert svc.stop() == 0
