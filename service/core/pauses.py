"""Why each partition is paused. Pure: the loop applies the plan to the consumer.

Several independent reasons pause consumption (backpressure, an upload gate, the DLQ guard, a schema fetch for
one partition); resuming for one reason must not undo another. A partition is paused exactly while it has at
least one reason, and only assigned partitions count.

Invariants (tests/core/test_pauses.py):
- after `applied(plan)`, the paused set equals the assigned partitions that have a reason;
- a partition the consumer paused on its own (the assign callback) is recorded, so it is resumed when its
  reasons are gone;
- a revoked or lost partition keeps no reason and is not remembered as paused.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from service.core.types import TopicPartition

GLOBAL = "*"  # reasons that apply to every assigned partition, present and future


@dataclass(frozen=True, slots=True)
class PausePlan:
    pause: list[TopicPartition]
    resume: list[TopicPartition]


class Pauses:
    def __init__(self) -> None:
        self._global: set[str] = set()
        self._reasons: dict[TopicPartition, set[str]] = {}
        self._paused: set[TopicPartition] = set()

    def set_global(self, reason: str, on: bool) -> None:
        """A reason for every assigned partition (backpressure, an upload gate, the DLQ guard)."""
        if on:
            self._global.add(reason)
        else:
            self._global.discard(reason)

    def add(self, tps: Iterable[TopicPartition], reason: str) -> None:
        for tp in tps:
            self._reasons.setdefault(tp, set()).add(reason)

    def remove(self, tps: Iterable[TopicPartition], reason: str) -> None:
        for tp in tps:
            rs = self._reasons.get(tp)
            if rs is not None:
                rs.discard(reason)
                if not rs:
                    del self._reasons[tp]

    def reasons(self, tp: TopicPartition) -> set[str]:
        return self._global | self._reasons.get(tp, set())

    @property
    def any_global(self) -> bool:
        return bool(self._global)

    def paused_by_consumer(self, tps: Iterable[TopicPartition]) -> None:
        """The consumer paused these itself (newly assigned partitions under a global reason)."""
        self._paused.update(tps)

    def forget(self, tps: Iterable[TopicPartition]) -> None:
        for tp in tps:
            self._reasons.pop(tp, None)
            self._paused.discard(tp)

    def plan(self, assigned: Iterable[TopicPartition]) -> PausePlan:
        assigned = set(assigned)
        wanted = set(assigned) if self._global else {tp for tp in self._reasons if tp in assigned}
        return PausePlan(sorted(wanted - self._paused), sorted((self._paused - wanted) & assigned))

    def applied(self, plan: PausePlan) -> None:
        self._paused.difference_update(plan.resume)
        self._paused.update(plan.pause)

    @property
    def paused(self) -> frozenset[TopicPartition]:
        return frozenset(self._paused)
