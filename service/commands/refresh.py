"""`audience-sync refresh`: replace a file audience's members with a snapshot (TikTok's REPLACE).

    audience-sync refresh --audience-key KEY --from csv:PATH | PATH.csv | kafka:TOPIC [--dry-run] [--json]

The mappings entry KEY must be `mode: file` (one `id_types` contract). The snapshot is read whole, reduced to the
distinct SHA-256 identifiers of that contract, written as files of at most 50 MB, uploaded
(`/dmp/custom_audience/file/upload/`, MD5 signature) and applied in one `/dmp/custom_audience/update/` with
action REPLACE: afterwards the audience holds exactly the snapshot's users. An entry without `audience_id` and with
`create_if_missing` gets its customer-file audience created from the same files instead, and the new id is recorded
in the audience store topic (AUDIENCE_STORE_TOPIC) exactly as the service records audiences it creates, so the
service and later refreshes find it.

Sources:
  csv:PATH (or a PATH ending in .csv)  a header row, one user per row; identifier columns `email`, `phone`,
      `idfa`, `aaid`/`gaid` (raw: normalised and hashed like the stream) or `EMAIL_SHA256`, `PHONE_SHA256`,
      `IDFA_SHA256`, `GAID_SHA256` (pre-hashed, 64 hex); other columns ignored; bad rows counted, not fatal.
  kafka:TOPIC  a compacted topic of current memberships, read from its beginning to its end at start: key
      `<audience_key>:<user_id>` (UTF-8), value a canonical membership event (schemas/audience_membership.json)
      with `action` add (member) or delete (left); a null value (tombstone) = left; the latest record per key wins.

Refusals, before any TikTok call:
  - fewer than 1,000 distinct identifiers of the contract: TikTok refuses any customer-file update that leaves an
    audience under 1,000 users, so the run stops with the count (exit 1);
  - a `mode: stream` entry (exit 2): TikTok's Segment (Partner) audiences have no REPLACE. Users who left without
    an exit event can only be removed by sending exit events (delete), or by moving the entry to a customer-file
    audience (`mode: file`) and refreshing that. The service keeps no durable record of what it sent to a Partner
    audience, so it cannot work out who is missing from a snapshot: such a record would cost about
    10M x (32-byte hash + key overhead), 0.5-1 GB at 10M users, and would drift from TikTok's real membership
    after any crash between an upload and its record, or any change made outside the service;
  - `enabled: false`: nothing is done (exit 0, status "skipped").

`--dry-run` reads and counts only: no TikTok call at all. Exit codes: 0 done (or dry run, or skipped), 1 refused by
the 1,000 rule or failed (TikTok, Kafka), 2 usage or configuration. Reads the same environment as `run`. Counts
only are printed: never an identifier, hashed or raw, nor the token.

Metrics: with `--pushgateway URL` (or REFRESH_PUSHGATEWAY_URL) the run pushes its outcome, counts and times
(service/metrics.py REFRESH_REGISTRY) to that Prometheus Pushgateway once, at its end, whatever the outcome, under
job="audience-sync-refresh" and audience_key=KEY, with POST (a failed run leaves the last success's timestamp in
place). A run stopped before its mappings entry is known (usage, configuration, unknown key) pushes nothing. A
failed push is one warning on stderr: the exit code and the summary stay as they were.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Final, TypeVar
from urllib.error import HTTPError, URLError

import orjson
from confluent_kafka import KafkaException
from prometheus_client import pushadd_to_gateway

from service import metrics as m
from service.config import ConfigError, Settings, TokenSource, check_pushgateway_url, client_config
from service.core.answers import Verdict
from service.core.customer_files import (
    MAX_FILE_BYTES,
    MIN_AUDIENCE_SIZE,
    FileAction,
    FileContract,
    IdentifierFile,
    files_from_hashes,
    plan_refresh,
)
from service.core.mappings import AudienceMapping
from service.core.retry import Backoff
from service.core.snapshots import RAW_FIELDS, CompactedSnapshot, CsvCounts, CsvSnapshot, Row, SnapshotError
from service.kafka.dlq_reader import (
    OneLineParser,
    TopicReader,
    fail,
    headers_of,
    load_current_mappings,
    reader_config,
    tool_settings,
)
from service.tiktok.audiences_api import AudiencesApi, TikTokApiError
from service.tiktok.client import TikTokClient
from service.tiktok.customer_files_api import (
    FILE_GONE,
    FILE_PATHS_MAX,
    CustomerFilesApi,
    FileAudience,
    find_file_audience,
)

PROG = "audience-sync refresh"
STREAM_REFUSAL: Final = (
    "audiences.{key} is mode: stream, a TikTok Segment (Partner) audience fed through segment/mapping, and TikTok "
    "has no REPLACE for those: refresh only replaces customer-file audiences (mode: file). To remove users who left "
    "without an exit event, send exit events (action delete) for them, or move the entry to a customer-file "
    "audience (mode: file with one id_types entry) and refresh that. The service keeps no durable record of what "
    "it sent (at 10M users one would take about 0.5-1 GB and drift from TikTok's state after any crash), so it "
    "cannot work out who is missing from a snapshot."
)

# The Pushgateway grouping key: this job, and the audience key (a mappings entry, so the series are bounded).
PUSH_JOB: Final = "audience-sync-refresh"
PUSH_TIMEOUT_S: Final = 10.0

T = TypeVar("T")


class Stop(Exception):
    """The run ends here: `rc` and a one-line message (already safe to print)."""

    def __init__(self, rc: int, status: str, message: str) -> None:
        super().__init__(message)
        self.rc = rc
        self.status = status


# -- arguments ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Source:
    kind: str  # "csv" or "kafka"
    where: str  # path or topic

    def __str__(self) -> str:
        return f"{self.kind}:{self.where}"


def parse_source(text: str) -> Source:
    """`csv:PATH`, `kafka:TOPIC`, or a path ending in .csv; argparse.ArgumentTypeError otherwise."""
    kind, sep, rest = text.partition(":")
    if sep and kind in ("csv", "kafka"):
        if not rest.strip():
            raise argparse.ArgumentTypeError(f"--from {text!r}: nothing after {kind}:")
        return Source(kind, rest.strip())
    if text.lower().endswith(".csv"):
        return Source("csv", text)
    raise argparse.ArgumentTypeError(f"--from {text!r}: expected csv:PATH, a PATH ending in .csv, or kafka:TOPIC")


def _file_bytes(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--max-file-bytes {text!r}: not an integer") from None
    if not 66 <= value <= MAX_FILE_BYTES:
        raise argparse.ArgumentTypeError(f"--max-file-bytes must be between 66 and {MAX_FILE_BYTES:,}")
    return value


def _pushgateway(text: str) -> str:
    try:
        return check_pushgateway_url(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--pushgateway: {exc}") from None


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--audience-key", required=True, help="the mappings entry to refresh (must be mode: file)")
    p.add_argument(
        "--from",
        dest="source",
        required=True,
        type=parse_source,
        metavar="SOURCE",
        help="csv:PATH, PATH.csv, or kafka:TOPIC (a compacted topic of current memberships)",
    )
    p.add_argument("--dry-run", action="store_true", help="read and count only; no TikTok call")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON document")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (also off when stderr is no TTY)")
    p.add_argument(
        "--idle-timeout",
        type=float,
        default=10.0,
        help="kafka: stop reading a partition that reports no end for this long [10s]",
    )
    p.add_argument(
        "--max-file-bytes",
        type=_file_bytes,
        default=MAX_FILE_BYTES,
        help=f"split files at this size [{MAX_FILE_BYTES:,}, TikTok's 50 MB]",
    )
    p.add_argument(
        "--pushgateway",
        type=_pushgateway,
        metavar="URL",
        help="push the run's metrics to this Prometheus Pushgateway at its end [REFRESH_PUSHGATEWAY_URL; unset: none]",
    )
    return p


# -- summary --------------------------------------------------------------------------------------------------


@dataclass
class Summary:
    """What the run did; `document()` for --json, `table()` for people. Counts and names only."""

    audience_key: str
    source: str
    dry_run: bool
    status: str = "failed"
    mode: str | None = None
    contract: str | None = None
    advertiser_id: str | None = None
    audience_id: str | None = None
    audience_name: str | None = None
    created: bool = False
    read: dict[str, Any] = field(default_factory=dict)
    plan: dict[str, Any] = field(default_factory=dict)
    identifiers: int = 0
    files: int = 0
    file_bytes: int = 0
    uploaded: int = 0
    size_before: int | None = None
    error: str | None = None
    seconds: float = 0.0
    entry_found: bool = False  # the key is a mappings entry: the run began (not in the document)

    def document(self) -> dict[str, Any]:
        return {
            "ok": self.status in ("replaced", "created", "dry_run", "skipped"),
            "status": self.status,
            "audience_key": self.audience_key,
            "source": self.source,
            "dry_run": self.dry_run,
            "mode": self.mode,
            "contract": self.contract,
            "advertiser_id": self.advertiser_id,
            "audience_id": self.audience_id,
            "audience_name": self.audience_name,
            "created": self.created,
            "minimum": MIN_AUDIENCE_SIZE,
            "identifiers": self.identifiers,
            "files": self.files,
            "file_bytes": self.file_bytes,
            "files_uploaded": self.uploaded,
            "cover_num_before": self.size_before,
            "read": self.read,
            "plan": self.plan,
            "error": self.error,
            "seconds": round(self.seconds, 3),
        }

    def table(self) -> str:
        rows: list[tuple[str, object]] = [("status", self.status)]
        if self.contract:
            rows.append(("contract", self.contract))
        rows.append(("advertiser", self.advertiser_id or "-"))
        audience = self.audience_id or (f'"{self.audience_name}" (to create)' if self.audience_name else "-")
        rows.append(("audience", audience + (" (created)" if self.created else "")))
        if self.read.get("columns"):
            rows.append(("read: columns used", ", ".join(self.read["columns"])))
        if self.read.get("ignored_columns"):
            rows.append(("read: columns ignored", ", ".join(self.read["ignored_columns"])))
        for name, value in self.read.items():
            if isinstance(value, int):
                rows.append((f"read: {name}", value))
            elif isinstance(value, dict) and value and all(isinstance(v, int) for v in value.values()):
                rows += [(f"read: {name}: {k}", v) for k, v in value.items()]
        if self.plan:
            rows.append(("snapshot users", self.plan.get("users", 0)))
            rows.append(("  without an identifier of the contract", self.plan.get("users_without_identifier", 0)))
            for counts in self.plan.get("contracts", {}).values():
                rows.append(("  duplicates", counts["duplicates"]))
                rows.append(("  invalid", counts["invalid"]))
                rows += [(f"    invalid: {r}", n) for r, n in counts["invalid_by_reason"].items()]
        rows.append((f"distinct identifiers (minimum {MIN_AUDIENCE_SIZE:,})", self.identifiers))
        verb = "would upload" if self.dry_run else "uploaded"
        rows.append((f"files ({verb})", f"{self.uploaded if not self.dry_run else self.files}/{self.files}"))
        rows.append(("file bytes", self.file_bytes))
        if self.size_before is not None:
            rows.append(("TikTok cover_num before", self.size_before))
        rows.append(("seconds", f"{self.seconds:.1f}"))
        width = max(len(n) for n, _ in rows)
        title = f"refresh of {self.audience_key} from {self.source}{' (dry run)' if self.dry_run else ''}"
        lines = [title] + [f"  {n:<{width}}  {v!s:>12}" for n, v in rows]
        if self.error:
            lines.append(f"  stopped: {self.error}")
        return "\n".join(lines)


class Progress:
    """tqdm bars on stderr, only for a person watching (a TTY) and not with --no-progress."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and sys.stderr.isatty()

    def wrap(self, items: Iterable[T], desc: str, unit: str, total: int | None = None) -> Iterator[T]:
        if not self.enabled:
            yield from items
            return
        from tqdm import tqdm

        with tqdm(desc=desc, unit=unit, total=total, file=sys.stderr, dynamic_ncols=True, unit_scale=True) as bar:
            for item in items:
                bar.update()
                yield item


# -- reading the snapshot -------------------------------------------------------------------------------------


def fields_for(contract: FileContract) -> tuple[str, ...]:
    """The canonical event's identifier fields that feed `contract`."""
    return tuple(f for f, c in RAW_FIELDS.items() if c == contract and f != "gaid")


def read_csv(path: Path, contract: FileContract, progress: Progress) -> tuple[Iterator[Row], CsvCounts]:
    try:
        handle = path.open(encoding="utf-8-sig", errors="replace", newline="")
    except OSError as exc:
        raise Stop(2, "failed", f"--from csv:{path}: cannot read: {exc.strerror or exc}") from None
    try:
        snap = CsvSnapshot(handle, [contract])
    except SnapshotError as exc:
        handle.close()
        raise Stop(2, "failed", f"--from csv:{path}: {exc}") from None

    def rows() -> Iterator[Row]:
        with handle:
            yield from progress.wrap(snap, "read csv", "row")

    return rows(), snap.counts


def read_kafka(
    settings: Settings, environ: Mapping[str, str], topic: str, key: str, contract: FileContract, args: Any
) -> tuple[list[Row], dict[str, Any]]:
    snap = CompactedSnapshot(key, fields_for(contract))
    reader = TopicReader(
        reader_config(settings, environ, None), topic, from_committed=False, idle_timeout_s=args.idle_timeout
    )
    progress = Progress(not args.no_progress)
    try:
        for batch in progress.wrap(reader.messages(), f"read {topic}", "batch"):
            for msg in batch:
                snap.add(msg.key(), msg.value(), headers_of(msg))
        unfinished = len(reader.partitions) - len(reader.ended)
    finally:
        reader.close()
    if unfinished:
        raise Stop(
            1,
            "failed",
            f"kafka:{topic}: {unfinished} partition(s) reported no end within --idle-timeout "
            f"{args.idle_timeout:g}s; a partial snapshot would remove members, so nothing was sent",
        )
    counts = snap.counts
    return list(snap.rows()), counts.document()


# -- TikTok ---------------------------------------------------------------------------------------------------


async def _retrying(call: Callable[[], Awaitable[T]], backoff: Backoff, what: str) -> T:
    """`call`, again after a transient refusal (RETRY verdict) within the retry budget; else its error."""
    first: float | None = None
    attempt = 0
    while True:
        try:
            return await call()
        except TikTokApiError as exc:
            if exc.verdict is not Verdict.RETRY or exc.code in FILE_GONE:
                raise
            now = time.monotonic()
            first = now if first is None else first
            attempt += 1
            delay = backoff.delay(attempt, exc.answer.retry_after_s)
            if backoff.exhausted(first, now, delay):
                raise
            print(f"{PROG}: {what}: {exc.one_line()}; retrying in {delay:.1f}s", file=sys.stderr)
            await asyncio.sleep(delay)


class Applier:
    """The write half of a run: upload the files, then REPLACE (or create from them)."""

    def __init__(
        self,
        settings: Settings,
        environ: Mapping[str, str],
        client: TikTokClient,
        summary: Summary,
        progress: Progress,
    ) -> None:
        self.settings = settings
        self.environ = environ
        self.files_api = CustomerFilesApi(client)
        self.audiences_api = AudiencesApi(client)
        self.backoff = Backoff(settings.retry_base_s, settings.retry_max_s, settings.retry_budget_s, random.Random())
        self.summary = summary
        self.progress = progress

    async def check_audience(self, advertiser: str, audience_id: str, contract: FileContract) -> FileAudience:
        """Before uploading: the audience exists, is a customer-file audience, and holds this contract."""
        got = await _retrying(lambda: self.files_api.get(advertiser, [audience_id]), self.backoff, "reading audience")
        found = next((a for a in got if a.audience_id == audience_id), None)
        if found is None:
            raise Stop(1, "failed", f"audience {audience_id} not found for advertiser {advertiser}")
        if not found.is_customer_file:
            raise Stop(
                2,
                "failed",
                f"audience {audience_id} is a {found.audience_type or 'non-file'} audience, not a customer-file "
                "audience: REPLACE works only on customer-file audiences (point audience_id at one, or drop it "
                "and set create_if_missing: true)",
            )
        if found.calculate_type != contract:
            raise Stop(
                2,
                "failed",
                f"audience {audience_id} holds {found.calculate_type}, the entry's id_types give {contract}: "
                "an audience keeps one calculate_type; fix id_types or audience_id",
            )
        return found

    async def upload(self, advertiser: str, files: Sequence[IdentifierFile]) -> list[str]:
        paths: list[str] = []
        for f in self.progress.wrap(files, "upload", "file", total=len(files)):
            done = await _retrying(partial(self.files_api.upload, advertiser, f), self.backoff, f"uploading {f.name}")
            paths.append(done.file_path)
            self.summary.uploaded += 1
        return paths

    async def replace(self, advertiser: str, audience_id: str, files: Sequence[IdentifierFile]) -> None:
        paths = await self.upload(advertiser, files)
        try:
            await self._update(advertiser, audience_id, paths)
        except TikTokApiError as exc:
            if exc.code not in FILE_GONE:
                raise
            self.summary.uploaded = 0  # the paths expired before the update: upload once more
            await self._update(advertiser, audience_id, await self.upload(advertiser, files))

    async def _update(self, advertiser: str, audience_id: str, paths: list[str]) -> None:
        await _retrying(
            lambda: self.files_api.update(advertiser, audience_id, paths, FileAction.REPLACE),
            self.backoff,
            "replacing the audience",
        )

    async def create_or_replace(
        self, advertiser: str, name: str, contract: FileContract, files: Sequence[IdentifierFile]
    ) -> tuple[str, bool]:
        """An entry without audience_id: the id the audience store knows (REPLACE it), else create the audience
        from the files as the claim holder and record the id, as the service does (service/kafka/audience_store.py).
        """
        from service.kafka.audience_store import AudienceStore

        store = AudienceStore(client_config(self.settings, self.environ), self.settings.audience_store)
        ref = (advertiser, name)
        try:
            await store.start()
            known = store.ids.get(ref)
            if known is not None:
                self.summary.size_before = (await self.check_audience(advertiser, known, contract)).cover_num
                await self.replace(advertiser, known, files)
                return known, False
            paths = await self.upload(advertiser, files)  # before claiming: uploads may outlast a claim
            for _ in range(3):
                if await store.claim(ref):
                    existing = await self._existing(advertiser, name, contract)
                    if existing is not None:  # created earlier, never recorded (a crash): reuse it
                        await self._update(advertiser, existing, paths)
                        await store.publish(ref, existing)
                        return existing, False
                    audience_id = await _retrying(
                        lambda: self.files_api.create(advertiser, name, contract, paths),
                        self.backoff,
                        "creating the audience",
                    )
                    await store.publish(ref, audience_id)
                    return audience_id, True
                other = await store.wait_for_holder(ref, store.claim_ttl_s)
                if other is not None:
                    await self.check_audience(advertiser, other, contract)
                    await self._update(advertiser, other, paths)
                    return other, False
            raise Stop(1, "failed", f"could not claim the creation of audience {name!r}: another process holds it")
        finally:
            await asyncio.to_thread(store.close)

    async def _existing(self, advertiser: str, name: str, contract: FileContract) -> str | None:
        return await _retrying(
            lambda: find_file_audience(self.files_api, self.audiences_api, advertiser, name, contract),
            self.backoff,
            "looking for an existing audience",
        )


async def apply(
    settings: Settings,
    environ: Mapping[str, str],
    entry: AudienceMapping,
    advertiser: str,
    contract: FileContract,
    files: Sequence[IdentifierFile],
    summary: Summary,
    progress: Progress,
) -> None:
    import aiohttp

    token = TokenSource(settings)
    async with aiohttp.ClientSession() as session:
        client = TikTokClient(session, settings.tiktok_api_url, token.get, timeout_s=settings.tiktok_timeout_s)
        applier = Applier(settings, environ, client, summary, progress)
        if entry.audience_id is not None:
            before = await applier.check_audience(advertiser, entry.audience_id, contract)
            summary.size_before = before.cover_num
            await applier.replace(advertiser, entry.audience_id, files)
            summary.status = "replaced"
            return
        name = entry.effective_audience_name
        assert name is not None  # parse_mappings: no audience_id means create_if_missing, named
        audience_id, created = await applier.create_or_replace(advertiser, name, contract, files)
        summary.audience_id = audience_id
        summary.created = created
        summary.status = "created" if created else "replaced"


# -- the run --------------------------------------------------------------------------------------------------


def _entry(settings: Settings, key: str) -> AudienceMapping:
    if settings.mappings_file is None:
        raise Stop(2, "failed", "MAPPINGS_FILE is not set: refresh replaces the audience of a mappings entry")
    entry = load_current_mappings(settings).get(key)
    if entry is None:
        raise Stop(2, "failed", f"no entry audiences.{key} in MAPPINGS_FILE {settings.mappings_file}")
    return entry


def refresh(settings: Settings, environ: Mapping[str, str], args: Any, summary: Summary, progress: Progress) -> int:
    key: str = args.audience_key
    entry = _entry(settings, key)
    summary.entry_found = True
    summary.mode = entry.mode
    if not entry.is_file:
        raise Stop(2, "refused", STREAM_REFUSAL.format(key=key))
    contract = entry.contract
    assert contract is not None
    summary.contract = contract
    summary.advertiser_id = advertiser = entry.advertiser_id or settings.default_advertiser_id
    summary.audience_id = entry.audience_id
    summary.audience_name = entry.effective_audience_name
    if not entry.enabled:
        summary.status = "skipped"
        summary.error = f"audiences.{key} is enabled: false: nothing done"
        return 0
    if advertiser is None:
        raise Stop(2, "failed", f"audiences.{key} has no advertiser_id and DEFAULT_ADVERTISER_ID is not set")

    source: Source = args.source
    region = entry.effective_phone_region(settings.phone_default_region)
    if source.kind == "csv":
        rows, csv_counts = read_csv(Path(source.where), contract, progress)
        plan = plan_refresh(rows, contracts=[contract], phone_region=region)
        summary.read = csv_counts.document()
    else:
        members, summary.read = read_kafka(settings, environ, source.where, key, contract, args)
        plan = plan_refresh(members, contracts=[contract], phone_region=region)
    summary.plan = plan.summary()
    summary.identifiers = plan.size(contract)

    refusal = plan.check_minimum(contract)
    if refusal is not None:
        raise Stop(1, "refused", f"{refusal}; nothing was sent")
    files = files_from_hashes(plan.hashed[contract], contract, stem=key, max_bytes=args.max_file_bytes)
    summary.files = len(files)
    summary.file_bytes = sum(f.size for f in files)
    if len(files) > FILE_PATHS_MAX:
        raise Stop(1, "failed", f"{len(files)} files, TikTok takes at most {FILE_PATHS_MAX} in one REPLACE")
    if args.dry_run:
        summary.status = "dry_run"
        return 0
    asyncio.run(apply(settings, environ, entry, advertiser, contract, files, summary, progress))
    return 0


# -- metrics --------------------------------------------------------------------------------------------------


def push_metrics(url: str, summary: Summary, ended: float | None = None) -> str | None:
    """Push the run's metrics to the Pushgateway at `url`: POST (`pushadd_to_gateway`), which replaces only the
    families sent, under job=PUSH_JOB and audience_key. The last-success timestamp goes only with a success, so a
    failed run keeps the previous one. None once pushed, else why not in one line, safe to print (counts and times
    only; the labels are the audience key and the status)."""
    now = time.time() if ended is None else ended
    succeeded = summary.status in m.REFRESH_SUCCEEDED
    m.REFRESH_LAST_RUN.set(now)
    if succeeded:
        m.REFRESH_LAST_SUCCESS.set(now)
    m.REFRESH_LAST_STATUS.clear()
    m.REFRESH_LAST_STATUS.labels(status=summary.status).set(1)
    m.REFRESH_DURATION.set(summary.seconds)
    m.REFRESH_IDENTIFIERS.set(summary.identifiers)
    m.REFRESH_FILES_UPLOADED.set(summary.uploaded)
    users = summary.plan.get("users", 0)
    m.REFRESH_SNAPSHOT_USERS.set(users if isinstance(users, int) else 0)
    try:
        pushadd_to_gateway(
            url,
            job=PUSH_JOB,
            registry=m.refresh_push_collector(succeeded=succeeded),
            grouping_key={"audience_key": summary.audience_key},
            timeout=PUSH_TIMEOUT_S,
        )
    except HTTPError as exc:
        body = exc.read(300).decode("utf-8", "replace") if exc.fp is not None else ""
        return " ".join(f"HTTP {exc.code} {exc.reason} {body}".split())[:300]
    except URLError as exc:
        return str(exc.reason)
    except Exception as exc:  # whatever the push met, the run's outcome stands
        return f"{type(exc).__name__}: {exc}"[:300]
    return None


def _push(url: str | None, summary: Summary) -> None:
    """Push once the run began (its key is a mappings entry); a failure is one warning, nothing else changes."""
    if url is None or not summary.entry_found:
        return
    problem = push_metrics(url, summary)
    if problem is not None:
        print(f"{PROG}: warning: metrics not pushed to the Pushgateway at {url}: {problem}", file=sys.stderr)


def main(argv: list[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.idle_timeout <= 0:
        return fail(PROG, "--idle-timeout must be positive")
    env = os.environ if environ is None else environ
    started = time.monotonic()
    summary = Summary(args.audience_key, str(args.source), args.dry_run)
    progress = Progress(not args.no_progress)
    pushgateway: str | None = args.pushgateway
    try:
        settings = tool_settings(env, need_token=not args.dry_run)
        pushgateway = pushgateway or settings.refresh_pushgateway_url
        rc = refresh(settings, env, args, summary, progress)
    except ConfigError as exc:
        return fail(PROG, str(exc))
    except Stop as stop:
        summary.status = stop.status
        summary.error = str(stop)
        rc = stop.rc
    except TikTokApiError as exc:
        summary.status = "failed"
        summary.error = exc.one_line()
        rc = 1
    except KafkaException as exc:
        summary.status = "failed"
        summary.error = f"Kafka error: {exc}"
        rc = 1
    except TimeoutError as exc:  # the audience store did not catch up
        summary.status = "failed"
        summary.error = f"timed out: {exc}"
        rc = 1
    except Exception:  # unforeseen: still a failed run on the Pushgateway, then the traceback as before
        summary.status = "failed"
        summary.seconds = time.monotonic() - started
        _push(pushgateway, summary)
        raise
    summary.seconds = time.monotonic() - started
    sys.stdout.write((orjson.dumps(summary.document()).decode() if args.json else summary.table()) + "\n")
    if summary.error:
        print(f"{PROG}: {summary.error}", file=sys.stderr)
    _push(pushgateway, summary)
    return rc
