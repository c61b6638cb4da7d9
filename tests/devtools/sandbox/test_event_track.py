"""The sandbox's `POST /event/track/` over real loopback HTTP: every strict rule, the 1,000-event limit, one bad
event failing the request, de-duplication within 48 hours of sandbox time, the control view, reset and faults."""

from __future__ import annotations

import asyncio
import copy
import io
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from service.core.offline import OfflineEvent, OfflineParser, OfflineSettings, event_track_body
from service.devtools.sandbox import SandboxServer, SandboxState

TOKEN = "sandbox-token"
AUTH = {"Access-Token": TOKEN}
TRACK = "/event/track/"
EVENT_SET = "7000000000000000001"
START = datetime(2024, 5, 6, 10, 11, 40, tzinfo=UTC)
NOW_S = int(START.timestamp())
EMAIL = "584c4423c421df49955759498a71495aba49b8780eb9387dff333b6f0982c777"
PHONE = "910a625c4ba147b544e6bd2f267e130ae14c591b6ba9c25cb8573322dedbebd0"
FIXTURES = Path(__file__).parents[2] / "fixtures"


class Clock:
    """The sandbox's wall clock, moved by the tests."""

    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def sandbox(clock: Clock) -> AsyncIterator[SandboxServer]:
    async with SandboxServer(state=SandboxState(clock=clock), tokens=[TOKEN]) as s:
        yield s


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield session


def one(event_id: str | None = "evt-1", **changes: Any) -> dict[str, Any]:
    ev: dict[str, Any] = {
        "event": "CompletePayment",
        "event_time": NOW_S - 60,
        "event_id": event_id,
        "user": {"email": [EMAIL], "phone": [PHONE], "ip": "203.0.113.7", "user_agent": "UA/1.0"},
        "properties": {
            "contents": [{"content_id": "sku-1", "content_type": "product", "price": 12.5, "quantity": 2}],
            "currency": "USD",
            "value": 25.0,
            "order_id": "order-1001",
            "event_channel": "in_store",
        },
    }
    if event_id is None:
        del ev["event_id"]
    ev.update(changes)
    return ev


def body(*events: dict[str, Any], **changes: Any) -> dict[str, Any]:
    b: dict[str, Any] = {"event_source": "offline", "event_source_id": EVENT_SET, "partner_name": "Acme"}
    b["data"] = list(events)
    b.update(changes)
    return b


async def post(
    http: aiohttp.ClientSession, sb: SandboxServer, payload: object, headers: dict[str, str] | None = None
) -> dict[str, Any]:
    raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    hdrs = {**(AUTH if headers is None else headers), "Content-Type": "application/json"}
    async with http.post(sb.url + TRACK, data=io.BytesIO(raw), headers=hdrs) as r:
        assert r.status == 200
        result: dict[str, Any] = await r.json()
        return result


async def received(http: aiohttp.ClientSession, sb: SandboxServer, **params: str) -> dict[str, Any]:
    async with http.get(sb.base_url + "/_sandbox/events", params=params) as r:
        assert r.status == 200
        result: dict[str, Any] = await r.json()
        return result


async def test_accepts_what_the_client_builds(sandbox: SandboxServer, http: aiohttp.ClientSession) -> None:
    """Records parsed by service/core/offline.py and serialised by event_track_body pass every strict check."""
    parser = OfflineParser(OfflineSettings(default_event_set_id=EVENT_SET))
    events = []
    for name in ("offline_event.json", "segment_order_completed.json"):
        parsed = parser.parse(json.loads((FIXTURES / name).read_text()), now=START.timestamp())
        assert isinstance(parsed.outcome, OfflineEvent), parsed
        events.append(parsed.outcome)
    answer = await post(http, sandbox, event_track_body(EVENT_SET, events, partner_name="Acme"))
    assert (answer["code"], answer["message"], answer["data"]) == (0, "OK", {}) and answer["request_id"]
    view = await received(http, sandbox)
    assert (view["received"], view["duplicates"], view["by_event"]) == (2, 0, {"CompletePayment": 2})
    first = view["events"][0]
    assert first["event_source_id"] == EVENT_SET and first["received_at"] == START.isoformat()
    assert first["event_id"] == events[0].event_id and first["user"]["email"] == [EMAIL]
    async with http.get(sandbox.base_url + "/_sandbox/requests", params={"path": TRACK}) as r:
        log = (await r.json())["requests"]
    assert [(e["rows"], e["code"], e["status"]) for e in log] == [(2, 0, 200)]
    async with http.get(sandbox.base_url + "/_sandbox/state") as r:
        assert (await r.json())["events"] == {"received": 2, "duplicates": 0}


def _bad(path: str, value: Any) -> dict[str, Any]:
    """`body(one("good"), <one with path set to value>)`: path is relative to the second event."""
    ev = one("bad")
    *parents, last = path.split(".")
    target: Any = ev
    for key in parents:
        target = target[int(key)] if key.isdigit() else target[key]
    if value is KeyError:
        del target[last]
    else:
        target[int(last) if last.isdigit() else last] = value
    return body(one("good"), ev)


@pytest.mark.parametrize(
    ("payload", "code", "fragment"),
    [
        pytest.param(body(one(), event_source="web"), 40002, "event_source: must be", id="web-source"),
        pytest.param(
            {k: v for k, v in body(one()).items() if k != "event_source"}, 40002, "event_source", id="no-source"
        ),
        pytest.param(body(one(), event_source_id=""), 40002, "event_source_id", id="empty-source-id"),
        pytest.param(body(one(), event_source_id=7), 40002, "event_source_id", id="numeric-source-id"),
        pytest.param(body(), 40002, "data: must be a non-empty list", id="no-events"),
        pytest.param(body(one(), data={"event": "Contact"}), 40002, "data: must be", id="data-object"),
        pytest.param(body(one(), extra=1), 40002, "unknown field extra", id="unknown-body-field"),
        pytest.param(_bad("event", "Purchased"), 40002, "data[1].event: must be a TikTok standard", id="event-name"),
        pytest.param(_bad("event", ["Contact"]), 40002, "data[1].event:", id="event-name-list"),
        pytest.param(_bad("event_time", NOW_S * 1000.0), 40002, "data[1].event_time: must be an integer", id="float"),
        pytest.param(_bad("event_time", "2024-05-06"), 40002, "data[1].event_time: must be an integer", id="string"),
        pytest.param(_bad("event_time", True), 40002, "data[1].event_time: must be an integer", id="bool"),
        pytest.param(_bad("event_time", NOW_S + 301), 40002, "data[1].event_time: is in the future", id="future"),
        pytest.param(_bad("event_time", NOW_S - 28 * 86400 - 1), 40002, "older than 28 days", id="too-old"),
        pytest.param(_bad("event_id", ""), 40002, "data[1].event_id", id="empty-event-id"),
        pytest.param(_bad("user.email", ["testing@testing.com"]), 40062, "data[1].user.email[0]", id="raw-email"),
        pytest.param(_bad("user.email", [EMAIL.upper()]), 40062, "data[1].user.email[0]", id="upper-hex"),
        pytest.param(_bad("user.phone", ["+15555555555"]), 40062, "data[1].user.phone[0]", id="raw-phone"),
        pytest.param(_bad("user.external_id", ["u-42"]), 40062, "data[1].user.external_id[0]", id="raw-external"),
        pytest.param(_bad("user.email", EMAIL), 40002, "data[1].user.email: must be a list", id="email-not-list"),
        pytest.param(_bad("user", {}), 40002, "data[1].user: no match key", id="no-match-key"),
        pytest.param(_bad("user", {"email": [], "ip": " "}), 40002, "no match key", id="blank-match-keys"),
        pytest.param(_bad("user", KeyError), 40002, "data[1].user: required", id="no-user"),
        pytest.param(_bad("user.ip", 203), 40002, "data[1].user.ip: must be a string", id="ip-number"),
        pytest.param(_bad("user.fax", "x"), 40002, "data[1].user: unknown field fax", id="unknown-user-field"),
        pytest.param(_bad("properties.currency", "usd"), 40002, "data[1].properties.currency", id="lower-currency"),
        pytest.param(_bad("properties.currency", "US"), 40002, "data[1].properties.currency", id="short-currency"),
        pytest.param(_bad("properties.value", "25.0"), 40002, "data[1].properties.value", id="string-value"),
        pytest.param(_bad("properties.value", True), 40002, "data[1].properties.value", id="bool-value"),
        pytest.param(_bad("properties.contents.0.price", "12"), 40002, "contents[0].price", id="string-price"),
        pytest.param(_bad("properties.contents.0.quantity", 1.5), 40002, "contents[0].quantity", id="float-qty"),
        pytest.param(_bad("properties.contents", {}), 40002, "properties.contents: must be a list", id="contents"),
        pytest.param(_bad("properties.event_channel", "shop"), 40002, "event_channel", id="channel"),
        pytest.param(_bad("properties.revenue", 1), 40002, "unknown field revenue", id="unknown-property"),
        pytest.param(_bad("currency", "USD"), 40002, "data[1]: unknown field currency", id="unknown-event-field"),
        pytest.param(body(one(), "not an event"), 40002, "data[1]: must be an object", id="event-not-object"),
    ],
)
async def test_strict_refusals_receive_nothing(
    sandbox: SandboxServer, http: aiohttp.ClientSession, payload: dict[str, Any], code: int, fragment: str
) -> None:
    answer = await post(http, sandbox, payload)
    assert answer["code"] == code, answer
    assert fragment in answer["message"], answer["message"]
    assert answer["data"] == {} and answer["request_id"]
    view = await received(http, sandbox)
    assert (view["received"], view["events"]) == (0, [])  # one bad event fails the whole request
    async with http.get(sandbox.base_url + "/_sandbox/state") as r:
        assert (await r.json())["rejected"] == {str(code): 1}


@pytest.mark.parametrize(
    ("headers", "code"),
    [({}, 40104), ({"Access-Token": "wrong"}, 40105), ({"Access-Token": f"Bearer {TOKEN}"}, 40105)],
)
async def test_token_checked_like_the_other_paths(
    sandbox: SandboxServer, http: aiohttp.ClientSession, headers: dict[str, str], code: int
) -> None:
    assert (await post(http, sandbox, body(one()), headers))["code"] == code
    assert (await received(http, sandbox))["received"] == 0


async def test_not_json(sandbox: SandboxServer, http: aiohttp.ClientSession) -> None:
    assert (await post(http, sandbox, b"{not json"))["code"] == 40002


async def test_one_bad_event_fails_the_request_and_is_named(
    sandbox: SandboxServer, http: aiohttp.ClientSession
) -> None:
    events = [one(f"evt-{i}") for i in range(5)]
    events[3]["event_time"] = NOW_S + 3600
    answer = await post(http, sandbox, body(*events))
    assert (answer["code"], answer["message"]) == (40002, "Parameter error: data[3].event_time: is in the future")
    assert (await received(http, sandbox))["received"] == 0


async def test_limit_of_1000_events(sandbox: SandboxServer, http: aiohttp.ClientSession) -> None:
    events = [one(f"evt-{i}") for i in range(1001)]
    answer = await post(http, sandbox, body(*events))
    assert answer["code"] == 40061 and "1001 events, at most 1000" in answer["message"]
    assert (await received(http, sandbox))["received"] == 0
    assert (await post(http, sandbox, body(*events[:1000])))["code"] == 0
    view = await received(http, sandbox)
    assert view["received"] == 1000 and len(view["events"]) == 1000


async def test_time_bounds_follow_the_sandbox_clock(
    sandbox: SandboxServer, http: aiohttp.ClientSession, clock: Clock
) -> None:
    oldest = NOW_S - 28 * 86400
    ok = body(one("a", event_time=oldest), one("b", event_time=NOW_S + 300))  # 28 days, and the client's skew
    assert (await post(http, sandbox, ok))["code"] == 0
    clock.now += timedelta(seconds=1)
    assert (await post(http, sandbox, body(one("c", event_time=oldest))))["code"] == 40002
    clock.now = START - timedelta(days=1)
    assert (await post(http, sandbox, body(one("d", event_time=NOW_S))))["code"] == 40002


async def test_deduplication_within_48_hours(sandbox: SandboxServer, http: aiohttp.ClientSession, clock: Clock) -> None:
    first = body(one("evt-1"), one("evt-2"))
    assert (await post(http, sandbox, first))["code"] == 0
    assert (await post(http, sandbox, first))["code"] == 0  # a resend: accepted, counted once
    clock.now = START + timedelta(hours=47, minutes=59)
    late = copy.deepcopy(first)
    for ev in late["data"]:
        ev["event_time"] = int(clock.now.timestamp()) - 60
    assert (await post(http, sandbox, late))["code"] == 0
    view = await received(http, sandbox)
    assert (view["received"], view["duplicates"]) == (2, 4)
    assert [e["event_id"] for e in view["events"]] == ["evt-1", "evt-2"]

    clock.now = START + timedelta(hours=48)  # the window has passed: counted again
    assert (await post(http, sandbox, late))["code"] == 0
    view = await received(http, sandbox)
    assert (view["received"], view["duplicates"]) == (4, 4)
    assert view["events"][-1]["received_at"] == clock.now.isoformat()
    clock.now += timedelta(hours=1)  # and within 48 h of that second acceptance, a duplicate again
    assert (await post(http, sandbox, late))["code"] == 0
    assert (await received(http, sandbox))["duplicates"] == 6


async def test_deduplication_key(sandbox: SandboxServer, http: aiohttp.ClientSession) -> None:
    same_in_one_request = body(one("evt-1"), one("evt-1"))
    assert (await post(http, sandbox, same_in_one_request))["code"] == 0
    other_name = body(one("evt-1", event="PlaceAnOrder"))
    other_set = body(one("evt-1"), event_source_id="7000000000000000002")
    no_id = body(one(None), one(None))
    for payload in (other_name, other_set, no_id):
        assert (await post(http, sandbox, payload))["code"] == 0
    view = await received(http, sandbox)
    assert (view["received"], view["duplicates"]) == (5, 1)
    assert view["by_event"] == {"CompletePayment": 4, "PlaceAnOrder": 1}
    only = await received(http, sandbox, event_source_id="7000000000000000002")
    assert [e["event_source_id"] for e in only["events"]] == ["7000000000000000002"]
    assert only["received"] == 5  # the totals are of every event set


async def test_reset_clears_events_and_their_deduplication(sandbox: SandboxServer, http: aiohttp.ClientSession) -> None:
    assert (await post(http, sandbox, body(one())))["code"] == 0
    async with http.post(sandbox.base_url + "/_sandbox/reset") as r:
        assert r.status == 200
    assert await received(http, sandbox) == {"received": 0, "duplicates": 0, "by_event": {}, "events": []}
    assert (await post(http, sandbox, body(one())))["code"] == 0
    assert (await received(http, sandbox))["received"] == 1  # not a duplicate of the forgotten one
    async with http.post(sandbox.base_url + "/_sandbox/reset", json={"all": True}) as r:
        assert r.status == 200
    assert (await received(http, sandbox))["events"] == []


async def set_faults(http: aiohttp.ClientSession, sb: SandboxServer, plan: object) -> None:
    async with http.post(sb.base_url + "/_sandbox/faults", json=plan) as r:
        assert r.status == 200, await r.text()


async def test_faults_apply_to_event_track(sandbox: SandboxServer, http: aiohttp.ClientSession) -> None:
    await set_faults(http, sandbox, [{"kind": "code", "code": 50000}])  # default path: segment/mapping only
    assert (await post(http, sandbox, body(one("a"))))["code"] == 0
    await set_faults(http, sandbox, [{"kind": "code", "code": 40100, "path": TRACK, "count": 1}])
    assert (await post(http, sandbox, body(one("b"))))["code"] == 40100
    assert (await post(http, sandbox, body(one("b"))))["code"] == 0
    await set_faults(http, sandbox, [{"kind": "http", "status": 503, "path": "*", "count": 1}])
    async with http.post(sandbox.url + TRACK, data=orjson.dumps(body(one("c"))), headers=AUTH) as r:
        assert r.status == 503
    assert [e["event_id"] for e in (await received(http, sandbox))["events"]] == ["a", "b"]


async def test_rate_limit_applies_to_event_track(sandbox: SandboxServer, http: aiohttp.ClientSession) -> None:
    await set_faults(http, sandbox, {"rate_limit_qps": 2, "rate_limit_path": TRACK})
    answers = await asyncio.gather(*(post(http, sandbox, body(one(f"evt-{i}"))) for i in range(4)))
    assert sorted(a["code"] for a in answers) == [0, 0, 40100, 40100]
    assert (await received(http, sandbox))["received"] == 2
