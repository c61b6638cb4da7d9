"""The sync loop: the asyncio edge that drives the pure core, as a table of contents.

Each turn: consume → intake (resolve, track, route) → dispatch → store offsets → pause/resume. Every step is
delegated to a collaborator that owns one promise and states it as an invariant:

- `Ledger` (core): nothing is committed past an unfinished record; memory is bounded by the tracked count;
- `Pauses` (core): a partition is paused exactly while it has a reason;
- `Intake` / `Router`: records are tracked before anything can finish them, never for revoked partitions;
- `AudienceHolds`: records of an audience being created keep their order;
- `UploadScheduler` + `decide` (core): every row ends exactly once; no request carries a revoked row. Two
  instances: audience changes (`segment/mapping`) and offline events (`/event/track/`, `OfflineSink`), each
  with its own token bucket (TikTok budgets the two endpoints apart, docs/tiktok-api.md §8.1) and one shared
  `UploadGate` (one access token: an auth outage stops both);
- `UploadGate`: an auth or endpoint outage stops uploads and always ends by itself;
- `DeadLetterWriter`: a record is finished as dead-lettered only after the broker acked its letter;
- `BrokerHealth`: readiness and lag.

Flush-then-commit is the one at-least-once mechanism: an offset is stored only when every record up to it is
uploaded, skipped, superseded or dead-lettered with a broker ack, whichever stream (audiences or offline
events) it belongs to: both finish records in the one `Ledger`. Only this loop touches the consumer.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

from confluent_kafka import KafkaError

from service import metrics as m
from service.core.batcher import Batch, Batcher, Row
from service.core.dead_letters import DeadLetter
from service.core.dlq_guard import DlqGuard
from service.core.file_batcher import FILE_INTERVAL_S, FILE_MAX_ROWS, FileBatcher, FileRow
from service.core.ledger import Ledger
from service.core.mappings import Mappings
from service.core.membership import Resolver
from service.core.model import DlqReason, Rejected
from service.core.offline_batcher import OfflineBatcher, OfflineRow
from service.core.pauses import Pauses
from service.core.retry import Backoff, TokenBucket
from service.core.schemas import SchemaNotLoaded
from service.core.types import TopicPartition
from service.kafka.source import SourceConsumer, SourceMessage
from service.pipeline.audience_creation import AudienceCreator
from service.pipeline.dead_letters import DeadLetterWriter, LetterProducer
from service.pipeline.file_uploads import FileUploads
from service.pipeline.gate import UploadGate
from service.pipeline.holds import AudienceHolds
from service.pipeline.intake import Intake, IntakeHook, Router, SchemaFetcher, Source
from service.pipeline.stats import BrokerHealth, brokers_up
from service.pipeline.tasks import Tasks
from service.pipeline.uploads import (
    OFFLINE_MAX_ROWS_SCARCE,
    EventUploader,
    OfflineSink,
    Uploader,
    UploadScheduler,
)
from service.tiktok.customer_files_api import CustomerFilesApi

__all__ = ["IntakeHook", "Pipeline", "PipelineOptions", "Source", "brokers_up"]

log = logging.getLogger(__name__)


@dataclass(slots=True)
class PipelineOptions:
    max_inflight: int = 4
    max_pending: int = 50_000  # bound on tracked records (consumed, not yet committable)
    consume_batch: int = 1000
    consume_timeout_s: float = 0.02  # consume() waits this long for a full batch: a latency floor
    drain_timeout_s: float = 20.0
    revoke_timeout_s: float = 10.0
    auth_retry_s: float = 15.0
    max_qps: float = 8.0
    events_max_qps: float = 50.0  # /event/track/ has its own budget (docs/tiktok-api.md §8.1)
    events_max_rows_scarce: int = OFFLINE_MAX_ROWS_SCARCE  # events per request while requests are scarce (<= 1,000)
    max_rows_scarce: int = 10_000  # rows per request while the QPS cap or the in-flight slots bind
    quota_pause_s: float = 310.0  # TikTok pauses an app that overran its per-minute quota for 5 minutes
    quota_after_s: float = 20.0  # only rate-limit answers for this long: the per-minute quota is spent
    registry_retry_s: float = 5.0
    audience_warmup_s: float = 180.0
    # Replay runs until the topic is drained: stop after this long with nothing consumed and nothing pending.
    stop_when_idle_s: float | None = None


class Pipeline:
    def __init__(
        self,
        *,
        resolver: Resolver,
        batcher: Batcher,
        uploader: Uploader,
        dlq: LetterProducer,
        dlq_topic: str,
        backoff: Backoff,
        options: PipelineOptions,
        schema_fetcher: SchemaFetcher | None = None,
        intake: IntakeHook | None = None,
        guard: DlqGuard | None = None,
        creator: AudienceCreator | None = None,
        event_uploader: EventUploader | None = None,
        offline_batcher: OfflineBatcher | None = None,
        files_api: CustomerFilesApi | None = None,
        file_batcher: FileBatcher | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.opt = options
        self.clock = clock
        self.wall = wall
        self.resolver = resolver
        self.batcher = batcher
        self.ledger = Ledger()
        self.pauses = Pauses()
        self.health = BrokerHealth()
        self.consumer: SourceConsumer | None = None
        self.creator = creator
        self._tasks = Tasks("pipeline")
        self._closing = False
        self.started = False
        self.heartbeat = clock()
        self.gate = UploadGate(
            options.auth_retry_s, quota_pause_s=options.quota_pause_s, on_change=self._changed, sleep=sleep
        )
        self.dead_letters = DeadLetterWriter(
            dlq,
            dlq_topic,
            guard or DlqGuard(0, 0.0, clock),
            is_live=self._is_live_source,
            finish=self._finish,
            after_hold=self._after_hold,
            on_change=self._changed,
            wall=wall,
            backoff=backoff,
            sleep=sleep,
        )
        self.holds = AudienceHolds(creator, reroute=self._reroute, dead_letter=self._dead_letter, spawn=self._spawn)
        resolver.created_audiences = self.holds.created  # written only when held records are routed
        self._counts: collections.Counter[tuple[Any, ...]] = collections.Counter()
        # Offline events flow only with an uploader for them; otherwise the Router dead-letters them (a defect).
        self.offline_batcher = (
            (offline_batcher or OfflineBatcher(linger_s=batcher.linger_s, clock=clock))
            if event_uploader is not None
            else None
        )
        # File audiences flow only with the customer-file API; otherwise the Router dead-letters their records.
        self.file_batcher = (
            (file_batcher or FileBatcher(interval_s=FILE_INTERVAL_S, max_rows=FILE_MAX_ROWS, clock=clock))
            if files_api is not None
            else None
        )
        self.router = Router(
            offline=self.offline_batcher,
            files=self.file_batcher,
            batcher=batcher,
            holds=self.holds,
            guard=self.dead_letters.guard,
            finish=self._finish,
            dead_letter=self._dead_letter,
            counts=self._counts,
        )
        self.intake = Intake(
            resolver=resolver,
            ledger=self.ledger,
            router=self.router,
            pauses=self.pauses,
            seek=self._seek,
            spawn=self._spawn,
            on_change=self._changed,
            schema_fetcher=schema_fetcher,
            hook=intake,
            registry_retry_s=options.registry_retry_s,
            sleep=sleep,
        )
        self.uploads = UploadScheduler(
            batcher=batcher,
            uploader=uploader,
            outcomes=self,
            gate=self.gate,
            backoff=backoff,
            bucket=TokenBucket(options.max_qps, clock=clock),
            max_inflight=options.max_inflight,
            max_rows_scarce=options.max_rows_scarce,
            quota_after_s=options.quota_after_s,
            recently_created=self._recently_created,
            clock=clock,
            sleep=sleep,
        )
        self.offline_uploads: UploadScheduler | None = None
        if event_uploader is not None and self.offline_batcher is not None:
            self.offline_uploads = UploadScheduler(
                batcher=self.offline_batcher,
                outcomes=_OfflineOutcomes(self),
                gate=self.gate,
                backoff=backoff,
                bucket=TokenBucket(options.events_max_qps, clock=clock),
                max_inflight=options.max_inflight,
                max_rows_scarce=min(options.events_max_rows_scarce, OFFLINE_MAX_ROWS_SCARCE),
                quota_after_s=options.quota_after_s,
                sink=OfflineSink(event_uploader),
                clock=clock,
                sleep=sleep,
                gauges=False,
            )
        self.file_uploads: FileUploads | None = None
        if files_api is not None and self.file_batcher is not None:
            if creator is not None:
                self.file_batcher.known = creator.store.ids  # audiences created on demand by earlier runs
            self.file_uploads = FileUploads(
                batcher=self.file_batcher,
                api=files_api,
                outcomes=_FileOutcomes(self),
                gate=self.gate,
                backoff=backoff,
                bucket=self.uploads.bucket,  # one data-plane budget with segment/mapping
                creator=creator,
                pressure=self._file_pressure,
                clock=clock,
                sleep=sleep,
            )
        self._schedulers: list[_Scheduler] = [self.uploads]
        if self.offline_uploads is not None:
            self._schedulers.append(self.offline_uploads)
        if self.file_uploads is not None:
            self._schedulers.append(self.file_uploads)

    # -- the loop -------------------------------------------------------------------------------------------

    async def run(self, consumer: SourceConsumer, stop: asyncio.Event) -> None:
        self.consumer = consumer
        await consumer.start()
        self.started = True
        dispatchers = [asyncio.create_task(u.run(), name=f"dispatch-{i}") for i, u in enumerate(self._schedulers)]
        idle_since = self.clock()
        batch, timeout = self.opt.consume_batch, self.opt.consume_timeout_s
        # The next consume() runs on the consumer thread while this batch is processed on the loop.
        fetch: asyncio.Future[Any] = asyncio.ensure_future(consumer.consume(batch, timeout))
        try:
            while not stop.is_set():
                msgs: list[SourceMessage] = list(await fetch)
                fetch = asyncio.ensure_future(consumer.consume(batch, timeout))
                self.heartbeat = now = self.clock()
                if msgs:
                    if msgs[-1].error() is None:
                        self.health.fetched()
                    idle_since = now
                    await self.intake.process(msgs)
                    self._wake_uploads()
                self._store_offsets()
                self._apply_pauses()
                if self.ledger.pending() or self.holds.held_records or not consumer.assigned:
                    idle_since = now  # idle counts from assignment: a group join is not an empty topic
                elif self.opt.stop_when_idle_s is not None and now - idle_since >= self.opt.stop_when_idle_s:
                    break
            await asyncio.gather(fetch, return_exceptions=True)  # consumed after stop: left uncommitted
            await self._drain()
        finally:
            self._closing = True
            for d in dispatchers:
                d.cancel()
            self.gate.close_all()
            self.dead_letters.close()
            await asyncio.gather(*dispatchers, return_exceptions=True)
            await self._tasks.close()
            for u in self._schedulers:
                await u.close()
            await consumer.close()

    async def _drain(self) -> None:
        """SIGTERM: stop fetching, flush everything within the deadline, store and commit what finished."""
        assert self.consumer is not None
        await self._flush_until(lambda: self.ledger.pending() > self._waiting(None), self.opt.drain_timeout_s)
        left = self.ledger.pending()
        if left:
            log.warning("drain deadline passed with %d records unfinished; they will be consumed again", left)
        self._store_offsets()
        await self.consumer.commit()
        log.info("drained: offsets committed")

    async def _flush_until(self, busy: Callable[[], bool], timeout_s: float) -> None:
        deadline = self.clock() + timeout_s
        for u in self._schedulers:
            u.force += 1
            u.wake()
        try:
            while busy() and self.clock() < deadline:
                await asyncio.sleep(0.02)
        finally:
            for u in self._schedulers:
                u.force -= 1

    def _wake_uploads(self) -> None:
        for u in self._schedulers:
            u.wake()

    def set_mappings(self, mappings: Mappings) -> None:
        """Swap in reloaded mappings: records resolved from now on use them."""
        self.resolver.mappings = mappings
        self.dead_letters.release("mappings reloaded")

    # -- consumer housekeeping ------------------------------------------------------------------------------

    def _store_offsets(self) -> None:
        assert self.consumer is not None
        offsets = self.ledger.take_committable()
        if offsets:
            self.consumer.store(offsets)

    def _apply_pauses(self) -> None:
        assert self.consumer is not None
        tracked = self.ledger.tracked
        m.PENDING.set(self.ledger.pending())
        pauses = self.pauses
        if tracked >= self.opt.max_pending:
            pauses.set_global("backpressure", True)
        elif tracked <= self.opt.max_pending // 2:
            pauses.set_global("backpressure", False)
        pauses.set_global("upload_gate", not self.gate.is_open)
        pauses.set_global("dlq_guard", self.dead_letters.tripped)
        plan = pauses.plan(self.consumer.assigned)
        if plan.pause:
            self.consumer.pause(plan.pause)
        if plan.resume:
            self.consumer.resume(plan.resume)
        pauses.applied(plan)
        m.PAUSED_PARTITIONS.set(len(pauses.paused))

    def _changed(self) -> None:
        """A collaborator changed a pause reason or freed capacity: re-evaluate at once."""
        if self.consumer is not None and not self._closing:
            self._apply_pauses()
        self._wake_uploads()

    async def _seek(self, tp: TopicPartition, offset: int) -> None:
        assert self.consumer is not None
        await self.consumer.seek(tp, offset)

    async def on_assign(self, tps: list[TopicPartition]) -> list[TopicPartition]:
        m.REBALANCES.labels("assign").inc()
        log.info("assigned %s", _fmt(tps))
        self.ledger.assign(tps)  # a fresh start from the committed offset
        self.pauses.forget(tps)
        # Newly assigned partitions start unpaused; global reasons pause them at once (Kafka Connect does the
        # same). The pause is made here, on the loop, and recorded in the same step: had the consumer paused
        # them after this hook returned, a pause plan made in between would miss them and they would stay
        # paused for good.
        if self.pauses.any_global or self.ledger.tracked >= self.opt.max_pending or not self.gate.is_open:
            assert self.consumer is not None
            self.consumer.pause(list(tps))
            self.pauses.paused_by_consumer(tps)
        return []

    async def on_revoke(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        """Flush the revoked partitions' work within the deadline; commit what finished, drop the rest."""
        m.REBALANCES.labels("revoke").inc()
        log.info("revoked %s", _fmt(tps))
        if not self._closing:
            await self._flush_until(
                lambda: any(self.ledger.pending(tp) > self._waiting(tp) for tp in tps), self.opt.revoke_timeout_s
            )
        offsets = {tp: c for tp in tps if (c := self.ledger.committable(tp)) is not None}
        self._forget(tps)
        return offsets

    async def on_lost(self, tps: list[TopicPartition]) -> None:
        m.REBALANCES.labels("lost").inc()
        log.warning("lost %s: their unfinished work is dropped uncommitted", _fmt(tps))
        self._forget(tps)

    def _forget(self, tps: list[TopicPartition]) -> None:
        """After this returns nothing of `tps` is live: no request may start with their rows."""
        self.ledger.revoke(tps)
        self.batcher.drop_partitions(tps)
        if self.offline_batcher is not None:
            self.offline_batcher.drop_partitions(tps)
        if self.file_batcher is not None:
            self.file_batcher.drop_partitions(tps)
        self.intake.forget(tps)
        self.pauses.forget(tps)
        self.health.forget(tps)

    # -- outcomes (the scheduler's and the writer's callbacks) ----------------------------------------------

    def live(self, rows: list[Row]) -> list[Row]:
        return self.ledger.live(rows)

    def _is_live_source(self, src: Source) -> bool:
        return self.ledger.is_live(src.ref, src)

    def _finish(self, src: Source | None) -> None:
        if src is not None:
            self.ledger.finish(src.ref, src)

    def uploaded(self, rows: list[Row]) -> None:
        """A batch landed: finish its records; latency and counts are recorded once for the batch."""
        self.dead_letters.guard.ok()
        now_ms = self.wall() * 1000
        m.LAST_UPLOAD.set(now_ms / 1000)
        if rows:
            m.EVENTS_UPLOADED.labels(rows[0].change.action.value).inc(len(rows))
        latencies = []
        for row in rows:
            src = row.source
            t = row.change.event_time_ms or (src.timestamp_ms if src is not None else None)
            if t:
                latencies.append(max(0.0, (now_ms - t) / 1000))
        self.ledger.finish_all(rows)
        m.observe_many(m.EVENT_TO_ACK, latencies)

    def dead_letter(self, source: Any, letter: DeadLetter) -> Awaitable[None]:
        return self.dead_letters.write(source, letter)

    def _dead_letter(self, src: Source, letter: DeadLetter) -> None:
        self._spawn(self.dead_letters.write(src, letter))

    def _reroute(self, src: Source) -> None:
        """A held record, once its audience exists: resolve it again and route it (in the caller's turn)."""
        if not self._is_live_source(src):
            return
        try:
            outcome = self.resolver.process(src.value, src.headers).outcome
        except SchemaNotLoaded:  # it decoded a moment ago, so its schema is cached
            outcome = Rejected(DlqReason.INVALID_PAYLOAD, "schema no longer available")
        self.router.route(src, outcome)
        self.router.flush_counts()
        self._wake_uploads()

    def _after_hold(self, src: Source, letter: DeadLetter) -> DeadLetter | None:
        """A record held by the guard, after it opened: resolve it again; None when it now syncs instead."""
        if letter.reason not in _MAPPING_REASONS:
            return letter
        try:
            outcome = self.resolver.process(src.value, src.headers).outcome
        except SchemaNotLoaded:
            return letter
        if isinstance(outcome, Rejected):
            return DeadLetter(outcome.reason, outcome.error)
        self.router.route(src, outcome)
        self.router.flush_counts()
        self._wake_uploads()
        return None

    def _recently_created(self, batch: Batch) -> bool:
        """TikTok refuses mappings for a minute or two after creating an audience: that is not a bad row."""
        if self.creator is None:
            return False
        now = self.wall()
        for row in batch.rows:
            created = self.creator.store.created_at(row.change.audience_id)
            if created is not None and now - created < self.opt.audience_warmup_s:
                return True
        return False

    def _waiting(self, tp: TopicPartition | None) -> int:
        """Records (of `tp`, or all) that no flush can finish: they wait in file audiences to be created once
        1,000 users are to be added. A drain or revoke does not wait for them; they stay uncommitted."""
        return self.file_batcher.waiting_rows(tp) if self.file_batcher is not None else 0

    def _file_pressure(self) -> bool:
        """Buffered file-audience records hold a good part of the consumer's bound and it is near: cut them now
        rather than let their interval pause consumption (they stay tracked, uncommitted, until TikTok accepted
        their update). Not while the bound fills for another reason: small files would only spend requests."""
        files = self.file_batcher
        bound = self.opt.max_pending
        return files is not None and files.pending_rows >= bound // 4 and self.ledger.tracked >= bound * 3 // 4

    def _spawn(self, coro: Any) -> None:
        self._tasks.spawn(coro)

    # -- readiness and statistics ---------------------------------------------------------------------------

    @property
    def broker_ok(self) -> bool:
        return self.health.ok

    @property
    def auth_ok(self) -> bool:
        return self.gate.reason != "auth"

    @property
    def endpoint_ok(self) -> bool:
        return self.gate.reason != "endpoint"

    def on_stats(self, stats_json: str) -> None:
        self.health.on_stats(stats_json)

    def on_error(self, err: KafkaError) -> None:
        self.health.on_error(err)


# Dead-letter reasons a mappings fix resolves: held letters of these are resolved again when the guard opens.
_MAPPING_REASONS = (DlqReason.MISSING_AUDIENCE_ID, DlqReason.MISSING_ADVERTISER_ID, DlqReason.MISSING_EVENT_SET_ID)


class _OfflineOutcomes:
    """The offline scheduler's outcomes: the same ledger and dead-letter writer, no audience cell logic."""

    def __init__(self, pipeline: Pipeline) -> None:
        self._p = pipeline

    def live(self, rows: list[OfflineRow]) -> list[OfflineRow]:
        return self._p.ledger.live(rows)

    def uploaded(self, rows: list[OfflineRow]) -> None:
        """A batch landed: finish its records, count them by TikTok event name."""
        p = self._p
        p.dead_letters.guard.ok()
        now = p.wall()
        m.LAST_UPLOAD.set(now)
        sent: collections.Counter[str] = collections.Counter()
        for row in rows:
            sent[row.event.event] += 1
        p.ledger.finish_all(rows)
        for event, n in sent.items():
            m.OFFLINE_EVENTS.labels(event, "sent").inc(n)

    def dead_letter(self, source: Any, letter: DeadLetter) -> Awaitable[None]:
        return self._p.dead_letters.write(source, letter)


class _FileOutcomes:
    """The file uploader's outcomes: the same ledger and dead-letter writer."""

    def __init__(self, pipeline: Pipeline) -> None:
        self._p = pipeline

    def is_live(self, row: FileRow) -> bool:
        return self._p.ledger.is_live(row.ref, row.source)

    def uploaded(self, rows: list[FileRow]) -> None:
        """TikTok accepted the updates these records needed: finish them, count them by action."""
        p = self._p
        p.dead_letters.guard.ok()
        m.LAST_UPLOAD.set(p.wall())
        actions: collections.Counter[str] = collections.Counter()
        finish = p.ledger.finish
        for row in rows:
            actions[row.change.action.value] += 1
            if row.source is not None:
                finish(row.source.ref, row.source)
        for action, n in actions.items():
            m.EVENTS_UPLOADED.labels(action).inc(n)

    def dead_letter(self, source: Any, letter: DeadLetter) -> Awaitable[None]:
        return self._p.dead_letters.write(source, letter)


class _Scheduler(Protocol):
    force: int

    def wake(self) -> None: ...

    def run(self) -> Coroutine[Any, Any, None]: ...

    async def close(self) -> None: ...


def _fmt(tps: list[TopicPartition]) -> str:
    return ", ".join(f"{tp.topic}[{tp.partition}]" for tp in sorted(tps)) or "nothing"
