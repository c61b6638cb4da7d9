"""Micro-batching of offline events into `/event/track/` requests. Pure: no I/O, injected clock.

The offline counterpart of `service.core.batcher.Batcher`, offering what `UploadScheduler` uses of it (`ready`,
`has_ready`, `next_deadline`, `release`, `drop_partitions`, `pending_rows`, `max_rows`).

Invariants (tests/core/test_offline_batcher.py):
- buffers are keyed by event set id: one request carries the events of one event set (docs/tiktok-api.md §8.4);
- a batch carries 1 to `MAX_EVENTS_PER_REQUEST` (1,000) events, and at most `max_bytes` of their JSON unless a
  single event alone is bigger;
- every added event is in exactly one place until dropped: its buffer, or a cut batch (`pending_rows` counts the
  buffered ones); nothing is superseded: each event stands alone, TikTok de-duplicates by event + event_id;
- a buffer is ready at `max_rows` events, `max_bytes`, or when its oldest event has waited `linger_s` (`force`
  and `eager` as for audiences); events leave in arrival order;
- `drop_partitions` forgets the buffered (not the cut) events of revoked partitions.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Iterable
from dataclasses import dataclass, field
from itertools import count
from typing import Any

import orjson

from service.core.batcher import SplitBudget
from service.core.offline import MAX_EVENTS_PER_REQUEST, OfflineEvent, event_wire
from service.core.types import RecordRef, TopicPartition

OfflineKey = str  # event set id


class OfflineRow:
    """One record's event; `wire` is its JSON item of the request body, built once."""

    __slots__ = ("enqueued_at", "event", "nbytes", "ref", "source", "wire")

    def __init__(self, ref: RecordRef, event: OfflineEvent, enqueued_at: float, source: Any = None) -> None:
        self.ref = ref
        self.event = event
        self.enqueued_at = enqueued_at
        self.source = source
        self.wire = event_wire(event)
        self.nbytes = len(orjson.dumps(self.wire)) + 1


@dataclass(slots=True, eq=False)
class OfflineBatch:
    """A request's worth of events of one event set."""

    id: int
    key: OfflineKey
    rows: list[OfflineRow]
    trigger: str  # rows | bytes | linger | force | turn | split
    attempts: int = 0
    budget: SplitBudget | None = None

    @property
    def event_set_id(self) -> str:
        return self.key

    def part(self, rows: list[OfflineRow], budget: SplitBudget | None) -> OfflineBatch:
        return OfflineBatch(self.id, self.key, rows, "split", self.attempts, budget)


@dataclass(slots=True, eq=False)
class _Buffer:
    key: OfflineKey
    rows: list[OfflineRow] = field(default_factory=list)
    nbytes: int = 0


class OfflineBatcher:
    def __init__(
        self,
        *,
        max_rows: int = MAX_EVENTS_PER_REQUEST,
        max_bytes: int = 2_000_000,
        linger_s: float = 1.0,
        clock: Callable[[], float],
    ) -> None:
        if not 1 <= max_rows <= MAX_EVENTS_PER_REQUEST:
            raise ValueError(f"max_rows must be between 1 and {MAX_EVENTS_PER_REQUEST}, got {max_rows}")
        if max_bytes <= 0 or linger_s < 0:
            raise ValueError("max_bytes must be positive and linger_s not negative")
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        self.linger_s = linger_s
        self._clock = clock
        self._buffers: dict[OfflineKey, _Buffer] = {}
        self._ids = count(1)
        self.pending_rows = 0

    def add(self, ref: RecordRef, event: OfflineEvent, source: Any = None) -> OfflineRow:
        key = event.event_set_id
        buf = self._buffers.get(key)
        if buf is None:
            buf = self._buffers[key] = _Buffer(key)
        row = OfflineRow(ref, event, self._clock(), source)
        buf.rows.append(row)
        buf.nbytes += row.nbytes
        self.pending_rows += 1
        return row

    def ready(
        self,
        *,
        limit: int | None = None,
        force: bool = False,
        hold: Container[OfflineKey] = (),
        max_rows: int | None = None,
        eager: bool = False,
    ) -> list[OfflineBatch]:
        """Batches of buffers that hit a trigger, at most `limit`, oldest buffer first (as `Batcher.ready`)."""
        now = self._clock()
        cap = self.max_rows if max_rows is None else max(1, min(max_rows, MAX_EVENTS_PER_REQUEST))
        bufs = sorted(self._buffers.values(), key=lambda b: b.rows[0].enqueued_at)
        out: list[OfflineBatch] = []
        for buf in bufs:
            if buf.key in hold:
                continue
            trigger = self._trigger(buf, now, force, eager)
            while trigger is not None and (limit is None or len(out) < limit):
                out.append(self._cut(buf, trigger, cap))
                trigger = self._trigger(buf, now, force, eager) if buf.rows else None
            if limit is not None and len(out) >= limit:
                break
        return out

    def has_ready(self, *, force: bool = False, hold: Container[OfflineKey] = (), eager: bool = False) -> bool:
        now = self._clock()
        return any(b.key not in hold and self._trigger(b, now, force, eager) for b in self._buffers.values())

    def _trigger(self, buf: _Buffer, now: float, force: bool, eager: bool) -> str | None:
        if not buf.rows:
            return None
        if len(buf.rows) >= self.max_rows:
            return "rows"
        if buf.nbytes >= self.max_bytes:
            return "bytes"
        if now - buf.rows[0].enqueued_at >= self.linger_s:
            return "linger"
        if force:
            return "force"
        return "turn" if eager else None

    def _cut(self, buf: _Buffer, trigger: str, cap: int) -> OfflineBatch:
        n, nbytes = 0, 0
        for row in buf.rows:
            if n >= cap or (n and nbytes + row.nbytes > self.max_bytes):
                break
            n += 1
            nbytes += row.nbytes
        rows = buf.rows[:n]
        del buf.rows[:n]
        buf.nbytes -= nbytes
        self.pending_rows -= n
        if not buf.rows:
            del self._buffers[buf.key]
        return OfflineBatch(next(self._ids), buf.key, rows, trigger)

    def release(self, rows: Iterable[OfflineRow]) -> None:
        """Rows reached a final outcome. Nothing to unblock: events never wait for each other."""

    def next_deadline(self, hold: Container[OfflineKey] = ()) -> float | None:
        oldest = [b.rows[0].enqueued_at for b in self._buffers.values() if b.rows and b.key not in hold]
        return min(oldest) + self.linger_s if oldest else None

    def drop_partitions(self, tps: Iterable[TopicPartition]) -> int:
        lost = set(tps)
        if not lost:
            return 0
        dropped = 0
        for buf in list(self._buffers.values()):
            keep = [r for r in buf.rows if r.ref.tp not in lost]
            gone = len(buf.rows) - len(keep)
            if gone:
                dropped += gone
                buf.rows = keep
                buf.nbytes = sum(r.nbytes for r in keep)
                if not keep:
                    del self._buffers[buf.key]
        self.pending_rows -= dropped
        return dropped

    def pending_for(self, tps: Iterable[TopicPartition]) -> int:
        want = set(tps)
        return sum(1 for b in self._buffers.values() for r in b.rows if r.ref.tp in want)
