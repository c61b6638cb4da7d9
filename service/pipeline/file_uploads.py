"""File audiences at TikTok: a cut `FileBatch` becomes identifier files, then APPEND / REMOVE updates (or the
customer-file create), then an outcome per record (docs/tiktok-api.md §3, §8.3).

Invariants (tests/pipeline/test_file_uploads.py, tests/integration/test_file_audiences.py):
- a record is finished (its offset may be committed) only after TikTok accepted every update its users need;
  it is dead-lettered when one of them was refused for good or its retry budget ran out; it is dropped when
  its partition was revoked (the new owner consumes it again);
- the revocation fence: immediately before each update or create request starts (no await between the check and
  the request), every record of the batch is live; otherwise the batch is netted again from its live records and
  its files rebuilt, so after a revoke returns no request carries a user whose change only a revoked record made;
- every batch ends: its key is released in `finally` (the next batch of that audience may go), and an
  unexpected exception dead-letters its live records (`retries_exhausted`) rather than stranding them;
- every upload, update and create spends a token of the data-plane bucket shared with `segment/mapping`; an auth
  or endpoint outage closes the shared gate and waits for it without spending the retry budget.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from service import metrics as m
from service.core.answers import Verdict
from service.core.customer_files import (
    MAX_FILE_BYTES,
    Accepted,
    FileAction,
    FileContract,
    NetBatch,
    files_from_hashes,
)
from service.core.dead_letters import DeadLetter
from service.core.file_batcher import FileBatch, FileBatcher, FileRow, net_rows
from service.core.model import DlqReason
from service.core.retry import Backoff, TokenBucket
from service.pipeline.audience_creation import AudienceCreator, CreationFailed, describe
from service.pipeline.gate import UploadGate
from service.pipeline.tasks import Tasks
from service.tiktok.audiences_api import TikTokApiError
from service.tiktok.customer_files_api import FILE_GONE, CustomerFilesApi, find_file_audience

log = logging.getLogger(__name__)

_RECHECK_S = 5.0  # how often buffers waiting for their audience's creation look for an id recorded meanwhile

_FINAL: Mapping[Verdict, DlqReason] = {
    Verdict.NOT_FOUND: DlqReason.MISSING_AUDIENCE_ID,
    Verdict.PERMISSION: DlqReason.TIKTOK_PERMISSION,
}


class FileOutcomes(Protocol):
    """The pipeline's side: liveness from the ledger, finishing records, writing dead letters."""

    def is_live(self, row: FileRow) -> bool: ...

    def uploaded(self, rows: list[FileRow]) -> None: ...

    def dead_letter(self, source: Any, letter: DeadLetter) -> Awaitable[None]: ...


@dataclass(frozen=True, slots=True)
class _Refusal:
    reason: DlqReason
    error: str
    code: int | None = None
    request_id: str | None = None


@dataclass(slots=True)
class _Progress:
    """One batch on its way: the updates TikTok accepted or refused so far, and the uploaded files per update."""

    net: NetBatch[FileRow]
    accepted: set[Accepted] = field(default_factory=set)
    refused: dict[Accepted, _Refusal] = field(default_factory=dict)
    paths: dict[Accepted, tuple[frozenset[str], list[str]]] = field(default_factory=dict)
    first_failure: float | None = None
    attempt: int = 0

    def next_update(self) -> tuple[FileContract, FileAction, frozenset[str]] | None:
        for contract, action, ids in self.net.updates():
            if (contract, action) not in self.accepted and (contract, action) not in self.refused:
                return contract, action, ids
        return None

    def refuse_all(self, refusal: _Refusal) -> None:
        for contract, action, _ in self.net.updates():
            self.refused.setdefault((contract, action), refusal)


class FileUploads:
    """Applies file batches, one per audience at a time (the batcher holds the key until `done`)."""

    def __init__(
        self,
        *,
        batcher: FileBatcher,
        api: CustomerFilesApi,
        outcomes: FileOutcomes,
        gate: UploadGate,
        backoff: Backoff,
        bucket: TokenBucket,
        creator: AudienceCreator | None,
        pressure: Callable[[], bool],
        clock: Callable[[], float],
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        max_file_bytes: int = MAX_FILE_BYTES,
    ) -> None:
        self.batcher = batcher
        self.api = api
        self.outcomes = outcomes
        self.gate = gate
        self.backoff = backoff
        self.bucket = bucket
        self.creator = creator
        self._pressure = pressure
        self._clock = clock
        self._sleep = sleep
        self.max_file_bytes = max_file_bytes
        self.force = 0  # > 0 while a drain or revoke wants every buffer cut now
        self._store_asked = False
        self._wake = asyncio.Event()
        self._tasks = Tasks("file-upload")

    # -- dispatch -------------------------------------------------------------------------------------------

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        """Sleep until a buffer's interval runs out or something changed; start every batch that is ready."""
        while True:
            deadline = self.batcher.next_deadline()
            timeout = None if deadline is None else max(0.0, deadline - self._clock()) + 0.001
            if self.batcher.waiting_for_users():  # the store may learn their audience's id: look again soon
                timeout = min(timeout, _RECHECK_S) if timeout is not None else _RECHECK_S
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancel that arrives as the wait
            # ends (CPython gh-86296), and this loop would then outlive the pipeline it dispatches for.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()
            self._wake.clear()
            self.dispatch()

    def dispatch(self) -> None:
        m.FILE_PENDING_USERS.set(self.batcher.pending_users)
        waiting = self.batcher.waiting_for_users()
        m.FILE_WAITING_AUDIENCES.set(len(waiting))
        if waiting and self.creator is not None and not self._store_asked:
            self._store_asked = True  # an earlier run may have created them: read the store's record once
            self._tasks.spawn(self._read_store())
        if not self.gate.is_open:
            return
        for batch in self.batcher.ready(force=self.force > 0, pressure=self._pressure()):
            self._tasks.spawn(self._apply(batch))

    async def close(self) -> None:
        await self._tasks.close()

    async def _read_store(self) -> None:
        """Start the audience store (it starts on first use) so that ids recorded by earlier runs are known."""
        assert self.creator is not None
        try:
            await self.creator.store.ensure_started()
        except Exception as exc:
            log.warning("audience store not readable yet (%s); file audiences to create keep waiting", describe(exc))
            await self._sleep(5.0)
            self._store_asked = False
        self._wake.set()

    # -- one batch to its outcome ---------------------------------------------------------------------------

    async def _apply(self, batch: FileBatch) -> None:
        progress = _Progress(self._live(batch.net, batch))
        try:
            if batch.audience_id is None:
                await self._create(batch, progress)
            while (todo := progress.next_update()) is not None:
                await self._update(batch, progress, *todo)
            await self._settle(progress)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a defect of ours must not strand the batch's records uncommitted forever
            log.exception("file upload of batch %d failed unexpectedly; dead-lettering its records", batch.id)
            progress.refuse_all(_Refusal(DlqReason.RETRIES_EXHAUSTED, f"internal: {type(exc).__name__}"))
            progress.accepted.clear()
            await self._settle(progress)
        finally:
            self.batcher.done(batch.key, batch.audience_id, batch.audience_name)
            self._wake.set()

    async def _update(
        self, batch: FileBatch, progress: _Progress, contract: FileContract, action: FileAction, ids: frozenset[str]
    ) -> None:
        """One APPEND or REMOVE: upload its files, then the update, fenced; a failure is classified."""
        key = (contract, action)
        assert batch.audience_id is not None
        try:
            paths = await self._files(batch, progress, key, ids)
            await self._token()
            if not self._all_live(progress.net):  # the fence: from here to the request there is no await
                self._renet(batch, progress)
                return
            await self.api.update(batch.advertiser_id, batch.audience_id, paths, action, paced=False)
        except TikTokApiError as exc:
            await self._failed(exc, progress, key, action.value)
            return
        self.gate.open()
        progress.accepted.add(key)
        progress.first_failure, progress.attempt = None, 0
        m.FILE_UPDATES.labels(action.value, "accepted").inc()

    async def _create(self, batch: FileBatch, progress: _Progress) -> None:
        """An audience created on demand: its id if recorded, else created from this batch's APPEND files by the
        claim holder (service/pipeline/audience_creation.py), else the holder's, else the failure for all."""
        name = batch.audience_name
        if self.creator is None or name is None:
            progress.refuse_all(
                _Refusal(
                    DlqReason.MISSING_AUDIENCE_ID,
                    f'no TikTok audience id for file audience "{batch.audience_key}" and no audience store to '
                    "create it: set audience_id in the mappings file, then replay",
                )
            )
            return
        advertiser, contract = batch.advertiser_id, batch.contract
        append_key = (contract, FileAction.APPEND)
        created = False

        async def make() -> str:
            nonlocal created
            assert self.creator is not None and name is not None
            existing = await find_file_audience(self.api, self.creator.api, advertiser, name, contract)
            if existing is not None:
                return existing
            ids = progress.net.append.get(contract, frozenset())
            paths = await self._files(batch, progress, append_key, ids)
            await self._token()
            await self.api.control_turn()  # a create is a control-plane call: its turn comes before the fence
            if not self._all_live(progress.net):  # the fence, as for updates: created from live records only
                self._renet(batch, progress)
                raise _Stale  # the creator tries again, with files of the live records
            audience_id = await self.api.create(advertiser, name, contract, paths, paced=False)
            created = True
            return audience_id

        result = await self.creator.ensure((advertiser, name), make)
        if isinstance(result, CreationFailed):
            m.FILE_UPDATES.labels("CREATE", "refused").inc()
            progress.refuse_all(_Refusal(result.reason, result.error, result.code, result.request_id))
            return
        batch.audience_id = result
        if created:
            m.FILE_UPDATES.labels("CREATE", "accepted").inc()
            # The new audience holds exactly the APPEND set; the REMOVE set is disjoint from it: nothing to remove.
            progress.accepted.update({append_key, (contract, FileAction.REMOVE)})

    async def _files(self, batch: FileBatch, progress: _Progress, key: Accepted, ids: frozenset[str]) -> list[str]:
        """Paths of uploaded files holding exactly `ids` (uploaded once per netted set, again if TikTok lost them)."""
        cached = progress.paths.get(key)
        if cached is not None and cached[0] is ids:
            return cached[1]
        files = files_from_hashes(ids, key[0], stem=batch.audience_key, max_bytes=self.max_file_bytes)
        paths: list[str] = []
        for file in files:
            await self._token()
            try:
                uploaded = await self.api.upload(batch.advertiser_id, file)
            except TikTokApiError:
                m.FILE_UPLOADS.labels("failed").inc()
                raise
            m.FILE_UPLOADS.labels("uploaded").inc()
            m.FILE_ROWS.observe(file.rows)
            paths.append(uploaded.file_path)
        progress.paths[key] = (ids, paths)
        return paths

    async def _token(self) -> None:
        while (wait := self.bucket.acquire()) > 0:
            m.RATE_LIMIT_WAIT.inc(wait)
            await self._sleep(wait)

    async def _failed(self, exc: TikTokApiError, progress: _Progress, key: Accepted, label: str) -> None:
        """A refused upload or update: wait out an outage, retry within the budget, or refuse for good."""
        answer, verdict = exc.answer, exc.verdict
        if verdict in (Verdict.AUTH, Verdict.ENDPOINT):
            self.gate.close("auth" if verdict is Verdict.AUTH else "endpoint", answer)
            await self.gate.wait_turn()  # no retry budget is spent waiting for a token or the right URL
            return
        if verdict is Verdict.RETRY or exc.code in FILE_GONE:
            if exc.code in FILE_GONE:
                progress.paths.pop(key, None)  # the upload expired before the update: upload again
            now = self._clock()
            first = progress.first_failure if progress.first_failure is not None else now
            progress.first_failure = first
            progress.attempt += 1
            delay = self.backoff.delay(progress.attempt, answer.retry_after_s)
            if not self.backoff.exhausted(first, now, delay):
                m.FILE_UPDATES.labels(label, "retried").inc()
                m.RETRIES.labels("rate_limited" if answer.rate_limited else "file").inc()
                if answer.rate_limited:
                    self.bucket.throttled()
                log.warning("file audience %s: %s; retrying in %.1fs", label, exc.one_line(), delay)
                await self._sleep(delay)
                return
            reason, note = DlqReason.RETRIES_EXHAUSTED, "retry budget spent without an accepted update"
        else:
            reason = _FINAL.get(verdict, DlqReason.TIKTOK_REJECTED)
            note = _NOTES.get(reason, "TikTok refused the file-audience update")
        m.FILE_UPDATES.labels(label, "refused").inc()
        log.error("file audience %s refused: %s", label, exc.one_line())
        progress.refused[key] = _Refusal(reason, f"{note} ({exc.one_line()})", exc.code, answer.request_id)

    # -- liveness -------------------------------------------------------------------------------------------

    def _all_live(self, net: NetBatch[FileRow]) -> bool:
        is_live = self.outcomes.is_live
        return all(is_live(r) for r in net.handles)

    def _live(self, net: NetBatch[FileRow], batch: FileBatch) -> NetBatch[FileRow]:
        """`net`, or the batch its live records alone make when some were revoked."""
        if self._all_live(net):
            return net
        return net_rows(batch.contract, [r for r in net.handles if self.outcomes.is_live(r)])

    def _renet(self, batch: FileBatch, progress: _Progress) -> None:
        """Records were revoked under the batch: net the live ones again; their files are rebuilt."""
        progress.net = self._live(progress.net, batch)
        progress.paths.clear()
        log.info("file audience %s: records revoked mid-upload; netted again from the live ones", batch.audience_key)

    # -- outcomes -------------------------------------------------------------------------------------------

    async def _settle(self, progress: _Progress) -> None:
        """Finish every live record whose updates were all accepted; dead-letter the others with the refusal."""
        net, accepted, is_live = progress.net, progress.accepted, self.outcomes.is_live
        done: list[FileRow] = []
        letters: list[Awaitable[None]] = []
        for row, need in zip(net.handles, net.needs, strict=True):
            if not is_live(row):
                continue  # revoked: the new owner consumes it again
            if need <= accepted:
                done.append(row)
                continue
            refusal = next((progress.refused[k] for k in sorted(need - accepted) if k in progress.refused), None)
            if refusal is None:  # cannot happen: every update ends accepted or refused
                refusal = _Refusal(DlqReason.RETRIES_EXHAUSTED, "internal: file update without an outcome")
            letter = DeadLetter(refusal.reason, refusal.error, 1, refusal.code, refusal.request_id)
            letters.append(self.outcomes.dead_letter(row.source, letter))
        if done:
            self.outcomes.uploaded(done)
        if letters:
            await asyncio.gather(*letters)


class _Stale(Exception):
    """Records were revoked while the audience was being created: try again with the live ones."""

    def __str__(self) -> str:
        return "records revoked before the create request; netted again"


_NOTES: Mapping[DlqReason, str] = {
    DlqReason.MISSING_AUDIENCE_ID: "TikTok says the file audience does not exist (deleted, or a wrong id in the "
    "mappings file)",
    DlqReason.TIKTOK_PERMISSION: "TikTok denied access to the advertiser or audience",
    DlqReason.TIKTOK_REJECTED: "TikTok refused the file-audience update (a REMOVE or APPEND leaving fewer than "
    "1,000 users, or a file it would not take)",
}
