"""Value types shared across the tree: where a record came from, and Kafka headers (one `Headers` type)."""

from __future__ import annotations

from typing import NamedTuple

Headers = list[tuple[str, bytes | None]]


class TopicPartition(NamedTuple):
    topic: str
    partition: int


class RecordRef(NamedTuple):
    """Where a record came from: enough to finish it and to dead-letter it."""

    topic: str
    partition: int
    offset: int

    @property
    def tp(self) -> TopicPartition:
        return TopicPartition(self.topic, self.partition)
