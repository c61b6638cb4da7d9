"""Value types shared across the tree: where a record came from, and Kafka headers (one `Headers` type)."""

from __future__ import annotations

from typing import NamedTuple

Headers = list[tuple[str, bytes | None]]

# Builds a NamedTuple from a tuple of all its fields without its generated Python-level `__new__` (one frame less,
# about 0.2 µs): used only where one is made per record, e.g. `new_tuple(RecordRef, (topic, partition, offset))`.
new_tuple = tuple.__new__


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
