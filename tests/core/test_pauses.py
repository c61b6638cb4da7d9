"""Pause reasons: examples for each invariant of service/core/pauses.py, then a model-based suite.

The model-based suite (`TestPausesModel`) is bounded to run in a few seconds; set AUDIENCE_SYNC_MODEL_EXAMPLES to
a larger number of examples to search harder.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from service.core.pauses import PausePlan, Pauses
from service.core.types import TopicPartition

TP0 = TopicPartition("t", 0)
TP1 = TopicPartition("t", 1)
TP2 = TopicPartition("t", 2)


def settle(pauses: Pauses, assigned: list[TopicPartition]) -> PausePlan:
    plan = pauses.plan(assigned)
    pauses.applied(plan)
    return plan


def test_nothing_to_do_without_reasons() -> None:
    pauses = Pauses()
    assert pauses.plan([TP0, TP1]) == PausePlan([], [])
    assert pauses.paused == frozenset()
    assert not pauses.any_global


def test_a_partition_reason_pauses_only_that_partition() -> None:
    pauses = Pauses()
    pauses.add([TP1], "registry")
    assert settle(pauses, [TP0, TP1]) == PausePlan([TP1], [])
    assert pauses.paused == {TP1}
    assert pauses.reasons(TP1) == {"registry"}
    assert pauses.reasons(TP0) == set()


def test_paused_for_two_partition_reasons_resumes_only_when_both_are_gone() -> None:
    pauses = Pauses()
    pauses.add([TP0], "registry")
    pauses.add([TP0], "hold")
    assert settle(pauses, [TP0]).pause == [TP0]
    pauses.remove([TP0], "registry")
    assert settle(pauses, [TP0]) == PausePlan([], []), "one reason is left"
    assert pauses.paused == {TP0}
    pauses.remove([TP0], "hold")
    assert settle(pauses, [TP0]) == PausePlan([], [TP0])
    assert pauses.paused == frozenset()


def test_paused_for_a_global_and_a_partition_reason_resumes_only_when_both_are_gone() -> None:
    pauses = Pauses()
    pauses.set_global("backpressure", True)
    pauses.add([TP0], "registry")
    assert settle(pauses, [TP0, TP1]) == PausePlan([TP0, TP1], [])
    pauses.set_global("backpressure", False)
    assert settle(pauses, [TP0, TP1]) == PausePlan([], [TP1]), "TP0 still waits for its schema"
    pauses.remove([TP0], "registry")
    assert settle(pauses, [TP0, TP1]) == PausePlan([], [TP0])
    assert pauses.paused == frozenset()


def test_two_global_reasons_resume_only_when_both_are_gone() -> None:
    pauses = Pauses()
    pauses.set_global("upload_gate", True)
    pauses.set_global("dlq_guard", True)
    assert settle(pauses, [TP0]).pause == [TP0]
    pauses.set_global("upload_gate", False)
    assert pauses.any_global
    assert settle(pauses, [TP0]) == PausePlan([], [])
    pauses.set_global("dlq_guard", False)
    assert not pauses.any_global
    assert settle(pauses, [TP0]) == PausePlan([], [TP0])


def test_removing_a_reason_never_set_is_harmless() -> None:
    pauses = Pauses()
    pauses.remove([TP0], "registry")
    pauses.set_global("backpressure", False)
    pauses.add([TP0], "hold")
    pauses.remove([TP0], "registry")
    assert pauses.reasons(TP0) == {"hold"}


def test_global_reasons_apply_to_partitions_assigned_later() -> None:
    pauses = Pauses()
    pauses.set_global("backpressure", True)
    assert settle(pauses, [TP0]).pause == [TP0]
    assert settle(pauses, [TP0, TP1]) == PausePlan([TP1], []), "TP1 joined while backpressure holds"
    assert pauses.reasons(TP2) == {"backpressure"}


def test_partition_paused_by_the_consumer_is_resumed_when_no_reason_is_left() -> None:
    """Defect 8: a partition the assign callback paused was never resumed."""
    pauses = Pauses()
    pauses.set_global("upload_gate", True)
    settle(pauses, [TP0])
    pauses.paused_by_consumer([TP1])  # the assign callback paused TP1 under the gate
    assert settle(pauses, [TP0, TP1]) == PausePlan([], []), "already paused: no second pause"
    pauses.set_global("upload_gate", False)
    assert settle(pauses, [TP0, TP1]) == PausePlan([], [TP0, TP1])
    assert pauses.paused == frozenset()


def test_partition_paused_by_the_consumer_without_any_reason_is_resumed_at_once() -> None:
    # The assign callback pauses on backpressure before the loop set the global reason; it may then be gone.
    pauses = Pauses()
    pauses.paused_by_consumer([TP0])
    assert pauses.paused == {TP0}
    assert settle(pauses, [TP0]) == PausePlan([], [TP0])


def test_forget_drops_reasons_and_the_paused_state() -> None:
    pauses = Pauses()
    pauses.add([TP0], "registry")
    settle(pauses, [TP0, TP1])
    pauses.forget([TP0])  # revoked or lost
    assert pauses.paused == frozenset()
    assert pauses.reasons(TP0) == set()
    assert settle(pauses, [TP1]) == PausePlan([], []), "nothing to resume: TP0 is not ours"
    assert settle(pauses, [TP0, TP1]) == PausePlan([], []), "re-assigned, it starts unpaused and reasonless"


def test_forget_keeps_global_reasons() -> None:
    pauses = Pauses()
    pauses.set_global("dlq_guard", True)
    settle(pauses, [TP0])
    pauses.forget([TP0])
    assert pauses.reasons(TP0) == {"dlq_guard"}
    assert settle(pauses, [TP0]).pause == [TP0], "re-assigned under the global reason: paused again"


def test_resume_never_names_an_unassigned_partition() -> None:
    pauses = Pauses()
    pauses.add([TP0, TP1], "registry")
    settle(pauses, [TP0, TP1])
    pauses.remove([TP0, TP1], "registry")
    assert pauses.plan([TP1]) == PausePlan([], [TP1])
    assert pauses.plan([]) == PausePlan([], [])


def test_reason_of_an_unassigned_partition_pauses_it_once_assigned() -> None:
    pauses = Pauses()
    pauses.add([TP2], "registry")
    assert settle(pauses, [TP0]) == PausePlan([], [])
    assert settle(pauses, [TP0, TP2]) == PausePlan([TP2], [])


def test_plan_is_idempotent_after_applied() -> None:
    pauses = Pauses()
    pauses.set_global("backpressure", True)
    pauses.add([TP1], "registry")
    first = pauses.plan([TP2, TP0, TP1])
    assert first == PausePlan([TP0, TP1, TP2], []), "sorted: deterministic calls to the consumer"
    assert pauses.plan([TP2, TP0, TP1]) == first, "planning alone changes nothing"
    pauses.applied(first)
    assert pauses.plan([TP0, TP1, TP2]) == PausePlan([], [])
    assert pauses.plan([TP0, TP1, TP2]) == PausePlan([], [])
    pauses.set_global("backpressure", False)
    second = pauses.plan([TP0, TP1, TP2])
    assert second == PausePlan([], [TP0, TP2])
    pauses.applied(second)
    assert pauses.plan([TP0, TP1, TP2]) == PausePlan([], [])


# -- model-based ----------------------------------------------------------------------------------------------

MODEL_EXAMPLES = int(os.environ.get("AUDIENCE_SYNC_MODEL_EXAMPLES", "0") or 0)
PARTS = [TopicPartition("t", p) for p in range(4)]
GLOBAL_REASONS = ["backpressure", "upload_gate", "dlq_guard"]
PART_REASONS = ["registry", "hold"]


class PausesMachine(RuleBasedStateMachine):
    """Random reasons, assignments and plans; the consumer's paused set is modelled next to `Pauses`.

    Assign and revoke do what the loop's callbacks do: `forget` the partitions, and on assign the consumer pauses
    them itself (reported with `paused_by_consumer`) under a global reason or, sometimes, without one.
    """

    def __init__(self) -> None:
        super().__init__()
        self.pauses = Pauses()
        self.assigned: set[TopicPartition] = set()
        self.consumer_paused: set[TopicPartition] = set()
        self.global_reasons: set[str] = set()
        self.reasons: dict[TopicPartition, set[str]] = {tp: set() for tp in PARTS}

    @rule(reason=st.sampled_from(GLOBAL_REASONS), on=st.booleans())
    def set_global(self, reason: str, on: bool) -> None:
        self.pauses.set_global(reason, on)
        if on:
            self.global_reasons.add(reason)
        else:
            self.global_reasons.discard(reason)

    @rule(tps=st.sets(st.sampled_from(PARTS), max_size=2), reason=st.sampled_from(PART_REASONS))
    def add(self, tps: set[TopicPartition], reason: str) -> None:
        self.pauses.add(tps, reason)
        for tp in tps:
            self.reasons[tp].add(reason)

    @rule(tps=st.sets(st.sampled_from(PARTS), max_size=2), reason=st.sampled_from(PART_REASONS))
    def remove(self, tps: set[TopicPartition], reason: str) -> None:
        self.pauses.remove(tps, reason)
        for tp in tps:
            self.reasons[tp].discard(reason)

    @precondition(lambda self: len(self.assigned) < len(PARTS))
    @rule(data=st.data(), consumer_pauses=st.booleans())
    def assign(self, data: st.DataObject, consumer_pauses: bool) -> None:
        new = data.draw(st.sets(st.sampled_from(sorted(set(PARTS) - self.assigned)), min_size=1))
        self.assigned |= new
        self.pauses.forget(new)
        for tp in new:
            self.reasons[tp].clear()
        if self.pauses.any_global or consumer_pauses:
            self.pauses.paused_by_consumer(new)
            self.consumer_paused |= new

    @precondition(lambda self: self.assigned)
    @rule(data=st.data())
    def revoke(self, data: st.DataObject) -> None:
        gone = data.draw(st.sets(st.sampled_from(sorted(self.assigned)), min_size=1))
        self.assigned -= gone
        self.pauses.forget(gone)
        self.consumer_paused -= gone  # a revoked partition's pause state goes with it
        for tp in gone:
            self.reasons[tp].clear()

    @rule()
    def plan_and_apply(self) -> None:
        plan = self.pauses.plan(self.assigned)
        pause, resume = set(plan.pause), set(plan.resume)
        assert pause <= self.assigned and resume <= self.assigned, "only assigned partitions are touched"
        assert not pause & self.consumer_paused, "no partition is paused twice"
        assert resume <= self.consumer_paused, "only paused partitions are resumed"
        assert not pause & resume
        self.consumer_paused = (self.consumer_paused - resume) | pause
        self.pauses.applied(plan)
        expected = {tp for tp in self.assigned if self.global_reasons or self.reasons[tp]}
        assert self.consumer_paused == expected
        assert self.pauses.paused == expected
        assert expected == {tp for tp in self.assigned if self.pauses.reasons(tp)}
        assert self.pauses.plan(self.assigned) == PausePlan([], []), "idempotent after applied"

    @invariant()
    def bookkeeping_matches_the_consumer(self) -> None:
        assert self.pauses.paused == self.consumer_paused
        assert self.pauses.paused <= self.assigned
        assert self.pauses.any_global is bool(self.global_reasons)
        for tp in PARTS:
            assert self.pauses.reasons(tp) == self.global_reasons | self.reasons[tp]


PausesMachine.TestCase.settings = settings(
    max_examples=MODEL_EXAMPLES or 100,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestPausesModel = PausesMachine.TestCase
