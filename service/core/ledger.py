"""The pending-record ledger: which consumed records are unfinished, and which offset is safe to commit.

Records of one partition finish out of order (batches are keyed by advertiser, dead letters wait for a broker
ack), so the offset to commit is the first one not yet finished: Redpanda Connect's checkpointer and arroyo's
commit strategy. The ledger also owns *liveness*: a record is live from `track` until `finish` or until its
partition is revoked or lost; every completion names the `source` object it was tracked with, so a late
completion of a revoked (and maybe re-consumed) record is recognised as stale and ignored.

Invariants (tests/core/test_ledger.py and the model-based suite try to break them):
- `take_committable()` never returns an offset past a tracked, unfinished record of that partition;
- a record finishes at most once, and only with the source object it was tracked with;
- records of partitions that are not assigned are refused (`track` returns False): after a revoke nothing
  of that partition is live, so no upload may carry it;
- `tracked` counts every record from each partition's first unfinished offset to its newest one (finished or
  not): that, not the unfinished count, is what memory grows with, so the loop pauses consumption on it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from service.core.types import RecordRef, TopicPartition


class _Tracked(Protocol):
    @property
    def ref(self) -> RecordRef: ...

    @property
    def source(self) -> Any: ...


_R = TypeVar("_R", bound=_Tracked)


@dataclass(slots=True)
class _Partition:
    order: deque[int] = field(default_factory=deque)  # tracked offsets from the first unfinished one
    live: dict[int, Any] = field(default_factory=dict)  # unfinished offset → its source
    next: int | None = None  # the offset after the last one tracked
    stored: int | None = None  # last value handed out by `take_committable`

    def committable(self) -> int | None:
        if self.order:
            return self.order[0]
        return self.next

    def advance(self) -> None:
        order, live = self.order, self.live
        while order and order[0] not in live:
            order.popleft()


class Ledger:
    """All assigned partitions' pending records (see the module docstring for the invariants)."""

    def __init__(self) -> None:
        self._parts: dict[TopicPartition, _Partition] = {}
        self._tracked = 0
        self.resets = 0  # partitions whose offsets went backwards (topic recreated, offsets reset)

    # -- assignment -----------------------------------------------------------------------------------------

    def assign(self, tps: Iterable[TopicPartition]) -> None:
        """A fresh start from the committed offset: earlier state of these partitions is dropped."""
        for tp in tps:
            self._drop(tp)
            self._parts[tp] = _Partition()

    def revoke(self, tps: Iterable[TopicPartition]) -> None:
        """Revoked or lost: nothing of these partitions is live any more, late completions are ignored."""
        for tp in tps:
            self._drop(tp)

    def _drop(self, tp: TopicPartition) -> None:
        part = self._parts.pop(tp, None)
        if part is not None:
            self._tracked -= len(part.order)

    def assigned(self, tp: TopicPartition) -> bool:
        return tp in self._parts

    def partitions(self) -> list[TopicPartition]:
        return list(self._parts)

    # -- records --------------------------------------------------------------------------------------------

    def track(self, ref: RecordRef, source: Any) -> bool:
        """Start tracking a consumed record; False (nothing tracked) when its partition is not assigned.

        An offset below the last one tracked means the partition's log was reset (topic recreated, offsets
        reset): the earlier state is dropped (its records are no longer live) and counting starts again.
        """
        part = self._parts.get(ref[:2])  # type: ignore[call-overload]
        if part is None:
            return False
        offset = ref[2]
        if part.next is not None and offset < part.next:
            self.resets += 1
            self._tracked -= len(part.order)
            part = self._parts[ref.tp] = _Partition()
        part.order.append(offset)
        part.live[offset] = source
        part.next = offset + 1
        self._tracked += 1
        return True

    def finish(self, ref: RecordRef, source: Any) -> bool:
        """The record reached its final outcome; False when the completion is stale (revoked, re-consumed)."""
        part = self._parts.get(ref[:2])  # type: ignore[call-overload]
        if part is None or source is None:
            return False
        offset = ref[2]
        if part.live.get(offset) is not source:
            return False
        del part.live[offset]
        if part.order[0] == offset:
            before = len(part.order)
            part.advance()
            self._tracked -= before - len(part.order)
        return True

    def finish_all(self, rows: Iterable[_R]) -> None:
        """`finish` of every row's record (`ref`, `source`), in one call: a whole upload lands at once."""
        parts = self._parts
        last_tp: tuple[str, int] | None = None
        part: _Partition | None = None
        for row in rows:
            src = row.source
            if src is None:
                continue
            ref = row.ref
            tp = ref[:2]
            if tp != last_tp:
                part = parts.get(tp)  # type: ignore[call-overload]
                last_tp = tp
            if part is None:
                continue
            offset = ref[2]
            live = part.live
            if live.get(offset) is not src:
                continue  # stale: revoked (and maybe re-consumed) meanwhile
            del live[offset]
            order = part.order
            if order[0] == offset:
                before = len(order)
                part.advance()
                self._tracked -= before - len(order)

    def is_live(self, ref: RecordRef, source: Any) -> bool:
        part = self._parts.get(ref[:2])  # type: ignore[call-overload]
        return part is not None and source is not None and part.live.get(ref[2]) is source

    def live(self, rows: list[_R]) -> list[_R]:
        """The rows (anything with the `ref` and `source` it was tracked with) whose record is live: `is_live` for
        a whole upload at once (the revocation fence runs it over every row of every request)."""
        parts = self._parts
        out: list[_R] = []
        last_tp: tuple[str, int] | None = None
        part: _Partition | None = None
        for row in rows:
            ref, src = row.ref, row.source
            tp = ref[:2]
            if tp != last_tp:
                part = parts.get(tp)  # type: ignore[call-overload]
                last_tp = tp
            if part is not None and src is not None and part.live.get(ref[2]) is src:
                out.append(row)
        return out

    def source(self, ref: RecordRef) -> Any:
        part = self._parts.get(ref[:2])  # type: ignore[call-overload]
        return None if part is None else part.live.get(ref[2])

    def live_sources(self, tps: Iterable[TopicPartition] | None = None) -> Iterator[tuple[RecordRef, Any]]:
        for tp in list(self._parts) if tps is None else tps:
            part = self._parts.get(tp)
            if part is not None:
                for offset, src in list(part.live.items()):
                    yield RecordRef(tp.topic, tp.partition, offset), src

    # -- offsets and sizes ----------------------------------------------------------------------------------

    def committable(self, tp: TopicPartition) -> int | None:
        """The offset to commit (first unfinished, or one past the last tracked); None before any record."""
        part = self._parts.get(tp)
        return None if part is None else part.committable()

    def take_committable(self) -> dict[TopicPartition, int]:
        """Committable offsets that moved since the last call (lets the edge skip redundant stores)."""
        out: dict[TopicPartition, int] = {}
        for tp, part in self._parts.items():
            c = part.committable()
            if c is not None and c != part.stored:
                part.stored = c
                out[tp] = c
        return out

    def pending(self, tp: TopicPartition | None = None) -> int:
        """Unfinished records (of one partition, or all)."""
        if tp is not None:
            part = self._parts.get(tp)
            return 0 if part is None else len(part.live)
        return sum(len(p.live) for p in self._parts.values())

    @property
    def tracked(self) -> int:
        """Consumed records not yet committable, finished or not: what memory grows with."""
        return self._tracked
