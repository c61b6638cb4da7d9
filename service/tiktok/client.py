"""The HTTP edge to TikTok: one shared aiohttp session, `Access-Token` header, answers classified."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import orjson

from service import metrics as m
from service.core.answers import Answer, Verdict, classify
from service.core.retry import TokenBucket

MAX_MESSAGE = 200


class ControlLimiter:
    """Paces control-plane calls (audience create, get and list, user and advertiser info).

    TikTok's rate limit is per developer app and covers every endpoint (docs/tiktok-api.md §8.1), so these
    calls spend the same budget as uploads; the uploads' limiter (TIKTOK_MAX_QPS) leaves them
    `TIKTOK_CONTROL_QPS` of room. Burst 1: never more than `qps` + 1 in any second. One limiter is shared by
    every client of a process.
    """

    def __init__(
        self,
        qps: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._bucket = TokenBucket(qps, clock=clock, burst=1.0, min_rate=qps)
        self._sleep = sleep

    async def turn(self) -> None:
        while (wait := self._bucket.acquire()) > 0:
            m.CONTROL_RATE_LIMIT_WAIT.inc(wait)
            await self._sleep(wait)


class TikTokClient:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        token: Callable[[], str],
        *,
        timeout_s: float = 10.0,
        control: ControlLimiter | None = None,
    ) -> None:
        self._control = control
        self._session = session
        self._base = base_url.rstrip("/")
        self._token = token
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)

    async def post_mapping(self, body: bytes) -> Answer:
        return await self._call("POST", "/segment/mapping/", data=body)

    async def post_event_track(self, body: bytes) -> Answer:
        """`POST /event/track/` (offline events, docs/tiktok-api.md §8.4): classified like a mapping upload."""
        return await self._call("POST", "/event/track/", data=body)

    async def control_turn(self) -> None:
        """Wait for the control limiter (if any): a caller that must start a control-plane call without awaiting in
        between (a fenced create) takes its turn first, then calls with `paced=False`."""
        if self._control is not None:
            await self._control.turn()

    async def post_json(
        self, path: str, payload: dict[str, Any], *, paced: bool = True
    ) -> tuple[Answer, dict[str, Any]]:
        """A control-plane POST: paced by the control limiter when there is one. `paced=False` for a data-plane
        call whose caller spent its own token (a file-audience update) and must start it without waiting."""
        if paced and self._control is not None:
            await self._control.turn()
        return await self._call_with_data("POST", path, data=orjson.dumps(payload))

    async def get(self, path: str, params: dict[str, str]) -> tuple[Answer, dict[str, Any]]:
        """A control-plane GET: paced by the control limiter when there is one."""
        if self._control is not None:
            await self._control.turn()
        return await self._call_with_data("GET", path, params=params)

    async def post_form(
        self, path: str, form: aiohttp.FormData, *, timeout_s: float | None = None
    ) -> tuple[Answer, dict[str, Any]]:
        """multipart/form-data POST (customer-file upload); aiohttp writes the Content-Type with its boundary.

        A FormData can be sent once only: build a new one per attempt. `timeout_s` overrides the client's total
        timeout, for uploads larger than a JSON call.
        """
        timeout = aiohttp.ClientTimeout(total=timeout_s) if timeout_s is not None else None
        return await self._call_with_data("POST", path, data=form, json_body=False, timeout=timeout)

    async def _call(self, method: str, path: str, **kw: Any) -> Answer:
        answer, _ = await self._call_with_data(method, path, **kw)
        return answer

    async def _call_with_data(
        self,
        method: str,
        path: str,
        *,
        json_body: bool = True,
        timeout: aiohttp.ClientTimeout | None = None,
        **kw: Any,
    ) -> tuple[Answer, dict[str, Any]]:
        headers = {"Access-Token": self._token()}
        if json_body:
            headers["Content-Type"] = "application/json"
        try:
            async with self._session.request(
                method, self._base + path, headers=headers, timeout=timeout or self._timeout, **kw
            ) as resp:
                raw = await resp.read()
                status = resp.status
                retry_after = _retry_after(resp.headers.get("Retry-After"))
        except TimeoutError:
            return Answer(Verdict.RETRY, None, None, "timeout: no answer in time"), {}
        except aiohttp.ClientError as exc:
            return Answer(Verdict.RETRY, None, None, f"connection: {type(exc).__name__}"), {}
        except asyncio.CancelledError:
            raise
        envelope = _envelope(raw)
        code = envelope.get("code") if isinstance(envelope.get("code"), int) else None
        message = envelope.get("message")
        if not isinstance(message, str):
            message = "" if envelope else f"HTTP {status}, body is not TikTok's envelope"
        request_id = envelope.get("request_id")
        data = envelope.get("data")
        return (
            Answer(
                classify(status, code),
                status,
                code,
                message[:MAX_MESSAGE],
                request_id if isinstance(request_id, str) else None,
                retry_after,
            ),
            data if isinstance(data, dict) else {},
        )


def _envelope(raw: bytes) -> dict[str, Any]:
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return {}
    return doc if isinstance(doc, dict) else {}


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # HTTP-date form: ignored, backoff applies
