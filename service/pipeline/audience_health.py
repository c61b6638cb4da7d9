"""Audience health: a slow background poll of every mapped audience's size, validity and expiry at TikTok.

Every `AUDIENCE_HEALTH_INTERVAL_S` (300 s; 0 disables it) the poll reads, through `dmp/custom_audience/get`, every
audience of the mappings file: entries with an `audience_id`, and entries with `create_if_missing` once their
audience exists. At most 100 ids per request (TikTok's bound), one request per second at most (its own token
bucket, shared by every request of the poll, outside the upload limiter), so even a large mappings file costs a
few requests every few minutes. What it reads becomes gauges labelled with the entry's audience key and advertiser
(`metrics.AUDIENCE_*`); the alerts and the README's "Audience health" section say what the numbers mean.

Invariants: the task never dies of an error (each poll's failure is logged in one line and the next poll comes);
an audience whose read failed keeps the values of its last good read, so one TikTok hiccup neither raises nor
clears an alert; a mapping entry that goes away takes its series with it. A refusal naming an id (40007: the
audience does not exist; 40002: not this advertiser's) is narrowed down by halving the request, so one deleted
audience cannot hide the other 99: it reads as invalid, without members or expiry. Only audience and advertiser
ids reach the log, never a token nor a user's identifier.

"First upload" (for the 48-hour rule) is not recorded anywhere durable: for an audience created on demand it is
TikTok's `create_time` (the service creates it on its first event and uploads right after); for an audience
mapped by id it is this process's first successful read of it, i.e. when this process started syncing it. The
alerts take the minimum over every replica and restart Prometheus remembers, so a restart does not move it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from prometheus_client import Gauge

from service import metrics as m
from service.core.answers import Verdict
from service.core.mappings import Mappings
from service.core.retry import TokenBucket
from service.tiktok.audiences_api import GET_MAX_IDS, AudienceInfo, AudiencesApi, TikTokApiError, chunks

log = logging.getLogger(__name__)

HEALTH_QPS = 1.0  # requests per second of the poll, whatever the number of audiences
_TIME_FORMAT = "%Y-%m-%d %H:%M:%S"  # TikTok's time fields (docs/tiktok-api.md §1.3), read as UTC
# A refusal that names an id of the request: narrowed down by halving, then read as "missing".
_NAMES_AN_ID = frozenset({Verdict.NOT_FOUND, Verdict.REJECTED})

AudienceRef = tuple[str, str]  # (advertiser id, audience name) of an audience created on demand
Labels = tuple[str, str]  # (audience key, advertiser id)


@dataclass(frozen=True, slots=True)
class Target:
    """One mappings entry to read: its labels, and the audience it resolves to."""

    audience_key: str
    advertiser_id: str
    audience_id: str
    created_on_demand: bool = False

    @property
    def labels(self) -> Labels:
        return (self.audience_key, self.advertiser_id)


def audience_targets(
    mappings: Mappings, default_advertiser_id: str | None, created: Mapping[AudienceRef, str]
) -> list[Target]:
    """The entries of the mappings file that name (or have created) an audience of a known advertiser.

    An entry without `advertiser_id` uses `DEFAULT_ADVERTISER_ID` (as the resolver does) and is left out without
    one; an entry with `create_if_missing` is read once `created` knows its id. Audiences that events name
    themselves (`external_audience_id`) are not read: their labels would not be bounded by the file.
    """
    out: list[Target] = []
    for entry in mappings:
        advertiser = entry.advertiser_id or default_advertiser_id
        if advertiser is None:
            continue
        if entry.audience_id is not None:
            out.append(Target(entry.audience_key, advertiser, entry.audience_id))
        elif entry.create_if_missing and entry.audience_name is not None:
            audience_id = created.get((advertiser, entry.audience_name))
            if audience_id is not None:
                out.append(Target(entry.audience_key, advertiser, audience_id, created_on_demand=True))
    return out


def parse_time(value: str) -> float | None:
    """TikTok's `YYYY-MM-DD HH:MM:SS` (UTC) or epoch seconds as a Unix time; None when empty or unreadable."""
    text = value.strip()
    if not text:
        return None
    if text.isdigit():
        return float(text)
    try:
        return datetime.strptime(text, _TIME_FORMAT).replace(tzinfo=UTC).timestamp()
    except ValueError:
        return None


MISSING = None  # a read of an audience TikTok does not know for that advertiser
Read = AudienceInfo | None


@dataclass(slots=True)
class PollResult:
    """What one poll did: reads by (advertiser, audience id) (None: missing) and the requests that failed."""

    reads: dict[tuple[str, str], Read] = field(default_factory=dict)
    requests: int = 0
    failed: list[str] = field(default_factory=list)  # one line per failed request, for the log

    @property
    def complete(self) -> bool:
        return not self.failed


class AudienceHealth:
    """The poller; `run` is the background task, `poll_once` one round (tests call it directly)."""

    def __init__(
        self,
        api: AudiencesApi,
        targets: Callable[[], Sequence[Target]],
        *,
        interval_s: float,
        qps: float = HEALTH_QPS,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._api = api
        self._targets = targets
        self.interval_s = interval_s
        self._bucket = TokenBucket(qps, clock=clock, burst=1.0, min_rate=min(qps, 0.1))
        self._clock = clock
        self._wall = wall
        self._sleep = sleep
        # (audience key, advertiser, audience id) → first good read by this process: the "first upload" of
        # audiences mapped by id (see the module docstring).
        self._first_seen: dict[tuple[str, str, str], float] = {}
        self._published: set[Labels] = set()

    async def run(self) -> None:
        """Poll now, then every `interval_s` (from the start of one poll to the next), until cancelled."""
        while True:
            started = self._clock()
            try:
                result = await self.poll_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bug must not end the task: the next poll may work
                log.warning("audience health poll failed: %s", type(exc).__name__)
            else:
                if not result.complete:
                    log.warning(
                        "audience health: %d of %d request(s) failed, those audiences keep their last values: %s",
                        len(result.failed),
                        result.requests,
                        "; ".join(result.failed[:3]),
                    )
            await self._sleep(max(0.0, self.interval_s - (self._clock() - started)))

    async def poll_once(self) -> PollResult:
        targets = list(self._targets())
        ids_by_advertiser: dict[str, list[str]] = {}
        for t in targets:
            ids = ids_by_advertiser.setdefault(t.advertiser_id, [])
            if t.audience_id not in ids:
                ids.append(t.audience_id)
        result = PollResult()
        for advertiser, ids in ids_by_advertiser.items():
            for chunk in chunks(ids, GET_MAX_IDS):
                await self._read(advertiser, chunk, result)
        self._publish(targets, result)
        return result

    async def _read(self, advertiser: str, ids: list[str], result: PollResult) -> None:
        """Read `ids`; a refusal naming an id is halved until it names one, which then reads as missing."""
        while (wait := self._bucket.acquire()) > 0:
            await self._sleep(max(wait, 0.001))  # a rounding-sized wait must still move the clock
        result.requests += 1
        try:
            infos = await self._api.get_audiences(advertiser, ids)
        except TikTokApiError as exc:
            if exc.verdict in _NAMES_AN_ID:
                if len(ids) == 1:
                    result.reads[(advertiser, ids[0])] = MISSING
                    return
                half = len(ids) // 2
                await self._read(advertiser, ids[:half], result)
                await self._read(advertiser, ids[half:], result)
                return
            if exc.answer.rate_limited:
                self._bucket.throttled()
            result.failed.append(f"advertiser {advertiser}, {len(ids)} audience(s): {exc.one_line()}")
            return
        by_id = {info.audience_id: info for info in infos}
        for audience_id in ids:
            # An id TikTok left out of a successful answer is as missing as one it refused.
            result.reads[(advertiser, audience_id)] = by_id.get(audience_id, MISSING)

    def _publish(self, targets: Sequence[Target], result: PollResult) -> None:
        now = self._wall()
        live: set[Labels] = set()
        seen_keys: set[tuple[str, str, str]] = set()
        for t in targets:
            labels = t.labels
            live.add(labels)
            key = (t.audience_key, t.advertiser_id, t.audience_id)
            seen_keys.add(key)
            if (t.advertiser_id, t.audience_id) not in result.reads:
                continue  # the read failed: keep the last good values
            info = result.reads[(t.advertiser_id, t.audience_id)]
            if info is None:
                m.AUDIENCE_VALID.labels(*labels).set(0)
                _remove(labels, m.AUDIENCE_MEMBERS, m.AUDIENCE_EXPIRY)
                continue
            first = self._first_seen.setdefault(key, now)
            if t.created_on_demand:
                first = parse_time(info.create_time) or first
            m.AUDIENCE_MEMBERS.labels(*labels).set(info.cover_num)
            m.AUDIENCE_VALID.labels(*labels).set(1 if info.is_valid else 0)
            m.AUDIENCE_FIRST_UPLOAD.labels(*labels).set(first)
            expires = parse_time(info.expired_time)
            if expires is not None:
                m.AUDIENCE_EXPIRY.labels(*labels).set(expires)
            else:
                _remove(labels, m.AUDIENCE_EXPIRY)
        for labels in self._published - live:
            _remove(labels, m.AUDIENCE_MEMBERS, m.AUDIENCE_VALID, m.AUDIENCE_EXPIRY, m.AUDIENCE_FIRST_UPLOAD)
        self._published = live
        self._first_seen = {k: v for k, v in self._first_seen.items() if k in seen_keys}
        if result.complete:
            m.AUDIENCE_HEALTH_POLLED.set(now)


def _remove(labels: Labels, *gauges: Gauge) -> None:
    for gauge in gauges:
        with contextlib.suppress(KeyError):
            gauge.remove(*labels)
