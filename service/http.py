"""The operations endpoint: `/metrics`, `/healthz`, `/readyz`, served by aiohttp next to the pipeline."""

from __future__ import annotations

import time
from collections.abc import Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.metrics import REGISTRY

Check = Callable[[], tuple[bool, str]]
LIVE_KEY = web.AppKey[Check]("liveness")
READY_KEY = web.AppKey[Check]("readiness")


async def metrics_view(_: web.Request) -> web.Response:
    body = generate_latest(REGISTRY)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def healthz(request: web.Request) -> web.Response:
    ok, why = request.app[LIVE_KEY]()
    return web.json_response({"ok": ok, "detail": why}, status=200 if ok else 503)


async def readyz(request: web.Request) -> web.Response:
    ok, why = request.app[READY_KEY]()
    return web.json_response({"ok": ok, "detail": why}, status=200 if ok else 503)


def create_ops_app(liveness: Check, readiness: Check) -> web.Application:
    app = web.Application()
    app[LIVE_KEY] = liveness
    app[READY_KEY] = readiness
    app.router.add_get("/metrics", metrics_view)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app


def heartbeat_check(
    last_beat: Callable[[], float], max_age_s: float, clock: Callable[[], float] = time.monotonic
) -> Check:
    def check() -> tuple[bool, str]:
        age = clock() - last_beat()
        return (age <= max_age_s, f"consumer loop last turned {age:.1f}s ago")

    return check
