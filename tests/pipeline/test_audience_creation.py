"""Create-on-demand: exactly one audience per (advertiser, name) across replicas and restarts."""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest

from service.devtools.broker import LocalBroker
from service.devtools.sample import ADVERTISER_ID, SampleAudience, make_users, segment_event
from service.devtools.sandbox import SandboxThread
from service.kafka.audience_store import AudienceStore
from service.tiktok.audiences_api import truncate_name
from tests.conftest import ServiceProcess, Topics, produce, read_all, wait_until

pytestmark = pytest.mark.integration

NAME = "Lookalike seed - Q4 " + "x" * 60  # over 70 characters: TikTok keeps 67 + "..."
MAPPINGS = f"""audiences:
  lookalike_seed:
    advertiser_id: "{ADVERTISER_ID}"
    audience_name: "{NAME}"
    create_if_missing: true
"""


def test_name_truncation_rule() -> None:
    assert truncate_name("a" * 70) == "a" * 70
    assert truncate_name("a" * 71) == "a" * 67 + "..."
    assert len(truncate_name(NAME)) == 70


def _created(sandbox: SandboxThread) -> list[str]:
    return [aid for aid, a in sandbox.state.audiences.items() if a.name == truncate_name(NAME)]


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
