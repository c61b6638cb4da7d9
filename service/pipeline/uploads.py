"""Upload scheduling: buffered rows become requests, and every request ends in a final outcome per row.

Decisions come from the pure policy (`service.core.upload_policy.decide`); this class only carries them out:
it cuts batches when the batcher says they are ready, spends the token bucket and the in-flight slots, sends,
and re-queues halves, per-audience parts and retries.

Invariants (tests/pipeline/test_uploads.py and the model-based suite):
- a row is sent only while its record is live, checked immediately before each request starts with no await
  in between: after a revoke returns, no request carries rows of the revoked partitions;
- every row of every batch ends exactly once: uploaded, dead-lettered, or dropped because its record stopped
  being live (its partition will be re-consumed); an unexpected exception ends in dead letters
  (`retries_exhausted`), never in a stranded batch whose cells stay "in flight" forever;
- at most `max_inflight` requests are open at once, at the token bucket's rate;
- while a batch key backs off, its buffer is held (no new requests to the failing advertiser); other keys flow.

What is sent where is the `Sink`'s: `AudienceSink` (the default: `segment/mapping` bodies from a `Batcher`) or
`OfflineSink` (`/event/track/` bodies from an `OfflineBatcher`, service/core/offline_batcher.py). Both buffers offer
what `Buffering` names; the policy, the limiter, the gate and the outcome bookkeeping are the same for both.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Container, Iterable, Sequence
from typing import Any, Protocol, cast

from service import metrics as m
from service.core.answers import Answer, Verdict
from service.core.batcher import Batch, Row, SplitBudget
from service.core.dead_letters import DeadLetter
from service.core.model import DlqReason
from service.core.offline import MAX_EVENTS_PER_REQUEST, event_track_body
from service.core.retry import Backoff, TokenBucket
from service.core.upload_policy import (
    QUOTA_SUSPECT_S,
    BatchFacts,
    Done,
    RetryAfter,
    Split,
    SplitByAudience,
    WaitForGate,
    bisection_budget,
    decide,
)
from service.core.upload_policy import (
    DeadLetter as DeadLetterDecision,
)
from service.pipeline.gate import UploadGate
from service.pipeline.tasks import Tasks
from service.tiktok.payloads import mapping_body

log = logging.getLogger(__name__)


class Uploader(Protocol):
    async def post_mapping(self, body: bytes) -> Answer: ...


class EventUploader(Protocol):
    async def post_event_track(self, body: bytes) -> Answer: ...


class BatchLike(Protocol):
    """A cut batch (`Batch`, `OfflineBatch`): rows leave it only through the scheduler."""

    id: int
    key: Any
    rows: list[Any]
    trigger: str
    attempts: int
    budget: SplitBudget | None

    def part(self, rows: list[Any], budget: SplitBudget | None) -> Any: ...


class Buffering(Protocol):
    """What the scheduler uses of a batcher (`Batcher`, `OfflineBatcher`)."""

    max_rows: int
    pending_rows: int

    def ready(
        self,
        *,
        limit: int | None = None,
        force: bool = False,
        hold: Container[Any] = (),
        max_rows: int | None = None,
        eager: bool = False,
    ) -> Sequence[BatchLike]: ...

    def has_ready(self, *, force: bool = False, hold: Container[Any] = (), eager: bool = False) -> bool: ...

    def next_deadline(self, hold: Container[Any] = ()) -> float | None: ...

    def release(self, rows: Iterable[Any]) -> None: ...

    def drop_partitions(self, tps: Iterable[Any]) -> int: ...


class Sink(Protocol):
    """Where batches go: the request body, the call, how a refused batch is split, the metric label."""

    def label(self, batch: Any) -> str: ...

    def body(self, batch: Any) -> bytes: ...

    def post(self, body: bytes) -> Awaitable[Answer]: ...

    def audiences(self, batch: Any) -> int: ...

    def by_audience(self, rows: list[Any]) -> list[list[Any]]: ...

    def recently_created(self, batch: Any) -> bool: ...

    def reason(self, reason: DlqReason) -> DlqReason: ...

    def dead_lettered(self, rows: list[Any]) -> None: ...


class AudienceSink:
    """`segment/mapping` uploads of `Batcher` batches (docs/tiktok-api.md §1.4)."""

    def __init__(self, uploader: Uploader, recently_created: Callable[[Batch], bool]) -> None:
        self.uploader = uploader
        self._recently_created = recently_created

    def label(self, batch: Batch) -> str:
        return batch.action.value

    def body(self, batch: Batch) -> bytes:
        return mapping_body(batch.advertiser_id, batch.action, batch.id_schema, batch.rows)

    def post(self, body: bytes) -> Awaitable[Answer]:
        return self.uploader.post_mapping(body)

    def audiences(self, batch: Batch) -> int:
        return len({r.change.audience_id for r in batch.rows})

    def by_audience(self, rows: list[Row]) -> list[list[Row]]:
        return _by_audience(rows)

    def recently_created(self, batch: Batch) -> bool:
        return self._recently_created(batch)

    def reason(self, reason: DlqReason) -> DlqReason:
        return reason

    def dead_lettered(self, rows: list[Row]) -> None:
        pass  # counted by reason by the dead-letter writer


class OfflineSink:
    """`/event/track/` uploads of `OfflineBatcher` batches (docs/tiktok-api.md §8.4).

    One event set per batch, so a refusal is always bisected (one bad event fails the whole request); "does not
    exist" means the event set (`missing_event_set_id`: fix the mappings file, replay); no warm-up.
    """

    def __init__(self, uploader: EventUploader, *, partner_name: str | None = None) -> None:
        self.uploader = uploader
        self.partner_name = partner_name

    def label(self, batch: Any) -> str:
        return "offline"

    def body(self, batch: Any) -> bytes:
        return event_track_body(batch.key, [r.event for r in batch.rows], partner_name=self.partner_name)

    def post(self, body: bytes) -> Awaitable[Answer]:
        return self.uploader.post_event_track(body)

    def audiences(self, batch: Any) -> int:
        return 1

    def by_audience(self, rows: list[Any]) -> list[list[Any]]:
        return [rows]

    def recently_created(self, batch: Any) -> bool:
        return False

    def reason(self, reason: DlqReason) -> DlqReason:
        return DlqReason.MISSING_EVENT_SET_ID if reason is DlqReason.MISSING_AUDIENCE_ID else reason

    def dead_lettered(self, rows: list[Any]) -> None:
        counts = collections.Counter(r.event.event for r in rows)
        for event, n in counts.items():
            m.OFFLINE_EVENTS.labels(event, "dead_lettered").inc(n)


OFFLINE_MAX_ROWS_SCARCE = MAX_EVENTS_PER_REQUEST  # TikTok's ceiling per /event/track/ request


class Outcomes(Protocol):
    """What the scheduler reports back: the loop's ledger, metrics and dead-letter writer."""

    def live(self, rows: list[Any]) -> list[Any]:
        """The rows whose records are still live (not revoked, lost or finished elsewhere)."""
        ...

    def uploaded(self, rows: list[Any]) -> None: ...

    def dead_letter(self, source: Any, letter: DeadLetter) -> Awaitable[None]: ...


class UploadScheduler:
    def __init__(
        self,
        *,
        batcher: Buffering,
        uploader: Uploader | None = None,
        outcomes: Outcomes,
        gate: UploadGate,
        backoff: Backoff,
        bucket: TokenBucket,
        max_inflight: int,
        max_rows_scarce: int | None = None,
        quota_after_s: float = QUOTA_SUSPECT_S,
        recently_created: Callable[[Batch], bool] | None = None,
        sink: Sink | None = None,
        clock: Callable[[], float],
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        gauges: bool = True,
    ) -> None:
        if sink is None:  # the audience scheduler, as before sinks existed
            sink = AudienceSink(cast(Uploader, uploader), recently_created or _never_created)
        self.batcher = batcher
        self.sink: Sink = sink
        self.uploader = uploader
        self.outcomes = outcomes
        self.gate = gate
        self.backoff = backoff
        self.bucket = bucket
        self.max_inflight = max_inflight
        self.max_rows_scarce = max(batcher.max_rows, max_rows_scarce or batcher.max_rows)
        self.quota_after_s = quota_after_s
        self.scarce = False  # requests are the bottleneck: batches grow toward `max_rows_scarce`
        self._token_due: float | None = None  # when to dispatch again because a token will be available
        self._limited_since: float | None = None  # first of an unbroken run of rate-limit answers (app-wide)
        self._clock = clock
        self._sleep = sleep
        self._slots = asyncio.Semaphore(max_inflight)
        self._sending = 0  # batches between cut and answer, not sleeping
        self._backing_off: dict[Any, int] = {}  # batch key → its batches sleeping before a retry
        self._tasks = Tasks("upload")
        self._wake = asyncio.Event()
        self.force = 0  # > 0 while a drain or revoke wants everything flushed now
        self._gauges = gauges  # the QPS and rows-limit gauges are the audience scheduler's (one series each)
        self._set_qps()
        if gauges:
            m.BATCH_ROWS_LIMIT.set(batcher.max_rows)

    # -- dispatch -------------------------------------------------------------------------------------------

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        """The dispatcher: sleep until a buffer lingers out, a token is due, or something changed; cut what is ready."""
        while True:
            deadline = self.batcher.next_deadline(self._backing_off)
            if self._token_due is not None:
                deadline = self._token_due if deadline is None else min(deadline, self._token_due)
            timeout = None if deadline is None else max(0.0, deadline - self._clock()) + 0.001
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancel that arrives as the wait
            # ends (CPython gh-86296), and this loop would then outlive the pipeline it dispatches for.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()
            self._wake.clear()
            self.dispatch()

    def dispatch(self) -> None:
        """Cut as many batches as there are free slots and tokens now, never more.

        A batch is cut only when it can be sent at once: rows wait in their buffers, not in cut batches queued on
        the limiter. So when requests are scarce (the QPS cap or the in-flight slots bind while buffers are ready)
        the rows that arrive meanwhile make the next request bigger, up to `max_rows_scarce` (TikTok's 10,000):
        the drain rate follows QPS x rows per request instead of stopping at QPS x `BATCH_MAX_ROWS`; and a free
        request then takes its buffer's rows without waiting for linger (trigger "turn"), since rows already
        waited for the request. With requests to spare (a dispatch leaves a token unused), batches leave at
        `BATCH_MAX_ROWS` or at linger as before, so a trickle stays small and costs few requests.
        """
        self._token_due = None
        if not self.gate.is_open:
            return
        hold, force = self._backing_off, self.force > 0
        slots = self.max_inflight - self._sending
        tokens = self.bucket.available()
        free = min(slots, tokens)
        eager = self.scarce  # a request that waited for its turn takes what is there, lingered out or not
        batches: Sequence[BatchLike] = []
        if free > 0:
            cap = self.max_rows_scarce if self.scarce else self.batcher.max_rows
            batches = self.batcher.ready(limit=free, force=force, hold=hold, max_rows=cap, eager=eager)
        if len(batches) < free:
            self._scarce(False)
        elif self.batcher.has_ready(force=force, hold=hold, eager=eager):
            self._scarce(True)
            if tokens <= slots:  # the limiter binds: come back when it grants (a finishing request wakes us too)
                self._token_due = self._clock() + self.bucket.next_token_in(after=len(batches))
        for batch in batches:
            granted = self.bucket.acquire() == 0
            label = self.sink.label(batch)
            m.BATCHES_SENT.labels(label, batch.trigger).inc()
            m.ROWS_SENT.labels(label).inc(len(batch.rows))
            m.BATCH_ROWS.observe(len(batch.rows))
            self._sending += 1
            self.spawn(self._send(batch, counted=True, token=granted))

    def _scarce(self, scarce: bool) -> None:
        if scarce != self.scarce:
            self.scarce = scarce
            if self._gauges:
                m.BATCH_ROWS_LIMIT.set(self.max_rows_scarce if scarce else self.batcher.max_rows)

    def _set_qps(self) -> None:
        if self._gauges:
            m.RATE_LIMIT_QPS.set(self.bucket.rate)

    def spawn(self, coro: Any) -> None:
        self._tasks.spawn(coro)

    async def close(self) -> None:
        await self._tasks.close()

    @property
    def backing_off(self) -> int:
        return len(self._backing_off)

    # -- one batch to its outcome ---------------------------------------------------------------------------

    async def _send(self, batch: Any, *, counted: bool = False, token: bool = False) -> None:
        first_failure: float | None = None
        attempt = 0
        try:
            while True:
                if not counted and not self.gate.is_open:
                    await self.gate.wait_turn()  # a retry that woke during an outage or quota pause waits for it
                if not counted:
                    self._sending += 1
                    counted = True
                answer = await self._post(batch, token=token)
                token = False
                self._sending -= 1
                counted = False
                self._wake.set()
                if answer is None:
                    return  # nothing of it is live any more: its partitions were revoked
                if answer.verdict is Verdict.SUCCESS:  # the hot path: no facts to gather
                    self._limited_since = None
                    self.gate.open()
                    self._uploaded(batch)
                    return
                if answer.verdict not in (Verdict.AUTH, Verdict.ENDPOINT) and answer.code is not None:
                    if not answer.rate_limited:
                        self._limited_since = None
                        self.gate.open()  # TikTok answered as TikTok and took the token
                    elif self.gate.reason != "quota":
                        self.gate.open()
                if answer.rate_limited and self._limited_since is None:
                    self._limited_since = self._clock()
                retrying = answer.verdict is Verdict.RETRY
                now = self._clock()
                if retrying and first_failure is None:
                    first_failure = now
                facts = BatchFacts(
                    rows=len(batch.rows),
                    audiences=self.sink.audiences(batch),
                    attempt=attempt + 1,
                    first_failure_at=first_failure if first_failure is not None else now,
                    now=now,
                    recently_created=self.sink.recently_created(batch),
                    bisection_left=batch.budget.left if batch.budget is not None else bisection_budget(len(batch.rows)),
                    rate_limited_for_s=now - self._limited_since if self._limited_since is not None else 0.0,
                )
                d = decide(answer, facts, self.backoff, self.quota_after_s)
                if isinstance(d, Done):
                    self._uploaded(batch)
                    return
                if isinstance(d, WaitForGate):
                    self.gate.close(d.gate, answer)
                    first_failure, attempt = None, 0  # waiting for the gate spends no retry budget
                    await self.gate.wait_turn()
                    continue
                if isinstance(d, SplitByAudience):
                    self._resend(batch, self.sink.by_audience(batch.rows), new_budget=True)
                    return
                if isinstance(d, Split):
                    half = len(batch.rows) // 2
                    if answer.verdict is not Verdict.SPLIT:
                        budget = batch.budget or SplitBudget(bisection_budget(len(batch.rows)))
                        budget.left -= 2
                        batch.budget = budget
                    self._resend(batch, [batch.rows[:half], batch.rows[half:]], new_budget=False)
                    return
                if isinstance(d, DeadLetterDecision):
                    await self._dead_letter_rows(batch, d, answer)
                    return
                assert isinstance(d, RetryAfter)
                attempt += 1
                if d.rate_limited:
                    self.bucket.throttled()
                    self._set_qps()
                m.RETRIES.labels(_retry_cause(answer)).inc()
                await self._back_off(batch.key, d.delay_s)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a defect of ours must not strand the batch and its in-flight cells
            log.exception("upload of batch %d failed unexpectedly; dead-lettering its rows", batch.id)
            failure = Answer(Verdict.RETRY, None, None, f"internal: {type(exc).__name__}")
            await self._dead_letter_rows(batch, DeadLetterDecision(DlqReason.RETRIES_EXHAUSTED), failure)
        finally:
            if counted:
                self._sending -= 1
                self._wake.set()

    def _resend(self, batch: BatchLike, parts: list[list[Any]], *, new_budget: bool) -> None:
        for part in parts:
            if part:
                budget = SplitBudget(bisection_budget(len(part))) if new_budget else batch.budget
                self.spawn(self._send(batch.part(part, budget)))

    async def _back_off(self, key: Any, delay: float) -> None:
        """The key holds its buffer meanwhile; consumption goes on until the tracked-records bound pauses it."""
        held = self._backing_off
        held[key] = held.get(key, 0) + 1
        m.BATCH_KEYS_BACKING_OFF.set(len(held))
        try:
            await self._sleep(delay)
        finally:
            if held[key] > 1:
                held[key] -= 1
            else:
                del held[key]
            m.BATCH_KEYS_BACKING_OFF.set(len(held))
            self._wake.set()

    def _drop_dead_rows(self, batch: BatchLike) -> None:
        live = self.outcomes.live(batch.rows)
        if len(live) != len(batch.rows):
            kept = {id(r) for r in live}
            self.batcher.release([r for r in batch.rows if id(r) not in kept])
            batch.rows = live

    async def _post(self, batch: BatchLike, *, token: bool = False) -> Answer | None:
        """Send once; None when no row is live at the moment the request would start.

        `token`: the dispatcher already took this request's token (first attempts); retries and halves wait.
        """
        while not token and (wait := self.bucket.acquire()) > 0:
            m.RATE_LIMIT_WAIT.inc(wait)
            await self._sleep(wait)
        self._set_qps()  # it recovers additively after a rate-limit answer
        async with self._slots:
            # The revocation fence: from this check to the request's start there is no await.
            self._drop_dead_rows(batch)
            if not batch.rows:
                return None
            body = self.sink.body(batch)
            batch.attempts += 1
            m.INFLIGHT.inc()
            t0 = time.perf_counter()
            try:
                answer = await self.sink.post(body)
            finally:
                m.INFLIGHT.dec()
        m.UPLOAD_DURATION.labels(answer.status_class).observe(time.perf_counter() - t0)
        m.TIKTOK_ANSWERS.labels(answer.status_class, answer.verdict.value, answer.code_label).inc()
        if answer.code == 20001:
            log.info(
                "TikTok answered PARTIAL_OK (request_id=%s)",
                answer.request_id,
                extra={"tiktok_code": answer.code, "tiktok_request_id": answer.request_id},
            )
        return answer

    def _uploaded(self, batch: BatchLike) -> None:
        self.batcher.release(batch.rows)
        self.outcomes.uploaded(batch.rows)

    async def _dead_letter_rows(self, batch: BatchLike, d: DeadLetterDecision, answer: Answer) -> None:
        d = DeadLetterDecision(self.sink.reason(d.reason), d.note)
        error = _answer_error(d.reason, answer, d.note)
        try:
            live = self.outcomes.live(batch.rows)
            self.sink.dead_lettered(live)
            await asyncio.gather(
                *[
                    self.outcomes.dead_letter(
                        row.source, DeadLetter(d.reason, error, batch.attempts, answer.code, answer.request_id)
                    )
                    for row in live
                ]
            )
        finally:
            self.batcher.release(batch.rows)
            self._wake.set()


def _never_created(batch: Batch) -> bool:
    return False


def _by_audience(rows: list[Row]) -> list[list[Row]]:
    groups: dict[str, list[Row]] = {}
    for r in rows:
        groups.setdefault(r.change.audience_id, []).append(r)
    return list(groups.values())


def _retry_cause(answer: Answer) -> str:
    if answer.rate_limited:
        return "rate_limited"
    if answer.http_status is None:
        return answer.status_class
    if answer.http_status >= 500:
        return "http_5xx"
    return "tiktok_code" if answer.code is not None else "http_other"


def _answer_error(reason: DlqReason, answer: Answer, note: str = "") -> str:
    where = f"HTTP {answer.http_status}" if answer.http_status is not None else answer.status_class
    code = f", code {answer.code}" if answer.code is not None else ""
    what = {
        DlqReason.TIKTOK_REJECTED: "TikTok refused this row",
        DlqReason.TIKTOK_PERMISSION: "TikTok denied access to the advertiser or audience",
        DlqReason.RETRIES_EXHAUSTED: "retry budget spent without a successful upload",
        DlqReason.MISSING_AUDIENCE_ID: "TikTok says the audience does not exist (deleted, or a wrong id in the "
        "mappings file)",
        DlqReason.MISSING_EVENT_SET_ID: "TikTok says the event set does not exist (a wrong id in the mappings file)",
    }.get(reason, "upload failed")
    if note and reason not in (DlqReason.MISSING_AUDIENCE_ID, DlqReason.MISSING_EVENT_SET_ID):
        what = f"{what}; {note}"
    return f"{what} ({where}{code}: {answer.message or 'no message'})"
