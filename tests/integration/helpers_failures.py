"""Shared helpers of the failure, chaos, fuzz and privacy tests (real broker, real sandbox, real service)."""

from __future__ import annotations

import hashlib
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer
from confluent_kafka import TopicPartition as KTP

from service.core.dead_letters import header_value
from service.devtools.broker import LocalBroker
from service.devtools.sample import ADVERTISER_ID, SampleAudience, SampleEvent, SampleUser, segment_event
from service.devtools.sandbox import FaultPlan, SandboxThread

MAPPING = "/segment/mapping/"

# Two advertisers, one audience each, plus one audience id the sandbox never heard of.
ADV_A = ADVERTISER_ID
ADV_B = "7000000000000000002"
AUD_A = SampleAudience("loyal_a", "1200000001", ADV_A)
AUD_B = SampleAudience("loyal_b", "1200000002", ADV_B)
AUD_MISSING = SampleAudience("ghost", "1299999999", ADV_A)
AUDIENCES = (AUD_A, AUD_B)

# Fast retries so failure tests stay short; each test may override.
FAST = {
    "BATCH_LINGER_MS": "100",
    "RETRY_BASE_S": "0.1",
    "RETRY_MAX_S": "1",
    "AUTH_RETRY_S": "1",
}


def sandbox(*, tokens: Iterable[str] | None = None, max_rows_per_request: int = 10_000) -> SandboxThread:
    """A sandbox knowing advertisers A and B and their audiences; use it as a context manager."""
    auds = [(a.advertiser_id, a.audience_id) for a in AUDIENCES]
    return SandboxThread(
        host="127.0.0.1",
        port=0,
        tokens=tokens,
        advertisers=[ADV_A, ADV_B],
        audiences=auds,
        max_rows_per_request=max_rows_per_request,
    )


def plan(*rules: dict[str, Any], seed: int = 7, rate_limit_qps: float | None = None) -> FaultPlan:
    obj: dict[str, Any] = {"seed": seed, "rules": list(rules)}
    if rate_limit_qps is not None:
        obj["rate_limit_qps"] = rate_limit_qps
    return FaultPlan.from_json(obj)


def email_user(name: str) -> SampleUser:
    email = f"{name}@example.com"
    return SampleUser(name, email, None, None, None, (("EMAIL_SHA256", email),))


def event(user: SampleUser, audience: SampleAudience, entered: bool = True) -> SampleEvent:
    doc = segment_event(user, audience, entered)
    return SampleEvent(user.user_id.encode(), orjson.dumps(doc), user, audience, entered)


def unique_events(n: int, audience: SampleAudience, prefix: str, entered: bool = True) -> list[SampleEvent]:
    """`n` events, one per distinct email-only user: none supersedes another, so each ends uploaded or dead."""
    return [event(email_user(f"{prefix}-{i}"), audience, entered) for i in range(n)]


def membership(sb: SandboxThread, audiences: Iterable[SampleAudience] = AUDIENCES) -> dict[str, dict[str, set[str]]]:
    out: dict[str, dict[str, set[str]]] = {}
    for a in audiences:
        got = {t: set(hs) for t, hs in sb.state.members(a.audience_id).items() if hs}
        if got:
            out[a.audience_id] = got
    return out


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def read_topic(
    broker: LocalBroker, topic: str, *, expect: int, timeout_s: float = 30.0, idle_s: float = 2.0, partitions: int = 1
) -> list[Any]:
    """Every record of `topic` from the beginning, by direct assignment (no group join, nothing committed).

    Stops once `expect` records arrived and nothing more came for `idle_s` (duplicates would show up), or at
    the deadline. The high watermark is not used: tansu's ListOffsets(latest) can be short
    (docs/design.md "A real broker for tests and `make run`").
    """
    c = Consumer(
        {
            "bootstrap.servers": broker.bootstrap,
            "group.id": f"reader-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "enable.partition.eof": False,
        }
    )
    c.assign([KTP(topic, p, OFFSET_BEGINNING) for p in range(partitions)])
    out: list[Any] = []
    deadline = time.monotonic() + timeout_s
    last_new = time.monotonic()
    try:
        while time.monotonic() < deadline:
            got = [m for m in c.consume(1000, 0.2) if m.error() is None]
            if got:
                out.extend(got)
                last_new = time.monotonic()
            elif len(out) >= expect and time.monotonic() - last_new >= idle_s:
                break
    finally:
        c.close()
    return out


def reasons(letters: Iterable[Any]) -> Counter[str]:
    return Counter(header_value(m.headers(), "dlq.reason") or "?" for m in letters)


def by_key(letters: Iterable[Any]) -> dict[bytes, list[Any]]:
    out: dict[bytes, list[Any]] = {}
    for m in letters:
        out.setdefault(m.key(), []).append(m)
    return out


def max_in_window(times: Sequence[float], window_s: float = 1.0) -> int:
    """Most events in any half-open window [t, t + window_s) of the sorted times."""
    ts = sorted(times)
    best = j = 0
    for i, t in enumerate(ts):
        while j < len(ts) and ts[j] < t + window_s:
            j += 1
        best = max(best, j - i)
    return best
