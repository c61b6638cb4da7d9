"""Micro-batching of audience changes into `segment/mapping` requests. Pure: no I/O, injected clock.

Buffers are keyed by (advertiser, action): one request carries one advertiser and one action, and may mix
audiences of that advertiser and users with different identifier types. Its `id_schema` is the union of its rows'
types in `ID_TYPES` order, and a row without a type of the schema has `{}` there (docs/tiktok-api.md §1.4, §6.1).
Keying by identifier types too would split mixed traffic into up to 15 buffers per action, each needing its own
requests: under TikTok's request budget that multiplied latency and shrank requests.

TikTok's membership state is per (audience, identifier type, hash) cell, so ordering is kept per cell:
- a newer change for a pending cell replaces the older one wherever it waits (net change, also across the add
  and delete buffers), and the older record is finished as superseded; "newer" is the later offset when both
  records come from one partition (an older record routed again after a dead-letter hold loses to the newer one
  already waiting), else the later added;
- a row is never sent while any of its cells is in a request still in flight; it waits, set aside from its
  buffer's linger clock, until that request has a final outcome (uploaded or dead-lettered). So an add and a
  delete for one user and audience are never in flight together, and TikTok ends in the state of the last
  event consumed. A blocked row neither keeps `next_deadline` in the past (the dispatcher would spin) nor
  makes every new row of its key leave at once as a one-row "linger" batch: linger counts from the oldest
  row that can be sent.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Iterable
from dataclasses import dataclass, field
from itertools import count
from typing import Any

from service.core.model import ID_TYPES, Action, AudienceChange, IdType
from service.core.types import RecordRef, TopicPartition

BatchKey = tuple[str, Action]
CellKey = tuple[str, str, IdType, str]  # advertiser, audience, id type, hash

MAX_ROWS_LIMIT = 10_000  # TikTok's documented ceiling per request

# JSON size of one cell `{"id":"<hash>","audience_ids":["<audience>"]}` minus the audience id, and of `{}`.
_CELL_BYTES = len('{"id":"","audience_ids":[""]},') + 64
_EMPTY_CELL_BYTES = len("{},")
_SCHEMA_WIDTH = len(ID_TYPES)  # sizes count every absent type as `{}`: an upper bound whatever the batch's schema


class Row:
    """One record's row; `cells` shrinks when a newer record supersedes some of its identifiers.

    A plain slotted class with a positional constructor: one is made per record on the hot path.
    """

    __slots__ = ("cells", "change", "enqueued_at", "keys", "nbytes", "ref", "source")

    def __init__(
        self,
        ref: RecordRef,
        change: AudienceChange,
        cells: dict[IdType, str],
        enqueued_at: float,
        keys: tuple[CellKey, ...],
        nbytes: int = 0,
        source: Any = None,
    ) -> None:
        self.ref = ref
        self.change = change
        self.cells = cells
        self.enqueued_at = enqueued_at
        self.keys = keys  # one (advertiser, audience, id type, hash) per cell
        self.nbytes = nbytes
        self.source = source  # opaque to the batcher: the edge's handle on the original record

    def _rekey(self) -> None:
        c = self.change
        adv, aud = c.advertiser_id, c.audience_id
        self.keys = tuple([(adv, aud, t, h) for t, h in self.cells.items()])

    def cell_keys(self) -> tuple[CellKey, ...]:
        return self.keys


@dataclass(slots=True)
class SplitBudget:
    """Requests a batch and its halves may still spend isolating refused rows (`upload_policy`)."""

    left: int


@dataclass(slots=True, eq=False)
class Batch:
    """A request's worth of rows. Its cells stay "in flight" until `Batcher.release` is called."""

    id: int
    key: BatchKey
    rows: list[Row]
    trigger: str  # rows | bytes | linger | force | turn | split
    attempts: int = 0
    budget: SplitBudget | None = None

    @property
    def advertiser_id(self) -> str:
        return self.key[0]

    @property
    def action(self) -> Action:
        return self.key[1]

    def part(self, rows: list[Row], budget: SplitBudget | None) -> Batch:
        """A half or per-audience part of this batch, to be resent."""
        return Batch(self.id, self.key, rows, "split", self.attempts, budget)

    @property
    def id_schema(self) -> tuple[IdType, ...]:
        """The union of the rows' identifier types, in `ID_TYPES` order (computed: halves may need fewer)."""
        present: set[IdType] = set().union(*[row.cells for row in self.rows])  # one C loop (4x a Python one)
        return tuple([t for t in ID_TYPES if t in present])


@dataclass(slots=True, eq=False)
class _Buffer:
    key: BatchKey
    rows: dict[int, Row] = field(default_factory=dict)  # sendable rows, insertion-ordered by row identity
    blocked: dict[int, Row] = field(default_factory=dict)  # rows waiting for an in-flight change to a cell
    early: dict[int, Row] = field(default_factory=dict)  # unblocked rows older than the first row: linger from them
    early_min: float = float("inf")
    nbytes: int = 0

    def oldest(self) -> float:
        t = next(iter(self.rows.values())).enqueued_at
        return t if t <= self.early_min else self.early_min

    def add_early(self, row: Row) -> None:
        self.early[id(row)] = row
        self.early_min = min(self.early_min, row.enqueued_at)

    def drop_early(self, row: Row) -> None:
        if self.early.pop(id(row), None) is not None and row.enqueued_at <= self.early_min:
            self.early_min = min((r.enqueued_at for r in self.early.values()), default=float("inf"))


class Batcher:
    """Buffers, net-change replacement, flush triggers and in-flight exclusion."""

    def __init__(
        self,
        *,
        max_rows: int = 1000,
        max_bytes: int = 2_000_000,
        linger_s: float = 1.0,
        clock: Callable[[], float],
    ) -> None:
        if not 1 <= max_rows <= MAX_ROWS_LIMIT:
            raise ValueError(f"max_rows must be between 1 and {MAX_ROWS_LIMIT}, got {max_rows}")
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        self.linger_s = linger_s
        self._clock = clock
        self._buffers: dict[BatchKey, _Buffer] = {}
        self._pending_cells: dict[CellKey, Row] = {}
        self._row_buffer: dict[int, _Buffer] = {}
        self._inflight_cells: dict[CellKey, int] = {}  # cell → requests in flight carrying it
        self._blocked: dict[int, Row] = {}  # rows set aside until a cell of theirs leaves flight
        self._waiting: dict[CellKey, list[Row]] = {}  # in-flight cell → blocked rows to look at when it lands
        self._ids = count(1)
        self.pending_rows = 0

    # -- intake ---------------------------------------------------------------------------------------------

    def add(self, ref: RecordRef, change: AudienceChange, source: Any = None) -> list[Row]:
        """Queue a change; returns the rows it fully superseded (finished: their effect is overwritten)."""
        superseded: list[Row] = []
        adv, aud = change.advertiser_id, change.audience_id
        ids = change.identifiers
        pending = self._pending_cells
        if len(ids) == 1:  # the common case: one identifier
            t, h = ids[0]
            keys: tuple[CellKey, ...] = ((adv, aud, t, h),)
            cells = {t: h}
        else:
            keys = tuple([(adv, aud, t, h) for t, h in ids])
            cells = dict(ids)
        if pending:
            stale: list[CellKey] = []
            for ck in keys:
                old = pending.get(ck)
                if old is None:
                    continue
                o = old.ref
                if o.offset > ref.offset and o.partition == ref.partition and o.topic == ref.topic:
                    stale.append(ck)  # a newer record of this partition waits for the cell: it keeps it
                elif self._drop_cell(old, ck[2]):
                    superseded.append(old)
            if stale:
                # An older record routed again (after a dead-letter hold) must not undo a newer one: its stale cells
                # are superseded at once, and with none left the whole record is.
                keys = tuple([ck for ck in keys if ck not in stale])
                if not keys:
                    superseded.append(Row(ref, change, {}, self._clock(), (), 0, source))
                    return superseded
                ids = tuple([(ck[2], ck[3]) for ck in keys])
                change = change._replace(identifiers=ids)
                cells = dict(ids)
        key: BatchKey = (adv, change.action)
        buf = self._buffers.get(key)
        if buf is None:
            buf = self._buffers[key] = _Buffer(key)
        # The JSON size of the row (`_row_bytes`), inlined: every identifier of a new row is present.
        nbytes = len(ids) * (_CELL_BYTES + len(aud)) + (_SCHEMA_WIDTH - len(ids)) * _EMPTY_CELL_BYTES + 3
        row = Row(ref, change, cells, self._clock(), keys, nbytes, source)
        rid = id(row)
        buf.rows[rid] = row
        buf.nbytes += nbytes
        self._row_buffer[rid] = buf
        for ck in keys:
            pending[ck] = row
        self.pending_rows += 1
        return superseded

    def _drop_cell(self, row: Row, t: IdType) -> bool:
        """Remove one superseded cell; True when the row had nothing left and left its buffer."""
        h = row.cells.pop(t)
        c = row.change
        self._pending_cells.pop((c.advertiser_id, c.audience_id, t, h), None)
        row._rekey()
        buf = self._row_buffer[id(row)]
        if id(row) in self._blocked and self._inflight_cells.keys().isdisjoint(row.keys):
            self._unblock(buf, row)  # the cell it waited for was superseded: nothing holds it back now
        new_bytes = self._row_bytes(row)
        buf.nbytes += new_bytes - row.nbytes
        row.nbytes = new_bytes
        if row.cells:
            return False
        self._remove_row(buf, row)
        return True

    def _remove_row(self, buf: _Buffer, row: Row) -> None:
        if buf.rows.pop(id(row), None) is None:
            del buf.blocked[id(row)]
            del self._blocked[id(row)]
        elif buf.early:
            buf.drop_early(row)
        del self._row_buffer[id(row)]
        buf.nbytes -= row.nbytes
        self.pending_rows -= 1
        if not buf.rows and not buf.blocked:
            del self._buffers[buf.key]

    @staticmethod
    def _row_bytes(row: Row) -> int:
        present = len(row.cells)
        return present * (_CELL_BYTES + len(row.change.audience_id)) + (_SCHEMA_WIDTH - present) * _EMPTY_CELL_BYTES + 3

    # -- flushing -------------------------------------------------------------------------------------------

    def ready(
        self,
        *,
        limit: int | None = None,
        force: bool = False,
        hold: Container[BatchKey] = (),
        max_rows: int | None = None,
        eager: bool = False,
    ) -> list[Batch]:
        """Batches whose buffer hit a trigger, at most `limit`; `force` flushes everything sendable.

        A buffer is ready at `self.max_rows` rows, `max_bytes` or linger; a batch cut from it carries up to
        `max_rows` (default `self.max_rows`; the scheduler passes more when requests are scarce, so that rows per
        request grow instead of rows waiting). When `limit` is smaller than the number of buffers, of the buffers
        the one with the oldest sendable row goes first (first come, first served): under a backlog every buffer
        gets a request within (buffers / QPS) seconds, and the rows it gathered meanwhile ride along, so none is
        starved by a bigger one that keeps refilling.

        `eager` (the scheduler's requests are scarce and one is free now) makes every buffer with rows ready
        (trigger "turn"): a request that waited for its turn must not then wait for linger too.

        Keys in `hold` (backing off after a retryable answer) keep buffering instead: one advertiser's outage must
        not stop the others, and must not multiply requests to the failing one.
        """
        now = self._clock()
        cap = self.max_rows if max_rows is None else max(1, min(max_rows, MAX_ROWS_LIMIT))
        bufs = list(self._buffers.values())
        if limit is not None and len(bufs) > limit:
            bufs.sort(key=lambda b: b.oldest() if b.rows else float("inf"))
        out: list[Batch] = []
        for buf in bufs:
            if limit is not None and len(out) >= limit:
                break
            if buf.key in hold:
                continue
            trigger = self._trigger(buf, now, force, eager)
            while trigger is not None and (limit is None or len(out) < limit):
                batch = self._cut(buf, trigger, cap)
                if batch is None:
                    break
                out.append(batch)
                trigger = self._trigger(buf, now, force, eager) if buf.key in self._buffers else None
        return out

    def has_ready(self, *, force: bool = False, hold: Container[BatchKey] = (), eager: bool = False) -> bool:
        """Whether `ready` would cut anything now (blocked rows aside)."""
        now = self._clock()
        return any(buf.key not in hold and self._trigger(buf, now, force, eager) for buf in self._buffers.values())

    def _trigger(self, buf: _Buffer, now: float, force: bool, eager: bool = False) -> str | None:
        if not buf.rows:
            return None
        if len(buf.rows) >= self.max_rows:
            return "rows"
        if buf.nbytes >= self.max_bytes:
            return "bytes"
        if now - buf.oldest() >= self.linger_s:
            return "linger"
        if force:
            return "force"
        return "turn" if eager else None

    def _cut(self, buf: _Buffer, trigger: str, max_rows: int) -> Batch | None:
        rows: list[Row] = []
        nbytes = 0
        inflight = self._inflight_cells
        free = inflight.keys().isdisjoint
        max_bytes = self.max_bytes
        blocked: list[Row] = []
        for row in buf.rows.values():
            if len(rows) >= max_rows or (rows and nbytes + row.nbytes > max_bytes):
                break
            if inflight and not free(row.keys):
                blocked.append(row)  # an older change to one of its cells is still in flight: wait for its outcome
                continue
            rows.append(row)
            nbytes += row.nbytes
        for row in blocked:
            del buf.rows[id(row)]
            if buf.early:
                buf.drop_early(row)
            buf.blocked[id(row)] = row
            self._blocked[id(row)] = row
            self._wait(row)
        if not rows:
            return None
        # `_remove_row` of every cut row, inlined (a cut moves up to 10,000 rows).
        pending, buf_rows, row_buffer = self._pending_cells, buf.rows, self._row_buffer
        for row in rows:
            rid = id(row)
            del buf_rows[rid]
            del row_buffer[rid]
            for ck in row.keys:
                del pending[ck]
                inflight[ck] = inflight.get(ck, 0) + 1
        if buf.early:
            for row in rows:
                buf.drop_early(row)
        buf.nbytes -= nbytes
        self.pending_rows -= len(rows)
        if not buf_rows and not buf.blocked:
            del self._buffers[buf.key]
        return Batch(next(self._ids), buf.key, rows, trigger)

    def release(self, rows: Iterable[Row]) -> None:
        """Rows reached a final outcome (uploaded or dead-lettered): their cells are no longer in flight."""
        inflight = self._inflight_cells
        landed: list[CellKey] = []
        for row in rows:
            for ck in row.keys:
                n = inflight[ck]
                if n > 1:
                    inflight[ck] = n - 1
                else:
                    del inflight[ck]
                    landed.append(ck)
        if self._waiting and landed:
            for ck in landed:
                for row in self._waiting.pop(ck, ()):
                    if self._blocked.get(id(row)) is not row:
                        continue  # unblocked, superseded or dropped meanwhile
                    if inflight.keys().isdisjoint(row.keys):
                        self._unblock(self._row_buffer[id(row)], row)
                    else:
                        self._wait(row)  # another of its cells is (again) in flight

    def _wait(self, row: Row) -> None:
        """Look at a blocked row again when one of its in-flight cells lands (O(rows waiting on that cell))."""
        inflight, waiting = self._inflight_cells, self._waiting
        for ck in row.keys:
            if ck in inflight:
                waiting.setdefault(ck, []).append(row)

    def _unblock(self, buf: _Buffer, row: Row) -> None:
        """Back among the sendable rows; it lingers from when it arrived, not from now (`_Buffer.early`)."""
        del self._blocked[id(row)]
        del buf.blocked[id(row)]
        rows = buf.rows
        if rows and next(iter(rows.values())).enqueued_at > row.enqueued_at:
            buf.add_early(row)
        rows[id(row)] = row

    def next_deadline(self, hold: Container[BatchKey] = ()) -> float | None:
        """When the oldest sendable row outside `hold` lingers out (clock time), or None when there is none."""
        oldest = [buf.oldest() for buf in self._buffers.values() if buf.rows and buf.key not in hold]
        return min(oldest) + self.linger_s if oldest else None

    # -- rebalance ------------------------------------------------------------------------------------------

    def drop_partitions(self, tps: Iterable[TopicPartition]) -> int:
        """Forget pending (not in-flight) rows of revoked or lost partitions; they will be re-consumed."""
        lost = set(tps)
        dropped = 0
        if not lost:
            return 0
        for buf in list(self._buffers.values()):
            for row in [r for r in (*buf.rows.values(), *buf.blocked.values()) if r.ref.tp in lost]:
                for ck in row.cell_keys():
                    self._pending_cells.pop(ck, None)
                self._remove_row(buf, row)
                dropped += 1
        return dropped

    def pending_for(self, tps: Iterable[TopicPartition]) -> int:
        want = set(tps)
        return sum(
            1 for buf in self._buffers.values() for r in (*buf.rows.values(), *buf.blocked.values()) if r.ref.tp in want
        )

    @property
    def inflight_cells(self) -> int:
        return len(self._inflight_cells)
