"""Fetch Confluent writer schemas by id into a `SchemaStore` (the only I/O of the decoding stage).

Contract with the caller: a 404 (or a schema that can never decode canonical events) is remembered as unknown,
so its records are dead-lettered; anything that looks like the registry being down or misconfigured raises
`RegistryUnavailable` and the caller retries the record later. Valid data is never dead-lettered because the
registry was unreachable.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import orjson
import yarl

from service.core.schemas import SchemaError, SchemaStore, WriterSchema

_ACCEPT = "application/vnd.schemaregistry.v1+json, application/vnd.schemaregistry+json, application/json"


class RegistryUnavailable(Exception):
    """The registry could not answer now (connection error, timeout, 5xx, auth, garbled body): retry later."""


def _safe_url(base_url: str) -> str:
    """The registry URL without credentials, for error messages."""
    try:
        return str(yarl.URL(base_url).with_user(None))
    except (ValueError, TypeError):
        return "<schema registry>"


async def fetch_schema(
    session: aiohttp.ClientSession,
    base_url: str,
    schema_id: int,
    store: SchemaStore,
    *,
    timeout_s: float = 10.0,
    auth: aiohttp.BasicAuth | None = None,
) -> WriterSchema | None:
    """`GET {base_url}/schemas/ids/{schema_id}` into `store`; None when the id was recorded as unknown."""
    url = f"{base_url.rstrip('/')}/schemas/ids/{schema_id}"
    where = _safe_url(base_url)
    try:
        async with session.get(
            url,
            headers={"Accept": _ACCEPT},
            auth=auth,
            timeout=aiohttp.ClientTimeout(total=timeout_s),
        ) as resp:
            status = resp.status
            body = await resp.read() if status == 200 else b""
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise RegistryUnavailable(
            f"schema registry {where} unreachable fetching schema id {schema_id}: {type(exc).__name__}"
        ) from exc
    if status == 404:
        store.mark_unknown(schema_id, f"unknown schema id {schema_id} (schema registry {where} answered 404)")
        return None
    if status != 200:
        raise RegistryUnavailable(f"schema registry {where} answered HTTP {status} for schema id {schema_id}")
    try:
        payload: Any = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise RegistryUnavailable(f"schema registry {where} answered non-JSON for schema id {schema_id}") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("schema"), str):
        raise RegistryUnavailable(f"schema registry {where} answered without a schema for id {schema_id}")
    schema_type = payload.get("schemaType") or "AVRO"
    if schema_type != "AVRO":
        store.mark_unknown(schema_id, f"schema id {schema_id} is a {schema_type} schema, not Avro")
        return None
    if payload.get("references"):
        store.mark_unknown(schema_id, f"schema id {schema_id} uses schema references, which are not supported")
        return None
    try:
        return store.add(schema_id, payload["schema"])
    except SchemaError as exc:
        store.mark_unknown(schema_id, str(exc))
        return None


class SchemaRegistryClient:
    """`fetch_schema` with one request in flight per schema id, however many records wait for it."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        store: SchemaStore,
        *,
        timeout_s: float = 10.0,
        auth: aiohttp.BasicAuth | None = None,
    ) -> None:
        self._session = session
        self._base_url = base_url
        self._store = store
        self._timeout_s = timeout_s
        self._auth = auth
        self._inflight: dict[int, asyncio.Task[WriterSchema | None]] = {}

    async def ensure(self, schema_id: int) -> None:
        """Make `schema_id` known or unknown in the store; raises `RegistryUnavailable` (retry later)."""
        if schema_id in self._store or self._store.unknown_reason(schema_id) is not None:
            return
        task = self._inflight.get(schema_id)
        if task is None:
            task = asyncio.ensure_future(
                fetch_schema(
                    self._session,
                    self._base_url,
                    schema_id,
                    self._store,
                    timeout_s=self._timeout_s,
                    auth=self._auth,
                )
            )
            self._inflight[schema_id] = task
            task.add_done_callback(lambda t: self._done(schema_id, t))
        # Shielded: one cancelled waiter must not cancel the fetch the others are waiting for.
        await asyncio.shield(task)

    def _done(self, schema_id: int, task: asyncio.Task[WriterSchema | None]) -> None:
        self._inflight.pop(schema_id, None)
        if not task.cancelled():
            task.exception()  # mark retrieved: every waiter already got it, or none is left to care
