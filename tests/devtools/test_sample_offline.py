"""`produce-sample --offline`: conversions mixed into the sample traffic (service/devtools/sample.py `mixed`)."""

from __future__ import annotations

import time
from typing import Any

import orjson

from service.core.mappings import parse_mappings
from service.core.membership import Resolver, ResolverSettings
from service.core.model import AudienceChange
from service.core.offline import OfflineEvent
from service.core.schemas import SchemaStore
from service.devtools.sample import ADVERTISER_ID, generate, mixed


def shape(value: bytes) -> tuple[Any, ...]:
    """What the seed decides of a membership event (its messageId and timestamp are per run)."""
    doc = orjson.loads(value)
    return doc["userId"], doc["event"], doc["context"]["personas"]["computation_key"]


def is_membership(value: bytes) -> bool:
    return b'"personas"' in value


def test_membership_events_are_those_of_generate_and_the_rest_are_valid_conversions() -> None:
    records = list(mixed(2000, offline=0.2, seed=5, users=300))
    resolver = Resolver(
        ResolverSettings(),
        parse_mappings(
            {"audiences": {}, "offline_events": {"event_sets": {ADVERTISER_ID: "7100000000000000001"}}}, "m.yaml"
        ),
        SchemaStore(),
        wall=time.time,
    )
    offline = [v for _, v in records if not is_membership(v)]
    members = [v for _, v in records if is_membership(v)]
    assert 300 <= len(offline) <= 500  # about a fifth
    outcomes = [resolver.process(v, None).outcome for v in offline]
    assert all(isinstance(o, OfflineEvent) for o in outcomes), {type(o).__name__ for o in outcomes}
    assert len({o.event_id for o in outcomes if isinstance(o, OfflineEvent)}) == len(offline)
    assert all(isinstance(resolver.process(v, None).outcome, AudienceChange) for v in members[:50])
    expected = [shape(e.value) for e in generate(2000, seed=5, users=300)][: len(members)]
    assert [shape(v) for v in members] == expected, "the membership stream is unchanged by the conversions"


def test_no_offline_share_is_plain_generate() -> None:
    got = [shape(v) for _, v in mixed(50, offline=0.0, seed=3, users=20)]
    assert got == [shape(e.value) for e in generate(50, seed=3, users=20)]
