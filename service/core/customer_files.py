"""Customer-file audiences, the pure part: which files TikTok takes, what goes in them, and what to send.

Facts relied on (docs/tiktok-api.md §3, §3.6, §8.3):

- A customer-file audience has one `calculate_type`, and every file uploaded for it must hold that type. The
  four single-type SHA-256 contracts this service writes are `EMAIL_SHA256`, `PHONE_SHA256`, `IDFA_SHA256` and
  `GAID_SHA256` (the spec's `DmpCalculateType` values 8, 9, 15, 16). Android advertising ids are `AAID_SHA256` in
  `segment/mapping` but `GAID_SHA256` in the file API: same value, same hashing, different name.
- A file is `.csv` or `.txt`, one identifier per line, sent with its MD5 as `file_signature`; at most 50 MB per
  file through the API [3p]. Files are written with `\\n` line ends and no header row by default: the public API
  clients (AWS's audience uploader, Pipedream) upload header-less files, while TikTok's help page asks for a header
  row in Ads Manager uploads. Whether the API wants one is not confirmed; `header=True` writes the help page's
  header (`Email_SHA256`, `Phone_SHA256`, `MAID_SHA256`).
- `dmp/custom_audience/update/` takes `APPEND`, `REMOVE` or `REPLACE`, and refuses any of them that would leave
  the audience under 1,000 users.

Nothing here does I/O: rows in, bytes and counts out, so the pipeline and `refresh` share one tested core.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType
from typing import Final, Generic, Literal, TypeVar, get_args

from service.core.identifiers import hash_ad_id, hash_email, hash_phone
from service.core.model import Action, AudienceChange, IdType, MatchError

FileContract = Literal["EMAIL_SHA256", "PHONE_SHA256", "IDFA_SHA256", "GAID_SHA256"]
FILE_CONTRACTS: Final[tuple[FileContract, ...]] = get_args(FileContract)

# The service's streaming id types → the file contract of the same identifier.
CONTRACT_FOR_ID_TYPE: Final[Mapping[IdType, FileContract]] = MappingProxyType(
    {
        "EMAIL_SHA256": "EMAIL_SHA256",
        "PHONE_SHA256": "PHONE_SHA256",
        "IDFA_SHA256": "IDFA_SHA256",
        "AAID_SHA256": "GAID_SHA256",
    }
)
ID_TYPE_FOR_CONTRACT: Final[Mapping[FileContract, IdType]] = MappingProxyType(
    {c: t for t, c in CONTRACT_FOR_ID_TYPE.items()}
)

# Header row names from TikTok's customer-file help page; IDFA and GAID files share "MAID".
FILE_HEADERS: Final[Mapping[FileContract, str]] = MappingProxyType(
    {
        "EMAIL_SHA256": "Email_SHA256",
        "PHONE_SHA256": "Phone_SHA256",
        "IDFA_SHA256": "MAID_SHA256",
        "GAID_SHA256": "MAID_SHA256",
    }
)

# 50 MB read as 50,000,000 bytes: the smaller of the two readings, so a file fits whichever TikTok means.
MAX_FILE_BYTES: Final = 50_000_000
MIN_AUDIENCE_SIZE: Final = 1000  # TikTok refuses an update that leaves fewer users (docs/tiktok-api.md §3.3)
FILE_SUFFIX: Final = ".csv"
LINE_BYTES: Final = 65  # 64 hex characters and "\n"
DEFAULT_MAX_PENDING_USERS: Final = 1_000_000
DEFAULT_MAX_PENDING_RECORDS: Final = 4_000_000

_HEX64: Final = re.compile(r"[0-9a-f]{64}")
_UNSAFE_NAME: Final = re.compile(r"[^A-Za-z0-9._-]+")
_STEM_MAX: Final = 64


class FileAction(StrEnum):
    """`action` of `dmp/custom_audience/update/` (TikTok's default is REPLACE)."""

    APPEND = "APPEND"
    REMOVE = "REMOVE"
    REPLACE = "REPLACE"


_FILE_ACTION: Final[Mapping[Action, FileAction]] = MappingProxyType(
    {Action.ADD: FileAction.APPEND, Action.DELETE: FileAction.REMOVE}
)


def hash_for_contract(value: object, contract: FileContract, *, phone_region: str = "US") -> str | MatchError | None:
    """Normalise + SHA-256 one raw value for `contract` (identifiers.py rules); 64-hex values pass through.

    None for an absent value (None, empty, blank), a `MatchError` for an invalid one.
    """
    if contract == "EMAIL_SHA256":
        return hash_email(value)
    if contract == "PHONE_SHA256":
        return hash_phone(value, phone_region)
    return hash_ad_id(value, ID_TYPE_FOR_CONTRACT[contract])


# -- file writer -------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class IdentifierFile:
    """One file ready for `dmp/custom_audience/file/upload/`: `md5` is its `file_signature`."""

    contract: FileContract
    name: str
    content: bytes
    md5: str
    rows: int

    @property
    def size(self) -> int:
        return len(self.content)


@dataclass(frozen=True, slots=True)
class WrittenFiles:
    """Files of one contract and what happened to the input values.

    `written` counts distinct identifiers across `files`; `duplicates` the values that hashed to one already
    seen; `missing` the absent ones (None, empty, blank); `invalid` the others by reason code (never the value).
    """

    contract: FileContract
    files: tuple[IdentifierFile, ...]
    written: int
    duplicates: int = 0
    missing: int = 0
    invalid: Mapping[str, int] = field(default_factory=dict)

    @property
    def invalid_total(self) -> int:
        return sum(self.invalid.values())


def _safe_stem(stem: str) -> str:
    cleaned = _UNSAFE_NAME.sub("_", stem).strip("._-")[:_STEM_MAX]
    return cleaned or "audience"


def rows_per_file(max_bytes: int, contract: FileContract, *, header: bool = False) -> int:
    """How many identifiers fit in a file of at most `max_bytes` (ValueError if not even one does)."""
    head = len(FILE_HEADERS[contract]) + 1 if header else 0
    rows = (max_bytes - head) // LINE_BYTES
    if rows < 1:
        raise ValueError(f"max_bytes {max_bytes} cannot hold one identifier line ({LINE_BYTES + head} bytes)")
    return rows


def files_from_hashes(
    hashes: Iterable[str],
    contract: FileContract,
    *,
    stem: str = "audience",
    max_bytes: int = MAX_FILE_BYTES,
    header: bool = False,
) -> tuple[IdentifierFile, ...]:
    """Already-hashed identifiers → files of at most `max_bytes` each, sorted and deduplicated.

    Sorting makes the output a function of the set alone: the same members give byte-identical files, names and
    signatures whatever the input order. Each name is `<stem>-<contract>-<part>-of-<parts>-<md5[:8]>.csv`.
    Raises ValueError for a value that is not 64 lowercase hex characters (callers hash through identifiers.py
    first, so this is a bug, not bad input) and for a `max_bytes` too small for one line.
    """
    per_file = rows_per_file(max_bytes, contract, header=header)
    ordered = sorted(set(hashes))
    for value in ordered:
        if not _HEX64.fullmatch(value):
            raise ValueError(f"{contract} file: a value is not 64 lowercase hex characters (not hashed?)")
    head = (FILE_HEADERS[contract] + "\n").encode() if header else b""
    parts = (len(ordered) + per_file - 1) // per_file
    base = f"{_safe_stem(stem)}-{contract.lower()}"
    out: list[IdentifierFile] = []
    for i in range(parts):
        chunk = ordered[i * per_file : (i + 1) * per_file]
        content = head + "".join(h + "\n" for h in chunk).encode()
        md5 = hashlib.md5(content, usedforsecurity=False).hexdigest()
        name = f"{base}-{i + 1:04d}-of-{parts:04d}-{md5[:8]}{FILE_SUFFIX}"
        out.append(IdentifierFile(contract, name, content, md5, len(chunk)))
    return tuple(out)


def write_files(
    values: Iterable[object],
    contract: FileContract,
    *,
    stem: str = "audience",
    max_bytes: int = MAX_FILE_BYTES,
    header: bool = False,
    phone_region: str = "US",
) -> WrittenFiles:
    """Raw or pre-hashed values of one contract → files; invalid values are counted by reason, not written."""
    seen: set[str] = set()
    duplicates = missing = 0
    invalid: Counter[str] = Counter()
    for value in values:
        hashed = hash_for_contract(value, contract, phone_region=phone_region)
        if hashed is None:
            missing += 1
        elif isinstance(hashed, MatchError):
            invalid[hashed.reason] += 1
        elif hashed in seen:
            duplicates += 1
        else:
            seen.add(hashed)
    files = files_from_hashes(seen, contract, stem=stem, max_bytes=max_bytes, header=header)
    return WrittenFiles(contract, files, len(seen), duplicates, missing, dict(invalid))


# -- net membership changes --------------------------------------------------------------------------------

H = TypeVar("H")

_Key = tuple[FileContract, str]
Accepted = tuple[FileContract, FileAction]


class NetChangesFull(Exception):
    """A record would exceed the bound of `NetChanges`: drain (upload) first, then record it again."""


@dataclass(frozen=True, slots=True)
class NetBatch(Generic[H]):
    """What one drain of `NetChanges` asks TikTok to do, and which source records that covers.

    `append[c]` and `remove[c]` are disjoint for every contract `c`. `handles` lists every record taken since the
    previous drain, in record order; `needs[i]` names the (contract, action) updates that `handles[i]` waits for
    (empty for a record that had no identifier of the audience's contracts).
    """

    append: Mapping[FileContract, frozenset[str]]
    remove: Mapping[FileContract, frozenset[str]]
    handles: tuple[H, ...]
    needs: tuple[frozenset[Accepted], ...]

    @property
    def users(self) -> int:
        return sum(map(len, self.append.values())) + sum(map(len, self.remove.values()))

    @property
    def empty(self) -> bool:
        """No identifier to send (the handles, if any, can be settled without calling TikTok)."""
        return self.users == 0

    def updates(self) -> list[tuple[FileContract, FileAction, frozenset[str]]]:
        """The non-empty (contract, action, identifiers) updates, in contract order, APPEND before REMOVE."""
        out: list[tuple[FileContract, FileAction, frozenset[str]]] = []
        for contract in FILE_CONTRACTS:
            for action, sets in ((FileAction.APPEND, self.append), (FileAction.REMOVE, self.remove)):
                ids = sets.get(contract)
                if ids:
                    out.append((contract, action, ids))
        return out

    def settled(self, accepted: Iterable[Accepted]) -> tuple[H, ...]:
        """The handles whose every update TikTok accepted, in record order: only their offsets may be committed.

        A record superseded by a later one for the same user waits for the update carrying the later action: its
        own action is no longer sent, and committing it first would lose nothing but must not get ahead of it.
        """
        done = frozenset(accepted)
        return tuple(h for h, need in zip(self.handles, self.needs, strict=True) if need <= done)


class NetChanges(Generic[H]):
    """Membership changes of one audience netted per user, last action wins, until drained into one `NetBatch`.

    A user is an identifier of one of the audience's `contracts` (an audience holds one contract, so one
    identifier is one user). Recording enter then exit for a user nets to REMOVE, not to nothing: delivery is
    at least once and TikTok's current membership is unknown here, so the user may already be in the audience
    (an earlier drain, or a previous run whose offsets were not committed) and only a REMOVE takes them out.
    Enter, exit, enter nets to APPEND.

    Invariant, between any two calls:
      - every pending key (contract, identifier) has exactly one action, the last one recorded for it, and is
        covered by the records that touched it since the last drain;
      - pending keys ≤ `max_users` and records ≤ `max_records`: a `record` that would break either raises
        `NetChangesFull` and changes nothing;
      - each record (its handle) belongs to exactly one batch: the next `drain`, which empties this object.
    Batches must be applied in drain order (a later batch may undo an earlier one for the same user).
    """

    def __init__(
        self,
        contracts: Iterable[FileContract],
        *,
        max_users: int = DEFAULT_MAX_PENDING_USERS,
        max_records: int = DEFAULT_MAX_PENDING_RECORDS,
    ) -> None:
        chosen = tuple(dict.fromkeys(contracts))
        unknown = [c for c in chosen if c not in FILE_CONTRACTS]
        if unknown or not chosen:
            raise ValueError(f"contracts must be a non-empty subset of {', '.join(FILE_CONTRACTS)}")
        if max_users < 1 or max_records < 1:
            raise ValueError("max_users and max_records must be >= 1")
        self.contracts = chosen
        self.max_users = max_users
        self.max_records = max_records
        self._types: dict[IdType, FileContract] = {ID_TYPE_FOR_CONTRACT[c]: c for c in chosen}
        self._entries: dict[_Key, tuple[FileAction, list[int]]] = {}
        self._handles: list[H] = []
        self._appends = 0  # pending keys whose action is APPEND

    @property
    def pending_users(self) -> int:
        return len(self._entries)

    @property
    def pending_appends(self) -> int:
        """Pending users whose last action is APPEND (what a create-on-demand would hold)."""
        return self._appends

    @property
    def pending_records(self) -> int:
        return len(self._handles)

    def room(self) -> int:
        """How many new users fit before `record` raises (records permitting)."""
        if len(self._handles) >= self.max_records:
            return 0
        return self.max_users - len(self._entries)

    def record(self, action: Action, identifiers: Iterable[tuple[IdType, str]], handle: H) -> int:
        """Record one source record; returns how many of its identifiers belong to the audience's contracts.

        0 still takes the handle: it rides in the next batch so offsets are committed in order.
        """
        keys = [(self._types[t], h) for t, h in identifiers if t in self._types]
        new = sum(1 for k in dict.fromkeys(keys) if k not in self._entries)
        if len(self._handles) + 1 > self.max_records or len(self._entries) + new > self.max_users:
            raise NetChangesFull(
                f"{len(self._entries)} users / {len(self._handles)} records pending "
                f"(bounds {self.max_users} / {self.max_records}): drain before recording more"
            )
        index = len(self._handles)
        self._handles.append(handle)
        file_action = _FILE_ACTION[action]
        appending = file_action is FileAction.APPEND
        for key in keys:
            entry = self._entries.get(key)
            if entry is None:
                covered: list[int] = []
                self._appends += appending
            else:
                covered = entry[1]
                self._appends += appending - (entry[0] is FileAction.APPEND)
            if not covered or covered[-1] != index:
                covered.append(index)
            self._entries[key] = (file_action, covered)
        return len(keys)

    def record_change(self, change: AudienceChange, handle: H) -> int:
        return self.record(change.action, change.identifiers, handle)

    def drain(self) -> NetBatch[H]:
        """Everything pending as one batch; this object is empty afterwards."""
        append: dict[FileContract, set[str]] = {}
        remove: dict[FileContract, set[str]] = {}
        needs: list[set[Accepted]] = [set() for _ in self._handles]
        for (contract, ident), (action, covered) in self._entries.items():
            (append if action is FileAction.APPEND else remove).setdefault(contract, set()).add(ident)
            for i in covered:
                needs[i].add((contract, action))
        batch: NetBatch[H] = NetBatch(
            append={c: frozenset(s) for c, s in append.items()},
            remove={c: frozenset(s) for c, s in remove.items()},
            handles=tuple(self._handles),
            needs=tuple(frozenset(n) for n in needs),
        )
        self._entries = {}
        self._handles = []
        self._appends = 0
        return batch


# -- full refresh ------------------------------------------------------------------------------------------

# Snapshot field names (case-insensitive) → contract; the contract names themselves are accepted too.
SNAPSHOT_FIELDS: Final[Mapping[str, FileContract]] = MappingProxyType(
    {
        "email": "EMAIL_SHA256",
        "phone": "PHONE_SHA256",
        "idfa": "IDFA_SHA256",
        "gaid": "GAID_SHA256",
        "aaid": "GAID_SHA256",
        **{c.lower(): c for c in FILE_CONTRACTS},
        "aaid_sha256": "GAID_SHA256",
    }
)


class BelowMinimumSize(ValueError):
    """A REPLACE would leave fewer users than TikTok accepts: refused before any call, with the count."""

    def __init__(self, contract: FileContract, count: int, minimum: int = MIN_AUDIENCE_SIZE) -> None:
        self.contract = contract
        self.count = count
        self.minimum = minimum
        super().__init__(
            f"refusing to replace the audience: the snapshot has {count} distinct {contract} identifier"
            f"{'' if count == 1 else 's'}, and TikTok refuses any update that leaves fewer than {minimum:,} users"
        )


@dataclass(frozen=True, slots=True)
class ContractCounts:
    """Per contract: distinct valid identifiers, repeats of one already seen, and invalid values by reason."""

    identifiers: int
    duplicates: int
    invalid: Mapping[str, int]

    @property
    def invalid_total(self) -> int:
        return sum(self.invalid.values())


@dataclass(frozen=True, slots=True)
class RefreshPlan:
    """A snapshot reduced to what a REPLACE sends, plus the counts `--dry-run` shows.

    `users` counts snapshot rows; `users_without_identifier` the rows with no valid identifier of the chosen
    contracts (they cannot be matched and are left out).
    """

    hashed: Mapping[FileContract, frozenset[str]]
    users: int
    users_without_identifier: int
    counts: Mapping[FileContract, ContractCounts]

    def size(self, contract: FileContract) -> int:
        return len(self.hashed.get(contract, frozenset()))

    def check_minimum(self, contract: FileContract, minimum: int = MIN_AUDIENCE_SIZE) -> BelowMinimumSize | None:
        """The refusal to show (not raised) when replacing with `contract`'s identifiers would go under `minimum`."""
        count = self.size(contract)
        return BelowMinimumSize(contract, count, minimum) if count < minimum else None

    def require_minimum(self, contract: FileContract, minimum: int = MIN_AUDIENCE_SIZE) -> frozenset[str]:
        """The identifiers to replace with; raises `BelowMinimumSize` rather than let TikTok refuse the update."""
        refusal = self.check_minimum(contract, minimum)
        if refusal is not None:
            raise refusal
        return self.hashed[contract]

    def summary(self) -> dict[str, object]:
        """JSON-ready counts for `--dry-run` / `--json` (no identifier, hashed or not)."""
        return {
            "users": self.users,
            "users_without_identifier": self.users_without_identifier,
            "contracts": {
                c: {
                    "identifiers": n.identifiers,
                    "duplicates": n.duplicates,
                    "invalid": n.invalid_total,
                    "invalid_by_reason": dict(sorted(n.invalid.items())),
                    "below_minimum": n.identifiers < MIN_AUDIENCE_SIZE,
                }
                for c, n in self.counts.items()
            },
        }


def snapshot_contract(field_name: str) -> FileContract | None:
    """The contract a snapshot field (CSV column, record key) feeds, or None for any other field."""
    return SNAPSHOT_FIELDS.get(field_name.strip().lower())


def plan_refresh(
    snapshot: Iterable[Mapping[str, object]],
    *,
    contracts: Sequence[FileContract] = FILE_CONTRACTS,
    phone_region: str = "US",
) -> RefreshPlan:
    """Snapshot rows (one user each: field → raw or pre-hashed value) → per-contract hashed sets and counts.

    Fields are matched by `snapshot_contract`; other fields (a user id, a name) are ignored, as are fields of
    contracts not in `contracts`.
    """
    chosen = tuple(dict.fromkeys(contracts))
    if not chosen or any(c not in FILE_CONTRACTS for c in chosen):
        raise ValueError(f"contracts must be a non-empty subset of {', '.join(FILE_CONTRACTS)}")
    wanted = frozenset(chosen)
    sets: dict[FileContract, set[str]] = {c: set() for c in chosen}
    duplicates: Counter[FileContract] = Counter()
    invalid: dict[FileContract, Counter[str]] = {c: Counter() for c in chosen}
    users = without = 0
    fields: dict[str, FileContract | None] = {}
    for row in snapshot:
        users += 1
        found = False
        for name, value in row.items():
            contract = fields.get(name)
            if name not in fields:
                contract = fields[name] = snapshot_contract(name)
            if contract is None or contract not in wanted:
                continue
            hashed = hash_for_contract(value, contract, phone_region=phone_region)
            if hashed is None:
                continue
            if isinstance(hashed, MatchError):
                invalid[contract][hashed.reason] += 1
                continue
            found = True
            bucket = sets[contract]
            if hashed in bucket:
                duplicates[contract] += 1
            else:
                bucket.add(hashed)
        if not found:
            without += 1
    return RefreshPlan(
        hashed={c: frozenset(s) for c, s in sets.items()},
        users=users,
        users_without_identifier=without,
        counts={c: ContractCounts(len(sets[c]), duplicates[c], dict(invalid[c])) for c in chosen},
    )
