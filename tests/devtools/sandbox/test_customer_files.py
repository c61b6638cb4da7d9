"""The sandbox's customer-file API: upload (multipart, MD5), create, update and reads, in process and over HTTP.

Files are built here by hand, not with service/core/customer_files.py, so the sandbox checks the service's writer
rather than agreeing with it by construction.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from service.devtools.sandbox import SandboxServer
from service.devtools.sandbox.state import (
    ADVERTISER_NOT_EXIST,
    CUSTOMER_FILE,
    FILE_CALCULATE_TYPE_ERROR,
    FILE_EMPTY,
    FILE_NOT_EXIST,
    FILE_TOO_LARGE,
    FILE_TYPE_ERROR,
    NOT_EXIST,
    PARAM_ERROR,
    PERMISSION_ERROR,
    PII_NOT_HASHED,
    ApiError,
    FilePart,
    SandboxState,
)

from .reference_fixture import EMAIL

ADV = "123"
UPLOAD = "/dmp/custom_audience/file/upload/"
CREATE = "/dmp/custom_audience/create/"
UPDATE = "/dmp/custom_audience/update/"
AUTH = {"Access-Token": "sandbox-token"}


def ids(n: int, salt: str = "") -> list[str]:
    return [hashlib.sha256(f"{salt}{i}".encode()).hexdigest() for i in range(n)]


def content(values: list[str], header: str | None = None) -> bytes:
    return "".join(f"{v}\n" for v in ([header] if header else []) + values).encode()


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def form(
    data: bytes,
    calculate_type: str = "EMAIL_SHA256",
    *,
    signature: str | None = None,
    filename: str = "members.csv",
    advertiser_id: str = ADV,
) -> dict[str, object]:
    return {
        "advertiser_id": advertiser_id,
        "calculate_type": calculate_type,
        "file_signature": md5(data) if signature is None else signature,
        "file": FilePart(filename, data),
    }


@pytest.fixture
def state() -> SandboxState:
    s = SandboxState()
    s.register_all([ADV, "999"], [(ADV, "12345")])
    return s


def upload(state: SandboxState, values: list[str], calculate_type: str = "EMAIL_SHA256", **kw: Any) -> str:
    path = state.upload_file(form(content(values), calculate_type, **kw))["file_path"]
    assert isinstance(path, str)
    return path


def create(state: SandboxState, paths: list[str], calculate_type: str = "EMAIL_SHA256") -> str:
    body = {"advertiser_id": ADV, "custom_audience_name": "file aud", "calculate_type": calculate_type}
    aid = state.create_file_audience({**body, "file_paths": paths})["custom_audience_id"]
    assert isinstance(aid, str)
    return aid


def rows(value: object) -> list[dict[str, Any]]:
    """A list of JSON objects out of a state view typed `object`."""
    assert isinstance(value, list) and all(isinstance(v, dict) for v in value)
    return value


def refused(call: Any, *args: Any) -> ApiError:
    with pytest.raises(ApiError) as err:
        call(*args)
    return err.value


# -- upload -------------------------------------------------------------------------------------------------


def test_upload_keeps_the_file_under_a_new_path(state: SandboxState) -> None:
    values = ids(3)
    data = content([*values, values[0]], header="Email_SHA256")
    answer = state.upload_file(form(data, signature=md5(data).upper()))
    path = answer["file_path"]
    assert isinstance(path, str) and len(path) == 16
    assert state.file_identifiers(path) == sorted(values)
    [received] = rows(state.customer_files()["files"])
    assert received == {
        "file_path": path,
        "advertiser_id": ADV,
        "calculate_type": "EMAIL_SHA256",
        "name": "members.csv",
        "md5": md5(data),
        "bytes": len(data),
        "rows": 3,
        "header": "Email_SHA256",
    }
    assert upload(state, values) != path  # every upload gets its own path
    crlf = state.upload_file(form(b"\r\n".join(v.encode() for v in values) + b"\r\n", filename="x.txt"))
    assert state.file_identifiers(str(crlf["file_path"])) == sorted(values)


def test_md5_mismatch_refused_with_a_clear_message(state: SandboxState) -> None:
    data = content(ids(2))
    err = refused(state.upload_file, form(data, signature=md5(data + b"x")))
    assert err.code == PARAM_ERROR
    assert "file_signature" in err.message and md5(data) in err.message and "MD5" in err.message
    assert state.files == {}


@pytest.mark.parametrize(
    ("lines", "calculate_type", "code", "fragment"),
    [
        (["someone@example.com"], "EMAIL_SHA256", PII_NOT_HASHED, "line 2"),
        ([ids(1)[0].upper()], "EMAIL_SHA256", PII_NOT_HASHED, "lowercase hex SHA-256"),
        (["+15555555555"], "PHONE_SHA256", PII_NOT_HASHED, "PII_NOT_HASHED"),
        ([md5(b"idfa")], "IDFA_SHA256", FILE_CALCULATE_TYPE_ERROR, "not a SHA-256"),
        ([ids(1)[0]], "GAID_MD5", FILE_CALCULATE_TYPE_ERROR, "not a MD5"),
        (["Email_SHA256"], "EMAIL_SHA256", PII_NOT_HASHED, "line 2"),  # a header only on the first line
    ],
)
def test_every_line_must_be_a_lowercase_digest(
    state: SandboxState, lines: list[str], calculate_type: str, code: int, fragment: str
) -> None:
    data = content([ids(1, "first")[0], *lines])
    err = refused(state.upload_file, form(data, calculate_type))
    assert err.code == code and fragment in err.message, err.message
    assert "example.com" not in err.message and "+1555" not in err.message  # never echo the line
    assert state.files == {}


def test_md5_files_and_type_aliases(state: SandboxState) -> None:
    path = upload(state, [md5(b"a"), md5(b"b")], "MAID_MD5")
    assert state.files[path].calculate_type == "FIRST_MD5"  # MAID_* are aliases of FIRST_*


@pytest.mark.parametrize(
    ("body_change", "code", "fragment"),
    [
        ({"calculate_type": "EMAIL"}, PARAM_ERROR, "calculate_type: must be one of"),
        ({"calculate_type": "MULTIPLE_TYPES"}, PARAM_ERROR, "not modelled"),
        ({"calculate_type": None}, PARAM_ERROR, "calculate_type: required"),
        ({"file_signature": ""}, PARAM_ERROR, "file_signature: required"),
        ({"file": "not a file part"}, PARAM_ERROR, "file: required"),
        ({"advertiser_id": "404"}, ADVERTISER_NOT_EXIST, "404"),
        ({"file": FilePart("members.zip", b"x")}, FILE_TYPE_ERROR, ".csv or .txt"),
        ({"file_name": "members.CSV"}, FILE_TYPE_ERROR, "members.CSV"),
        ({"file": FilePart("members.csv", b"")}, FILE_EMPTY, "empty"),
        ({"file": FilePart("members.csv", b"Email_SHA256\n\n")}, FILE_EMPTY, "no identifier"),
        ({"file": FilePart("members.csv", b"\xff\xfe")}, FILE_TYPE_ERROR, "UTF-8"),
    ],
)
def test_upload_refusals(state: SandboxState, body_change: dict[str, object], code: int, fragment: str) -> None:
    body = {**form(content(ids(2))), **body_change}
    if body_change.get("file") is not None and isinstance(body_change["file"], FilePart):
        body["file_signature"] = md5(body_change["file"].content)
    err = refused(state.upload_file, body)
    assert err.code == code and fragment in err.message, err.message
    assert state.files == {}


def test_size_limit_is_inclusive() -> None:
    state = SandboxState(max_file_bytes=3 * 65)
    state.add_advertiser(ADV)
    assert upload(state, ids(3))
    err = refused(state.upload_file, form(content(ids(4))))
    assert err.code == FILE_TOO_LARGE and "260 bytes, at most 195" in err.message


def test_forbidden_advertiser(state: SandboxState) -> None:
    state.add_advertiser(ADV, permission_denied=True)
    assert refused(state.upload_file, form(content(ids(1)))).code == PERMISSION_ERROR


# -- create, update -----------------------------------------------------------------------------------------


def test_create_from_files_is_a_customer_file_audience(state: SandboxState) -> None:
    first, second = ids(700, "a"), ids(700, "b")
    paths = [upload(state, first), upload(state, second + first[:10])]
    aid = create(state, paths)
    assert state.members(aid) == {"EMAIL_SHA256": sorted(first + second)}
    listed = {a["audience_id"]: a for a in rows(state.list_audiences(ADV, 1, 100)["list"])}
    assert listed[aid]["audience_type"] == CUSTOMER_FILE == "Customer File Audience"
    assert listed[aid]["calculate_type"] == "EMAIL_SHA256" and listed[aid]["cover_num"] == 1400
    assert listed["12345"]["audience_type"] == "Partner"
    [got] = rows(state.get_audiences(ADV, [aid])["list"])
    assert got["audience_details"]["type"] == CUSTOMER_FILE and got["audience_details"]["cover_num"] == 1400
    assert [h["action"] for h in got["audience_history"]] == ["create"]
    assert state.snapshot()["audiences"][aid]["type"] == CUSTOMER_FILE  # type: ignore[index]
    [update] = rows(state.customer_files()["updates"])
    assert update == {
        "audience_id": aid,
        "action": "CREATE",
        "file_paths": tuple(paths),
        "size_before": 0,
        "size_after": 1400,
    }


def test_create_refusals(state: SandboxState) -> None:
    ok = upload(state, ids(1000))
    small = upload(state, ids(999, "s"))
    phone = upload(state, ids(1000, "p"), "PHONE_SHA256")
    foreign = upload(state, ids(1000, "f"), advertiser_id="999")
    base = {"advertiser_id": ADV, "custom_audience_name": "n", "calculate_type": "EMAIL_SHA256", "file_paths": [ok]}
    cases: list[tuple[dict[str, object], int, str]] = [
        ({"file_paths": [small]}, PARAM_ERROR, "would hold 999 users after create"),
        ({"file_paths": [phone]}, FILE_CALCULATE_TYPE_ERROR, "holds PHONE_SHA256"),
        ({"file_paths": ["0123456789abcdef"]}, FILE_NOT_EXIST, "does not exist"),
        ({"file_paths": [foreign]}, PARAM_ERROR, "another advertiser"),
        ({"file_paths": ["short"]}, PARAM_ERROR, "16 characters"),
        ({"file_paths": []}, PARAM_ERROR, "non-empty list"),
        ({"file_paths": [ok] * 501}, PARAM_ERROR, "at most 500"),
        ({"custom_audience_name": "n" * 129}, PARAM_ERROR, "at most 128"),
        ({"calculate_type": "MAID_SHA256"}, PARAM_ERROR, "calculate_type"),
        ({"retention_in_days": 0}, PARAM_ERROR, "retention_in_days"),
        ({"audience_sub_type": "BIG"}, PARAM_ERROR, "audience_sub_type"),
    ]
    for change, code, fragment in cases:
        err = refused(state.create_file_audience, {**base, **change})
        assert (err.code, fragment in err.message) == (code, True), (change, err.message)
    assert [a.audience_type for a in state.audiences.values()] == ["Partner"]
    assert create(state, [ok], "EMAIL_SHA256")
    assert create(state, [ok, ok], "EMAIL_SHA256")  # the same file twice counts once


def test_update_append_remove_replace(state: SandboxState) -> None:
    base = ids(1000)
    aid = create(state, [upload(state, base)])
    extra = ids(50, "x")
    body = {"advertiser_id": ADV, "custom_audience_id": aid}
    state.update_file_audience({**body, "file_paths": [upload(state, extra)], "action": "APPEND"})
    assert state.members(aid)["EMAIL_SHA256"] == sorted(base + extra)
    state.update_file_audience(
        {**body, "file_paths": [upload(state, extra[:20] + ids(5, "nobody"))], "action": "REMOVE"}
    )
    assert state.members(aid)["EMAIL_SHA256"] == sorted(base + extra[20:])
    fresh = ids(1200, "new")
    state.update_file_audience({**body, "file_paths": [upload(state, fresh)]})  # REPLACE when omitted
    assert state.members(aid)["EMAIL_SHA256"] == sorted(fresh)
    state.update_file_audience({**body, "custom_audience_name": "renamed"})
    assert state.audiences[aid].name == "renamed" and len(state.members(aid)["EMAIL_SHA256"]) == 1200
    updates = rows(state.customer_files()["updates"])
    assert [(u["action"], u["size_before"], u["size_after"]) for u in updates] == [
        ("CREATE", 0, 1000),
        ("APPEND", 1000, 1050),
        ("REMOVE", 1050, 1030),
        ("REPLACE", 1030, 1200),
        ("RENAME", 1200, 1200),
    ]
    [got] = rows(state.get_audiences(ADV, [aid])["list"])
    assert [h["action"] for h in got["audience_history"]] == ["create", "append", "remove", "replace", "rename"]


@pytest.mark.parametrize(
    ("action", "change", "after"),
    [("APPEND", ids(1, "new"), 999), ("REMOVE", ids(1), 997), ("REPLACE", ids(999, "r"), 999)],
)
def test_update_leaving_fewer_than_1000_refused_and_not_applied(
    state: SandboxState, action: str, change: list[str], after: int
) -> None:
    aid = create(state, [upload(state, ids(1000))])
    members = state.audiences[aid].members["EMAIL_SHA256"]
    members -= set(ids(1000)[-2:])  # 998 now: TikTok's audience can shrink below its files (matching, expiry)
    before = state.members(aid)
    err = refused(
        state.update_file_audience,
        {"advertiser_id": ADV, "custom_audience_id": aid, "file_paths": [upload(state, change)], "action": action},
    )
    assert err.code == PARAM_ERROR
    assert f"would hold {after} users after {action}" in err.message and "at least 1,000" in err.message
    assert state.members(aid) == before
    assert [u["action"] for u in rows(state.customer_files()["updates"])] == ["CREATE"]


def test_update_reaching_exactly_1000_passes(state: SandboxState) -> None:
    aid = create(state, [upload(state, ids(1000))])
    state.audiences[aid].members["EMAIL_SHA256"].discard(ids(1)[0])
    body = {"advertiser_id": ADV, "custom_audience_id": aid}
    state.update_file_audience({**body, "action": "APPEND", "file_paths": [upload(state, ids(1, "new"))]})
    assert len(state.members(aid)["EMAIL_SHA256"]) == 1000
    state.update_file_audience({**body, "action": "REPLACE", "file_paths": [upload(state, ids(1000, "r"))]})
    assert state.members(aid)["EMAIL_SHA256"] == sorted(ids(1000, "r"))


def test_update_refusals(state: SandboxState) -> None:
    aid = create(state, [upload(state, ids(1000))])
    phone = upload(state, ids(1000, "p"), "PHONE_SHA256")
    email = upload(state, ids(10, "e"))
    base = {"advertiser_id": ADV, "custom_audience_id": aid, "file_paths": [email], "action": "APPEND"}
    cases: list[tuple[dict[str, object], int, str]] = [
        ({"file_paths": [phone]}, FILE_CALCULATE_TYPE_ERROR, "the audience EMAIL_SHA256"),
        ({"action": "DELETE"}, PARAM_ERROR, "action: must be one of APPEND, REMOVE, REPLACE"),
        ({"custom_audience_id": "12345"}, PARAM_ERROR, "Partner audience, not a customer file audience"),
        ({"custom_audience_id": "777"}, NOT_EXIST, "does not exist"),
        ({"file_paths": None}, PARAM_ERROR, "pass custom_audience_name or file_paths"),
        ({"file_paths": ["fedcba9876543210"]}, FILE_NOT_EXIST, "does not exist"),
        ({"custom_audience_name": ""}, PARAM_ERROR, "custom_audience_name"),
    ]
    for change, code, fragment in cases:
        err = refused(state.update_file_audience, {**base, **change})
        assert (err.code, fragment in err.message) == (code, True), (change, err.message)
    assert len(state.members(aid)["EMAIL_SHA256"]) == 1000


def test_mapping_refuses_a_customer_file_audience(state: SandboxState) -> None:
    aid = create(state, [upload(state, ids(1000))])
    body = {
        "advertiser_ids": [ADV],
        "action": "add",
        "id_schema": ["EMAIL_SHA256"],
        "batch_data": [[{"id": EMAIL, "audience_ids": [aid]}]],
    }
    err = refused(state.validate_mapping, body)
    assert (err.code, err.message) == (PARAM_ERROR, "Parameter error: invalid audience ID")


def test_reset_clears_files_and_updates(state: SandboxState) -> None:
    aid = create(state, [upload(state, ids(1000))])
    state.reset()
    assert state.customer_files() == {"files": [], "updates": []} and state.members(aid) == {}
    assert state.audiences[aid].audience_type == CUSTOMER_FILE  # audiences stay unless everything is reset
    state.reset(everything=True)
    assert state.audiences == {}


# -- over HTTP ----------------------------------------------------------------------------------------------


@pytest.fixture
async def sandbox() -> AsyncIterator[SandboxServer]:
    async with SandboxServer(advertisers=[ADV, "999"], audiences=[(ADV, "12345")]) as s:
        yield s


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield session


async def post_upload(
    http: aiohttp.ClientSession, sb: SandboxServer, data: bytes, *, signature: str | None = None, adv: str = ADV
) -> dict[str, Any]:
    f = aiohttp.FormData()
    f.add_field("advertiser_id", adv)
    f.add_field("calculate_type", "EMAIL_SHA256")
    f.add_field("file_signature", md5(data) if signature is None else signature)
    f.add_field("file", data, filename="members.csv", content_type="text/csv")
    async with http.post(sb.url + UPLOAD, data=f, headers=AUTH) as r:
        assert r.status == 200
        result: dict[str, Any] = await r.json()
        return result


async def post_json(http: aiohttp.ClientSession, sb: SandboxServer, path: str, body: object) -> dict[str, Any]:
    async with http.post(sb.url + path, json=body, headers=AUTH) as r:
        assert r.status == 200
        result: dict[str, Any] = await r.json()
        return result


async def ctl(http: aiohttp.ClientSession, sb: SandboxServer, path: str) -> Any:
    async with http.get(sb.base_url + "/_sandbox" + path) as r:
        return await r.json()


async def test_http_upload_create_update_and_control_views(sandbox: SandboxServer, http: aiohttp.ClientSession) -> None:
    data = content(ids(1000))
    up = await post_upload(http, sandbox, data)
    assert up["code"] == 0 and up["message"] == "OK" and up["request_id"]
    path = up["data"]["file_path"]
    created = await post_json(
        http,
        sandbox,
        CREATE,
        {"advertiser_id": ADV, "custom_audience_name": "vip", "calculate_type": "EMAIL_SHA256", "file_paths": [path]},
    )
    assert created["code"] == 0 and set(created["data"]) == {"custom_audience_id"}
    aid = created["data"]["custom_audience_id"]
    small = (await post_upload(http, sandbox, content(ids(5))))["data"]["file_path"]
    body = {"advertiser_id": ADV, "custom_audience_id": aid, "file_paths": [small], "action": "REMOVE"}
    refusal = await post_json(http, sandbox, UPDATE, body)
    assert refusal["code"] == 40002 and "would hold 995 users after REMOVE" in refusal["message"]
    ok = await post_json(http, sandbox, UPDATE, {**body, "action": "APPEND", "file_paths": [small]})
    assert ok == {**ok, "code": 0, "data": {}}
    views = await ctl(http, sandbox, "/customer_files")
    assert [f["rows"] for f in views["files"]] == [1000, 5] and views["files"][0]["md5"] == md5(data)
    updates = [(u["action"], u["size_before"], u["size_after"]) for u in views["updates"]]
    assert updates == [("CREATE", 0, 1000), ("APPEND", 1000, 1000)]  # already members: the size holds
    assert (await ctl(http, sandbox, f"/customer_files/{small}")) == {"identifiers": sorted(ids(5))}
    async with http.get(sandbox.base_url + "/_sandbox/customer_files/nope") as r:
        assert r.status == 404
    state = await ctl(http, sandbox, "/state")
    assert state["audiences"][aid]["type"] == CUSTOMER_FILE and state["customer_files"] == 2
    assert state["audiences"][aid]["members"] == {"EMAIL_SHA256": 1000}
    assert state["rejected"] == {"40002": 1}
    async with http.get(sandbox.url + "/dmp/custom_audience/list/", params={"advertiser_id": ADV}, headers=AUTH) as r:
        listed = {a["audience_id"]: a["audience_type"] for a in (await r.json())["data"]["list"]}
    assert listed == {"12345": "Partner", aid: CUSTOMER_FILE}


async def test_http_md5_mismatch_and_non_multipart(sandbox: SandboxServer, http: aiohttp.ClientSession) -> None:
    data = content(ids(2))
    answer = await post_upload(http, sandbox, data, signature=md5(b"other"))
    assert answer["code"] == 40002 and "file_signature" in answer["message"]
    as_json = await post_json(http, sandbox, UPLOAD, {"advertiser_id": ADV, "calculate_type": "EMAIL_SHA256"})
    assert as_json["code"] == 40002 and "multipart" in as_json["message"]
    async with http.post(
        sandbox.url + UPLOAD,
        data=b"--b\r\nno headers",
        headers={**AUTH, "Content-Type": "multipart/form-data; boundary=b"},
    ) as r:
        assert (await r.json())["code"] == 40002
    async with http.post(sandbox.url + UPLOAD, data=aiohttp.FormData({"a": "b"}), headers={"Access-Token": "x"}) as r:
        assert (await r.json())["code"] == 40105  # token checked before the body
    assert (await ctl(http, sandbox, "/customer_files"))["files"] == []


async def test_http_faults_apply_to_file_paths(sandbox: SandboxServer, http: aiohttp.ClientSession) -> None:
    plan = {
        "rules": [
            {"kind": "code", "code": 50000, "path": UPLOAD, "count": 1},
            {"kind": "code", "code": 40001, "path": UPLOAD, "advertiser_id": "999"},
            {"kind": "http", "status": 503, "path": UPDATE, "count": 1},
        ],
        "rate_limit_qps": 1000,
        "rate_limit_path": "*",
    }
    async with http.post(sandbox.base_url + "/_sandbox/faults", json=plan) as r:
        assert r.status == 200
    data = content(ids(1000))
    assert (await post_upload(http, sandbox, data))["code"] == 50000
    assert (await post_upload(http, sandbox, data, adv="999"))["code"] == 40001  # advertiser read from the form
    path = (await post_upload(http, sandbox, data))["data"]["file_path"]
    aid = (
        await post_json(
            http,
            sandbox,
            CREATE,
            {"advertiser_id": ADV, "custom_audience_name": "n", "calculate_type": "EMAIL_SHA256", "file_paths": [path]},
        )
    )["data"]["custom_audience_id"]
    async with http.post(
        sandbox.url + UPDATE, json={"advertiser_id": ADV, "custom_audience_id": aid, "file_paths": [path]}, headers=AUTH
    ) as r:
        assert r.status == 503
    files = await ctl(http, sandbox, "/customer_files")
    assert len(files["files"]) == 1 and [u["action"] for u in files["updates"]] == ["CREATE"]
    log = (await ctl(http, sandbox, "/requests?path=*"))["requests"]
    assert [(e["path"], e["code"], e["fault"]) for e in log] == [
        (UPLOAD, 50000, "code"),
        (UPLOAD, 40001, "code"),
        (UPLOAD, 0, None),
        (CREATE, 0, None),
        (UPDATE, None, "http"),
    ]
    slow = {"rate_limit_qps": 1, "rate_limit_path": "*"}
    async with http.post(sandbox.base_url + "/_sandbox/faults", json=slow) as r:
        assert r.status == 200
    codes = [(await post_upload(http, sandbox, data))["code"] for _ in range(2)]
    assert codes == [0, 40100]
