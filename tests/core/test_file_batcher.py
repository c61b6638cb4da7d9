"""The file batcher's invariants (service/core/file_batcher.py docstring), with an injected clock.

Unit tests of each trigger, of the one-batch-out rule, of create-on-demand and of revokes; a property test of
`NetChanges.pending_appends`; and a bounded state machine (`TestFileBatcherModel`) that checks, after every step,
where each record is, what each cut batch asks TikTok to do, and which buffers are due. Set
AUDIENCE_SYNC_MODEL_EXAMPLES to run it longer.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from itertools import count

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from service.core.customer_files import FileAction, FileContract, NetChanges, NetChangesFull
from service.core.file_batcher import FileBatch, FileBatcher, FileChange, FileKey, FileRow, net_rows
from service.core.model import ID_TYPES, Action, IdType
from service.core.types import RecordRef, TopicPartition

ADV = "7000000000000000001"
EMAIL: FileContract = "EMAIL_SHA256"


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


USERS = [sha(f"user{i}@example.com") for i in range(12)]


def change(
    user: int,
    action: Action = Action.ADD,
    *,
    key: str = "known",
    audience_id: str | None = "AUD-1",
    interval_s: float | None = None,
    max_rows: int | None = None,
    extra: tuple[tuple[IdType, str], ...] = (),
) -> FileChange:
    return FileChange(
        advertiser_id=ADV,
        audience_key=key,
        audience_id=audience_id,
        audience_name=key,
        contract=EMAIL,
        action=action,
        identifiers=(("EMAIL_SHA256", USERS[user]), *extra),
        interval_s=interval_s,
        max_rows=max_rows,
    )


def fkey(key: str) -> FileKey:
    return (ADV, key, EMAIL)


_offsets = count()


def ref(partition: int = 0) -> RecordRef:
    return RecordRef("t", partition, next(_offsets))


def make(*, interval_s: float = 10.0, max_rows: int = 100, min_create: int = 3) -> tuple[FileBatcher, Clock]:
    clock = Clock()
    return FileBatcher(interval_s=interval_s, max_rows=max_rows, clock=clock, min_create=min_create), clock


def appends(batch: FileBatch) -> frozenset[str]:
    return batch.net.append.get(EMAIL, frozenset())


def removes(batch: FileBatch) -> frozenset[str]:
    return batch.net.remove.get(EMAIL, frozenset())


def users(*indexes: int) -> frozenset[str]:
    return frozenset(USERS[i] for i in indexes)


# -- triggers -------------------------------------------------------------------------------------------------


def test_nothing_is_ready_when_empty() -> None:
    b, clock = make()
    assert b.ready() == [] and b.ready(force=True, pressure=True) == []
    clock.t += 1e6
    assert b.ready(force=True) == []
    assert b.next_deadline() is None and b.pending_rows == 0 and b.pending_users == 0
    assert b.waiting_for_users() == [] and b.pending_for([TopicPartition("t", 0)]) == 0
    with pytest.raises(ValueError):
        FileBatcher(interval_s=0, max_rows=1, clock=clock)
    with pytest.raises(ValueError):
        FileBatcher(interval_s=1, max_rows=0, clock=clock)
    with pytest.raises(ValueError):
        FileBatcher(interval_s=1, max_rows=1, clock=clock, min_create=0)


def test_rows_trigger_counts_users_against_the_batcher_default() -> None:
    b, _ = make(max_rows=3)
    b.add(ref(), change(0))
    b.add(ref(), change(1))
    b.add(ref(), change(1, Action.DELETE))  # the same user again: still 2 users
    assert b.pending_users == 2 and b.pending_rows == 3
    assert b.ready() == []
    b.add(ref(), change(2))
    (batch,) = b.ready()
    assert batch.trigger == "rows" and batch.key == fkey("known") and batch.audience_id == "AUD-1"
    assert appends(batch) == users(0, 2) and removes(batch) == users(1)
    assert len(batch.rows) == 4 and b.pending_rows == 0 and b.pending_users == 0


def test_rows_trigger_uses_the_entrys_max_rows_override() -> None:
    b, _ = make(max_rows=100)
    b.add(ref(), change(0, max_rows=2))
    assert b.ready() == []
    b.add(ref(), change(1, max_rows=2))
    (batch,) = b.ready()
    assert batch.trigger == "rows" and appends(batch) == users(0, 1)
    # The newest record carries the entry's current settings (mappings reload live).
    b.done(batch.key)
    b.add(ref(), change(2, max_rows=2))
    b.add(ref(), change(3, max_rows=None))  # override removed: the default (100) again
    assert b.ready() == []


def test_interval_trigger_with_the_batcher_default() -> None:
    b, clock = make(interval_s=10.0)
    b.add(ref(), change(0))
    clock.t += 4
    b.add(ref(), change(1))  # the interval runs from the oldest buffered record
    assert b.next_deadline() == 1010.0
    clock.t = 1009.9
    assert b.ready() == []
    clock.t = 1010.0
    (batch,) = b.ready()
    assert batch.trigger == "interval" and appends(batch) == users(0, 1)
    assert [r.enqueued_at for r in batch.rows] == [1000.0, 1004.0]
    assert b.next_deadline() is None


def test_interval_trigger_uses_the_entrys_override() -> None:
    b, clock = make(interval_s=60.0)
    b.add(ref(), change(0, interval_s=2.0))
    assert b.next_deadline() == 1002.0
    clock.t = 1001.5
    assert b.ready() == []
    clock.t = 1002.0
    (batch,) = b.ready()
    assert batch.trigger == "interval"


def test_force_and_pressure_cut_before_any_interval() -> None:
    b, _ = make()
    b.add(ref(), change(0, key="a"))
    assert b.ready() == []
    (forced,) = b.ready(force=True)
    assert forced.trigger == "force"
    b.add(ref(), change(1, key="b"))
    (pressed,) = b.ready(pressure=True)
    assert pressed.trigger == "pressure" and pressed.key == fkey("b")
    b.add(ref(), change(2, key="c"))
    (both,) = b.ready(force=True, pressure=True)
    assert both.trigger == "force"


def test_trigger_precedence_rows_then_interval_then_force() -> None:
    b, clock = make(interval_s=5.0, max_rows=2)
    b.add(ref(), change(0, key="rows"))
    b.add(ref(), change(1, key="rows"))
    b.add(ref(), change(0, key="interval"))
    clock.t += 5
    b.add(ref(), change(0, key="force"))
    got = {x.audience_key: x.trigger for x in b.ready(force=True, pressure=True)}
    assert got == {"rows": "rows", "interval": "interval", "force": "force"}


def test_ready_cuts_the_oldest_buffer_first() -> None:
    b, clock = make()
    for key in ("c", "a", "b"):
        b.add(ref(), change(0, key=key))
        clock.t += 1
    assert [x.audience_key for x in b.ready(force=True)] == ["c", "a", "b"]


def test_next_deadline_is_the_earliest_due_buffer_not_out_nor_waiting_for_users() -> None:
    b, clock = make(interval_s=10.0)
    b.add(ref(), change(0, key="slow"))  # due 1010
    clock.t = 1001.0
    b.add(ref(), change(0, key="fast", interval_s=3.0))  # due 1004
    b.add(ref(), change(0, key="new", audience_id=None, interval_s=1.0))  # would be due 1002: no audience yet
    assert b.next_deadline() == 1004.0
    clock.t = 1004.0
    (fast,) = b.ready()
    assert fast.audience_key == "fast"
    b.add(ref(), change(1, key="fast", interval_s=3.0))  # buffered while its batch is out: not due
    assert b.next_deadline() == 1010.0
    b.done(fast.key)
    assert b.next_deadline() == 1007.0  # due from its own arrival at 1004


# -- one batch out per key ------------------------------------------------------------------------------------


def test_one_batch_out_per_key_and_other_keys_are_independent() -> None:
    b, clock = make(interval_s=10.0, max_rows=2)
    b.add(ref(), change(0, key="a"))
    b.add(ref(), change(1, key="a"))
    (first,) = b.ready()
    assert first.trigger == "rows"
    b.add(ref(), change(0, Action.DELETE, key="a"))
    b.add(ref(), change(2, key="a"))
    b.add(ref(), change(3, key="a"))  # over max_rows, but a batch of "a" is out
    clock.t += 100
    b.add(ref(), change(0, key="b"))
    assert [x.audience_key for x in b.ready(force=True, pressure=True)] == ["b"]
    assert b.ready(force=True) == []
    assert b.pending_rows == 3 and b.pending_users == 3
    b.done(first.key)
    (second,) = b.ready()
    assert second.trigger == "rows" and second.id != first.id
    assert appends(second) == users(2, 3) and removes(second) == users(0)
    assert [r.change.identifiers[0][1] for r in second.rows] == [USERS[0], USERS[2], USERS[3]]
    b.done(second.key)
    assert b.ready(force=True) == [] and b.pending_rows == 0


def test_done_sets_the_audience_id_of_a_buffer_that_had_none() -> None:
    b, _ = make(min_create=2)
    b.add(ref(), change(0, key="new", audience_id=None))
    b.add(ref(), change(1, key="new", audience_id=None))
    (create,) = b.ready(force=True)
    assert create.audience_id is None
    b.add(ref(), change(2, Action.DELETE, key="new", audience_id=None))  # arrives while the create is out
    assert b.ready(force=True) == []
    b.done(create.key, "CREATED-1")
    (update,) = b.ready(force=True)  # a lone REMOVE: no longer waits for users, the audience exists
    assert update.audience_id == "CREATED-1" and removes(update) == users(2)
    b.done(update.key, "OTHER")  # an id is set only where there was none
    b.add(ref(), change(3, Action.DELETE, key="new", audience_id=None))
    (later,) = b.ready(force=True)
    assert later.audience_id == "CREATED-1"


def test_an_audience_created_with_an_empty_buffer_is_not_forgotten() -> None:
    """The create batch took every buffered record: the id `done` brings must still reach the next records of the
    key (their changes carry no id until the mappings name one)."""
    b, _ = make(min_create=2)
    b.add(ref(), change(0, key="new", audience_id=None))
    b.add(ref(), change(1, key="new", audience_id=None))
    (create,) = b.ready(force=True)
    b.done(create.key, "CREATED-1")
    b.add(ref(), change(0, Action.DELETE, key="new", audience_id=None))
    assert b.waiting_for_users() == []
    (update,) = b.ready(force=True)
    assert update.audience_id == "CREATED-1" and removes(update) == users(0)


def test_a_failed_create_leaves_the_audience_to_create() -> None:
    b, _ = make(min_create=2)
    b.add(ref(), change(0, key="new", audience_id=None))
    b.add(ref(), change(1, key="new", audience_id=None))
    (create,) = b.ready(force=True)
    b.done(create.key)  # refused: no id
    b.add(ref(), change(2, key="new", audience_id=None))
    assert b.ready(force=True) == [] and b.waiting_for_users() == [(fkey("new"), 1)]


def test_a_record_naming_the_audience_id_gives_the_buffer_its_id() -> None:
    b, _ = make(min_create=3)
    b.add(ref(), change(0, Action.DELETE, key="new", audience_id=None))
    assert b.ready(force=True) == []
    b.add(ref(), change(1, key="new", audience_id="FROM-MAPPINGS"))
    b.add(ref(), change(2, key="new", audience_id=None))  # a later record without one does not unset it
    (batch,) = b.ready(force=True)
    assert batch.audience_id == "FROM-MAPPINGS" and removes(batch) == users(0) and appends(batch) == users(1, 2)


# -- create on demand -----------------------------------------------------------------------------------------


def test_an_audience_the_store_knows_is_not_waited_for() -> None:
    """After a restart the audience store knows the audience an earlier run created: no 1,000 users again."""
    b, _ = make(min_create=3)
    store: dict[tuple[str, str], str] = {}
    b.known = store
    b.add(ref(0), change(0, Action.DELETE, key="new", audience_id=None))
    b.add(ref(1), change(1, key="new", audience_id=None))
    assert b.waiting_for_users() == [(fkey("new"), 1)]
    assert b.waiting_rows() == 2 and b.waiting_rows(TopicPartition("t", 1)) == 1
    assert b.ready(force=True) == [] and b.next_deadline() is None
    store[(ADV, "new")] = "STORED-1"  # filled in place as the store reads its topic
    assert b.waiting_for_users() == [] and b.waiting_rows() == 0
    assert b.next_deadline() == 1010.0
    (batch,) = b.ready(force=True)
    assert batch.audience_id == "STORED-1" and removes(batch) == users(0) and appends(batch) == users(1)


def test_an_audience_to_create_waits_for_min_create_appends_even_when_forced() -> None:
    b, clock = make(interval_s=1.0, max_rows=2, min_create=3)
    b.add(ref(), change(0, key="new", audience_id=None))
    b.add(ref(), change(1, key="new", audience_id=None))  # max_rows reached, but only 2 users to APPEND
    clock.t += 100  # the interval too
    assert b.ready(force=True, pressure=True) == []
    assert b.waiting_for_users() == [(fkey("new"), 2)]
    assert b.next_deadline() is None
    b.add(ref(), change(2, key="new", audience_id=None))
    assert b.waiting_for_users() == []
    assert b.next_deadline() == 1001.0
    (batch,) = b.ready()
    assert batch.audience_id is None and batch.audience_name == "new" and batch.trigger == "rows"
    assert appends(batch) == users(0, 1, 2) and b.waiting_for_users() == []


def test_enter_then_exit_does_not_count_towards_creation() -> None:
    b, _ = make(min_create=3)
    for user in (0, 1, 2):
        b.add(ref(), change(user, key="new", audience_id=None))
    b.add(ref(), change(1, Action.DELETE, key="new", audience_id=None))
    assert b.waiting_for_users() == [(fkey("new"), 2)]
    assert b.ready(force=True) == []
    b.add(ref(), change(1, Action.DELETE, key="new", audience_id=None))  # exit again: still not an APPEND
    b.add(ref(), change(3, Action.DELETE, key="new", audience_id=None))
    b.add(ref(), change(0, key="new", audience_id=None))  # enter again: still one user
    assert b.waiting_for_users() == [(fkey("new"), 2)]
    b.add(ref(), change(1, key="new", audience_id=None))  # enter, exit, enter: APPEND
    assert b.waiting_for_users() == []
    (batch,) = b.ready(force=True)
    assert appends(batch) == users(0, 1, 2) and removes(batch) == users(3)


def test_records_of_other_contracts_do_not_count_towards_creation() -> None:
    b, _ = make(min_create=2)
    phone: tuple[tuple[IdType, str], ...] = (("PHONE_SHA256", sha("+15555555555")),)
    b.add(ref(), change(0, key="new", audience_id=None, extra=phone))
    b.add(ref(), change(0, key="new", audience_id=None, extra=phone))
    assert b.waiting_for_users() == [(fkey("new"), 1)] and b.pending_users == 1


# -- revokes --------------------------------------------------------------------------------------------------


def test_drop_partitions_nets_the_kept_records_again() -> None:
    b, _ = make(min_create=2)
    kept, lost = TopicPartition("t", 0), TopicPartition("t", 1)
    b.add(ref(0), change(0))  # U enters in a kept partition ...
    b.add(ref(1), change(0, Action.DELETE))  # ... and exits in a revoked one
    b.add(ref(1), change(1))  # only a revoked record for this user
    b.add(ref(0), change(2, Action.DELETE))
    assert b.pending_for([kept]) == 2 and b.pending_for([lost]) == 2 and b.pending_for([kept, lost]) == 4
    assert b.pending_users == 3
    assert b.drop_partitions([]) == 0
    assert b.drop_partitions([lost]) == 2
    assert b.pending_rows == 2 and b.pending_users == 2
    assert b.pending_for([lost]) == 0 and b.pending_for([kept]) == 2
    (batch,) = b.ready(force=True)
    assert appends(batch) == users(0) and removes(batch) == users(2)
    assert [r.ref.partition for r in batch.rows] == [0, 0]
    assert b.pending_rows == 0


def test_drop_partitions_recounts_the_users_to_create_with() -> None:
    b, _ = make(min_create=2)
    b.add(ref(0), change(0, key="new", audience_id=None))
    b.add(ref(1), change(1, key="new", audience_id=None))
    assert b.waiting_for_users() == []
    b.drop_partitions([TopicPartition("t", 1)])
    assert b.waiting_for_users() == [(fkey("new"), 1)]
    assert b.ready(force=True) == []
    b.drop_partitions([TopicPartition("t", 0)])
    assert b.waiting_for_users() == [] and b.pending_rows == 0 and b.ready(force=True) == []


def test_drop_partitions_leaves_batches_out_alone() -> None:
    b, _ = make()
    b.add(ref(1), change(0))
    (out,) = b.ready(force=True)
    b.add(ref(1), change(1))
    b.add(ref(0), change(2))
    assert b.drop_partitions([TopicPartition("t", 1)]) == 1  # the buffered one only
    assert [r.ref.partition for r in out.rows] == [1]
    assert b.pending_rows == 1
    assert b.drop_partitions([TopicPartition("t", 0)]) == 1
    assert b.pending_rows == 0 and b.ready(force=True) == []  # the batch is still out
    b.done(out.key)
    b.add(ref(0), change(3))
    (later,) = b.ready(force=True)
    assert appends(later) == users(3)


# -- net_rows -------------------------------------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4), st.booleans(), st.booleans()), max_size=30))
def test_net_rows_is_a_fresh_netting_of_the_same_rows(events: list[tuple[int, bool, bool]]) -> None:
    phone: tuple[tuple[IdType, str], ...] = (("PHONE_SHA256", sha("+15555555555")),)
    rows = [
        FileRow(ref(), change(user, Action.ADD if enter else Action.DELETE, extra=phone if other else ()), 0.0)
        for user, enter, other in events
    ]
    fresh: NetChanges[FileRow] = NetChanges([EMAIL])
    for row in rows:
        fresh.record(row.change.action, row.change.identifiers, row)
    assert net_rows(EMAIL, rows) == fresh.drain()


# -- NetChanges.pending_appends -------------------------------------------------------------------------------

_CONTRACT_OF: dict[IdType, FileContract] = {
    "EMAIL_SHA256": "EMAIL_SHA256",
    "PHONE_SHA256": "PHONE_SHA256",
    "IDFA_SHA256": "IDFA_SHA256",
    "AAID_SHA256": "GAID_SHA256",
}

_identifier = st.tuples(st.sampled_from(ID_TYPES), st.sampled_from(USERS[:3]))
_step = st.one_of(
    st.tuples(st.booleans(), st.lists(_identifier, max_size=4)),  # a record (possibly repeating an identifier)
    st.just(None),  # a drain
)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.sampled_from(["EMAIL_SHA256", "PHONE_SHA256", "IDFA_SHA256", "GAID_SHA256"]), min_size=1),
    st.lists(_step, max_size=40),
    st.integers(1, 6),
)
def test_pending_appends_counts_the_pending_users_to_append(
    contracts: list[FileContract], steps: list[tuple[bool, list[tuple[IdType, str]]] | None], bound: int
) -> None:
    net: NetChanges[int] = NetChanges(contracts, max_users=bound, max_records=bound + 2)
    model: dict[tuple[FileContract, str], FileAction] = {}
    for i, step in enumerate(steps):
        if step is None:
            batch = net.drain()
            assert sum(map(len, batch.append.values())) == sum(a is FileAction.APPEND for a in model.values())
            model = {}
        else:
            enter, ids = step
            try:
                net.record(Action.ADD if enter else Action.DELETE, ids, i)
            except NetChangesFull:
                pass  # refused: changes nothing
            else:
                for id_type, value in ids:
                    if _CONTRACT_OF[id_type] in contracts:
                        model[(_CONTRACT_OF[id_type], value)] = FileAction.APPEND if enter else FileAction.REMOVE
        assert net.pending_users == len(model)
        assert net.pending_appends == sum(a is FileAction.APPEND for a in model.values())
        assert net.pending_appends == sum(a is FileAction.APPEND for a, _ in net._entries.values())


# -- state machine --------------------------------------------------------------------------------------------

MODEL_EXAMPLES = int(os.environ.get("AUDIENCE_SYNC_MODEL_EXAMPLES", "0") or 0)
MIN_CREATE = 3
DEFAULT_INTERVAL, DEFAULT_MAX_ROWS = 5.0, 4
POOL = 5
PARTITIONS = [TopicPartition("t", p) for p in range(3)]
# "made" is created on demand (its records carry no id until one is learned); "named" has an id in the mappings,
# with the entry overriding interval and size. Either's records sometimes come without an id.
KEYS = ("made", "named")
OVERRIDES: dict[str, tuple[float | None, int | None]] = {"made": (None, None), "named": (3.0, 3)}


@dataclass(frozen=True, slots=True)
class _Rec:
    ref: RecordRef
    user: int
    action: Action
    at: float


def _last_action_wins(records: list[_Rec]) -> tuple[frozenset[str], frozenset[str]]:
    last: dict[int, Action] = {}
    for r in records:
        last[r.user] = r.action
    return (
        frozenset(USERS[u] for u, a in last.items() if a is Action.ADD),
        frozenset(USERS[u] for u, a in last.items() if a is Action.DELETE),
    )


class FileBatcherMachine(RuleBasedStateMachine):
    """Random add / ready / done / revoke / clock against a plain model of where each record is."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        self.batcher = FileBatcher(
            interval_s=DEFAULT_INTERVAL, max_rows=DEFAULT_MAX_ROWS, clock=self.clock, min_create=MIN_CREATE
        )
        self.offsets = count()
        self.buffered: dict[str, list[_Rec]] = {k: [] for k in KEYS}
        self.out: dict[str, tuple[FileBatch, list[_Rec]]] = {}
        self.audience: dict[str, str | None] = {k: None for k in KEYS}  # the buffer's own audience id, if any
        self.learned: dict[str, str] = {}  # ids `done` brought for audiences created on demand, by name
        self.store: dict[tuple[str, str], str] = {}  # the audience store's record (of an earlier run)
        self.batcher.known = self.store
        self.batch_ids: set[int] = set()

    # -- model helpers

    def _exists(self, key: str) -> bool:
        return bool(self.buffered[key]) or key in self.out

    def _forget_if_gone(self, key: str) -> None:
        if not self._exists(key):
            self.audience[key] = None

    def _audience_id(self, key: str) -> str | None:
        """The id a batch of `key` would carry: its records', else the one created on demand (names are keys)."""
        return self.audience[key] or self.learned.get(key) or self.store.get((ADV, key))

    def _appends(self, key: str) -> int:
        return len(_last_action_wins(self.buffered[key])[0])

    def _expected_trigger(self, key: str, force: bool, pressure: bool) -> str | None:
        recs = self.buffered[key]
        if not recs or key in self.out:
            return None
        if self._audience_id(key) is None and self._appends(key) < MIN_CREATE:
            return None
        interval, max_rows = OVERRIDES[key]
        if len({r.user for r in recs}) >= (max_rows or DEFAULT_MAX_ROWS):
            return "rows"
        if self.clock.t - recs[0].at >= (interval or DEFAULT_INTERVAL):
            return "interval"
        if force:
            return "force"
        return "pressure" if pressure else None

    # -- rules

    @rule(
        user=st.integers(0, POOL - 1),
        enter=st.booleans(),
        partition=st.integers(0, len(PARTITIONS) - 1),
        key=st.sampled_from(KEYS),
        with_id=st.sampled_from([False, False, True]),
    )
    def add(self, user: int, enter: bool, partition: int, key: str, with_id: bool) -> None:
        audience_id = None
        if with_id:
            audience_id = "NAMED-1" if key == "named" else self.learned.get(key)
        action = Action.ADD if enter else Action.DELETE
        interval, max_rows = OVERRIDES[key]
        r = RecordRef("t", partition, next(self.offsets))
        c = change(user, action, key=key, audience_id=audience_id, interval_s=interval, max_rows=max_rows)
        if audience_id is not None:
            self.audience[key] = audience_id
        row = self.batcher.add(r, c, source=r)
        assert row.ref == r and row.change == c and row.enqueued_at == self.clock.t and row.source == r
        self.buffered[key].append(_Rec(r, user, action, self.clock.t))

    @rule(
        key=st.sampled_from(KEYS),
        entries=st.lists(st.tuples(st.integers(0, POOL - 1), st.integers(0, len(PARTITIONS) - 1)), min_size=2),
    )
    def enter_burst(self, key: str, entries: list[tuple[int, int]]) -> None:
        """Several entries for one key in one poll: audiences to create reach MIN_CREATE in a few steps."""
        for user, partition in entries[:4]:
            self.add(user, True, partition, key, False)

    @rule(force=st.booleans(), pressure=st.booleans())
    def ready(self, force: bool, pressure: bool) -> None:
        expected = {k: self._expected_trigger(k, force, pressure) for k in KEYS}
        batches = self.batcher.ready(force=force, pressure=pressure)
        assert {b.audience_key: b.trigger for b in batches} == {k: t for k, t in expected.items() if t is not None}
        assert len({b.key for b in batches}) == len(batches)
        for batch in batches:
            key = batch.audience_key
            assert key not in self.out, "a second batch of one key out"
            assert batch.id not in self.batch_ids
            self.batch_ids.add(batch.id)
            assert batch.key == fkey(key) and batch.audience_name == key
            assert batch.audience_id == self._audience_id(key)
            self.audience[key] = batch.audience_id
            recs = self.buffered[key]
            assert [row.ref for row in batch.rows] == [r.ref for r in recs]
            append, remove = _last_action_wins(recs)
            assert appends(batch) == append and removes(batch) == remove
            if batch.audience_id is None:
                assert len(appends(batch)) >= MIN_CREATE
            self.out[key] = (batch, recs)
            self.buffered[key] = []

    def _done(self, key: str, audience_id: str | None) -> None:
        batch, _ = self.out.pop(key)  # its records reached their outcome
        if audience_id is not None and self.audience[key] is None:  # the id the batch was cut with, if any
            self.audience[key] = audience_id
            self.learned[key] = audience_id
        self.batcher.done(batch.key, audience_id)
        self._forget_if_gone(key)

    @precondition(lambda self: bool(self.out))
    @rule(data=st.data())
    def done(self, data: st.DataObject) -> None:
        """A batch reached its outcome: the pipeline hands back the batch's audience id (None: a create failed)."""
        key = data.draw(st.sampled_from(sorted(self.out)))
        self._done(key, self.out[key][0].audience_id)

    @precondition(lambda self: any(batch.audience_id is None for batch, _ in self.out.values()))
    @rule(data=st.data())
    def created(self, data: st.DataObject) -> None:
        """A create batch made (or found) its audience: `done` brings the new id."""
        key = data.draw(st.sampled_from(sorted(k for k, (batch, _) in self.out.items() if batch.audience_id is None)))
        self._done(key, f"CREATED-{self.out[key][0].id}")

    @rule(tps=st.sets(st.sampled_from(PARTITIONS), max_size=2))
    def drop_partitions(self, tps: set[TopicPartition]) -> None:
        dropped = 0
        for key in KEYS:
            keep = [r for r in self.buffered[key] if r.ref.tp not in tps]
            dropped += len(self.buffered[key]) - len(keep)
            self.buffered[key] = keep
            self._forget_if_gone(key)
        assert self.batcher.drop_partitions(tps) == dropped

    @precondition(lambda self: (ADV, "made") not in self.store)
    @rule()
    def store_learns(self) -> None:
        """The audience store reads that an earlier run created "made" (the batcher reads the same mapping)."""
        self.store[(ADV, "made")] = "STORED-1"

    @rule(dt=st.sampled_from([0.5, 1.0, 2.5, 6.0]))
    def advance(self, dt: float) -> None:
        self.clock.t += dt

    # -- invariants

    @invariant()
    def every_record_is_in_exactly_one_place(self) -> None:
        buffers = self.batcher._buffers
        for key in KEYS:
            buf = buffers.get(fkey(key))
            assert (buf is not None) is self._exists(key)
            got = [r.ref for r in buf.rows] if buf is not None else []
            assert got == [r.ref for r in self.buffered[key]]
            assert (fkey(key) in self.batcher._out) is (key in self.out)
        places = [r.ref for recs in self.buffered.values() for r in recs]
        places += [row.ref for batch, _ in self.out.values() for row in batch.rows]
        assert len(places) == len(set(places))

    @invariant()
    def counts_match_the_model(self) -> None:
        b = self.batcher
        assert b.pending_rows == sum(map(len, self.buffered.values()))
        assert b.pending_users == sum(len({r.user for r in recs}) for recs in self.buffered.values())
        for tp in PARTITIONS:
            assert b.pending_for([tp]) == sum(r.ref.tp == tp for recs in self.buffered.values() for r in recs)
        waiting = [
            (fkey(k), self._appends(k))
            for k in KEYS
            if self.buffered[k] and self._audience_id(k) is None and self._appends(k) < MIN_CREATE
        ]
        assert sorted(b.waiting_for_users()) == sorted(waiting)

    @invariant()
    def next_deadline_is_the_earliest_due_buffer(self) -> None:
        due = [
            self.buffered[k][0].at + (OVERRIDES[k][0] or DEFAULT_INTERVAL)
            for k in KEYS
            if self.buffered[k]
            and k not in self.out
            and (self._audience_id(k) is not None or self._appends(k) >= MIN_CREATE)
        ]
        assert self.batcher.next_deadline() == (min(due) if due else None)


FileBatcherMachine.TestCase.settings = settings(
    max_examples=MODEL_EXAMPLES or 100,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestFileBatcherModel = FileBatcherMachine.TestCase


def test_an_older_record_of_the_same_partition_added_later_rides_on_the_newer_action() -> None:
    # A record held by the DLQ guard and routed again arrives after a newer record of its user and partition.
    b, _ = make()
    older, newer = RecordRef("t", 0, 10), RecordRef("t", 0, 20)
    b.add(newer, change(0, Action.DELETE))
    b.add(older, change(0, Action.ADD))
    b.add(RecordRef("t", 1, 5), change(1, Action.DELETE))
    b.add(RecordRef("t", 0, 3), change(1, Action.ADD))  # another partition's record: no order, last added wins
    [batch] = b.ready(force=True)
    assert removes(batch) == users(0) and appends(batch) == users(1)
    needs = dict(zip([r.ref for r in batch.rows], batch.net.needs, strict=True))
    assert needs[older] == needs[newer] == {(EMAIL, FileAction.REMOVE)}  # finished when the REMOVE is accepted
