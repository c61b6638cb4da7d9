"""The customer-file API client against the real sandbox over 127.0.0.1: files written by the pure core, uploaded
with their MD5, turned into an audience and updated with APPEND / REMOVE / REPLACE; refusals and faults classified
like every other TikTok answer."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from service.core.answers import Verdict
from service.core.customer_files import (
    LINE_BYTES,
    MIN_AUDIENCE_SIZE,
    FileAction,
    IdentifierFile,
    NetChanges,
    files_from_hashes,
    plan_refresh,
    write_files,
)
from service.core.model import Action
from service.devtools.sandbox import SandboxServer
from service.tiktok.audiences_api import TikTokApiError
from service.tiktok.client import TikTokClient
from service.tiktok.customer_files_api import (
    CUSTOMER_FILE_TYPE,
    FILE_AUDIENCE_CREATE,
    FILE_AUDIENCE_UPDATE,
    FILE_UPLOAD,
    CustomerFilesApi,
)

ADV = "7654321098765432109"
TOKEN = "sandbox-token"


def emails(n: int, salt: str = "") -> list[str]:
    return [f"{salt}user{i}@example.com" for i in range(n)]


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@pytest.fixture
async def sandbox() -> AsyncIterator[SandboxServer]:
    async with SandboxServer(advertisers=[ADV], audiences=[(ADV, "555")], tokens=[TOKEN]) as server:
        yield server


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture
def client(sandbox: SandboxServer, session: aiohttp.ClientSession) -> TikTokClient:
    return TikTokClient(session, sandbox.url, lambda: TOKEN, timeout_s=5)


@pytest.fixture
def api(client: TikTokClient) -> CustomerFilesApi:
    return CustomerFilesApi(client, upload_timeout_s=5)


def members(sandbox: SandboxServer, audience_id: str) -> set[str]:
    return set(sandbox.state.members(audience_id).get("EMAIL_SHA256", []))


async def upload_all(api: CustomerFilesApi, files: tuple[IdentifierFile, ...]) -> list[str]:
    return [(await api.upload(ADV, f)).file_path for f in files]


async def test_upload_create_append_remove_replace(sandbox: SandboxServer, api: CustomerFilesApi) -> None:
    # Create from a raw email export, chunked into several files to exercise multi-file create.
    start = write_files(emails(1100), "EMAIL_SHA256", stem="vip", max_bytes=400 * LINE_BYTES)
    assert len(start.files) == 3
    uploaded = [await api.upload(ADV, f) for f in start.files]
    received = sandbox.state.customer_files()["files"]
    assert isinstance(received, list)
    assert [(r["name"], r["md5"], r["calculate_type"], r["rows"]) for r in received] == [
        (f.name, f.md5, "EMAIL_SHA256", f.rows) for f in start.files
    ]
    assert [u.file_path for u in uploaded] == [r["file_path"] for r in received]
    aid = await api.create(ADV, "VIP customers", "EMAIL_SHA256", [u.file_path for u in uploaded])
    expected = {sha(e) for e in emails(1100)}
    assert members(sandbox, aid) == expected

    # Membership events netted, then sent as APPEND and REMOVE files.
    net: NetChanges[int] = NetChanges(["EMAIL_SHA256"])
    for i, e in enumerate(emails(30, "new")):
        net.record(Action.ADD, [("EMAIL_SHA256", sha(e))], i)
    for i, e in enumerate(emails(20)):  # existing members leave
        net.record(Action.DELETE, [("EMAIL_SHA256", sha(e))], 100 + i)
    net.record(Action.ADD, [("EMAIL_SHA256", sha("user0@example.com"))], 200)  # ...and one comes back
    batch = net.drain()
    accepted = []
    for contract, action, ids in batch.updates():
        paths = await upload_all(api, files_from_hashes(ids, contract, stem=f"vip-{action.lower()}"))
        await api.update(ADV, aid, paths, action)
        accepted.append((contract, action))
    assert batch.settled(accepted) == batch.handles
    expected = (expected | {sha(e) for e in emails(30, "new")}) - {sha(e) for e in emails(20)[1:]}
    assert members(sandbox, aid) == expected and len(expected) == 1111

    # A full refresh from a snapshot replaces everything.
    plan = plan_refresh({"email": e} for e in emails(1005, "snap"))
    files = files_from_hashes(plan.require_minimum("EMAIL_SHA256"), "EMAIL_SHA256", stem="vip-refresh")
    await api.update(ADV, aid, await upload_all(api, files), FileAction.REPLACE)
    assert members(sandbox, aid) == {sha(e) for e in emails(1005, "snap")}

    updates = sandbox.state.customer_files()["updates"]
    assert isinstance(updates, list)
    assert [(u["action"], u["size_after"]) for u in updates] == [
        ("CREATE", 1100),
        ("APPEND", 1130),
        ("REMOVE", 1111),
        ("REPLACE", 1005),
    ]
    [info] = await api.get(ADV, [aid, aid])
    assert (info.audience_id, info.name, info.calculate_type, info.cover_num) == (
        aid,
        "VIP customers",
        "EMAIL_SHA256",
        1005,
    )
    assert info.audience_type == CUSTOMER_FILE_TYPE and info.is_customer_file and info.is_valid
    assert [a for _, a in info.history] == ["create", "append", "remove", "replace"]
    [partner] = await api.get(ADV, ["555"])
    assert partner.audience_type == "Partner" and not partner.is_customer_file
    await api.rename(ADV, aid, "VIP (refreshed)")
    assert sandbox.state.audiences[aid].name == "VIP (refreshed)"


async def test_same_file_uploads_twice(sandbox: SandboxServer, api: CustomerFilesApi) -> None:
    [f] = files_from_hashes([sha("a")], "GAID_SHA256")
    first, second = await api.upload(ADV, f), await api.upload(ADV, f)  # a fresh multipart body per call
    assert first.file_path != second.file_path and first.md5 == second.md5 == f.md5
    assert sandbox.state.file_identifiers(first.file_path) == [sha("a")]
    assert sandbox.state.files[first.file_path].calculate_type == "GAID_SHA256"


async def test_md5_mismatch_refused(sandbox: SandboxServer, api: CustomerFilesApi) -> None:
    [f] = files_from_hashes([sha("a"), sha("b")], "EMAIL_SHA256")
    tampered = dataclasses.replace(f, content=f.content[:-LINE_BYTES])  # cut in transit: signature of the whole
    with pytest.raises(TikTokApiError) as err:
        await api.upload(ADV, tampered)
    assert err.value.code == 40002 and err.value.verdict is Verdict.REJECTED
    assert "file_signature" in err.value.answer.message and err.value.answer.request_id
    assert err.value.path == FILE_UPLOAD and sandbox.state.files == {}


async def test_raw_identifiers_refused_as_pii(sandbox: SandboxServer, api: CustomerFilesApi) -> None:
    raw = b"someone@example.com\n"
    bad = IdentifierFile("EMAIL_SHA256", "raw.csv", raw, hashlib.md5(raw).hexdigest(), 1)
    with pytest.raises(TikTokApiError) as err:
        await api.upload(ADV, bad)
    assert err.value.code == 40062 and err.value.verdict is Verdict.REJECTED
    assert "someone" not in str(err.value)


async def test_thousand_user_rule(sandbox: SandboxServer, api: CustomerFilesApi) -> None:
    # Refused by the plan before any call...
    short = plan_refresh({"email": e} for e in emails(MIN_AUDIENCE_SIZE - 1))
    refusal = short.check_minimum("EMAIL_SHA256")
    assert refusal is not None and refusal.count == 999
    # ...and by TikTok (the sandbox) when a caller skips the check.
    paths = await upload_all(api, files_from_hashes(short.hashed["EMAIL_SHA256"], "EMAIL_SHA256"))
    with pytest.raises(TikTokApiError) as err:
        await api.create(ADV, "too small", "EMAIL_SHA256", paths)
    assert err.value.code == 40002 and err.value.verdict is Verdict.REJECTED
    assert "999 users" in err.value.answer.message
    full = await upload_all(api, files_from_hashes([sha(e) for e in emails(1000)], "EMAIL_SHA256"))
    aid = await api.create(ADV, "exactly 1000", "EMAIL_SHA256", full)
    leaving = await upload_all(api, files_from_hashes([sha("user7@example.com")], "EMAIL_SHA256"))
    with pytest.raises(TikTokApiError) as removed:
        await api.update(ADV, aid, leaving, FileAction.REMOVE)
    assert removed.value.code == 40002 and "999 users after REMOVE" in removed.value.answer.message
    assert len(members(sandbox, aid)) == 1000
    with pytest.raises(TikTokApiError) as replaced:
        await api.update(ADV, aid, paths, FileAction.REPLACE)
    assert "999 users after REPLACE" in replaced.value.answer.message


async def test_contract_mismatch_and_unknown_file(sandbox: SandboxServer, api: CustomerFilesApi) -> None:
    email_paths = await upload_all(api, files_from_hashes([sha(e) for e in emails(1000)], "EMAIL_SHA256"))
    phone_paths = await upload_all(api, files_from_hashes([sha(e) for e in emails(1000)], "PHONE_SHA256"))
    aid = await api.create(ADV, "emails", "EMAIL_SHA256", email_paths)
    with pytest.raises(TikTokApiError) as mismatch:
        await api.update(ADV, aid, phone_paths, FileAction.APPEND)
    assert mismatch.value.code == 40909 and mismatch.value.verdict is Verdict.REJECTED
    with pytest.raises(TikTokApiError) as gone:
        await api.update(ADV, aid, ["0123456789abcdef"], FileAction.APPEND)
    assert gone.value.code == 40905 and gone.value.verdict is Verdict.RETRY  # upload again, then resend
    with pytest.raises(TikTokApiError) as partner:
        await api.update(ADV, "555", email_paths, FileAction.APPEND)
    assert partner.value.code == 40002 and "not a customer file audience" in partner.value.answer.message


async def test_local_checks_before_any_call(sandbox: SandboxServer, api: CustomerFilesApi) -> None:
    with pytest.raises(ValueError, match="at most 128"):
        await api.create(ADV, "n" * 129, "EMAIL_SHA256", ["0123456789abcdef"])
    with pytest.raises(ValueError, match="must not be empty"):
        await api.create(ADV, " ", "EMAIL_SHA256", ["0123456789abcdef"])
    with pytest.raises(ValueError, match="file_paths"):
        await api.update(ADV, "1", [], FileAction.APPEND)
    with pytest.raises(ValueError, match="at most 500"):
        await api.update(ADV, "1", ["0123456789abcdef"] * 501, FileAction.APPEND)
    with pytest.raises(ValueError, match="retention_in_days"):
        await api.create(ADV, "n", "EMAIL_SHA256", ["0123456789abcdef"], retention_in_days=366)
    with pytest.raises(ValueError, match="calculate_type"):
        await api.create(ADV, "n", "MULTIPLE_TYPES", ["0123456789abcdef"])  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        await api.update(ADV, "1", ["0123456789abcdef"], "DELETE")  # type: ignore[arg-type]
    assert sandbox.state.requests("*") == [] and sandbox.state.request_counts == {}


FAULTS: list[tuple[dict[str, Any], Verdict]] = [
    ({"kind": "code", "code": 40100}, Verdict.RETRY),
    ({"kind": "code", "code": 51003}, Verdict.RETRY),
    ({"kind": "code", "code": 40105}, Verdict.AUTH),
    ({"kind": "code", "code": 40001}, Verdict.PERMISSION),
    ({"kind": "code", "code": 40907}, Verdict.SPLIT),
    ({"kind": "http", "status": 503}, Verdict.RETRY),
    ({"kind": "http", "status": 429, "retry_after_s": 2}, Verdict.RETRY),
    ({"kind": "http", "html": True}, Verdict.RETRY),
    ({"kind": "http", "status": 404, "html": True}, Verdict.ENDPOINT),
    ({"kind": "reset"}, Verdict.RETRY),
]


@pytest.mark.parametrize(("rule", "verdict"), FAULTS, ids=lambda v: str(v))
async def test_faults_on_file_paths_classified_like_mapping(
    sandbox: SandboxServer, client: TikTokClient, api: CustomerFilesApi, rule: dict[str, Any], verdict: Verdict
) -> None:
    [f] = files_from_hashes([sha(e) for e in emails(1000)], "EMAIL_SHA256")
    path = (await api.upload(ADV, f)).file_path
    aid = await api.create(ADV, "faulty", "EMAIL_SHA256", [path])
    sandbox.set_faults({"rules": [{**rule, "path": "*"}]})

    mapping = await client.post_mapping(b"{}")  # the streaming path's answer to the same fault
    assert mapping.verdict is verdict
    calls = [
        (FILE_UPLOAD, api.upload(ADV, f)),
        (FILE_AUDIENCE_CREATE, api.create(ADV, "again", "EMAIL_SHA256", [path])),
        (FILE_AUDIENCE_UPDATE, api.update(ADV, aid, [path], FileAction.APPEND)),
    ]
    for where, call in calls:
        with pytest.raises(TikTokApiError) as err:
            await call
        answer = err.value.answer
        assert err.value.path == where and answer.verdict is verdict
        assert (answer.code, answer.http_status, answer.retry_after_s) == (
            mapping.code,
            mapping.http_status,
            mapping.retry_after_s,
        )
    assert len(sandbox.state.files) == 1 and len(sandbox.state.audiences) == 2  # nothing applied under a fault


async def test_slow_upload_times_out_as_retry(sandbox: SandboxServer, client: TikTokClient) -> None:
    [f] = files_from_hashes([sha("a")], "EMAIL_SHA256")
    sandbox.set_faults([{"kind": "slow", "delay_s": 0.5, "path": FILE_UPLOAD}])
    with pytest.raises(TikTokApiError) as err:
        await CustomerFilesApi(client, upload_timeout_s=0.1).upload(ADV, f)
    assert err.value.verdict is Verdict.RETRY and err.value.answer.message.startswith("timeout")
    slow_but_patient = await CustomerFilesApi(client, upload_timeout_s=5).upload(ADV, f)
    assert slow_but_patient.file_path in sandbox.state.files


async def test_success_without_the_expected_data(sandbox: SandboxServer, api: CustomerFilesApi) -> None:
    [f] = files_from_hashes([sha("a")], "EMAIL_SHA256")
    sandbox.set_faults([{"kind": "code", "code": 0, "path": "*"}])  # code 0, data {}
    with pytest.raises(TikTokApiError) as upload:
        await api.upload(ADV, f)
    assert upload.value.verdict is Verdict.REJECTED and "data.file_path" in str(upload.value)
    with pytest.raises(TikTokApiError) as create:
        await api.create(ADV, "n", "EMAIL_SHA256", ["0123456789abcdef"])
    assert "data.custom_audience_id" in str(create.value)


async def test_create_reads_audience_id_when_custom_audience_id_is_absent(session: aiohttp.ClientSession) -> None:
    """One public client reads `data.audience_id`; the spec says `custom_audience_id` (docs/tiktok-api.md §3.6)."""
    seen: list[dict[str, Any]] = []

    async def create(request: web.Request) -> web.Response:
        seen.append(await request.json())
        return web.json_response({"code": 0, "message": "OK", "request_id": "r", "data": {"audience_id": 77}})

    app = web.Application()
    app.router.add_post("/open_api/v1.3" + FILE_AUDIENCE_CREATE, create)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        api = CustomerFilesApi(TikTokClient(session, f"http://127.0.0.1:{port}/open_api/v1.3", lambda: TOKEN))
        assert await api.create(ADV, "n", "IDFA_SHA256", ["0123456789abcdef"], retention_in_days=30) == "77"
    finally:
        await runner.cleanup()
    assert seen == [
        {
            "advertiser_id": ADV,
            "custom_audience_name": "n",
            "calculate_type": "IDFA_SHA256",
            "file_paths": ["0123456789abcdef"],
            "retention_in_days": 30,
        }
    ]
