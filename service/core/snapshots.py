"""Snapshots of an audience's current members for `audience-sync refresh`: a CSV export or a compacted Kafka topic,
read into rows for `customer_files.plan_refresh` (field → raw or pre-hashed value, one row per user).

Nothing here does I/O: lines or (key, value, headers) records in, rows and counts out. No raw identifier ever
reaches a count, a message or an exception: problems are named by row number, column or reason only.

**CSV** (`read_csv`): a header row, then one user per row. Identifier columns are recognised by their header,
trimmed and case-insensitive: `email`, `phone`, `idfa`, `aaid` or `gaid` hold raw values (normalised and hashed
like the streaming path, docs/design.md "Input events"; a value that is already 64 hex characters passes through),
and the contract names `EMAIL_SHA256`, `PHONE_SHA256`, `IDFA_SHA256`, `GAID_SHA256` (or `AAID_SHA256`) hold
pre-hashed values, which must be 64 hex characters (anything else is counted `not_sha256`, never hashed again: an
MD5 or a raw value there is a mistake upstream). Other columns (a user id, a name) are ignored, and so are the
columns of contracts the audience does not take. A UTF-8 byte-order mark is accepted. A row with the wrong number of
fields, bytes that are not UTF-8 or a CSV syntax error is *bad*: counted and skipped, never fatal. Blank lines are
not rows. A file without a header, or without an identifier column the audience can use, is refused
(`SnapshotError`).

**Compacted topic** (`CompactedSnapshot`): a topic with `cleanup.policy=compact` holding every user's current
membership of one or more audiences:

- key: `<audience_key>:<user_id>` in UTF-8 (the audience key as in the mappings file, a colon, the producer's user
  id; the first colon after the audience key separates them, so a user id may hold colons, an audience key may not
  be a prefix-with-colon of another one read from the same topic);
- value: a canonical membership event (schemas/audience_membership.json, JSON; or schemaless Avro with the
  `content-type` header, as the service reads them) whose `audience_key` is the key's and whose `user_id`, when
  present, is the key's: `"action": "add"` means a member, `"action": "delete"` means left; the identifiers are
  its `email`, `phone`, `idfa`, `aaid` fields, read with the canonical event's rules (raw or 64-hex);
- a tombstone (null value) means left, and lets compaction drop the key.

Per key the record read last wins (a partition's order; one key always lands on one partition), so the topic read
from its beginning to its end gives the current members whether or not compaction has run. A latest value that
cannot be read (not a canonical event, another audience or user than its key says, an unknown action) leaves the
user out of the snapshot and is counted `invalid`: the refresh removes them rather than guess.
"""

from __future__ import annotations

import csv
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from service.core.customer_files import FILE_CONTRACTS, FileContract, snapshot_contract
from service.core.events import CANONICAL_AVRO, CANONICAL_JSON, Event, decode_event
from service.core.schemas import SchemaStore
from service.core.types import Headers

Row = dict[str, object]

# Column / field names of raw values (the rest that `snapshot_contract` knows are the pre-hashed contract names).
RAW_FIELDS: Final[Mapping[str, FileContract]] = {
    "email": "EMAIL_SHA256",
    "phone": "PHONE_SHA256",
    "idfa": "IDFA_SHA256",
    "aaid": "GAID_SHA256",
    "gaid": "GAID_SHA256",
}
KEY_SEPARATOR: Final = ":"
_HEX: Final = frozenset("0123456789abcdefABCDEF")


class SnapshotError(ValueError):
    """The snapshot cannot be used at all (no header, no usable identifier column): nothing is sent."""


def _is_sha256(value: str) -> bool:
    v = value.strip()
    return len(v) == 64 and all(c in _HEX for c in v)


# -- CSV --------------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class CsvCounts:
    """What reading a CSV export found (filled while its rows are consumed)."""

    rows: int = 0  # data rows handed over (one user each)
    bad_rows: int = 0  # skipped: wrong field count, not UTF-8, CSV syntax error
    bad_rows_by_reason: Counter[str] = field(default_factory=Counter)
    not_sha256: Counter[str] = field(default_factory=Counter)  # pre-hashed column → values that were not 64-hex
    columns: dict[str, FileContract] = field(default_factory=dict)  # used column → contract
    ignored_columns: list[str] = field(default_factory=list)  # other columns, and those of contracts not taken

    def document(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "bad_rows": self.bad_rows,
            "bad_rows_by_reason": dict(sorted(self.bad_rows_by_reason.items())),
            "not_sha256": dict(sorted(self.not_sha256.items())),
            "columns": dict(self.columns),
            "ignored_columns": list(self.ignored_columns),
        }


def _header(lines: Iterator[list[str]]) -> list[str]:
    for row in lines:
        if row and any(c.strip() for c in row):
            if row[0].startswith("\ufeff"):  # a BOM the caller's decoding left in
                row = [row[0][1:], *row[1:]]
            return [c.strip() for c in row]
    raise SnapshotError("the CSV file is empty: expected a header row naming the identifier columns")


class CsvSnapshot:
    """Rows of a CSV export (see the module doc); iterate once, then read `counts`.

    `lines` are text lines (a file opened with `encoding="utf-8-sig", errors="replace", newline=""` is right:
    undecodable bytes become U+FFFD and make their row bad). `contracts` are the ones the audience takes.
    """

    def __init__(self, lines: Iterable[str], contracts: Sequence[FileContract] = FILE_CONTRACTS) -> None:
        self.counts = CsvCounts()
        self._reader = csv.reader(iter(lines))
        self._rows = self._safe_rows()
        header = _header(self._rows)
        wanted = frozenset(contracts)
        self._columns: list[tuple[int, str, FileContract, bool]] = []  # index, name, contract, pre-hashed
        seen: set[str] = set()
        for i, name in enumerate(header):
            contract = snapshot_contract(name)
            key = name.lower()
            if key in seen and contract is not None:
                raise SnapshotError(f"the CSV header names column {name!r} twice")
            seen.add(key)
            if contract is None or contract not in wanted:
                self.counts.ignored_columns.append(name)
                continue
            self._columns.append((i, name, contract, key not in RAW_FIELDS))
            self.counts.columns[name] = contract
        if not self._columns:
            usable = [n for n, c in RAW_FIELDS.items() if c in wanted] + [c for c in FILE_CONTRACTS if c in wanted]
            raise SnapshotError(
                f"no identifier column the audience takes in the CSV header (columns: {', '.join(header) or 'none'}; "
                f"expected one of: {', '.join(usable)})"
            )
        self._width = len(header)

    def _safe_rows(self) -> Iterator[list[str]]:
        """csv.reader, with a syntax error counted as one bad row instead of ending the file."""
        while True:
            try:
                row = next(self._reader)
            except StopIteration:
                return
            except csv.Error:
                self._bad("csv_syntax")
                continue
            yield row

    def _bad(self, reason: str) -> None:
        self.counts.bad_rows += 1
        self.counts.bad_rows_by_reason[reason] += 1

    def __iter__(self) -> Iterator[Row]:
        for fields in self._rows:
            if not fields or (len(fields) == 1 and not fields[0].strip()):
                continue  # a blank line
            if len(fields) != self._width:
                self._bad("field_count")
                continue
            if any("\ufffd" in f for f in fields):
                self._bad("not_utf8")
                continue
            row: Row = {}
            for i, name, _, prehashed in self._columns:
                value = fields[i]
                if prehashed and value.strip() and not _is_sha256(value):
                    self.counts.not_sha256[name] += 1
                    continue
                row[name] = value
            self.counts.rows += 1
            yield row


# -- compacted topic ---------------------------------------------------------------------------------------------

MEMBER: Final = "member"
LEFT: Final = "left"
INVALID: Final = "invalid"


@dataclass(frozen=True, slots=True)
class Decoded:
    """One record's verdict: a member with its identifier fields, left, or invalid with a reason (no value)."""

    state: str
    row: Row | None = None
    reason: str | None = None


_LEFT: Final = Decoded(LEFT)  # one object for every user who left: memory follows the members


def user_of(key: bytes | None, audience_key: str) -> str | None:
    """The user id of a key of this audience, or None for a key of another audience (or no key)."""
    if key is None:
        return None
    prefix = (audience_key + KEY_SEPARATOR).encode()
    if not key.startswith(prefix):
        return None
    try:
        return key[len(prefix) :].decode("utf-8")
    except UnicodeDecodeError:
        return ""


def decode_membership(
    value: bytes | None,
    headers: Headers | None,
    audience_key: str,
    user_id: str,
    schemas: SchemaStore,
    fields: Iterable[str] = tuple(RAW_FIELDS),
) -> Decoded:
    """One compacted record's value → member (its identifier `fields` only), left, or invalid."""
    if value is None:
        return _LEFT
    try:
        decoded = decode_event(value, headers, schemas)
    except Exception:  # a Confluent-framed value needs the registry: refresh reads canonical values only
        return Decoded(INVALID, reason="undecodable")
    if not isinstance(decoded, Event):
        return Decoded(INVALID, reason="undecodable")
    if decoded.format not in (CANONICAL_JSON, CANONICAL_AVRO):
        return Decoded(INVALID, reason="not_canonical")
    ev = decoded.data
    if ev.get("audience_key") != audience_key:
        return Decoded(INVALID, reason="audience_key_mismatch")
    value_user = ev.get("user_id")
    if value_user not in (None, "") and value_user != user_id:
        return Decoded(INVALID, reason="user_id_mismatch")
    action = ev.get("action")
    if action == "delete":
        return _LEFT
    if action != "add":
        return Decoded(INVALID, reason="unknown_action")
    return Decoded(MEMBER, row={f: ev[f] for f in fields if ev.get(f) is not None})


@dataclass(slots=True)
class CompactedCounts:
    records: int = 0  # records read
    other_audiences: int = 0  # keys of other audiences (or keyless): not this snapshot's
    bad_keys: int = 0  # this audience's prefix, but no user id or not UTF-8
    keys: int = 0  # distinct users of this audience seen
    members: int = 0  # their latest record says member
    left: int = 0  # latest is a delete event or a tombstone
    invalid: int = 0  # latest cannot be read: left out
    invalid_by_reason: Counter[str] = field(default_factory=Counter)

    def document(self) -> dict[str, Any]:
        return {
            "records": self.records,
            "other_audiences": self.other_audiences,
            "bad_keys": self.bad_keys,
            "users": self.keys,
            "members": self.members,
            "left": self.left,
            "invalid": self.invalid,
            "invalid_by_reason": dict(sorted(self.invalid_by_reason.items())),
        }


class CompactedSnapshot:
    """The reduction of a compacted topic's records to the current members of one audience: latest per key wins.

    `add` each record in the order read (per partition, by offset); `rows()` then gives one row per member.
    Only the latest verdict per user is kept (its identifier fields only), so memory follows the audience's
    size, not the topic's.
    """

    def __init__(self, audience_key: str, fields: Iterable[str] = tuple(RAW_FIELDS)) -> None:
        self.audience_key = audience_key
        self.fields = tuple(fields)
        self._schemas = SchemaStore()
        self._latest: dict[bytes, Decoded] = {}
        self._records = 0
        self._other = 0
        self._bad_keys = 0

    def add(self, key: bytes | None, value: bytes | None, headers: Headers | None = None) -> None:
        self._records += 1
        user = user_of(key, self.audience_key)
        if user is None:
            self._other += 1
            return
        assert key is not None
        if not user:
            self._bad_keys += 1
            return
        self._latest[key] = decode_membership(value, headers, self.audience_key, user, self._schemas, self.fields)

    @property
    def counts(self) -> CompactedCounts:
        c = CompactedCounts(self._records, self._other, self._bad_keys, len(self._latest))
        for d in self._latest.values():
            if d.state == MEMBER:
                c.members += 1
            elif d.state == LEFT:
                c.left += 1
            else:
                c.invalid += 1
                c.invalid_by_reason[d.reason or "unknown"] += 1
        return c

    def rows(self) -> Iterator[Row]:
        for d in self._latest.values():
            if d.state == MEMBER and d.row is not None:
                yield d.row


def reduce_compacted(
    records: Iterable[tuple[bytes | None, bytes | None]], audience_key: str
) -> tuple[list[Row], CompactedCounts]:
    """(key, value) records in the order read → the members' rows and the counts (see `CompactedSnapshot`)."""
    snap = CompactedSnapshot(audience_key)
    for key, value in records:
        snap.add(key, value)
    return list(snap.rows()), snap.counts
