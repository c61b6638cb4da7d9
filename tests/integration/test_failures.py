"""Failure semantics over loopback: sandbox fault injection, the real broker (tansu), the service as a process.

Each test owns its topics and its sandbox, injects one family of TikTok failures, and checks the contract:
retryable answers are retried until uploaded, auth outages never dead-letter and heal by themselves,
permission and payload refusals dead-letter exactly the affected records, and the request rate stays capped.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from service.core.dead_letters import header_value
from service.core.retry import TokenBucket
from service.devtools.sample import expected_membership
from tests.conftest import ServiceProcess, Topics, produce, wait_until
from tests.integration.helpers_failures import (
    ADV_A,
    AUD_A,
    AUD_B,
    AUD_MISSING,
    FAST,
    MAPPING,
    by_key,
    max_in_window,
    membership,
    plan,
    read_topic,
    reasons,
    sandbox,
    unique_events,
)

pytestmark = pytest.mark.integration

Env = Callable[..., dict[str, str]]
Start = Callable[[dict[str, str]], ServiceProcess]

RETRIES = "audience_sync_upload_retries_total"
DEAD = "audience_sync_events_dead_lettered_total"
QPS = "audience_sync_rate_limit_qps"
AUTH_OK = "audience_sync_auth_ok"


def send(broker: Any, topics: Topics, events: list[Any]) -> None:
    produce(broker, topics.source, [(e.key, e.value) for e in events])


def test_rate_limit_codes_are_retried_and_lower_the_request_rate(
    broker: Any, topics: Topics, service_env: Env, services: Start
) -> None:
    events = unique_events(120, AUD_A, "rl")
    with sandbox() as sb:
        # 40100 and 40132 on the first requests, and TikTok's own 5 req/s limit below the configured 20.
        sb.set_faults(
            plan(
                {"kind": "code", "code": 40100, "count": 3},
                {"kind": "code", "code": 40132, "count": 3},
                rate_limit_qps=5,
            )
        )
        send(broker, topics, events)
        svc = services(service_env(sb.url, **FAST, TIKTOK_MAX_QPS="20", BATCH_MAX_ROWS="4"))
        wait_until(lambda: 0 <= svc.metric(QPS) < 20, 30, "rate_limit_qps to drop below TIKTOK_MAX_QPS=20")
        wait_until(lambda: membership(sb) == expected_membership(events), 60, "all events uploaded")
        faults = sb.state.snapshot()["faults"]
        codes = [r["code"] for r in sb.state.requests(MAPPING)]
        assert codes.count(40132) == 3 and codes.count(40100) >= 3, codes
        assert svc.metric(RETRIES, cause="rate_limited") >= codes.count(40100) + codes.count(40132)
        assert svc.metric(DEAD) == 0
        print(f"rate limit: faults={faults} 40100={codes.count(40100)} retries={svc.metric(RETRIES)}")
        assert svc.stop() == 0


TRANSIENT = {
    # name: (rules, extra env, retry cause label, sandbox fault kind, faults)
    "http_5xx": (
        [{"kind": "http", "status": 500, "count": 2}, {"kind": "http", "status": 503, "count": 2}],
        {},
        "http_5xx",
        "http",
        4,
    ),
    "html_502": ([{"kind": "http", "html": True, "count": 3}], {}, "http_5xx", "http", 3),
    "slow": ([{"kind": "slow", "delay_s": 2.5, "count": 2}], {"TIKTOK_TIMEOUT_S": "1"}, "timeout", "slow", 2),
    "timeout": ([{"kind": "timeout", "count": 2}], {"TIKTOK_TIMEOUT_S": "1"}, "timeout", "timeout", 2),
    "reset": ([{"kind": "reset", "count": 3}], {}, "connection", "reset", 3),
}

# Pages that are not TikTok's API (a proxy's 200 page, a wrong URL's 404): the upload gate closes, nothing is
# dead-lettered, and a probe reopens it (before: a 200 page was retried, a 404 page bisected into N letters).
NOT_TIKTOK = {"html_200": 200, "html_404": 404, "html_400": 400}


@pytest.mark.parametrize("name", list(NOT_TIKTOK))
def test_a_page_that_is_not_tiktok_pauses_uploads_and_dead_letters_nothing(
    name: str, broker: Any, topics: Topics, service_env: Env, services: Start
) -> None:
    events = unique_events(40, AUD_A, name)
    with sandbox() as sb:
        sb.set_faults(plan({"kind": "http", "status": NOT_TIKTOK[name], "html": True, "count": 3}))
        send(broker, topics, events)
        svc = services(service_env(sb.url, **FAST, BATCH_MAX_ROWS="10"))
        wait_until(lambda: membership(sb) == expected_membership(events), 60, f"upload after {name} pages")
        wait_until(lambda: sb.state.snapshot()["faults"].get("http") == 3, 10, "3 pages served")
        assert svc.metric(DEAD) == 0
        assert svc.stop() == 0


@pytest.mark.parametrize("name", list(TRANSIENT))
def test_transient_faults_are_retried_then_uploaded(
    name: str, broker: Any, topics: Topics, service_env: Env, services: Start
) -> None:
    rules, extra, cause, kind, n = TRANSIENT[name]
    # Adds only, one per user: a `slow` answer is applied late by the sandbox (as TikTok may), which must not
    # be mistaken for an ordering bug.
    events = unique_events(60, AUD_A, name)
    with sandbox() as sb:
        sb.set_faults(plan(*rules))
        send(broker, topics, events)
        svc = services(service_env(sb.url, **FAST, BATCH_MAX_ROWS="10", **extra))
        wait_until(lambda: membership(sb) == expected_membership(events), 60, f"upload through {name} faults")
        # a slow request is logged by the sandbox only once its delay is over
        wait_until(lambda: sb.state.snapshot()["faults"].get(kind) == n, 10, f"{n} {kind} faults served")
        wait_until(lambda: svc.metric(RETRIES, cause=cause) >= n, 10, f"{n} retries with cause {cause}")
        assert svc.metric(DEAD) == 0
        assert svc.stop() == 0


def test_auth_outage_dead_letters_nothing_and_resumes_by_itself(
    broker: Any, topics: Topics, service_env: Env, services: Start
) -> None:
    events = unique_events(50, AUD_A, "auth")
    with sandbox() as sb:
        svc = services(service_env(sb.url, **FAST))
        wait_until(lambda: svc.http_status("/readyz") == 200, 30, "service ready")
        sb.set_faults(plan({"kind": "code", "code": 40105}))
        send(broker, topics, events)
        wait_until(lambda: svc.metric(AUTH_OK) == 0, 30, "audience_sync_auth_ok to be 0")
        wait_until(lambda: svc.http_status("/readyz") == 503, 10, "/readyz to answer 503")
        time.sleep(3)  # several auth probes (AUTH_RETRY_S=1) during the outage
        assert svc.http_status("/readyz") == 503 and svc.metric(AUTH_OK) == 0
        assert svc.metric(DEAD) == 0, "an auth outage never dead-letters"
        assert membership(sb) == {}
        probes = sum(1 for r in sb.state.requests(MAPPING) if r["code"] == 40105)
        assert probes >= 2, "the service keeps probing during the outage"
        sb.set_faults(None)
        wait_until(lambda: membership(sb) == expected_membership(events), 30, "resume after the outage")
        wait_until(lambda: svc.metric(AUTH_OK) == 1, 10, "audience_sync_auth_ok back to 1")
        wait_until(lambda: svc.http_status("/readyz") == 200, 10, "/readyz back to 200")
        assert svc.metric(DEAD) == 0
        assert svc.stop() == 0
    assert read_topic(broker, topics.dlq, expect=0) == []


def test_rotated_token_file_is_picked_up_without_restart(
    broker: Any, topics: Topics, service_env: Env, services: Start, tmp_path: Path
) -> None:
    events = unique_events(40, AUD_A, "rot")
    token_file = tmp_path / "token"
    token_file.write_text("stale-token-0000\n")
    with sandbox(tokens=["fresh-token-1111"]) as sb:
        env = service_env(sb.url, **FAST, TIKTOK_ACCESS_TOKEN="", TIKTOK_ACCESS_TOKEN_FILE=str(token_file))
        svc = services(env)
        send(broker, topics, events)
        wait_until(lambda: svc.metric(AUTH_OK) == 0, 30, "the stale token to be refused")
        wait_until(lambda: svc.http_status("/readyz") == 503, 10, "/readyz to answer 503")
        assert svc.metric(DEAD) == 0
        tmp = tmp_path / "token.new"
        tmp.write_text("fresh-token-1111\n")
        os.replace(tmp, token_file)  # how a secret mount rotates: an atomic swap
        wait_until(lambda: membership(sb) == expected_membership(events), 30, "resume with the rotated token")
        wait_until(lambda: svc.http_status("/readyz") == 200, 10, "/readyz back to 200")
        assert svc.proc is not None and svc.proc.poll() is None, "no restart"
        assert svc.metric(AUTH_OK) == 1 and svc.metric(DEAD) == 0
        assert svc.stop() == 0


def test_permission_error_dead_letters_one_advertiser_while_the_other_flows(
    broker: Any, topics: Topics, service_env: Env, services: Start
) -> None:
    denied = unique_events(20, AUD_A, "denied")
    allowed = unique_events(40, AUD_B, "allowed")
    with sandbox() as sb:
        sb.state.add_advertiser(ADV_A, permission_denied=True)
        mixed = [e for pair in zip(denied, allowed[:20], strict=True) for e in pair]
        send(broker, topics, mixed)
        svc = services(service_env(sb.url, **FAST))
        wait_until(lambda: membership(sb) == expected_membership(allowed[:20]), 30, "advertiser B's events")
        send(broker, topics, allowed[20:])  # B keeps flowing after A's refusals
        wait_until(lambda: membership(sb) == expected_membership(allowed), 30, "advertiser B's later events")
        letters = read_topic(broker, topics.dlq, expect=len(denied))
        keyed = by_key(letters)
        assert sorted(keyed) == sorted(e.key for e in denied)
        assert all(len(v) == 1 for v in keyed.values()), "each refused record dead-lettered once"
        for msg in letters:
            h = msg.headers()
            assert header_value(h, "dlq.reason") == "tiktok_permission"
            assert header_value(h, "dlq.tiktok.code") == "40001"
            assert header_value(h, "dlq.tiktok.request_id"), "TikTok's request id is kept"
            assert int(header_value(h, "dlq.attempts") or 0) >= 1
        # The letter is readable as soon as the broker has it; the service counts it when the ack is back.
        wait_until(lambda: svc.metric(DEAD, reason="tiktok_permission") == len(denied), 10, "the letters counted")
        assert svc.stop() == 0


def test_one_advertiser_backing_off_does_not_stop_the_others(
    broker: Any, topics: Topics, service_env: Env, services: Start
) -> None:
    failing = unique_events(20, AUD_A, "failing")
    early = unique_events(10, AUD_B, "early")
    late = unique_events(30, AUD_B, "late")
    with sandbox() as sb:
        sb.set_faults(plan({"kind": "http", "status": 503, "advertiser_id": ADV_A}))  # until cleared
        send(broker, topics, [e for pair in zip(failing[:10], early, strict=True) for e in pair] + failing[10:])
        svc = services(service_env(sb.url, **FAST))
        wait_until(lambda: svc.metric("audience_sync_batch_keys_backing_off") >= 1, 30, "advertiser A backing off")
        wait_until(lambda: membership(sb) == expected_membership(early), 30, "advertiser B's first events")
        # Records produced while A backs off, on the same partitions as A's rows: they must still be consumed.
        send(broker, topics, late)
        wait_until(lambda: membership(sb) == expected_membership(early + late), 30, "B flowing during A's outage")
        assert svc.metric("audience_sync_paused_partitions") == 0, "a backing-off key pauses no partition"
        assert svc.metric("audience_sync_batch_keys_backing_off") >= 1, "A is still failing"
        sb.set_faults(None)
        wait_until(
            lambda: membership(sb) == expected_membership(early + late + failing), 30, "A uploaded once TikTok is back"
        )
        assert svc.metric(DEAD) == 0
        assert svc.metric(RETRIES) >= 1
        assert svc.stop() == 0


def test_max_inflight_requests_bounds_concurrent_uploads(
    broker: Any, topics: Topics, service_env: Env, services: Start
) -> None:
    events = unique_events(60, AUD_A, "inflight")
    with sandbox() as sb:
        sb.set_faults(plan({"kind": "slow", "delay_s": 0.3, "path": MAPPING}))  # every upload takes 0.3 s
        send(broker, topics, events)
        svc = services(service_env(sb.url, **FAST, BATCH_MAX_ROWS="5", MAX_INFLIGHT_REQUESTS="2"))
        wait_until(lambda: membership(sb) == expected_membership(events), 60, "uploads through slow answers")
        peak = sb.state.snapshot()["peak_concurrent_requests"]
        assert isinstance(peak, dict)
        assert peak[MAPPING] == 2, f"12 batches of 5 with 2 allowed in flight: {peak}"
        assert svc.stop() == 0


def test_rejected_rows_are_isolated_by_bisection(
    broker: Any, topics: Topics, service_env: Env, services: Start
) -> None:
    good = unique_events(60, AUD_A, "good")
    bad = unique_events(5, AUD_MISSING, "ghost")  # explicit external_audience_id TikTok does not know
    records = list(good)
    for i, e in enumerate(bad):
        records.insert(7 + i * 11, e)
    with sandbox() as sb:
        send(broker, topics, records)
        svc = services(service_env(sb.url, **FAST))
        wait_until(lambda: membership(sb) == expected_membership(good), 30, "the good rows uploaded")
        letters = read_topic(broker, topics.dlq, expect=len(bad))
        keyed = by_key(letters)
        assert sorted(keyed) == sorted(e.key for e in bad), "only the offending rows are dead-lettered"
        assert all(len(v) == 1 for v in keyed.values())
        for msg in letters:
            assert header_value(msg.headers(), "dlq.reason") == "tiktok_rejected"
            assert header_value(msg.headers(), "dlq.tiktok.code") == "40002"
            assert header_value(msg.headers(), "dlq.tiktok.request_id")
        # The letter is readable as soon as the broker has it; the service counts it when the ack is back.
        wait_until(lambda: svc.metric(DEAD, reason="tiktok_rejected") == len(bad), 10, "the letters counted")
        refused = sum(1 for r in sb.state.requests(MAPPING) if r["code"] == 40002)
        print(f"bisection: {refused} refused requests to isolate {len(bad)} rows among {len(records)}")
        assert svc.stop() == 0


def test_batch_too_large_is_split_not_dead_lettered(
    broker: Any, topics: Topics, service_env: Env, services: Start
) -> None:
    events = unique_events(100, AUD_A, "split")
    with sandbox(max_rows_per_request=16) as sb:  # 40061 INVALID_BATCH_SIZE above 16 rows
        send(broker, topics, events)
        svc = services(service_env(sb.url, **FAST, BATCH_MAX_ROWS="100"))
        wait_until(lambda: membership(sb) == expected_membership(events), 30, "all rows uploaded in halves")
        codes = [r["code"] for r in sb.state.requests(MAPPING)]
        assert 40061 in codes
        assert svc.metric(DEAD) == 0
        assert svc.stop() == 0


def test_sigterm_during_auth_outage_exits_cleanly_and_loses_nothing(
    broker: Any, topics: Topics, service_env: Env, services: Start
) -> None:
    events = unique_events(30, AUD_A, "term")
    with sandbox() as sb:
        sb.set_faults(plan({"kind": "code", "code": 40105}))
        send(broker, topics, events)
        env = service_env(sb.url, **FAST, DRAIN_TIMEOUT_S="3")
        svc = services(env)
        wait_until(lambda: svc.metric(AUTH_OK) == 0, 30, "the auth outage to be seen")
        t0 = time.monotonic()
        assert svc.stop() == 0, svc.log()
        assert time.monotonic() - t0 < 3 + 10, "the drain deadline bounds the stop"
        assert membership(sb) == {}
        sb.set_faults(None)
        svc2 = services(service_env(sb.url, **FAST))  # the uncommitted records are consumed again
        wait_until(lambda: membership(sb) == expected_membership(events), 30, "all events after the restart")
        assert svc2.metric(DEAD) == 0
        assert svc2.stop() == 0
    assert read_topic(broker, topics.dlq, expect=0) == []


def test_retry_budget_exhaustion_dead_letters_retries_exhausted(
    broker: Any, topics: Topics, service_env: Env, services: Start
) -> None:
    events = unique_events(12, AUD_A, "budget")
    with sandbox() as sb:
        sb.set_faults(plan({"kind": "code", "code": 50000}))
        send(broker, topics, events)
        t0 = time.monotonic()
        svc = services(service_env(sb.url, **{**FAST, "RETRY_BUDGET_S": "3", "RETRY_BASE_S": "0.2"}))
        letters = read_topic(broker, topics.dlq, expect=len(events), timeout_s=40)
        elapsed = time.monotonic() - t0
        keyed = by_key(letters)
        assert sorted(keyed) == sorted(e.key for e in events)
        assert all(len(v) == 1 for v in keyed.values())
        assert reasons(letters) == {"retries_exhausted": len(events)}
        for msg in letters:
            assert header_value(msg.headers(), "dlq.tiktok.code") == "50000"
            assert int(header_value(msg.headers(), "dlq.attempts") or 0) >= 2, "retried before giving up"
        assert membership(sb) == {}
        assert svc.metric(RETRIES, cause="tiktok_code") >= 1
        first = min(r["t"] for r in sb.state.requests(MAPPING))
        last = max(r["t"] for r in sb.state.requests(MAPPING))
        assert last - first <= 3 + 1.5, "no attempt long after the 3 s budget"
        print(f"retry budget: {len(letters)} dead letters after {elapsed:.1f}s, attempts span {last - first:.1f}s")
        assert svc.stop() == 0


def test_request_rate_stays_under_tiktok_max_qps(
    broker: Any, topics: Topics, service_env: Env, services: Start
) -> None:
    qps = 5
    burst = TokenBucket(qps, clock=time.monotonic)._burst  # the bucket's saved burst for this rate
    events = unique_events(45, AUD_A, "qps")
    with sandbox() as sb:
        send(broker, topics, events)
        svc = services(
            service_env(sb.url, **FAST, TIKTOK_MAX_QPS=str(qps), BATCH_MAX_ROWS="1", BATCH_MAX_ROWS_CEILING="1")
        )
        wait_until(lambda: membership(sb) == expected_membership(events), 60, "all single-row batches uploaded")
        times = [float(r["t"]) for r in sb.state.requests(MAPPING)]
        assert len(times) >= len(events)
        peak = max_in_window(times)
        span = max(times) - min(times)
        print(f"rate cap: {len(times)} requests in {span:.1f}s, peak {peak} in 1 s (cap {qps} + burst {burst})")
        assert peak <= qps + burst
        assert span >= (len(times) - burst) / qps - 1.0
        assert svc.stop() == 0


def test_time_in_an_auth_outage_does_not_spend_the_retry_budget(
    broker: Any, topics: Topics, service_env: Env, services: Start
) -> None:
    """A transient error, then an auth outage longer than RETRY_BUDGET_S, then one more transient error: the
    records must still be uploaded. Auth answers never dead-letter, so the outage must not push the batch
    into `retries_exhausted` either."""
    events = unique_events(10, AUD_A, "outage-budget")
    with sandbox() as sb:
        sb.set_faults(plan({"kind": "code", "code": 50000, "count": 1}, {"kind": "code", "code": 40105}))
        send(broker, topics, events)
        svc = services(service_env(sb.url, **{**FAST, "RETRY_BUDGET_S": "3"}))
        wait_until(lambda: svc.metric(AUTH_OK) == 0, 30, "the auth outage to start")
        time.sleep(5)  # longer than the 3 s retry budget
        sb.set_faults(plan({"kind": "code", "code": 50000, "count": 1}))  # token fixed; one transient error left
        wait_until(
            lambda: membership(sb) == expected_membership(events) or svc.metric(DEAD) > 0,
            20,
            "an outcome after the outage",
        )
        codes = [r["code"] for r in sb.state.requests(MAPPING)]
        exhausted = svc.metric(DEAD, reason="retries_exhausted")
        assert svc.metric(DEAD) == 0, f"{exhausted:.0f} retries_exhausted after the auth outage; answers: {codes}"
        assert membership(sb) == expected_membership(events)
        assert svc.stop() == 0


def test_retry_after_is_honoured(broker: Any, topics: Topics, service_env: Env, services: Start) -> None:
    """A 429 with `Retry-After: 2` is not retried sooner, though the backoff alone would retry within 0.1 s."""
    events = unique_events(10, AUD_A, "ra")
    with sandbox() as sb:
        sb.set_faults(plan({"kind": "http", "status": 429, "count": 1, "retry_after_s": 2}))
        send(broker, topics, events)
        svc = services(service_env(sb.url, **FAST))
        wait_until(lambda: membership(sb) == expected_membership(events), 60, "events uploaded after the wait")
        first, second = sb.state.requests(MAPPING)[:2]
        assert first["status"] == 429
        assert second["t"] - first["t"] >= 1.9, f"retried after {second['t'] - first['t']:.2f}s"
        assert svc.stop() == 0
