"""Dead-letter producer: the sync confluent `Producer` (the asyncio one cannot send headers), with delivery
reports turned into awaitable futures, so an offset is stored only after the broker acknowledged its letter."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Producer


class DeliveryError(Exception):
    pass


class AsyncProducer:
    def __init__(self, conf: dict[str, Any], loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._p = Producer(conf)
        self._loop = loop or asyncio.get_running_loop()
        self._stop = threading.Event()
        self._poller = threading.Thread(target=self._poll, name="dlq-producer-poll", daemon=True)
        self._poller.start()

    def _poll(self) -> None:
        while not self._stop.is_set():
            self._p.poll(0.1)

    async def send(
        self,
        topic: str,
        *,
        key: bytes | None,
        value: bytes | None,
        headers: list[tuple[str, bytes]] | None = None,
        timestamp_ms: int | None = None,
    ) -> None:
        """Produce and wait for the broker's ack; raises DeliveryError when the record was not written."""
        fut: asyncio.Future[None] = self._loop.create_future()
        loop = self._loop

        def on_delivery(err: KafkaError | None, _msg: Any) -> None:
            if err is None:
                loop.call_soon_threadsafe(_resolve, fut, None)
            else:
                loop.call_soon_threadsafe(_resolve, fut, DeliveryError(str(err)))

        kw: dict[str, Any] = {"key": key, "value": value, "headers": headers, "on_delivery": on_delivery}
        if timestamp_ms is not None and timestamp_ms > 0:
            kw["timestamp"] = timestamp_ms
        while True:
            try:
                self._p.produce(topic, **kw)
                break
            except BufferError:
                await asyncio.sleep(0.05)  # local queue full: the poller drains it
            except KafkaException as exc:
                raise DeliveryError(str(exc)) from exc
        await fut

    def close(self, timeout_s: float = 10.0) -> int:
        """Flush what is queued; returns how many records are still undelivered."""
        left = int(self._p.flush(timeout_s))
        self._stop.set()
        self._poller.join(timeout=2)
        return left


def _resolve(fut: asyncio.Future[None], exc: Exception | None) -> None:
    if fut.done():
        return
    if exc is None:
        fut.set_result(None)
    else:
        fut.set_exception(exc)
