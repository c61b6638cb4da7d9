"""The source consumer: confluent's sync `Consumer`, owned by one dedicated thread.

Every consumer call runs on that thread, so librdkafka is never entered concurrently. Rebalance callbacks fire
on it from inside `consume()`; they hand the asyncio side a coroutine (flush, compute offsets) and block until
it returns, then commit or pause directly on the consumer, never through the executor (that would deadlock).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from confluent_kafka import Consumer, KafkaException, Message
from confluent_kafka import TopicPartition as KTP

from service.core.types import TopicPartition

log = logging.getLogger(__name__)

AssignHook = Callable[[list[TopicPartition]], Awaitable[list[TopicPartition]]]
RevokeHook = Callable[[list[TopicPartition]], Awaitable[dict[TopicPartition, int]]]
LostHook = Callable[[list[TopicPartition]], Awaitable[None]]


class KafkaSourceConsumer:
    def __init__(
        self,
        conf: dict[str, Any],
        topics: Sequence[str],
        *,
        on_assign: AssignHook,
        on_revoke: RevokeHook,
        on_lost: LostHook,
        hook_timeout_s: float = 30.0,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kafka-consumer")
        self._conf = conf
        self._topics = list(topics)
        self._on_assign = on_assign
        self._on_revoke = on_revoke
        self._on_lost = on_lost
        self._hook_timeout = hook_timeout_s
        self._c: Consumer | None = None
        self.assigned: set[TopicPartition] = set()

    async def start(self) -> None:
        await self._run(self._start)

    def _start(self) -> None:
        self._c = Consumer(self._conf)
        self._c.subscribe(self._topics, on_assign=self._assign_cb, on_revoke=self._revoke_cb, on_lost=self._lost_cb)

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await self._loop.run_in_executor(self._executor, fn, *args)

    @property
    def _consumer(self) -> Consumer:
        assert self._c is not None, "start() first"
        return self._c

    # -- callbacks: consumer thread --------------------------------------------------------------------------

    def _bridge(self, coro: Awaitable[Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=self._hook_timeout)  # type: ignore[arg-type]

    def _assign_cb(self, consumer: Consumer, parts: list[KTP]) -> None:
        tps = [TopicPartition(p.topic, p.partition) for p in parts]
        consumer.incremental_assign(parts)
        self.assigned.update(tps)
        try:
            to_pause = self._bridge(self._on_assign(tps))
        except Exception:
            log.exception("assign hook failed")
            return
        if to_pause:
            consumer.pause([KTP(tp.topic, tp.partition) for tp in to_pause])

    def _revoke_cb(self, consumer: Consumer, parts: list[KTP]) -> None:
        tps = [TopicPartition(p.topic, p.partition) for p in parts]
        try:
            offsets: dict[TopicPartition, int] = self._bridge(self._on_revoke(tps))
        except Exception:
            log.exception("revoke hook failed; revoked partitions are left uncommitted")
            offsets = {}
        if offsets:
            try:
                kt = [KTP(tp.topic, tp.partition, off) for tp, off in offsets.items()]
                consumer.store_offsets(offsets=kt)
                consumer.commit(offsets=kt, asynchronous=False)
            except KafkaException as exc:
                log.warning("commit on revoke failed: %s", exc)
        self.assigned.difference_update(tps)

    def _lost_cb(self, consumer: Consumer, parts: list[KTP]) -> None:
        tps = [TopicPartition(p.topic, p.partition) for p in parts]
        self.assigned.difference_update(tps)
        try:
            self._bridge(self._on_lost(tps))
        except Exception:
            log.exception("lost hook failed")

    # -- operations: the asyncio side ------------------------------------------------------------------------

    async def consume(self, max_messages: int, timeout_s: float) -> list[Message]:
        msgs: list[Message] = await self._run(self._consumer.consume, max_messages, timeout_s)
        return msgs

    def store(self, offsets: dict[TopicPartition, int]) -> None:
        """Store offsets (next to read) of assigned partitions; auto-commit sends them to the broker.

        Called directly from the loop thread, not through the consumer thread: `rd_kafka_offsets_store` only
        updates local state and is thread-safe, and queueing it behind a blocking `consume()` would serialise
        intake with offset bookkeeping.
        """
        assigned = set(self.assigned)
        kt = [KTP(tp.topic, tp.partition, off) for tp, off in offsets.items() if tp in assigned]
        if kt:
            try:
                self._consumer.store_offsets(offsets=kt)
            except KafkaException as exc:
                log.warning("store_offsets failed: %s", exc)  # e.g. a partition revoked meanwhile

    async def commit(self) -> None:
        """Synchronously commit what is stored (used at shutdown)."""
        await self._run(self._commit)

    def _commit(self) -> None:
        try:
            self._consumer.commit(asynchronous=False)
        except KafkaException as exc:
            if exc.args and getattr(exc.args[0], "code", lambda: None)() != -168:  # _NO_OFFSET: nothing new
                log.warning("commit failed: %s", exc)

    def pause(self, tps: Sequence[TopicPartition]) -> None:
        """Thread-safe in librdkafka and non-blocking, so called from the loop thread (see `store`)."""
        self._pause_resume(True, list(tps))

    def resume(self, tps: Sequence[TopicPartition]) -> None:
        self._pause_resume(False, list(tps))

    def _pause_resume(self, pause: bool, tps: list[TopicPartition]) -> None:
        assigned = set(self.assigned)
        kt = [KTP(tp.topic, tp.partition) for tp in tps if tp in assigned]
        if not kt:
            return
        if pause:
            self._consumer.pause(kt)
        else:
            self._consumer.resume(kt)

    async def seek(self, tp: TopicPartition, offset: int) -> None:
        await self._run(self._consumer.seek, KTP(tp.topic, tp.partition, offset))

    async def close(self) -> None:
        if self._c is not None:
            await self._run(self._c.close)
        self._executor.shutdown(wait=False)
