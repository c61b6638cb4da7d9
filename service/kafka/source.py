"""What the pipeline needs from a Kafka consumer, as protocols: the seam between intake logic and librdkafka.

The pipeline only ever calls the handful of operations below. Naming them as a `Protocol` lets the same pipeline
code run against two implementations that honour one contract (tests/kafka/test_source_contract.py runs the same
behaviour tests against both):

- `service.kafka.consumer` — confluent-kafka's `Consumer` on a dedicated thread, for production and for the
  integration tests on the local broker (tansu);
- `service.kafka.memory.InMemoryConsumer` — a deterministic in-process broker and group member, so the whole
  pipeline (rebalances, pauses, crashes and all) can be driven in-process, fast and without timing luck.

The protocols are structural: confluent's `Message` and `KafkaError` satisfy `SourceMessage` and `SourceError`
as they are (checked by mypy below), so nothing has to be wrapped on the hot path.
"""

from __future__ import annotations

import builtins
from collections.abc import Awaitable, Callable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from service.core.types import TopicPartition

__all__ = [
    "AssignHook",
    "LostHook",
    "RevokeHook",
    "SourceConsumer",
    "SourceError",
    "SourceHeaders",
    "SourceMessage",
]

# Rebalance hooks. They are coroutines because the pipeline's answers need the event loop (flush batches, wait
# for in-flight uploads, compute watermarks); implementations call them from inside `consume()`, the way
# librdkafka fires rebalance callbacks from inside poll, and act on the answer before returning.

AssignHook = Callable[[list[TopicPartition]], Awaitable[list[TopicPartition]]]
"""Partitions were just added to the assignment; returns the subset to pause before any of their records is
delivered (e.g. partitions over the pending-records budget)."""

RevokeHook = Callable[[list[TopicPartition]], Awaitable[dict[TopicPartition, int]]]
"""Partitions are about to be taken away in an orderly rebalance (or at `close()`); they are still assigned while
the hook runs. Returns the offsets (next to read) to commit for them; the consumer commits exactly those before
giving the partitions up, so the next owner resumes where this one finished."""

LostHook = Callable[[list[TopicPartition]], Awaitable[None]]
"""Partitions were lost without a rebalance (session timeout, fenced member): another member may already own
them, so nothing is committed for them and work in flight for them must be abandoned, not finished."""

SourceHeaders = Sequence[tuple[str, str | bytes | None]] | Mapping[str, str | bytes | None]
"""Header shapes allowed by confluent's stubs. Consumed headers are in practice always a list of
`(str, bytes | None)` (see `service.kafka.dlq_reader.headers_of`); the wider, covariant type is what lets
confluent's `Message` satisfy `SourceMessage` without a cast."""


class SourceError(Protocol):
    """The part of `confluent_kafka.KafkaError` the pipeline reads on consumed events (e.g. `_PARTITION_EOF`)."""

    def code(self) -> int: ...

    def name(self) -> builtins.str: ...

    def fatal(self) -> bool: ...

    def retriable(self) -> bool: ...

    def str(self) -> builtins.str: ...


@runtime_checkable
class SourceMessage(Protocol):
    """One consumed event: a record, or an error event when `error()` is not None.

    The subset of `confluent_kafka.Message` the pipeline reads. For records, `topic()`, `partition()` and
    `offset()` are never None; for error events (e.g. partition EOF) they may be. `timestamp()` is
    `(timestamp type, milliseconds since the epoch)`, the type being one of confluent's `TIMESTAMP_*` constants
    (`TIMESTAMP_NOT_AVAILABLE` = 0, `TIMESTAMP_CREATE_TIME` = 1, `TIMESTAMP_LOG_APPEND_TIME` = 2).
    """

    def topic(self) -> str | None: ...

    def partition(self) -> int | None: ...

    def offset(self) -> int | None: ...

    def key(self) -> bytes | None: ...

    def value(self) -> bytes | None: ...

    def headers(self) -> SourceHeaders | None: ...

    def timestamp(self) -> tuple[int, int]: ...

    def error(self) -> SourceError | None: ...


@runtime_checkable
class SourceConsumer(Protocol):
    """One member of a consumer group subscribed to the source topics, as the pipeline drives it.

    Contract shared by every implementation (and tested once for all, tests/kafka/test_source_contract.py):

    - Assignment changes happen only inside `consume()`: the assign/revoke/lost hooks given at construction run
      there, before `consume()` returns, and before any record of a newly assigned partition is delivered.
    - A partition's records are delivered in offset order, each once per assignment, unless `seek()` moves the
      position. A partition newly assigned starts at the group's committed offset, else at the beginning
      (`auto.offset.reset=earliest`).
    - `store()` only records offsets; `commit()` (or the revoke hook's answer, or auto-commit where the
      implementation has it) makes them the group's committed offsets. Nothing else moves committed offsets:
      consuming, seeking, pausing and crashing never do.
    - Offsets are always "next offset to read" (last finished + 1), as Kafka commits them.
    """

    @property
    def assigned(self) -> AbstractSet[TopicPartition]:
        """Partitions currently assigned to this member (live view; read it, do not modify it)."""
        ...

    async def start(self) -> None:
        """Join the group and subscribe; partitions arrive later, through `consume()` and the assign hook."""
        ...

    async def consume(self, max_messages: int, timeout_s: float) -> Sequence[SourceMessage]:
        """Up to `max_messages` events, waiting at most about `timeout_s` when none is ready.

        A `Sequence`, not a `list`: `list` is invariant, and confluent's `list[Message]` must fit."""
        ...

    def store(self, offsets: dict[TopicPartition, int]) -> None:
        """Remember offsets (next to read) to commit later; partitions not assigned are ignored. Non-blocking."""
        ...

    async def commit(self) -> None:
        """Commit the stored offsets of assigned partitions now, synchronously (used when draining)."""
        ...

    def pause(self, tps: Sequence[TopicPartition]) -> None:
        """Stop delivering records of these assigned partitions (their position is kept). Non-blocking."""
        ...

    def resume(self, tps: Sequence[TopicPartition]) -> None:
        """Deliver records of these paused partitions again, from where they stopped. Non-blocking."""
        ...

    async def seek(self, tp: TopicPartition, offset: int) -> None:
        """Make `offset` the next record delivered from assigned partition `tp` (used to rewind)."""
        ...

    async def close(self) -> None:
        """Leave the group: the revoke hook runs for every assigned partition and its answer is committed."""
        ...


if TYPE_CHECKING:  # mypy proves that confluent's own types and the real consumer satisfy the protocols
    from confluent_kafka import KafkaError, Message

    from service.kafka.consumer import KafkaSourceConsumer

    def _message_conforms(m: Message) -> SourceMessage:
        return m

    def _error_conforms(e: KafkaError) -> SourceError:
        return e

    def _consumer_conforms(c: KafkaSourceConsumer) -> SourceConsumer:
        return c
