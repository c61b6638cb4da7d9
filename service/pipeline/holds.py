"""Audience holds: records whose audience is being created on demand wait here, in consumption order.

The resolver reads created ids from `created`, which only this class writes, and only in the same loop turn
as it routes the held records: a record consumed while creation finishes can never resolve straight into the
batcher ahead of older held records of the same key (the batcher treats the later-added change as newer).

Invariants (tests/pipeline/test_holds.py, and the model-based suite):
- while an audience key has held records, every newer record of that key joins the end of its queue, whatever
  it resolves to now, so the key's records reach the batcher in consumption order;
- every hold ends: the records are routed once the id is known, or dead-lettered; an exception of any kind
  from creation ends in dead letters (`retries_exhausted`), never in a queue nobody drains.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, Protocol

from service.core.dead_letters import DeadLetter
from service.core.model import AudienceNeeded, DlqReason
from service.pipeline.audience_creation import CreationFailed

log = logging.getLogger(__name__)

AudienceRef = tuple[str, str]  # advertiser id, audience name


class Creator(Protocol):
    async def ensure(self, ref: AudienceRef) -> str | CreationFailed: ...


class AudienceHolds:
    def __init__(
        self,
        creator: Creator | None,
        *,
        reroute: Callable[[Any], None],
        dead_letter: Callable[[Any, DeadLetter], None],
        spawn: Callable[[Any], None],
    ) -> None:
        self.creator = creator
        self.created: dict[AudienceRef, str] = {}
        self._held: dict[str, list[Any]] = {}  # audience key → sources in consumption order
        self._reroute = reroute
        self._dead_letter = dead_letter
        self._spawn = spawn

    def holding(self, audience_key: str | None) -> bool:
        return audience_key is not None and audience_key in self._held

    @property
    def any_held(self) -> bool:
        """Whether any key is held (the hot path asks this first: almost always False)."""
        return bool(self._held)

    def queue(self, audience_key: str, src: Any) -> None:
        """A record of a key with held records: it waits behind them."""
        self._held[audience_key].append(src)

    def hold(self, src: Any, need: AudienceNeeded) -> None:
        if self.creator is None:
            self._dead_letter(
                src,
                DeadLetter(
                    DlqReason.MISSING_AUDIENCE_ID,
                    f'audience_key "{need.audience_key}" is create_if_missing, but this process cannot '
                    "create audiences; replay it through the running service",
                ),
            )
            return
        held = self._held.get(need.audience_key)
        if held is not None:
            held.append(src)
            return
        self._held[need.audience_key] = [src]
        self._spawn(self._create_then_release(need))

    @property
    def held_records(self) -> int:
        return sum(len(v) for v in self._held.values())

    async def _create_then_release(self, need: AudienceNeeded) -> None:
        assert self.creator is not None
        ref = (need.advertiser_id, need.audience_name)
        try:
            result: str | CreationFailed = await self.creator.ensure(ref)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # every path must end in a retry or a dead letter
            log.exception("audience creation for %r failed unexpectedly", need.audience_name)
            result = CreationFailed(
                DlqReason.RETRIES_EXHAUSTED, f"creating TikTok audience {need.audience_name!r}: {type(exc).__name__}"
            )
        held = self._held.pop(need.audience_key, [])
        if isinstance(result, str):
            self.created[ref] = result
            for src in held:  # same loop turn as `created` learned the id: nothing can overtake them
                self._reroute(src)
            return
        for src in held:
            self._dead_letter(src, DeadLetter(result.reason, result.error, 1, result.code, result.request_id))
