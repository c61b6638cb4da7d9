"""Shared by `dlq inspect` and `replay`: read the dead-letter topic to its end, and parse dead letters.

End of topic comes from the high watermark carried by *fetch* responses, surfaced by librdkafka as a
`_PARTITION_EOF` event (`enable.partition.eof=true`). A fresh ListOffsets(latest) is never used: the test
broker (tansu) answers it wrongly when the last batch holds several records, and the fetch watermark is what
the consumer actually reached anyway. An idle timeout (no record and no EOF for that long) is the fallback for
brokers or partitions that never report EOF.

Nothing here prints a key or a value: dead letters carry personal data, only headers and counts leave.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NoReturn, cast

from confluent_kafka import OFFSET_BEGINNING, OFFSET_STORED, Consumer, KafkaError, KafkaException, Message
from confluent_kafka import TopicPartition as KTP

from service.config import ConfigError, Settings, consumer_config, load_settings
from service.core.dead_letters import header_value
from service.core.events import SEGMENT, Event, decode_event
from service.core.mappings import Mappings, MappingsError, load_mappings
from service.core.schemas import SchemaNotLoaded, SchemaStore

Headers = list[tuple[str, bytes | None]]
UNKNOWN = "unknown"
REPLAY_COUNT = "replay.count"
# Where a record first came from: kept across replays, because a record re-dead-lettered by `replay --mode
# process` gets `dlq.source.*` naming the DLQ itself (the pipeline consumed it there).
ORIGIN_TOPIC = "replay.origin.topic"
ORIGIN_PARTITION = "replay.origin.partition"
ORIGIN_OFFSET = "replay.origin.offset"

_EMAIL = re.compile(r"[^\s@\"'<>]+@[^\s@\"'<>]+\.[A-Za-z]{2,}")
_PHONE = re.compile(r"\+\d[\d \-().]{7,}\d|\(\d{3}\)\s?\d{3}[-\s]\d{4}")


def headers_of(msg: Message) -> Headers | None:
    """Consumed headers are always a list of (str, bytes | None); the stubs allow more shapes."""
    return cast(Headers | None, msg.headers())


def fail(prog: str, message: str) -> int:
    """One clear line on stderr, exit status 2 (bad arguments or configuration)."""
    print(f"{prog}: {message}", file=sys.stderr)
    return 2


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a mistake is one line on stderr (exit 2), not usage plus message."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def tool_settings(environ: Mapping[str, str], *, need_token: bool) -> Settings:
    """Settings for an operator tool. Tools that never call TikTok must not demand a token, so a placeholder
    satisfies the token rule for them (it is never sent anywhere); every other rule still applies."""
    env = dict(environ)
    if not need_token and not env.get("TIKTOK_ACCESS_TOKEN") and not env.get("TIKTOK_ACCESS_TOKEN_FILE"):
        env["TIKTOK_ACCESS_TOKEN"] = "unused-by-this-command"
    return load_settings(env)


def load_current_mappings(settings: Settings) -> Mappings:
    if settings.mappings_file is None:
        return Mappings.empty()
    try:
        return load_mappings(settings.mappings_file)
    except MappingsError as exc:
        raise ConfigError(f"MAPPINGS_FILE: {exc}") from None


def scrub(text: str) -> str:
    """Belt and braces for `dlq.error` texts from other producers: mask anything shaped like an email or
    phone number before it reaches a terminal (our own texts never carry identifiers)."""
    return _PHONE.sub("[phone]", _EMAIL.sub("[email]", text))


def parse_time(text: str | None) -> datetime | None:
    """ISO-8601 (a trailing Z allowed); naive times are UTC."""
    if not text:
        return None
    try:
        dt = datetime.fromisoformat(text.strip())
    except ValueError:
        return None
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)


def _int(text: str | None, default: int) -> int:
    try:
        return int(text) if text is not None else default
    except ValueError:
        return default


@dataclass(frozen=True, slots=True)
class DeadLetterInfo:
    """The headers of one dead letter, parsed; key and value stay on the message (never printed)."""

    partition: int
    offset: int
    reason: str
    error: str
    source_topic: str | None
    source_partition: int | None
    failed_at: datetime | None
    attempts: int
    replay_count: int
    origin_topic: str | None
    origin_partition: int | None

    @classmethod
    def of(cls, msg: Message) -> DeadLetterInfo:
        h = headers_of(msg)
        src_partition = header_value(h, "dlq.source.partition")
        origin_partition = header_value(h, ORIGIN_PARTITION)
        return cls(
            partition=msg.partition() or 0,
            offset=msg.offset() or 0,
            reason=header_value(h, "dlq.reason") or UNKNOWN,
            error=header_value(h, "dlq.error") or "",
            source_topic=header_value(h, "dlq.source.topic"),
            source_partition=_int(src_partition, -1) if src_partition is not None else None,
            failed_at=parse_time(header_value(h, "dlq.failed_at")),
            attempts=_int(header_value(h, "dlq.attempts"), 0),
            replay_count=max(0, _int(header_value(h, REPLAY_COUNT), 0)),
            origin_topic=header_value(h, ORIGIN_TOPIC),
            origin_partition=_int(origin_partition, -1) if origin_partition is not None else None,
        )

    @property
    def home_topic(self) -> str | None:
        """The topic the record was first consumed from."""
        return self.origin_topic or self.source_topic

    @property
    def home_partition(self) -> int | None:
        return self.origin_partition if self.origin_topic else self.source_partition


class FactFinder:
    """Best-effort audience key and advertiser of a dead letter's original value, through the project's decoder.

    Only these two operator-chosen names leave; identifiers are never read out. The advertiser falls back to the
    current mappings file and DEFAULT_ADVERTISER_ID, as resolution would.
    """

    def __init__(self, mappings: Mappings, default_advertiser: str | None) -> None:
        self.mappings = mappings
        self.default_advertiser = default_advertiser
        self.schemas = SchemaStore()

    def facts(self, value: bytes | None, headers: Headers | None) -> tuple[str, str]:
        try:
            decoded = decode_event(value, headers, self.schemas)
        except SchemaNotLoaded:
            return UNKNOWN, UNKNOWN
        except Exception:
            return UNKNOWN, UNKNOWN
        if not isinstance(decoded, Event):
            return UNKNOWN, UNKNOWN
        key, adv = _segment_facts(decoded.data) if decoded.format == SEGMENT else _canonical_facts(decoded.data)
        if adv is None and key is not None:
            entry = self.mappings.get(key)
            adv = entry.advertiser_id if entry is not None else None
        return key or UNKNOWN, adv or self.default_advertiser or UNKNOWN


def _name(value: object) -> str | None:
    if isinstance(value, str) and value.strip():
        return value.strip()[:120]
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return str(value)
    return None


def _dict(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _segment_facts(ev: dict[str, Any]) -> tuple[str | None, str | None]:
    context = _dict(ev.get("context"))
    personas = _dict(context.get("personas"))
    bag = _dict(ev.get("traits") if ev.get("type") == "identify" else ev.get("properties"))
    key = _name(personas.get("computation_key")) or _name(bag.get("audience_key"))
    adv = _name(bag.get("advertiser_id")) or _name(_dict(personas.get("audience_settings")).get("advertiserId"))
    return key, adv


def _canonical_facts(ev: dict[str, Any]) -> tuple[str | None, str | None]:
    return _name(ev.get("audience_key")), _name(ev.get("advertiser_id"))


# -- reading ------------------------------------------------------------------------------------------------


def reader_config(settings: Settings, environ: Mapping[str, str], group: str | None) -> dict[str, Any]:
    """Consumer settings for a tool: KAFKA_* passthrough kept, never auto-committing, EOF events on.

    `group=None` means a throwaway group id: with `assign()` and no commit, the group is never created.
    """
    conf: dict[str, Any] = dict(consumer_config(settings, environ))
    conf["group.id"] = group or f"audience-sync-inspect-{uuid.uuid4().hex[:12]}"
    conf.update({"enable.auto.commit": False, "enable.auto.offset.store": False, "enable.partition.eof": True})
    conf.pop("partition.assignment.strategy", None)  # unused with assign()
    return conf


def partitions_of(consumer: Consumer, topic: str, timeout_s: float = 10.0) -> list[int]:
    """The topic's partitions; ConfigError (one line) when the topic does not exist or the broker is down."""
    try:
        meta = consumer.list_topics(topic, timeout=timeout_s)
    except KafkaException as exc:
        raise ConfigError(f"KAFKA_BOOTSTRAP_SERVERS: cannot read metadata of topic {topic!r}: {exc}") from None
    t = meta.topics.get(topic)
    if t is None or t.error is not None or not t.partitions:
        why = t.error.str() if t is not None and t.error is not None else "no partitions"
        raise ConfigError(f"topic {topic!r} not found on the broker ({why}); check DLQ_TOPIC / --topic")
    return sorted(t.partitions)


class TopicReader:
    """Reads every partition of one topic up to the end seen by the first EOF, without joining a group.

    `from_committed=True` starts at the group's committed offsets (replay resumes there), else at the
    beginning. `hold(partition)` stops a partition where a record must not be handled in this run; the
    caller commits nothing past that record.
    """

    def __init__(self, conf: dict[str, Any], topic: str, *, from_committed: bool, idle_timeout_s: float) -> None:
        self.topic = topic
        self.idle_timeout_s = idle_timeout_s
        self.consumer = Consumer(conf)
        try:
            self.partitions = partitions_of(self.consumer, topic)
        except Exception:
            self.consumer.close()
            raise
        start = OFFSET_STORED if from_committed else OFFSET_BEGINNING
        self.consumer.assign([KTP(topic, p, start) for p in self.partitions])
        self.finished: set[int] = set()

    def hold(self, partition: int) -> None:
        self.consumer.pause([KTP(self.topic, partition)])
        self.finished.add(partition)

    def messages(self, batch: int = 500, should_stop: Callable[[], bool] = lambda: False) -> Iterator[list[Message]]:
        """Batches of records until every partition reached its end or was held, or nothing came for a while."""
        last = time.monotonic()
        while len(self.finished) < len(self.partitions) and not should_stop():
            got = self.consumer.consume(batch, 0.5)
            out: list[Message] = []
            for msg in got:
                err = msg.error()
                if err is None:
                    if (msg.partition() or 0) not in self.finished:
                        out.append(msg)
                elif err.code() == KafkaError._PARTITION_EOF:
                    self.finished.add(msg.partition() or 0)
                elif err.fatal() or err.code() in (KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._UNKNOWN_TOPIC):
                    raise KafkaException(err)
            if got:
                last = time.monotonic()
            elif time.monotonic() - last >= self.idle_timeout_s:
                return
            if out:
                yield out

    def commit(self, offsets: dict[int, int]) -> None:
        """Synchronously commit next-to-read offsets for the consumer's group."""
        if offsets:
            kt = [KTP(self.topic, p, o) for p, o in offsets.items()]
            self.consumer.commit(offsets=kt, asynchronous=False)

    def close(self) -> None:
        self.consumer.close()
