"""Dead-letter producer: the sync confluent `Producer` (the asyncio one cannot send headers), with delivery
reports turned into awaitable futures, so an offset is stored only after the broker acknowledged its letter."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Producer

from service.core.types import Headers

# librdkafka's default message.max.bytes: the most key + value + headers one record may carry.
DEFAULT_MAX_MESSAGE_BYTES = 1_000_000

# Error codes that sending the same record again cannot cure: the record itself (or the request) is refused.
# librdkafka flags few errors as retriable (none in delivery reports), so an unflagged code counts as
# retriable unless listed here: a dead letter must not be given up on for a transient broker problem.
_PERMANENT = frozenset(
    {
        KafkaError.MSG_SIZE_TOO_LARGE,
        KafkaError.INVALID_RECORD,
        KafkaError._INVALID_ARG,
        KafkaError._FATAL,
    }
)


class DeliveryError(Exception):
    """The record was not written.

    `retriable`: sending the same record again may succeed (a broker or network problem); False when the
    record itself was refused or the producer hit a fatal error (then it never will). `code` is librdkafka's
    error code (`KafkaError.code()`), None when unknown.
    """

    def __init__(self, message: str, *, code: int | None = None, retriable: bool = True) -> None:
        super().__init__(message)
        self.code = code
        self.retriable = retriable


class LetterTooLarge(DeliveryError):
    """librdkafka refused the record as too large (MSG_SIZE_TOO_LARGE), locally at `produce()` against the
    producer's message.max.bytes, or in the delivery report against the topic's max.message.bytes. Never
    retriable as is: shrink the record (`service.core.dead_letters.fit_dead_letter`) and send that.

    `size`: the record's key + value + headers in bytes (`record_size`); `limit`: the producer's
    message.max.bytes (a broker-side refusal can come with `size` well below `limit`).
    """

    def __init__(self, message: str, *, size: int, limit: int) -> None:
        super().__init__(message, code=KafkaError.MSG_SIZE_TOO_LARGE, retriable=False)
        self.size = size
        self.limit = limit


def record_size(key: bytes | None, value: bytes | None, headers: Headers | None) -> int:
    """Key + value + header names and values in bytes. librdkafka refuses a record when this, plus the length
    prefixes of its headers and a per-record overhead (36 bytes in librdkafka 2.x), exceeds message.max.bytes:
    `service.core.dead_letters.fit_dead_letter` keeps a margin for that."""
    return len(key or b"") + len(value or b"") + sum(len(k.encode("utf-8")) + len(v or b"") for k, v in headers or ())


def delivery_error(err: KafkaError, *, size: int, limit: int) -> DeliveryError:
    """The `DeliveryError` for librdkafka's `err`: `LetterTooLarge` for MSG_SIZE_TOO_LARGE; `retriable` from
    `err.fatal()` / `err.retriable()` where librdkafka sets them, else from the error code."""
    code = err.code()
    text = str(err)
    if code == KafkaError.MSG_SIZE_TOO_LARGE:
        return LetterTooLarge(
            f"{text} (record {size} bytes, producer message.max.bytes {limit})", size=size, limit=limit
        )
    retriable = not err.fatal() and (err.retriable() or code not in _PERMANENT)
    return DeliveryError(text, code=code, retriable=retriable)


def max_message_bytes(conf: dict[str, Any]) -> int:
    """The producer's message.max.bytes from its configuration (values may be strings), else librdkafka's
    default."""
    raw = conf.get("message.max.bytes")
    return DEFAULT_MAX_MESSAGE_BYTES if raw is None or raw == "" else int(raw)


class AsyncProducer:
    def __init__(self, conf: dict[str, Any], loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._p = Producer(conf)
        self._max_message_bytes = max_message_bytes(conf)
        self._loop = loop or asyncio.get_running_loop()
        self._stop = threading.Event()
        self._poller = threading.Thread(target=self._poll, name="dlq-producer-poll", daemon=True)
        self._poller.start()

    @property
    def max_message_bytes(self) -> int:
        """The most key + value + headers (bytes) one record may carry: the producer's message.max.bytes."""
        return self._max_message_bytes

    def _poll(self) -> None:
        while not self._stop.is_set():
            self._p.poll(0.1)

    async def send(
        self,
        topic: str,
        *,
        key: bytes | None,
        value: bytes | None,
        headers: Headers | None = None,
        timestamp_ms: int | None = None,
    ) -> None:
        """Produce and wait for the broker's ack; raises DeliveryError when the record was not written:
        `LetterTooLarge` (never `retriable`) when it is refused as too large, at once or in its delivery report.
        """
        fut: asyncio.Future[None] = self._loop.create_future()
        loop = self._loop
        size = record_size(key, value, headers)
        limit = self._max_message_bytes

        def on_delivery(err: KafkaError | None, _msg: Any) -> None:
            if err is None:
                loop.call_soon_threadsafe(_resolve, fut, None)
            else:
                loop.call_soon_threadsafe(_resolve, fut, delivery_error(err, size=size, limit=limit))

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
                err = exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None
                if err is None:
                    raise DeliveryError(str(exc)) from exc
                raise delivery_error(err, size=size, limit=limit) from exc
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
