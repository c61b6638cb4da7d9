"""Shared by `dlq inspect` and `replay`: read the dead-letter topic to its end, and parse dead letters; and, for
replay's check for newer events, read given source partitions from given offsets to their end.

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
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NoReturn, cast

from confluent_kafka import OFFSET_BEGINNING, OFFSET_STORED, Consumer, KafkaError, KafkaException, Message
from confluent_kafka import TopicPartition as KTP

from service.config import ConfigError, Settings, consumer_config, load_settings
from service.core.dead_letters import header_value
from service.core.events import SEGMENT, Event, decode_event
from service.core.mappings import Mappings, MappingsError, load_mappings
from service.core.schemas import SchemaNotLoaded, SchemaStore
from service.core.types import Headers

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


def _position(text: str | None) -> int | None:
    """A partition or offset header: a non-negative integer, else None (unknown)."""
    value = _int(text, -1)
    return value if value >= 0 else None


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
    source_offset: int | None = None
    origin_offset: int | None = None

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
            source_offset=_position(header_value(h, "dlq.source.offset")),
            origin_offset=_position(header_value(h, ORIGIN_OFFSET)),
        )

    @property
    def home_topic(self) -> str | None:
        """The topic the record was first consumed from."""
        return self.origin_topic or self.source_topic

    @property
    def home_partition(self) -> int | None:
        return self.origin_partition if self.origin_topic else self.source_partition

    @property
    def home_offset(self) -> int | None:
        """The offset of the original record in `home_topic` (replay's check for newer events reads from there)."""
        return self.origin_offset if self.origin_topic else self.source_offset


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

    Two different ways a partition is done, kept apart: `ended` (its EOF came: every record before it has been
    or is being yielded, and must be handled) and `held` (the caller stopped it: the records of the current batch
    from the held one on must not be handled). An EOF often arrives in the same consume() batch as the partition's
    last records, before the caller has seen them; the records ahead of it are still yielded, and a caller skips
    only the partitions in `held`, never those in `ended`.
    """

    def __init__(
        self, conf: dict[str, Any], topic: str, *, from_committed: bool, idle_timeout_s: float, poll_s: float = 0.5
    ) -> None:
        self.topic = topic
        self.idle_timeout_s = idle_timeout_s
        self.poll_s = poll_s  # one consume call waits this long unless a full batch is there
        self.consumer = Consumer(conf)
        try:
            self.partitions = partitions_of(self.consumer, topic)
        except Exception:
            self.consumer.close()
            raise
        start = OFFSET_STORED if from_committed else OFFSET_BEGINNING
        self.consumer.assign([KTP(topic, p, start) for p in self.partitions])
        self.ended: set[int] = set()
        self.held: set[int] = set()

    @property
    def finished(self) -> set[int]:
        """Partitions this reader yields nothing more of: at their end, or held."""
        return self.ended | self.held

    def hold(self, partition: int) -> None:
        if partition not in self.held:
            self.consumer.pause([KTP(self.topic, partition)])
            self.held.add(partition)

    def messages(self, batch: int = 500, should_stop: Callable[[], bool] = lambda: False) -> Iterator[list[Message]]:
        """Batches of records until every partition reached its end or was held, or nothing came for a while.

        A batch holds every record consumed before its partition's EOF, even when that EOF came in the same
        consume() call; records after it (traffic written since) are left for the next run."""
        last = time.monotonic()
        while len(self.finished) < len(self.partitions) and not should_stop():
            got = self.consumer.consume(batch, self.poll_s)
            out: list[Message] = []
            for msg in got:
                err = msg.error()
                if err is None:
                    if (msg.partition() or 0) not in self.finished:
                        out.append(msg)
                elif err.code() == KafkaError._PARTITION_EOF:
                    self.ended.add(msg.partition() or 0)
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


@dataclass(slots=True)
class PartitionRead:
    """How far `PartitionReader` got in one partition."""

    end: int | None = None  # the end offset reported by the partition's first EOF: every record before it was read
    first: int | None = None  # when the start offset was gone (retention): the first offset that was still there
    problem: str | None = None  # why the partition could not be read to its end
    restarted: bool = field(default=False, repr=False)


class PartitionReader:
    """Reads chosen partitions from chosen offsets up to the end reported by each one's first EOF; no group.

    The end comes from fetch responses (`_PARTITION_EOF`), as for `TopicReader`. A partition that cannot be read
    to its end gets a `problem` instead, never silence: its topic or the partition does not exist, the broker
    reported an error for it, or no EOF came within the idle timeout (tansu, for one, answers a fetch below the
    log start or past the end with nothing at all). A start offset that is no longer there (real Kafka answers
    OFFSET_OUT_OF_RANGE; `auto.offset.reset=error` surfaces it) restarts the partition at its beginning and
    records the first offset still there in `first`. `consumer` is for tests (anything with confluent's
    `Consumer` methods used here).
    """

    def __init__(
        self,
        conf: dict[str, Any],
        starts: Mapping[tuple[str, int], int],
        *,
        idle_timeout_s: float,
        consumer: Any = None,
        metadata_timeout_s: float = 10.0,
        poll_s: float = 0.1,
    ) -> None:
        self.idle_timeout_s = idle_timeout_s
        self.poll_s = poll_s
        self.state: dict[tuple[str, int], PartitionRead] = {tp: PartitionRead() for tp in starts}
        # A short fetch wait: the end is known when a fetch at the end comes back empty (KAFKA_* can override it).
        conf = {"fetch.wait.max.ms": 100, **conf, "auto.offset.reset": "error"}
        self.consumer: Any = consumer or Consumer(conf)
        assign: list[KTP] = []
        try:
            for topic in sorted({t for t, _ in starts}):
                present = self._partitions(topic, metadata_timeout_s)
                for (t, p), offset in sorted(starts.items()):
                    if t != topic:
                        continue
                    if isinstance(present, str):
                        self.state[(t, p)].problem = present
                    elif p not in present:
                        self.state[(t, p)].problem = f"partition {p} of topic {t} not found"
                    else:
                        assign.append(KTP(t, p, offset))
            if assign:
                self.consumer.assign(assign)
        except Exception:
            self.consumer.close()
            raise

    def _partitions(self, topic: str, timeout_s: float) -> set[int] | str:
        """The topic's partitions, or why there are none."""
        try:
            meta = self.consumer.list_topics(topic, timeout=timeout_s)
        except KafkaException as exc:
            return f"cannot read metadata of topic {topic}: {exc}"
        t = meta.topics.get(topic)
        if t is None or t.error is not None or not t.partitions:
            return f"topic {topic} not found"
        return set(t.partitions)

    def _open(self) -> set[tuple[str, int]]:
        return {tp for tp, st in self.state.items() if st.end is None and st.problem is None}

    def messages(self, batch: int = 500, should_stop: Callable[[], bool] = lambda: False) -> Iterator[list[Message]]:
        """Batches of records until every partition reached its end or has a problem (or `should_stop`)."""
        last = time.monotonic()
        while self._open() and not should_stop():
            got = self.consumer.consume(batch, self.poll_s)
            out: list[Message] = []
            for msg in got:
                tp = (msg.topic() or "", msg.partition())
                err = msg.error()
                if err is None:
                    st = self.state.get(tp)
                    if st is None or st.end is not None or st.problem is not None:
                        continue  # past the end seen first (live traffic), or a partition given up
                    if st.restarted and st.first is None:
                        st.first = msg.offset()
                    out.append(msg)
                    continue
                if err.fatal():
                    raise KafkaException(err)
                for each in self._affected(tp):
                    self._error(each, err, msg.offset())
            if got:
                last = time.monotonic()
            elif time.monotonic() - last >= self.idle_timeout_s:
                for tp in self._open():
                    self.state[tp].problem = (
                        f"partition {tp[1]} of topic {tp[0]}: no end of partition reported within "
                        f"{self.idle_timeout_s:g}s (offset out of range?)"
                    )
                return
            if out:
                yield out

    def _affected(self, tp: tuple[str, int | None]) -> list[tuple[str, int]]:
        """The partitions an error event is about: one, or every open one of its topic (topic-level errors)."""
        if tp[1] is not None and tp[1] >= 0:
            return [(tp[0], tp[1])] if (tp[0], tp[1]) in self.state else []
        return [t for t in self._open() if t[0] == tp[0] or not tp[0]]

    def _error(self, tp: tuple[str, int], err: KafkaError, offset: int | None) -> None:
        st = self.state[tp]
        if st.end is not None or st.problem is not None:
            return
        code = err.code()
        where = f"partition {tp[1]} of topic {tp[0]}"
        if code == KafkaError._PARTITION_EOF:
            if offset is None or offset < 0:
                st.problem = f"{where}: end of partition without an offset"
            else:
                st.end = offset
                if st.restarted and st.first is None:
                    st.first = offset  # every record was deleted: the log starts at its end
            self._stop(tp)
        elif code in (KafkaError._AUTO_OFFSET_RESET, KafkaError.OFFSET_OUT_OF_RANGE):
            if st.restarted:
                st.problem = f"{where}: offset out of range"
                self._stop(tp)
                return
            st.restarted = True
            try:
                self.consumer.seek(KTP(tp[0], tp[1], OFFSET_BEGINNING))
            except KafkaException as exc:
                st.problem = f"{where}: start offset gone and cannot rewind ({exc})"
                self._stop(tp)
        elif code in (KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._UNKNOWN_TOPIC, KafkaError._UNKNOWN_PARTITION):
            st.problem = f"{where} not found"
            self._stop(tp)
        # anything else (transport trouble, a leader moving) is transient: librdkafka retries; the idle timeout
        # stops a partition that never gets anywhere

    def _stop(self, tp: tuple[str, int]) -> None:
        with suppress(KafkaException):  # a partition that just went away
            self.consumer.pause([KTP(tp[0], tp[1])])

    def close(self) -> None:
        self.consumer.close()
