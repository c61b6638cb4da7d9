"""Typed calls of TikTok's customer-file API over `TikTokClient` (docs/tiktok-api.md §3, §3.6, §8.3).

Upload a file (multipart, MD5 signature) → its `file_path`; create a customer-file audience from file paths; update
one with APPEND / REMOVE / REPLACE; read audiences back with their type, `calculate_type` and size. Every call
returns parsed data or raises `TikTokApiError`, whose `answer` carries the verdict of `service/core/answers.py`:
the caller decides retry, dead letter or pause exactly as for `segment/mapping`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Final

import aiohttp

from service.core.answers import Answer, Verdict
from service.core.customer_files import FILE_CONTRACTS, FileAction, FileContract, IdentifierFile
from service.tiktok.audiences_api import AUDIENCE_GET, GET_MAX_IDS, AudiencesApi, TikTokApiError, chunks
from service.tiktok.client import TikTokClient

FILE_UPLOAD: Final = "/dmp/custom_audience/file/upload/"
FILE_AUDIENCE_CREATE: Final = "/dmp/custom_audience/create/"
FILE_AUDIENCE_UPDATE: Final = "/dmp/custom_audience/update/"

NAME_MAX: Final = 128  # custom_audience_name of create/update (spec: maxLength 128)
FILE_PATHS_MAX: Final = 500  # file_paths per create (spec: maxItems 500); TikTok recommends fewer than 50
RETENTION_DAYS: Final = (1, 365)
CUSTOMER_FILE_TYPE: Final = "Customer File Audience"  # `audience_type` of a customer-file audience
UPLOAD_TIMEOUT_S: Final = 300.0  # a 50 MB file on a slow link takes far longer than a JSON call
FILE_GONE: Final = frozenset({40905, 40910})  # FILE_NOT_EXIST, FILE_EXPIRED: upload the files again


@dataclass(frozen=True, slots=True)
class UploadedFile:
    """A file TikTok accepted: `file_path` names it in create/update, for the uploading advertiser only."""

    file_path: str
    contract: FileContract
    name: str
    md5: str
    rows: int


@dataclass(frozen=True, slots=True)
class FileAudience:
    """`dmp/custom_audience/get` details of an audience: type, contract and size (`cover_num`)."""

    audience_id: str
    name: str
    audience_type: str
    calculate_type: str
    cover_num: int
    is_valid: bool
    history: tuple[tuple[str, str], ...]  # (opt_time, action), as TikTok lists them

    @property
    def is_customer_file(self) -> bool:
        return self.audience_type == CUSTOMER_FILE_TYPE

    @classmethod
    def from_json(cls, details: dict[str, Any], history: object = None) -> FileAudience:
        cover = details.get("cover_num")
        events = history if isinstance(history, list) else []
        return cls(
            audience_id=str(details.get("audience_id", "")),
            name=str(details.get("name") or ""),
            audience_type=str(details.get("type") or details.get("audience_type") or ""),
            calculate_type=str(details.get("calculate_type") or ""),
            cover_num=cover if isinstance(cover, int) and not isinstance(cover, bool) else 0,
            is_valid=details.get("is_valid") is True,
            history=tuple(
                (str(e.get("opt_time") or ""), str(e.get("action") or "")) for e in events if isinstance(e, dict)
            ),
        )


def _check_name(name: str) -> str:
    if not name.strip():
        raise ValueError("audience name must not be empty")
    if len(name) > NAME_MAX:
        raise ValueError(f"audience name has {len(name)} characters, TikTok takes at most {NAME_MAX}")
    return name


def _check_paths(file_paths: Sequence[str]) -> list[str]:
    paths = list(file_paths)
    if not paths:
        raise ValueError("file_paths must not be empty")
    if len(paths) > FILE_PATHS_MAX:
        raise ValueError(f"{len(paths)} file_paths, TikTok takes at most {FILE_PATHS_MAX} per request")
    return paths


def _odd(path: str, answer: Answer, what: str) -> TikTokApiError:
    return TikTokApiError(path, replace(answer, verdict=Verdict.REJECTED, message=f"success without {what}"))


class CustomerFilesApi:
    """One method per endpoint; raises `TikTokApiError` on anything but success."""

    def __init__(self, client: TikTokClient, *, upload_timeout_s: float = UPLOAD_TIMEOUT_S) -> None:
        self._client = client
        self._upload_timeout_s = upload_timeout_s

    async def _post(self, path: str, payload: dict[str, Any], *, paced: bool = True) -> tuple[Answer, dict[str, Any]]:
        answer, data = await self._client.post_json(path, payload, paced=paced)
        if answer.verdict is not Verdict.SUCCESS:
            raise TikTokApiError(path, answer)
        return answer, data

    async def control_turn(self) -> None:
        """Take a control-plane turn now, for a call then made with `paced=False` (see `TikTokClient`)."""
        await self._client.control_turn()

    async def upload(self, advertiser_id: str, file: IdentifierFile) -> UploadedFile:
        """`POST /dmp/custom_audience/file/upload/`: multipart advertiser_id, calculate_type, file, file_name and
        file_signature (the MD5 of the bytes sent); answers `data.file_path`."""
        form = aiohttp.FormData()
        form.add_field("advertiser_id", advertiser_id)
        form.add_field("calculate_type", file.contract)
        form.add_field("file_name", file.name)
        form.add_field("file_signature", file.md5)
        form.add_field("file", file.content, filename=file.name, content_type="text/csv")
        answer, data = await self._client.post_form(FILE_UPLOAD, form, timeout_s=self._upload_timeout_s)
        if answer.verdict is not Verdict.SUCCESS:
            raise TikTokApiError(FILE_UPLOAD, answer)
        file_path = data.get("file_path")
        if not isinstance(file_path, str) or not file_path:
            raise _odd(FILE_UPLOAD, answer, "data.file_path")
        return UploadedFile(file_path, file.contract, file.name, file.md5, file.rows)

    async def create(
        self,
        advertiser_id: str,
        name: str,
        contract: FileContract,
        file_paths: Sequence[str],
        *,
        retention_in_days: int | None = None,
        paced: bool = True,
    ) -> str:
        """`POST /dmp/custom_audience/create/` → the new audience id.

        The spec answers `data.custom_audience_id`; one public client reads `data.audience_id`: both are accepted.
        """
        if contract not in FILE_CONTRACTS:
            raise ValueError(f"calculate_type must be one of {', '.join(FILE_CONTRACTS)}")
        payload: dict[str, Any] = {
            "advertiser_id": advertiser_id,
            "custom_audience_name": _check_name(name),
            "calculate_type": contract,
            "file_paths": _check_paths(file_paths),
        }
        if retention_in_days is not None:
            lo, hi = RETENTION_DAYS
            if not lo <= retention_in_days <= hi:
                raise ValueError(f"retention_in_days must be between {lo} and {hi}")
            payload["retention_in_days"] = retention_in_days
        answer, data = await self._post(FILE_AUDIENCE_CREATE, payload, paced=paced)
        audience_id = data.get("custom_audience_id", data.get("audience_id"))
        if audience_id in (None, ""):
            raise _odd(FILE_AUDIENCE_CREATE, answer, "data.custom_audience_id")
        return str(audience_id)

    async def update(
        self,
        advertiser_id: str,
        audience_id: str,
        file_paths: Sequence[str],
        action: FileAction,
        *,
        paced: bool = True,
    ) -> None:
        """`POST /dmp/custom_audience/update/` with files; `action` is always sent (TikTok's default is REPLACE,
        which an omitted field would silently mean). TikTok refuses any action leaving fewer than 1,000 users.
        `paced=False`: the caller spent a data-plane token and needs the request to start at once."""
        payload = {
            "advertiser_id": advertiser_id,
            "custom_audience_id": audience_id,
            "file_paths": _check_paths(file_paths),
            "action": FileAction(action).value,
        }
        await self._post(FILE_AUDIENCE_UPDATE, payload, paced=paced)

    async def rename(self, advertiser_id: str, audience_id: str, name: str) -> None:
        """`POST /dmp/custom_audience/update/` with a new name only."""
        payload = {
            "advertiser_id": advertiser_id,
            "custom_audience_id": audience_id,
            "custom_audience_name": _check_name(name),
        }
        await self._post(FILE_AUDIENCE_UPDATE, payload)

    async def get(self, advertiser_id: str, audience_ids: Sequence[str]) -> list[FileAudience]:
        """`GET /dmp/custom_audience/get/`, 100 ids per request, duplicates removed, TikTok's order kept."""
        out: list[FileAudience] = []
        for chunk in chunks(list(dict.fromkeys(audience_ids)), GET_MAX_IDS):
            params = {"advertiser_id": advertiser_id, "custom_audience_ids": _json_ids(chunk)}
            answer, data = await self._client.get(AUDIENCE_GET, params)
            if answer.verdict is not Verdict.SUCCESS:
                raise TikTokApiError(AUDIENCE_GET, answer)
            entries = data.get("list")
            for entry in entries if isinstance(entries, list) else []:
                details = entry.get("audience_details") if isinstance(entry, dict) else None
                if isinstance(details, dict):
                    out.append(FileAudience.from_json(details, entry.get("audience_history")))
        return out


async def find_file_audience(
    files: CustomerFilesApi, audiences: AudiencesApi, advertiser_id: str, name: str, contract: FileContract
) -> str | None:
    """A customer-file audience of `contract` already named `name` (one created whose id was never recorded,
    after a crash), else None: reusing it beats creating a duplicate."""
    same = [a.audience_id for a in await audiences.list_audiences(advertiser_id) if a.name == name]
    if not same:
        return None
    usable = [
        a.audience_id
        for a in await files.get(advertiser_id, same)
        if a.is_customer_file and a.calculate_type == contract
    ]
    return usable[0] if usable else None


def _json_ids(ids: Sequence[str]) -> str:
    """TikTok wants id lists in GET queries as a JSON array string."""
    return json.dumps(list(ids), separators=(",", ":"))
