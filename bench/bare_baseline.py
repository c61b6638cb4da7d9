"""The `bare` row's baseline: the cheapest Python loop that does the service's job on the email backlog.

It answers one question with a number: what does the job cost in Python with the service's own libraries
(confluent-kafka, orjson, hashlib) and nothing else? Per record: `consume()` (batches of 1,000), `orjson.loads`,
read the Segment event the way bench/quix_baseline.py does, strip + lower + SHA-256 the email, append the row to a
list per advertiser/action. When a list reaches 1,000 rows, or 1 s after the last flush, every list is POSTed to
the sandbox's `/segment/mapping/` (keep-alive http.client, the body written as text like
service/tiktok/payloads.py), and only then are the offsets consumed so far committed: at-least-once, like the
service and the Quix baseline.

What it leaves out, on purpose, is everything the service promises beyond that: no per-user ordering across
actions (an add and a delete of one user in the same flush go in list order, not event order), no netting, no
in-flight exclusion, no dead letters, no retries, no rebalance handling, no metrics, no asyncio, one request at
a time. So its CPU per event is a lower bound for any Python implementation of the job, not a competitor.

Same command line and status files as bench/quix_baseline.py (`started.json`, `result.json`), so the harness
measures both the same way; it runs in the service's virtualenv.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import sys
import time
from typing import Any
from urllib.parse import urlsplit

import orjson
from confluent_kafka import Consumer, TopicPartition

from bench.quix_baseline import ENTERED, MAX_ROWS, Progress, _cpu, _parse_audiences, baseline_parser, write_json

LINGER_S = 1.0


class Poster:
    """POST /segment/mapping/ over one keep-alive connection; raises on anything but TikTok code 0."""

    def __init__(self, url: str, token: str) -> None:
        parts = urlsplit(url.rstrip("/") + "/segment/mapping/")
        self.path = parts.path
        self.conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 80, timeout=30)
        self.headers = {"Access-Token": token, "Content-Type": "application/json"}
        self.requests = 0

    def post(self, advertiser: str, action: str, rows: list[tuple[str, str]]) -> None:
        cells = ",".join('[{"id":"' + digest + '","audience_ids":["' + aud + '"]}]' for aud, digest in rows)
        body = (
            '{"advertiser_ids":["' + advertiser + '"],"action":"' + action + '","id_schema":["EMAIL_SHA256"],'
            '"batch_data":[' + cells + "]}"
        ).encode()
        self.conn.request("POST", self.path, body, self.headers)
        answer = orjson.loads(self.conn.getresponse().read())
        if answer.get("code") != 0:
            raise RuntimeError(f"segment/mapping answered {answer.get('code')}: {answer.get('message')}")
        self.requests += 1


def run(args: argparse.Namespace) -> dict[str, Any]:
    audiences = _parse_audiences(args.audience)
    progress = Progress(args.events, args.status_dir)
    conf: dict[str, Any] = {
        "bootstrap.servers": args.bootstrap,
        "group.id": args.group,
        "auto.offset.reset": "earliest",
        "enable.auto.commit": False,
    }
    conf.update(dict(kv.split("=", 1) for kv in args.consumer_config))
    consumer = Consumer(conf)
    consumer.subscribe([args.topic])
    poster = Poster(args.url, args.token)
    lists: dict[tuple[str, str], list[tuple[str, str]]] = {}
    consumed_to: dict[int, int] = {}  # partition → next offset (everything before it consumed)
    buffered = 0
    last_flush = time.monotonic()
    sha256, loads = hashlib.sha256, orjson.loads

    def flush(final: bool = False) -> None:
        nonlocal buffered, last_flush
        for (adv, action), rows in lists.items():
            for i in range(0, len(rows), MAX_ROWS):
                poster.post(adv, action, rows[i : i + MAX_ROWS])
        progress.finished_some(posted=buffered, requests=0)
        lists.clear()
        buffered = 0
        last_flush = time.monotonic()
        if consumed_to:
            offsets = [TopicPartition(args.topic, p, o) for p, o in consumed_to.items()]
            consumer.commit(offsets=offsets, asynchronous=not final)

    try:
        while progress.consumed < args.events:
            msgs = consumer.consume(1000, 0.1)
            for msg in msgs:
                if msg.error() is not None:
                    continue
                if progress.t_first is None:
                    progress.first()
                progress.consumed += 1
                consumed_to[msg.partition() or 0] = (msg.offset() or 0) + 1
                row = None
                ev = loads(msg.value() or b"null")
                if type(ev) is dict:
                    props = ev.get("properties") or {}
                    key = props.get("audience_key")
                    target = audiences.get(key) if type(key) is str else None
                    traits = (ev.get("context") or {}).get("traits") or {}
                    email = traits.get("email") or props.get("email")
                    if target is not None and type(email) is str and email.strip():
                        member = props.get(key)
                        entered = member if type(member) is bool else ev.get("event") == ENTERED
                        digest = sha256(email.strip().lower().encode()).hexdigest()
                        row = (target[0], "add" if entered else "delete", target[1], digest)
                if row is None:
                    progress.finished_some(skipped=1)
                    continue
                rows = lists.setdefault((row[0], row[1]), [])
                rows.append((row[2], row[3]))
                buffered += 1
                if len(rows) >= MAX_ROWS:
                    flush()
            if buffered and time.monotonic() - last_flush >= LINGER_S:
                flush()
        progress.t_consumed_all = time.monotonic()
        flush(final=True)  # the last POSTs, then a synchronous commit of every offset
        t_done, cpu_done = time.monotonic(), _cpu()
    finally:
        consumer.close()
    return progress.result(t_done, cpu_done, requests=poster.requests)


def main(argv: list[str] | None = None) -> int:
    args = baseline_parser(__doc__).parse_args(argv)
    args.status_dir.mkdir(parents=True, exist_ok=True)
    try:
        result = run(args)
    except Exception as e:  # the harness reads the failure instead of waiting for its timeout
        write_json(args.status_dir / "result.json", {"ok": False, "error": f"{type(e).__name__}: {e}"})
        return 1
    write_json(args.status_dir / "result.json", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
