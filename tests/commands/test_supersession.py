"""Replay's check for newer events as pure logic, with literals: which letters are kept, superseded or
unverifiable (`service.kafka.supersession`); whose event a record is (`Identities`); and how the source partition
reader reports ends and problems (`service.kafka.dlq_reader.PartitionReader`, on a scripted consumer)."""

from __future__ import annotations

import copy
import io
from typing import Any

import fastavro
import orjson
import pytest
from confluent_kafka import OFFSET_BEGINNING, KafkaError

from service.core.identifiers import hash_email, hash_phone
from service.core.membership import ResolverSettings
from service.core.schemas import SchemaStore, load_canonical_schema
from service.kafka.dlq_reader import PartitionReader
from service.kafka.schema_registry import RegistryUnavailable
from service.kafka.supersession import (
    NO_SOURCE,
    Decision,
    Identities,
    Letter,
    Outcome,
    SourceEvent,
    Supersession,
    Unreadable,
    by_audience_id,
    by_key,
    decide,
)

E1 = ("EMAIL_SHA256", "e1" * 32)
E2 = ("EMAIL_SHA256", "e2" * 32)
P1 = ("PHONE_SHA256", "p1" * 32)
VIP = by_key("vip")
SALE = by_key("sale")
KEPT, SUPERSEDED = Decision(Outcome.KEPT), Decision(Outcome.SUPERSEDED)


def letter(dlq: int, offset: int | None, *cells: tuple[str, str], audience: Any = VIP, partition: int = 0) -> Letter:
    source = ("src", partition, offset) if offset is not None else None
    return Letter((0, dlq), source, audience, frozenset(cells))


def event(offset: int, *cells: tuple[str, str], audience: Any = VIP, partition: int = 0, topic: str = "src") -> Any:
    return SourceEvent(topic, partition, offset, audience, frozenset(cells))


def unverifiable(why: str) -> Decision:
    return Decision(Outcome.UNVERIFIABLE, why)


def test_replay_help_states_the_contract() -> None:
    from service.commands import replay

    text = " ".join(replay.build_parser().format_help().split())
    assert "a replayed letter never overrides a newer event for the same user and audience key" in text
    assert "superseded" in text and "--unverifiable {stop,skip,replay}" in text


# -- decisions --------------------------------------------------------------------------------------------------


def test_a_later_event_for_the_same_user_and_audience_supersedes_the_letter() -> None:
    got = decide([letter(0, 10, E1), letter(1, 11, E2)], [event(12, E1)])
    assert got == {(0, 0): SUPERSEDED, (0, 1): KEPT}


@pytest.mark.parametrize(
    "later",
    [
        event(9, E1),  # older than the letter
        event(10, E1),  # the letter's own original
        event(12, E2),  # another user
        event(12, E1, audience=SALE),  # another audience key
        event(12, E1, audience=by_audience_id("10")),  # an explicit audience id is another audience
        event(12, E1, partition=1),  # another partition: no order between them
        event(12, E1, topic="other"),  # another topic
    ],
)
def test_events_that_are_not_newer_for_the_same_user_and_audience_do_not(later: SourceEvent) -> None:
    assert decide([letter(0, 10, E1)], [later]) == {(0, 0): KEPT}


def test_one_shared_identifier_is_the_same_user() -> None:
    """TikTok state is per (audience, type, hash) cell: replaying the letter would overwrite the shared cell."""
    assert decide([letter(0, 10, E1, P1)], [event(11, E1)]) == {(0, 0): SUPERSEDED}
    assert decide([letter(0, 10, E1)], [event(11, E2, P1)]) == {(0, 0): KEPT}


def test_of_two_letters_for_one_user_the_newer_wins() -> None:
    older, newer = letter(0, 10, E1), letter(1, 20, E1)
    assert decide([newer, older], []) == {(0, 0): SUPERSEDED, (0, 1): KEPT}


def test_the_same_record_dead_lettered_twice_keeps_its_later_letter() -> None:
    first, again = letter(3, 10, E1), letter(8, 10, E1)
    assert decide([first, again], []) == {(0, 3): SUPERSEDED, (0, 8): KEPT}


def test_a_newer_letter_supersedes_even_when_the_source_cannot_be_read() -> None:
    older, newer = letter(0, 10, E1), letter(1, 20, E1)
    gone = {("src", 0): "topic src not found"}
    got = decide([older, newer], [], problems=gone)
    assert got == {(0, 0): SUPERSEDED, (0, 1): unverifiable("topic src not found")}


def test_letters_that_cannot_be_checked_are_unverifiable_with_their_cause() -> None:
    no_source = letter(0, None, E1)
    registry = Letter((0, 1), ("src", 0, 5), VIP, frozenset({E1}), problem="schema registry unavailable")
    not_read = letter(2, 5, E1, partition=1)
    past_end = letter(3, 50, E2)
    got = decide([no_source, registry, not_read, past_end], [], ends={("src", 0): 40})
    assert got == {
        (0, 0): unverifiable(NO_SOURCE),
        (0, 1): unverifiable("schema registry unavailable"),
        (0, 2): unverifiable("partition 1 of topic src: end not reached"),
        (0, 3): unverifiable("partition 0 of topic src: original offset past the end (topic recreated?)"),
    }


def test_a_letter_with_no_membership_change_cannot_override_anything() -> None:
    undecodable = Letter((0, 0), None)
    assert decide([undecodable], []) == {(0, 0): KEPT}


def test_records_deleted_by_retention_make_only_the_letters_before_them_unverifiable() -> None:
    check = Supersession()
    for one in (letter(0, 3, E1), letter(1, 9, E2), letter(2, 4, P1)):
        check.add(one)
    assert check.starts() == {("src", 0): 4}
    check.observe(event(12, P1))
    check.reached_end("src", 0, 20, first=10)  # offsets 4-9 were deleted
    got = {one.at: d for one, d in check.decide()}
    assert got == {
        (0, 0): unverifiable("partition 0 of topic src: later records deleted (retention)"),
        (0, 1): KEPT,  # offset 9 + 1 = 10: everything after it is still there
        (0, 2): SUPERSEDED,  # definitive whatever was deleted
    }


def test_only_the_selected_letters_keys_are_kept_in_memory() -> None:
    check = Supersession()
    check.add(letter(0, 10, E1, P1))
    check.add(letter(1, 11, E1, audience=SALE, partition=2))
    assert check.starts() == {("src", 0): 11, ("src", 2): 12}
    assert check.wants("src", 0, VIP) and not check.wants("src", 0, SALE) and check.wants("src", 2, SALE)
    before = len(check._newest)
    for n in range(1000):  # a busy source partition: other users, other audiences
        check.observe(event(100 + n, ("EMAIL_SHA256", f"{n:064x}")))
        check.observe(event(100 + n, E1, audience=by_key(f"k{n}")))
    assert len(check._newest) == before == 3


# -- whose event is it -------------------------------------------------------------------------------------------

SETTINGS = ResolverSettings()
EMAIL, PHONE = "someone@example.com", "+14155550123"


def segment(entered: bool, *, key: str | None = "vip", event: str | None = None, **traits: Any) -> bytes:
    personas: dict[str, Any] = {"computation_class": "audience"}
    if key is not None:
        personas["computation_key"] = key
    return orjson.dumps(
        {
            "type": "track",
            "event": event or ("Audience Entered" if entered else "Audience Exited"),
            "context": {"personas": personas, "traits": traits or {"email": EMAIL}},
            "properties": {},
        }
    )


def test_identity_is_the_hashed_identifiers_the_service_uploads_under_the_audience_key() -> None:
    ids = Identities(SETTINGS)  # no mappings at all: identity does not depend on them
    email, phone = hash_email(EMAIL), hash_phone(PHONE)
    both = frozenset({("EMAIL_SHA256", email), ("PHONE_SHA256", phone)})
    assert ids.of(segment(True, email=EMAIL, phone=PHONE), None) == (VIP, both)
    assert ids.of(segment(False, email=" SomeOne@Example.com "), None) == (VIP, frozenset({("EMAIL_SHA256", email)}))
    canonical = orjson.dumps({"audience_key": "vip", "action": "delete", "email": EMAIL})
    assert ids.of(canonical, None) == (VIP, frozenset({("EMAIL_SHA256", email)}))
    no_phone = Identities(ResolverSettings(send_phone=False))
    assert no_phone.of(segment(True, email=EMAIL, phone=PHONE), None) == (VIP, frozenset({("EMAIL_SHA256", email)}))


def test_an_event_without_an_audience_key_is_keyed_by_its_explicit_audience_id() -> None:
    value = orjson.loads(segment(True, key=None))
    value["context"]["personas"]["external_audience_id"] = "1100000009"
    got = Identities(SETTINGS).of(orjson.dumps(value), None)
    assert got is not None and got[0] == by_audience_id("1100000009")


@pytest.mark.parametrize(
    "value",
    [
        b"{not json",
        b"",
        segment(True, event="Order Completed"),  # not an audience event
        segment(True, email="not-an-email"),  # no usable identifier
        orjson.dumps({"audience_key": "vip", "action": "sideways", "email": EMAIL}),
    ],
)
def test_records_that_change_no_membership_have_no_identity(value: bytes) -> None:
    assert Identities(SETTINGS).of(value, None) is None


def test_records_of_audience_keys_nobody_asked_about_are_skipped_before_hashing() -> None:
    ids = Identities(SETTINGS)
    asked: list[Any] = []

    def wanted(audience: tuple[str, str]) -> bool:
        asked.append(audience)
        return audience == SALE

    assert ids.of(segment(True), None, wanted) is None
    assert ids.of(segment(True, key="sale"), None, wanted) is not None
    assert asked == [VIP, SALE]


def confluent(schema_id: int, record: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, fastavro.parse_schema(copy.deepcopy(load_canonical_schema())), record)
    return b"\x00" + schema_id.to_bytes(4, "big") + buf.getvalue()


def test_confluent_records_use_the_schema_registry_like_the_service() -> None:
    value = confluent(7, {"audience_key": "vip", "action": "add", "email": EMAIL})
    assert Identities(SETTINGS).of(value, None) is None, "no registry: the service dead-letters it too"

    loads: list[int] = []

    def load(schema_id: int, store: SchemaStore) -> None:
        loads.append(schema_id)
        store.add(schema_id, load_canonical_schema())

    got = Identities(SETTINGS, load).of(value, None)
    assert got == (VIP, frozenset({("EMAIL_SHA256", hash_email(EMAIL))})) and loads == [7]

    def down(schema_id: int, store: SchemaStore) -> None:
        loads.append(schema_id)
        raise RegistryUnavailable("registry down")

    ids = Identities(SETTINGS, down)
    for _ in range(2):
        with pytest.raises(Unreadable, match="schema registry unavailable for schema id 7"):
            ids.of(value, None)
    assert loads == [7, 7], "asked once per run, not once per record"


# -- reading source partitions to their end --------------------------------------------------------------------


class Msg:
    def __init__(self, topic: str, partition: int, offset: int, code: int | None = None) -> None:
        self._t, self._p, self._o = topic, partition, offset
        self._err = KafkaError(code) if code is not None else None

    def error(self) -> KafkaError | None:
        return self._err

    def topic(self) -> str:
        return self._t

    def partition(self) -> int:
        return self._p

    def offset(self) -> int:
        return self._o


class Meta:
    def __init__(self, partitions: dict[str, int]) -> None:
        class T:
            def __init__(self, n: int) -> None:
                self.error = None
                self.partitions = {p: None for p in range(n)}

        self.topics = {t: T(n) for t, n in partitions.items()}


class ScriptedConsumer:
    """The few `Consumer` methods `PartitionReader` uses, answering from a script of consume results."""

    def __init__(self, partitions: dict[str, int], script: list[list[Msg]]) -> None:
        self.partitions = partitions
        self.script = script
        self.assigned: list[tuple[str, int, int]] = []
        self.seeks: list[tuple[str, int, int]] = []
        self.paused: list[tuple[str, int]] = []

    def list_topics(self, topic: str, timeout: float) -> Meta:
        return Meta({topic: self.partitions[topic]} if topic in self.partitions else {})

    def assign(self, tps: list[Any]) -> None:
        self.assigned = [(tp.topic, tp.partition, tp.offset) for tp in tps]

    def consume(self, n: int, timeout: float) -> list[Msg]:
        return self.script.pop(0) if self.script else []

    def seek(self, tp: Any) -> None:
        self.seeks.append((tp.topic, tp.partition, tp.offset))

    def pause(self, tps: list[Any]) -> None:
        self.paused += [(tp.topic, tp.partition) for tp in tps]

    def close(self) -> None:
        pass


def read(consumer: ScriptedConsumer, starts: dict[tuple[str, int], int]) -> tuple[PartitionReader, list[int | None]]:
    reader = PartitionReader({}, starts, idle_timeout_s=0.05, consumer=consumer, poll_s=0)
    offsets = [m.offset() for batch in reader.messages() for m in batch]
    return reader, offsets


def test_partition_reader_stops_each_partition_at_its_first_end_of_partition() -> None:
    eof = KafkaError._PARTITION_EOF
    script = [
        [Msg("src", 0, 5), Msg("src", 1, 2), Msg("src", 0, 6), Msg("src", 0, 7, eof)],
        [Msg("src", 0, 7), Msg("src", 1, 3), Msg("src", 1, 4, eof)],  # 0@7 came after its end: live traffic
    ]
    consumer = ScriptedConsumer({"src": 2}, script)
    reader, offsets = read(consumer, {("src", 0): 5, ("src", 1): 2})
    assert consumer.assigned == [("src", 0, 5), ("src", 1, 2)]
    assert offsets == [5, 2, 6, 3]
    assert (reader.state[("src", 0)].end, reader.state[("src", 1)].end) == (7, 4)
    assert consumer.paused == [("src", 0), ("src", 1)]


def test_partition_reader_names_what_is_gone_and_what_never_ended() -> None:
    consumer = ScriptedConsumer({"src": 2}, [])
    reader, offsets = read(consumer, {("gone", 0): 1, ("src", 5): 1, ("src", 1): 3})
    assert offsets == []
    assert reader.state[("gone", 0)].problem == "topic gone not found"
    assert reader.state[("src", 5)].problem == "partition 5 of topic src not found"
    assert reader.state[("src", 1)].problem == (
        "partition 1 of topic src: no end of partition reported within 0.05s (offset out of range?)"
    )
    assert consumer.assigned == [("src", 1, 3)]


def test_partition_reader_restarts_a_partition_whose_start_was_deleted() -> None:
    script = [
        [Msg("src", 0, 4, KafkaError._AUTO_OFFSET_RESET)],
        [Msg("src", 0, 10), Msg("src", 0, 11), Msg("src", 0, 12, KafkaError._PARTITION_EOF)],
    ]
    consumer = ScriptedConsumer({"src": 1}, script)
    reader, offsets = read(consumer, {("src", 0): 4})
    assert consumer.seeks == [("src", 0, OFFSET_BEGINNING)]
    assert offsets == [10, 11]
    st = reader.state[("src", 0)]
    assert (st.end, st.first, st.problem) == (12, 10, None)


def test_partition_reader_gives_up_a_partition_the_broker_says_is_unknown() -> None:
    consumer = ScriptedConsumer({"src": 1}, [[Msg("src", 0, -1, KafkaError.UNKNOWN_TOPIC_OR_PART)]])
    reader, _ = read(consumer, {("src", 0): 4})
    assert reader.state[("src", 0)].problem == "partition 0 of topic src not found"
