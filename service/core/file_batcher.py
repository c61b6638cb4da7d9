"""Buffering of file-audience membership changes until an upload is due. Pure: no I/O, injected clock.

A `mode: file` mappings entry feeds a customer-file audience (docs/tiktok-api.md §3): its records are netted per
user (`NetChanges`, last action wins) and, on the entry's interval or size, cut into one `FileBatch` that the
pipeline turns into files, APPEND / REMOVE updates or a create (service/pipeline/file_uploads.py).

Invariants (tests/core/test_file_batcher.py, including a state machine):
- one buffer per (advertiser, audience key, contract); every added record is in exactly one place until it
  reaches an outcome or its partition is revoked: its buffer, or the one cut batch that covers it;
- at most one batch per key is out (cut, not `done`): batches of one audience are applied in cut order, so a
  later batch can never be overtaken by an earlier one for the same user;
- a buffer whose audience does not exist yet (no audience id: created on demand) is cut only once it holds at
  least `min_create` users to APPEND, since TikTok refuses to create (or keep) an audience of fewer than 1,000;
- a buffer is ready when its users reach the entry's `max_rows`, its oldest record has waited `interval_s`,
  or the caller forces it (drain, revoke) or signals pressure (tracked records near the consumer's bound);
- `drop_partitions` forgets the buffered records of revoked partitions and nets the rest again, so no user
  keeps an action that only a revoked record gave it;
- last action wins by offset within a partition: a record added after a newer one of its partition (an older
  record routed again after a dead-letter hold) takes the newer one's action instead of undoing it.

Memory: each buffered record is also tracked in the ledger, whose bound (`MAX_PENDING_EVENTS`) pauses
consumption; the pressure trigger cuts buffers before that bound is reached, so a long interval never stalls
the consumer.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from itertools import count
from typing import Any, Final, NamedTuple

from service.core.customer_files import MIN_AUDIENCE_SIZE, FileContract, NetBatch, NetChanges
from service.core.model import Action, IdType
from service.core.types import RecordRef, TopicPartition

FileKey = tuple[str, str, FileContract]  # advertiser id, audience key, contract

# The service-wide cadence (FILE_INTERVAL_S, FILE_MAX_ROWS), which an entry's file_interval_s / file_max_rows
# override: every customer-file update makes TikTok match the audience again, so uploads are minutes apart.
FILE_INTERVAL_S: Final = 300.0
FILE_MAX_ROWS: Final = 100_000


class FileChange(NamedTuple):
    """One user's membership change in a customer-file audience (a `mode: file` entry), identifiers hashed and
    narrowed to the entry's one contract. `audience_id` is None while the audience is to be created on demand,
    named `audience_name`; `interval_s` / `max_rows` are the entry's overrides (None: the service default)."""

    advertiser_id: str
    audience_key: str
    audience_id: str | None
    audience_name: str | None
    contract: FileContract
    action: Action
    identifiers: tuple[tuple[IdType, str], ...]
    event_time_ms: int | None = None
    interval_s: float | None = None
    max_rows: int | None = None

    @property
    def key(self) -> FileKey:
        return (self.advertiser_id, self.audience_key, self.contract)


class FileRow:
    """One buffered record: its change, where it came from (for the ledger and dead letters), when it came."""

    __slots__ = ("change", "enqueued_at", "ref", "source")

    def __init__(self, ref: RecordRef, change: FileChange, enqueued_at: float, source: Any = None) -> None:
        self.ref = ref
        self.change = change
        self.enqueued_at = enqueued_at
        self.source = source


@dataclass(slots=True, eq=False)
class FileBatch:
    """One cut: the netted updates for one audience and the records they cover (`net.handles`, record order)."""

    id: int
    key: FileKey
    audience_id: str | None
    audience_name: str | None
    net: NetBatch[FileRow]
    trigger: str  # rows | interval | force | pressure

    @property
    def advertiser_id(self) -> str:
        return self.key[0]

    @property
    def audience_key(self) -> str:
        return self.key[1]

    @property
    def contract(self) -> FileContract:
        return self.key[2]

    @property
    def rows(self) -> tuple[FileRow, ...]:
        return self.net.handles


def net_rows(contract: FileContract, rows: Iterable[FileRow]) -> NetBatch[FileRow]:
    """`rows` netted again from scratch (after some were revoked): the batch they alone would have made."""
    net: NetChanges[FileRow] = NetChanges([contract], max_users=sys.maxsize, max_records=sys.maxsize)
    for row in rows:
        net.record(row.change.action, row.change.identifiers, row)
    return net.drain()


@dataclass(slots=True, eq=False)
class _Buffer:
    key: FileKey
    net: NetChanges[FileRow]
    audience_id: str | None = None
    audience_name: str | None = None
    interval_s: float | None = None
    max_rows: int | None = None
    rows: list[FileRow] = field(default_factory=list)  # the records of `net`, in order (for revokes)
    newest: dict[tuple[IdType, str], FileRow] = field(default_factory=dict)  # per identifier, of `rows`


class FileBatcher:
    def __init__(
        self,
        *,
        interval_s: float,
        max_rows: int,
        clock: Callable[[], float],
        min_create: int = MIN_AUDIENCE_SIZE,
    ) -> None:
        if interval_s <= 0 or max_rows < 1 or min_create < 1:
            raise ValueError("interval_s must be positive, max_rows and min_create at least 1")
        self.interval_s = interval_s
        self.max_rows = max_rows
        self.min_create = min_create
        self._clock = clock
        self._buffers: dict[FileKey, _Buffer] = {}
        self._out: set[FileKey] = set()  # keys with a batch cut and not yet done
        # Audiences created (or found) on demand: (advertiser id, name) → id. Later records of the entry still
        # carry no id (the resolver does not learn it), and must not wait for 1,000 users to APPEND again.
        self._created: dict[tuple[str, str], str] = {}
        # The audience store's record of created audiences (set by the pipeline; filled in place as the store
        # reads its topic): after a restart, an audience created by an earlier run is known from it.
        self.known: Mapping[tuple[str, str], str] = {}
        self._ids = count(1)
        self.pending_rows = 0

    # -- intake ---------------------------------------------------------------------------------------------

    def add(self, ref: RecordRef, change: FileChange, source: Any = None) -> FileRow:
        key = change.key
        buf = self._buffers.get(key)
        if buf is None:
            net: NetChanges[FileRow] = NetChanges([key[2]], max_users=sys.maxsize, max_records=sys.maxsize)
            buf = self._buffers[key] = _Buffer(key, net)
        # The newest record carries the entry's current settings (mappings reload live).
        if change.audience_id is not None:
            buf.audience_id = change.audience_id
        buf.audience_name = change.audience_name
        buf.interval_s = change.interval_s
        buf.max_rows = change.max_rows
        change = _newest_wins(buf.newest, ref, change)
        row = FileRow(ref, change, self._clock(), source)
        buf.net.record(change.action, change.identifiers, row)
        buf.rows.append(row)
        _note_newest(buf.newest, row)
        self.pending_rows += 1
        return row

    # -- cutting --------------------------------------------------------------------------------------------

    def ready(self, *, force: bool = False, pressure: bool = False) -> list[FileBatch]:
        """A batch for every buffer that hit a trigger and has no batch out, oldest buffer first."""
        now = self._clock()
        out: list[FileBatch] = []
        for buf in sorted(self._buffers.values(), key=lambda b: b.rows[0].enqueued_at if b.rows else now):
            trigger = self._trigger(buf, now, force, pressure)
            if trigger is not None:
                out.append(self._cut(buf, trigger))
        return out

    def _trigger(self, buf: _Buffer, now: float, force: bool, pressure: bool) -> str | None:
        if not buf.rows or buf.key in self._out:
            return None
        if buf.audience_id is None:
            buf.audience_id = self._recorded(buf)
            if buf.audience_id is None and buf.net.pending_appends < self.min_create:
                return None  # the audience is to be created: TikTok wants 1,000 users for that
        if buf.net.pending_users >= (buf.max_rows or self.max_rows):
            return "rows"
        if now - buf.rows[0].enqueued_at >= (buf.interval_s or self.interval_s):
            return "interval"
        if force:
            return "force"
        return "pressure" if pressure else None

    def _cut(self, buf: _Buffer, trigger: str) -> FileBatch:
        net = buf.net.drain()
        self.pending_rows -= len(buf.rows)
        buf.rows = []
        buf.newest = {}
        self._out.add(buf.key)
        return FileBatch(next(self._ids), buf.key, buf.audience_id, buf.audience_name, net, trigger)

    def done(self, key: FileKey, audience_id: str | None = None, audience_name: str | None = None) -> None:
        """The batch of `key` reached its outcome; `audience_id` is the audience it created or found, if any
        (named `audience_name`, else the buffer's name: remembered for the entry's later records)."""
        self._out.discard(key)
        buf = self._buffers.get(key)
        if buf is not None:
            if audience_id is not None and buf.audience_id is None:
                buf.audience_id = audience_id
                name = audience_name if audience_name is not None else buf.audience_name
                if name is not None:
                    self._created[(key[0], name)] = audience_id
            if not buf.rows:
                del self._buffers[key]

    def next_deadline(self) -> float | None:
        """When the next buffer's interval runs out (buffers waiting for a batch out or for users excluded)."""
        due = [
            b.rows[0].enqueued_at + (b.interval_s or self.interval_s)
            for b in self._buffers.values()
            if b.rows and b.key not in self._out and (b.audience_id is not None or self._creatable(b))
        ]
        return min(due) if due else None

    def _creatable(self, buf: _Buffer) -> bool:
        return buf.net.pending_appends >= self.min_create or self._recorded(buf) is not None

    def _recorded(self, buf: _Buffer) -> str | None:
        """The id of the audience this buffer's entry created on demand, if this run or the store knows it."""
        if buf.audience_name is None:
            return None
        ref = (buf.key[0], buf.audience_name)
        return self._created.get(ref) or self.known.get(ref)

    # -- bookkeeping ----------------------------------------------------------------------------------------

    @property
    def pending_users(self) -> int:
        return sum(b.net.pending_users for b in self._buffers.values())

    def waiting_for_users(self) -> list[tuple[FileKey, int]]:
        """Buffers of audiences to create that hold too few users to create them: (key, users to APPEND)."""
        return [
            (b.key, b.net.pending_appends)
            for b in self._buffers.values()
            if b.rows and b.audience_id is None and not self._creatable(b)
        ]

    def waiting_rows(self, tp: TopicPartition | None = None) -> int:
        """Buffered records (of `tp`, or all) in buffers that `waiting_for_users` lists: no force cuts them."""
        return sum(
            sum(1 for r in b.rows if tp is None or r.ref.tp == tp)
            for b in self._buffers.values()
            if b.rows and b.audience_id is None and not self._creatable(b)
        )

    def drop_partitions(self, tps: Iterable[TopicPartition]) -> int:
        """Forget the buffered records of revoked partitions; the rest of each buffer is netted again."""
        lost = set(tps)
        if not lost:
            return 0
        dropped = 0
        for buf in list(self._buffers.values()):
            keep = [r for r in buf.rows if r.ref.tp not in lost]
            gone = len(buf.rows) - len(keep)
            if not gone:
                continue
            dropped += gone
            net: NetChanges[FileRow] = NetChanges([buf.key[2]], max_users=sys.maxsize, max_records=sys.maxsize)
            newest: dict[tuple[IdType, str], FileRow] = {}
            for row in keep:
                net.record(row.change.action, row.change.identifiers, row)
                _note_newest(newest, row)
            buf.net, buf.rows, buf.newest = net, keep, newest
            if not keep and buf.key not in self._out:
                del self._buffers[buf.key]
        self.pending_rows -= dropped
        return dropped

    def pending_for(self, tps: Iterable[TopicPartition]) -> int:
        want = set(tps)
        return sum(1 for b in self._buffers.values() for r in b.rows if r.ref.tp in want)


def _newer(a: RecordRef, b: RecordRef) -> bool:
    """`a` is a later record than `b` of the same partition (records of different partitions have no order)."""
    return a.offset > b.offset and a.partition == b.partition and a.topic == b.topic


def _newest_wins(newest: dict[tuple[IdType, str], FileRow], ref: RecordRef, change: FileChange) -> FileChange:
    """An older record routed again (after a dead-letter hold) behind a newer one of its partition takes the newer
    one's action: it then rides on the update that carries it, instead of undoing it (last added would win)."""
    for ident in change.identifiers:
        row = newest.get(ident)
        if row is not None and _newer(row.ref, ref):
            return change._replace(action=row.change.action)
    return change


def _note_newest(newest: dict[tuple[IdType, str], FileRow], row: FileRow) -> None:
    for ident in row.change.identifiers:
        seen = newest.get(ident)
        if seen is None or not _newer(seen.ref, row.ref):
            newest[ident] = row
