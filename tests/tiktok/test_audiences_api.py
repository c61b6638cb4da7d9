"""The typed audience wrappers: the name rule, paging, chunking and error reporting, against the real sandbox."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from service.core.answers import Answer, Verdict
from service.devtools.broker import free_port
from service.devtools.sandbox import SandboxServer
from service.tiktok.audiences_api import (
    AUDIENCE_GET,
    AUDIENCE_LIST,
    AudienceInfo,
    AudiencesApi,
    TikTokApiError,
    chunks,
    open_api,
    truncate_name,
)

ADV = "7654321098765432109"


def test_truncate_name_rule() -> None:
    assert truncate_name("short") == "short"
    assert truncate_name("x" * 70) == "x" * 70  # exactly 70 is kept
    assert truncate_name("x" * 71) == "x" * 67 + "..."
    long = "".join(chr(ord("a") + i % 26) for i in range(80))
    assert truncate_name(long) == long[:67] + "..." and len(truncate_name(long)) == 70


def test_chunks() -> None:
    assert [len(c) for c in chunks([str(i) for i in range(250)], 100)] == [100, 100, 50]
    assert list(chunks([], 100)) == []


def test_audience_info_from_reference_fixture() -> None:
    details = {
        "audience_id": "888888888",
        "name": "...",
        "type": "Partner",
        "audience_sub_type": "NORMAL",
        "cover_num": 0,
        "is_valid": False,
        "create_time": "2023-08-03 16:27:49",
        "expired_time": "2024-08-02 16:27:49",
    }
    info = AudienceInfo.from_json(details)
    assert (info.audience_id, info.audience_type, info.cover_num, info.is_valid) == ("888888888", "Partner", 0, False)
    assert AudienceInfo.from_json({"audience_id": 5, "cover_num": True}).cover_num == 0  # a bool is not a count


def test_error_one_line_names_code_message_and_request_id() -> None:
    err = TikTokApiError(AUDIENCE_GET, Answer(Verdict.AUTH, 200, 40105, "Access token is incorrect.", "RID1"))
    assert str(err) == f"TikTok error 40105 on {AUDIENCE_GET}: Access token is incorrect. (request_id RID1)"
    down = TikTokApiError(AUDIENCE_GET, Answer(Verdict.RETRY, None, None, "connection: ClientConnectorError"))
    assert "unreachable" in str(down) and down.code is None


@pytest.fixture
async def sandbox() -> AsyncIterator[SandboxServer]:
    async with SandboxServer(advertisers=[ADV], audiences=[(ADV, "555"), ("999", "777")]) as server:
        yield server


@pytest.fixture
async def api(sandbox: SandboxServer) -> AsyncIterator[AudiencesApi]:
    async with open_api(sandbox.url, lambda: "sandbox-token", timeout_s=5) as a:
        yield a


async def test_user_and_advertiser_info(api: AudiencesApi) -> None:
    assert (await api.user_info()).display_name == "Sandbox User"
    [adv] = await api.advertiser_info([ADV])
    assert adv.advertiser_id == ADV and adv.name
    with pytest.raises(TikTokApiError) as exc:
        await api.advertiser_info(["404"])
    assert exc.value.code == 40300 and exc.value.answer.request_id


async def test_list_pages_until_total_page(sandbox: SandboxServer, api: AudiencesApi) -> None:
    for i in range(4):
        sandbox.state.add_audience(ADV, None, f"audience {i}")
    found = await api.list_audiences(ADV, page_size=2)
    assert [a.name for a in found] == ["Sandbox audience 555"] + [f"audience {i}" for i in range(4)]
    pages = [r for r in sandbox.state.requests(AUDIENCE_LIST) if r["code"] == 0]
    assert len(pages) == 3  # 5 audiences, 2 per page
    assert [a.audience_id for a in await api.list_audiences("999")] == ["777"]
    with pytest.raises(ValueError):
        await api.list_audiences(ADV, page_size=101)


async def test_get_chunks_at_100_and_dedupes(sandbox: SandboxServer, api: AudiencesApi) -> None:
    ids = [sandbox.state.add_audience(ADV) for _ in range(130)]
    found = await api.get_audiences(ADV, ids + ids[:5])
    assert [a.audience_id for a in found] == ids
    assert len(sandbox.state.requests(AUDIENCE_GET)) == 2


async def test_get_foreign_and_missing_audience_codes(api: AudiencesApi) -> None:
    with pytest.raises(TikTokApiError) as foreign:
        await api.get_audiences(ADV, ["777"])
    assert foreign.value.code == 40002
    with pytest.raises(TikTokApiError) as missing:
        await api.get_audiences(ADV, ["123456"])
    assert missing.value.code == 40007


async def test_create_truncates_80_char_name(sandbox: SandboxServer, api: AudiencesApi) -> None:
    name = "Lookalike seed - " + "q" * 63
    assert len(name) == 80
    created = await api.create_audience(ADV, name)
    assert created.truncated and created.name == name[:67] + "..." and created.requested_name == name
    assert sandbox.state.audiences[created.audience_id].name == created.name
    with pytest.raises(ValueError):
        await api.create_audience(ADV, "  ")


async def test_bad_token_and_unreachable(sandbox: SandboxServer) -> None:
    async with open_api(sandbox.url, lambda: "wrong", timeout_s=5) as api:
        with pytest.raises(TikTokApiError) as bad:
            await api.user_info()
    assert bad.value.code == 40105 and bad.value.verdict is Verdict.AUTH
    assert "wrong" not in str(bad.value)
    async with open_api(f"http://127.0.0.1:{free_port()}/open_api/v1.3", lambda: "t", timeout_s=2) as api:
        with pytest.raises(TikTokApiError) as down:
            await api.create_audience(ADV, "x")
    assert down.value.code is None and "unreachable" in str(down.value)
