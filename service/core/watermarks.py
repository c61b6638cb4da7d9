"""Per-partition commit watermarks: which offset is safe to store.

Records of one partition finish out of order (batches are keyed by advertiser, not by partition; dead letters
wait for a broker ack), so the offset to store is the first one not yet finished. This is Redpanda Connect's
checkpointer and arroyo's commit strategy: the mark only moves past contiguous finished offsets.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from service.core.types import RecordRef as RecordRef
from service.core.types import TopicPartition as TopicPartition


@dataclass(slots=True)
class PartitionWatermark:
    """Offsets handed out in consumption order; `committable()` is the next offset to store.

    Offsets of one partition arrive increasing; a seek backwards (after a rebalance) starts a new instance.
    """

    _order: deque[int] = field(default_factory=deque)
    _done: set[int] = field(default_factory=set)
    _next: int | None = None  # the offset after the last one tracked
    _stored: int | None = None  # last value handed to `take_committable`

    def track(self, offset: int) -> None:
        if self._next is not None and offset < self._next:
            raise ValueError(f"offset {offset} goes backwards (next expected >= {self._next})")
        self._order.append(offset)
        self._next = offset + 1

    def finish(self, offset: int) -> None:
        if self._order and offset >= self._order[0]:
            self._done.add(offset)
            order, done = self._order, self._done
            while order and order[0] in done:
                done.discard(order.popleft())

    def committable(self) -> int | None:
        """The offset to store (first unfinished, or one past the last tracked); None before any record."""
        if self._order:
            return self._order[0]
        return self._next

    def take_committable(self) -> int | None:
        """`committable()` if it moved since the last call; lets the edge skip redundant `store_offsets`."""
        c = self.committable()
        if c is None or c == self._stored:
            return None
        self._stored = c
        return c

    @property
    def pending(self) -> int:
        return len(self._order) - len(self._done)


class Watermarks:
    """All assigned partitions' watermarks."""

    def __init__(self) -> None:
        self._parts: dict[TopicPartition, PartitionWatermark] = {}

    def track(self, ref: RecordRef) -> None:
        # `ref[:2]` is a plain tuple equal to (and hashing like) the TopicPartition key, and cheaper to make.
        wm = self._parts.get(ref[:2])  # type: ignore[call-overload]
        if wm is None:
            wm = self._parts[ref.tp] = PartitionWatermark()
        wm.track(ref.offset)

    def finish(self, ref: RecordRef) -> None:
        wm = self._parts.get(ref[:2])  # type: ignore[call-overload]
        if wm is not None:  # a revoked partition's late completions are ignored
            wm.finish(ref.offset)

    def committable(self, tp: TopicPartition) -> int | None:
        wm = self._parts.get(tp)
        return None if wm is None else wm.committable()

    def take_committable(self) -> dict[TopicPartition, int]:
        out: dict[TopicPartition, int] = {}
        for tp, wm in self._parts.items():
            c = wm.take_committable()
            if c is not None:
                out[tp] = c
        return out

    def pending(self, tp: TopicPartition | None = None) -> int:
        if tp is not None:
            wm = self._parts.get(tp)
            return 0 if wm is None else wm.pending
        return sum(wm.pending for wm in self._parts.values())

    def pending_by_partition(self) -> dict[TopicPartition, int]:
        return {tp: wm.pending for tp, wm in self._parts.items()}

    def forget(self, tps: list[TopicPartition]) -> None:
        for tp in tps:
            self._parts.pop(tp, None)

    def partitions(self) -> list[TopicPartition]:
        return list(self._parts)
