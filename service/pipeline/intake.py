"""Intake: consumed messages become tracked records with an outcome (resolve), and outcomes are routed.

Invariants (tests/pipeline/test_intake.py and the model-based suite):
- a record is tracked in the ledger before anything can finish it, and only while its partition is assigned
  (a revoke that ran while intake was suspended drops the rest of that partition's messages);
- intake never awaits the Schema Registry: a record whose writer schema is not loaded rewinds its partition
  to that offset and pauses it (reason `registry`) while the schema is fetched in the background, so one
  unreachable registry never stalls the other partitions;
- records of an audience key with held records queue behind them (`AudienceHolds`), in consumption order.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol, cast

from confluent_kafka import KafkaError

from service import metrics as m
from service.core.batcher import Batcher
from service.core.dead_letters import DeadLetter
from service.core.dlq_guard import DlqGuard
from service.core.file_batcher import FileBatcher, FileChange
from service.core.ledger import Ledger
from service.core.membership import Processed, Resolver
from service.core.model import AudienceChange, AudienceNeeded, DlqReason, Outcome, Rejected, Skipped
from service.core.offline import UNMAPPED_EVENT, OfflineEvent
from service.core.offline_batcher import OfflineBatcher
from service.core.pauses import Pauses
from service.core.schemas import SchemaNotLoaded
from service.core.types import Headers, RecordRef, TopicPartition, new_tuple
from service.kafka.schema_registry import RegistryUnavailable
from service.kafka.source import SourceMessage
from service.pipeline.holds import AudienceHolds

log = logging.getLogger(__name__)

# Replay's hook: (message, headers) → (skip reason or None, headers to process and dead-letter with).
IntakeHook = Callable[[Any, Headers | None], tuple[str | None, Headers | None]]


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


# Reasons only offline events get: their dead letters count under `offline_events_total{event="unknown"}` (the
# event name is not known of a record that did not validate).
_OFFLINE_REASONS = frozenset({DlqReason.INVALID_EVENT, DlqReason.EVENT_TOO_OLD, DlqReason.MISSING_EVENT_SET_ID})


class Router:
    """Sends a resolved record on its way: batch (audience changes to `batcher`, offline events to `offline`,
    file-audience changes to `files`), skip, wait for its audience, or dead-letter."""

    def __init__(
        self,
        *,
        batcher: Batcher,
        holds: AudienceHolds,
        guard: DlqGuard,
        finish: Callable[[Source], None],
        dead_letter: Callable[[Source, DeadLetter], None],
        counts: collections.Counter[tuple[Any, ...]],
        offline: OfflineBatcher | None = None,
        files: FileBatcher | None = None,
    ) -> None:
        self.batcher = batcher
        self.offline = offline
        self.files = files
        self.holds = holds
        self.guard = guard
        self._finish = finish
        self._dead_letter = dead_letter
        self.counts = counts

    def route(self, src: Source, outcome: Outcome | OfflineEvent | FileChange) -> None:
        counts = self.counts
        if type(outcome) is AudienceChange:  # the hot path first (an exact type: outcomes are never subclassed)
            if self.holds.any_held and self.holds.holding(outcome.audience_key):
                self.holds.queue(cast(str, outcome.audience_key), src)
                return
            self.guard.ok()
            ids = outcome.identifiers
            counts[("valid", (ids[0][0],) if len(ids) == 1 else outcome.id_schema)] += 1
            superseded = self.batcher.add(src.ref, outcome, src)
            if superseded:
                counts[("superseded",)] += len(superseded)
                for old in superseded:
                    self._finish(old.source)
        elif isinstance(outcome, FileChange):
            if self.files is None:  # a wiring defect: never drop a record silently
                self._dead_letter(
                    src, DeadLetter(DlqReason.MISSING_AUDIENCE_ID, "file audiences are not wired in this process")
                )
                return
            self.guard.ok()
            counts[("valid", (outcome.identifiers[0][0],))] += 1
            self.files.add(src.ref, outcome, src)
        elif isinstance(outcome, OfflineEvent):
            if self.offline is None:  # a wiring defect: never drop an event silently
                self._dead_letter(src, DeadLetter(DlqReason.INVALID_EVENT, "offline events are not wired here"))
                return
            self.guard.ok()
            for key in outcome.match_keys:
                counts[("offline_key", key)] += 1
            self.offline.add(src.ref, outcome, src)
        elif isinstance(outcome, Skipped):
            counts[("skipped", outcome.reason)] += 1
            if outcome is UNMAPPED_EVENT or outcome.reason == UNMAPPED_EVENT.reason:
                counts[("offline", "unmapped", "skipped")] += 1
            self._finish(src)
        elif isinstance(outcome, AudienceNeeded):
            self.holds.hold(src, outcome)
        else:
            assert isinstance(outcome, Rejected)  # the last kind (an AudienceChange was taken first)
            if outcome.reason in _OFFLINE_REASONS:
                counts[("offline", "unknown", "dead_lettered")] += 1
            self._dead_letter(src, DeadLetter(outcome.reason, outcome.error))

    def flush_counts(self) -> None:
        """Per-record metric updates cost more than the rest of intake; they are summed per consume batch."""
        for key, n in self.counts.items():
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
            elif kind == "offline_key":
                m.OFFLINE_MATCH_KEYS.labels(key[1]).inc(n)
            elif kind == "offline":
                m.OFFLINE_EVENTS.labels(key[1], key[2]).inc(n)
        self.counts.clear()


class Intake:
    def __init__(
        self,
        *,
        resolver: Resolver,
        ledger: Ledger,
        router: Router,
        pauses: Pauses,
        seek: Callable[[TopicPartition, int], Awaitable[None]],
        spawn: Callable[[Any], None],
        on_change: Callable[[], None],
        schema_fetcher: SchemaFetcher | None = None,
        hook: IntakeHook | None = None,
        registry_retry_s: float = 5.0,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.resolver = resolver
        self.ledger = ledger
        self.router = router
        self.pauses = pauses
        self._seek = seek
        self._spawn = spawn
        self._on_change = on_change
        self.schema_fetcher = schema_fetcher
        self.hook = hook
        self.registry_retry_s = registry_retry_s
        self._sleep = sleep
        self._rewound: dict[TopicPartition, int] = {}
        self._tps: dict[tuple[str, int], TopicPartition] = {}

    def forget(self, tps: list[TopicPartition]) -> None:
        for tp in tps:
            self._rewound.pop(tp, None)

    async def process(self, msgs: list[SourceMessage]) -> None:
        """One consume batch: a tight loop per record, metrics summed once per batch (`Router.flush_counts`)."""
        ledger, route, resolver, counts = self.ledger, self.router.route, self.resolver, self.router.counts
        process, track = resolver.process, ledger.track
        skip: set[TopicPartition] = set()
        resets = ledger.resets
        hook = self.hook
        consumed: dict[str, int] = {}
        for msg in msgs:
            err = msg.error()
            if err is not None:
                if err.code() != KafkaError._PARTITION_EOF:
                    log.warning("consume error: %s", err)
                continue
            topic, partition = msg.topic() or "", msg.partition() or 0
            offset = msg.offset() or 0
            if skip or self._rewound:  # rare: a schema fetch rewound a partition
                tp = self._tp(topic, partition)
                if tp in skip:
                    continue
                rewound_to = self._rewound.get(tp)
                if rewound_to is not None:
                    if offset != rewound_to:
                        continue  # fetched before the seek: the partition is re-read from `rewound_to`
                    del self._rewound[tp]
            value, headers = msg.value(), cast(Headers | None, msg.headers())
            if hook is not None:
                skip_reason, headers = hook(msg, headers)
                if skip_reason is not None:
                    src = self._accept(msg, self._tp(topic, partition), headers)
                    if src is not None:
                        consumed[topic] = consumed.get(topic, 0) + 1
                        route(src, Skipped(skip_reason))
                    continue
            try:
                processed = process(value, headers)
            except SchemaNotLoaded as exc:
                if self.schema_fetcher is None:
                    processed = Processed(
                        Rejected(
                            DlqReason.INVALID_PAYLOAD,
                            f"Confluent-framed Avro with schema id {exc.schema_id}, but SCHEMA_REGISTRY_URL is not set",
                        ),
                        (),
                        "confluent_avro",
                    )
                else:
                    tp = self._tp(topic, partition)
                    skip.add(tp)
                    await self._fetch_schema_later(tp, offset, exc.schema_id)
                    continue
            # Track before anything can finish it (inlined `_accept`: this runs once per record).
            ref = new_tuple(RecordRef, (topic, partition, offset))
            ts_type, ts = msg.timestamp()
            key = msg.key()
            src = Source(ref, key.encode() if isinstance(key, str) else key, value, headers, ts if ts_type else None)
            if not track(ref, src):
                continue  # revoked while intake was suspended: the new owner consumes it
            consumed[topic] = consumed.get(topic, 0) + 1
            if processed.match_errors:
                for me in processed.match_errors:
                    counts[("match_error", me.id_type, me.reason)] += 1
            route(src, processed.outcome)
        for topic, n in consumed.items():
            counts[("consumed", topic)] += n
        if ledger.resets != resets:
            log.error(
                "offsets went backwards on a partition (topic recreated or offsets reset): %d times so far; "
                "counting restarted there",
                ledger.resets,
            )
        self.router.flush_counts()

    def _tp(self, topic: str, partition: int) -> TopicPartition:
        tp = self._tps.get((topic, partition))
        if tp is None:
            tp = self._tps[(topic, partition)] = TopicPartition(topic, partition)
        return tp

    def _accept(self, msg: SourceMessage, tp: TopicPartition, headers: Headers | None) -> Source | None:
        ref = RecordRef(tp.topic, tp.partition, msg.offset() or 0)
        ts_type, ts = msg.timestamp()
        key = msg.key()
        src = Source(ref, key.encode() if isinstance(key, str) else key, msg.value(), headers, ts if ts_type else None)
        if not self.ledger.track(ref, src):
            return None  # revoked while intake was suspended: the new owner consumes it
        return src

    async def _fetch_schema_later(self, tp: TopicPartition, offset: int, schema_id: int) -> None:
        """Valid data is never dead-lettered for a registry outage: rewind, pause, fetch in the background."""
        await self._seek(tp, offset)
        if not self.ledger.assigned(tp):
            return
        self._rewound[tp] = offset
        reason = f"registry:{offset}"
        self.pauses.add([tp], reason)
        self._on_change()
        self._spawn(self._fetch(tp, reason, schema_id))

    async def _fetch(self, tp: TopicPartition, reason: str, schema_id: int) -> None:
        assert self.schema_fetcher is not None
        try:
            await self.schema_fetcher.ensure(schema_id)
        except RegistryUnavailable as exc:
            log.warning(
                "schema registry unavailable (%s); %s[%d] retries in %.0fs",
                exc,
                *tp,
                self.registry_retry_s,
                extra={"topic": tp.topic, "partition": tp.partition},
            )
            await self._sleep(self.registry_retry_s)
        finally:
            self.pauses.remove([tp], reason)
            self._on_change()
