from service.core.batcher import Batcher
from service.core.model import Action, AudienceChange
from service.core.types import RecordRef, TopicPartition

ADV = "7000000000000000001"
H1, H2, H3 = "a" * 64, "b" * 64, "c" * 64


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def change(action: Action, *ids: tuple[str, str], aud: str = "111", adv: str = ADV) -> AudienceChange:
    return AudienceChange(adv, aud, action, tuple(ids))  # type: ignore[arg-type]


def ref(off: int, part: int = 0) -> RecordRef:
    return RecordRef("t", part, off)


def make(**kw: object) -> tuple[Batcher, Clock]:
    clock = Clock()
    opts: dict[str, object] = {"max_rows": 3, "max_bytes": 1_000_000, "linger_s": 1.0}
    opts.update(kw)
    return Batcher(clock=clock, **opts), clock  # type: ignore[arg-type]


def test_batch_key_is_advertiser_and_action_and_the_schema_is_the_union_of_the_rows_types() -> None:
    b, _ = make()
    b.add(ref(0), change(Action.ADD, ("EMAIL_SHA256", H1)))
    b.add(ref(1), change(Action.ADD, ("EMAIL_SHA256", H2), ("PHONE_SHA256", H3)))
    b.add(ref(2), change(Action.DELETE, ("EMAIL_SHA256", H3)))
    b.add(ref(3), change(Action.ADD, ("EMAIL_SHA256", H3), adv="7000000000000000002"))
    b.add(ref(4), change(Action.ADD, ("IDFA_SHA256", H2), aud="222"))  # other audience and type, same request
    got = sorted((x.key[0], x.key[1].value, x.id_schema, len(x.rows)) for x in b.ready(force=True))
    assert got == [
        (ADV, "add", ("EMAIL_SHA256", "PHONE_SHA256", "IDFA_SHA256"), 3),
        (ADV, "delete", ("EMAIL_SHA256",), 1),
        ("7000000000000000002", "add", ("EMAIL_SHA256",), 1),
    ]


def test_a_half_of_a_batch_has_the_schema_of_its_own_rows() -> None:
    b, _ = make(max_rows=10)
    b.add(ref(0), change(Action.ADD, ("EMAIL_SHA256", H1)))
    b.add(ref(1), change(Action.ADD, ("PHONE_SHA256", H2)))
    [batch] = b.ready(force=True)
    assert batch.id_schema == ("EMAIL_SHA256", "PHONE_SHA256")
    batch.rows = batch.rows[:1]
    assert batch.id_schema == ("EMAIL_SHA256",)


def test_flush_on_row_count() -> None:
    b, _ = make(max_rows=2)
    b.add(ref(0), change(Action.ADD, ("EMAIL_SHA256", H1)))
    assert b.ready() == []
    b.add(ref(1), change(Action.ADD, ("EMAIL_SHA256", H2)))
    [batch] = b.ready()
    assert batch.trigger == "rows"
    assert [r.ref.offset for r in batch.rows] == [0, 1]
    assert b.pending_rows == 0


def test_flush_on_linger_with_injected_clock() -> None:
    b, clock = make(linger_s=1.0)
    b.add(ref(0), change(Action.ADD, ("EMAIL_SHA256", H1)))
    clock.t = 0.5
    assert b.ready() == []
    assert b.next_deadline() == 1.0
    clock.t = 1.0
    [batch] = b.ready()
    assert batch.trigger == "linger"
    assert b.next_deadline() is None


def test_flush_on_bytes() -> None:
    b, _ = make(max_rows=1000, max_bytes=1024)
    for i in range(20):
        b.add(ref(i), change(Action.ADD, ("EMAIL_SHA256", f"{i:064x}")))
    batches = b.ready()
    assert batches and all(x.trigger == "bytes" for x in batches)
    assert all(sum(r.nbytes for r in x.rows) <= 1024 for x in batches)


def test_ready_respects_limit() -> None:
    b, _ = make(max_rows=1)
    for i in range(5):
        b.add(ref(i), change(Action.ADD, ("EMAIL_SHA256", f"{i:064x}")))
    assert len(b.ready(limit=2)) == 2
    assert b.pending_rows == 3


def test_later_event_replaces_earlier_in_same_buffer() -> None:
    b, _ = make()
    assert b.add(ref(0), change(Action.ADD, ("EMAIL_SHA256", H1))) == []
    superseded = b.add(ref(1), change(Action.ADD, ("EMAIL_SHA256", H1)))
    assert [r.ref for r in superseded] == [ref(0)]
    [batch] = b.ready(force=True)
    assert [r.ref.offset for r in batch.rows] == [1]


def test_exit_after_enter_cancels_the_pending_add() -> None:
    b, _ = make()
    b.add(ref(0), change(Action.ADD, ("EMAIL_SHA256", H1)))
    superseded = b.add(ref(1), change(Action.DELETE, ("EMAIL_SHA256", H1)))
    assert [r.ref for r in superseded] == [ref(0)]
    [batch] = b.ready(force=True)
    assert batch.action is Action.DELETE


def test_partial_supersession_leaves_an_empty_cell() -> None:
    b, _ = make()
    b.add(ref(0), change(Action.ADD, ("EMAIL_SHA256", H1), ("PHONE_SHA256", H2)))
    assert b.add(ref(1), change(Action.DELETE, ("PHONE_SHA256", H2))) == []
    batches = {x.action: x for x in b.ready(force=True)}
    add_row = batches[Action.ADD].rows[0]
    assert add_row.cells == {"EMAIL_SHA256": H1}
    assert batches[Action.ADD].id_schema == ("EMAIL_SHA256",), "the superseded column is not sent at all"


def test_same_user_other_audience_is_independent() -> None:
    b, _ = make()
    b.add(ref(0), change(Action.ADD, ("EMAIL_SHA256", H1), aud="111"))
    assert b.add(ref(1), change(Action.DELETE, ("EMAIL_SHA256", H1), aud="222")) == []
    assert b.pending_rows == 2


def test_a_change_waits_while_an_older_change_to_its_cell_is_in_flight() -> None:
    b, _ = make()
    b.add(ref(0), change(Action.ADD, ("EMAIL_SHA256", H1)))
    [first] = b.ready(force=True)
    b.add(ref(1), change(Action.DELETE, ("EMAIL_SHA256", H1)))
    b.add(ref(2), change(Action.DELETE, ("EMAIL_SHA256", H2)))
    [second] = b.ready(force=True)
    assert [r.ref.offset for r in second.rows] == [2]  # offset 1 must not fly beside offset 0
    assert b.pending_rows == 1
    b.release(first.rows)
    [third] = b.ready(force=True)
    assert [r.ref.offset for r in third.rows] == [1]


def test_in_flight_rows_are_never_superseded() -> None:
    b, _ = make()
    b.add(ref(0), change(Action.ADD, ("EMAIL_SHA256", H1)))
    b.ready(force=True)
    assert b.add(ref(1), change(Action.DELETE, ("EMAIL_SHA256", H1))) == []


def test_drop_partitions_forgets_pending_rows() -> None:
    b, _ = make()
    b.add(ref(0, part=0), change(Action.ADD, ("EMAIL_SHA256", H1)))
    b.add(ref(0, part=1), change(Action.ADD, ("EMAIL_SHA256", H2)))
    assert b.pending_for([TopicPartition("t", 1)]) == 1
    assert b.drop_partitions([TopicPartition("t", 1)]) == 1
    [batch] = b.ready(force=True)
    assert [r.ref.partition for r in batch.rows] == [0]
    # the dropped row's cell is free again: a re-consumed copy is accepted
    assert b.add(ref(0, part=1), change(Action.ADD, ("EMAIL_SHA256", H2))) == []


def test_max_rows_bounds() -> None:
    import pytest

    with pytest.raises(ValueError):
        Batcher(max_rows=10_001, clock=Clock())
    with pytest.raises(ValueError):
        Batcher(max_rows=0, clock=Clock())


def test_held_key_keeps_buffering_while_other_keys_flush() -> None:
    b, clock = make(max_rows=2, linger_s=1.0)
    other = "7000000000000000002"
    b.add(ref(0), change(Action.ADD, ("EMAIL_SHA256", H1)))
    b.add(ref(1), change(Action.ADD, ("EMAIL_SHA256", H2)))
    b.add(ref(2), change(Action.ADD, ("EMAIL_SHA256", H3), adv=other))
    held = {(ADV, Action.ADD)}
    clock.t = 5.0
    [batch] = b.ready(hold=held, force=True)
    assert batch.advertiser_id == other, "the held key sends nothing, the other key flows"
    assert b.pending_rows == 2
    assert b.next_deadline(held) is None, "a held buffer must not wake the dispatcher in a busy loop"
    assert b.next_deadline() == 1.0
    [released] = b.ready()
    assert released.advertiser_id == ADV and len(released.rows) == 2


# -- defect 10: a row blocked behind an in-flight change is set aside from its buffer's linger clock ------------


def test_blocked_row_alone_does_not_keep_the_deadline_in_the_past() -> None:
    b, clock = make(linger_s=1.0)
    b.add(ref(0), change(Action.ADD, ("EMAIL_SHA256", H1)))
    [a] = b.ready(force=True)  # A in flight
    b.add(ref(1), change(Action.DELETE, ("EMAIL_SHA256", H1)))  # B: same cell, must wait for A's outcome
    clock.t = 1.5
    assert b.ready() == [], "B may not fly beside A"
    assert b.next_deadline() is None, "B alone must not wake the dispatcher again and again"
    assert b.ready(force=True) == []
    assert b.pending_rows == 1
    assert b.pending_for([TopicPartition("t", 0)]) == 1, "a blocked row is still pending"
    b.release(a.rows)
    assert b.next_deadline() == 1.0, "B is sendable again and has lingered since t=0"
    [batch] = b.ready()
    assert [r.ref.offset for r in batch.rows] == [1]
    assert batch.trigger == "linger"
    assert b.pending_rows == 0
    assert b.next_deadline() is None


def test_blocked_row_does_not_make_new_rows_of_its_key_leave_as_one_row_linger_batches() -> None:
    b, clock = make(linger_s=1.0, max_rows=10)
    b.add(ref(0), change(Action.DELETE, ("EMAIL_SHA256", H1)))
    [a] = b.ready(force=True)  # A in flight
    b.add(ref(1), change(Action.DELETE, ("EMAIL_SHA256", H1)))  # B: blocked behind A
    clock.t = 1.5
    assert b.ready() == []
    b.add(ref(2), change(Action.DELETE, ("EMAIL_SHA256", H2)))  # C: another user, same batch key
    assert b.ready() == [], "C lingers from its own arrival (t=1.5), not from blocked B's (t=0)"
    assert b.next_deadline() == 2.5
    clock.t = 2.0
    b.add(ref(3), change(Action.DELETE, ("EMAIL_SHA256", H3)))  # D: joins C's batch
    assert b.ready() == []
    clock.t = 2.5
    [batch] = b.ready()
    assert [r.ref.offset for r in batch.rows] == [2, 3], "C and D leave together; B still waits for A"
    assert batch.trigger == "linger"
    assert b.next_deadline() is None
    b.release(a.rows)
    [batch] = b.ready()
    assert [r.ref.offset for r in batch.rows] == [1]


def test_released_row_lingers_from_its_own_arrival_not_behind_newer_rows() -> None:
    # The module docstring: "linger counts from the oldest row that can be sent". Once A's outcome is known,
    # B (waiting since t=0.1) is the oldest sendable row of its buffer, even though C arrived later.
    b, clock = make(linger_s=1.0, max_rows=10)
    b.add(ref(0), change(Action.ADD, ("EMAIL_SHA256", H1)))
    [a] = b.ready(force=True)
    clock.t = 0.1
    b.add(ref(1), change(Action.ADD, ("EMAIL_SHA256", H1)))  # B: blocked behind A
    clock.t = 1.2
    assert b.ready() == []  # B set aside
    b.add(ref(2), change(Action.ADD, ("EMAIL_SHA256", H2)))  # C
    clock.t = 1.5
    b.release(a.rows)
    assert b.next_deadline() == 0.1 + 1.0, "B has lingered since t=0.1"
    [batch] = b.ready()
    assert sorted(r.ref.offset for r in batch.rows) == [1, 2]


def test_blocked_row_can_still_be_superseded() -> None:
    b, clock = make(linger_s=1.0)
    b.add(ref(0), change(Action.ADD, ("EMAIL_SHA256", H1)))
    [a] = b.ready(force=True)
    b.add(ref(1), change(Action.DELETE, ("EMAIL_SHA256", H1)))  # B
    clock.t = 1.5
    assert b.ready() == []  # B set aside
    superseded = b.add(ref(2), change(Action.ADD, ("EMAIL_SHA256", H1)))  # newer change to the same cell
    assert [r.ref.offset for r in superseded] == [1]
    assert b.pending_rows == 1
    clock.t = 3.0
    assert b.ready() == [], "the newest change waits for A too"
    assert b.next_deadline() is None
    b.release(a.rows)
    [batch] = b.ready()
    assert [r.ref.offset for r in batch.rows] == [2]
    assert batch.action is Action.ADD
    assert b.pending_rows == 0


def test_blocked_rows_of_a_revoked_partition_are_dropped() -> None:
    b, clock = make(linger_s=1.0)
    b.add(ref(0), change(Action.ADD, ("EMAIL_SHA256", H1)))
    [a] = b.ready(force=True)
    b.add(ref(1), change(Action.DELETE, ("EMAIL_SHA256", H1)))
    clock.t = 1.5
    assert b.ready() == []  # set aside
    assert b.drop_partitions([TopicPartition("t", 0)]) == 1
    assert b.pending_rows == 0
    assert b.pending_for([TopicPartition("t", 0)]) == 0
    b.release(a.rows)
    assert b.ready(force=True) == []
    assert b.next_deadline() is None
    assert b.inflight_cells == 0


def test_blocked_row_whose_in_flight_cell_was_superseded_is_sendable() -> None:
    # B is set aside for its cell X, which A carries. A newer change D takes over X, so B is left with cell Y only,
    # which nothing in flight carries: B no longer has a reason to wait for A's outcome (a retried A may take
    # minutes, holding B's offset uncommitted all along).
    b, clock = make(linger_s=1.0)
    b.add(ref(0), change(Action.ADD, ("EMAIL_SHA256", H1)))
    [a] = b.ready(force=True)  # A carries cell X = (EMAIL, H1)
    b.add(ref(1), change(Action.DELETE, ("EMAIL_SHA256", H1), ("PHONE_SHA256", H2)))  # B: cells X and Y
    clock.t = 1.5
    assert b.ready() == []  # B set aside behind A
    assert b.add(ref(2), change(Action.ADD, ("EMAIL_SHA256", H1))) == []  # D supersedes X of B only
    batches = b.ready(force=True)
    assert [[r.ref.offset for r in x.rows] for x in batches] == [[1]], "B (cell Y only) is free; D waits for A"
    b.release(a.rows)


def test_random_traffic_with_blocked_rows_never_spins_nor_reorders_a_cell() -> None:
    """Random adds, clock ticks, cuts and releases. After every `ready()`: nothing left lingers out (the dispatcher
    would wake in a loop), no cell is in two requests in flight, and each cell's changes leave in offset order."""
    for seed in range(300):
        _random_traffic(seed)


def _random_traffic(seed: int) -> None:
    import random

    from service.core.batcher import Batch

    emails = [("EMAIL_SHA256", f"{i:064x}") for i in range(2)]
    phones = [("PHONE_SHA256", f"{i:064x}") for i in range(2)]
    rng = random.Random(seed)
    b, clock = make(linger_s=1.0, max_rows=rng.choice([1, 2, 3, 10]))
    inflight: list[Batch] = []
    last_sent: dict[object, int] = {}

    def cut(force: bool = False) -> int:
        batches = b.ready(force=force)
        for batch in batches:
            busy = {ck for x in inflight for r in x.rows for ck in r.cell_keys()}
            for r in batch.rows:
                for ck in r.cell_keys():
                    assert ck not in busy, f"seed {seed}: a cell is in two requests in flight"
                    assert last_sent.get(ck, -1) < r.ref.offset, f"seed {seed}: {ck} sent out of order"
                    last_sent[ck] = r.ref.offset
            inflight.append(batch)
        if not force:
            deadline = b.next_deadline()
            assert deadline is None or deadline > clock.t, f"seed {seed}: deadline {deadline} at {clock.t}"
        return len(batches)

    for offset in range(60):
        op = rng.random()
        if op < 0.45:
            ids = rng.choice([[rng.choice(emails)], [rng.choice(phones)], [rng.choice(emails), rng.choice(phones)]])
            action = rng.choice([Action.ADD, Action.DELETE])
            b.add(ref(offset), change(action, *ids, aud=rng.choice(["111", "222"])))
        elif op < 0.65:
            clock.t += rng.choice([0.125, 0.5, 1.0, 2.5])  # binary fractions: exact sums
        elif op < 0.85:
            cut()
        elif inflight:
            b.release(inflight.pop(rng.randrange(len(inflight))).rows)
    while cut(force=True) or inflight:  # outcomes for everything in flight; what they blocked follows
        while inflight:
            b.release(inflight.pop().rows)
    assert b.pending_rows == 0, f"seed {seed}: rows stranded"
    assert b.inflight_cells == 0


def test_a_cut_may_carry_more_than_max_rows_when_the_scheduler_asks() -> None:
    """`max_rows` is when a buffer is ready; the scheduler raises the cut's size when requests are scarce."""
    b, _ = make(max_rows=2)
    for i in range(7):
        b.add(ref(i), change(Action.ADD, ("EMAIL_SHA256", f"{i:064x}")))
    assert b.has_ready()
    [batch] = b.ready(limit=1, max_rows=5)
    assert [r.ref.offset for r in batch.rows] == [0, 1, 2, 3, 4]
    assert b.has_ready(), "2 rows left: still at max_rows"
    [rest] = b.ready(limit=1, max_rows=5)
    assert len(rest.rows) == 2 and not b.has_ready()
    b.add(ref(9), change(Action.ADD, ("EMAIL_SHA256", H1)))
    assert not b.has_ready() and b.has_ready(force=True)


def test_a_scarce_request_goes_to_the_buffer_with_the_oldest_row_not_the_biggest() -> None:
    b, clock = make(max_rows=2, linger_s=1.0)
    b.add(ref(0), change(Action.ADD, ("EMAIL_SHA256", H1), adv="7000000000000000002"))  # small, oldest
    clock.t = 0.5
    for i in range(1, 9):
        b.add(ref(i), change(Action.ADD, ("EMAIL_SHA256", f"{i:064x}")))  # big, newer
    clock.t = 1.0
    [first] = b.ready(limit=1, max_rows=100)
    assert first.advertiser_id == "7000000000000000002"
    [second] = b.ready(limit=1, max_rows=100)
    assert second.advertiser_id == ADV and len(second.rows) == 8


def test_has_ready_ignores_held_keys() -> None:
    b, _ = make(max_rows=1)
    b.add(ref(0), change(Action.ADD, ("EMAIL_SHA256", H1)))
    [key] = [batch.key for batch in b.ready(force=True)]
    b.add(ref(1), change(Action.ADD, ("EMAIL_SHA256", H2)))
    assert b.has_ready() and not b.has_ready(hold={key})


def test_an_older_record_of_the_same_partition_added_later_never_undoes_the_newer_one() -> None:
    # A dead-lettered record held by the DLQ guard is routed again after a newer record of its user waits.
    b, _ = make()
    newer = change(Action.DELETE, ("EMAIL_SHA256", H1))
    assert b.add(ref(5), newer) == []
    gone = b.add(ref(3), change(Action.ADD, ("EMAIL_SHA256", H1)))
    assert [r.ref for r in gone] == [ref(3)]  # finished at once as superseded: nothing of it is queued
    assert b.pending_rows == 1
    [batch] = b.ready(force=True)
    assert batch.action is Action.DELETE and [r.ref for r in batch.rows] == [ref(5)]


def test_an_older_record_keeps_only_its_cells_no_newer_record_waits_for() -> None:
    b, _ = make()
    b.add(ref(5), change(Action.DELETE, ("EMAIL_SHA256", H1)))
    assert b.add(ref(3), change(Action.ADD, ("EMAIL_SHA256", H1), ("PHONE_SHA256", H2))) == []
    batches = {bt.action: bt for bt in b.ready(force=True)}
    assert batches[Action.DELETE].rows[0].cells == {"EMAIL_SHA256": H1}
    assert batches[Action.ADD].rows[0].cells == {"PHONE_SHA256": H2}


def test_records_of_different_partitions_have_no_order_the_later_added_wins() -> None:
    b, _ = make()
    b.add(ref(5, part=1), change(Action.DELETE, ("EMAIL_SHA256", H1)))
    gone = b.add(ref(3, part=0), change(Action.ADD, ("EMAIL_SHA256", H1)))
    assert [r.ref for r in gone] == [ref(5, part=1)]
    [batch] = b.ready(force=True)
    assert batch.action is Action.ADD
