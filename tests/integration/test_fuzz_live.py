"""Fuzz the live service: thousands of seeded bad records interleaved with good events, over the real broker.

The process must survive every one of them (alive throughout, exit 0 on SIGTERM), dead-letter each bad record
exactly once with the reason its kind deserves, skip the ones that are merely not audience events, and sync
the good events around them exactly (last action wins).

MAX_RECORD_BYTES is 32768 rather than 4096 so that the 10,000-deep nested JSON (20 KB) reaches the JSON parser
instead of being stopped by the size check; oversized records are 33-60 KB. Seed with FUZZ_SEED.
"""

from __future__ import annotations

import os
import random
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import orjson
import pytest
from confluent_kafka import Producer

from service.core.dead_letters import header_value
from service.core.events import Undecodable, decode_event
from service.core.schemas import SchemaNotLoaded, SchemaStore
from service.devtools.broker import LocalBroker
from service.devtools.sample import (
    ADVERTISER_ID,
    DEFAULT_AUDIENCES,
    SampleUser,
    expected_membership,
    generate,
    segment_event,
)
from service.devtools.sandbox import SandboxThread
from tests.conftest import ServiceProcess, Topics, committed, wait_until
from tests.integration.helpers_failures import by_key, email_user, membership, read_topic, reasons

pytestmark = pytest.mark.integration

SEED = int(os.environ.get("FUZZ_SEED", "4242"))
BAD = 3000
GOOD = 2000
MAX_RECORD_BYTES = 32768

INVALID = "invalid_payload"
NO_IDS = "no_identifiers"
SKIP = "skip"

Headers = list[tuple[str, bytes]] | None
Bad = tuple[str, bytes | None, Headers, str]  # kind, value, headers, expected outcome

_STORE = SchemaStore()
_CONTROL = [bytes([b]) for b in (*range(1, 9), 0x0B, 0x0C, *range(0x0E, 0x20))]


def _undecodable(value: bytes, headers: Headers = None) -> bool:
    """True unless random bytes happen to form a valid record (then they are not a bad record at all)."""
    try:
        return isinstance(decode_event(value, headers, _STORE, MAX_RECORD_BYTES), Undecodable)
    except SchemaNotLoaded:
        return True  # Confluent framing: with no registry configured the service dead-letters it


def _doc(rng: random.Random, i: int) -> dict[str, Any]:
    audience = DEFAULT_AUDIENCES[rng.randrange(len(DEFAULT_AUDIENCES))]
    return segment_event(email_user(f"fz-{i}"), audience, rng.random() < 0.7)


def _set(doc: dict[str, Any], path: str, value: object) -> dict[str, Any]:
    node: Any = doc
    *parents, last = path.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[last] = value
    return doc


WRONG_IDS: list[object] = [{"x": 1}, [1], True, 1.5, -3, "abc", "12a4", " 7 7 "]
WRONG_STRINGS: list[object] = [123, 4.5, [], {}, True, ["a@b.co"], {"email": "a@b.co"}]


def bad_record(rng: random.Random, i: int) -> Bad:
    kind = rng.choice(
        [
            "random_bytes",
            "random_bytes_json_header",
            "truncated_json",
            "garbled_json",
            "invalid_utf8",
            "wrong_type_audience_id",
            "wrong_type_advertiser_id",
            "wrong_type_identifier",
            "wrong_type_envelope",
            "non_object_json",
            "canonical_wrong_types",
            "deep_json",
            "oversized",
            "confluent_unknown_schema",
            "empty",
            "no_identifiers",
        ]
    )
    good = orjson.dumps(_doc(rng, i))
    if kind in ("random_bytes", "random_bytes_json_header"):
        headers: Headers = [("content-type", b"application/json")] if kind.endswith("header") else None
        while True:
            value = rng.randbytes(rng.randint(1, 300))
            if _undecodable(value, headers):
                return kind, value, headers, INVALID
    if kind == "truncated_json":
        return kind, good[: rng.randint(1, len(good) - 1)], None, INVALID
    if kind == "garbled_json":
        value = bytearray(good)
        for _ in range(rng.randint(1, 3)):  # raw control characters are invalid anywhere in JSON
            value[rng.randint(1, len(value) - 1) : 0] = rng.choice(_CONTROL)
        return kind, bytes(value), None, INVALID
    if kind == "invalid_utf8":
        junk = rng.choice([b"\xff", b"\xc3\x28", b"\xe2\x82", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80"])
        if rng.random() < 0.5:
            return kind, good.replace(b"@example.com", b"@ex" + junk + b"ample.com"), None, INVALID
        return kind, junk + b"\xfe\xfd" + good, None, INVALID
    if kind == "wrong_type_audience_id":
        path = rng.choice(["context.personas.external_audience_id", "properties.external_audience_id"])
        return kind, orjson.dumps(_set(_doc(rng, i), path, rng.choice(WRONG_IDS))), None, INVALID
    if kind == "wrong_type_advertiser_id":
        path = rng.choice(["context.personas.audience_settings.advertiserId", "properties.advertiser_id"])
        return kind, orjson.dumps(_set(_doc(rng, i), path, rng.choice(WRONG_IDS))), None, INVALID
    if kind == "wrong_type_identifier":  # the only identifier is not a string: dropped, none left
        doc = _doc(rng, i)
        field = rng.choice(["email", "phone"])
        doc["context"]["traits"] = {field: rng.choice(WRONG_STRINGS)}
        return kind, orjson.dumps(doc), None, NO_IDS
    if kind == "wrong_type_envelope":  # not an audience event at all: skipped and counted, never dead-lettered
        path, value_ = rng.choice([("type", 5), ("type", ["track"]), ("context", "ctx"), ("context.personas", [])])
        return kind, orjson.dumps(_set(_doc(rng, i), path, value_)), None, SKIP
    if kind == "non_object_json":
        value = rng.choice([b"[1,2,3]", b'"a string"', b"42", b"null", b"true", b"[]", b'{"hello":"world"}'])
        return kind, value, None, INVALID
    if kind == "canonical_wrong_types":
        doc = rng.choice(
            [
                {"audience_key": 5, "action": "add", "email": f"c{i}@example.com"},
                {"audience_key": "k", "action": "upsert", "email": f"c{i}@example.com"},
                {"audience_key": "k", "action": ["add"], "email": f"c{i}@example.com"},
                {"audience_key": "k", "action": "add", "audience_id": "abc", "email": f"c{i}@example.com"},
                {"audience_key": "k", "action": "add", "advertiser_id": {"id": 1}, "email": f"c{i}@example.com"},
                {"audience_key": "", "action": "delete", "email": f"c{i}@example.com"},
            ]
        )
        return kind, orjson.dumps(doc), None, INVALID
    if kind == "deep_json":
        depth = 10_000
        shape = rng.choice(["array", "in_event", "space"])
        nested = b"[" * depth + b"]" * depth
        if shape == "in_event":
            value = b'{"type":"track","context":' + nested + b"}"
        elif shape == "space":
            value = b' {"type":"track","x":' + nested + b"}"
        else:
            value = nested
        return kind, value, None, INVALID
    if kind == "oversized":  # otherwise a valid audience event
        doc = _doc(rng, i)
        doc["properties"]["padding"] = "x" * rng.randint(MAX_RECORD_BYTES + 1, 60_000)
        return kind, orjson.dumps(doc), None, INVALID
    if kind == "confluent_unknown_schema":
        if rng.random() < 0.2:
            return kind, b"\x00" + rng.randbytes(rng.randint(0, 3)), None, INVALID  # shorter than the header
        headers = [("content-type", b"application/vnd.confluent.avro")] if rng.random() < 0.3 else None
        value = b"\x00" + rng.randint(1, 2**31).to_bytes(4, "big") + rng.randbytes(rng.randint(0, 80))
        return kind, value, headers, INVALID
    if kind == "empty":
        return kind, rng.choice([b"", None]), None, INVALID
    # no_identifiers: a valid audience event whose identifiers are absent or cannot be normalised
    variant = rng.choice(["none", "bad_email", "bad_phone", "zero_ad_id"])
    user = SampleUser(f"fz-{i}", None, None, None, None)
    if variant == "bad_email":
        user = SampleUser(f"fz-{i}", rng.choice(["not-an-email", "a@@b.com", "x@nodot"]), None, None, None)
    elif variant == "bad_phone":
        user = SampleUser(f"fz-{i}", None, rng.choice(["12", "phone", "+1"]), None, None)
    elif variant == "zero_ad_id":
        user = SampleUser(f"fz-{i}", None, None, "00000000-0000-0000-0000-000000000000", "ios")
    audience = DEFAULT_AUDIENCES[rng.randrange(len(DEFAULT_AUDIENCES))]
    return kind, orjson.dumps(segment_event(user, audience, True)), None, NO_IDS


def test_fuzzed_records_are_dead_lettered_once_and_good_ones_sync_exactly(
    broker: LocalBroker,
    topics: Topics,
    service_env: Callable[..., dict[str, str]],
    services: Callable[[dict[str, str]], ServiceProcess],
) -> None:
    t0 = time.monotonic()
    rng = random.Random(SEED)
    good = list(generate(GOOD, seed=SEED, users=300))
    bads = {f"bad-{i:05d}".encode(): bad_record(rng, i) for i in range(BAD)}
    # Interleave, keeping the good events' order (last action wins is per user, and a user is one key).
    slots = [True] * GOOD + [False] * BAD
    rng.shuffle(slots)
    good_it, bad_it = iter(good), iter(bads.items())
    records: list[tuple[bytes, bytes | None, Headers]] = []
    for is_good in slots:
        if is_good:
            e = next(good_it)
            records.append((e.key, e.value, None))
        else:
            key, (_, value, headers, _) = next(bad_it)
            records.append((key, value, headers))

    p = Producer({"bootstrap.servers": broker.bootstrap, "enable.idempotence": True, "linger.ms": 5})
    for key, value, headers in records:
        while True:
            try:
                p.produce(topics.source, key=key, value=value, headers=headers)
                break
            except BufferError:
                p.poll(0.05)
    assert p.flush(30) == 0

    audiences = [(a.advertiser_id, a.audience_id) for a in DEFAULT_AUDIENCES]
    with SandboxThread(host="127.0.0.1", port=0, advertisers=[ADVERTISER_ID], audiences=audiences) as sb:
        svc = services(service_env(sb.url, MAX_RECORD_BYTES=str(MAX_RECORD_BYTES)))
        expected = expected_membership(good)

        def synced() -> bool:
            assert svc.proc is not None and svc.proc.poll() is None, f"service died: {svc.log()}"
            return membership(sb, DEFAULT_AUDIENCES) == expected

        wait_until(synced, 90, "good events synced around the bad ones")
        want_dlq = {k: outcome for k, (_, _, _, outcome) in bads.items() if outcome != SKIP}
        n_skip = sum(1 for *_, outcome in bads.values() if outcome == SKIP)
        letters = read_topic(broker, topics.dlq, expect=len(want_dlq), timeout_s=60)
        wait_until(
            lambda: svc.metric("audience_sync_events_consumed_total") == len(records), 20, "all records consumed"
        )
        skipped = svc.metric("audience_sync_events_skipped_total")
        assert svc.http_status("/healthz") == 200
        assert svc.stop() == 0, svc.log()
        log = svc.log_path.read_text(errors="replace")

    keyed = by_key(letters)
    kinds = Counter(kind for kind, *_ in bads.values())
    got = reasons(letters)
    print(
        f"\nfuzz seed={SEED}: records={len(records)} good={GOOD} bad={BAD} by kind={dict(sorted(kinds.items()))}; "
        f"dead letters={dict(got)} skipped={skipped:.0f}; duration={time.monotonic() - t0:.1f}s"
    )
    assert set(keyed) == set(want_dlq), (
        f"missing {sorted(set(want_dlq) - set(keyed))[:10]}, unexpected {sorted(set(keyed) - set(want_dlq))[:10]}"
    )
    dup = [k for k, v in keyed.items() if len(v) != 1]
    assert not dup, f"dead-lettered more than once: {dup[:10]}"
    wrong = {
        (bads[k][0], want, header_value(v[0].headers(), "dlq.reason"))
        for k, v in keyed.items()
        if header_value(v[0].headers(), "dlq.reason") != (want := want_dlq[k])
    }
    assert not wrong, f"(kind, expected, got) reasons: {sorted(wrong)[:10]}"
    for k, v in keyed.items():
        assert v[0].value() == bads[k][1] or (not v[0].value() and not bads[k][1]), "original value kept"
        error = header_value(v[0].headers(), "dlq.error") or ""
        if bads[k][0] == "deep_json":  # reached the parser: not stopped by the size limit
            assert "invalid JSON" in error and "byte limit" not in error, error
        if bads[k][0] == "oversized":
            assert f"{MAX_RECORD_BYTES}-byte limit" in error, error
    assert skipped == n_skip
    assert "Traceback" not in log and "task failed" not in log
    ends = committed(broker, topics.group, topics.source, topics.partitions)
    assert sum(max(0, v) for v in ends.values()) == len(records), "every offset committed"
