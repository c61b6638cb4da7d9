"""Fetch Confluent writer schemas by id into a `SchemaStore` (the only I/O of the decoding stage).

Contract with the caller: a 404 (or a schema that can never decode canonical events) is remembered as unknown,
so its records are dead-lettered; anything that looks like the registry being down or misconfigured raises
`RegistryUnavailable` and the caller retries the record later. Valid data is never dead-lettered because the
registry was unreachable.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import orjson
import yarl

from service.core.schemas import SchemaError, SchemaStore, WriterSchema

_ACCEPT = "application/vnd.schemaregistry.v1+json, application/vnd.schemaregistry+json, application/json"

# One request per schema id is bounded by this (a registry answers by id in milliseconds) ...
DEFAULT_TIMEOUT_S = 5.0
# ... and after a failure that id is not fetched again for this long (callers get RegistryUnavailable at once).
DEFAULT_RETRY_INTERVAL_S = 5.0
_MAX_FAILED_IDS = 1024


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
    timeout_s: float = DEFAULT_TIMEOUT_S,
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
    """`fetch_schema` with one request in flight per schema id, and a negative cache of registry trouble.

    Defect 12: a registry that hangs or answers 5xx must not stall intake. So, per schema id:

    * single flight: `ensure()` and `prefetch()` calls share one request, however many records wait for it;
    * negative cache: after `RegistryUnavailable`, calls within `retry_interval_s` raise `RegistryUnavailable`
      at once, without I/O (the message says when the next attempt is allowed); never "unknown", so no record
      is dead-lettered because the registry was down;
    * `prefetch()` starts the fetch without awaiting it, so the caller can rewind and pause the partition and
      serve the others, then check `is_loaded()` / `failed_recently()` when it comes back;
    * each request is bounded by `timeout_s`.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        store: SchemaStore,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        auth: aiohttp.BasicAuth | None = None,
        retry_interval_s: float = DEFAULT_RETRY_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._session = session
        self._base_url = base_url
        self._store = store
        self._timeout_s = timeout_s
        self._auth = auth
        self._retry_interval_s = retry_interval_s
        self._clock = clock
        self._inflight: dict[int, asyncio.Task[None]] = {}
        self._failed: dict[int, tuple[float, str]] = {}  # schema id -> (no new fetch before, why)

    def is_loaded(self, schema_id: int) -> bool:
        """The store settled `schema_id`: a usable schema, or one recorded as unknown (its records are
        dead-lettered). `ensure()` then returns without I/O."""
        return schema_id in self._store or self._store.unknown_reason(schema_id) is not None

    def is_fetching(self, schema_id: int) -> bool:
        """A request for `schema_id` is in flight (started by `ensure()` or `prefetch()`)."""
        return schema_id in self._inflight

    def failed_recently(self, schema_id: int) -> bool:
        """The last fetch of `schema_id` raised `RegistryUnavailable` less than `retry_interval_s` ago."""
        return self.retry_in(schema_id) > 0.0

    def retry_in(self, schema_id: int) -> float:
        """Seconds until `schema_id` may be fetched again after a failure; 0.0 when nothing holds it back."""
        failed = self._failed.get(schema_id)
        return 0.0 if failed is None else max(0.0, failed[0] - self._clock())

    async def ensure(self, schema_id: int) -> None:
        """Make `schema_id` known or unknown in the store; raises `RegistryUnavailable` (retry later), at once
        and without I/O when the last fetch of this id failed less than `retry_interval_s` ago."""
        if self.is_loaded(schema_id):
            return
        task = self._inflight.get(schema_id) or self._start(schema_id)
        # Shielded: one cancelled waiter must not cancel the fetch the others are waiting for.
        await asyncio.shield(task)

    def prefetch(self, schema_id: int) -> None:
        """Start fetching `schema_id` in the background unless it is loaded, in flight, or failed recently.
        Never waits and never raises `RegistryUnavailable`: the outcome lands in the store or in the negative
        cache, for `is_loaded()` / `failed_recently()` / a later `ensure()`. Needs a running event loop."""
        if self.is_loaded(schema_id) or schema_id in self._inflight or self.failed_recently(schema_id):
            return
        self._start(schema_id)

    def _start(self, schema_id: int) -> asyncio.Task[None]:
        """Start the single flight for `schema_id`; raises `RegistryUnavailable` (no I/O) when it failed recently."""
        wait = self.retry_in(schema_id)
        if wait > 0.0:
            raise RegistryUnavailable(f"{self._failed[schema_id][1]} (failed recently; retried in {wait:.1f}s)")
        task = asyncio.ensure_future(self._fetch(schema_id))
        self._inflight[schema_id] = task
        task.add_done_callback(lambda t: self._done(schema_id, t))
        return task

    async def _fetch(self, schema_id: int) -> None:
        try:
            await fetch_schema(
                self._session,
                self._base_url,
                schema_id,
                self._store,
                timeout_s=self._timeout_s,
                auth=self._auth,
            )
        except RegistryUnavailable as exc:
            self._remember_failure(schema_id, str(exc))
            raise
        self._failed.pop(schema_id, None)

    def _remember_failure(self, schema_id: int, why: str) -> None:
        now = self._clock()
        if len(self._failed) >= _MAX_FAILED_IDS:  # garbage ids from corrupt records: keep the cache bounded
            for stale in [k for k, (until, _) in self._failed.items() if until <= now]:
                del self._failed[stale]
        self._failed[schema_id] = (now + self._retry_interval_s, why)

    def _done(self, schema_id: int, task: asyncio.Task[None]) -> None:
        if self._inflight.get(schema_id) is task:
            del self._inflight[schema_id]
        if not task.cancelled():
            task.exception()  # mark retrieved: every waiter already got it, or none is left to care (prefetch)
