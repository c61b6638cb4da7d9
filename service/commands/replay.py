"""`audience-sync replay`: send dead letters through again once their cause (usually a mapping) is fixed.

Two modes:
- `republish` (default) produces each selected letter back to the topic it first came from, with its original
  key, value, timestamp and headers (minus `dlq.*`, `__connect.errors.*`), plus `replay.count` + 1. It goes to
  the partition it was first read from when that topic still has it (so it stays behind the same key's older
  events whatever partitioner the upstream producer used), else to the key's partition. The running service
  then syncs it with its own mappings.
- `process` runs the real pipeline on the dead-letter topic with the CURRENT MAPPINGS_FILE; records that fail
  again are dead-lettered again (same topic) with the incremented count.

Resume: the replay has its own consumer group (`<CONSUMER_GROUP>.replay`) and commits as records are handled
(republish: after each batch is acknowledged by the broker; process: the pipeline's stored-offset commits), so
an interrupted replay continues where it stopped; at most the last unacknowledged batch goes out twice. Filtered
and over-limit (`--max-replays`) records are committed past: a later run of the same group will not see them
again (use a new `--group` to re-read the whole topic).

End of run: every partition reached the end reported by fetch responses (see `service.kafka.dlq_reader`), or
nothing arrived for `--idle-timeout`. A letter written after the run started (a record failing again, or the
live service) is never replayed in the same run: its partition stops there, uncommitted, for the next run.

Newer events win: a replayed letter never overrides a newer event for the same user and audience key. Before
anything is sent, the letters this run would replay are read once, and each source partition they came from is
read from just after the letter's original record (`dlq.source.*` headers) to its end. A letter whose user (a
shared hashed identifier) has a later event there for the same audience key, or a later letter in the DLQ, is
`superseded`: not replayed, counted, committed past (see `service.kafka.supersession` for the design). A letter
that cannot be checked (source topic or partition gone, no source headers, records deleted by retention, schema
registry down) is `unverifiable`: by default the run replays nothing and says why; `--unverifiable replay` replays
such letters anyway, `--unverifiable skip` commits past them. `--dry-run` and the summary count both.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from enum import Enum
from functools import partial
from typing import Any

import orjson
from confluent_kafka import KafkaError, KafkaException, Message, Producer
from confluent_kafka import TopicPartition as KTP

from service.config import ConfigError, Settings, producer_config
from service.core.file_batcher import FileChange
from service.core.mappings import Mappings
from service.core.membership import Resolver
from service.core.model import AudienceChange, AudienceNeeded, Skipped
from service.core.offline import OfflineEvent
from service.core.schemas import SchemaNotLoaded, SchemaStore
from service.core.types import Headers, TopicPartition
from service.kafka.consumer import KafkaSourceConsumer
from service.kafka.dlq_reader import (
    ORIGIN_OFFSET,
    ORIGIN_PARTITION,
    ORIGIN_TOPIC,
    REPLAY_COUNT,
    DeadLetterInfo,
    FactFinder,
    OneLineParser,
    PartitionReader,
    TopicReader,
    fail,
    headers_of,
    load_current_mappings,
    parse_time,
    partitions_of,
    reader_config,
    tool_settings,
)
from service.kafka.producer import AsyncProducer
from service.kafka.supersession import (
    NO_SOURCE,
    Identities,
    Letter,
    Outcome,
    SourceEvent,
    Supersession,
    Unreadable,
    registry_loader,
)

PROG = "audience-sync replay"
_STRIP_ON_REPUBLISH = ("dlq.", "__connect.errors.", "replay.")


def _offset_range(text: str) -> tuple[int, int, int | None]:
    m = re.fullmatch(r"(\d+):(\d+)(?:-(\d*))?", text.strip())
    if m is None:
        raise argparse.ArgumentTypeError(f"--offsets {text!r}: expected PARTITION:START-END (e.g. 0:100-250)")
    start = int(m.group(2))
    end = int(m.group(3)) if m.group(3) else (start if m.group(3) is None else None)
    if end is not None and end < start:
        raise argparse.ArgumentTypeError(f"--offsets {text!r}: END is before START")
    return int(m.group(1)), start, end


def _when(text: str) -> datetime:
    dt = parse_time(text)
    if dt is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO-8601 time (e.g. 2024-05-01T10:00:00Z)")
    return dt


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=("republish", "process"), default="republish", help="[republish]")
    p.add_argument("--topic", help="dead-letter topic (default: DLQ_TOPIC, else <first SOURCE_TOPIC>.dlq)")
    p.add_argument("--to-topic", help="republish: send here instead of each letter's dlq.source.topic")
    p.add_argument("--group", help="replay consumer group (default: <CONSUMER_GROUP>.replay)")
    f = p.add_argument_group("filters (all must match; non-matching letters are skipped and committed past)")
    f.add_argument("--reason", action="append", default=[], help="dlq.reason (repeatable)")
    f.add_argument("--audience-key", help="the event's computation_key / audience_key")
    f.add_argument("--advertiser", help="the event's advertiser id (or its current mapping's)")
    f.add_argument("--since", type=_when, help="dlq.failed_at at or after this ISO-8601 time")
    f.add_argument("--until", type=_when, help="dlq.failed_at before this ISO-8601 time")
    f.add_argument("--offsets", type=_offset_range, action="append", default=[], help="P:START-END (repeatable)")
    p.add_argument("--max-replays", type=int, default=3, help="skip letters already replayed this often [3]")
    p.add_argument(
        "--unverifiable",
        choices=("stop", "skip", "replay"),
        default="stop",
        help="letters that cannot be checked for newer events: stop (replay nothing, say why), skip (commit past "
        "them) or replay (anyway) [stop]",
    )
    p.add_argument("--max-records", type=int, help="stop after handling this many letters (resume later)")
    p.add_argument("--idle-timeout", type=float, default=3.0, help="stop when nothing arrives for this long [3s]")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="no produce, no upload, no commit: say what would happen (superseded letters counted too)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar (also off when stderr is no TTY)")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON document")
    return p


# -- selection ------------------------------------------------------------------------------------------------


class Verdict(Enum):
    SELECT = "select"
    FILTERED = "filtered"
    MAX_REPLAYS = "max_replays"
    SUPERSEDED = "superseded"  # a newer event for the same user and audience key: never replayed
    UNVERIFIABLE = "unverifiable"  # could not be checked for newer events: not replayed (--unverifiable stop/skip)
    UNVERIFIED = "unverified"  # could not be checked, replayed anyway (--unverifiable replay)


@dataclass
class Checked:
    """What the check for newer events decided before the run (see `service.kafka.supersession`).

    Only letters not to be replayed as they are have an entry; `ends` is, per DLQ partition, the first offset the
    check did not read: a letter from there on was not checked, so its partition stops there (next run).
    """

    policy: str = "stop"
    decisions: dict[tuple[int, int], tuple[Outcome, str | None]] = field(default_factory=dict)
    ends: dict[int, int] = field(default_factory=dict)
    read: int = 0
    skipped_filter: int = 0
    skipped_max_replays: int = 0
    selected: int = 0
    source_records: int = 0

    def covers(self, partition: int, offset: int) -> bool:
        return offset < self.ends.get(partition, -1)

    def count(self, outcome: Outcome) -> int:
        return sum(1 for o, _ in self.decisions.values() if o is outcome)

    def causes(self) -> Counter[str]:
        return Counter(why or "unknown" for o, why in self.decisions.values() if o is Outcome.UNVERIFIABLE)

    def verdict(self, info: DeadLetterInfo) -> tuple[Verdict, str | None]:
        outcome, why = self.decisions.get((info.partition, info.offset), (Outcome.KEPT, None))
        if outcome is Outcome.SUPERSEDED:
            return Verdict.SUPERSEDED, None
        if outcome is Outcome.UNVERIFIABLE:
            return (Verdict.UNVERIFIED if self.policy == "replay" else Verdict.UNVERIFIABLE), why
        return Verdict.SELECT, None


@dataclass(frozen=True, slots=True)
class Selector:
    """The filters and the ping-pong guard; facts (audience key, advertiser) are decoded only when asked for.
    With `checked`, a selected letter is also judged by the check for newer events."""

    reasons: frozenset[str]
    audience_key: str | None
    advertiser: str | None
    since: datetime | None
    until: datetime | None
    offsets: tuple[tuple[int, int, int | None], ...]
    max_replays: int
    facts: FactFinder
    checked: Checked | None = None

    def verdict(self, msg: Message, info: DeadLetterInfo) -> Verdict:
        return self.judge(msg, info)[0]

    def judge(self, msg: Message, info: DeadLetterInfo) -> tuple[Verdict, str | None]:
        """The verdict, and for an unverifiable letter the cause."""
        if not self.matches(msg, info):
            return Verdict.FILTERED, None
        if info.replay_count >= self.max_replays:
            return Verdict.MAX_REPLAYS, None
        if self.checked is not None:
            return self.checked.verdict(info)
        return Verdict.SELECT, None

    def matches(self, msg: Message, info: DeadLetterInfo) -> bool:
        if self.reasons and info.reason not in self.reasons:
            return False
        if self.offsets and not any(
            p == info.partition and start <= info.offset and (end is None or info.offset <= end)
            for p, start, end in self.offsets
        ):
            return False
        if self.since is not None and (info.failed_at is None or info.failed_at < self.since):
            return False
        if self.until is not None and (info.failed_at is None or info.failed_at >= self.until):
            return False
        if self.audience_key is not None or self.advertiser is not None:
            key, adv = self.facts.facts(msg.value(), headers_of(msg))
            if self.audience_key is not None and key != self.audience_key:
                return False
            if self.advertiser is not None and adv != self.advertiser:
                return False
        return True


def replayed_headers(headers: Headers | None, info: DeadLetterInfo, *, keep_dlq: bool) -> Headers:
    """Headers for the next attempt: `replay.count` + 1. Republish drops every `dlq.*`/`__connect.errors.*`/
    `replay.*` header; process keeps them (the pipeline replaces `dlq.*` if it fails again) and records where
    the record first came from, since a new dead letter's `dlq.source.*` will name the DLQ itself."""
    out: Headers = []
    for k, v in headers or ():
        if k == REPLAY_COUNT or (not keep_dlq and k.startswith(_STRIP_ON_REPUBLISH)):
            continue
        out.append((k, v))
    if keep_dlq and info.origin_topic is None and info.source_topic is not None:
        out.append((ORIGIN_TOPIC, info.source_topic.encode()))
        for name, src in ((ORIGIN_PARTITION, "dlq.source.partition"), (ORIGIN_OFFSET, "dlq.source.offset")):
            value = next((v for k, v in headers or () if k == src), None)
            if value is not None:
                out.append((name, value))
    out.append((REPLAY_COUNT, str(info.replay_count + 1).encode()))
    return out


# -- summary --------------------------------------------------------------------------------------------------


@dataclass
class Summary:
    mode: str
    dry_run: bool
    topic: str
    group: str
    read: int = 0
    selected: int = 0
    done: int = 0
    skipped_filter: int = 0
    skipped_max_replays: int = 0
    superseded: int = 0
    unverifiable: int = 0
    unverifiable_policy: str = "stop"
    failed: int = 0
    unfinished: int = 0
    held_partitions: int = 0
    source_records_checked: int = 0
    unverifiable_by_cause: Counter[str] = field(default_factory=Counter)
    failed_by_reason: Counter[str] = field(default_factory=Counter)
    targets: Counter[str] = field(default_factory=Counter)
    would: Counter[str] = field(default_factory=Counter)
    error: str | None = None

    def counted(self, verdict: Verdict, why: str | None) -> bool:
        """Count one read letter's verdict; True when the letter is to be replayed."""
        if verdict is Verdict.FILTERED:
            self.skipped_filter += 1
        elif verdict is Verdict.MAX_REPLAYS:
            self.skipped_max_replays += 1
        elif verdict is Verdict.SUPERSEDED:
            self.superseded += 1
        else:
            if verdict is not Verdict.SELECT:
                self.unverifiable += 1
                self.unverifiable_by_cause[why or "unknown"] += 1
            if verdict is Verdict.UNVERIFIABLE:
                return False
            self.selected += 1
            return True
        return False

    def uncount(self, verdict: Verdict, why: str | None) -> None:
        """Undo `counted` for a selected letter left for the next run."""
        self.read -= 1
        self.selected -= 1
        if verdict is Verdict.UNVERIFIED:
            self.unverifiable -= 1
            self.unverifiable_by_cause[why or "unknown"] -= 1
            self.unverifiable_by_cause += Counter()  # drop zero counts

    @property
    def done_label(self) -> str:
        verb = "republished" if self.mode == "republish" else "processed"
        return f"would be {verb}" if self.dry_run else verb

    def document(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "mode": self.mode,
            "dry_run": self.dry_run,
            "topic": self.topic,
            "group": self.group,
            "read": self.read,
            "selected": self.selected,
            ("republished" if self.mode == "republish" else "processed"): self.done,
            "skipped_filter": self.skipped_filter,
            "skipped_max_replays": self.skipped_max_replays,
            "superseded": self.superseded,
            "unverifiable": self.unverifiable,
            "failed": self.failed,
            "failed_by_reason": dict(self.failed_by_reason.most_common()),
            "unfinished": self.unfinished,
            "partitions_stopped_at_newer_letters": self.held_partitions,
            "source_records_checked": self.source_records_checked,
        }
        if self.unverifiable:
            doc["unverifiable_by_cause"] = dict(self.unverifiable_by_cause.most_common())
            doc["unverifiable_policy"] = self.unverifiable_policy
        if self.mode == "republish":
            doc["to_topics"] = dict(self.targets.most_common())
        if self.dry_run:
            doc["with_current_mappings"] = dict(self.would.most_common())
        if self.error:
            doc["error"] = self.error
        return doc

    def table(self) -> str:
        rows: list[tuple[str, object]] = [
            ("read", self.read),
            ("selected", self.selected),
            (self.done_label, self.done),
            ("skipped by filter", self.skipped_filter),
            ("skipped for max replays (replay.count >= limit)", self.skipped_max_replays),
            ("superseded by newer events (not replayed)", self.superseded),
        ]
        if self.unverifiable:
            what = {"replay": "replayed anyway", "skip": "skipped"}.get(self.unverifiable_policy, "not replayed")
            rows.append((f"unverifiable: not checked for newer events ({what})", self.unverifiable))
            rows += [(f"  unverifiable: {c}", n) for c, n in self.unverifiable_by_cause.most_common()]
        rows.append(("failed", self.failed))
        rows += [(f"  failed: {r}", n) for r, n in self.failed_by_reason.most_common()]
        if self.unfinished:
            rows.append(("unfinished (uncommitted, next run)", self.unfinished))
        if self.held_partitions:
            rows.append(("partitions stopped at newer letters", self.held_partitions))
        rows.append(("source records checked for newer events", self.source_records_checked))
        rows += [(f"  to topic {t}", n) for t, n in self.targets.most_common()]
        rows += [(f"  with current mappings: {w}", n) for w, n in self.would.most_common()]
        width = max(len(name) for name, _ in rows)
        title = f"replay ({self.mode}{', dry run' if self.dry_run else ''}) of {self.topic}, group {self.group}"
        lines = [title] + [f"  {name:<{width}}  {value:>8}" for name, value in rows]
        if self.dry_run and self.unverifiable and self.unverifiable_policy == "stop":
            lines.append("  a real run stops before replaying anything: see --unverifiable")
        if self.error:
            lines.append(f"  stopped: {self.error}")
        return "\n".join(lines)


class Progress:
    """A tqdm bar on stderr, only for a person watching (a TTY) and not with --no-progress."""

    def __init__(self, enabled: bool) -> None:
        self._bar: Any = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(desc="replay", unit="rec", file=sys.stderr, dynamic_ncols=True)

    def update(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


@contextmanager
def _stop_on_signals(stop: Callable[[], None]) -> Iterator[None]:
    """SIGINT/SIGTERM end the run cleanly (commit what was acknowledged); handlers restored afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in previous:
        signal.signal(s, lambda *_: stop())
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _now_ms() -> datetime:
    now = datetime.now(UTC)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


# -- dry run (both modes) -------------------------------------------------------------------------------------


def _would(resolver: Resolver, value: bytes | None, headers: Headers | None) -> str:
    """What the pipeline would do with this record under the current mappings (no I/O)."""
    try:
        outcome = resolver.process(value, headers).outcome
    except SchemaNotLoaded:
        return "unknown (needs the schema registry)"
    if isinstance(outcome, AudienceChange):
        return "sync"
    if isinstance(outcome, Skipped):
        return f"skip ({outcome.reason})"
    if isinstance(outcome, AudienceNeeded):
        return "sync after creating its audience"
    if isinstance(outcome, OfflineEvent):
        return "send (offline event)"
    if isinstance(outcome, FileChange):
        return "sync (file audience, at its next upload)"
    return f"fail again ({outcome.reason.value})"


# -- republish / dry run --------------------------------------------------------------------------------------


class _Republisher:
    def __init__(
        self,
        settings: Settings,
        environ: Mapping[str, str],
        args: argparse.Namespace,
        selector: Selector,
        summary: Summary,
        progress: Progress,
        resolver: Resolver | None,
        run_started: datetime,
    ) -> None:
        self.args = args
        self.selector = selector
        self.summary = summary
        self.progress = progress
        self.resolver = resolver
        self.topic = summary.topic
        self.run_started = run_started
        self.stopping = threading.Event()
        self.reader = TopicReader(
            reader_config(settings, environ, summary.group),
            self.topic,
            from_committed=True,
            idle_timeout_s=args.idle_timeout,
        )
        self.producer: Producer | None = None
        self._partitions: dict[str, int | None] = {}
        if not args.dry_run and args.mode == "republish":
            conf: dict[str, Any] = dict(producer_config(settings, environ))
            conf.setdefault("partitioner", "murmur2_random")  # the Java client's: same key, same partition
            conf.setdefault("linger.ms", 5)
            self.producer = Producer(conf)
            if args.to_topic and self._partition_count(args.to_topic) is None:
                self.reader.close()
                raise ConfigError(f"--to-topic {args.to_topic!r}: no such topic on the broker")

    def _partition_count(self, topic: str) -> int | None:
        if topic not in self._partitions:
            try:
                self._partitions[topic] = len(partitions_of(self.reader.consumer, topic))
            except ConfigError:
                self._partitions[topic] = None
        return self._partitions[topic]

    def run(self) -> int:
        limit = self.args.max_records
        try:
            with _stop_on_signals(self.stopping.set):
                for batch in self.reader.messages(should_stop=self.stopping.is_set):
                    if not self._batch(batch, limit):
                        return 1
                    if (limit is not None and self.summary.read >= limit) or self.stopping.is_set():
                        break
        finally:
            self.reader.close()
        return 0

    def _batch(self, batch: list[Message], limit: int | None) -> bool:
        """Handle one fetched batch; False when a record could not be republished (the run stops)."""
        handled: dict[int, list[int]] = {}
        deliveries: dict[tuple[int, int], KafkaError | None] = {}
        failed_partition: dict[int, str] = {}
        for msg in batch:
            info = DeadLetterInfo.of(msg)
            p = info.partition
            if p in self.reader.held or p in failed_partition:  # not `finished`: see TopicReader
                continue
            if (limit is not None and self.summary.read >= limit) or self.stopping.is_set():
                self.reader.hold(p)
                continue
            if _not_this_run(info, self.run_started, self.selector.checked):
                self.summary.held_partitions += 1
                self.reader.hold(p)
                continue
            self.summary.read += 1
            self.progress.update()
            verdict, why = self.selector.judge(msg, info)
            if self.summary.counted(verdict, why):
                problem = self._send(msg, info, deliveries)
                if problem is not None:
                    self.summary.failed += 1
                    self.summary.failed_by_reason[problem] += 1
                    if not self.args.dry_run:  # a real run stops the partition here, uncommitted, for a fix
                        self.summary.uncount(verdict, why)
                        failed_partition[p] = problem
                        self.reader.hold(p)
                        continue
            handled.setdefault(p, []).append(info.offset)
        if self.producer is not None:
            while self.producer.flush(1.0) > 0:
                pass  # librdkafka gives up after message.timeout.ms and reports each record
        commit: dict[int, int] = {}
        for p, offsets in handled.items():
            for off in offsets:
                err = deliveries.get((p, off))
                if err is not None:
                    self.summary.done -= 1
                    self.summary.failed += 1
                    self.summary.failed_by_reason[f"delivery: {err.name()}"] += 1
                    failed_partition.setdefault(p, f"delivery failed: {err.str()}")
                    break
                commit[p] = off + 1
        if not self.args.dry_run and commit:
            try:
                self.reader.commit(commit)
            except KafkaException as exc:
                self.summary.error = f"commit failed: {exc}"
                return False
        if failed_partition:
            self.summary.error = "; ".join(f"partition {p}: {why}" for p, why in sorted(failed_partition.items()))
            return False
        return True

    def _send(
        self, msg: Message, info: DeadLetterInfo, deliveries: dict[tuple[int, int], KafkaError | None]
    ) -> str | None:
        """Republish one letter (or, in a dry run, say what would happen); a problem text when it cannot be."""
        if self.resolver is not None:
            self.summary.would[_would(self.resolver, msg.value(), headers_of(msg))] += 1
        if self.args.mode == "process":  # a dry run of process mode: nothing to route
            self.summary.done += 1
            return None
        target = self.args.to_topic or info.home_topic
        if not target:
            return "no dlq.source.topic header (use --to-topic)"
        if target == self.topic:
            return "source topic is the dead-letter topic itself (use --to-topic)"
        count = self._partition_count(target)
        if count is None:
            return f"topic {target} not found"
        self.summary.targets[target] += 1
        self.summary.done += 1
        if self.producer is None:
            return None
        kw: dict[str, Any] = {
            "key": msg.key(),
            "value": msg.value(),
            "headers": replayed_headers(headers_of(msg), info, keep_dlq=False),
        }
        ts_type, ts = msg.timestamp()
        if ts_type and ts > 0:
            kw["timestamp"] = ts
        home = info.home_partition
        if not self.args.to_topic and home is not None and 0 <= home < count:
            kw["partition"] = home
        slot = (info.partition, info.offset)
        deliveries[slot] = None

        def on_delivery(err: KafkaError | None, _m: Message) -> None:
            deliveries[slot] = err

        while True:
            try:
                self.producer.produce(target, on_delivery=on_delivery, **kw)
                break
            except BufferError:
                self.producer.poll(0.1)
        self.producer.poll(0)
        return None


# -- check for newer events (both modes, before anything is sent) ---------------------------------------------


def _not_this_run(info: DeadLetterInfo, run_started: datetime, checked: Checked | None) -> bool:
    """A letter written after the run started, or one the check for newer events did not see: its partition
    stops there, uncommitted, for the next run."""
    if info.failed_at is not None and info.failed_at >= run_started:
        return True
    return checked is not None and not checked.covers(info.partition, info.offset)


def _letter(msg: Message, info: DeadLetterInfo, identities: Identities, dlq_topic: str) -> Letter:
    """What the check needs of a selected letter: its position, its original's position, its user."""
    at = (info.partition, info.offset)
    try:
        who = identities.of(msg.value(), headers_of(msg))
    except Unreadable as exc:
        return Letter(at, None, problem=str(exc))
    if who is None:
        return Letter(at, None)  # not a membership change: replaying it cannot override anything
    audience, cells = who
    topic, partition, offset = info.home_topic, info.home_partition, info.home_offset
    if topic is None or partition is None or partition < 0 or offset is None:
        return Letter(at, None, audience, cells, problem=NO_SOURCE)
    if topic == dlq_topic:
        return Letter(at, None, audience, cells, problem="original position unknown (its source is the DLQ)")
    return Letter(at, (topic, partition, offset), audience, cells)


def check_newer(
    settings: Settings,
    environ: Mapping[str, str],
    args: argparse.Namespace,
    selector: Selector,
    summary: Summary,
    identities: Identities,
    run_started: datetime,
) -> Checked:
    """Read the letters this run would handle (same group, same filters) and the source partitions they came
    from, and decide which are superseded or unverifiable. Sends and commits nothing."""
    checked = Checked(policy=args.unverifiable)
    check = Supersession()
    reader = TopicReader(
        {"fetch.wait.max.ms": 100, **reader_config(settings, environ, summary.group)},
        summary.topic,
        from_committed=True,
        idle_timeout_s=args.idle_timeout,
        poll_s=0.1,
    )
    try:
        for batch in reader.messages():
            for msg in batch:
                info = DeadLetterInfo.of(msg)
                if info.partition in reader.held:  # not `finished`: an EOF in this batch comes after its records
                    continue
                if _not_this_run(info, run_started, None):
                    reader.hold(info.partition)
                    continue
                checked.ends[info.partition] = info.offset + 1
                checked.read += 1
                verdict = selector.verdict(msg, info)
                if verdict is Verdict.FILTERED:
                    checked.skipped_filter += 1
                elif verdict is Verdict.MAX_REPLAYS:
                    checked.skipped_max_replays += 1
                else:
                    check.add(_letter(msg, info, identities, summary.topic))
    finally:
        reader.close()
    starts = check.starts()
    if starts:
        source = PartitionReader(reader_config(settings, environ, None), starts, idle_timeout_s=args.idle_timeout)
        try:
            for batch in source.messages():
                for msg in batch:
                    checked.source_records += 1
                    topic, partition = msg.topic() or "", msg.partition() or 0
                    try:
                        who = identities.of(msg.value(), headers_of(msg), partial(check.wants, topic, partition))
                    except Unreadable as exc:
                        check.problem(topic, partition, f"partition {partition} of topic {topic}: {exc}")
                        continue
                    if who is not None:
                        check.observe(SourceEvent(topic, partition, msg.offset() or 0, who[0], who[1]))
        finally:
            source.close()
        for (topic, partition), state in source.state.items():
            if state.problem is not None:
                check.problem(topic, partition, state.problem)
            elif state.end is not None:
                check.reached_end(topic, partition, state.end, state.first)
    for letter, decision in check.decide():
        if decision.outcome is not Outcome.KEPT:
            checked.decisions[letter.at] = (decision.outcome, decision.why)
    checked.selected = len(check) - len(checked.decisions)
    summary.source_records_checked = checked.source_records
    return checked


def _refuse_unverifiable(summary: Summary, checked: Checked) -> None:
    """`--unverifiable stop` (the default) and letters that cannot be checked: the run replays nothing."""
    summary.read = checked.read
    summary.skipped_filter = checked.skipped_filter
    summary.skipped_max_replays = checked.skipped_max_replays
    summary.selected = checked.selected
    summary.superseded = checked.count(Outcome.SUPERSEDED)
    summary.unverifiable = checked.count(Outcome.UNVERIFIABLE)
    summary.unverifiable_by_cause = checked.causes()
    summary.error = (
        f"{summary.unverifiable} selected letter(s) cannot be checked for newer events, so nothing was replayed; "
        "fix the cause, or rerun with --unverifiable replay (replay them anyway) or --unverifiable skip "
        "(commit past them)"
    )


# -- process --------------------------------------------------------------------------------------------------


class _Gate:
    """What the replay consumer lets through (nothing newer than the run, at most `limit` records), and when the
    run is over: every partition at its end or stopped, or idle for `idle_s` with nothing pending.

    The idle clock starts at assignment: the pipeline's own `stop_when_idle_s` counts from the start of the run,
    so a group join longer than the idle time would end the replay before it read anything.
    """

    def __init__(
        self,
        run_started: datetime,
        limit: int | None,
        finish: Callable[[], None],
        idle_s: float,
        pending: Callable[[], int],
    ) -> None:
        self.run_started = run_started
        self.limit = limit
        self.idle_s = idle_s
        self.pending = pending
        self.idle_since = time.monotonic()
        self.handed = 0
        self.finish = finish
        self.held: dict[TopicPartition, int] = {}
        self.newer_held = 0
        self.at_end: set[TopicPartition] = set()
        self.checked: Checked | None = None

    def newer(self, msg: Message) -> bool:
        return _not_this_run(DeadLetterInfo.of(msg), self.run_started, self.checked)


class ReplayConsumer(KafkaSourceConsumer):
    """The pipeline's consumer, gated: a letter written after the run started stops its partition there
    (paused, position rewound, never handed over, so never committed past), and the run finishes when every
    assigned partition is at its end or stopped. The pipeline's `intake` hook can only skip, which commits."""

    def __init__(self, conf: dict[str, Any], topics: list[str], *, gate: _Gate, **hooks: Any) -> None:
        super().__init__(conf, topics, **hooks)
        self.gate = gate

    async def consume(self, max_messages: int, timeout_s: float) -> list[Message]:
        msgs = await super().consume(max_messages, timeout_s)
        gate = self.gate
        now = time.monotonic()
        if msgs or not self.assigned or gate.pending():
            gate.idle_since = now
        elif now - gate.idle_since >= gate.idle_s:
            gate.finish()
        out: list[Message] = []
        rewind: dict[TopicPartition, int] = {}
        for msg in msgs:
            tp = TopicPartition(msg.topic() or "", msg.partition() or 0)
            err = msg.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    gate.at_end.add(tp)
                out.append(msg)
                continue
            if tp in gate.held:
                rewind[tp] = gate.held[tp]
                continue
            over = gate.limit is not None and gate.handed >= gate.limit
            if over or gate.newer(msg):
                gate.held[tp] = rewind[tp] = msg.offset() or 0
                gate.newer_held += 0 if over else 1
                continue
            gate.at_end.discard(tp)
            gate.handed += 1
            out.append(msg)
        for tp, offset in rewind.items():
            await self._run(self._rewind, tp, offset)
        if (gate.limit is not None and gate.handed >= gate.limit) or (
            self.assigned and all(tp in gate.at_end or tp in gate.held for tp in self.assigned)
        ):
            gate.finish()
        return out

    def _rewind(self, tp: TopicPartition, offset: int) -> None:
        if tp in self.assigned:
            ktp = KTP(tp.topic, tp.partition, offset)
            self._consumer.pause([ktp])
            self._consumer.seek(ktp)


class _CountingProducer(AsyncProducer):
    """The pipeline's dead-letter producer, counting letters written again by reason."""

    def __init__(self, conf: dict[str, Any], summary: Summary) -> None:
        super().__init__(conf)
        self.summary = summary

    async def send(
        self,
        topic: str,
        *,
        key: bytes | None,
        value: bytes | None,
        headers: Headers | None = None,
        timestamp_ms: int | None = None,
    ) -> None:
        await super().send(topic, key=key, value=value, headers=headers, timestamp_ms=timestamp_ms)
        reason = next((v.decode() for k, v in headers or () if k == "dlq.reason" and v), "unknown")
        self.summary.failed += 1
        self.summary.failed_by_reason[reason] += 1


async def _process(
    settings: Settings,
    environ: Mapping[str, str],
    args: argparse.Namespace,
    selector: Selector,
    summary: Summary,
    progress: Progress,
    mappings: Mappings,
    run_started: datetime,
) -> int:

    import aiohttp

    from service.commands.run import build_pipeline
    from service.config import TokenSource, consumer_config

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def intake(msg: Message, headers: Headers | None) -> tuple[str | None, Headers | None]:
        info = DeadLetterInfo.of(msg)
        summary.read += 1
        progress.update()
        verdict, why = selector.judge(msg, info)
        if not summary.counted(verdict, why):
            return f"replay_{verdict.value}", headers
        return None, replayed_headers(headers, info, keep_dlq=True)

    token = TokenSource(settings)
    connector = aiohttp.TCPConnector(limit=settings.max_inflight_requests * 2)
    async with aiohttp.ClientSession(connector=connector) as session:
        dlq = _CountingProducer(producer_config(settings, environ), summary)
        # No DLQ guard: a replay is an operator's deliberate run over records that already failed.
        pipeline = build_pipeline(
            settings, environ, session, token, mappings, dlq, summary.topic, intake=intake, guard=False
        )
        conf: dict[str, Any] = dict(consumer_config(settings, environ))
        conf.update({"group.id": summary.group, "enable.partition.eof": True, "error_cb": pipeline.on_error})
        gate = _Gate(run_started, args.max_records, stop.set, args.idle_timeout, pipeline.ledger.pending)
        gate.checked = selector.checked
        consumer = ReplayConsumer(
            conf,
            [summary.topic],
            gate=gate,
            on_assign=pipeline.on_assign,
            on_revoke=pipeline.on_revoke,
            on_lost=pipeline.on_lost,
        )
        for sig in (signal.SIGINT, signal.SIGTERM):
            with suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, stop.set)
        try:
            await pipeline.run(consumer, stop)
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                with suppress(NotImplementedError, RuntimeError, ValueError):
                    loop.remove_signal_handler(sig)
            left = await asyncio.to_thread(dlq.close)
        summary.held_partitions = gate.newer_held
        summary.unfinished = pipeline.ledger.pending()
        if left:
            summary.error = f"{left} dead letter(s) not acknowledged; their records stay uncommitted"
    summary.done = max(0, summary.selected - summary.failed - summary.unfinished)
    return 0


# -- entry point ----------------------------------------------------------------------------------------------


def _check_args(args: argparse.Namespace) -> str | None:
    if args.max_replays < 1:
        return "--max-replays must be at least 1"
    if args.max_records is not None and args.max_records < 1:
        return "--max-records must be at least 1"
    if args.idle_timeout <= 0:
        return "--idle-timeout must be positive"
    if args.to_topic and args.mode != "republish":
        return "--to-topic only applies to --mode republish"
    if args.since and args.until and args.since >= args.until:
        return "--since must be before --until"
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    problem = _check_args(args)
    if problem:
        return fail(PROG, problem)
    environ = os.environ
    progress = Progress(not args.no_progress)
    try:
        settings = tool_settings(environ, need_token=args.mode == "process" and not args.dry_run)
        topic = args.topic or settings.dead_letter_topic
        if args.to_topic == topic:
            return fail(PROG, "--to-topic must not be the dead-letter topic")
        mappings = load_current_mappings(settings)
        summary = Summary(args.mode, args.dry_run, topic, args.group or f"{settings.consumer_group}.replay")
        summary.unverifiable_policy = args.unverifiable
        selector = Selector(
            frozenset(args.reason),
            args.audience_key,
            args.advertiser,
            args.since,
            args.until,
            tuple(args.offsets),
            args.max_replays,
            FactFinder(mappings, settings.default_advertiser_id),
        )
        from service.commands.run import resolver_settings

        run_started = _now_ms()
        loader = registry_loader(settings.schema_registry_url) if settings.schema_registry_url else None
        identities = Identities(resolver_settings(settings), loader)
        if args.mode == "process" and not args.dry_run:
            _check_topic(settings, environ, topic)
        checked = check_newer(settings, environ, args, selector, summary, identities, run_started)
        selector = replace(selector, checked=checked)
        if checked.count(Outcome.UNVERIFIABLE) and args.unverifiable == "stop" and not args.dry_run:
            _refuse_unverifiable(summary, checked)
            rc = 1
        elif args.mode == "process" and not args.dry_run:
            rc = asyncio.run(_process(settings, environ, args, selector, summary, progress, mappings, run_started))
        else:
            resolver = Resolver(resolver_settings(settings), mappings, SchemaStore()) if args.dry_run else None
            rc = _Republisher(settings, environ, args, selector, summary, progress, resolver, run_started).run()
    except ConfigError as exc:
        return fail(PROG, str(exc))
    except ValueError as exc:  # the resolver's own settings checks (e.g. PHONE_DEFAULT_REGION)
        return fail(PROG, f"configuration error: {exc}")
    except KafkaException as exc:
        print(f"{PROG}: Kafka error: {exc}", file=sys.stderr)
        return 1
    finally:
        progress.close()
    sys.stdout.write((orjson.dumps(summary.document()).decode() if args.json else summary.table()) + "\n")
    if summary.error:
        print(f"{PROG}: {summary.error}", file=sys.stderr)
    return rc


def _check_topic(settings: Settings, environ: Mapping[str, str], topic: str) -> None:
    """Fail fast (exit 2) when the dead-letter topic does not exist, before joining a group for it."""
    from confluent_kafka import Consumer

    c = Consumer(reader_config(settings, environ, None))
    try:
        partitions_of(c, topic)
    finally:
        c.close()
