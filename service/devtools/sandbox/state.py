"""In-memory advertisers, audiences, membership and received offline events of the TikTok sandbox, and its strict
request validation (`event/track/` bodies are validated in `event_track.py`).

Pure: no I/O, and wall-clock time comes from an injected clock, so every strictness rule is unit-testable with
literals. Validation is separated from application so a request is applied all-or-nothing. A lock guards the
state because `SandboxThread` lets tests read it from another thread while the server's loop mutates it.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import secrets
import threading
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Final, Literal

# TikTok return codes the sandbox answers (docs/tiktok-api.md §4.2, official SDK table).
OK: Final = 0
PERMISSION_ERROR: Final = 40001
PARAM_ERROR: Final = 40002
NOT_EXIST: Final = 40007
INVALID_BATCH_SIZE: Final = 40061
PII_NOT_HASHED: Final = 40062
REQUEST_TOO_FREQUENT: Final = 40100
EMPTY_ACCESS_TOKEN: Final = 40104
INVALID_ACCESS_TOKEN: Final = 40105
ADVERTISER_NOT_EXIST: Final = 40300
FILE_NOT_EXIST: Final = 40905
FILE_EMPTY: Final = 40906
FILE_TOO_LARGE: Final = 40907
FILE_TYPE_ERROR: Final = 40908
FILE_CALCULATE_TYPE_ERROR: Final = 40909

# Default messages, also used by injected `code` faults that do not bring their own.
CODE_MESSAGES: Final[Mapping[int, str]] = {
    OK: "OK",
    PERMISSION_ERROR: "No permission to operate the advertiser.",
    PARAM_ERROR: "Parameter error.",
    NOT_EXIST: "The object does not exist.",
    INVALID_BATCH_SIZE: "INVALID_BATCH_SIZE: too many rows in batch_data.",
    PII_NOT_HASHED: "PII_NOT_HASHED: identifiers must be hashed.",
    REQUEST_TOO_FREQUENT: "Too many requests. Please retry in some time.",
    40102: "Access token has expired.",
    EMPTY_ACCESS_TOKEN: "Access token is null, please check the access token.",
    INVALID_ACCESS_TOKEN: "Access token is incorrect or has been revoked.",
    40132: "Request frequency limited.",
    ADVERTISER_NOT_EXIST: "Advertiser does not exist.",
    FILE_NOT_EXIST: "File does not exist.",
    FILE_EMPTY: "File is empty.",
    FILE_TOO_LARGE: "File is too large.",
    FILE_TYPE_ERROR: "File type error.",
    FILE_CALCULATE_TYPE_ERROR: "File calculate type error.",
    50000: "System error.",
    50002: "System timeout.",
    51003: "DMP service error.",
    51010: "Internal timeout.",
    51063: "Segment gateway service error.",
    60001: "System maintenance.",
}

SHA256_TYPES: Final = frozenset({"EMAIL_SHA256", "PHONE_SHA256", "IDFA_SHA256", "AAID_SHA256"})
MD5_TYPES: Final = frozenset({"IDFA_MD5", "AAID_MD5"})
ID_SCHEMA_TYPES: Final = SHA256_TYPES | MD5_TYPES
_SHA256_RE: Final = re.compile(r"[0-9a-f]{64}")
_MD5_RE: Final = re.compile(r"[0-9a-f]{32}")
_TIME_FMT: Final = "%Y-%m-%d %H:%M:%S"
_NAME_MAX: Final = 70
_RETENTION: Final = timedelta(days=365)
_EXPIRING: Final = timedelta(days=7)  # when `is_expiring` turns true (TikTok does not document its threshold)
# TikTok counts the same event + event_id once within 48 hours (docs/tiktok-api.md §8.2).
EVENT_DEDUP_WINDOW: Final = timedelta(hours=48)
MAX_PAGE_SIZE: Final = 100

# Customer-file API (docs/tiktok-api.md §3, §3.6). `DmpCalculateType` of the upload spec; create accepts the same
# values but the MAID aliases. MULTIPLE_TYPES files have a multi-column layout the sandbox does not model.
UPLOAD_CALCULATE_TYPES: Final = frozenset(
    {"EMAIL_SHA256", "PHONE_SHA256", "IDFA_SHA256", "IDFA_MD5", "GAID_SHA256", "GAID_MD5"}
    | {"FIRST_SHA256", "FIRST_MD5", "MAID_SHA256", "MAID_MD5", "MULTIPLE_TYPES"}
)
AUDIENCE_CALCULATE_TYPES: Final = UPLOAD_CALCULATE_TYPES - {"MAID_SHA256", "MAID_MD5"}
_CALCULATE_ALIASES: Final = {"MAID_SHA256": "FIRST_SHA256", "MAID_MD5": "FIRST_MD5"}
_NOT_MODELLED: Final = "MULTIPLE_TYPES"
FILE_ACTIONS: Final = ("APPEND", "REMOVE", "REPLACE")
# Header names of TikTok's customer-file help page; a file may start with one (compared case-insensitively).
FILE_HEADER_NAMES: Final = frozenset(
    {"email", "email_sha256", "phone", "phone_sha256", "maid", "maid_md5", "maid_sha256"}
)
FILE_SUFFIXES: Final = (".csv", ".txt")
MAX_FILE_BYTES: Final = 50_000_000  # 50 MB per file through the API [3p], read as the stricter 10^6 bytes
MIN_AUDIENCE_SIZE: Final = 1000  # an update leaving fewer users fails (official SDK spec of the update endpoint)
FILE_PATH_CHARS: Final = 16  # `file_paths` items are 16 characters (create spec: minLength = maxLength = 16)
FILE_PATHS_MAX: Final = 500  # create spec: `file_paths` maxItems
CUSTOM_AUDIENCE_NAME_MAX: Final = 128
PARTNER: Final = "Partner"
CUSTOMER_FILE: Final = "Customer File Audience"  # `audience_type` as the Go SDK transcribes TikTok's list doc

Action = Literal["add", "delete"]


class ApiError(Exception):
    """A TikTok-style refusal: answered as HTTP 200 with a non-zero `code`, never applied."""

    def __init__(self, code: int, message: str | None = None) -> None:
        self.code = code
        self.message = message if message is not None else CODE_MESSAGES.get(code, "Error.")
        super().__init__(f"{self.code}: {self.message}")


def param_error(detail: str) -> ApiError:
    return ApiError(PARAM_ERROR, f"Parameter error: {detail}")


@dataclass(slots=True)
class Advertiser:
    advertiser_id: str
    name: str
    permission_denied: bool = False


@dataclass(slots=True)
class Audience:
    audience_id: str
    advertiser_id: str
    name: str
    create_time: datetime
    members: dict[str, set[str]] = field(default_factory=dict)
    # A fixed `cover_num` for tests and demos (e.g. a large audience without uploading 1,000 users).
    cover_override: int | None = None
    # Audiences created through segment/audience refuse mappings until then (TikTok's 1-2 minute warm-up).
    ready_at: datetime | None = None
    # A fixed `is_valid` / `expired_time` for tests and demos (None: valid while it has members; expires 365 days
    # after creation).
    valid_override: bool | None = None
    expire_override: datetime | None = None
    # `PARTNER` (segment/audience, fed by segment/mapping) or `CUSTOMER_FILE` (dmp/custom_audience/create, fed by
    # files); a customer-file audience holds one `calculate_type` and its members under that key.
    audience_type: str = PARTNER
    calculate_type: str | None = None
    history: list[tuple[datetime, str]] = field(default_factory=list)

    @property
    def is_valid(self) -> bool:
        return self.valid_override if self.valid_override is not None else self.cover_num > 0

    @property
    def expired_time(self) -> datetime:
        return self.expire_override if self.expire_override is not None else self.create_time + _RETENTION

    @property
    def cover_num(self) -> int:
        """Sum over id types: TikTok's real figure is a matched-user estimate, unknowable offline."""
        if self.cover_override is not None:
            return self.cover_override
        return sum(len(ids) for ids in self.members.values())


@dataclass(frozen=True, slots=True)
class MappingCell:
    id_type: str
    id: str
    audience_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class MappingRequest:
    """A `segment/mapping` body that passed every check; applying it cannot fail."""

    advertiser_ids: tuple[str, ...]
    action: Action
    id_schema: tuple[str, ...]
    rows: int
    cells: tuple[MappingCell, ...]
    # (audience_id, advertiser_id) pairs to create first; only non-empty with auto_create.
    new_audiences: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class FilePart:
    """A file part of a multipart/form-data body, as the app hands it over."""

    filename: str
    content: bytes


@dataclass(frozen=True, slots=True)
class CustomerFile:
    """A file accepted by `dmp/custom_audience/file/upload/`: its identifiers, never echoed in answers."""

    file_path: str
    advertiser_id: str
    calculate_type: str
    name: str
    md5: str
    size: int
    header: str | None
    ids: frozenset[str]


@dataclass(frozen=True, slots=True)
class FileUpdate:
    """One applied `dmp/custom_audience/update/` (or the create that filled the audience first)."""

    audience_id: str
    action: str  # CREATE, APPEND, REMOVE, REPLACE or RENAME
    file_paths: tuple[str, ...]
    size_before: int
    size_after: int


@dataclass(frozen=True, slots=True)
class TrackRequest:
    """An `event/track/` body that passed every check (`event_track.validate_event_track`), and when it came."""

    event_source_id: str
    events: tuple[dict[str, object], ...]
    at: datetime


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """One TikTok request as tests see it: enough to assert rates, order and outcome, never identifiers."""

    t: float
    path: str
    action: str | None
    advertiser_ids: list[str] | None
    rows: int | None
    status: int
    code: int | None
    fault: str | None = None


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _fmt(t: datetime) -> str:
    return t.strftime(_TIME_FMT)


def truncate_name(name: str) -> str:
    """TikTok stores names over 70 characters as the first 67 plus "..." (segment/audience doc)."""
    return name if len(name) <= _NAME_MAX else name[: _NAME_MAX - 3] + "..."


def _require(body: Mapping[str, object], key: str) -> object:
    if key not in body or body[key] is None:
        raise param_error(f"{key}: required")
    return body[key]


def _str_list(value: object, name: str) -> list[str]:
    if not isinstance(value, list) or not value:
        raise param_error(f"{name}: must be a non-empty list")
    for i, item in enumerate(value):
        if not isinstance(item, str) or not item:
            raise param_error(f"{name}[{i}]: must be a non-empty string")
    return list(value)


def _non_empty_str(value: object, name: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise param_error(f"{name}: must be a non-empty string")
    return value


def parse_json_list_param(raw: str | None, name: str) -> list[str]:
    """TikTok passes id lists in GET queries as a JSON array string (`["1","2"]`)."""
    if raw is None or raw == "":
        raise param_error(f"{name}: required")
    try:
        value = json.loads(raw)
    except ValueError:
        raise param_error(f"{name}: must be a JSON array of strings") from None
    if isinstance(value, list):
        # Clients commonly send numeric ids unquoted in the query's JSON: accept ints, compare as strings.
        value = [str(v) if isinstance(v, int) and not isinstance(v, bool) else v for v in value]
    return _str_list(value, name)


def parse_int_param(raw: str | None, name: str, *, default: int, lo: int, hi: int | None = None) -> int:
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise param_error(f"{name}: must be an integer") from None
    if value < lo or (hi is not None and value > hi):
        bound = f"between {lo} and {hi}" if hi is not None else f">= {lo}"
        raise param_error(f"{name}: must be {bound}")
    return value


def _form_str(body: Mapping[str, object], key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value.strip():
        raise param_error(f"{key}: required")
    return value.strip()


def _audience_name(value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise param_error("custom_audience_name: must be a non-empty string")
    if len(value) > CUSTOM_AUDIENCE_NAME_MAX:
        raise param_error(f"custom_audience_name: at most {CUSTOM_AUDIENCE_NAME_MAX} characters")
    return value


def _file_paths(value: object) -> list[str]:
    paths = _str_list(value, "file_paths")
    if len(paths) > FILE_PATHS_MAX:
        raise param_error(f"file_paths: at most {FILE_PATHS_MAX} items")
    for i, p in enumerate(paths):
        if len(p) != FILE_PATH_CHARS:
            raise param_error(f"file_paths[{i}]: must be {FILE_PATH_CHARS} characters")
    return paths


def _parse_file(content: bytes, calculate_type: str) -> tuple[str | None, frozenset[str]]:
    """An optional header line, then one lowercase hex digest per line (blank lines skipped)."""
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(FILE_TYPE_ERROR, "File type error: the file is not UTF-8 text") from None
    sha = calculate_type.endswith("SHA256")
    pattern, other = (_SHA256_RE, _MD5_RE) if sha else (_MD5_RE, _SHA256_RE)
    header: str | None = None
    ids: set[str] = set()
    for number, raw in enumerate(text.split("\n"), start=1):
        line = raw.rstrip("\r").strip()
        if not line:
            continue
        if header is None and not ids and line.lower() in FILE_HEADER_NAMES:
            header = line
            continue
        if pattern.fullmatch(line):
            ids.add(line)
            continue
        if other.fullmatch(line):
            raise ApiError(
                FILE_CALCULATE_TYPE_ERROR,
                f"File calculate type error: line {number} is not a {'SHA-256' if sha else 'MD5'} digest "
                f"({calculate_type})",
            )
        kind = "SHA-256" if sha else "MD5"
        raise ApiError(
            PII_NOT_HASHED, f"PII_NOT_HASHED: line {number} of the file is not a lowercase hex {kind} digest"
        )
    if not ids:
        raise ApiError(FILE_EMPTY, "File is empty: no identifier line")
    return header, frozenset(ids)


class SandboxState:
    """Advertisers, audiences, membership and request bookkeeping of one sandbox."""

    def __init__(
        self,
        *,
        max_rows_per_request: int = 10_000,
        auto_create: bool = False,
        request_log_size: int = 10_000,
        audience_ready_delay_s: float = 0.0,
        max_file_bytes: int = MAX_FILE_BYTES,
        min_audience_size: int = MIN_AUDIENCE_SIZE,
        event_log_size: int = 100_000,
        clock: Callable[[], datetime] = _utc_now,
    ) -> None:
        self.max_rows_per_request = max_rows_per_request
        self.max_file_bytes = max_file_bytes
        self.min_audience_size = min_audience_size
        self.audience_ready_delay_s = audience_ready_delay_s
        self.auto_create = auto_create
        self._clock = clock
        self._lock = threading.RLock()
        self.advertisers: dict[str, Advertiser] = {}
        self.audiences: dict[str, Audience] = {}
        self.request_counts: Counter[str] = Counter()
        self.open_requests: Counter[str] = Counter()  # being served now, by path
        self.peak_open_requests: Counter[str] = Counter()  # most served at once: asserts MAX_INFLIGHT_REQUESTS
        self.rejected_counts: Counter[int] = Counter()
        self.fault_counts: Counter[str] = Counter()
        self.request_log: deque[RequestRecord] = deque(maxlen=request_log_size)
        self.files: dict[str, CustomerFile] = {}  # customer files received, by file_path
        self.file_updates: list[FileUpdate] = []  # creates and updates applied to customer-file audiences
        self._next_audience_id = 1_000_000_001
        # Offline events accepted by event/track/, each once; the newest `event_log_size` are kept.
        self.received_events: deque[dict[str, object]] = deque(maxlen=event_log_size)
        self.events_received = 0
        self.event_duplicates = 0
        self.events_by_name: Counter[str] = Counter()
        # (event_source_id, event, event_id) → when first accepted, oldest first, pruned after the 48 h window.
        self._event_seen: dict[tuple[str, str, str], datetime] = {}

    # -- registration ---------------------------------------------------------------------------------------

    def add_advertiser(self, advertiser_id: str, name: str | None = None, *, permission_denied: bool = False) -> str:
        if not advertiser_id:
            raise ValueError("advertiser_id must be non-empty")
        with self._lock:
            self.advertisers[advertiser_id] = Advertiser(
                advertiser_id, name or f"Sandbox advertiser {advertiser_id}", permission_denied
            )
        return advertiser_id

    def add_audience(self, advertiser_id: str, audience_id: str | None = None, name: str | None = None) -> str:
        """Register an audience as if created earlier in TikTok; raises KeyError for an unknown advertiser."""
        with self._lock:
            if advertiser_id not in self.advertisers:
                raise KeyError(f"unknown advertiser {advertiser_id}")
            aid = audience_id or self._new_audience_id()
            if aid in self.audiences and self.audiences[aid].advertiser_id != advertiser_id:
                raise ValueError(f"audience {aid} already belongs to another advertiser")
            if aid not in self.audiences:
                self.audiences[aid] = Audience(
                    aid, advertiser_id, truncate_name(name or f"Sandbox audience {aid}"), self._clock()
                )
            return aid

    def set_cover_num(self, audience_id: str, cover_num: int | None) -> None:
        """Pin the `cover_num` reads report (None: count members again); raises KeyError for an unknown id."""
        if cover_num is not None and cover_num < 0:
            raise ValueError("cover_num must be >= 0")
        with self._lock:
            self.audiences[audience_id].cover_override = cover_num

    def set_health(
        self, audience_id: str, *, is_valid: bool | None = None, expired_time: datetime | None = None
    ) -> None:
        """Pin what reads report as `is_valid` and `expired_time` (None: derived again); KeyError for an unknown id."""
        with self._lock:
            audience = self.audiences[audience_id]
            audience.valid_override = is_valid
            audience.expire_override = expired_time

    def _new_audience_id(self) -> str:
        while str(self._next_audience_id) in self.audiences:
            self._next_audience_id += 1
        aid = str(self._next_audience_id)
        self._next_audience_id += 1
        return aid

    def check_advertiser(self, advertiser_id: str) -> Advertiser:
        adv = self.advertisers.get(advertiser_id)
        if adv is None:
            raise ApiError(ADVERTISER_NOT_EXIST, f"Advertiser {advertiser_id} does not exist.")
        if adv.permission_denied:
            raise ApiError(PERMISSION_ERROR, f"No permission to operate advertiser {advertiser_id}.")
        return adv

    # -- segment/mapping ------------------------------------------------------------------------------------

    def validate_mapping(self, body: object) -> MappingRequest:
        """Every check of `segment/mapping`; raises ApiError on the first failure and changes nothing."""
        if not isinstance(body, dict):
            raise param_error("request body must be a JSON object")
        advertiser_ids = _str_list(_require(body, "advertiser_ids"), "advertiser_ids")
        action = body.get("action", "add")  # TikTok documents "add" as the default
        if action not in ("add", "delete"):
            raise param_error("action: must be one of add, delete")
        id_schema = self._validate_id_schema(_require(body, "id_schema"))
        batch_data = _require(body, "batch_data")
        if not isinstance(batch_data, list) or not batch_data:
            raise param_error("batch_data: must be a non-empty list")
        with self._lock:
            for adv in advertiser_ids:
                self.check_advertiser(adv)
            if len(batch_data) > self.max_rows_per_request:
                raise ApiError(
                    INVALID_BATCH_SIZE,
                    f"INVALID_BATCH_SIZE: batch_data has {len(batch_data)} rows, "
                    f"at most {self.max_rows_per_request} allowed",
                )
            cells: list[MappingCell] = []
            new_audiences: dict[str, str] = {}
            for i, row in enumerate(batch_data):
                cells.extend(self._validate_row(i, row, id_schema, advertiser_ids, new_audiences))
        return MappingRequest(
            advertiser_ids=tuple(advertiser_ids),
            action="add" if action == "add" else "delete",
            id_schema=id_schema,
            rows=len(batch_data),
            cells=tuple(cells),
            new_audiences=tuple(new_audiences.items()),
        )

    @staticmethod
    def _validate_id_schema(value: object) -> tuple[str, ...]:
        if not isinstance(value, list) or not value:
            raise param_error("id_schema: must be a non-empty list")
        schema: list[str] = []
        for i, item in enumerate(value):
            if not isinstance(item, str) or item.upper() not in ID_SCHEMA_TYPES:
                raise param_error(f"id_schema[{i}]: must be one of {', '.join(sorted(ID_SCHEMA_TYPES))}")
            if item.upper() in schema:
                raise param_error(f"id_schema[{i}]: duplicate id type {item.upper()}")
            schema.append(item.upper())
        return tuple(schema)

    def _validate_row(
        self,
        i: int,
        row: object,
        id_schema: tuple[str, ...],
        advertiser_ids: Sequence[str],
        new_audiences: dict[str, str],
    ) -> list[MappingCell]:
        if not isinstance(row, list):
            raise param_error(f"batch_data[{i}]: must be a list")
        if len(row) != len(id_schema):
            raise param_error(
                f"batch_data[{i}]: row length {len(row)} does not match id_schema length {len(id_schema)}"
            )
        cells: list[MappingCell] = []
        for j, (cell, id_type) in enumerate(zip(row, id_schema, strict=True)):
            where = f"batch_data[{i}][{j}]"
            if not isinstance(cell, dict):
                raise param_error(f"{where}: must be an object")
            if not cell:
                continue
            extra = set(cell) - {"id", "audience_ids"}
            if extra:
                raise param_error(f"{where}: unknown field {sorted(extra)[0]}")
            ident = cell.get("id")
            if not isinstance(ident, str):
                raise param_error(f"{where}.id: required string")
            pattern = _SHA256_RE if id_type in SHA256_TYPES else _MD5_RE
            if not pattern.fullmatch(ident):
                kind = "SHA-256" if id_type in SHA256_TYPES else "MD5"
                raise ApiError(PII_NOT_HASHED, f"PII_NOT_HASHED: {where}.id is not a lowercase hex {kind} digest")
            audience_ids = _str_list(cell.get("audience_ids"), f"{where}.audience_ids")
            for aud in audience_ids:
                self._check_mapping_audience(aud, advertiser_ids, new_audiences)
            cells.append(MappingCell(id_type, ident, tuple(audience_ids)))
        if not cells:
            raise param_error(f"batch_data[{i}]: row has no identifier")
        return cells

    def _check_mapping_audience(self, aud: str, advertiser_ids: Sequence[str], new_audiences: dict[str, str]) -> None:
        audience = self.audiences.get(aud)
        if audience is None:
            if self.auto_create:
                new_audiences.setdefault(aud, advertiser_ids[0])
                return
            raise param_error("invalid audience ID")
        if audience.advertiser_id not in advertiser_ids or audience.audience_type != PARTNER:
            raise param_error("invalid audience ID")  # segment/mapping feeds Partner audiences only
        if audience.ready_at is not None and self._clock() < audience.ready_at:
            raise param_error("invalid audience ID")  # what TikTok answers while a new audience warms up

    def apply_mapping(self, req: MappingRequest) -> None:
        with self._lock:
            for aud, adv in req.new_audiences:
                self.add_audience(adv, aud)
            for cell in req.cells:
                for aud in cell.audience_ids:
                    ids = self.audiences[aud].members.setdefault(cell.id_type, set())
                    if req.action == "add":
                        ids.add(cell.id)
                    else:
                        ids.discard(cell.id)

    # -- segment/audience -----------------------------------------------------------------------------------

    def segment_audience(self, body: object) -> dict[str, object]:
        """Create (answers the new id) or delete a Partner audience."""
        if not isinstance(body, dict):
            raise param_error("request body must be a JSON object")
        advertiser_id = _non_empty_str(_require(body, "advertiser_id"), "advertiser_id")
        action = _require(body, "action")
        if action not in ("create", "delete"):
            raise param_error("action: must be one of create, delete")
        with self._lock:
            self.check_advertiser(advertiser_id)
            if action == "create":
                name = _non_empty_str(_require(body, "custom_audience_name"), "custom_audience_name")
                audience_id = self.add_audience(advertiser_id, None, name)
                if self.audience_ready_delay_s > 0:
                    ready = self._clock() + timedelta(seconds=self.audience_ready_delay_s)
                    self.audiences[audience_id].ready_at = ready
                return {"audience_id": audience_id}
            target = _non_empty_str(_require(body, "delete_audience_id"), "delete_audience_id")
            self._owned_audience(advertiser_id, target)
            del self.audiences[target]
            return {}

    # -- customer files: dmp/custom_audience/file/upload, create, update ---------------------------------------

    def upload_file(self, body: object) -> dict[str, object]:
        """Check a multipart upload like TikTok (signature, type, size, hashed lines) and keep it under a new path."""
        if not isinstance(body, dict):
            raise param_error("request body must be multipart/form-data")
        part = body.get("file")
        if not isinstance(part, FilePart):
            raise param_error("file: required, as a file part of a multipart/form-data body")
        advertiser_id = _form_str(body, "advertiser_id")
        calculate_type = _form_str(body, "calculate_type")
        if calculate_type not in UPLOAD_CALCULATE_TYPES:
            raise param_error(f"calculate_type: must be one of {', '.join(sorted(UPLOAD_CALCULATE_TYPES))}")
        if calculate_type == _NOT_MODELLED:
            raise param_error("calculate_type: MULTIPLE_TYPES files are not modelled by the sandbox")
        signature = _form_str(body, "file_signature")
        file_name = body.get("file_name")
        if file_name is not None and not isinstance(file_name, str):
            raise param_error("file_name: must be a string")
        name = file_name or part.filename
        with self._lock:
            self.check_advertiser(advertiser_id)
        if not name.endswith(FILE_SUFFIXES):
            raise ApiError(FILE_TYPE_ERROR, f"File type error: {name!r} must end with .csv or .txt")
        content = part.content
        if not content:
            raise ApiError(FILE_EMPTY, "File is empty.")
        if len(content) > self.max_file_bytes:
            raise ApiError(
                FILE_TOO_LARGE, f"File is too large: {len(content)} bytes, at most {self.max_file_bytes} allowed"
            )
        md5 = hashlib.md5(content, usedforsecurity=False).hexdigest()
        if signature.strip().lower() != md5:
            raise param_error(
                f"file_signature: does not match the MD5 of the file received ({md5}); "
                "the file was altered or cut in transit, or the signature is not its MD5"
            )
        kind = _CALCULATE_ALIASES.get(calculate_type, calculate_type)
        header, ids = _parse_file(content, kind)
        with self._lock:
            path = secrets.token_hex(FILE_PATH_CHARS // 2)
            while path in self.files:
                path = secrets.token_hex(FILE_PATH_CHARS // 2)
            self.files[path] = CustomerFile(path, advertiser_id, kind, name, md5, len(content), header, ids)
        return {"file_path": path}

    def create_file_audience(self, body: object) -> dict[str, object]:
        """`dmp/custom_audience/create/`: a customer-file audience holding the union of its files."""
        if not isinstance(body, dict):
            raise param_error("request body must be a JSON object")
        advertiser_id = _non_empty_str(_require(body, "advertiser_id"), "advertiser_id")
        name = _audience_name(_require(body, "custom_audience_name"))
        calculate_type = _require(body, "calculate_type")
        if calculate_type not in AUDIENCE_CALCULATE_TYPES:
            raise param_error(f"calculate_type: must be one of {', '.join(sorted(AUDIENCE_CALCULATE_TYPES))}")
        if calculate_type == _NOT_MODELLED:
            raise param_error("calculate_type: MULTIPLE_TYPES audiences are not modelled by the sandbox")
        assert isinstance(calculate_type, str)
        paths = _file_paths(_require(body, "file_paths"))
        retention = body.get("retention_in_days")
        if retention is not None and (type(retention) is not int or not 1 <= retention <= 365):
            raise param_error("retention_in_days: must be an integer between 1 and 365")
        if body.get("audience_sub_type", "NORMAL") not in ("NORMAL", "REACH_FREQUENCY"):
            raise param_error("audience_sub_type: must be one of NORMAL, REACH_FREQUENCY")
        with self._lock:
            self.check_advertiser(advertiser_id)
            files = [self._usable_file(advertiser_id, p, calculate_type) for p in paths]
            members: set[str] = set().union(*(f.ids for f in files))
            if len(members) < self.min_audience_size:
                raise self._too_small("create", len(members))
            now = self._clock()
            aid = self._new_audience_id()
            audience = Audience(aid, advertiser_id, name, now, audience_type=CUSTOMER_FILE)
            audience.calculate_type = calculate_type
            audience.members[calculate_type] = members
            if retention is not None:
                audience.expire_override = now + timedelta(days=retention)
            audience.history.append((now, "create"))
            self.audiences[aid] = audience
            self.file_updates.append(FileUpdate(aid, "CREATE", tuple(paths), 0, len(members)))
            return {"custom_audience_id": aid}

    def update_file_audience(self, body: object) -> dict[str, object]:
        """`dmp/custom_audience/update/`: rename, and/or APPEND / REMOVE / REPLACE (the default) with files."""
        if not isinstance(body, dict):
            raise param_error("request body must be a JSON object")
        advertiser_id = _non_empty_str(_require(body, "advertiser_id"), "advertiser_id")
        audience_id = _non_empty_str(_require(body, "custom_audience_id"), "custom_audience_id")
        raw_name = body.get("custom_audience_name")
        name = _audience_name(raw_name) if raw_name is not None else None
        raw_paths = body.get("file_paths")
        paths = _file_paths(raw_paths) if raw_paths is not None else None
        action = body.get("action", "REPLACE")
        if action not in FILE_ACTIONS:
            raise param_error(f"action: must be one of {', '.join(FILE_ACTIONS)}")
        assert isinstance(action, str)
        if name is None and paths is None:
            raise param_error("pass custom_audience_name or file_paths")
        with self._lock:
            self.check_advertiser(advertiser_id)
            audience = self._owned_audience(advertiser_id, audience_id)
            if audience.audience_type != CUSTOMER_FILE or audience.calculate_type is None:
                raise param_error(
                    f"audience {audience_id} is a {audience.audience_type} audience, not a customer file audience"
                )
            kind = audience.calculate_type
            current = audience.members.setdefault(kind, set())
            after = current
            if paths is not None:
                files = [self._usable_file(advertiser_id, p, kind) for p in paths]
                ids: set[str] = set().union(*(f.ids for f in files))
                after = current | ids if action == "APPEND" else current - ids if action == "REMOVE" else ids
                if len(after) < self.min_audience_size:
                    raise self._too_small(action, len(after))
            now = self._clock()
            before = len(current)
            if paths is not None:
                audience.members[kind] = set(after)
                audience.history.append((now, action.lower()))
            if name is not None:
                audience.name = name
                audience.history.append((now, "rename"))
            done = action if paths is not None else "RENAME"
            self.file_updates.append(FileUpdate(audience_id, done, tuple(paths or ()), before, len(after)))
            return {}

    def _usable_file(self, advertiser_id: str, file_path: str, calculate_type: str) -> CustomerFile:
        file = self.files.get(file_path)
        if file is None:
            raise ApiError(FILE_NOT_EXIST, f"File {file_path} does not exist.")
        if file.advertiser_id != advertiser_id:  # only the uploading advertiser may use a file_path
            raise param_error(f"file_paths: {file_path} was uploaded by another advertiser")
        if file.calculate_type != calculate_type:
            raise ApiError(
                FILE_CALCULATE_TYPE_ERROR,
                f"File calculate type error: {file_path} holds {file.calculate_type}, the audience {calculate_type}",
            )
        return file

    def _too_small(self, action: str, size: int) -> ApiError:
        """TikTok documents the rule but no code: 40002, the code of every other refused parameter."""
        return param_error(
            f"the audience would hold {size} users after {action}; "
            f"customer file audiences need at least {self.min_audience_size:,} users"
        )

    def _owned_audience(self, advertiser_id: str, audience_id: str) -> Audience:
        audience = self.audiences.get(audience_id)
        if audience is None:
            raise ApiError(NOT_EXIST, f"Audience {audience_id} does not exist.")
        if audience.advertiser_id != advertiser_id:
            raise param_error("invalid audience ID")
        return audience

    # -- event/track (offline conversions) -------------------------------------------------------------------

    def now(self) -> datetime:
        """The sandbox's wall clock (injected): what `event/track/` checks event times and de-duplication against."""
        return self._clock()

    def apply_events(self, req: TrackRequest) -> tuple[int, int]:
        """Keep each event once: an event with the `event` and `event_id` of one accepted for the same event set
        less than 48 hours before (sandbox time) only counts as a duplicate. Answers (accepted, duplicates)."""
        accepted = duplicates = 0
        with self._lock:
            seen = self._event_seen
            while seen:  # oldest first: drop keys whose window has passed
                oldest = next(iter(seen))
                if req.at - seen[oldest] < EVENT_DEDUP_WINDOW:
                    break
                del seen[oldest]
            for ev in req.events:
                event_id = ev.get("event_id")
                if isinstance(event_id, str):
                    key = (req.event_source_id, str(ev["event"]), event_id)
                    first = seen.get(key)
                    if first is not None and req.at - first < EVENT_DEDUP_WINDOW:
                        duplicates += 1
                        continue
                    if first is not None:
                        del seen[key]  # re-inserted below, so the oldest-first order holds
                    seen[key] = req.at
                accepted += 1
                self.events_by_name[str(ev["event"])] += 1
                self.received_events.append(
                    {"event_source_id": req.event_source_id, "received_at": req.at.isoformat(), **ev}
                )
            self.events_received += accepted
            self.event_duplicates += duplicates
        return accepted, duplicates

    def events(self, event_source_id: str | None = None) -> dict[str, object]:
        """Received events (each once), optionally of one event set, with the totals of every event set."""
        with self._lock:
            kept = [
                e for e in self.received_events if event_source_id is None or e["event_source_id"] == event_source_id
            ]
            return {
                "received": self.events_received,
                "duplicates": self.event_duplicates,
                "by_event": dict(self.events_by_name),
                "events": kept,
            }

    # -- reads ----------------------------------------------------------------------------------------------

    def get_audiences(self, advertiser_id: str, audience_ids: Sequence[str]) -> dict[str, object]:
        """`dmp/custom_audience/get`: unknown ids answer 40007, another advertiser's ids 40002."""
        with self._lock:
            self.check_advertiser(advertiser_id)
            found = [self._owned_audience(advertiser_id, aid) for aid in audience_ids]
            return {
                "list": [{"audience_details": self._details(a), "audience_history": self._history(a)} for a in found]
            }

    def list_audiences(self, advertiser_id: str, page: int, page_size: int) -> dict[str, object]:
        with self._lock:
            self.check_advertiser(advertiser_id)
            owned = [a for a in self.audiences.values() if a.advertiser_id == advertiser_id]
            chunk = owned[(page - 1) * page_size : page * page_size]
            return {
                "list": [self._summary(a) for a in chunk],
                "page_info": {
                    "page": page,
                    "page_size": page_size,
                    "total_number": len(owned),
                    "total_page": math.ceil(len(owned) / page_size),
                },
            }

    def advertiser_info(self, advertiser_ids: Sequence[str]) -> dict[str, object]:
        """Unknown or forbidden advertisers fail the whole call (40300 / 40001) rather than being omitted.

        A preflight check then names the offending advertiser instead of silently seeing a shorter list.
        """
        with self._lock:
            advs = [self.check_advertiser(a) for a in advertiser_ids]
            return {
                "list": [{"advertiser_id": a.advertiser_id, "name": a.name, "status": "STATUS_ENABLE"} for a in advs]
            }

    def _summary(self, a: Audience) -> dict[str, object]:
        expires = a.expired_time
        return {
            "audience_id": a.audience_id,
            "name": a.name,
            "cover_num": a.cover_num,
            "is_valid": a.is_valid,
            "calculate_type": a.calculate_type or "MULTIPLE_TYPES",
            "audience_type": a.audience_type,
            "is_creator": True,
            "is_expiring": expires - self._clock() <= _EXPIRING,
            "create_time": _fmt(a.create_time),
            "expired_time": _fmt(expires),
            "shared": False,
        }

    def _details(self, a: Audience) -> dict[str, object]:
        details = self._summary(a)
        details.update(type=details.pop("audience_type"), audience_sub_type="NORMAL", rule="{}")
        return details

    @staticmethod
    def _history(a: Audience) -> list[dict[str, object]]:
        # TikTok's action values for file updates are not documented publicly: the sandbox uses the verbs.
        events = a.history or [(a.create_time, "create")]
        return [
            {"opt_time": _fmt(t), "action": action, "msg": None, "editor": "open_api", "action_detail": "0"}
            for t, action in events
        ]

    # -- bookkeeping and test views -------------------------------------------------------------------------

    def count_request(self, path: str) -> None:
        with self._lock:
            self.request_counts[path] += 1

    def opened(self, path: str) -> None:
        with self._lock:
            self.open_requests[path] += 1
            self.peak_open_requests[path] = max(self.peak_open_requests[path], self.open_requests[path])

    def closed(self, path: str) -> None:
        with self._lock:
            self.open_requests[path] -= 1

    def record(self, rec: RequestRecord) -> None:
        with self._lock:
            self.request_log.append(rec)
            if rec.code not in (None, OK):
                self.rejected_counts[rec.code] += 1
            if rec.fault is not None:
                self.fault_counts[rec.fault] += 1

    def requests(self, path: str | None = None) -> list[dict[str, object]]:
        with self._lock:
            return [asdict(r) for r in self.request_log if path is None or r.path == path]

    def members(self, audience_id: str) -> dict[str, list[str]]:
        """Raises KeyError for an unknown audience."""
        with self._lock:
            return {t: sorted(ids) for t, ids in self.audiences[audience_id].members.items() if ids}

    def snapshot(self) -> dict[str, object]:
        with self._lock:
            return {
                "advertisers": {
                    a.advertiser_id: {"name": a.name, "permission_denied": a.permission_denied}
                    for a in self.advertisers.values()
                },
                "audiences": {
                    a.audience_id: {
                        "advertiser_id": a.advertiser_id,
                        "name": a.name,
                        "type": a.audience_type,
                        "calculate_type": a.calculate_type,
                        "members": {t: len(ids) for t, ids in a.members.items() if ids},
                    }
                    for a in self.audiences.values()
                },
                "customer_files": len(self.files),
                "customer_file_updates": len(self.file_updates),
                "requests": dict(self.request_counts),
                "peak_concurrent_requests": dict(self.peak_open_requests),
                "rejected": {str(code): n for code, n in self.rejected_counts.items()},
                "faults": dict(self.fault_counts),
                "events": {"received": self.events_received, "duplicates": self.event_duplicates},
            }

    def reset(self, *, everything: bool = False) -> None:
        """Clear membership, received events and request bookkeeping; `everything` also forgets advertisers and
        audiences."""
        with self._lock:
            if everything:
                self.advertisers.clear()
                self.audiences.clear()
            for a in self.audiences.values():
                a.members.clear()
            self.files.clear()
            self.file_updates.clear()
            self.request_counts.clear()
            self.peak_open_requests.clear()
            self.rejected_counts.clear()
            self.fault_counts.clear()
            self.request_log.clear()
            self.received_events.clear()
            self.events_received = 0
            self.event_duplicates = 0
            self.events_by_name.clear()
            self._event_seen.clear()

    def customer_files(self) -> dict[str, object]:
        """Files received and updates applied, oldest first: shapes and counts, no identifier."""
        with self._lock:
            return {
                "files": [
                    {
                        "file_path": f.file_path,
                        "advertiser_id": f.advertiser_id,
                        "calculate_type": f.calculate_type,
                        "name": f.name,
                        "md5": f.md5,
                        "bytes": f.size,
                        "rows": len(f.ids),
                        "header": f.header,
                    }
                    for f in self.files.values()
                ],
                "updates": [asdict(u) for u in self.file_updates],
            }

    def file_identifiers(self, file_path: str) -> list[str]:
        """The distinct identifiers of a received file, sorted; raises KeyError for an unknown path."""
        with self._lock:
            return sorted(self.files[file_path].ids)

    def register_all(self, advertisers: Iterable[str], audiences: Iterable[tuple[str, str]]) -> None:
        """Register advertisers and (advertiser_id, audience_id) pairs, implicitly their advertisers too."""
        for adv in advertisers:
            self.add_advertiser(adv)
        for adv, aud in audiences:
            if adv not in self.advertisers:
                self.add_advertiser(adv)
            self.add_audience(adv, aud)
