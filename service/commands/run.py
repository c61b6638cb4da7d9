"""`audience-sync run`: wires settings into the pipeline, the TikTok client and the ops server, and owns
their lifecycles (aiohttp app factory + cleanup contexts, as aiohttp-demos does)."""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import os
import random
import signal
import time
from collections.abc import Mapping

import aiohttp
from aiohttp import web

from service import __version__
from service import metrics as m
from service.config import ConfigError, Settings, TokenSource, client_config, consumer_config, mask, producer_config
from service.core.batcher import Batcher
from service.core.dlq_guard import DlqGuard
from service.core.file_batcher import FileBatcher
from service.core.mappings import Mappings, MappingsError, load_mappings
from service.core.membership import Resolver, ResolverSettings
from service.core.offline import MAX_EVENTS_PER_REQUEST
from service.core.offline_batcher import OfflineBatcher
from service.core.retry import Backoff
from service.core.schemas import SchemaStore
from service.http import create_ops_app, heartbeat_check
from service.kafka.audience_store import AudienceStore
from service.kafka.consumer import KafkaSourceConsumer
from service.kafka.producer import AsyncProducer
from service.kafka.schema_registry import SchemaRegistryClient
from service.pipeline.audience_creation import AudienceCreator
from service.pipeline.audience_health import AudienceHealth, AudienceRef, audience_targets
from service.pipeline.loop import IntakeHook, Pipeline, PipelineOptions
from service.pipeline.mappings_watch import MappingsWatcher
from service.tiktok.audiences_api import AudiencesApi
from service.tiktok.client import ControlLimiter, TikTokClient
from service.tiktok.customer_files_api import CustomerFilesApi

log = logging.getLogger("service")


def resolver_settings(s: Settings) -> ResolverSettings:
    return ResolverSettings(
        enter_event_names=s.enter_names(),
        exit_event_names=s.exit_names(),
        default_advertiser_id=s.default_advertiser_id,
        phone_default_region=s.phone_default_region,
        send_email=s.send_email,
        send_phone=s.send_phone,
        send_idfa=s.send_idfa,
        send_aaid=s.send_aaid,
        max_record_bytes=s.max_record_bytes,
    )


def load_initial_mappings(s: Settings) -> Mappings:
    if s.mappings_file is None:
        return Mappings.empty()
    try:
        return load_mappings(s.mappings_file)
    except MappingsError as exc:
        raise ConfigError(f"MAPPINGS_FILE: {exc}") from None


@functools.cache
def _control_limiter(qps: float) -> ControlLimiter:
    return ControlLimiter(qps)


def control_limiter(settings: Settings) -> ControlLimiter:
    """The process's one control-plane limiter: the upload client and the health poll share it."""
    return _control_limiter(settings.tiktok_control_qps)


def backoff(settings: Settings) -> Backoff:
    return Backoff(settings.retry_base_s, settings.retry_max_s, settings.retry_budget_s, random.Random())


def build_pipeline(
    settings: Settings,
    environ: Mapping[str, str],
    session: aiohttp.ClientSession,
    token: TokenSource,
    mappings: Mappings,
    dlq: AsyncProducer,
    dlq_topic: str,
    *,
    intake: IntakeHook | None = None,
    guard: bool = True,
) -> Pipeline:
    """The pipeline as `run` configures it; `replay --mode process` reuses it on the dead-letter topic."""
    schemas = SchemaStore()
    fetcher = (
        SchemaRegistryClient(session, settings.schema_registry_url, schemas) if settings.schema_registry_url else None
    )
    tiktok = TikTokClient(
        session,
        settings.tiktok_api_url,
        token.get,
        timeout_s=settings.tiktok_timeout_s,
        control=control_limiter(settings),
    )
    return Pipeline(
        resolver=Resolver(resolver_settings(settings), mappings, schemas),
        batcher=Batcher(
            max_rows=settings.batch_max_rows,
            max_bytes=settings.batch_max_bytes,
            linger_s=settings.batch_linger_ms / 1000,
            clock=time.monotonic,
        ),
        uploader=tiktok,
        event_uploader=tiktok,
        # Offline events: BATCH_MAX_ROWS / BATCH_MAX_BYTES / BATCH_LINGER_MS too, within TikTok's 1,000 per request.
        offline_batcher=OfflineBatcher(
            max_rows=min(settings.batch_max_rows, MAX_EVENTS_PER_REQUEST),
            max_bytes=settings.batch_max_bytes,
            linger_s=settings.batch_linger_ms / 1000,
            clock=time.monotonic,
        ),
        files_api=CustomerFilesApi(tiktok),
        file_batcher=FileBatcher(
            interval_s=settings.file_interval_s, max_rows=settings.file_max_rows, clock=time.monotonic
        ),
        dlq=dlq,
        dlq_topic=dlq_topic,
        backoff=backoff(settings),
        options=PipelineOptions(
            max_inflight=settings.max_inflight_requests,
            max_pending=settings.max_pending_events,
            # one consume call may overshoot the cap by at most a quarter of it
            consume_batch=max(1, min(1000, settings.max_pending_events // 4)),
            drain_timeout_s=settings.drain_timeout_s,
            revoke_timeout_s=settings.revoke_timeout_s,
            auth_retry_s=settings.auth_retry_s,
            max_qps=settings.tiktok_max_qps,
            events_max_qps=settings.tiktok_events_max_qps,
            events_max_rows_scarce=min(settings.batch_max_rows_ceiling, MAX_EVENTS_PER_REQUEST),
            max_rows_scarce=max(settings.batch_max_rows, settings.batch_max_rows_ceiling),
            quota_pause_s=settings.tiktok_quota_pause_s,
        ),
        schema_fetcher=fetcher,
        intake=intake,
        creator=AudienceCreator(
            AudienceStore(client_config(settings, environ), settings.audience_store),
            AudiencesApi(tiktok),
            backoff(settings),
            auth_retry_s=settings.auth_retry_s,
        ),
        guard=DlqGuard(
            settings.dlq_guard_max_consecutive,
            settings.dlq_guard_cooldown_s,
            time.monotonic,
            max_ratio=settings.dlq_guard_max_ratio,
            window=settings.dlq_guard_window,
        )
        if guard
        else None,
    )


def start_audience_health(
    settings: Settings, session: aiohttp.ClientSession, token: TokenSource, pipeline: Pipeline
) -> asyncio.Task[None] | None:
    """The audience health poll (pipeline/audience_health.py) as a background task; None when disabled."""
    if settings.audience_health_interval_s <= 0:
        return None
    api = AudiencesApi(
        TikTokClient(
            session,
            settings.tiktok_api_url,
            token.get,
            timeout_s=settings.tiktok_timeout_s,
            control=control_limiter(settings),
        )
    )

    def created() -> dict[AudienceRef, str]:
        # dict() of a dict is one C-level copy: atomic under the GIL against the store's tail thread.
        known = dict(pipeline.creator.store.ids) if pipeline.creator is not None else {}
        known.update(pipeline.resolver.created_audiences)
        return known

    poller = AudienceHealth(
        api,
        lambda: audience_targets(pipeline.resolver.mappings, settings.default_advertiser_id, created()),
        interval_s=settings.audience_health_interval_s,
    )
    return asyncio.create_task(poller.run(), name="audience-health")


async def serve(settings: Settings, environ: Mapping[str, str], stop: asyncio.Event) -> None:
    """Run until `stop` is set, then drain and commit. Raises ConfigError before anything starts."""
    mappings = load_initial_mappings(settings)
    m.BUILD.info({"version": __version__})
    m.MAPPINGS_ENTRIES.set(len(mappings))
    cconf: dict[str, object] = dict(consumer_config(settings, environ))
    cconf.setdefault("statistics.interval.ms", "15000")
    log.info(
        "starting: topics=%s dlq=%s group=%s tiktok=%s mappings=%d kafka=%s",
        settings.source_topics,
        settings.dead_letter_topic,
        settings.consumer_group,
        settings.tiktok_api_url,
        len(mappings),
        mask(cconf),
    )
    token = TokenSource(settings)
    connector = aiohttp.TCPConnector(limit=settings.max_inflight_requests * 2, ttl_dns_cache=300)
    async with aiohttp.ClientSession(connector=connector, json_serialize=None) as session:  # type: ignore[arg-type]
        dlq = AsyncProducer(producer_config(settings, environ))
        pipeline = build_pipeline(settings, environ, session, token, mappings, dlq, settings.dead_letter_topic)
        cconf["stats_cb"] = pipeline.on_stats
        cconf["error_cb"] = pipeline.on_error
        consumer = KafkaSourceConsumer(
            cconf,
            settings.source_topics,
            on_assign=pipeline.on_assign,
            on_revoke=pipeline.on_revoke,
            on_lost=pipeline.on_lost,
        )

        def ready() -> tuple[bool, str]:
            problems = []
            if not pipeline.started or not consumer.assigned:
                problems.append("no partitions assigned")
            if not pipeline.broker_ok:
                problems.append("broker unreachable")
            if not pipeline.auth_ok:
                problems.append("TikTok rejects the access token")
            if not pipeline.endpoint_ok:
                problems.append("TIKTOK_API_URL does not answer as TikTok's API")
            return (not problems, "; ".join(problems) or "ok")

        ops = create_ops_app(heartbeat_check(lambda: pipeline.heartbeat, 30.0), ready)
        watcher_task: asyncio.Task[None] | None = None
        if settings.mappings_file is not None:
            watcher = MappingsWatcher(settings.mappings_file, pipeline.set_mappings)
            watcher_task = asyncio.create_task(watcher.run(), name="mappings-watch")
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, watcher.reload)
        health_task = start_audience_health(settings, session, token, pipeline)
        runner = web.AppRunner(ops, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, settings.http_host, settings.http_port)
        await site.start()
        log.info("ops endpoint on http://%s:%d/metrics", settings.http_host, settings.http_port)
        try:
            await pipeline.run(consumer, stop)
        finally:
            if watcher_task is not None:
                watcher_task.cancel()
            if health_task is not None:
                health_task.cancel()
                await asyncio.gather(health_task, return_exceptions=True)
            left = dlq.close()
            if left:
                log.error("%d dead letters were not acknowledged; their offsets were not committed", left)
            await runner.cleanup()
    log.info("stopped")


def install_signal_handlers(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)


def tune_gc() -> None:
    """Fewer, cheaper cyclic collections.

    Tens of thousands of buffered rows are alive at any time and almost none are in reference cycles, yet with
    the default thresholds every 700 allocations start a collection that walks them: a fifth of the CPU in
    profiles. Startup objects are frozen out of collection, and young-generation collections are rarer.
    """
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


async def _main(settings: Settings) -> None:
    tune_gc()
    stop = asyncio.Event()
    install_signal_handlers(stop)
    await serve(settings, os.environ, stop)


def run(settings: Settings) -> int:
    asyncio.run(_main(settings))
    return 0
