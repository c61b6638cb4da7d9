"""Pipeline state that is not a data path: broker readiness from librdkafka errors and statistics."""

from __future__ import annotations

from typing import Any, cast

import orjson
from confluent_kafka import KafkaError

from service.batcher import Batcher
from service.mappings import Mappings
from service.membership import Resolver, ResolverSettings
from service.pipeline import Pipeline, PipelineOptions, brokers_up
from service.retry import Backoff
from service.schemas import SchemaStore


def pipeline() -> Pipeline:
    clock = lambda: 0.0  # noqa: E731
    return Pipeline(
        resolver=Resolver(ResolverSettings(), Mappings({}), SchemaStore()),
        batcher=Batcher(clock=clock),
        uploader=cast(Any, None),  # not reached: no data flows in these tests
        dlq=cast(Any, None),
        dlq_topic="dlq",
        backoff=Backoff(),
        options=PipelineOptions(),
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
