"""Pipeline logic without Kafka or HTTP: broker readiness from librdkafka events, bisection of refused batches."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import orjson
from confluent_kafka import KafkaError

from service.core.answers import Answer, Verdict, classify
from service.core.batcher import Batcher
from service.core.mappings import Mappings
from service.core.membership import Resolver, ResolverSettings
from service.core.retry import Backoff
from service.core.schemas import SchemaStore
from service.core.types import TopicPartition
from service.devtools.sample import SampleEvent
from service.pipeline.loop import Pipeline, PipelineOptions, brokers_up
from tests.integration.helpers_failures import AUD_A, unique_events


def pipeline(uploader: Any = None, dlq: Any = None, max_rows: int = 1000) -> Pipeline:
    clock = lambda: 0.0  # noqa: E731
    return Pipeline(
        resolver=Resolver(ResolverSettings(), Mappings({}), SchemaStore()),
        batcher=Batcher(clock=clock, max_rows=max_rows),
        uploader=cast(Any, uploader),
        dlq=cast(Any, dlq),
        dlq_topic="dlq",
        backoff=Backoff(),
        options=PipelineOptions(max_qps=10_000, max_inflight=4),
        clock=clock,
    )


def stats(*states: str) -> str:
    brokers = {f"127.0.0.1:{9092 + i}/{i}": {"nodeid": i, "state": st} for i, st in enumerate(states)}
    return orjson.dumps({"brokers": brokers, "topics": {}}).decode()


def test_brokers_up_reads_the_statistics() -> None:
    assert brokers_up({"brokers": {"b/1": {"state": "UP"}, "b/2": {"state": "DOWN"}}}) is True
    assert brokers_up({"brokers": {"b/1": {"state": "TRY_CONNECT"}, "b/2": {"state": "DOWN"}}}) is False
    assert brokers_up({"topics": {}}) is None
    assert brokers_up({"brokers": {}}) is None


def test_a_dropped_connection_does_not_make_the_service_unready() -> None:
    p = pipeline()
    p.on_error(KafkaError(KafkaError._TRANSPORT, "127.0.0.1:9092/1: Disconnected (after 600000ms in state UP)"))
    assert p.broker_ok, "librdkafka reconnects by itself; one idle disconnect is routine"


def test_all_brokers_down_then_statistics_show_one_up_again() -> None:
    p = pipeline()
    p.on_error(KafkaError(KafkaError._ALL_BROKERS_DOWN, "1/1 brokers are down"))
    assert not p.broker_ok
    p.on_stats(stats("DOWN"))
    assert not p.broker_ok
    p.on_stats(stats("CONNECT", "UP"))
    assert p.broker_ok, "readiness comes back without another error event"


# -- bisection, with the uploader and the DLQ producer as in-process stand-ins (tests/integration/test_failures.py
#    runs the same paths against the sandbox and the real broker) ------------------------------------------------


class Msg:
    """The part of confluent_kafka.Message the pipeline reads."""

    def __init__(self, offset: int, key: bytes, value: bytes) -> None:
        self._offset, self._key, self._value = offset, key, value

    def error(self) -> None:
        return None

    def topic(self) -> str:
        return "src"

    def partition(self) -> int:
        return 0

    def offset(self) -> int:
        return self._offset

    def key(self) -> bytes:
        return self._key

    def value(self) -> bytes:
        return self._value

    def headers(self) -> None:
        return None

    def timestamp(self) -> tuple[int, int]:
        return (1, 1_700_000_000_000)


class Uploader:
    """Refuses a request (`refusal`) when it carries a bad hash or more rows than `max_rows`."""

    def __init__(self, bad: set[str], refusal: int, max_rows: int = 10_000) -> None:
        self.bad, self.refusal, self.max_rows = bad, refusal, max_rows
        self.requests: list[int] = []
        self.accepted: set[str] = set()

    async def post_mapping(self, body: bytes) -> Answer:
        doc = orjson.loads(body)
        hashes = {cell["id"] for row in doc["batch_data"] for cell in row if cell}
        self.requests.append(len(hashes))
        if hashes & self.bad or len(doc["batch_data"]) > self.max_rows:
            return Answer(classify(200, self.refusal), 200, self.refusal, "refused", request_id="r1")
        self.accepted |= hashes
        return Answer(Verdict.SUCCESS, 200, 0, "OK", request_id="r0")


class Dlq:
    max_message_bytes = 1_000_000

    def __init__(self) -> None:
        self.letters: list[tuple[bytes | None, dict[str, bytes]]] = []

    async def send(
        self, topic: str, *, key: bytes | None, value: bytes | None, headers: Any, timestamp_ms: Any
    ) -> None:
        self.letters.append((key, {k: v for k, v in headers}))


async def run_batch(uploader: Uploader, n: int, max_rows: int = 1000) -> tuple[Pipeline, Dlq, list[SampleEvent]]:
    events = unique_events(n, AUD_A, "user")
    dlq = Dlq()
    p = pipeline(uploader=uploader, dlq=dlq, max_rows=max_rows)
    p.ledger.assign([TopicPartition("src", 0)])
    await p.intake.process([Msg(i, e.key, e.value) for i, e in enumerate(events)])  # type: ignore[list-item]
    p.uploads.force = 1  # flush every buffer now
    p.uploads.dispatch()
    while p._tasks or p.uploads._tasks:
        await asyncio.gather(*list(p._tasks), *list(p.uploads._tasks))
    return p, dlq, events


def email_hash(e: SampleEvent) -> str:
    return e.user.expected_hashes()["EMAIL_SHA256"]


async def test_a_refused_batch_is_bisected_down_to_the_offending_rows() -> None:
    events = unique_events(64, AUD_A, "user")
    bad = {email_hash(events[i]) for i in (5, 40, 41)}
    uploader = Uploader(bad, 40002)
    p, dlq, events = await run_batch(uploader, 64)
    assert sorted(k for k, _ in dlq.letters) == sorted(events[i].key for i in (5, 40, 41))
    assert all(h["dlq.reason"] == b"tiktok_rejected" and h["dlq.tiktok.code"] == b"40002" for _, h in dlq.letters)
    assert uploader.accepted == {email_hash(e) for e in events} - bad, "every other row uploaded"
    # 3 bad rows among 64: at most 2 requests per level per bad row, over log2(64) = 6 levels, plus the first.
    assert len(uploader.requests) <= 1 + 2 * 3 * 6, uploader.requests
    assert p.ledger.pending() == 0, "every record reached a final outcome"


async def test_batch_too_large_is_split_and_nothing_is_dead_lettered() -> None:
    uploader = Uploader(set(), 40061, max_rows=10)
    p, dlq, events = await run_batch(uploader, 50)
    assert dlq.letters == []
    assert uploader.accepted == {email_hash(e) for e in events}
    assert max(n for n in uploader.requests[-4:]) <= 10
    assert p.ledger.pending() == 0


async def test_a_single_refused_row_is_dead_lettered_once() -> None:
    events = unique_events(1, AUD_A, "user")
    uploader = Uploader({email_hash(events[0])}, 40011)
    p, dlq, _ = await run_batch(uploader, 1)
    assert p.ledger.pending() == 0
    assert [k for k, _ in dlq.letters] == [events[0].key]
    assert uploader.requests == [1], "one row refused: no bisection, no retry"
