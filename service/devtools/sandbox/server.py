"""Ways to run the TikTok sandbox: inside a running event loop (async tests), in a background thread with its
own loop (sync tests, the demo), or as the `audience-sync sandbox` command.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterable
from types import TracebackType
from typing import Any

from aiohttp import web

from service.devtools.sandbox.app import API_PREFIX, RUNTIME_KEY, create_app
from service.devtools.sandbox.faults import FaultPlan
from service.devtools.sandbox.state import SandboxState

log = logging.getLogger(__name__)

DEFAULT_TOKEN = "sandbox-token"
DEFAULT_PORT = 9400


class SandboxServer:
    """The sandbox on a real TCP socket in the current loop; `port=0` picks a free port (see `url`)."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        state: SandboxState | None = None,
        tokens: Iterable[str] | None = None,
        faults: FaultPlan | None = None,
        advertisers: Iterable[str] = (),
        audiences: Iterable[tuple[str, str]] = (),
        auto_create: bool = False,
        max_rows_per_request: int = 10_000,
        audience_ready_delay_s: float = 0.0,
        shutdown_timeout: float = 2.0,
    ) -> None:
        self.host = host
        self.port = port
        self.state = state or SandboxState(
            auto_create=auto_create,
            max_rows_per_request=max_rows_per_request,
            audience_ready_delay_s=audience_ready_delay_s,
        )
        self.state.register_all(advertisers, audiences)
        self._tokens = frozenset(tokens) if tokens is not None else frozenset({DEFAULT_TOKEN})
        self._faults = faults
        self._shutdown_timeout = shutdown_timeout
        self._app: web.Application | None = None
        self._runner: web.AppRunner | None = None

    @property
    def base_url(self) -> str:
        """Scheme, host and port, for the `/_sandbox/` control API."""
        return f"http://{self.host}:{self.port}"

    @property
    def url(self) -> str:
        """What the service's TIKTOK_API_URL should be."""
        return self.base_url + API_PREFIX

    @property
    def faults(self) -> FaultPlan | None:
        return self._app[RUNTIME_KEY].faults if self._app is not None else self._faults

    def set_faults(self, plan: FaultPlan | dict[str, object] | list[object] | None) -> None:
        """Replace the fault plan (a plain attribute swap, so safe from another thread too); JSON form accepted."""
        if plan is not None and not isinstance(plan, FaultPlan):
            plan = FaultPlan.from_json(plan)
        self._faults = plan
        if self._app is not None:
            self._app[RUNTIME_KEY].faults = plan

    async def start(self) -> SandboxServer:
        self._app = create_app(self.state, tokens=self._tokens, faults=self._faults)
        # No access log: it would be noise in `make run`, and the sandbox keeps its own request log.
        self._runner = web.AppRunner(self._app, access_log=None, shutdown_timeout=self._shutdown_timeout)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        try:
            await site.start()
        except BaseException:
            await self._runner.cleanup()
            self._runner = None
            raise
        self.port = int(self._runner.addresses[0][1])
        log.info("TikTok sandbox listening on %s", self.url)
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._app is not None:
            self._faults = self._app[RUNTIME_KEY].faults
            self._app = None

    async def __aenter__(self) -> SandboxServer:
        return await self.start()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()


class SandboxThread:
    """`SandboxServer` in a daemon thread with its own event loop, for code that is not async."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, **server_options: Any) -> None:
        """`server_options` are `SandboxServer`'s keyword arguments (state, tokens, faults, advertisers, ...)."""
        self._server = SandboxServer(host, port, **server_options)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stopping: asyncio.Event | None = None
        self._error: BaseException | None = None

    @property
    def state(self) -> SandboxState:
        return self._server.state

    @property
    def url(self) -> str:
        return self._server.url

    @property
    def base_url(self) -> str:
        return self._server.base_url

    @property
    def port(self) -> int:
        return self._server.port

    @property
    def faults(self) -> FaultPlan | None:
        """The plan in force (its `refused` counts show whether a client stayed inside the rate budget)."""
        return self._server.faults

    def set_faults(self, plan: FaultPlan | dict[str, object] | list[object] | None) -> None:
        self._server.set_faults(plan)

    def start(self, timeout: float = 10.0) -> SandboxThread:
        self._thread = threading.Thread(target=self._run, name="tiktok-sandbox", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError("TikTok sandbox did not start in time")
        if self._error is not None:
            self._thread.join(timeout)
            raise self._error
        return self

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._main())
        finally:
            loop.close()

    async def _main(self) -> None:
        self._stopping = asyncio.Event()
        try:
            await self._server.start()
        except BaseException as e:  # handed to the starting thread
            self._error = e
            return
        finally:
            self._ready.set()
        try:
            await self._stopping.wait()
        finally:
            await self._server.stop()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving and join the thread; parked `timeout` faults are released, so this is quick."""
        if self._thread is None:
            return
        loop, stopping = self._loop, self._stopping
        if loop is not None and stopping is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop already finished
                loop.call_soon_threadsafe(stopping.set)
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise RuntimeError("TikTok sandbox thread did not stop in time")
        self._thread = None

    def __enter__(self) -> SandboxThread:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _audience_arg(value: str) -> tuple[str, str]:
    adv, sep, aud = value.partition(":")
    if not sep or not adv or not aud:
        raise argparse.ArgumentTypeError("expected ADVERTISER_ID:AUDIENCE_ID")
    return adv, aud


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="audience-sync sandbox",
        description=(
            "Local stand-in for TikTok's Business API (segment/mapping, segment/audience, customer-file upload, "
            "create and update, event/track, reads)."
        ),
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument(
        "--token",
        action="append",
        help="valid Access-Token (repeatable; default: $TIKTOK_ACCESS_TOKEN or sandbox-token)",
    )
    p.add_argument("--advertiser", action="append", default=[], metavar="ID", help="register an advertiser")
    p.add_argument(
        "--audience",
        action="append",
        default=[],
        type=_audience_arg,
        metavar="ADVERTISER:AUDIENCE_ID",
        help="register an audience (and its advertiser)",
    )
    p.add_argument(
        "--auto-create",
        action="store_true",
        help="create unknown audiences a mapping request names under a known advertiser (default: refuse)",
    )
    p.add_argument("--faults", metavar="FILE.json", help="fault plan (see service/devtools/sandbox/faults.py)")
    p.add_argument("--rate-limit-qps", type=float, help="answer 40100 above this many calls per second")
    p.add_argument(
        "--rate-limit-qpm",
        type=float,
        help="answer 40100 above this many calls per minute, then to every call for --quota-pause-s (TikTok's budget)",
    )
    p.add_argument("--quota-pause-s", type=float, help="seconds an app is refused after a QPM overrun (default 300)")
    p.add_argument(
        "--rate-limit-path",
        help="path the rate limit applies to, relative to /open_api/v1.3 (default /segment/mapping/; * for all)",
    )
    p.add_argument("--seed", type=int, help="seed of the fault plan's random choices")
    p.add_argument("--max-rows", type=int, default=10_000, help="rows per mapping request before 40061")
    p.add_argument(
        "--audience-ready-delay",
        type=float,
        default=0.0,
        help="seconds a created audience refuses mappings (TikTok's warm-up; default 0)",
    )
    return p


def _load_plan(args: argparse.Namespace) -> FaultPlan | None:
    limits = (args.rate_limit_qps, args.rate_limit_qpm, args.quota_pause_s, args.rate_limit_path)
    if args.faults is None and all(v is None for v in limits):
        return None
    raw: object = []
    if args.faults is not None:
        with open(args.faults, encoding="utf-8") as f:
            raw = json.load(f)
    plan = FaultPlan.from_json(raw, seed=args.seed)
    if any(v is not None for v in limits):
        plan = FaultPlan(
            plan.rules,
            rate_limit_qps=args.rate_limit_qps if args.rate_limit_qps is not None else plan.rate_limit_qps,
            rate_limit_qpm=args.rate_limit_qpm if args.rate_limit_qpm is not None else plan.rate_limit_qpm,
            quota_pause_s=args.quota_pause_s if args.quota_pause_s is not None else plan.quota_pause_s,
            rate_limit_path=args.rate_limit_path or plan.rate_limit_path,
            seed=plan.seed,
        )
    return plan


async def _serve(server: SandboxServer) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        print(f"TikTok sandbox listening: TIKTOK_API_URL={server.url}", flush=True)
        await stop.wait()
        log.info("TikTok sandbox stopping")


def main(argv: list[str] | None = None) -> int:
    """Body of `audience-sync sandbox`: serve until SIGINT/SIGTERM; 0 on a clean stop, 2 on bad input."""
    args = _parser().parse_args(argv)
    tokens = args.token or [os.environ.get("TIKTOK_ACCESS_TOKEN") or DEFAULT_TOKEN]
    try:
        plan = _load_plan(args)
    except (OSError, ValueError) as e:
        print(f"sandbox: bad fault plan {args.faults}: {e}", file=sys.stderr)
        return 2
    server = SandboxServer(
        args.host,
        args.port,
        tokens=tokens,
        faults=plan,
        advertisers=args.advertiser,
        audiences=args.audience,
        auto_create=args.auto_create,
        max_rows_per_request=args.max_rows,
        audience_ready_delay_s=args.audience_ready_delay,
    )
    try:
        asyncio.run(_serve(server))
    except OSError as e:
        print(f"sandbox: cannot listen on {args.host}:{args.port}: {e}", file=sys.stderr)
        return 1
    return 0
