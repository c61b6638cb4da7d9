"""Broker health and consumer lag, from librdkafka's statistics and error events (consumer thread)."""

from __future__ import annotations

import logging
from typing import Any

import orjson
from confluent_kafka import KafkaError

from service import metrics as m
from service.core.types import TopicPartition

log = logging.getLogger(__name__)


class BrokerHealth:
    """`ok` is False only while librdkafka reports every broker down; statistics bring it back.

    Lag series exist only for assigned partitions: `forget` removes them on revoke, so a partition that moved
    to another replica does not keep reporting its last lag from here.
    """

    def __init__(self) -> None:
        self.ok = True
        self._lag_series: set[TopicPartition] = set()

    def on_stats(self, stats_json: str) -> None:
        try:
            stats = orjson.loads(stats_json)
        except orjson.JSONDecodeError:
            return
        up = brokers_up(stats)
        if up is not None:
            self.ok = up  # librdkafka reports no event when brokers come back: statistics do
        for topic, t in (stats.get("topics") or {}).items():
            for pid, p in (t.get("partitions") or {}).items():
                if pid == "-1" or p.get("fetch_state") in ("none", "stopped"):
                    continue
                lag = p.get("consumer_lag_stored", p.get("consumer_lag", -1))
                if isinstance(lag, int) and lag >= 0:
                    m.CONSUMER_LAG.labels(topic, pid).set(lag)
                    self._lag_series.add(TopicPartition(topic, int(pid)))

    def on_error(self, err: KafkaError) -> None:
        """One broker's dropped connection is routine (librdkafka reconnects); only all brokers down is not ready."""
        if err.code() == KafkaError._ALL_BROKERS_DOWN:
            self.ok = False
        log.warning("kafka: %s", err)

    def fetched(self) -> None:
        self.ok = True  # a record was fetched: the broker is reachable

    def forget(self, tps: list[TopicPartition]) -> None:
        for tp in tps:
            if tp in self._lag_series:
                self._lag_series.discard(tp)
                m.CONSUMER_LAG.remove(tp.topic, str(tp.partition))


def brokers_up(stats: dict[str, Any]) -> bool | None:
    """From librdkafka statistics: is any broker connection UP? None when the statistics name no broker."""
    brokers = stats.get("brokers")
    if not isinstance(brokers, dict) or not brokers:
        return None
    return any(isinstance(b, dict) and b.get("state") == "UP" for b in brokers.values())
