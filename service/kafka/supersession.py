"""Replay's check for newer events: a replayed dead letter never overrides a newer event for the same user and
audience key (issue 10, defect 3). Such a letter is *superseded*: not replayed, counted, committed past.

Design (and why):

- Where newer events are. A letter's original record sits in the source topic at `dlq.source.topic/partition/
  offset` (or `replay.origin.*` when `replay --mode process` dead-lettered it again). Kafka orders records per
  partition, the service applies them in that order, and producers key a user's events to one partition (republish
  puts a replayed record back on its first partition for that reason). So "newer" means a record at a higher offset
  of the same source partition. Each source partition holding a selected letter is read once, from just after its
  oldest selected letter up to the end reported by the partition's first EOF (fetch responses, as the DLQ reader
  does: tansu answers ListOffsets wrongly), and every record is decoded the way the service decodes it. Records on
  other partitions have no order relative to the letter and are not considered.
- Same user: at least one shared identifier cell, (identifier type, SHA-256), for the same audience. TikTok keeps
  membership per (audience, identifier type, hash) cell and the batcher orders changes per cell
  (`service.core.batcher`); a letter sharing any cell with a newer event would overwrite that cell's newer state,
  and a record cannot be replayed in part, so the whole letter is superseded. Cells come from the service's own
  `Resolver` (decoder, enter/exit event names, normalisation, `PHONE_DEFAULT_REGION`, `SEND_*`), so they are
  exactly what the service uploads. Segment's userId/anonymousId is not used: canonical events have none, and the
  service never keys TikTok state on it.
- Same audience: the event's audience key (Segment `context.personas.computation_key`, else `properties` /
  `traits.audience_key`; canonical `audience_key`), independent of the mappings file, so it does not matter
  whether the mapping was fixed before or after the newer event. An event without a key (only an explicit TikTok
  audience id) is keyed by that audience id.
- Any newer event counts, enter or exit, synced or itself dead-lettered: the last event is the user's intended
  state, and a newer letter is replayed (or not) on its own merits. Of two letters for one user, the one whose
  original is later wins; the same record dead-lettered twice (same source position) keeps its later letter in the
  DLQ. Selected letters are evidence too, so this holds even when their originals are gone from the source.
- Records that do not decode, or are not a membership change (not an audience event, no usable identifier) never
  supersede anything: the service did nothing with them. A Confluent-framed record is decoded with the schema
  registry when `SCHEMA_REGISTRY_URL` is set (as the service does); without it the service dead-letters such
  records, so they count as undecodable.
- Unverifiable letters (the check cannot be completed) are never dropped silently nor replayed silently: the
  source topic or partition is gone, the letter has no source headers, the original's offset is no longer in the
  partition (retention) or past its end (topic recreated), no end of partition was reported, or the registry was
  down. Each carries its cause; `replay` stops before replaying anything unless told `--unverifiable replay` or
  `--unverifiable skip`.
- Memory: only what identifies the selected letters is kept (their positions and at most 4 cells each) plus, per
  (source partition, audience, cell) of those letters, the newest position seen; source records are streamed.

Known window: an event produced to the source after its partition was read and before the replayed record is
consumed is not seen; in republish mode the replayed record lands after it. The window is the replay's own run.

Nothing here prints or keeps a raw identifier: cells are hashes, and causes name topics and partitions only.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from enum import Enum
from typing import Final

from service.core.events import SEGMENT, Event, decode_event
from service.core.mappings import AudienceMapping, Mappings
from service.core.membership import Resolver, ResolverSettings
from service.core.model import AudienceChange
from service.core.schemas import SchemaNotLoaded, SchemaStore

Cell = tuple[str, str]  # (identifier type, lowercase hex SHA-256), as uploaded
Audience = tuple[str, str]  # ("key", audience key), or ("audience_id", TikTok id) for an event without a key
SourcePosition = tuple[str, int, int]  # (topic, partition, offset) of an original record
DlqPosition = tuple[int, int]  # (partition, offset) of a letter in the dead-letter topic
_Key = tuple[str, int, Audience, str, str]  # source topic, partition, audience, identifier type, hash
_Rank = tuple[int, int, int]  # source offset, then DLQ partition and offset (-1, -1 for a source record)

NO_SOURCE: Final = "no dlq.source.* headers"


def by_key(audience_key: str) -> Audience:
    return ("key", audience_key)


def by_audience_id(audience_id: str) -> Audience:
    return ("audience_id", audience_id)


@dataclass(frozen=True, slots=True)
class Letter:
    """What the check needs of one selected letter: where it is, where its original was, whose it is."""

    at: DlqPosition
    source: SourcePosition | None
    audience: Audience | None = None
    cells: frozenset[Cell] = frozenset()
    problem: str | None = None  # why it cannot be checked at all (its user or its source cannot be read)


@dataclass(frozen=True, slots=True)
class SourceEvent:
    """A record read from a source partition after a letter's original: one user's membership change."""

    topic: str
    partition: int
    offset: int
    audience: Audience
    cells: frozenset[Cell]


class Outcome(Enum):
    KEPT = "kept"
    SUPERSEDED = "superseded"
    UNVERIFIABLE = "unverifiable"


@dataclass(frozen=True, slots=True)
class Decision:
    outcome: Outcome
    why: str | None = None  # the cause, for UNVERIFIABLE


KEPT: Final = Decision(Outcome.KEPT)
SUPERSEDED: Final = Decision(Outcome.SUPERSEDED)


class Supersession:
    """Pure bookkeeping: letters in, later source events streamed through, one decision per letter out."""

    def __init__(self) -> None:
        self._letters: list[Letter] = []
        self._newest: dict[_Key, _Rank] = {}  # only keys of letters: memory bounded by the selected letters
        self._audiences: dict[tuple[str, int], set[Audience]] = {}
        self._ends: dict[tuple[str, int], int] = {}
        self._first: dict[tuple[str, int], int] = {}
        self._problems: dict[tuple[str, int], str] = {}

    def add(self, letter: Letter) -> None:
        self._letters.append(letter)
        if letter.problem is None and letter.source is not None and letter.audience is not None:
            topic, partition, _ = letter.source
            self._audiences.setdefault((topic, partition), set()).add(letter.audience)
            for kind, digest in letter.cells:
                self._newest.setdefault((topic, partition, letter.audience, kind, digest), (-1, -1, -1))

    def __len__(self) -> int:
        return len(self._letters)

    def starts(self) -> dict[tuple[str, int], int]:
        """Source partitions to read, each from just after its oldest checkable letter."""
        out: dict[tuple[str, int], int] = {}
        for letter in self._letters:
            if letter.problem is None and letter.source is not None and letter.cells:
                topic, partition, offset = letter.source
                tp = (topic, partition)
                out[tp] = min(out.get(tp, offset + 1), offset + 1)
        return out

    def wants(self, topic: str, partition: int, audience: Audience) -> bool:
        """Whether an event for `audience` on this partition can concern any letter (skip the rest early)."""
        return audience in self._audiences.get((topic, partition), ())

    def observe(self, event: SourceEvent) -> None:
        self._see(event.topic, event.partition, event.audience, event.cells, (event.offset, -1, -1))

    def _see(self, topic: str, partition: int, audience: Audience, cells: Iterable[Cell], rank: _Rank) -> None:
        newest = self._newest
        for kind, digest in cells:
            key = (topic, partition, audience, kind, digest)
            seen = newest.get(key)
            if seen is not None and rank > seen:
                newest[key] = rank

    def reached_end(self, topic: str, partition: int, end: int, first: int | None = None) -> None:
        """The partition was read to `end`; `first` is set when its records before that offset were deleted."""
        self._ends[(topic, partition)] = end
        if first is not None:
            self._first[(topic, partition)] = first

    def problem(self, topic: str, partition: int, why: str) -> None:
        """The partition could not be read completely (the first cause is kept)."""
        self._problems.setdefault((topic, partition), why)

    def decide(self) -> Iterator[tuple[Letter, Decision]]:
        for letter in self._letters:  # letters are evidence too: their originals may be gone from the source
            if letter.problem is None and letter.source is not None and letter.audience is not None:
                topic, partition, offset = letter.source
                self._see(topic, partition, letter.audience, letter.cells, (offset, *letter.at))
        for letter in self._letters:
            yield letter, self._decide(letter)

    def _decide(self, letter: Letter) -> Decision:
        if letter.problem is not None:
            return Decision(Outcome.UNVERIFIABLE, letter.problem)
        if not letter.cells or letter.audience is None:
            return KEPT  # no membership change to replay: it cannot override anything
        if letter.source is None:
            return Decision(Outcome.UNVERIFIABLE, NO_SOURCE)
        topic, partition, offset = letter.source
        mine = (offset, *letter.at)
        for kind, digest in letter.cells:
            if self._newest.get((topic, partition, letter.audience, kind, digest), mine) > mine:
                return SUPERSEDED
        tp = (topic, partition)
        where = f"partition {partition} of topic {topic}"
        if tp in self._problems:
            return Decision(Outcome.UNVERIFIABLE, self._problems[tp])
        end = self._ends.get(tp)
        if end is None:
            return Decision(Outcome.UNVERIFIABLE, f"{where}: end not reached")
        if offset >= end:
            return Decision(Outcome.UNVERIFIABLE, f"{where}: original offset past the end (topic recreated?)")
        first = self._first.get(tp)
        if first is not None and offset + 1 < first:
            return Decision(Outcome.UNVERIFIABLE, f"{where}: later records deleted (retention)")
        return KEPT


def decide(
    letters: Iterable[Letter],
    events: Iterable[SourceEvent],
    *,
    ends: Mapping[tuple[str, int], int] | None = None,
    problems: Mapping[tuple[str, int], str] | None = None,
) -> dict[DlqPosition, Decision]:
    """The check as a pure function: each letter's decision, given the events read after the letters' originals.

    `ends` maps each source partition read to its end offset; None means every partition was read to the end
    (just past its last letter or event). `problems` names partitions that could not be read completely.
    """
    check = Supersession()
    letters = list(letters)
    for letter in letters:
        check.add(letter)
    last: dict[tuple[str, int], int] = {}
    for letter in letters:
        if letter.source is not None:
            tp = letter.source[:2]
            last[tp] = max(last.get(tp, 0), letter.source[2] + 1)
    for event in events:
        check.observe(event)
        tp = (event.topic, event.partition)
        last[tp] = max(last.get(tp, 0), event.offset + 1)
    for (topic, partition), end in (ends if ends is not None else last).items():
        check.reached_end(topic, partition, end)
    for (topic, partition), why in (problems or {}).items():
        check.problem(topic, partition, why)
    return {letter.at: decision for letter, decision in check.decide()}


# -- whose event is it ------------------------------------------------------------------------------------------

_PLACEHOLDER: Final = "0"


class _EveryKeyMapped(Mappings):
    """Every audience key resolves (to placeholder ids): identity must not depend on the mappings file."""

    __slots__ = ()

    def __init__(self) -> None:
        super().__init__({}, "<replay check for newer events>")

    def get(self, audience_key: str) -> AudienceMapping | None:
        return AudienceMapping(audience_key, _PLACEHOLDER, _PLACEHOLDER)


class Unreadable(Exception):
    """The record may be a membership change but cannot be read now (the schema registry is unavailable)."""


SchemaLoader = Callable[[int, SchemaStore], None]  # loads one schema id into the store or raises


def registry_loader(url: str) -> SchemaLoader:
    """Fetch a writer schema from the registry, as the service does (a 404 is remembered as unknown)."""

    def load(schema_id: int, store: SchemaStore) -> None:
        import aiohttp

        from service.kafka.schema_registry import fetch_schema

        async def fetch() -> None:
            async with aiohttp.ClientSession() as session:
                await fetch_schema(session, url, schema_id, store)

        asyncio.run(fetch())

    return load


class Identities:
    """(audience, identifier cells) of a record, as the service's resolver computes them; None when the record
    is not a membership change the service would upload."""

    def __init__(self, settings: ResolverSettings, load_schema: SchemaLoader | None = None) -> None:
        self._schemas = SchemaStore()
        # Placeholder ids wherever the service would look them up: whose event it is must not depend on whether
        # its audience or advertiser can be resolved today (that is what gets fixed before a replay).
        settings = replace(settings, default_advertiser_id=settings.default_advertiser_id or _PLACEHOLDER)
        self._resolver = Resolver(settings, _EveryKeyMapped(), self._schemas)
        self._load_schema = load_schema
        self._failed: dict[int, str] = {}

    def of(
        self,
        value: bytes | None,
        headers: list[tuple[str, bytes | None]] | None,
        wanted: Callable[[Audience], bool] | None = None,
    ) -> tuple[Audience, frozenset[Cell]] | None:
        """Raises `Unreadable` only when the schema registry is needed and unavailable. `wanted` skips records
        of audience keys nobody asked about before hashing anything (the same key the resolver would find)."""
        for _ in range(2):
            try:
                if wanted is not None:
                    key = _audience_key(value, headers, self._schemas)
                    if key is not None and not wanted(by_key(key)):
                        return None
                outcome = self._resolver.process(value, headers).outcome
            except SchemaNotLoaded as exc:
                if not self._fetch(exc.schema_id):
                    return None
                continue
            if not isinstance(outcome, AudienceChange) or not outcome.identifiers:
                return None
            audience = by_key(outcome.audience_key) if outcome.audience_key else by_audience_id(outcome.audience_id)
            return audience, frozenset(outcome.identifiers)
        return None

    def _fetch(self, schema_id: int) -> bool:
        """True when the schema id is now settled (usable or unknown); False without a registry."""
        if self._load_schema is None:
            return False  # the service dead-letters such records as invalid_payload: they changed nothing
        if schema_id in self._failed:
            raise Unreadable(self._failed[schema_id])
        try:
            self._load_schema(schema_id, self._schemas)
        except Exception as exc:  # RegistryUnavailable, or anything odd from the registry
            self._failed[schema_id] = f"schema registry unavailable for schema id {schema_id}"
            raise Unreadable(self._failed[schema_id]) from exc
        return True


def _audience_key(
    value: bytes | None, headers: list[tuple[str, bytes | None]] | None, schemas: SchemaStore
) -> str | None:
    """The audience key exactly as `Resolver` reads it, or None (then the full resolver decides)."""
    decoded = decode_event(value, headers, schemas)
    if not isinstance(decoded, Event):
        return None
    data = decoded.data
    if decoded.format != SEGMENT:
        key = data.get("audience_key")
        return key if type(key) is str and key else None
    context = data.get("context")
    personas = context.get("personas") if type(context) is dict else None
    key = personas.get("computation_key") if type(personas) is dict else None
    if type(key) is str and key:
        return key
    bag = data.get("traits" if data.get("type") == "identify" else "properties")
    fallback = bag.get("audience_key") if type(bag) is dict else None
    return fallback if type(fallback) is str and fallback else None
