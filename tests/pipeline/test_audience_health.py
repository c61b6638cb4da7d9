"""Audience health poll: pure target selection, then real polls of the TikTok sandbox over loopback (batches of
at most 100 ids, a deleted audience among them, invalid and expiring audiences, failures, the rate limit)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta

import aiohttp
import pytest

from service import metrics as m
from service.core.mappings import AudienceMapping, Mappings
from service.devtools.sandbox import SandboxServer, SandboxState
from service.pipeline.audience_health import AudienceHealth, Target, audience_targets, parse_time
from service.tiktok.audiences_api import AudienceInfo, AudiencesApi
from service.tiktok.client import TikTokClient

ADV = "7000000000000000001"
OTHER = "7000000000000000002"
TOKEN = "sandbox-token"
GET_PATH = "/dmp/custom_audience/get/"
GAUGES = (m.AUDIENCE_MEMBERS, m.AUDIENCE_VALID, m.AUDIENCE_EXPIRY, m.AUDIENCE_FIRST_UPLOAD)


@pytest.fixture(autouse=True)
def clean_gauges() -> Iterator[None]:
    for g in GAUGES:
        g.clear()
    m.AUDIENCE_HEALTH_POLLED.set(0)
    yield
    for g in GAUGES:
        g.clear()


def value(gauge: str, key: str, advertiser: str = ADV) -> float | None:
    return m.REGISTRY.get_sample_value(f"audience_sync_{gauge}", {"audience_key": key, "advertiser_id": advertiser})


def series(gauge: str) -> set[str]:
    return {
        s.labels["audience_key"]
        for fam in m.REGISTRY.collect()
        if fam.name == f"audience_sync_{gauge}"
        for s in fam.samples
    }


class CountingApi(AudiencesApi):
    """The real API over loopback, remembering how many ids each request carried."""

    def __init__(self, client: TikTokClient) -> None:
        super().__init__(client)
        self.sizes: list[int] = []

    async def get_audiences(self, advertiser_id: str, audience_ids: Sequence[str]) -> list[AudienceInfo]:
        self.sizes.append(len(audience_ids))
        return await super().get_audiences(advertiser_id, audience_ids)


@asynccontextmanager
async def sandbox_api(state: SandboxState, token: str = TOKEN) -> AsyncIterator[tuple[SandboxServer, CountingApi]]:
    async with SandboxServer(state=state) as server, aiohttp.ClientSession() as session:
        yield server, CountingApi(TikTokClient(session, server.url, lambda: token, timeout_s=5))


def targets_of(*pairs: tuple[str, str], advertiser: str = ADV) -> list[Target]:
    return [Target(key, advertiser, aid) for key, aid in pairs]


class FakeTime:
    """Monotonic and wall clocks that only move when the poller sleeps."""

    def __init__(self, wall: float = 1_800_000_000.0) -> None:
        self.now = 0.0
        self.wall0 = wall
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    def wall(self) -> float:
        return self.wall0 + self.now

    async def sleep(self, s: float) -> None:
        self.slept.append(s)
        self.now += s
        await asyncio.sleep(0)


def poller(api: AudiencesApi, targets: list[Target], t: FakeTime | None = None, **kw: float) -> AudienceHealth:
    t = t or FakeTime()
    return AudienceHealth(api, lambda: targets, clock=t.clock, wall=t.wall, sleep=t.sleep, interval_s=300, **kw)


# -- pure ---------------------------------------------------------------------------------------------------------


def test_targets_are_the_mapped_audiences_of_known_advertisers() -> None:
    mappings = Mappings(
        {
            "vip": AudienceMapping("vip", ADV, "111"),
            "default_adv": AudienceMapping("default_adv", None, "222"),
            "created": AudienceMapping("created", OTHER, None, "Seed", True),
            "not_yet": AudienceMapping("not_yet", ADV, None, "Later", True),
        }
    )
    got = audience_targets(mappings, "42", {(OTHER, "Seed"): "333"})
    assert got == [
        Target("vip", ADV, "111"),
        Target("default_adv", "42", "222"),
        Target("created", OTHER, "333", created_on_demand=True),
    ]
    # without DEFAULT_ADVERTISER_ID an entry without advertiser cannot be read
    assert [t.audience_key for t in audience_targets(mappings, None, {})] == ["vip"]


def test_parse_time() -> None:
    assert parse_time("2024-08-02 16:27:49") == datetime(2024, 8, 2, 16, 27, 49, tzinfo=UTC).timestamp()
    assert parse_time("1722616069") == 1722616069.0
    assert parse_time("") is None and parse_time("soon") is None


# -- over loopback ------------------------------------------------------------------------------------------------


async def test_poll_reads_members_validity_and_expiry_in_batches_of_at_most_100() -> None:
    state = SandboxState()
    state.add_advertiser(ADV)
    state.add_advertiser(OTHER)
    ids = [str(1_100_000_000 + i) for i in range(150)]
    for aid in ids:
        state.add_audience(ADV, aid)
    state.add_audience(OTHER, "999")
    state.set_cover_num(ids[0], 5000)
    state.set_cover_num(ids[1], 300)
    soon = datetime.now(UTC).replace(microsecond=0) + timedelta(days=3)
    state.set_health(ids[2], is_valid=False, expired_time=soon)
    targets = targets_of(*((f"k{i}", aid) for i, aid in enumerate(ids)))
    targets.append(Target("other", OTHER, "999"))
    t = FakeTime()
    async with sandbox_api(state) as (server, api):
        result = await poller(api, targets, t).poll_once()
    assert result.complete and api.sizes == [100, 50, 1]
    assert server.state.request_counts[GET_PATH] == 3
    assert value("audience_members", "k0") == 5000 and value("audience_valid", "k0") == 1
    assert value("audience_members", "k1") == 300 and value("audience_valid", "k1") == 1
    assert value("audience_members", "k3") == 0 and value("audience_valid", "k3") == 0  # sandbox: empty = invalid
    assert value("audience_valid", "k2") == 0
    assert value("audience_expiry_timestamp_seconds", "k2") == soon.timestamp()
    created = state.audiences[ids[0]].create_time.replace(microsecond=0)
    assert value("audience_expiry_timestamp_seconds", "k0") == (created + timedelta(days=365)).timestamp()
    # mapped by id: the first upload is this process's first read of it
    assert value("audience_first_upload_timestamp_seconds", "k0") == t.wall()
    assert value("audience_members", "other", OTHER) == 0
    assert len(series("audience_members")) == 151
    assert m.REGISTRY.get_sample_value("audience_sync_audience_health_last_poll_timestamp_seconds") == t.wall()


async def test_a_deleted_audience_is_found_by_halving_and_does_not_hide_the_others() -> None:
    state = SandboxState()
    state.add_advertiser(ADV)
    state.add_advertiser(OTHER)
    for aid in ("1", "2", "3", "4", "5"):
        state.add_audience(ADV, aid)
        state.set_cover_num(aid, 2000)
    state.add_audience(OTHER, "6")  # another advertiser's: TikTok answers 40002 for it
    targets = targets_of(("a", "1"), ("b", "2"), ("gone", "404"), ("c", "3"), ("theirs", "6"), ("d", "4"), ("e", "5"))
    async with sandbox_api(state) as (_, api):
        health = poller(api, targets, qps=100)
        result = await health.poll_once()
        assert result.complete
        for key in ("a", "b", "c", "d", "e"):
            assert value("audience_members", key) == 2000 and value("audience_valid", key) == 1, key
        for key in ("gone", "theirs"):
            assert value("audience_valid", key) == 0, key
            assert value("audience_members", key) is None and value("audience_expiry_timestamp_seconds", key) is None
        # bounded by halving: at most 2 * ceil(log2 7) requests per missing id after the first, not one per id
        assert api.sizes[0] == 7 and len(api.sizes) <= 1 + 2 * 2 * 3
        # the audience appears (the mapping was fixed at TikTok): it reads normally at the next poll
        state.add_audience(ADV, "404")
        state.set_cover_num("404", 1500)
        await health.poll_once()
    assert value("audience_members", "gone") == 1500 and value("audience_valid", "gone") == 1


async def test_failures_keep_the_last_good_values_and_rate_limits_slow_the_poll() -> None:
    state = SandboxState()
    state.add_advertiser(ADV)
    state.add_audience(ADV, "1")
    state.set_cover_num("1", 4000)
    t = FakeTime()
    async with sandbox_api(state) as (server, api):
        health = poller(api, targets_of(("a", "1")), t)
        await health.poll_once()
        polled = t.wall()
        assert value("audience_members", "a") == 4000
        state.set_cover_num("1", 10)
        server.set_faults([{"kind": "code", "code": 40100, "path": GET_PATH, "count": 1}])
        t.now += 300
        result = await health.poll_once()
        assert not result.complete and "40100" in result.failed[0]
        assert value("audience_members", "a") == 4000, "a failed read keeps the last good value"
        assert m.REGISTRY.get_sample_value("audience_sync_audience_health_last_poll_timestamp_seconds") == polled
        server.set_faults([{"kind": "http", "status": 503, "path": GET_PATH, "count": 1}])
        t.now += 300
        assert not (await health.poll_once()).complete
        assert value("audience_members", "a") == 4000
        server.set_faults(None)
        t.now += 300
        assert (await health.poll_once()).complete
        assert value("audience_members", "a") == 10


async def test_the_token_bucket_paces_requests_at_one_per_second() -> None:
    state = SandboxState()
    state.add_advertiser(ADV)
    state.add_advertiser(OTHER)
    for i in range(250):
        state.add_audience(ADV, str(10_000 + i))
    state.add_audience(OTHER, "20000")
    targets = targets_of(*((f"k{i}", str(10_000 + i)) for i in range(250)))
    targets.append(Target("o", OTHER, "20000"))
    t = FakeTime()
    async with sandbox_api(state) as (_, api):
        await poller(api, targets, t).poll_once()
    assert api.sizes == [100, 100, 50, 1]
    assert sum(t.slept) == pytest.approx(3.0), "4 requests at 1 request/s: the first is free, then 3 s of waiting"


async def test_entries_removed_from_the_mappings_lose_their_series_and_created_audiences_use_create_time() -> None:
    created_at = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    state = SandboxState(clock=lambda: created_at)
    state.add_advertiser(ADV)
    state.add_audience(ADV, "1")
    seed = state.segment_audience({"advertiser_id": ADV, "action": "create", "custom_audience_name": "Seed"})
    entries = {
        "vip": AudienceMapping("vip", ADV, "1"),
        "seed": AudienceMapping("seed", ADV, None, "Seed", True),
    }
    current = {"mappings": Mappings(entries)}
    created = {(ADV, "Seed"): str(seed["audience_id"])}
    t = FakeTime()
    async with sandbox_api(state) as (_, api):
        health = AudienceHealth(
            api,
            lambda: audience_targets(current["mappings"], None, created),
            interval_s=300,
            clock=t.clock,
            wall=t.wall,
            sleep=t.sleep,
        )
        await health.poll_once()
        assert series("audience_valid") == {"vip", "seed"}
        assert value("audience_first_upload_timestamp_seconds", "seed") == created_at.timestamp()
        assert value("audience_first_upload_timestamp_seconds", "vip") == t.wall()
        current["mappings"] = Mappings({"seed": entries["seed"]})
        t.now += 300
        await health.poll_once()
        assert all(series(g._name.removeprefix("audience_sync_")) == {"seed"} for g in GAUGES)
        # mapped again later: its first upload counts from then, not from the first time
        current["mappings"] = Mappings(entries)
        t.now += 300
        await health.poll_once()
    assert value("audience_first_upload_timestamp_seconds", "vip") == t.wall()


async def test_run_survives_errors_and_auth_failures_without_logging_the_token(
    caplog: pytest.LogCaptureFixture,
) -> None:
    state = SandboxState()
    state.add_advertiser(ADV)
    state.add_audience(ADV, "1")
    state.set_cover_num("1", 1234)
    secret = "not-the-sandbox-token-s3cret"
    calls = {"n": 0}

    def targets() -> list[Target]:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom with a secret " + secret)  # a bug: its message is never logged
        return targets_of(("a", "1"))

    caplog.set_level(logging.INFO)
    async with SandboxServer(state=state) as server, aiohttp.ClientSession() as session:
        tokens = iter([secret, TOKEN, TOKEN, TOKEN, TOKEN])
        api = AudiencesApi(TikTokClient(session, server.url, lambda: next(tokens, TOKEN), timeout_s=5))
        health = AudienceHealth(api, targets, interval_s=0.01, qps=50)
        task = asyncio.create_task(health.run())
        for _ in range(500):
            if value("audience_members", "a") is not None:
                break
            await asyncio.sleep(0.02)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert value("audience_members", "a") == 1234
    text = caplog.text
    assert "audience health poll failed: RuntimeError" in text
    assert "40105" in text  # the rejected token's answer is named, the token never
    assert secret not in text


async def test_a_poll_reads_each_audience_once_even_under_several_keys() -> None:
    state = SandboxState()
    state.add_advertiser(ADV)
    state.add_audience(ADV, "1")
    state.set_cover_num("1", 7)
    async with sandbox_api(state) as (_, api):
        await poller(api, targets_of(("a", "1"), ("b", "1"))).poll_once()
    assert api.sizes == [1]
    assert value("audience_members", "a") == value("audience_members", "b") == 7
