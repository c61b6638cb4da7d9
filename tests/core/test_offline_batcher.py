"""The offline batcher's invariants (service/core/offline_batcher.py docstring), with an injected clock."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from service.core.offline import MAX_EVENTS_PER_REQUEST, OfflineEvent
from service.core.offline_batcher import OfflineBatcher, OfflineRow
from service.core.types import RecordRef, TopicPartition

SET_A, SET_B = "7000000000000000001", "7000000000000000002"


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def ev(i: int, event_set: str = SET_A, *, big: int = 0) -> OfflineEvent:
    return OfflineEvent(
        event_set_id=event_set,
        event="CompletePayment",
        event_time=1_714_990_272,
        event_id=f"e{i:031d}",
        external_id=("a" * 64,),
        order_id="x" * big if big else None,
    )


def ref(i: int, partition: int = 0) -> RecordRef:
    return RecordRef("t", partition, i)


def test_nothing_is_ready_before_linger_then_everything_leaves_in_order() -> None:
    clock = Clock()
    b = OfflineBatcher(linger_s=1.0, clock=clock)
    for i in range(5):
        b.add(ref(i), ev(i))
    assert b.ready() == [] and not b.has_ready() and b.pending_rows == 5
    assert b.next_deadline() == 1001.0
    clock.t += 1.0
    (batch,) = b.ready()
    assert batch.trigger == "linger" and batch.key == SET_A
    assert [r.ref.offset for r in batch.rows] == [0, 1, 2, 3, 4]
    assert b.pending_rows == 0 and b.next_deadline() is None


def test_a_batch_never_exceeds_tiktoks_1000_events() -> None:
    clock = Clock()
    b = OfflineBatcher(clock=clock)
    for i in range(2500):
        b.add(ref(i), ev(i))
    batches = b.ready(force=True, max_rows=10_000)  # a scarce-mode cap above TikTok's is clamped
    assert [len(x.rows) for x in batches] == [1000, 1000, 500]
    assert [x.trigger for x in batches] == ["rows", "rows", "force"]


def test_one_event_set_per_batch() -> None:
    clock = Clock()
    b = OfflineBatcher(clock=clock)
    for i in range(10):
        b.add(ref(i), ev(i, SET_A if i % 2 else SET_B))
    batches = b.ready(force=True)
    assert sorted(x.key for x in batches) == [SET_A, SET_B]
    for x in batches:
        assert {r.event.event_set_id for r in x.rows} == {x.key}


def test_the_bytes_bound_cuts_early_and_a_lone_big_event_still_leaves() -> None:
    clock = Clock()
    b = OfflineBatcher(max_bytes=2000, clock=clock)
    for i in range(3):
        b.add(ref(i), ev(i, big=900))
    batches = b.ready()
    assert batches and batches[0].trigger == "bytes"
    assert all(sum(r.nbytes for r in x.rows) <= 2000 for x in batches)
    b2 = OfflineBatcher(max_bytes=100, clock=clock)
    b2.add(ref(0), ev(0, big=500))
    (lone,) = b2.ready()
    assert len(lone.rows) == 1


def test_limit_hold_and_eager() -> None:
    clock = Clock()
    b = OfflineBatcher(clock=clock)
    b.add(ref(0), ev(0, SET_A))
    clock.t += 0.1
    b.add(ref(1), ev(1, SET_B))
    assert b.ready() == []
    assert b.has_ready(eager=True) and not b.has_ready(eager=True, hold={SET_A, SET_B})
    (first,) = b.ready(limit=1, eager=True)
    assert first.key == SET_A and first.trigger == "turn"  # the oldest buffer goes first
    assert b.ready(hold={SET_B}, force=True) == []
    assert b.next_deadline(hold={SET_B}) is None


def test_nothing_is_superseded_identical_events_both_leave() -> None:
    clock = Clock()
    b = OfflineBatcher(clock=clock)
    b.add(ref(0), ev(7))
    b.add(ref(1), ev(7))
    (batch,) = b.ready(force=True)
    assert len(batch.rows) == 2


def test_drop_partitions_forgets_buffered_events_only() -> None:
    clock = Clock()
    b = OfflineBatcher(clock=clock)
    for i in range(6):
        b.add(ref(i, partition=i % 2), ev(i))
    (cut,) = b.ready(limit=1, force=True, max_rows=2)  # offsets 0 (p0) and 1 (p1)
    for i in range(6, 8):
        b.add(ref(i, partition=1), ev(i))
    assert b.pending_for([TopicPartition("t", 1)]) == 4  # offsets 3, 5, 6, 7
    assert b.drop_partitions([TopicPartition("t", 1)]) == 4
    assert b.pending_for([TopicPartition("t", 1)]) == 0
    rest = b.ready(force=True)
    assert all(r.ref.partition == 0 for x in rest for r in x.rows)
    assert len(cut.rows) == 2  # a cut batch is not touched
    assert b.pending_rows == 0


def test_split_parts_keep_identity() -> None:
    clock = Clock()
    b = OfflineBatcher(clock=clock)
    for i in range(4):
        b.add(ref(i), ev(i))
    (batch,) = b.ready(force=True)
    half = batch.part(batch.rows[:2], None)
    assert (half.id, half.key, half.trigger, len(half.rows)) == (batch.id, SET_A, "split", 2)


def test_bad_settings_are_refused() -> None:
    import pytest

    with pytest.raises(ValueError, match="max_rows"):
        OfflineBatcher(max_rows=MAX_EVENTS_PER_REQUEST + 1, clock=Clock())


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["add", "ready", "tick", "drop"]),
            st.integers(0, 2),
            st.integers(1, 1500),
        ),
        max_size=40,
    )
)
def test_every_event_is_in_exactly_one_place(ops: list[tuple[str, int, int]]) -> None:
    """Added = buffered + cut + dropped, nothing cut twice, no batch over 1,000 events or mixing event sets."""
    clock = Clock()
    b = OfflineBatcher(max_bytes=50_000, linger_s=0.5, clock=clock)
    added: list[OfflineRow] = []
    cut: list[OfflineRow] = []
    dropped = 0
    n = 0
    for op, a, k in ops:
        if op == "add":
            for _ in range(k % 300):
                added.append(b.add(ref(n, partition=a), ev(n, (SET_A, SET_B, "7")[a])))
                n += 1
        elif op == "ready":
            for batch in b.ready(limit=a + 1, force=k % 2 == 0, max_rows=k, eager=k % 3 == 0):
                assert 1 <= len(batch.rows) <= MAX_EVENTS_PER_REQUEST
                assert {r.event.event_set_id for r in batch.rows} == {batch.key}
                cut.extend(batch.rows)
        elif op == "tick":
            clock.t += k / 1000
        else:
            dropped += b.drop_partitions([TopicPartition("t", a)])
        assert len(added) == b.pending_rows + len(cut) + dropped
    assert len({id(r) for r in cut}) == len(cut)
