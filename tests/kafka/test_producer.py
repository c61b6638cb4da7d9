"""The dead-letter producer: a record too large for message.max.bytes fails at once as `LetterTooLarge` (never
retriable), and the letter fitted to the producer's limit goes through (defect 9)."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import pytest
from confluent_kafka import KafkaError

from service.core.dead_letters import LETTER_MARGIN, fit_dead_letter, header_value, letter_size
from service.devtools.broker import LocalBroker, free_port
from service.kafka.producer import (
    DEFAULT_MAX_MESSAGE_BYTES,
    AsyncProducer,
    DeliveryError,
    LetterTooLarge,
    delivery_error,
    max_message_bytes,
    record_size,
)
from tests.conftest import read_all

LIMIT = 10_000
HEADERS = [
    ("traceparent", b"00-abc-01"),
    ("dlq.reason", b"invalid_payload"),
    ("dlq.error", b"field audience_key: missing"),
    ("dlq.source.topic", b"audience"),
    ("dlq.source.partition", b"3"),
    ("dlq.source.offset", b"42"),
]


def _producer(broker: LocalBroker) -> AsyncProducer:
    # As producer_config builds it for the service, with a small message.max.bytes.
    conf = {"bootstrap.servers": broker.bootstrap, "enable.idempotence": "true", "acks": "all"}
    return AsyncProducer({**conf, "message.max.bytes": str(LIMIT)})


def _topic(broker: LocalBroker) -> str:
    topic = f"letters-{uuid.uuid4().hex[:8]}.dlq"
    broker.create_topics({topic: 1})
    return topic


@pytest.mark.integration
@pytest.mark.parametrize(
    ("value", "headers", "omitted"),
    [
        (b"v" * 2 * LIMIT, HEADERS, ["dlq.value.omitted"]),
        (b"v" * 100, [("big", b"x" * 2 * LIMIT), *HEADERS], ["dlq.value.omitted", "dlq.headers.omitted"]),
    ],
    ids=["large value", "large headers"],
)
async def test_an_oversize_letter_fails_at_once_and_its_fitted_letter_goes_through(
    broker: LocalBroker, value: bytes, headers: list[tuple[str, bytes]], omitted: list[str]
) -> None:
    topic = _topic(broker)
    dlq = _producer(broker)
    try:
        assert dlq.max_message_bytes == LIMIT
        started = time.monotonic()
        with pytest.raises(LetterTooLarge) as info:
            await asyncio.wait_for(dlq.send(topic, key=b"user-1", value=value, headers=headers), 10)
        assert time.monotonic() - started < 1.0
        exc = info.value
        assert isinstance(exc, DeliveryError) and not exc.retriable
        assert exc.code == KafkaError.MSG_SIZE_TOO_LARGE
        assert exc.limit == LIMIT and exc.size == record_size(b"user-1", value, headers) > LIMIT
        assert "MSG_SIZE_TOO_LARGE" in str(exc) and f"message.max.bytes {LIMIT}" in str(exc)

        fitted = fit_dead_letter(b"user-1", value, headers, dlq.max_message_bytes)
        await asyncio.wait_for(dlq.send(topic, key=fitted.key, value=fitted.value, headers=fitted.headers), 30)
    finally:
        assert await asyncio.to_thread(dlq.close) == 0
    [msg] = read_all(broker, topic, 1)
    assert msg.key() == b"user-1" and msg.value() is None
    got = msg.headers()
    assert [k for k, _ in got if k.endswith(".omitted")] == omitted
    assert header_value(got, "dlq.value.omitted") == f"too_large:{len(value)}"
    for name in ("dlq.reason", "dlq.source.topic", "dlq.source.partition", "dlq.source.offset"):
        assert header_value(got, name) == header_value(HEADERS, name)


@pytest.mark.integration
async def test_the_fitting_budget_is_within_what_librdkafka_accepts(broker: LocalBroker) -> None:
    """librdkafka counts header length prefixes and a per-record overhead beyond key + value + headers: a
    letter as large as fit_dead_letter lets it be is still accepted; one byte above the limit is not."""
    topic = _topic(broker)
    dlq = _producer(broker)
    value = b"v" * (LIMIT - LETTER_MARGIN - letter_size(b"user-1", b"", HEADERS))
    assert fit_dead_letter(b"user-1", value, HEADERS, LIMIT).dropped == ()
    try:
        await asyncio.wait_for(dlq.send(topic, key=b"user-1", value=value, headers=HEADERS), 30)
        over = b"v" * (LIMIT + 1 - record_size(b"user-1", b"", HEADERS))
        with pytest.raises(LetterTooLarge):
            await dlq.send(topic, key=b"user-1", value=over, headers=HEADERS)
    finally:
        assert await asyncio.to_thread(dlq.close) == 0
    [msg] = read_all(broker, topic, 1)
    assert msg.value() == value


async def test_max_message_bytes_comes_from_the_config() -> None:
    assert max_message_bytes({}) == DEFAULT_MAX_MESSAGE_BYTES == 1_000_000
    assert max_message_bytes({"message.max.bytes": "20000"}) == 20_000
    assert max_message_bytes({"message.max.bytes": 5000}) == 5000
    dlq = AsyncProducer({"bootstrap.servers": f"127.0.0.1:{free_port()}", "log_level": 0})
    try:
        assert dlq.max_message_bytes == 1_000_000
    finally:
        dlq.close(0)


class _RefusingProducer:
    """Stands in for confluent's Producer: every record's delivery report carries `err`."""

    def __init__(self, err: KafkaError) -> None:
        self.err = err

    def produce(self, _topic: str, **kw: Any) -> None:
        kw["on_delivery"](self.err, None)

    def poll(self, timeout: float) -> int:
        time.sleep(timeout)
        return 0

    def flush(self, _timeout: float) -> int:
        return 0


async def _send_with_report(err: KafkaError) -> DeliveryError:
    dlq = AsyncProducer({"bootstrap.servers": f"127.0.0.1:{free_port()}", "log_level": 0})
    dlq._p = _RefusingProducer(err)  # type: ignore[assignment]
    try:
        with pytest.raises(DeliveryError) as info:
            await asyncio.wait_for(dlq.send("t", key=b"k", value=b"v" * 100, headers=HEADERS), 5)
    finally:
        dlq.close(0)
    return info.value


async def test_a_broker_refusal_in_the_delivery_report_is_letter_too_large() -> None:
    # A topic whose max.message.bytes is below the producer's refuses the record in its delivery report.
    exc = await _send_with_report(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE))
    assert isinstance(exc, LetterTooLarge) and not exc.retriable
    assert exc.size == record_size(b"k", b"v" * 100, HEADERS) and exc.limit == 1_000_000


async def test_a_transient_delivery_failure_stays_retriable() -> None:
    exc = await _send_with_report(KafkaError(KafkaError._MSG_TIMED_OUT))
    assert type(exc) is DeliveryError and exc.retriable and exc.code == KafkaError._MSG_TIMED_OUT


@pytest.mark.parametrize(
    ("err", "retriable"),
    [
        (KafkaError(KafkaError._MSG_TIMED_OUT), True),
        (KafkaError(KafkaError._TRANSPORT), True),
        (KafkaError(KafkaError.NOT_ENOUGH_REPLICAS, retriable=True), True),
        (KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED), True),  # an operator can grant it: keep trying
        (KafkaError(KafkaError.INVALID_RECORD), False),
        (KafkaError(KafkaError._INVALID_ARG), False),
        (KafkaError(KafkaError._FATAL, fatal=True), False),
        (KafkaError(KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER, fatal=True, retriable=True), False),
        (KafkaError(KafkaError.MSG_SIZE_TOO_LARGE), False),
    ],
)
def test_retriable_follows_librdkafka_then_the_code(err: KafkaError, retriable: bool) -> None:
    exc = delivery_error(err, size=1, limit=2)
    assert exc.retriable is retriable and exc.code == err.code()
    assert isinstance(exc, LetterTooLarge) is (err.code() == KafkaError.MSG_SIZE_TOO_LARGE)
