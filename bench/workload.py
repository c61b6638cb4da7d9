"""Deterministic (seeded) benchmark inputs, generated lazily so a 1,000,000-event backlog needs no user table.

Kinds:
  email           Segment Engage track events, email only (1 in 7 messy: spaces and capitals)
  phone-national  phone only, US national formats: "(415) 555-0123", "415-555-0123", "415.555.0123", "415 555 0123"
  phone-e164      phone only, already E.164: "+14155550123" (the service's fast path)
  mixed           like `service.devtools.sample.make_users(identifiers="mixed")`: email, phone on half, ad id on a third
  avro            the canonical event (schemas/audience_membership.avsc) as schemaless Avro, mixed identifiers;
                  no content-type header: the service detects it by the first byte

User and audience picks, enter/exit, identifiers are a function of the seed; only Segment's messageId and the
event timestamps are not (they are set at generation time, as `service.devtools.sample` does).
"""

from __future__ import annotations

import copy
import io
import random
import time
import uuid
from collections.abc import Iterator
from typing import Any

import fastavro
import orjson

from service.core.schemas import load_canonical_schema
from service.devtools.sample import (
    ADVERTISER_ID,
    DEFAULT_AUDIENCES,
    SampleAudience,
    SampleUser,
    offline_event,
    segment_event,
)

KINDS = ("email", "phone-national", "phone-e164", "mixed", "avro")

_AREA_CODES = (415, 628, 650, 212, 312, 617, 206, 512)
_NATIONAL_FORMATS = ("({a}) {e:03d}-{l:04d}", "{a}-{e:03d}-{l:04d}", "{a}.{e:03d}.{l:04d}", "{a} {e:03d} {l:04d}")

Record = tuple[bytes, bytes, list[tuple[str, str | bytes | None]] | None]  # key, value, headers


def _digits(i: int) -> tuple[int, int, int]:
    """A unique, valid-looking US number per user index (< 51,200,000): area, exchange 200-999, line."""
    area = _AREA_CODES[(i // 6_400_000) % len(_AREA_CODES)]
    rest = i % 6_400_000
    return area, 200 + rest // 10_000 % 640, rest % 10_000


def _ad_id(i: int) -> str:
    return str(uuid.UUID(int=(i * 0x9E3779B97F4A7C15F39CC0605CEDC834 + 0x1234567) % (1 << 128), version=4))


def user(i: int, kind: str) -> SampleUser:
    """User number `i` for a workload kind (pure function of i and kind)."""
    email = phone = ad_id = device = None
    if kind in ("email", "mixed", "avro"):
        email = f"  User{i}.Sample@Example.com " if i % 7 == 0 else f"user{i}@example.com"
    if kind == "phone-national":
        a, e, ln = _digits(i)
        phone = _NATIONAL_FORMATS[i % len(_NATIONAL_FORMATS)].format(a=a, e=e, l=ln)
    elif kind == "phone-e164":
        a, e, ln = _digits(i)
        phone = f"+1{a}{e:03d}{ln:04d}"
    elif kind in ("mixed", "avro") and i % 2 == 0:
        a, e, ln = _digits(i)
        phone = f"+1{a}{e:03d}{ln:04d}" if i % 3 else f"({a}) {e:03d}-{ln:04d}"
    if kind in ("mixed", "avro") and i % 3 == 0:
        ad_id = _ad_id(i)
        device = "android" if i % 2 else "ios"
    return SampleUser(f"user-{i}", email, phone, ad_id, device)


class _Avro:
    def __init__(self) -> None:
        self.schema = fastavro.parse_schema(copy.deepcopy(load_canonical_schema()))

    def encode(self, u: SampleUser, audience: SampleAudience, entered: bool, n: int) -> bytes:
        rec: dict[str, Any] = {
            "audience_key": audience.key,
            "action": "add" if entered else "delete",
            "event_id": f"evt-{n}",
            "event_time": int(time.time() * 1000),
            "user_id": u.user_id,
            "audience_id": audience.audience_id,
            "advertiser_id": audience.advertiser_id,
            "email": u.email,
            "phone": u.phone,
            "idfa": u.ad_id if u.device_type == "ios" else None,
            "aaid": u.ad_id if u.device_type == "android" else None,
        }
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, self.schema, rec)
        return buf.getvalue()


def user_count(count: int, users: int | None = None) -> int:
    """How many distinct users `generate(kind, count, users=users)` draws from (default count // 2)."""
    return max(1, users if users is not None else max(1000, count // 2))


def picks(count: int, *, seed: int = 1, users: int | None = None) -> Iterator[tuple[int, int, bool]]:
    """(user index, audience index, entered) per event: the seeded draws behind `generate`, without the payloads."""
    n_users = user_count(count, users)
    n_audiences = len(DEFAULT_AUDIENCES)
    rng = random.Random(seed)
    for _ in range(count):
        i = rng.randrange(n_users)
        a = rng.randrange(n_audiences)
        yield i, a, rng.random() < 0.7


def generate(kind: str, count: int, *, seed: int = 1, users: int | None = None) -> Iterator[Record]:
    """`count` records of `kind` over `users` users (default count // 2, so most events hit a fresh cell)."""
    if kind not in KINDS:
        raise ValueError(f"unknown workload {kind!r}; one of {', '.join(KINDS)}")
    audiences = DEFAULT_AUDIENCES
    avro = _Avro() if kind == "avro" else None
    cache: dict[int, SampleUser] = {}
    for n, (i, a, entered) in enumerate(picks(count, seed=seed, users=users)):
        u = cache.get(i)
        if u is None:
            u = user(i, kind)
            if len(cache) < 200_000:
                cache[i] = u
        audience = audiences[a]
        if avro is not None:
            yield u.user_id.encode(), avro.encode(u, audience, entered, n), None
        else:
            yield u.user_id.encode(), orjson.dumps(segment_event(u, audience, entered)), None


def offline(count: int, *, seed: int = 3) -> Iterator[Record]:
    """`count` offline conversions (service.devtools.sample.offline_event: half canonical, half Segment
    e-commerce), over `count // 2` users with the mixed workload's identifiers, happened in the last hour."""
    rng = random.Random(seed)
    n_users = user_count(count)
    now = time.time()
    for n in range(count):
        u = user(rng.randrange(n_users), "mixed")
        yield u.user_id.encode(), offline_event(u, rng, n, now=now), None


def offline_mappings() -> str:
    """A mappings file with the workloads' audiences and a default offline event set (so conversions are sent)."""
    lines = ["audiences:"]
    for a in DEFAULT_AUDIENCES:
        lines += [f"  {a.key}:", f'    advertiser_id: "{a.advertiser_id}"', f'    audience_id: "{a.audience_id}"']
    lines += ["offline_events:", '  default_event_set_id: "7300000000000000001"']
    return "\n".join(lines) + "\n"


def sandbox_audiences() -> list[str]:
    """`--audience ADV:AUD` arguments for the sandbox: every audience the workloads use."""
    return [f"{a.advertiser_id}:{a.audience_id}" for a in DEFAULT_AUDIENCES] or [f"{ADVERTISER_ID}:1"]
