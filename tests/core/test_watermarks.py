import pytest

from service.core.watermarks import PartitionWatermark, RecordRef, TopicPartition, Watermarks


def test_nothing_tracked_has_nothing_to_commit() -> None:
    assert PartitionWatermark().committable() is None


def test_out_of_order_completion_moves_only_past_contiguous_offsets() -> None:
    wm = PartitionWatermark()
    for off in (10, 11, 12, 13):
        wm.track(off)
    assert wm.committable() == 10
    wm.finish(12)
    wm.finish(11)
    assert wm.committable() == 10  # 10 still pending: nothing past it may be stored
    wm.finish(10)
    assert wm.committable() == 13
    wm.finish(13)
    assert wm.committable() == 14
    assert wm.pending == 0


def test_gaps_in_offsets_are_fine() -> None:
    # compacted topics and transaction markers leave holes in offsets
    wm = PartitionWatermark()
    for off in (5, 9, 20):
        wm.track(off)
    wm.finish(9)
    wm.finish(5)
    assert wm.committable() == 20
    wm.finish(20)
    assert wm.committable() == 21


def test_take_committable_reports_each_value_once() -> None:
    wm = PartitionWatermark()
    wm.track(0)
    wm.finish(0)
    assert wm.take_committable() == 1
    assert wm.take_committable() is None
    wm.track(1)
    assert wm.take_committable() is None  # 1 pending: still 1
    wm.finish(1)
    assert wm.take_committable() == 2


def test_offsets_going_backwards_are_refused() -> None:
    wm = PartitionWatermark()
    wm.track(5)
    with pytest.raises(ValueError):
        wm.track(4)


def test_finishing_twice_or_unknown_offsets_is_harmless() -> None:
    wm = PartitionWatermark()
    wm.track(1)
    wm.track(2)
    wm.finish(1)
    wm.finish(1)
    wm.finish(0)
    assert wm.committable() == 2


def test_watermarks_per_partition_and_forget() -> None:
    w = Watermarks()
    a, b = TopicPartition("t", 0), TopicPartition("t", 1)
    w.track(RecordRef("t", 0, 0))
    w.track(RecordRef("t", 1, 0))
    w.track(RecordRef("t", 1, 1))
    w.finish(RecordRef("t", 1, 1))
    assert w.pending() == 2
    assert w.pending(b) == 1
    assert w.take_committable() == {a: 0, b: 0}
    w.finish(RecordRef("t", 1, 0))
    assert w.take_committable() == {b: 2}
    w.forget([a])
    w.finish(RecordRef("t", 0, 0))  # a late completion of a revoked partition is ignored
    assert w.partitions() == [b]
