"""`audience-sync dlq inspect`: what is in the dead-letter topic, counted, without consuming it for good.

Operators run this before fixing a mapping and replaying, so it must never move anything: it assigns every
partition from the beginning under a throwaway group id and never commits. It reads to the end reported by
fetch responses (a `_PARTITION_EOF` per partition; see `service.kafka.dlq_reader` for why not ListOffsets), with
`--idle-timeout` as the fallback. Output is counts and `dlq.error` samples only, never keys or values (PII).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import orjson
from confluent_kafka import KafkaException

from service.config import ConfigError
from service.kafka.dlq_reader import (
    DeadLetterInfo,
    FactFinder,
    OneLineParser,
    TopicReader,
    fail,
    headers_of,
    load_current_mappings,
    reader_config,
    scrub,
    tool_settings,
)

PROG = "audience-sync dlq inspect"


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="audience-sync dlq", description=__doc__)
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    i = sub.add_parser("inspect", help="count dead letters by reason, audience key, advertiser and hour")
    i.add_argument("--topic", help="dead-letter topic (default: DLQ_TOPIC, else <first SOURCE_TOPIC>.dlq)")
    i.add_argument("--reason", action="append", default=[], help="only this dlq.reason (repeatable)")
    i.add_argument("--max-records", type=int, default=None, help="stop after reading this many dead letters")
    i.add_argument("--idle-timeout", type=float, default=3.0, help="stop when nothing arrives for this long [3s]")
    i.add_argument("--samples", type=int, default=5, help="sample errors to show [5]")
    i.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
    return p


class Tally:
    """Counts of dead letters, and a few distinct error texts (scrubbed) as samples."""

    def __init__(self, samples: int) -> None:
        self.total = 0
        self.by_reason: Counter[str] = Counter()
        self.by_audience_key: Counter[str] = Counter()
        self.by_advertiser: Counter[str] = Counter()
        self.by_hour: Counter[str] = Counter()
        self.by_source_topic: Counter[str] = Counter()
        self.by_replay_count: Counter[str] = Counter()
        self.max_samples = samples
        self.samples: list[dict[str, Any]] = []
        self._sampled: set[tuple[str, str]] = set()

    def add(self, info: DeadLetterInfo, audience_key: str, advertiser: str) -> None:
        self.total += 1
        self.by_reason[info.reason] += 1
        self.by_audience_key[audience_key] += 1
        self.by_advertiser[advertiser] += 1
        hour = info.failed_at.strftime("%Y-%m-%dT%H:00Z") if info.failed_at else "unknown"
        self.by_hour[hour] += 1
        self.by_source_topic[info.home_topic or "unknown"] += 1
        self.by_replay_count[str(info.replay_count)] += 1
        error = scrub(info.error)
        if len(self.samples) < self.max_samples and (info.reason, error) not in self._sampled:
            self._sampled.add((info.reason, error))
            self.samples.append(
                {
                    "reason": info.reason,
                    "error": error,
                    "partition": info.partition,
                    "offset": info.offset,
                    "failed_at": _iso(info.failed_at),
                }
            )

    def document(self, topic: str) -> dict[str, Any]:
        def ordered(c: Counter[str]) -> dict[str, int]:
            return dict(c.most_common())

        return {
            "topic": topic,
            "total": self.total,
            "by_reason": ordered(self.by_reason),
            "by_audience_key": ordered(self.by_audience_key),
            "by_advertiser": ordered(self.by_advertiser),
            "by_hour": dict(sorted(self.by_hour.items())),
            "by_source_topic": ordered(self.by_source_topic),
            "by_replay_count": dict(sorted(self.by_replay_count.items())),
            "samples": self.samples,
        }


def _iso(t: datetime | None) -> str | None:
    return t.isoformat(timespec="milliseconds").replace("+00:00", "Z") if t is not None else None


def render_text(doc: dict[str, Any]) -> str:
    lines = [f"dead-letter topic {doc['topic']}: {doc['total']} record(s)"]
    for title, key in (
        ("reason", "by_reason"),
        ("audience key", "by_audience_key"),
        ("advertiser", "by_advertiser"),
        ("hour (UTC, dlq.failed_at)", "by_hour"),
        ("source topic", "by_source_topic"),
        ("replay.count", "by_replay_count"),
    ):
        counts: dict[str, int] = doc[key]
        if not counts:
            continue
        lines.append("")
        lines.append(f"by {title}:")
        width = max(len(k) for k in counts)
        lines.extend(f"  {k:<{width}}  {v:>8}" for k, v in counts.items())
    if doc["samples"]:
        lines.append("")
        lines.append("sample errors (partition:offset, dlq.failed_at):")
        for s in doc["samples"]:
            where = f"{s['partition']}:{s['offset']}"
            lines.append(f"  [{s['reason']}] {where} {s['failed_at'] or '-'}: {s['error']}")
    return "\n".join(lines)


def inspect(args: argparse.Namespace, environ: Mapping[str, str]) -> dict[str, Any]:
    settings = tool_settings(environ, need_token=False)
    topic = args.topic or settings.dead_letter_topic
    finder = FactFinder(load_current_mappings(settings), settings.default_advertiser_id)
    reader = TopicReader(
        reader_config(settings, environ, None), topic, from_committed=False, idle_timeout_s=args.idle_timeout
    )
    tally = Tally(args.samples)
    reasons = set(args.reason)
    read = 0
    limit = args.max_records
    try:
        for batch in reader.messages():
            for msg in batch[: None if limit is None else limit - read]:
                read += 1
                info = DeadLetterInfo.of(msg)
                if reasons and info.reason not in reasons:
                    continue
                key, adv = finder.facts(msg.value(), headers_of(msg))
                tally.add(info, key, adv)
            if limit is not None and read >= limit:
                break
    finally:
        reader.close()
    doc = tally.document(topic)
    doc["read"] = read
    return doc


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.max_records is not None and args.max_records < 1:
        return fail(PROG, "--max-records must be at least 1")
    if args.idle_timeout <= 0:
        return fail(PROG, "--idle-timeout must be positive")
    try:
        doc = inspect(args, os.environ)
    except ConfigError as exc:
        return fail(PROG, str(exc))
    except KafkaException as exc:
        print(f"{PROG}: Kafka error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        sys.stdout.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        sys.stdout.write(render_text(doc) + "\n")
    return 0
