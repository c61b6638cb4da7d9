"""The pending-record ledger: examples for each invariant of service/core/ledger.py, then a model-based suite.

The model-based suite (`TestLedgerModel`) is bounded to run in a few seconds; set AUDIENCE_SYNC_MODEL_EXAMPLES to
a larger number of examples (e.g. 2000) to search harder.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from service.core.ledger import Ledger
from service.core.types import RecordRef, TopicPartition

TP0 = TopicPartition("t", 0)
TP1 = TopicPartition("t", 1)


def ref(off: int, tp: TopicPartition = TP0) -> RecordRef:
    return RecordRef(tp.topic, tp.partition, off)


def tracked_ledger(offsets: range, tp: TopicPartition = TP0) -> tuple[Ledger, dict[int, object]]:
    ledger = Ledger()
    ledger.assign([tp])
    sources = {off: object() for off in offsets}
    for off, src in sources.items():
        assert ledger.track(ref(off, tp), src)
    return ledger, sources


# -- examples -------------------------------------------------------------------------------------------------


def test_nothing_to_commit_before_the_first_record() -> None:
    ledger = Ledger()
    ledger.assign([TP0])
    assert ledger.committable(TP0) is None
    assert ledger.take_committable() == {}
    assert ledger.committable(TP1) is None, "an unassigned partition has nothing to commit"


def test_commit_offset_never_passes_an_unfinished_record() -> None:
    ledger, src = tracked_ledger(range(10, 15))
    assert ledger.committable(TP0) == 10
    for off in (11, 12, 14):
        assert ledger.finish(ref(off), src[off])
        assert ledger.committable(TP0) == 10, "offset 10 is unfinished"
    assert ledger.finish(ref(10), src[10])
    assert ledger.committable(TP0) == 13, "10..12 finished, 13 is not"
    assert ledger.finish(ref(13), src[13])
    assert ledger.committable(TP0) == 15, "all finished: one past the last tracked"


def test_out_of_order_finish_reaches_the_same_end() -> None:
    ledger, src = tracked_ledger(range(5))
    for off in (4, 2, 0, 3, 1):
        assert ledger.finish(ref(off), src[off])
    assert ledger.committable(TP0) == 5
    assert ledger.pending() == 0
    assert ledger.tracked == 0


def test_a_record_finishes_at_most_once() -> None:
    ledger, src = tracked_ledger(range(3))
    assert ledger.finish(ref(1), src[1])
    assert not ledger.finish(ref(1), src[1])
    assert ledger.pending(TP0) == 2


def test_finish_needs_the_source_it_was_tracked_with() -> None:
    ledger, src = tracked_ledger(range(2))
    assert not ledger.finish(ref(0), object())
    assert not ledger.finish(ref(0), None)
    assert not ledger.is_live(ref(0), None)
    assert ledger.is_live(ref(0), src[0])
    assert ledger.source(ref(0)) is src[0]
    assert ledger.committable(TP0) == 0
    assert not ledger.finish(ref(7), src[0]), "never tracked"


def test_stale_completion_after_revoke_is_ignored() -> None:
    ledger, src = tracked_ledger(range(3))
    ledger.revoke([TP0])
    assert not ledger.assigned(TP0)
    assert not ledger.finish(ref(0), src[0])
    assert not ledger.is_live(ref(0), src[0])
    assert ledger.pending() == 0
    assert ledger.tracked == 0
    assert ledger.committable(TP0) is None


def test_old_source_cannot_finish_the_record_re_consumed_after_reassign() -> None:
    ledger, old = tracked_ledger(range(3))
    ledger.revoke([TP0])
    ledger.assign([TP0])
    new = object()
    assert ledger.track(ref(0), new), "re-consumed from the committed offset"
    assert not ledger.finish(ref(0), old[0]), "the completion of the revoked copy is stale"
    assert ledger.is_live(ref(0), new)
    assert ledger.committable(TP0) == 0
    assert ledger.finish(ref(0), new)
    assert ledger.committable(TP0) == 1


def test_assign_without_revoke_is_a_fresh_start() -> None:
    ledger, old = tracked_ledger(range(3))
    ledger.assign([TP0])
    assert ledger.tracked == 0 and ledger.pending() == 0
    assert ledger.committable(TP0) is None
    assert not ledger.finish(ref(1), old[1])


def test_track_on_an_unassigned_partition_is_refused() -> None:
    ledger = Ledger()
    ledger.assign([TP0])
    src = object()
    assert not ledger.track(ref(0, TP1), src)
    assert ledger.tracked == 0 and ledger.pending() == 0
    assert not ledger.is_live(ref(0, TP1), src)
    assert not ledger.finish(ref(0, TP1), src)
    ledger.revoke([TP0])
    assert not ledger.track(ref(0), src), "after a revoke nothing of the partition may become live"
    assert ledger.partitions() == []


def test_offsets_going_backwards_count_a_reset_and_restart() -> None:
    ledger, old = tracked_ledger(range(100, 103))
    assert ledger.finish(ref(100), old[100])
    assert ledger.resets == 0
    new = object()
    assert ledger.track(ref(5), new)
    assert ledger.resets == 1
    assert ledger.committable(TP0) == 5, "counting restarts at the new offset"
    assert ledger.tracked == 1
    assert ledger.pending(TP0) == 1
    assert not ledger.finish(ref(101), old[101]), "records before the reset are no longer live"
    assert ledger.finish(ref(5), new)
    assert ledger.committable(TP0) == 6
    assert ledger.take_committable() == {TP0: 6}


def test_re_delivered_last_offset_is_a_reset() -> None:
    ledger, old = tracked_ledger(range(3))
    again = object()
    assert ledger.track(ref(2), again)
    assert ledger.resets == 1
    assert not ledger.is_live(ref(2), old[2])
    assert ledger.is_live(ref(2), again)
    assert ledger.committable(TP0) == 2


def test_offset_gaps_are_allowed_and_commit_jumps_them() -> None:
    ledger = Ledger()
    ledger.assign([TP0])
    a, b = object(), object()
    assert ledger.track(ref(3), a)
    assert ledger.track(ref(10), b)  # compaction, transaction markers
    assert ledger.resets == 0
    assert ledger.finish(ref(3), a)
    assert ledger.committable(TP0) == 10
    assert ledger.finish(ref(10), b)
    assert ledger.committable(TP0) == 11


def test_tracked_counts_finished_but_not_committable_records() -> None:
    ledger, src = tracked_ledger(range(5))
    assert ledger.tracked == 5
    for off in (1, 2, 3):
        assert ledger.finish(ref(off), src[off])
    assert ledger.pending() == 2
    assert ledger.tracked == 5, "1..3 finished but 0 is not: memory still holds them"
    assert ledger.finish(ref(0), src[0])
    assert ledger.tracked == 1, "the head finished: 0..3 leave, 4 stays"
    assert ledger.finish(ref(4), src[4])
    assert ledger.tracked == 0


def test_tracked_and_pending_sum_over_partitions() -> None:
    ledger = Ledger()
    ledger.assign([TP0, TP1])
    s0, s1 = object(), object()
    assert ledger.track(ref(0, TP0), s0)
    assert ledger.track(ref(7, TP1), s1)
    assert ledger.tracked == 2 and ledger.pending() == 2
    assert ledger.pending(TP1) == 1
    ledger.revoke([TP1])
    assert ledger.tracked == 1 and ledger.pending() == 1
    assert ledger.pending(TP1) == 0


def test_take_committable_only_returns_moved_offsets() -> None:
    ledger = Ledger()
    ledger.assign([TP0, TP1])
    s = {off: object() for off in range(3)}
    for off, src in s.items():
        assert ledger.track(ref(off, TP0), src)
    t1 = object()
    assert ledger.track(ref(0, TP1), t1)
    assert ledger.take_committable() == {TP0: 0, TP1: 0}
    assert ledger.take_committable() == {}, "nothing moved"
    assert ledger.finish(ref(1), s[1])
    assert ledger.take_committable() == {}, "offset 0 is still unfinished: the commit offset did not move"
    assert ledger.finish(ref(0), s[0])
    assert ledger.take_committable() == {TP0: 2}
    assert ledger.finish(ref(0, TP1), t1)
    assert ledger.take_committable() == {TP1: 1}
    assert ledger.take_committable() == {}


def test_take_committable_after_reassign_hands_out_the_offset_again() -> None:
    ledger, _ = tracked_ledger(range(2))
    assert ledger.take_committable() == {TP0: 0}
    ledger.revoke([TP0])
    ledger.assign([TP0])
    assert ledger.track(ref(0), object())
    assert ledger.take_committable() == {TP0: 0}, "a fresh assignment must store its offset again"


def test_live_sources_lists_unfinished_records() -> None:
    ledger = Ledger()
    ledger.assign([TP0, TP1])
    a, b, c = object(), object(), object()
    ledger.track(ref(0), a)
    ledger.track(ref(1), b)
    ledger.track(ref(4, TP1), c)
    ledger.finish(ref(0), a)
    assert sorted(ledger.live_sources(), key=lambda x: x[0]) == [(ref(1), b), (ref(4, TP1), c)]
    assert list(ledger.live_sources([TP1])) == [(ref(4, TP1), c)]
    assert list(ledger.live_sources([TopicPartition("other", 0)])) == []


# -- model-based ----------------------------------------------------------------------------------------------

MODEL_EXAMPLES = int(os.environ.get("AUDIENCE_SYNC_MODEL_EXAMPLES", "0") or 0)
PARTS = [TopicPartition("t", 0), TopicPartition("t", 1), TopicPartition("u", 0)]


@dataclass
class _Rec:
    offset: int
    source: object
    finished: bool = False


@dataclass
class _Part:
    records: list[_Rec] = field(default_factory=list)  # since the last assign or reset, in tracking order
    next: int | None = None
    stored: int | None = None

    def unfinished(self) -> list[_Rec]:
        return [r for r in self.records if not r.finished]

    def committable(self) -> int | None:
        open_ = self.unfinished()
        return min(r.offset for r in open_) if open_ else self.next

    def tracked(self) -> int:
        open_ = self.unfinished()
        if not open_:
            return 0
        head = min(r.offset for r in open_)
        return sum(1 for r in self.records if r.offset >= head)


@dataclass
class _Row:
    """What an upload hands the ledger: a record's ref and the source it was tracked with."""

    ref: RecordRef
    source: object


class LedgerMachine(RuleBasedStateMachine):
    """Random assign/revoke/track/finish against a plain model; every step checks offsets and sizes."""

    def __init__(self) -> None:
        super().__init__()
        self.ledger = Ledger()
        self.parts: dict[TopicPartition, _Part] = {}
        self.stale: list[tuple[RecordRef, object]] = []  # finished or dropped: must never finish again
        self.resets = 0

    def _drop(self, tp: TopicPartition) -> None:
        part = self.parts.pop(tp, None)
        if part is not None:
            self.stale.extend((ref(r.offset, tp), r.source) for r in part.records)

    @rule(tp=st.sampled_from(PARTS))
    def assign(self, tp: TopicPartition) -> None:
        self.ledger.assign([tp])
        self._drop(tp)
        self.parts[tp] = _Part()

    @rule(tp=st.sampled_from(PARTS))
    def revoke(self, tp: TopicPartition) -> None:
        self.ledger.revoke([tp])
        self._drop(tp)

    @rule(tp=st.sampled_from(PARTS), step=st.sampled_from([1, 1, 1, 1, 2, 5, 0, -1, -3]), start=st.integers(0, 20))
    def track(self, tp: TopicPartition, step: int, start: int) -> None:
        """Mostly consecutive offsets; sometimes a gap, a re-delivery of the last one, or a reset backwards."""
        part = self.parts.get(tp)
        src = object()
        if part is None:
            assert not self.ledger.track(ref(start, tp), src)
            assert self.ledger.source(ref(start, tp)) is None
            return
        offset = start if part.next is None else max(0, part.next - 1 + step)
        assert self.ledger.track(ref(offset, tp), src)
        if part.next is not None and offset < part.next:
            self.resets += 1
            self.stale.extend((ref(r.offset, tp), r.source) for r in part.records)
            part = self.parts[tp] = _Part()
        part.records.append(_Rec(offset, src))
        part.next = offset + 1

    @precondition(lambda self: any(p.unfinished() for p in self.parts.values()))
    @rule(data=st.data())
    def finish(self, data: st.DataObject) -> None:
        choices = [(tp, r) for tp, p in self.parts.items() for r in p.unfinished()]
        tp, rec = data.draw(st.sampled_from(choices))
        assert self.ledger.is_live(ref(rec.offset, tp), rec.source)
        assert self.ledger.finish(ref(rec.offset, tp), rec.source)
        rec.finished = True
        self.stale.append((ref(rec.offset, tp), rec.source))

    @precondition(lambda self: self.stale)
    @rule(data=st.data())
    def finish_stale(self, data: st.DataObject) -> None:
        """A late completion: finished already, revoked, re-assigned or reset. The ledger must ignore it."""
        r, src = data.draw(st.sampled_from(self.stale))
        assert not self.ledger.is_live(r, src)
        assert not self.ledger.finish(r, src)

    @precondition(lambda self: self.stale or any(p.unfinished() for p in self.parts.values()))
    @rule(data=st.data())
    def finish_a_batch(self, data: st.DataObject) -> None:
        """A whole upload lands (`live`, then `finish_all`): live and stale rows of several partitions, in any
        order and maybe twice. Only the live ones finish, each once, as `finish` one by one would."""
        open_ = [_Row(ref(r.offset, tp), r.source) for tp, p in self.parts.items() for r in p.unfinished()]
        stale = [_Row(r, src) for r, src in self.stale]
        rows = data.draw(st.lists(st.sampled_from(open_ + stale), max_size=12)) if open_ or stale else []
        live_ids = {(r.ref, id(r.source)) for r in open_}
        assert self.ledger.live(rows) == [r for r in rows if (r.ref, id(r.source)) in live_ids]
        self.ledger.finish_all(rows)
        for row in rows:
            part = self.parts.get(row.ref.tp)
            for rec in part.unfinished() if part is not None else []:
                if rec.offset == row.ref.offset and rec.source is row.source:
                    rec.finished = True
                    self.stale.append((row.ref, rec.source))

    @rule()
    def take_committable(self) -> None:
        expected: dict[TopicPartition, int] = {}
        for tp, part in self.parts.items():
            c = part.committable()
            if c is not None and c != part.stored:
                part.stored = c
                expected[tp] = c
        got = self.ledger.take_committable()
        assert got == expected
        for tp, c in got.items():
            assert all(r.offset >= c for r in self.parts[tp].unfinished()), "commit passes an unfinished record"

    @invariant()
    def offsets_and_sizes_match_the_model(self) -> None:
        ledger = self.ledger
        for tp in PARTS:
            part = self.parts.get(tp)
            assert ledger.assigned(tp) is (part is not None)
            if part is None:
                assert ledger.committable(tp) is None
                assert ledger.pending(tp) == 0
                continue
            assert ledger.committable(tp) == part.committable(), tp
            assert ledger.pending(tp) == len(part.unfinished()), tp
        assert ledger.tracked == sum(p.tracked() for p in self.parts.values())
        assert ledger.pending() == sum(len(p.unfinished()) for p in self.parts.values())
        assert ledger.resets == self.resets
        live = {(r, id(s)) for r, s in ledger.live_sources()}
        assert live == {(ref(r.offset, tp), id(r.source)) for tp, p in self.parts.items() for r in p.unfinished()}


LedgerMachine.TestCase.settings = settings(
    max_examples=MODEL_EXAMPLES or 100,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestLedgerModel = LedgerMachine.TestCase
