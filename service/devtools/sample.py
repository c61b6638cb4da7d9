"""`audience-sync produce-sample`: realistic Segment Engage audience traffic, seeded and reproducible.

`--offline [SHARE]` mixes offline conversions into the same topic (issue 12): about SHARE of the records (0.1 when
no share is given) are purchases and leads, half canonical offline events (`schemas/offline_event.json`), half
Segment "Order Completed" / "Checkout Started" tracks without `context.personas`, all for `ADVERTISER_ID`, with
stable event ids. The service sends them once its mappings file names an event set (`offline_events:`).

The same generator feeds `make run`, the integration tests (which compute the expected TikTok state from it)
and the benchmark.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import orjson

ADVERTISER_ID = "7000000000000000001"


@dataclass(frozen=True, slots=True)
class SampleAudience:
    key: str
    audience_id: str
    advertiser_id: str = ADVERTISER_ID


DEFAULT_AUDIENCES = (
    SampleAudience("high_value_customers", "1100000001"),
    SampleAudience("cart_abandoners", "1100000002"),
    SampleAudience("lapsed_subscribers", "1100000003"),
)


@dataclass(frozen=True, slots=True)
class SampleUser:
    """Raw identifiers as a CDP would send them, and the normalised forms TikTok should receive hashed."""

    user_id: str
    email: str | None
    phone: str | None
    ad_id: str | None
    device_type: str | None
    canonical: tuple[tuple[str, str], ...] = ()

    def expected_hashes(self) -> dict[str, str]:
        return {t: hashlib.sha256(v.encode()).hexdigest() for t, v in self.canonical}


def make_users(n: int, rng: random.Random, identifiers: str = "mixed") -> list[SampleUser]:
    """Unique identifiers per user, some in messy forms (case, spaces, national phone numbers)."""
    users = []
    for i in range(n):
        email = phone = ad_id = device = None
        canonical: list[tuple[str, str]] = []
        if identifiers in ("mixed", "email"):
            email = f"  User{i}.Sample@Example.com " if i % 7 == 0 else f"user{i}@example.com"
            canonical.append(("EMAIL_SHA256", email.strip().lower()))
        if identifiers == "phone" or (identifiers == "mixed" and i % 2 == 0):
            if i % 3:
                phone = f"+1415{2_000_000 + i % 8_000_000:07d}"
                canonical.append(("PHONE_SHA256", phone))
            else:
                exchange, line = 200 + (i // 10_000) % 800, i % 10_000
                phone = f"(628) {exchange:03d}-{line:04d}"
                canonical.append(("PHONE_SHA256", f"+1628{exchange:03d}{line:04d}"))
        if identifiers == "mixed" and i % 3 == 0:
            ad_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
            device = "android" if i % 2 else "ios"
            canonical.append(("AAID_SHA256" if device == "android" else "IDFA_SHA256", ad_id))
        users.append(SampleUser(f"user-{i}", email, phone, ad_id, device, tuple(canonical)))
    return users


@dataclass(frozen=True, slots=True)
class SampleEvent:
    key: bytes
    value: bytes
    user: SampleUser
    audience: SampleAudience
    entered: bool


def expected_membership(events: list[SampleEvent]) -> dict[str, dict[str, set[str]]]:
    """TikTok's state after `events` in order: the last event per user and audience wins."""
    last: dict[tuple[str, str], SampleEvent] = {}
    for ev in events:
        last[(ev.audience.audience_id, ev.user.user_id)] = ev
    out: dict[str, dict[str, set[str]]] = {}
    for (aud, _), ev in last.items():
        if ev.entered:
            for t, h in ev.user.expected_hashes().items():
                out.setdefault(aud, {}).setdefault(t, set()).add(h)
    return out


def iso_utc_ms(now: float) -> str:
    """ISO-8601 UTC with milliseconds, seconds and milliseconds from the same reading.

    `time.gmtime()` without an argument reads the kernel's coarse clock, which lags `time.time()` by up to a tick:
    mixing the two stamped ~0.4% of events a whole second early (seen as a 1 s tail in the latency benchmark).
    """
    ms = int(now * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms // 1000)) + f".{ms % 1000:03d}Z"


def segment_event(
    user: SampleUser, audience: SampleAudience, entered: bool, *, with_ids: bool = True
) -> dict[str, object]:
    """An Engage "Audience Entered/Exited" track event shaped like Segment's fixtures."""
    personas: dict[str, object] = {
        "computation_class": "audience",
        "computation_id": f"aud_{audience.key}",
        "computation_key": audience.key,
        "namespace": "spa_sample",
        "space_id": "spa_sample",
    }
    if with_ids:
        personas["external_audience_id"] = audience.audience_id
        personas["audience_settings"] = {"advertiserId": audience.advertiser_id}
    traits: dict[str, object] = {}
    if user.email:
        traits["email"] = user.email
    if user.phone:
        traits["phone"] = user.phone
    context: dict[str, object] = {"personas": personas, "traits": traits}
    if user.ad_id:
        context["device"] = {"advertisingId": user.ad_id, "type": user.device_type}
    return {
        "type": "track",
        "event": "Audience Entered" if entered else "Audience Exited",
        "userId": user.user_id,
        "messageId": f"personas_{uuid.uuid4().hex}",
        "timestamp": iso_utc_ms(time.time()),
        "context": context,
        "properties": {"audience_key": audience.key, audience.key: entered},
    }


def generate(
    count: int,
    *,
    seed: int = 1,
    users: int = 1000,
    audiences: tuple[SampleAudience, ...] = DEFAULT_AUDIENCES,
    identifiers: str = "mixed",
    with_ids: bool = True,
) -> Iterator[SampleEvent]:
    """`count` membership events over `users` users; about 70% enters, 30% exits."""
    rng = random.Random(seed)
    people = make_users(users, rng, identifiers)
    for _ in range(count):
        user = people[rng.randrange(len(people))]
        audience = audiences[rng.randrange(len(audiences))]
        entered = rng.random() < 0.7
        doc = segment_event(user, audience, entered, with_ids=with_ids)
        yield SampleEvent(user.user_id.encode(), orjson.dumps(doc), user, audience, entered)


OFFLINE_SEGMENT_EVENTS = ("Order Completed", "Checkout Started", "Product Added", "Signed Up")
OFFLINE_CANONICAL_EVENTS = ("CompletePayment", "PlaceAnOrder", "Contact", "SubmitForm")


def offline_event(user: SampleUser, rng: random.Random, n: int, *, now: float | None = None) -> bytes:
    """One offline conversion of `user`: canonical or Segment e-commerce, happened up to an hour before `now`."""
    at = (time.time() if now is None else now) - rng.uniform(0, 3600)
    value = round(rng.uniform(5, 250), 2)
    if rng.random() < 0.5:
        doc: dict[str, object] = {
            "offline_event": True,
            "event": OFFLINE_CANONICAL_EVENTS[rng.randrange(len(OFFLINE_CANONICAL_EVENTS))],
            "event_time": int(at * 1000),
            "message_id": f"pos-{n}-{rng.getrandbits(48):012x}",
            "advertiser_id": ADVERTISER_ID,
            "channel": "in_store",
            "external_id": user.user_id,
            "currency": "USD",
            "value": value,
            "order_id": f"ord-{n}",
        }
        if user.email:
            doc["email"] = user.email
        if user.phone:
            doc["phone"] = user.phone
        return orjson.dumps(doc)
    traits: dict[str, object] = {}
    if user.email:
        traits["email"] = user.email
    if user.phone:
        traits["phone"] = user.phone
    return orjson.dumps(
        {
            "type": "track",
            "event": OFFLINE_SEGMENT_EVENTS[rng.randrange(len(OFFLINE_SEGMENT_EVENTS))],
            "userId": user.user_id,
            "messageId": f"ajs-{n}-{rng.getrandbits(48):012x}",
            "timestamp": iso_utc_ms(at),
            "context": {"traits": traits, "ip": "203.0.113.7"},
            "properties": {
                "order_id": f"sord-{n}",
                "revenue": value,
                "currency": "USD",
                "advertiser_id": ADVERTISER_ID,
                "products": [{"product_id": f"sku-{rng.randrange(100)}", "price": value, "quantity": 1}],
            },
        }
    )


def mixed(
    count: int, *, offline: float, seed: int = 1, users: int = 1000, identifiers: str = "mixed"
) -> Iterator[tuple[bytes, bytes]]:
    """(key, value) records: `generate`'s membership events with about `offline` of them offline conversions.

    The membership events are exactly those `generate` yields for the same seed (the conversions use their own
    random stream), so expected audience membership is unchanged by the conversions."""
    rng = random.Random(seed ^ 0x0FF1)
    people = make_users(users, random.Random(seed + 1), identifiers)
    membership = generate(count, seed=seed, users=users, identifiers=identifiers)
    for n in range(count):
        if offline > 0 and rng.random() < offline:
            user = people[rng.randrange(len(people))]
            yield user.user_id.encode(), offline_event(user, rng, n)
        else:
            ev = next(membership)
            yield ev.key, ev.value


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="audience-sync produce-sample", description=__doc__)
    p.add_argument("--bootstrap", default=os.environ.get("KAFKA_BOOTSTRAP_SERVERS"))
    p.add_argument("--topic", default=os.environ.get("SOURCE_TOPIC", "audience-membership").split(",")[0])
    p.add_argument("--count", type=int, default=10_000, help="events to produce (default 10000)")
    p.add_argument("--rate", type=float, default=0.0, help="events per second; 0 = as fast as possible")
    p.add_argument("--users", type=int, default=1000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--identifiers", choices=("mixed", "email", "phone"), default="mixed")
    p.add_argument(
        "--offline",
        type=float,
        nargs="?",
        const=0.1,
        default=0.0,
        metavar="SHARE",
        help="mix in offline conversions, about SHARE of the records (0.1 when no share is given)",
    )
    args = p.parse_args(argv)
    if not 0.0 <= args.offline <= 1.0:
        print("audience-sync produce-sample: --offline SHARE must be between 0 and 1", file=sys.stderr)
        return 2
    if not args.bootstrap:
        print(
            "audience-sync produce-sample: --bootstrap or KAFKA_BOOTSTRAP_SERVERS is required",
            file=sys.stderr,
        )
        return 2
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": args.bootstrap, "enable.idempotence": True, "linger.ms": 20})
    start = time.monotonic()
    sent = 0
    records = mixed(args.count, offline=args.offline, seed=args.seed, users=args.users, identifiers=args.identifiers)
    for key, value in records:
        while True:
            try:
                producer.produce(args.topic, key=key, value=value)
                break
            except BufferError:
                producer.poll(0.05)
        sent += 1
        if args.rate > 0:
            ahead = sent / args.rate - (time.monotonic() - start)
            if ahead > 0:
                producer.poll(0)
                time.sleep(ahead)
        if sent % 10_000 == 0:
            producer.poll(0)
    left = producer.flush(30)
    elapsed = time.monotonic() - start
    print(f"produced {sent - left} events to {args.topic} in {elapsed:.1f}s", file=sys.stderr)
    return 0 if left == 0 else 1
