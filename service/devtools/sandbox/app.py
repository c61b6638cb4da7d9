"""aiohttp application of the TikTok sandbox: TikTok's endpoints under `/open_api/v1.3` (audiences and the offline
`event/track/`), a control API under `/_sandbox/`.

Handlers stay thin: faults are decided first, then auth, then `SandboxState` validates and applies
synchronously (no await in between, so a request is applied atomically). Request bodies and tokens are never
logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from http import HTTPStatus

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from service.devtools.sandbox.event_track import validate_event_track
from service.devtools.sandbox.faults import MAPPING_PATH, Fault, FaultPlan
from service.devtools.sandbox.state import (
    EMPTY_ACCESS_TOKEN,
    INVALID_ACCESS_TOKEN,
    MAX_PAGE_SIZE,
    OK,
    ApiError,
    FilePart,
    RequestRecord,
    SandboxState,
    param_error,
    parse_int_param,
    parse_json_list_param,
)

log = logging.getLogger(__name__)

API_PREFIX = "/open_api/v1.3"
CONTROL_PREFIX = "/_sandbox"
CLIENT_MAX_SIZE = 64 * 1024 * 1024  # 10,000 rows of several hashes exceed aiohttp's 1 MiB default

NGINX_502 = (
    "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    "<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n"
)


@dataclass(slots=True)
class Runtime:
    """Per-app mutable settings; a holder because a started app's own keys must not be reassigned."""

    tokens: frozenset[str]
    faults: FaultPlan | None
    clock: Callable[[], float] = time.monotonic
    closing: asyncio.Event = field(default_factory=asyncio.Event)


STATE_KEY = web.AppKey("sandbox_state", SandboxState)
RUNTIME_KEY = web.AppKey("sandbox_runtime", Runtime)

_request_seq = itertools.count(1)
_NOT_JSON = object()
_NOT_MULTIPART = object()

Inner = Callable[[web.Request, SandboxState, object], dict[str, object]]


def _request_id() -> str:
    """TikTok-like id (UTC timestamp + hex); the sequence number makes it unique within the process."""
    stamp = datetime.now(UTC).strftime("%Y%m%d%H%M%S")
    return f"{stamp}{next(_request_seq):08X}{secrets.token_hex(3).upper()}"


def envelope(code: int, message: str, data: dict[str, object] | None = None, *, status: int = 200) -> web.Response:
    body = {
        "code": code,
        "message": message,
        "request_id": _request_id(),
        "data": data if data is not None else {},
    }
    return web.json_response(body, status=status)


def _advertiser_hint(request: web.Request, body: object) -> list[str]:
    """Advertiser ids a request names, read leniently: per-advertiser faults fire even on malformed input."""
    ids: list[str] = []
    if isinstance(body, dict):
        value = body.get("advertiser_ids")
        if isinstance(value, list):
            ids.extend(str(v) for v in value)
        if body.get("advertiser_id") is not None:
            ids.append(str(body["advertiser_id"]))
    if "advertiser_id" in request.query:
        ids.append(request.query["advertiser_id"])
    if "advertiser_ids" in request.query:
        with contextlib.suppress(ValueError):
            value = json.loads(request.query["advertiser_ids"])
            if isinstance(value, list):
                ids.extend(str(v) for v in value)
    return ids


def _summary(now: float, path: str, body: object, advertisers: list[str]) -> RequestRecord:
    """What the request log keeps: shape only, so tests assert rates and order without seeing identifiers."""
    action = rows = None
    if isinstance(body, dict):
        if isinstance(body.get("action"), str):
            action = body["action"]
        if isinstance(body.get("batch_data"), list):
            rows = len(body["batch_data"])
        elif isinstance(body.get("data"), list):  # event/track/: events per request
            rows = len(body["data"])
    return RequestRecord(
        t=now, path=path, action=action, advertiser_ids=advertisers or None, rows=rows, status=0, code=None
    )


def _check_token(request: web.Request, tokens: frozenset[str]) -> None:
    token = request.headers.get("Access-Token", "").strip()
    if not token:
        raise ApiError(EMPTY_ACCESS_TOKEN)
    if token not in tokens:  # includes "Bearer <token>": TikTok wants the bare token
        raise ApiError(INVALID_ACCESS_TOKEN)


async def _wait_or_closing(runtime: Runtime, delay: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(runtime.closing.wait(), timeout=delay)


def _abort(request: web.Request) -> web.Response:
    """Drop the connection without an answer; the response returned afterwards is never written."""
    if request.transport is not None:
        request.transport.abort()
    return web.Response(status=499)


def _tiktok(path: str, inner: Inner) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def counted(request: web.Request) -> web.StreamResponse:
        state = request.app[STATE_KEY]
        state.opened(path)
        try:
            return await handler(request)
        finally:
            state.closed(path)

    async def handler(request: web.Request) -> web.StreamResponse:
        state = request.app[STATE_KEY]
        runtime = request.app[RUNTIME_KEY]
        now = runtime.clock()
        state.count_request(path)
        body: object = None
        if request.method == "POST" and request.content_type == "multipart/form-data":
            body = await _read_multipart(request)
        elif request.method == "POST":
            raw = await request.read()
            try:
                body = json.loads(raw)
            except ValueError:
                body = _NOT_JSON
        adv_hint = _advertiser_hint(request, body)
        rec = _summary(now, path, body, adv_hint)
        fault = runtime.faults.decide(path, adv_hint, now) if runtime.faults is not None else None
        if fault is not None:
            log.debug("sandbox fault %s (%s) on %s", fault.kind, fault.source, path)
            if fault.kind != "slow":
                return await _serve_fault(request, state, runtime, fault, rec)
            await _wait_or_closing(runtime, fault.delay_s or 0.0)
        try:
            _check_token(request, runtime.tokens)
            if body is _NOT_JSON:
                raise param_error("request body must be valid JSON")
            if body is _NOT_MULTIPART:
                raise param_error("request body is not valid multipart/form-data")
            data = inner(request, state, body)
            code, message = OK, "OK"
        except ApiError as e:
            data, code, message = {}, e.code, e.message
            log.debug("sandbox rejected %s with %d", path, code)
        state.record(replace(rec, status=200, code=code, fault=fault.kind if fault else None))
        return envelope(code, message, data)

    return counted


async def _read_multipart(request: web.Request) -> object:
    """Text fields as str, file parts as `FilePart`; `_NOT_MULTIPART` when the body cannot be parsed."""
    fields: dict[str, object] = {}
    try:
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader) or not part.name:
                return _NOT_MULTIPART
            data = bytes(await part.read(decode=False))
            if part.filename is not None:
                fields[part.name] = FilePart(part.filename, data)
            else:
                fields[part.name] = data.decode("utf-8")
    except (ValueError, AssertionError, HttpProcessingError):  # UnicodeDecodeError is a ValueError
        return _NOT_MULTIPART
    return fields


async def _serve_fault(
    request: web.Request, state: SandboxState, runtime: Runtime, fault: Fault, rec: RequestRecord
) -> web.StreamResponse:
    def record(status: int, code: int | None) -> None:
        state.record(replace(rec, status=status, code=code, fault=fault.kind))

    response: web.Response | None = None
    if fault.kind == "code":
        code = fault.code or 0
        record(200, code)
        response = envelope(code, fault.tiktok_message)
    elif fault.kind == "http":
        status = fault.status or 502
        record(status, None)
        if fault.html:
            response = web.Response(status=status, text=NGINX_502, content_type="text/html")
        else:
            code = fault.code if fault.code is not None else (40100 if status == 429 else 50000)
            response = envelope(code, fault.message or _reason(status), status=status)
    if response is not None:
        if fault.retry_after_s is not None:
            response.headers["Retry-After"] = f"{fault.retry_after_s:g}"
        return response
    if fault.kind == "timeout":
        record(0, None)
        await _wait_or_closing(runtime, fault.delay_s or 0.0)
        return _abort(request)
    record(0, None)  # reset
    return _abort(request)


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "HTTP error"


# -- TikTok endpoints (sync: validate and apply without yielding) --------------------------------------------


def _mapping(request: web.Request, state: SandboxState, body: object) -> dict[str, object]:
    req = state.validate_mapping(body)
    state.apply_mapping(req)
    return {}


def _segment_audience(request: web.Request, state: SandboxState, body: object) -> dict[str, object]:
    return state.segment_audience(body)


def _file_upload(request: web.Request, state: SandboxState, body: object) -> dict[str, object]:
    return state.upload_file(body)


def _file_create(request: web.Request, state: SandboxState, body: object) -> dict[str, object]:
    return state.create_file_audience(body)


def _file_update(request: web.Request, state: SandboxState, body: object) -> dict[str, object]:
    return state.update_file_audience(body)


def _event_track(request: web.Request, state: SandboxState, body: object) -> dict[str, object]:
    state.apply_events(validate_event_track(body, state.now()))
    return {}


def _query_advertiser(request: web.Request) -> str:
    value = request.query.get("advertiser_id", "")
    if not value:
        raise param_error("advertiser_id: required")
    return value


def _audience_get(request: web.Request, state: SandboxState, body: object) -> dict[str, object]:
    advertiser_id = _query_advertiser(request)
    ids = parse_json_list_param(request.query.get("custom_audience_ids"), "custom_audience_ids")
    return state.get_audiences(advertiser_id, ids)


def _audience_list(request: web.Request, state: SandboxState, body: object) -> dict[str, object]:
    advertiser_id = _query_advertiser(request)
    page = parse_int_param(request.query.get("page"), "page", default=1, lo=1)
    size = parse_int_param(request.query.get("page_size"), "page_size", default=100, lo=1, hi=MAX_PAGE_SIZE)
    return state.list_audiences(advertiser_id, page, size)


def _user_info(request: web.Request, state: SandboxState, body: object) -> dict[str, object]:
    return {"display_name": "Sandbox User", "id": "7000000000000000001", "email": None, "create_time": 0}


def _advertiser_info(request: web.Request, state: SandboxState, body: object) -> dict[str, object]:
    ids = parse_json_list_param(request.query.get("advertiser_ids"), "advertiser_ids")
    return state.advertiser_info(ids)


# -- control API (tests and demo; not TikTok) ---------------------------------------------------------------


def _bad(message: str, status: int = 400) -> web.Response:
    return web.json_response({"error": message}, status=status)


async def _json_body(request: web.Request, *, allow_empty: bool = False) -> dict[str, object]:
    raw = await request.read()
    if not raw.strip() and allow_empty:
        return {}
    value = json.loads(raw)  # ValueError handled by callers
    if not isinstance(value, dict):
        raise ValueError("body must be a JSON object")
    return value


async def _ctl_state(request: web.Request) -> web.Response:
    return web.json_response(request.app[STATE_KEY].snapshot())


async def _ctl_members(request: web.Request) -> web.Response:
    try:
        return web.json_response(request.app[STATE_KEY].members(request.match_info["audience_id"]))
    except KeyError:
        return _bad("unknown audience", 404)


async def _ctl_customer_files(request: web.Request) -> web.Response:
    return web.json_response(request.app[STATE_KEY].customer_files())


async def _ctl_customer_file(request: web.Request) -> web.Response:
    try:
        ids = request.app[STATE_KEY].file_identifiers(request.match_info["file_path"])
    except KeyError:
        return _bad("unknown file_path", 404)
    return web.json_response({"identifiers": ids})


async def _ctl_advertisers(request: web.Request) -> web.Response:
    try:
        body = await _json_body(request)
        adv, name, denied = body.get("advertiser_id"), body.get("name"), body.get("permission_denied", False)
        if not isinstance(adv, str) or not adv or (name is not None and not isinstance(name, str)):
            raise ValueError("advertiser_id (string) required, name optional string")
        if not isinstance(denied, bool):
            raise ValueError("permission_denied must be a boolean")
    except ValueError as e:
        return _bad(str(e))
    request.app[STATE_KEY].add_advertiser(adv, name, permission_denied=denied)
    return web.json_response({"advertiser_id": adv})


async def _ctl_audiences(request: web.Request) -> web.Response:
    try:
        body = await _json_body(request)
        adv, aud, name = body.get("advertiser_id"), body.get("audience_id"), body.get("name")
        if not isinstance(adv, str) or not adv:
            raise ValueError("advertiser_id (string) required")
        if not isinstance(aud, str | None) or not isinstance(name, str | None):
            raise ValueError("audience_id and name must be strings")
        audience_id = request.app[STATE_KEY].add_audience(adv, aud, name)
    except KeyError:
        return _bad("unknown advertiser; register it first", 404)
    except ValueError as e:
        return _bad(str(e))
    return web.json_response({"audience_id": audience_id})


async def _ctl_faults_get(request: web.Request) -> web.Response:
    plan = request.app[RUNTIME_KEY].faults
    return web.json_response(plan.to_json() if plan is not None else None)


async def _ctl_faults_set(request: web.Request) -> web.Response:
    try:
        plan = FaultPlan.from_json(json.loads(await request.read()))
    except ValueError as e:
        return _bad(str(e))
    request.app[RUNTIME_KEY].faults = plan
    log.info("sandbox fault plan replaced (%d rules)", len(plan.rules))
    return web.json_response(plan.to_json())


async def _ctl_faults_clear(request: web.Request) -> web.Response:
    request.app[RUNTIME_KEY].faults = None
    return web.json_response({})


async def _ctl_requests(request: web.Request) -> web.Response:
    path = request.query.get("path", MAPPING_PATH)
    return web.json_response({"requests": request.app[STATE_KEY].requests(None if path == "*" else path)})


async def _ctl_events(request: web.Request) -> web.Response:
    """Offline events event/track/ accepted, each once, with totals (`?event_source_id=` keeps one event set)."""
    return web.json_response(request.app[STATE_KEY].events(request.query.get("event_source_id")))


async def _ctl_reset(request: web.Request) -> web.Response:
    try:
        body = await _json_body(request, allow_empty=True)
    except ValueError as e:
        return _bad(str(e))
    request.app[STATE_KEY].reset(everything=body.get("all") is True)
    return web.json_response({})


# -- factory -------------------------------------------------------------------------------------------------

_GET_ROUTES: tuple[tuple[str, Inner], ...] = (
    ("/dmp/custom_audience/get/", _audience_get),
    ("/dmp/custom_audience/list/", _audience_list),
    ("/user/info/", _user_info),
    ("/advertiser/info/", _advertiser_info),
)
_POST_ROUTES: tuple[tuple[str, Inner], ...] = (
    ("/segment/mapping/", _mapping),
    ("/segment/audience/", _segment_audience),
    ("/dmp/custom_audience/file/upload/", _file_upload),
    ("/dmp/custom_audience/create/", _file_create),
    ("/dmp/custom_audience/update/", _file_update),
    ("/event/track/", _event_track),
)


def create_app(
    state: SandboxState,
    *,
    tokens: Iterable[str],
    faults: FaultPlan | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> web.Application:
    """The sandbox app; `tokens` are the valid `Access-Token` values, `clock` the log's monotonic time."""
    app = web.Application(client_max_size=CLIENT_MAX_SIZE)
    runtime = Runtime(tokens=frozenset(tokens), faults=faults, clock=clock)
    app[STATE_KEY] = state
    app[RUNTIME_KEY] = runtime
    for routes, method in ((_GET_ROUTES, "GET"), (_POST_ROUTES, "POST")):
        for path, inner in routes:
            handler = _tiktok(path, inner)
            # Readers differ on the trailing slash (Segment calls `custom_audience/get` without): serve both
            # for GETs; writes keep TikTok's documented path only.
            for variant in {path, path.rstrip("/") if method == "GET" else path}:
                app.router.add_route(method, API_PREFIX + variant, handler)
    c = CONTROL_PREFIX
    app.router.add_get(f"{c}/state", _ctl_state)
    app.router.add_get(f"{c}/audiences/{{audience_id}}/members", _ctl_members)
    app.router.add_get(f"{c}/customer_files", _ctl_customer_files)
    app.router.add_get(f"{c}/customer_files/{{file_path}}", _ctl_customer_file)
    app.router.add_post(f"{c}/advertisers", _ctl_advertisers)
    app.router.add_post(f"{c}/audiences", _ctl_audiences)
    app.router.add_get(f"{c}/faults", _ctl_faults_get)
    app.router.add_post(f"{c}/faults", _ctl_faults_set)
    app.router.add_delete(f"{c}/faults", _ctl_faults_clear)
    app.router.add_get(f"{c}/requests", _ctl_requests)
    app.router.add_get(f"{c}/events", _ctl_events)
    app.router.add_post(f"{c}/reset", _ctl_reset)

    async def _on_shutdown(app: web.Application) -> None:
        # Release handlers parked by `timeout`/`slow` faults so shutdown does not wait an hour.
        app[RUNTIME_KEY].closing.set()

    app.on_shutdown.append(_on_shutdown)
    return app
