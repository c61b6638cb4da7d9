"""The sync loop: the I/O edge that drives the pure core.

One task owns the consumer (consume → resolve → batch → store offsets → pause/resume); uploads and dead letters
run as their own tasks and report back by finishing records on the watermarks. Flush-then-commit is the one
at-least-once mechanism: an offset is stored only when every record up to it is uploaded, skipped, superseded
or dead-lettered with a broker ack.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol, cast

import orjson
from confluent_kafka import KafkaError, Message

from service import metrics as m
from service.core.answers import Answer, Verdict
from service.core.batcher import Batch, Batcher, BatchKey, Row
from service.core.dead_letters import DeadLetter, dead_letter_headers
from service.core.dlq_guard import DlqGuard
from service.core.mappings import Mappings
from service.core.membership import Processed, Resolver
from service.core.model import AudienceChange, AudienceNeeded, DlqReason, Outcome, Rejected, Skipped
from service.core.retry import Backoff, TokenBucket
from service.core.schemas import SchemaNotLoaded
from service.core.watermarks import RecordRef, TopicPartition, Watermarks
from service.kafka.consumer import KafkaSourceConsumer as SourceConsumer
from service.kafka.producer import AsyncProducer, DeliveryError
from service.kafka.schema_registry import RegistryUnavailable
from service.pipeline.audience_creation import AudienceCreator
from service.tiktok.payloads import mapping_body

log = logging.getLogger(__name__)

Headers = list[tuple[str, bytes | None]]
# Replay's hook: (message, headers) → (skip reason or None, headers to process and dead-letter with).
IntakeHook = Callable[[Message, Headers | None], tuple[str | None, Headers | None]]


class Uploader(Protocol):
    async def post_mapping(self, body: bytes) -> Answer: ...


class SchemaFetcher(Protocol):
    async def ensure(self, schema_id: int) -> None: ...


@dataclass(slots=True, eq=False)
class Source:
    """A consumed record still being worked on: what a dead letter needs, and its identity for finishing."""

    ref: RecordRef
    key: bytes | None
    value: bytes | None
    headers: Headers | None
    timestamp_ms: int | None


@dataclass(slots=True)
class PipelineOptions:
    max_inflight: int = 4
    max_pending: int = 50_000
    consume_batch: int = 1000
    consume_timeout_s: float = 0.02  # consume() waits this long for a full batch: a latency floor
    drain_timeout_s: float = 20.0
    revoke_timeout_s: float = 10.0
    auth_retry_s: float = 15.0
    max_qps: float = 40.0
    registry_retry_s: float = 5.0
    audience_warmup_s: float = 180.0
    # Replay runs until the topic is drained: stop after this long with nothing consumed and nothing pending.
    stop_when_idle_s: float | None = None


@dataclass(slots=True)
class _Pauses:
    """Why each partition is paused; a partition is resumed only when no reason is left."""

    reasons: dict[TopicPartition, set[str]] = field(default_factory=dict)

    def add(self, tps: Iterable[TopicPartition], reason: str) -> None:
        for tp in tps:
            self.reasons.setdefault(tp, set()).add(reason)

    def remove(self, tps: Iterable[TopicPartition] | None, reason: str) -> None:
        for tp in list(self.reasons) if tps is None else tps:
            rs = self.reasons.get(tp)
            if rs is not None:
                rs.discard(reason)
                if not rs:
                    del self.reasons[tp]

    def wanted(self) -> set[TopicPartition]:
        return set(self.reasons)


class Pipeline:
    def __init__(
        self,
        *,
        resolver: Resolver,
        batcher: Batcher,
        uploader: Uploader,
        dlq: AsyncProducer,
        dlq_topic: str,
        backoff: Backoff,
        options: PipelineOptions,
        schema_fetcher: SchemaFetcher | None = None,
        intake: IntakeHook | None = None,
        guard: DlqGuard | None = None,
        creator: AudienceCreator | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.creator = creator
        if creator is not None:
            resolver.created_audiences = creator.store.ids  # the same dict: ids appear as the store learns them
        self._held_for_audience: dict[tuple[str, str], list[Source]] = {}
        self.intake = intake
        self.guard = guard or DlqGuard(0, 0.0, clock)
        self._guard_open = asyncio.Event()
        self._guard_open.set()
        self.resolver = resolver
        self.batcher = batcher
        self.uploader = uploader
        self.dlq = dlq
        self.dlq_topic = dlq_topic
        self.backoff = backoff
        self.opt = options
        self.schema_fetcher = schema_fetcher
        self.clock = clock
        self.bucket = TokenBucket(options.max_qps, clock=clock)
        self.watermarks = Watermarks()
        self.live: dict[RecordRef, Source] = {}
        self.consumer: SourceConsumer | None = None
        self.pauses = _Pauses()
        self._counts: collections.Counter[tuple[Any, ...]] = collections.Counter()
        self._rewound: dict[TopicPartition, int] = {}
        self._paused: set[TopicPartition] = set()
        self._backing_off: dict[BatchKey, int] = {}  # batch key → its batches sleeping before a retry
        self._sending = 0
        self._send_slots = asyncio.Semaphore(options.max_inflight)
        self._tasks: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._draining = False
        self._closing = False
        self.auth_ok = True
        self.heartbeat = clock()
        self.broker_ok = True
        self.started = False
        m.RATE_LIMIT_QPS.set(options.max_qps)
        m.AUTH_OK.set(1)

    # -- lifecycle ------------------------------------------------------------------------------------------

    async def run(self, consumer: SourceConsumer, stop: asyncio.Event) -> None:
        self.consumer = consumer
        await consumer.start()
        self.started = True
        dispatcher = asyncio.create_task(self._dispatch_loop(), name="dispatch")
        idle_since = self.clock()
        batch, timeout = self.opt.consume_batch, self.opt.consume_timeout_s
        # The next consume() runs on the consumer thread while this batch is processed on the loop.
        fetch: asyncio.Future[list[Message]] = asyncio.ensure_future(consumer.consume(batch, timeout))
        try:
            while not stop.is_set():
                msgs = await fetch
                fetch = asyncio.ensure_future(consumer.consume(batch, timeout))
                self.heartbeat = now = self.clock()
                if msgs:
                    if msgs[-1].error() is None:
                        self.broker_ok = True  # a record was fetched: the broker is reachable
                    idle_since = now
                    await self._process(msgs)
                    self._wake.set()
                await self._sync_consumer()
                if self.watermarks.pending() or not consumer.assigned:
                    idle_since = now  # idle counts from assignment: a group join is not an empty topic
                elif (
                    self.opt.stop_when_idle_s is not None
                    and consumer.assigned
                    and now - idle_since >= self.opt.stop_when_idle_s
                ):
                    break
            await asyncio.gather(fetch, return_exceptions=True)  # consumed after stop: left uncommitted
            await self._drain()
        finally:
            self._closing = True
            dispatcher.cancel()
            for t in list(self._tasks):
                t.cancel()
            await asyncio.gather(dispatcher, *self._tasks, return_exceptions=True)
            await consumer.close()

    async def _drain(self) -> None:
        """SIGTERM: stop fetching, flush everything within the deadline, store and commit what finished."""
        assert self.consumer is not None
        self._draining = True
        self._wake.set()
        deadline = self.clock() + self.opt.drain_timeout_s
        while self.watermarks.pending() and self.clock() < deadline:
            await asyncio.sleep(0.05)
        left = self.watermarks.pending()
        if left:
            log.warning("drain deadline passed with %d records unfinished; they will be consumed again", left)
        await self._store_offsets()
        await self.consumer.commit()
        log.info("drained: offsets committed")

    def set_mappings(self, mappings: Mappings) -> None:
        """Swap in reloaded mappings: records resolved from now on use them."""
        self.resolver.mappings = mappings
        if self.guard.tripped:
            self._release_guard("mappings reloaded")

    # -- intake ---------------------------------------------------------------------------------------------

    async def _process(self, msgs: list[Message]) -> None:
        skip: set[TopicPartition] = set()
        for msg in msgs:
            err = msg.error()
            if err is not None:
                if err.code() != KafkaError._PARTITION_EOF:
                    log.warning("consume error: %s", err)
                continue
            tp = TopicPartition(msg.topic() or "", msg.partition() or 0)
            if skip or self._rewound:  # rare: a registry outage rewound a partition
                if tp in skip:
                    continue
                rewound_to = self._rewound.get(tp)
                if rewound_to is not None:
                    if msg.offset() != rewound_to:
                        continue  # fetched before the seek: the partition is re-read from `rewound_to`
                    del self._rewound[tp]
            value, headers = msg.value(), cast(Headers | None, msg.headers())
            if self.intake is not None:
                skip_reason, headers = self.intake(msg, headers)
                if skip_reason is not None:
                    self._accept(msg, tp, Processed(Skipped(skip_reason), (), "filtered"), headers)
                    continue
            try:
                processed = self.resolver.process(value, headers)
            except Exception as exc:  # only SchemaNotLoaded is expected: fetch, then decide
                processed_or_none = await self._with_schema(exc, value, headers)
                if processed_or_none is None:
                    skip.add(tp)
                    await self._retry_partition_later(tp, msg.offset() or 0)
                    continue
                processed = processed_or_none
            self._accept(msg, tp, processed, headers)
        self._flush_counts()
        m.PENDING.set(self.watermarks.pending())

    def _flush_counts(self) -> None:
        """Per-record metric updates cost more than the rest of intake; they are summed per consume batch."""
        for key, n in self._counts.items():
            kind = key[0]
            if kind == "consumed":
                m.EVENTS_CONSUMED.labels(key[1]).inc(n)
            elif kind == "valid":
                for t in key[1]:
                    m.IDENTIFIERS.labels(t, "valid").inc(n)
            elif kind == "match_error":
                m.MATCH_ERRORS.labels(key[1], key[2]).inc(n)
                m.IDENTIFIERS.labels(key[1], "invalid").inc(n)
            elif kind == "superseded":
                m.EVENTS_SUPERSEDED.inc(n)
            elif kind == "skipped":
                m.EVENTS_SKIPPED.labels(key[1]).inc(n)
        self._counts.clear()

    async def _with_schema(self, exc: Exception, value: bytes | None, headers: Headers | None) -> Processed | None:
        if not isinstance(exc, SchemaNotLoaded):
            raise exc
        if self.schema_fetcher is None:
            return Processed(
                Rejected(
                    DlqReason.INVALID_PAYLOAD,
                    f"Confluent-framed Avro with schema id {exc.schema_id}, but SCHEMA_REGISTRY_URL is not set",
                ),
                (),
                "confluent_avro",
            )
        try:
            await self.schema_fetcher.ensure(exc.schema_id)
        except RegistryUnavailable as unavailable:
            log.warning("schema registry unavailable (%s); partition will retry", unavailable)
            return None
        return self.resolver.process(value, headers)

    async def _retry_partition_later(self, tp: TopicPartition, offset: int) -> None:
        """Valid data is never dead-lettered for a registry outage: rewind, pause, and come back later."""
        assert self.consumer is not None
        await self.consumer.seek(tp, offset)
        self._rewound[tp] = offset
        reason = f"registry:{offset}"
        self.pauses.add([tp], reason)

        def lift() -> None:
            self.pauses.remove([tp], reason)

        asyncio.get_running_loop().call_later(self.opt.registry_retry_s, lift)

    def _accept(self, msg: Message, tp: TopicPartition, processed: Processed, headers: Headers | None) -> None:
        ref = RecordRef(tp.topic, tp.partition, msg.offset() or 0)
        ts_type, ts = msg.timestamp()
        key = msg.key()
        src = Source(
            ref,
            key.encode() if isinstance(key, str) else key,
            msg.value(),
            headers,
            ts if ts_type else None,
        )
        try:
            self.watermarks.track(ref)
        except ValueError:
            log.warning("%s[%d] offset %d delivered again out of order: ignored", *ref)
            return
        self.live[ref] = src
        counts = self._counts
        counts[("consumed", tp.topic)] += 1
        if processed.match_errors:
            for me in processed.match_errors:
                counts[("match_error", me.id_type, me.reason)] += 1
        self._route(src, processed.outcome)

    def _route(self, src: Source, outcome: Outcome) -> None:
        """Send a resolved record on its way: batch, skip, wait for its audience, or dead-letter."""
        counts = self._counts
        if isinstance(outcome, AudienceChange):
            self.guard.ok()
            counts[("valid", outcome.id_schema)] += 1
            for old in self.batcher.add(src.ref, outcome, src):
                counts[("superseded",)] += 1
                self._finish(old.ref, old.source)
        elif isinstance(outcome, Skipped):
            counts[("skipped", outcome.reason)] += 1
            self._finish(src.ref, src)
        elif isinstance(outcome, AudienceNeeded):
            self._hold_for_audience(src, outcome)
        else:
            self._spawn(self._dead_letter(src, DeadLetter(outcome.reason, outcome.error)))

    # -- audiences created on demand ------------------------------------------------------------------------

    def _hold_for_audience(self, src: Source, need: AudienceNeeded) -> None:
        """Records for an audience still to be created wait (uncommitted, in order) until it exists."""
        if self.creator is None:
            self._spawn(
                self._dead_letter(
                    src,
                    DeadLetter(
                        DlqReason.MISSING_AUDIENCE_ID,
                        f'audience_key "{need.audience_key}" is create_if_missing, but this process cannot '
                        "create audiences; replay it through the running service",
                    ),
                )
            )
            return
        ref = (need.advertiser_id, need.audience_name)
        held = self._held_for_audience.setdefault(ref, [])
        held.append(src)
        if len(held) == 1:
            self._spawn(self._create_then_release(ref))

    async def _create_then_release(self, ref: tuple[str, str]) -> None:
        assert self.creator is not None
        result = await self.creator.ensure(ref)
        held = [s for s in self._held_for_audience.pop(ref, []) if self.live.get(s.ref) is s]
        if isinstance(result, str):
            for src in held:
                try:
                    outcome = self.resolver.process(src.value, src.headers).outcome
                except SchemaNotLoaded:  # it decoded a moment ago, so its schema is cached
                    outcome = Rejected(DlqReason.INVALID_PAYLOAD, "schema no longer available")
                self._route(src, outcome)
            self._flush_counts()
            self._wake.set()
            return
        for src in held:
            self._spawn(
                self._dead_letter(src, DeadLetter(result.reason, result.error, 1, result.code, result.request_id))
            )

    def _recently_created(self, batch: Batch) -> bool:
        """TikTok refuses mappings for a minute or two after creating an audience: that is not a bad row."""
        if self.creator is None:
            return False
        now = time.time()
        for row in batch.rows:
            created = self.creator.store.created_at(row.change.audience_id)
            if created is not None and now - created < self.opt.audience_warmup_s:
                return True
        return False

    def _finish(self, ref: RecordRef, source: Any) -> None:
        """A record reached a final outcome; stale completions (revoked, re-consumed) are ignored."""
        if self.live.get(ref) is source and source is not None:
            del self.live[ref]
            self.watermarks.finish(ref)

    def _is_live(self, row: Row) -> bool:
        return row.source is not None and self.live.get(row.ref) is row.source

    # -- consumer housekeeping ------------------------------------------------------------------------------

    async def _sync_consumer(self) -> None:
        await self._store_offsets()
        pending = self.watermarks.pending()
        m.PENDING.set(pending)
        assert self.consumer is not None
        assigned = set(self.consumer.assigned)
        if pending >= self.opt.max_pending:
            self.pauses.add(assigned, "backpressure")
        elif pending <= self.opt.max_pending // 2:
            self.pauses.remove(None, "backpressure")
        for reason, on in (("auth", not self.auth_ok), ("dlq_guard", self.guard.tripped)):
            if on:
                self.pauses.add(assigned, reason)
            else:
                self.pauses.remove(None, reason)
        wanted = self.pauses.wanted() & assigned
        to_pause = wanted - self._paused
        to_resume = (self._paused - wanted) & assigned
        if to_pause:
            self.consumer.pause(sorted(to_pause))
        if to_resume:
            self.consumer.resume(sorted(to_resume))
        self._paused = wanted
        m.PAUSED_PARTITIONS.set(len(wanted))

    async def _store_offsets(self) -> None:
        assert self.consumer is not None
        offsets = self.watermarks.take_committable()
        if offsets:
            self.consumer.store(offsets)

    async def on_assign(self, tps: list[TopicPartition]) -> list[TopicPartition]:
        m.REBALANCES.labels("assign").inc()
        log.info("assigned %s", _fmt(tps))
        self.watermarks.forget(tps)  # a fresh start from the committed offset
        # Newly assigned partitions start unpaused; re-apply global pauses (Kafka Connect does the same).
        return list(tps) if (not self.auth_ok or self.watermarks.pending() >= self.opt.max_pending) else []

    async def on_revoke(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        """Flush the revoked partitions' work within the deadline; commit what finished, drop the rest."""
        m.REBALANCES.labels("revoke").inc()
        log.info("revoked %s", _fmt(tps))
        if not self._closing:
            deadline = self.clock() + self.opt.revoke_timeout_s
            self._draining = True
            self._wake.set()
            try:
                while any(self.watermarks.pending(tp) for tp in tps) and self.clock() < deadline:
                    await asyncio.sleep(0.02)
            finally:
                self._draining = False
        offsets = {tp: c for tp in tps if (c := self.watermarks.committable(tp)) is not None}
        self._forget(tps)
        return offsets

    async def on_lost(self, tps: list[TopicPartition]) -> None:
        m.REBALANCES.labels("lost").inc()
        log.warning("lost %s: their unfinished work is dropped uncommitted", _fmt(tps))
        self._forget(tps)

    def _forget(self, tps: list[TopicPartition]) -> None:
        gone = set(tps)
        self.batcher.drop_partitions(gone)
        self.watermarks.forget(tps)
        for tp in gone:
            self._rewound.pop(tp, None)
        for ref in [r for r in self.live if r.tp in gone]:
            del self.live[ref]
        self.pauses.remove(tps, "backpressure")
        for tp in gone:
            self.pauses.reasons.pop(tp, None)
            self._paused.discard(tp)
            if tp in _LAG_SERIES:
                _LAG_SERIES.discard(tp)
                m.CONSUMER_LAG.remove(tp.topic, str(tp.partition))

    # -- uploads --------------------------------------------------------------------------------------------

    async def _dispatch_loop(self) -> None:
        while True:
            deadline = self.batcher.next_deadline(self._backing_off)
            timeout = None if deadline is None else max(0.0, deadline - self.clock()) + 0.001
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)
            self._wake.clear()
            self._dispatch()

    def _dispatch(self) -> None:
        if not self.auth_ok:
            return
        free = self.opt.max_inflight - self._sending
        if free <= 0:
            return
        for batch in self.batcher.ready(limit=free, force=self._draining, hold=self._backing_off):
            m.BATCHES_SENT.labels(batch.action.value, batch.trigger).inc()
            m.ROWS_SENT.labels(batch.action.value).inc(len(batch.rows))
            m.BATCH_ROWS.observe(len(batch.rows))
            self._sending += 1
            self._spawn(self._send(batch, counted=True))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("task failed", exc_info=task.exception())

    async def _send(self, batch: Batch, *, counted: bool = False) -> None:
        """Upload one batch to a final outcome: success, dead letters, or (revoked) nothing."""
        first_failure: float | None = None
        attempt = 0
        try:
            while True:
                live = [r for r in batch.rows if self._is_live(r)]
                if len(live) != len(batch.rows):
                    self.batcher.release([r for r in batch.rows if not self._is_live(r)])
                    batch.rows = live
                if not batch.rows:
                    return
                if not counted:
                    self._sending += 1
                    counted = True
                answer = await self._post(batch)
                self._sending -= 1
                counted = False
                self._wake.set()
                v = answer.verdict
                if v is Verdict.SUCCESS:
                    self._uploaded(batch, answer)
                    return
                if v is Verdict.AUTH:
                    await self._auth_outage(answer)
                    first_failure, attempt = None, 0  # waiting for a good token spends no retry budget
                    continue
                if self.auth_ok is False:
                    self._auth_restored()
                if answer.code in _WARMUP_CODES and self._recently_created(batch):
                    v = Verdict.RETRY  # the post-creation window: retried within the budget
                if v in (Verdict.SPLIT, Verdict.REJECTED) and len(batch.rows) > 1:
                    half = len(batch.rows) // 2
                    for part in (batch.rows[:half], batch.rows[half:]):
                        self._spawn(self._send(Batch(batch.id, batch.key, part, "split", batch.attempts)))
                    return
                if v in (Verdict.SPLIT, Verdict.REJECTED):
                    await self._dead_letter_rows(batch, DlqReason.TIKTOK_REJECTED, answer)
                    return
                if v is Verdict.PERMISSION:
                    await self._dead_letter_rows(batch, DlqReason.TIKTOK_PERMISSION, answer)
                    return
                # RETRY
                now = self.clock()
                if first_failure is None:
                    first_failure = now
                attempt += 1
                delay = self.backoff.delay(attempt, answer.retry_after_s)
                if self.backoff.exhausted(first_failure, now, delay):
                    await self._dead_letter_rows(batch, DlqReason.RETRIES_EXHAUSTED, answer)
                    return
                if answer.rate_limited:
                    self.bucket.throttled()
                    m.RATE_LIMIT_QPS.set(self.bucket.rate)
                m.RETRIES.labels(_retry_cause(answer)).inc()
                # The key holds its buffer while it backs off; other keys keep flowing and consumption goes on
                # until MAX_PENDING_EVENTS pauses it (offsets cannot pass the held rows anyway).
                held = self._backing_off
                held[batch.key] = held.get(batch.key, 0) + 1
                m.BATCH_KEYS_BACKING_OFF.set(len(held))
                try:
                    await asyncio.sleep(delay)
                finally:
                    if held[batch.key] > 1:
                        held[batch.key] -= 1
                    else:
                        del held[batch.key]
                    m.BATCH_KEYS_BACKING_OFF.set(len(held))
                    self._wake.set()
        finally:
            if counted:
                self._sending -= 1
                self._wake.set()

    async def _post(self, batch: Batch) -> Answer:
        batch.attempts += 1
        body = mapping_body(batch.advertiser_id, batch.action, batch.id_schema, batch.rows)
        while (wait := self.bucket.acquire()) > 0:
            m.RATE_LIMIT_WAIT.inc(wait)
            await asyncio.sleep(wait)
        m.RATE_LIMIT_QPS.set(self.bucket.rate)  # it recovers additively after a rate-limit answer
        async with self._send_slots:
            m.INFLIGHT.inc()
            t0 = time.perf_counter()
            try:
                answer = await self.uploader.post_mapping(body)
            finally:
                m.INFLIGHT.dec()
        m.UPLOAD_DURATION.labels(answer.status_class).observe(time.perf_counter() - t0)
        m.TIKTOK_ANSWERS.labels(answer.status_class, answer.verdict.value, answer.code_label).inc()
        if answer.code == 20001:
            log.info("TikTok answered PARTIAL_OK (request_id=%s)", answer.request_id)
        return answer

    def _uploaded(self, batch: Batch, answer: Answer) -> None:
        self.batcher.release(batch.rows)
        self.guard.ok()
        now_ms = time.time() * 1000
        m.LAST_UPLOAD.set(now_ms / 1000)
        m.EVENTS_UPLOADED.labels(batch.action.value).inc(len(batch.rows))
        for row in batch.rows:
            t = row.change.event_time_ms or (row.source.timestamp_ms if row.source else None)
            if t:
                m.EVENT_TO_ACK.observe(max(0.0, (now_ms - t) / 1000))
            self._finish(row.ref, row.source)
        if not self.auth_ok:
            self._auth_restored()

    async def _auth_outage(self, answer: Answer) -> None:
        """Auth answers never dead-letter: pause everything, probe slowly, resume by itself."""
        if self.auth_ok:
            log.error(
                "TikTok rejected the access token (code %s, request_id=%s): consumption paused until it works",
                answer.code,
                answer.request_id,
            )
        self.auth_ok = False
        m.AUTH_OK.set(0)
        await asyncio.sleep(self.opt.auth_retry_s)

    def _auth_restored(self) -> None:
        log.info("TikTok accepts the access token again: resuming")
        self.auth_ok = True
        m.AUTH_OK.set(1)
        self._wake.set()

    # -- dead letters ---------------------------------------------------------------------------------------

    async def _dead_letter_rows(self, batch: Batch, reason: DlqReason, answer: Answer) -> None:
        error = _answer_error(reason, answer, len(batch.rows))
        letters = [
            self._dead_letter(
                row.source,
                DeadLetter(reason, error, batch.attempts, answer.code, answer.request_id),
            )
            for row in batch.rows
            if self._is_live(row)
        ]
        await asyncio.gather(*letters)
        self.batcher.release(batch.rows)

    async def _dead_letter(self, src: Source, letter: DeadLetter) -> None:
        """Write the letter, retrying until the broker acks it (the offset waits), then finish the record."""
        if self.guard.failed(letter.reason) and self._guard_open.is_set():
            self._trip_guard(letter.reason)
        if not self._guard_open.is_set():
            await self._guard_open.wait()
            held = self._after_hold(src, letter)
            if held is None:
                return
            letter = held
        headers = dead_letter_headers(src.headers, src.ref, letter, datetime.now(UTC))
        attempt = 0
        while self.live.get(src.ref) is src:
            try:
                await self.dlq.send(
                    self.dlq_topic,
                    key=src.key,
                    value=src.value,
                    headers=headers,
                    timestamp_ms=src.timestamp_ms,
                )
            except DeliveryError as exc:
                attempt += 1
                m.DEAD_LETTER_FAILURES.inc()
                log.error("dead-letter write failed (attempt %d): %s", attempt, exc)
                await asyncio.sleep(min(30.0, 0.5 * 2**attempt))
                continue
            m.EVENTS_DEAD_LETTERED.labels(letter.reason.value).inc()
            self._finish(src.ref, src)
            return

    def _trip_guard(self, reason: DlqReason) -> None:
        log.error(
            "DLQ guard tripped: %s dead-lettered as %s; holding dead letters and pausing "
            "consumption until the mappings file changes or %.0fs pass (see README runbook-%s)",
            self.guard.trip_cause,
            reason.value,
            self.guard.cooldown_s,
            reason.value,
        )
        self._guard_open.clear()
        m.DLQ_GUARD_TRIPPED.set(1)
        asyncio.get_running_loop().call_later(self.guard.cooldown_s, self._release_guard, "cooldown over")

    def _release_guard(self, why: str) -> None:
        if not self.guard.tripped:
            return
        log.warning("DLQ guard released (%s): re-resolving held records", why)
        self.guard.reset()
        m.DLQ_GUARD_TRIPPED.set(0)
        self._guard_open.set()

    def _after_hold(self, src: Source, letter: DeadLetter) -> DeadLetter | None:
        """A held record after the guard opened: resolve it again; None when it now syncs instead."""
        if self.live.get(src.ref) is not src:
            return None
        if letter.reason not in (DlqReason.MISSING_AUDIENCE_ID, DlqReason.MISSING_ADVERTISER_ID):
            return letter
        try:
            outcome = self.resolver.process(src.value, src.headers).outcome
        except SchemaNotLoaded:
            return letter
        if isinstance(outcome, Rejected):
            return DeadLetter(outcome.reason, outcome.error)
        self._route(src, outcome)
        self._flush_counts()
        self._wake.set()
        return None

    # -- statistics -----------------------------------------------------------------------------------------

    def on_stats(self, stats_json: str) -> None:
        """librdkafka statistics (consumer thread): lag of stored offsets per assigned partition."""
        try:
            stats = orjson.loads(stats_json)
        except orjson.JSONDecodeError:
            return
        up = brokers_up(stats)
        if up is not None:
            self.broker_ok = up  # librdkafka reports no event when brokers come back: statistics do
        for topic, t in (stats.get("topics") or {}).items():
            for pid, p in (t.get("partitions") or {}).items():
                if pid == "-1" or p.get("fetch_state") in ("none", "stopped"):
                    continue
                lag = p.get("consumer_lag_stored", p.get("consumer_lag", -1))
                if isinstance(lag, int) and lag >= 0:
                    m.CONSUMER_LAG.labels(topic, pid).set(lag)
                    _LAG_SERIES.add(TopicPartition(topic, int(pid)))

    def on_error(self, err: KafkaError) -> None:
        """One broker's dropped connection is routine (librdkafka reconnects); only all brokers down is not ready."""
        if err.code() == KafkaError._ALL_BROKERS_DOWN:
            self.broker_ok = False
        log.warning("kafka: %s", err)


_LAG_SERIES: set[TopicPartition] = set()
# What TikTok answers for an audience created moments ago (reference §1.5); other refusals are real ones.
_WARMUP_CODES = frozenset({40002, 40007})


def brokers_up(stats: dict[str, Any]) -> bool | None:
    """From librdkafka statistics: is any broker connection UP? None when the statistics name no broker."""
    brokers = stats.get("brokers")
    if not isinstance(brokers, dict) or not brokers:
        return None
    return any(isinstance(b, dict) and b.get("state") == "UP" for b in brokers.values())


def _retry_cause(answer: Answer) -> str:
    if answer.rate_limited:
        return "rate_limited"
    if answer.http_status is None:
        return answer.status_class
    if answer.http_status >= 500:
        return "http_5xx"
    return "tiktok_code" if answer.code is not None else "http_other"


def _answer_error(reason: DlqReason, answer: Answer, rows: int) -> str:
    where = f"HTTP {answer.http_status}" if answer.http_status is not None else answer.status_class
    code = f", code {answer.code}" if answer.code is not None else ""
    what = {
        DlqReason.TIKTOK_REJECTED: "TikTok refused this row",
        DlqReason.TIKTOK_PERMISSION: "TikTok denied access to the advertiser or audience",
        DlqReason.RETRIES_EXHAUSTED: "retry budget spent without a successful upload",
    }.get(reason, "upload failed")
    return f"{what} ({where}{code}: {answer.message or 'no message'})"


def _fmt(tps: list[TopicPartition]) -> str:
    return ", ".join(f"{tp.topic}[{tp.partition}]" for tp in sorted(tps)) or "nothing"
