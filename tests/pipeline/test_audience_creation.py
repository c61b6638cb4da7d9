"""Create-on-demand: exactly one audience per (advertiser, name) across replicas and restarts."""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest
from confluent_kafka import KafkaError, KafkaException

from service.core.answers import Answer, Verdict
from service.core.model import DlqReason
from service.core.retry import Backoff
from service.devtools.broker import LocalBroker
from service.devtools.sample import ADVERTISER_ID, SampleAudience, make_users, segment_event
from service.devtools.sandbox import SandboxThread
from service.kafka.audience_store import AudienceRef, AudienceStore
from service.pipeline.audience_creation import AudienceCreator, CreationFailed
from service.tiktok.audiences_api import AudienceInfo, AudiencesApi, CreatedAudience, TikTokApiError, truncate_name
from tests.conftest import ServiceProcess, Topics, produce, read_all, wait_until

NAME = "Lookalike seed - Q4 " + "x" * 60  # over 70 characters: TikTok keeps 67 + "..."
MAPPINGS = f"""audiences:
  lookalike_seed:
    advertiser_id: "{ADVERTISER_ID}"
    audience_name: "{NAME}"
    create_if_missing: true
"""
REF: AudienceRef = ("7000000000000000001", "Seed")


def test_name_truncation_rule() -> None:
    assert truncate_name("a" * 70) == "a" * 70
    assert truncate_name("a" * 71) == "a" * 67 + "..."
    assert len(truncate_name(NAME)) == 70


def _created(sandbox: SandboxThread) -> list[str]:
    return [aid for aid, a in sandbox.state.audiences.items() if a.name == truncate_name(NAME)]


@pytest.mark.integration
def test_two_replicas_create_the_audience_once_and_a_restart_reuses_it(
    broker: LocalBroker,
    topics: Topics,
    service_env: Callable[..., dict[str, str]],
    services: Callable[[dict[str, str]], ServiceProcess],
    tmp_path: Path,
) -> None:
    path = tmp_path / "mappings.yaml"
    path.write_text(MAPPINGS)
    seed = SampleAudience("lookalike_seed", "unused")
    users = make_users(600, random.Random(5), "email")

    def events(us: list) -> list[tuple[bytes, bytes]]:  # type: ignore[type-arg]
        return [(u.user_id.encode(), orjson.dumps(segment_event(u, seed, True, with_ids=False))) for u in us]

    # audience_ready_delay_s: the new audience refuses mappings for 2 s, like TikTok's warm-up window.
    with SandboxThread(host="127.0.0.1", port=0, advertisers=[ADVERTISER_ID], audience_ready_delay_s=2.0) as sb:
        env = service_env(sb.url, MAPPINGS_FILE=str(path), AUDIENCE_STORE_TOPIC=f"{topics.source}.audiences")
        a, b = services(env), services(dict(env, HTTP_PORT=str(int(env["HTTP_PORT"]) + 1)))
        wait_until(lambda: a.http_status("/readyz") == 200 and b.http_status("/readyz") == 200, 40, "both ready")
        produce(broker, topics.source, events(users[:400]))
        wait_until(lambda: len(_created(sb)) == 1, 30, "the audience to be created")
        [audience_id] = _created(sb)
        wait_until(
            lambda: len(sb.state.members(audience_id).get("EMAIL_SHA256", [])) == 400, 60, "users in the new audience"
        )
        assert len(sb.state.requests("/segment/audience/")) == 1, "exactly one creation across two replicas"
        assert (
            a.metric("audience_sync_events_consumed_total") > 0 and b.metric("audience_sync_events_consumed_total") > 0
        )
        rejected = sum(r["code"] == 40002 for r in sb.state.requests("/segment/mapping/"))
        assert rejected >= 1, "the warm-up window was hit and retried"
        assert read_all(broker, topics.dlq, 0, timeout_s=3) == [], "the warm-up refusals were not dead-lettered"

        # A new process takes over and has to learn the id from the store. The old ones are killed rather than
        # stopped: tansu does not always rebalance after a LeaveGroup, while session expiry works (README
        # "Development"); everything they consumed is already synced, so nothing is lost.
        seen = len(sb.state.requests())
        c = services(dict(env, HTTP_PORT=str(int(env["HTTP_PORT"]) + 2)))
        wait_until(lambda: c.metric("audience_sync_rebalances_total", event="assign") >= 1, 40, "the new replica")
        a.kill9()
        b.kill9()
        produce(broker, topics.source, events(users[400:]))
        wait_until(
            lambda: len(sb.state.members(audience_id).get("EMAIL_SHA256", [])) == 600, 60, "users after a restart"
        )
        assert len(sb.state.requests("/segment/audience/")) == 1, "the restart reused the stored id"
        after = [r["path"] for r in sb.state.requests()[seen:]]
        assert "/segment/mapping/" in after, "the new replica synced the last users itself"
        # Creation lists the advertiser's audiences by name before creating, so only this shows the id came
        # from the compacted store topic: the new replica never asked TikTok about the audience.
        asked = [p for p in after if p in ("/dmp/custom_audience/list/", "/segment/audience/")]
        assert asked == [], f"the restarted replica asked TikTok {asked} instead of reading the store"
        assert c.stop() == 0


@pytest.mark.integration
def test_store_claims_have_one_winner_and_expire(broker: LocalBroker) -> None:
    async def scenario() -> tuple[list[bool], bool, str | None]:
        topic = f"store-{uuid.uuid4().hex[:8]}"
        conf = {"bootstrap.servers": broker.bootstrap}
        stores = [AudienceStore(conf, topic, claim_ttl_s=1.0) for _ in range(3)]
        for s in stores:
            await s.ensure_started()
        ref = ("7000000000000000001", "Seed")
        wins = list(await asyncio.gather(*(s.claim(ref) for s in stores)))
        # the winner dies without publishing; after the TTL a new claim wins, then its result reaches everyone
        await asyncio.sleep(1.2)
        late = await stores[2].claim(ref) if not wins[2] else await stores[1].claim(ref)
        publisher = stores[2] if not wins[2] else stores[1]
        await publisher.publish(ref, "999")
        seen = await stores[0].wait_for(ref, 5.0)
        fresh = AudienceStore(conf, topic)
        await fresh.ensure_started()
        for s in stores:
            s.close()
        fresh.close()
        assert fresh.ids.get(ref) == "999", "a restarted replica reads the stored id"
        return wins, late, seen

    started = time.monotonic()
    wins, late, seen = asyncio.run(scenario())
    assert sum(wins) == 1, wins
    assert late is True
    assert seen == "999"
    assert time.monotonic() - started < 60


# -- a replica retrying its own creation (issue 10, defect 11) -------------------------------------------------


class FlakyAudiencesApi(AudiencesApi):
    """TikTok without the HTTP: `create_audience` answers a retryable 5xx the first `failures` times."""

    def __init__(self, failures: int = 1) -> None:
        self.failures = failures
        self.creates = 0

    async def list_audiences(self, advertiser_id: str, page_size: int = 100) -> list[AudienceInfo]:
        return []

    async def create_audience(self, advertiser_id: str, name: str) -> CreatedAudience:
        self.creates += 1
        if self.creates <= self.failures:
            answer = Answer(Verdict.RETRY, 503, None, "service unavailable", "req-503")
            raise TikTokApiError("/segment/audience/", answer)
        return CreatedAudience(f"audience-{self.creates}", advertiser_id, truncate_name(name), name)


def fast_backoff(budget_s: float = 10.0) -> Backoff:
    return Backoff(base_s=0.01, max_s=0.05, budget_s=budget_s, rng=random.Random(1))


@pytest.mark.integration
def test_a_replica_retrying_after_a_5xx_is_not_blocked_by_its_own_claim(broker: LocalBroker) -> None:
    async def scenario() -> tuple[str | CreationFailed, FlakyAudiencesApi, str | None]:
        topic = f"store-{uuid.uuid4().hex[:8]}"
        conf = {"bootstrap.servers": broker.bootstrap}
        store = AudienceStore(conf, topic, claim_ttl_s=60.0)  # waiting for itself would take a minute
        api = FlakyAudiencesApi(failures=1)
        creator = AudienceCreator(store, api, fast_backoff())
        try:
            result = await asyncio.wait_for(creator.ensure(REF), 10.0)  # ensure_started included
            stored = await store.wait_for(REF, 5.0)
        finally:
            store.close()
        return result, api, stored

    started = time.monotonic()
    result, api, stored = asyncio.run(scenario())
    assert result == "audience-2", result
    assert api.creates == 2, "one 5xx, then the retry created it"
    assert stored == "audience-2", "the result is recorded in the store"
    assert time.monotonic() - started < 20, "well under claim_ttl_s"


# -- every failure of creation ends in a retry or CreationFailed (issue 10, defect 7) ----------------------------


class FakeStore(AudienceStore):
    """The store's protocol without a broker: `claim` raises the given errors first, then wins."""

    def __init__(self, claim_errors: list[Exception], *, always: Exception | None = None) -> None:
        super().__init__({}, "fake-store", claim_ttl_s=60.0)
        self.claim_errors = claim_errors
        self.always = always
        self.claims = 0

    async def ensure_started(self) -> None:
        return None

    async def claim(self, ref: AudienceRef) -> bool:
        self.claims += 1
        if self.always is not None:
            raise self.always
        if self.claim_errors:
            raise self.claim_errors.pop(0)
        return True

    async def publish(self, ref: AudienceRef, audience_id: str) -> None:
        self.ids[ref] = audience_id


def kafka_error() -> KafkaException:
    return KafkaException(KafkaError(KafkaError._MSG_TIMED_OUT, "Local: Message timed out"))


async def test_a_kafka_error_from_the_store_is_retried() -> None:
    store = FakeStore([kafka_error(), kafka_error()])
    api = FlakyAudiencesApi(failures=0)
    creator = AudienceCreator(store, api, fast_backoff())
    result = await asyncio.wait_for(creator.ensure(REF), 5.0)
    assert result == "audience-1"
    assert store.claims == 3
    assert store.ids[REF] == "audience-1"


async def test_a_store_that_always_fails_ends_in_creation_failed_within_the_budget() -> None:
    store = FakeStore([], always=kafka_error())
    creator = AudienceCreator(store, FlakyAudiencesApi(failures=0), fast_backoff(budget_s=0.3))
    started = time.monotonic()
    result = await asyncio.wait_for(creator.ensure(REF), 5.0)
    assert isinstance(result, CreationFailed), result
    assert result.reason is DlqReason.RETRIES_EXHAUSTED
    assert "KafkaException" in result.error and "Message timed out" in result.error
    assert store.claims >= 2, "it retried before giving up"
    assert time.monotonic() - started < 2.0


async def test_an_unexpected_error_is_retried_not_raised() -> None:
    store = FakeStore([RuntimeError("boom"), BufferError("queue full")])
    creator = AudienceCreator(store, FlakyAudiencesApi(failures=0), fast_backoff())
    assert await asyncio.wait_for(creator.ensure(REF), 5.0) == "audience-1"


async def test_an_unexpected_error_is_reported_by_type_never_by_its_text(caplog: pytest.LogCaptureFixture) -> None:
    secret = "tok-s3cr3t user@example.com"  # what an unexpected exception's message could carry
    store = FakeStore([], always=ValueError(secret))
    creator = AudienceCreator(store, FlakyAudiencesApi(failures=0), fast_backoff(budget_s=0.2))
    with caplog.at_level(logging.DEBUG):
        result = await asyncio.wait_for(creator.ensure(REF), 5.0)
    assert isinstance(result, CreationFailed) and result.reason is DlqReason.RETRIES_EXHAUSTED
    assert "ValueError" in result.error and "test_audience_creation.py" in result.error, result.error
    assert "will retry" in caplog.text
    assert secret not in result.error and "s3cr3t" not in caplog.text and "example.com" not in caplog.text


@pytest.mark.integration
def test_two_waiting_replicas_take_over_from_a_dead_winner(broker: LocalBroker) -> None:
    """The winner dies before recording a result; two replicas that lost to it must not hand the claim back and
    forth forever (each waking as its own claim expires and losing to the other's) but create it once."""

    async def scenario() -> tuple[list[str | CreationFailed], list[FlakyAudiencesApi]]:
        topic = f"store-{uuid.uuid4().hex[:8]}"
        conf = {"bootstrap.servers": broker.bootstrap}
        stores = [AudienceStore(conf, topic, claim_ttl_s=2.0) for _ in range(3)]
        apis = [FlakyAudiencesApi(failures=0), FlakyAudiencesApi(failures=0)]
        try:
            for s in stores:
                await s.ensure_started()
            assert await stores[0].claim(REF), "the first claim wins; its replica then dies"
            creators = [AudienceCreator(s, a, fast_backoff()) for s, a in zip(stores[1:], apis, strict=True)]
            first = asyncio.ensure_future(creators[0].ensure(REF))
            await asyncio.sleep(0.3)
            second = asyncio.ensure_future(creators[1].ensure(REF))
            results = list(await asyncio.wait_for(asyncio.gather(first, second), 10.0))
        finally:
            for s in stores:
                s.close()
        return results, apis

    results, apis = asyncio.run(scenario())
    assert results[0] == results[1] and isinstance(results[0], str), results
    assert sum(a.creates for a in apis) == 1, "created once"
