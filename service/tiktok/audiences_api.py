"""Typed wrappers over `TikTokClient` for the audience lifecycle reads and writes (docs/tiktok-api.md §1.1 to 1.3).

Operator tools (`audiences`, `doctor`) need parsed answers, not envelopes: each call returns dataclasses or
raises `TikTokApiError`, which carries TikTok's code, message and request_id so one line can name all three.
Paging and chunking live here so no caller can forget them.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any

import aiohttp

from service.core.answers import Answer, Verdict
from service.tiktok.client import ControlLimiter, TikTokClient

NAME_MAX = 70  # TikTok keeps at most 70 characters of an audience name (segment/audience doc)
GET_MAX_IDS = 100  # `custom_audience_ids` per dmp/custom_audience/get request
PAGE_SIZE_MAX = 100  # dmp/custom_audience/list page_size bound
MAX_PAGES = 10_000  # a server that never reaches total_page must not loop forever
TARGETING_MINIMUM = 1000  # TikTok's minimum audience size for ad targeting

USER_INFO = "/user/info/"
ADVERTISER_INFO = "/advertiser/info/"
AUDIENCE_GET = "/dmp/custom_audience/get/"
AUDIENCE_LIST = "/dmp/custom_audience/list/"
SEGMENT_AUDIENCE = "/segment/audience/"


def truncate_name(name: str) -> str:
    """TikTok stores a name over 70 characters as its first 67 plus "..."; applying the rule before sending
    means what we report is exactly what TikTok will show."""
    return name if len(name) <= NAME_MAX else name[: NAME_MAX - 3] + "..."


class TikTokApiError(Exception):
    """TikTok refused, or never answered: `answer` holds code, message and request_id for support."""

    def __init__(self, path: str, answer: Answer) -> None:
        self.path = path
        self.answer = answer
        super().__init__(self.one_line())

    @property
    def code(self) -> int | None:
        return self.answer.code

    @property
    def verdict(self) -> Verdict:
        return self.answer.verdict

    def one_line(self) -> str:
        a = self.answer
        rid = a.request_id or "-"
        if a.code is not None:
            return f"TikTok error {a.code} on {self.path}: {a.message or 'no message'} (request_id {rid})"
        if a.http_status is not None:
            return f"TikTok answered HTTP {a.http_status} on {self.path}: {a.message} (request_id {rid})"
        return f"TikTok unreachable on {self.path}: {a.message} (request_id -)"


@dataclass(frozen=True, slots=True)
class UserInfo:
    user_id: str
    display_name: str


@dataclass(frozen=True, slots=True)
class AdvertiserInfo:
    advertiser_id: str
    name: str
    status: str


@dataclass(frozen=True, slots=True)
class AudienceInfo:
    """The fields of a list entry or of `audience_details` that operators and checks use."""

    audience_id: str
    name: str
    cover_num: int
    is_valid: bool
    audience_type: str
    create_time: str
    expired_time: str

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> AudienceInfo:
        cover = raw.get("cover_num")
        return cls(
            audience_id=str(raw.get("audience_id", "")),
            name=str(raw.get("name") or ""),
            cover_num=cover if isinstance(cover, int) and not isinstance(cover, bool) else 0,
            is_valid=raw.get("is_valid") is True,
            audience_type=str(raw.get("audience_type") or raw.get("type") or ""),
            create_time=str(raw.get("create_time") or ""),
            expired_time=str(raw.get("expired_time") or ""),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "audience_id": self.audience_id,
            "name": self.name,
            "cover_num": self.cover_num,
            "is_valid": self.is_valid,
            "type": self.audience_type,
            "create_time": self.create_time,
            "expired_time": self.expired_time,
        }


@dataclass(frozen=True, slots=True)
class CreatedAudience:
    audience_id: str
    advertiser_id: str
    name: str  # as stored by TikTok (truncated)
    requested_name: str

    @property
    def truncated(self) -> bool:
        return self.name != self.requested_name


def chunks(items: Sequence[str], size: int) -> Iterator[list[str]]:
    for i in range(0, len(items), size):
        yield list(items[i : i + size])


def _json_ids(ids: Sequence[str]) -> str:
    """TikTok wants id lists in GET queries as a JSON array string."""
    return json.dumps(list(ids), separators=(",", ":"))


def _dicts(value: object) -> list[dict[str, Any]]:
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


class AudiencesApi:
    """One method per endpoint; raises `TikTokApiError` on anything but success."""

    def __init__(self, client: TikTokClient) -> None:
        self._client = client

    async def _get(self, path: str, params: dict[str, str]) -> dict[str, Any]:
        answer, data = await self._client.get(path, params)
        if answer.verdict is not Verdict.SUCCESS:
            raise TikTokApiError(path, answer)
        return data

    async def user_info(self) -> UserInfo:
        """`GET /user/info/`: the cheapest call that proves the token is valid."""
        data = await self._get(USER_INFO, {})
        return UserInfo(str(data.get("id") or ""), str(data.get("display_name") or ""))

    async def advertiser_info(self, advertiser_ids: Sequence[str]) -> list[AdvertiserInfo]:
        data = await self._get(ADVERTISER_INFO, {"advertiser_ids": _json_ids(advertiser_ids)})
        return [
            AdvertiserInfo(str(a.get("advertiser_id", "")), str(a.get("name") or ""), str(a.get("status") or ""))
            for a in _dicts(data.get("list"))
        ]

    async def get_audiences(self, advertiser_id: str, audience_ids: Sequence[str]) -> list[AudienceInfo]:
        """`dmp/custom_audience/get`, chunked at 100 ids; answers in TikTok's order, duplicates removed."""
        unique = list(dict.fromkeys(audience_ids))
        out: list[AudienceInfo] = []
        for chunk in chunks(unique, GET_MAX_IDS):
            data = await self._get(
                AUDIENCE_GET, {"advertiser_id": advertiser_id, "custom_audience_ids": _json_ids(chunk)}
            )
            for entry in _dicts(data.get("list")):
                details = entry.get("audience_details")
                if isinstance(details, dict):
                    out.append(AudienceInfo.from_json(details))
        return out

    async def list_audiences(self, advertiser_id: str, page_size: int = PAGE_SIZE_MAX) -> list[AudienceInfo]:
        """Every audience of an advertiser: `dmp/custom_audience/list` paged until `page_info.total_page`."""
        if not 1 <= page_size <= PAGE_SIZE_MAX:
            raise ValueError(f"page_size must be between 1 and {PAGE_SIZE_MAX}")
        out: list[AudienceInfo] = []
        for page in range(1, MAX_PAGES + 1):
            data = await self._get(
                AUDIENCE_LIST, {"advertiser_id": advertiser_id, "page": str(page), "page_size": str(page_size)}
            )
            entries = _dicts(data.get("list"))
            out.extend(AudienceInfo.from_json(e) for e in entries)
            info = data.get("page_info")
            total = info.get("total_page") if isinstance(info, dict) else None
            if not isinstance(total, int) or page >= total or not entries:
                break
        return out

    async def create_audience(self, advertiser_id: str, name: str) -> CreatedAudience:
        """`POST /segment/audience/` action create; the name is truncated first (TikTok's own rule)."""
        if not name.strip():
            raise ValueError("audience name must not be empty")
        stored = truncate_name(name)
        payload = {"custom_audience_name": stored, "advertiser_id": advertiser_id, "action": "create"}
        answer, data = await self._client.post_json(SEGMENT_AUDIENCE, payload)
        if answer.verdict is not Verdict.SUCCESS:
            raise TikTokApiError(SEGMENT_AUDIENCE, answer)
        audience_id = data.get("audience_id")
        if audience_id in (None, ""):
            odd = replace(answer, verdict=Verdict.REJECTED, message="success without data.audience_id")
            raise TikTokApiError(SEGMENT_AUDIENCE, odd)
        return CreatedAudience(str(audience_id), advertiser_id, stored, name)


@asynccontextmanager
async def open_api(
    base_url: str, token: Callable[[], str], *, timeout_s: float = 10.0, control_qps: float | None = None
) -> AsyncIterator[AudiencesApi]:
    """A short-lived session for a command-line run (the service keeps its own long-lived one); `control_qps`
    paces its calls, since a command run next to the service spends the same per-app budget."""
    control = ControlLimiter(control_qps) if control_qps is not None else None
    async with aiohttp.ClientSession() as session:
        yield AudiencesApi(TikTokClient(session, base_url, token, timeout_s=timeout_s, control=control))
