"""Create-on-demand: a mappings entry with `audience_name` + `create_if_missing` gets its TikTok audience on the
first event for it, exactly once across restarts and replicas (the claim protocol is in `audience_store`)."""

from __future__ import annotations

import asyncio
import logging
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from confluent_kafka import KafkaException

from service.core.answers import Verdict
from service.core.model import DlqReason
from service.core.retry import Backoff
from service.kafka.audience_store import AudienceRef, AudienceStore
from service.tiktok.audiences_api import AudiencesApi, TikTokApiError, truncate_name

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class CreationFailed:
    """Creation refused for good: the held records are dead-lettered with this."""

    reason: DlqReason
    error: str
    code: int | None = None
    request_id: str | None = None


Make = Callable[[], Awaitable[str]]  # creates the audience at TikTok, returns its id

_FINAL = {Verdict.PERMISSION: DlqReason.TIKTOK_PERMISSION, Verdict.REJECTED: DlqReason.TIKTOK_REJECTED}


def describe(exc: Exception) -> str:
    """One line for the log and the dead letter. The store's and the network's errors keep their text (broker
    and error names, no tokens nor user identifiers); any other error shows only its type and where it was
    raised, as its message could hold anything."""
    if isinstance(exc, TikTokApiError):
        return exc.one_line()
    if isinstance(exc, KafkaException | TimeoutError | OSError):
        return f"audience store: {type(exc).__name__}: {exc}"
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""
    return f"unexpected {type(exc).__name__}{where}"


class AudienceCreator:
    """Creates each missing audience once, across replicas, and tells the pipeline the outcome.

    Invariant: `ensure` always returns, with the id or a `CreationFailed`. Every error but cancellation (TikTok's,
    the store's KafkaException, a timeout, anything unexpected) is retried with backoff within the retry budget and
    ends in `CreationFailed(RETRIES_EXHAUSTED)` when it is spent; only TikTok's final refusals end sooner, and a
    rejected token waits for a good one. Why: the pipeline holds the audience's records, uncommitted, until
    `ensure` answers, so a task that died would strand them and stall their partitions. TikTok is called only
    while this replica holds the store's claim (`AudienceStore.claim`), so two replicas never both create.
    """

    def __init__(
        self,
        store: AudienceStore,
        api: AudiencesApi,
        backoff: Backoff,
        *,
        auth_retry_s: float = 15.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.api = api
        self.backoff = backoff
        self.auth_retry_s = auth_retry_s
        self._clock = clock
        self._running: dict[AudienceRef, asyncio.Task[str | CreationFailed]] = {}

    async def ensure(self, ref: AudienceRef, make: Make | None = None) -> str | CreationFailed:
        """The audience id for (advertiser, name), creating it if nobody has; one task per ref per process.

        `make` creates it at TikTok when this replica holds the claim (default: a Partner audience through
        `segment/audience`; file audiences pass a customer-file create from their first files).
        """
        task = self._running.get(ref)
        if task is None:
            task = self._running[ref] = asyncio.ensure_future(self._ensure(ref, make or partial(self._create, ref)))
            task.add_done_callback(lambda _t: self._running.pop(ref, None))
        return await asyncio.shield(task)

    async def _ensure(self, ref: AudienceRef, make: Make) -> str | CreationFailed:
        first_failure: float | None = None
        attempt = 0
        while True:
            try:
                found = await self._attempt(ref, make)
            except TikTokApiError as exc:
                verdict = exc.verdict
                if verdict in _FINAL:
                    return CreationFailed(
                        _FINAL[verdict],
                        f"creating TikTok audience {ref[1]!r} for advertiser {ref[0]} failed: {exc.one_line()}",
                        exc.code,
                        exc.answer.request_id,
                    )
                if verdict is Verdict.AUTH:
                    log.error("audience creation: TikTok rejects the access token; retrying")
                    await asyncio.sleep(self.auth_retry_s)
                    continue
                error = exc.one_line()
            except Exception as exc:  # the store, a timeout, a bug: retried, never the end of the task (see class)
                error = describe(exc)
            else:
                if found is not None:
                    return found
                continue  # the holder lapsed without a result (it died or gave up): claim again
            delay, give_up = self._next_delay(first_failure, attempt + 1)
            first_failure = first_failure if first_failure is not None else self._clock()
            attempt += 1
            if give_up:
                return CreationFailed(DlqReason.RETRIES_EXHAUSTED, f"creating TikTok audience {ref[1]!r}: {error}")
            log.warning("audience creation for %r will retry in %.1fs: %s", ref[1], delay, error)
            await asyncio.sleep(delay)

    async def _attempt(self, ref: AudienceRef, make: Make) -> str | None:
        """One round: the known id, or the id this replica created as holder, or the holder's; None when the
        holder lapsed without one."""
        await self.store.ensure_started()
        known = self.store.ids.get(ref)
        if known is not None:
            return known
        if await self.store.claim(ref):
            audience_id = await make()
            await self.store.publish(ref, audience_id)
            log.info("created TikTok audience %s for advertiser %s (%r)", audience_id, ref[0], ref[1])
            return audience_id
        return await self.store.wait_for_holder(ref, self.store.claim_ttl_s)

    def _next_delay(self, first_failure: float | None, attempt: int) -> tuple[float, bool]:
        now = self._clock()
        delay = self.backoff.delay(attempt)
        return delay, self.backoff.exhausted(first_failure if first_failure is not None else now, now, delay)

    async def _create(self, ref: AudienceRef) -> str:
        advertiser, name = ref
        stored = truncate_name(name)
        # An expired claim may hide a creation that happened but was never recorded: reuse it, never duplicate.
        for audience in await self.api.list_audiences(advertiser):
            if audience.name == stored:
                log.info("reusing existing TikTok audience %s named %r", audience.audience_id, stored)
                return audience.audience_id
        created = await self.api.create_audience(advertiser, name)
        return created.audience_id
