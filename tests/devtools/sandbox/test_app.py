"""The sandbox over real loopback HTTP: strictness, faults, reads, control API, thread and CLI runners."""

from __future__ import annotations

import asyncio
import copy
import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from service.devtools.sandbox import FaultPlan, SandboxServer, SandboxThread

from .reference_fixture import EMAIL, MAID, PHONE, fixture_body

TOKEN = "sandbox-token"
AUTH = {"Access-Token": TOKEN}
MAPPING = "/segment/mapping/"


@pytest.fixture
async def sandbox() -> AsyncIterator[SandboxServer]:
    async with SandboxServer(
        advertisers=["123"], audiences=[("123", "12345"), ("999", "55555")], tokens=[TOKEN, "other-token"]
    ) as s:
        yield s


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        yield session


async def post_mapping(
    http: aiohttp.ClientSession, sb: SandboxServer, body: object, headers: dict[str, str] | None = None
) -> dict[str, Any]:
    # A file-like body: aiohttp warns that large raw bodies could block the loop (the 10,001-row case).
    data = io.BytesIO(json.dumps(body).encode())
    hdrs = {**(AUTH if headers is None else headers), "Content-Type": "application/json"}
    async with http.post(sb.url + MAPPING, data=data, headers=hdrs) as r:
        assert r.status == 200
        result: dict[str, Any] = await r.json()
        return result


async def members(http: aiohttp.ClientSession, sb: SandboxServer, audience_id: str = "12345") -> dict[str, Any]:
    async with http.get(f"{sb.base_url}/_sandbox/audiences/{audience_id}/members") as r:
        result: dict[str, Any] = await r.json()
        return result


async def set_faults(http: aiohttp.ClientSession, sb: SandboxServer, plan: object) -> None:
    async with http.post(sb.base_url + "/_sandbox/faults", json=plan) as r:
        assert r.status == 200, await r.text()


async def test_add_then_delete(sandbox: SandboxServer, http: aiohttp.ClientSession) -> None:
    ok = await post_mapping(http, sandbox, fixture_body("add"))
    assert ok["code"] == 0 and ok["message"] == "OK" and ok["data"] == {} and ok["request_id"]
    assert await members(http, sandbox) == {
        "EMAIL_SHA256": [EMAIL],
        "PHONE_SHA256": [PHONE],
        "IDFA_SHA256": [MAID],
    }
    again = await post_mapping(http, sandbox, fixture_body("add"))
    assert again["request_id"] != ok["request_id"]
    assert (await post_mapping(http, sandbox, fixture_body("delete")))["code"] == 0
    assert await members(http, sandbox) == {}
    async with http.get(sandbox.base_url + "/_sandbox/requests", params={"path": MAPPING}) as r:
        log = (await r.json())["requests"]
    assert [(e["action"], e["rows"], e["code"], e["status"]) for e in log] == [
        ("add", 1, 0, 200),
        ("add", 1, 0, 200),
        ("delete", 1, 0, 200),
    ]
    assert log[0]["t"] <= log[1]["t"] <= log[2]["t"] and log[0]["advertiser_ids"] == ["123"]


def _with(path: str, value: Any) -> dict[str, Any]:
    body = fixture_body()
    *parents, last = path.split(".")
    target: Any = body
    for k in parents:
        target = target[int(k)] if k.isdigit() else target[k]
    if value is KeyError:
        del target[last]
    else:
        target[int(last) if last.isdigit() else last] = value
    return body


@pytest.mark.parametrize(
    ("body", "headers", "code"),
    [
        pytest.param(_with("id_schema", ["EMAIL_SHA256", "PHONE_SHA256"]), AUTH, 40002, id="schema-length"),
        pytest.param(_with("batch_data.0.0.id", "testing@testing.com"), AUTH, 40062, id="raw-email"),
        pytest.param(_with("batch_data.0.1.id", PHONE.upper()), AUTH, 40062, id="uppercase-hex"),
        pytest.param(fixture_body(), {}, 40104, id="missing-token"),
        pytest.param(fixture_body(), {"Access-Token": ""}, 40104, id="empty-token"),
        pytest.param(fixture_body(), {"Access-Token": f"Bearer {TOKEN}"}, 40105, id="bearer-prefix"),
        pytest.param(fixture_body(), {"Authorization": f"Bearer {TOKEN}"}, 40104, id="authorization-header"),
        pytest.param(fixture_body(), {"Access-Token": "wrong"}, 40105, id="wrong-token"),
        pytest.param(_with("id_schema", ["EMAIL_SHA256", "EMAIL_SHA256", "IDFA_SHA256"]), AUTH, 40002, id="dup-schema"),
        pytest.param(_with("batch_data.0.2.audience_ids", ["777"]), AUTH, 40002, id="unknown-audience"),
        pytest.param(_with("batch_data.0.2.audience_ids", ["55555"]), AUTH, 40002, id="foreign-audience"),
        pytest.param(_with("advertiser_ids", ["404"]), AUTH, 40300, id="unknown-advertiser"),
        pytest.param(_with("batch_data.0", [{}, {}, {}]), AUTH, 40002, id="empty-row"),
        pytest.param(_with("action", "remove"), AUTH, 40002, id="bad-action"),
        pytest.param(_with("batch_data", [fixture_body()["batch_data"][0]] * 10_001), AUTH, 40061, id="rows"),
    ],
)
async def test_strict_refusals_apply_nothing(
    sandbox: SandboxServer,
    http: aiohttp.ClientSession,
    body: dict[str, Any],
    headers: dict[str, str],
    code: int,
) -> None:
    # Two rows: a valid one first, so a partial apply would show.
    if len(body["batch_data"]) == 1:
        body["batch_data"].insert(0, copy.deepcopy(fixture_body()["batch_data"][0]))
    answer = await post_mapping(http, sandbox, body, headers)
    assert answer["code"] == code, answer
    assert answer["request_id"] and answer["data"] == {}
    assert await members(http, sandbox) == {}
    async with http.get(sandbox.base_url + "/_sandbox/state") as r:
        state = await r.json()
    assert state["rejected"] == {str(code): 1}
    assert state["audiences"]["12345"]["members"] == {}


async def test_parameter_messages(sandbox: SandboxServer, http: aiohttp.ClientSession) -> None:
    answer = await post_mapping(http, sandbox, _with("id_schema", KeyError))
    assert (answer["code"], answer["message"]) == (40002, "Parameter error: id_schema: required")
    answer = await post_mapping(http, sandbox, _with("batch_data.0", [{}]))
    assert answer["message"] == "Parameter error: batch_data[0]: row length 1 does not match id_schema length 3"
    async with http.post(sandbox.url + MAPPING, data=b"{not json", headers=AUTH) as r:
        assert (await r.json())["code"] == 40002


async def test_lowercase_schema_and_default_action(sandbox: SandboxServer, http: aiohttp.ClientSession) -> None:
    body = _with("id_schema", ["email_sha256", "phone_sha256", "idfa_sha256"])
    del body["action"]
    assert (await post_mapping(http, sandbox, body))["code"] == 0
    assert await members(http, sandbox) == {
        "EMAIL_SHA256": [EMAIL],
        "PHONE_SHA256": [PHONE],
        "IDFA_SHA256": [MAID],
    }


async def test_permission_error(sandbox: SandboxServer, http: aiohttp.ClientSession) -> None:
    async with http.post(
        sandbox.base_url + "/_sandbox/advertisers", json={"advertiser_id": "123", "permission_denied": True}
    ) as r:
        assert r.status == 200
    assert (await post_mapping(http, sandbox, fixture_body()))["code"] == 40001


# -- faults ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("code", [40100, 40132, 50000, 51003, 40105, 40001])
async def test_code_fault_not_applied(sandbox: SandboxServer, http: aiohttp.ClientSession, code: int) -> None:
    await set_faults(http, sandbox, [{"kind": "code", "code": code}])
    answer = await post_mapping(http, sandbox, fixture_body())
    assert answer["code"] == code and answer["message"]
    assert await members(http, sandbox) == {}


async def test_fault_decided_before_validation(sandbox: SandboxServer, http: aiohttp.ClientSession) -> None:
    await set_faults(http, sandbox, [{"kind": "code", "code": 40100}])
    assert (await post_mapping(http, sandbox, {"junk": True}, {}))["code"] == 40100


async def test_http_faults(sandbox: SandboxServer, http: aiohttp.ClientSession) -> None:
    await set_faults(http, sandbox, [{"kind": "http", "status": 503, "count": 1}, {"kind": "http", "html": True}])
    async with http.post(sandbox.url + MAPPING, json=fixture_body(), headers=AUTH) as r:
        assert r.status == 503
        assert (await r.json())["code"] == 50000
    async with http.post(sandbox.url + MAPPING, json=fixture_body(), headers=AUTH) as r:
        assert r.status == 502 and r.content_type == "text/html"
        assert "502 Bad Gateway" in await r.text() and "nginx" in await r.text()
    assert await members(http, sandbox) == {}


async def test_reset_fault(sandbox: SandboxServer, http: aiohttp.ClientSession) -> None:
    await set_faults(http, sandbox, [{"kind": "reset", "count": 1}])
    with pytest.raises(aiohttp.ClientConnectionError):
        await post_mapping(http, sandbox, fixture_body())
    assert await members(http, sandbox) == {}
    assert (await post_mapping(http, sandbox, fixture_body()))["code"] == 0


async def test_slow_fault_is_applied(sandbox: SandboxServer, http: aiohttp.ClientSession) -> None:
    await set_faults(http, sandbox, [{"kind": "slow", "delay_s": 0.3}])
    start = time.monotonic()
    assert (await post_mapping(http, sandbox, fixture_body()))["code"] == 0
    assert time.monotonic() - start >= 0.3
    assert (await members(http, sandbox))["EMAIL_SHA256"] == [EMAIL]


async def test_timeout_fault(sandbox: SandboxServer, http: aiohttp.ClientSession) -> None:
    await set_faults(http, sandbox, [{"kind": "timeout", "count": 1}])
    with pytest.raises(asyncio.TimeoutError):
        async with http.post(
            sandbox.url + MAPPING, json=fixture_body(), headers=AUTH, timeout=aiohttp.ClientTimeout(total=0.3)
        ):
            pass
    assert await members(http, sandbox) == {}
    # The server still stops promptly although a handler is parked (fixture teardown would hang otherwise).


async def test_count_and_advertiser_filter(sandbox: SandboxServer, http: aiohttp.ClientSession) -> None:
    sandbox.state.add_advertiser("999")
    await set_faults(http, sandbox, [{"kind": "code", "code": 50000, "count": 2, "advertiser_id": "999"}])
    other = _with("advertiser_ids", ["999"])
    for cell in other["batch_data"][0]:
        cell["audience_ids"] = ["55555"]
    assert (await post_mapping(http, sandbox, fixture_body()))["code"] == 0  # advertiser 123 unaffected
    codes = [(await post_mapping(http, sandbox, other))["code"] for _ in range(3)]
    assert codes == [50000, 50000, 0]
    async with http.get(sandbox.base_url + "/_sandbox/faults") as r:
        assert (await r.json())["rules"][0]["fired"] == 2


async def test_probability_with_seed(sandbox: SandboxServer, http: aiohttp.ClientSession) -> None:
    async def run() -> list[int]:
        await set_faults(http, sandbox, {"seed": 42, "rules": [{"kind": "code", "code": 40100, "probability": 0.5}]})
        return [(await post_mapping(http, sandbox, fixture_body()))["code"] for _ in range(20)]

    first, second = await run(), await run()
    assert first == second
    assert 0 < first.count(40100) < 20


async def test_rate_limit(sandbox: SandboxServer, http: aiohttp.ClientSession) -> None:
    await set_faults(http, sandbox, {"rate_limit_qps": 5})
    codes = await asyncio.gather(*(post_mapping(http, sandbox, fixture_body()) for _ in range(8)))
    assert sorted(c["code"] for c in codes) == [0] * 5 + [40100] * 3
    limited = next(c for c in codes if c["code"] == 40100)
    assert limited["message"] == "Too many requests. Please retry in some time."
    async with http.get(sandbox.base_url + "/_sandbox/requests") as r:
        log = (await r.json())["requests"]
    assert sum(1 for e in log if e["code"] == 40100) == 3
    async with http.delete(sandbox.base_url + "/_sandbox/faults") as r:
        assert r.status == 200
    assert (await post_mapping(http, sandbox, fixture_body()))["code"] == 0


async def test_bad_fault_plan_refused(sandbox: SandboxServer, http: aiohttp.ClientSession) -> None:
    async with http.post(sandbox.base_url + "/_sandbox/faults", json=[{"kind": "explode"}]) as r:
        assert r.status == 400
    await set_faults(http, sandbox, [{"kind": "slow", "delay_s": 0.01}])
    async with http.get(sandbox.base_url + "/_sandbox/faults") as r:
        await set_faults(http, sandbox, await r.json())  # round-trips


async def test_write_paths_need_trailing_slash(sandbox: SandboxServer, http: aiohttp.ClientSession) -> None:
    async with http.post(sandbox.url + "/segment/mapping", json=fixture_body(), headers=AUTH) as r:
        assert r.status == 404


# -- audiences, reads ---------------------------------------------------------------------------------------


async def _get(http: aiohttp.ClientSession, url: str, **params: str) -> dict[str, Any]:
    async with http.get(url, params=params, headers=AUTH) as r:
        assert r.status == 200
        result: dict[str, Any] = await r.json()
        return result


async def test_create_truncates_and_get(sandbox: SandboxServer, http: aiohttp.ClientSession) -> None:
    name = "N" * 80
    async with http.post(
        sandbox.url + "/segment/audience/",
        json={"advertiser_id": "123", "custom_audience_name": name, "action": "create"},
        headers=AUTH,
    ) as r:
        created = await r.json()
    assert created["code"] == 0 and created["message"] == "OK"
    aid = created["data"]["audience_id"]
    assert aid.isdigit()
    for path in ("/dmp/custom_audience/get/", "/dmp/custom_audience/get"):
        got = await _get(http, sandbox.url + path, advertiser_id="123", custom_audience_ids=json.dumps([aid]))
        details = got["data"]["list"][0]["audience_details"]
        assert details["audience_id"] == aid and details["type"] == "Partner"
        assert details["name"] == "N" * 67 + "..."
        assert details["cover_num"] == 0 and details["is_valid"] is False
    foreign = await _get(
        http, sandbox.url + "/dmp/custom_audience/get/", advertiser_id="123", custom_audience_ids='["55555"]'
    )
    assert foreign["code"] == 40002
    unknown = await _get(
        http, sandbox.url + "/dmp/custom_audience/get/", advertiser_id="123", custom_audience_ids='["1"]'
    )
    assert unknown["code"] == 40007
    async with http.post(
        sandbox.url + "/segment/audience/",
        json={"advertiser_id": "404", "custom_audience_name": "x", "action": "create"},
        headers=AUTH,
    ) as r:
        assert (await r.json())["code"] == 40300


async def test_list_paging(sandbox: SandboxServer, http: aiohttp.ClientSession) -> None:
    for i in range(4):
        sandbox.state.add_audience("123", name=f"aud {i}")
    await post_mapping(http, sandbox, fixture_body())
    pages = [
        await _get(http, sandbox.url + "/dmp/custom_audience/list/", advertiser_id="123", page=str(p), page_size="2")
        for p in (1, 2, 3)
    ]
    assert pages[0]["data"]["page_info"] == {"page": 1, "page_size": 2, "total_number": 5, "total_page": 3}
    ids = [a["audience_id"] for p in pages for a in p["data"]["list"]]
    assert len(ids) == 5 and ids[0] == "12345" and "55555" not in ids
    first = pages[0]["data"]["list"][0]
    assert first["cover_num"] == 3 and first["is_valid"] is True and first["audience_type"] == "Partner"
    default = await _get(http, sandbox.url + "/dmp/custom_audience/list/", advertiser_id="123")
    assert default["data"]["page_info"]["page_size"] == 100
    bad = await _get(http, sandbox.url + "/dmp/custom_audience/list/", advertiser_id="123", page="0")
    assert bad["code"] == 40002


async def test_user_and_advertiser_info(sandbox: SandboxServer, http: aiohttp.ClientSession) -> None:
    user = await _get(http, sandbox.url + "/user/info/")
    assert user["code"] == 0 and user["data"]["display_name"] and user["data"]["email"] is None
    async with http.get(sandbox.url + "/user/info/", headers={"Access-Token": "nope"}) as r:
        assert (await r.json())["code"] == 40105
    info = await _get(http, sandbox.url + "/advertiser/info/", advertiser_ids='["123"]')
    assert info["data"]["list"] == [
        {"advertiser_id": "123", "name": "Sandbox advertiser 123", "status": "STATUS_ENABLE"}
    ]
    assert (await _get(http, sandbox.url + "/advertiser/info/", advertiser_ids='["123","404"]'))["code"] == 40300


# -- control API, runners -----------------------------------------------------------------------------------


async def test_control_api(sandbox: SandboxServer, http: aiohttp.ClientSession) -> None:
    base = sandbox.base_url + "/_sandbox"
    async with http.post(base + "/advertisers", json={"advertiser_id": "42", "name": "Acme"}) as r:
        assert r.status == 200
    async with http.post(base + "/audiences", json={"advertiser_id": "42"}) as r:
        new_id = (await r.json())["audience_id"]
    async with http.post(base + "/audiences", json={"advertiser_id": "nobody"}) as r:
        assert r.status == 404
    await post_mapping(http, sandbox, fixture_body())
    async with http.get(base + "/state") as r:
        state = await r.json()
    assert state["advertisers"]["42"]["name"] == "Acme"
    assert state["audiences"][new_id]["advertiser_id"] == "42"
    assert state["audiences"]["12345"]["members"] == {"EMAIL_SHA256": 1, "PHONE_SHA256": 1, "IDFA_SHA256": 1}
    assert state["requests"] == {MAPPING: 1}
    async with http.get(base + "/audiences/nope/members") as r:
        assert r.status == 404
    async with http.post(base + "/reset") as r:
        assert r.status == 200
    assert await members(http, sandbox) == {}
    async with http.get(base + "/requests") as r:
        assert (await r.json())["requests"] == []
    async with http.post(base + "/reset", json={"all": True}) as r:
        assert r.status == 200
    assert sandbox.state.audiences == {}


def test_sandbox_thread_start_stop() -> None:
    body = json.dumps(fixture_body()).encode()
    with SandboxThread(port=0, advertisers=["123"], audiences=[("123", "12345")]) as s:
        assert s.url == f"http://127.0.0.1:{s.port}/open_api/v1.3" and s.port > 0
        req = urllib.request.Request(
            s.url + MAPPING, data=body, headers={**AUTH, "Content-Type": "application/json"}, method="POST"
        )
        with urllib.request.urlopen(req, timeout=5) as r:
            assert json.load(r)["code"] == 0
        assert s.state.members("12345")["EMAIL_SHA256"] == [EMAIL]
        # Park one request on a timeout fault: stop() must still return quickly.
        s.set_faults(FaultPlan.from_json([{"kind": "timeout"}]))
        with pytest.raises(OSError):
            urllib.request.urlopen(req, timeout=0.2)
        start = time.monotonic()
    assert time.monotonic() - start < 3


def test_cli_main_serves_until_sigterm() -> None:
    env = {**os.environ, "TIKTOK_ACCESS_TOKEN": "cli-secret-token"}
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; from service.devtools.sandbox import main; sys.exit(main())",
         "--port", "0", "--audience", "123:12345", "--seed", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        url = line.strip().split("=", 1)[1]
        assert url.startswith("http://127.0.0.1:") and url.endswith("/open_api/v1.3")
        req = urllib.request.Request(url + "/user/info/", headers={"Access-Token": "cli-secret-token"})
        with urllib.request.urlopen(req, timeout=5) as r:
            assert json.load(r)["code"] == 0
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0
    assert "cli-secret-token" not in line + out + err
