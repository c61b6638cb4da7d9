"""The defect scenarios' rig: a running `Pipeline` on the in-memory broker with a scriptable TikTok (`Tik`),
stand-ins for audience creation, the dead-letter producer and the Schema Registry, and bounded waits.

Shared by tests/pipeline/test_defects.py and tests/pipeline/test_budget.py.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson

from service.core.answers import Answer, Verdict, classify
from service.core.batcher import Batcher
from service.core.dlq_guard import DlqGuard
from service.core.mappings import Mappings
from service.core.membership import Resolver, ResolverSettings
from service.core.retry import Backoff
from service.core.schemas import SchemaStore
from service.core.types import RecordRef, TopicPartition
from service.kafka.memory import InMemoryBroker, InMemoryConsumer
from service.kafka.producer import LetterTooLarge
from service.pipeline.loop import Pipeline, PipelineOptions
from tests.pipeline.harness import (
    DLQ,
    GROUP,
    MADE,
    PARTITIONS,
    SRC,
    Dlq,
    TikTok,
    email_hash,
    event,
    mappings,
    partition_of,
)

POOL = [f"u{i}" for i in range(3000)]  # users; a user's records all live in partition_of(user)
P0, P1, P2 = (TopicPartition(SRC, p) for p in range(PARTITIONS))
AUD = {"a1": "101", "a2": "102", "b1": "201", MADE[0]: MADE[2]}  # audience key → audience id


def users_on(partition: int, n: int, *, skip: int = 0) -> list[str]:
    return [u for u in POOL if partition_of(u) == partition][skip : skip + n]


# -- stand-ins ------------------------------------------------------------------------------------------------


@dataclass
class Request:
    advertiser: str
    action: str
    rows: int
    users: list[str]
    audiences: set[str]


Rule = Callable[["Tik", Request], Answer | None]


class Tik(TikTok):
    """The harness TikTok for any user of POOL, with a log of requests, an optional delay, a `hold` that keeps
    requests waiting until it is set, and a `rule` answering before the harness's `mode`."""

    def __init__(self, *, delay: float = 0.0, rule: Rule | None = None) -> None:
        super().__init__()
        self.hash_user = {email_hash(u): u for u in POOL}
        self.delay = delay
        self.rule = rule
        self.log: list[Request] = []
        self.hold: asyncio.Event | None = None

    async def post_mapping(self, body: bytes) -> Answer:
        self.requests += 1
        doc = orjson.loads(body)
        assigned = self.assigned()
        cells = [(aud, c["id"]) for row in doc["batch_data"] for c in row if c for aud in c["audience_ids"]]
        users = [self.hash_user[h] for _, h in cells]
        for u in users:  # the revocation fence, checked as the request starts
            tp = TopicPartition(SRC, partition_of(u))
            if tp not in assigned:
                self.fence_violations.append(f"request #{self.requests} carries {u} of revoked {tp}")
        req = Request(doc["advertiser_ids"][0], doc["action"], len(doc["batch_data"]), users, {aud for aud, _ in cells})
        self.log.append(req)
        answer = (self.rule(self, req) if self.rule is not None else None) or self._answer(doc, cells)
        if self.hold is not None:
            await self.hold.wait()
        await asyncio.sleep(self.delay)
        if answer.verdict is Verdict.SUCCESS:
            for aud, h in cells:
                self.cells[(aud, h)] = doc["action"] == "add"
        return answer

    def member(self, key: str, user: str) -> bool | None:
        return self.cells.get((AUD[key], email_hash(user)))


REFUSED = Answer(classify(200, 40002), 200, 40002, "invalid")
RATE_LIMITED = Answer(classify(200, 40100), 200, 40100, "too frequent")
UNAVAILABLE = Answer(classify(503, None), 503, None, "unavailable")
HTML_404 = Answer(classify(404, None), 404, None, "HTTP 404, body is not TikTok's envelope")


class Store:
    """What both designs read from the audience store: the old one shares `ids` with the resolver."""

    def __init__(self) -> None:
        self.ids: dict[tuple[str, str], str] = {}
        self.created: dict[str, float] = {}

    def created_at(self, audience_id: str) -> float | None:
        return self.created.get(audience_id)


class SlowCreator:
    """Audience creation whose store learns the id before `ensure()` returns, as the real store's consumer does
    (its `ids` dict fills from the compacted topic while `ensure()` is still finishing)."""

    def __init__(self) -> None:
        self.store = Store()
        self.calls = 0
        self.in_window = asyncio.Event()
        self.finish = asyncio.Event()

    async def ensure(self, ref: tuple[str, str]) -> str:
        self.calls += 1
        self.store.ids[ref] = MADE[2]
        self.store.created[MADE[2]] = 0.0  # long ago: no warm-up retries
        self.in_window.set()
        await self.finish.wait()
        return MADE[2]


class FailingCreator:
    """The first creation fails with an exception nobody expected; later ones succeed."""

    def __init__(self, exc: Exception) -> None:
        self.store = Store()
        self.calls = 0
        self.exc = exc
        self.go = asyncio.Event()

    async def ensure(self, ref: tuple[str, str]) -> str:
        self.calls += 1
        if self.calls == 1:
            await self.go.wait()
            raise self.exc
        self.store.ids[ref] = MADE[2]
        self.store.created[MADE[2]] = 0.0
        return MADE[2]


class SmallDlq(Dlq):
    """A dead-letter producer with a small message.max.bytes, refusing larger records as the real one does."""

    max_message_bytes = 2_000

    def __init__(self, broker: InMemoryBroker) -> None:
        super().__init__(broker)
        self.refused = 0

    async def send(
        self, topic: str, *, key: bytes | None, value: bytes | None, headers: Any = None, timestamp_ms: Any = None
    ) -> None:
        size = len(key or b"") + len(value or b"")
        size += sum(len(k.encode()) + len(v.encode() if isinstance(v, str) else v or b"") for k, v in headers or ())
        if size > self.max_message_bytes:
            self.refused += 1
            await asyncio.sleep(0)
            raise LetterTooLarge(
                f"Broker: Message size too large (record {size} bytes)", size=size, limit=self.max_message_bytes
            )
        await super().send(topic, key=key, value=value, headers=headers, timestamp_ms=timestamp_ms)


class HangingRegistry:
    """A Schema Registry that does not answer."""

    def __init__(self) -> None:
        self.calls = 0

    async def ensure(self, schema_id: int) -> None:
        self.calls += 1
        await asyncio.sleep(60)


# -- the rig --------------------------------------------------------------------------------------------------


class Rig:
    """A running `Pipeline` + `InMemoryConsumer` on the in-memory broker, with bounded waits."""

    def __init__(
        self,
        *,
        tiktok: Tik | None = None,
        dlq: type[Dlq] = Dlq,
        maps: Mappings | None = None,
        creator: Any = None,
        guard: DlqGuard | None = None,
        schema_fetcher: Any = None,
        max_rows: int = 50,
        linger_s: float = 0.005,
        backoff: Backoff | None = None,
        events: Any = None,
        auto_assign: bool = True,
        wrap_assign: Callable[[Pipeline], Callable[[list[TopicPartition]], Awaitable[list[TopicPartition]]]]
        | None = None,
        **options: Any,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.broker = InMemoryBroker(clock=lambda: 1_764_500_000.0)
        self.broker.create_topics({SRC: PARTITIONS, DLQ: 1})
        self.tiktok = tiktok or Tik()
        self.dlq = dlq(self.broker)
        self.seq = 0
        opts: dict[str, Any] = {
            "max_inflight": 2,
            "max_pending": 1000,
            "consume_batch": 50,
            "consume_timeout_s": 0.002,
            "drain_timeout_s": 0.3,
            "revoke_timeout_s": 0.05,
            "auth_retry_s": 0.01,
            "max_qps": 100_000,
            "audience_warmup_s": 0.0,
        }
        opts.update(options)
        self.options = PipelineOptions(**opts)
        kw: dict[str, Any] = {}
        if creator is not None:
            kw["creator"] = creator
        if guard is not None:
            kw["guard"] = guard
        if schema_fetcher is not None:
            kw["schema_fetcher"] = schema_fetcher
        if events is not None:  # an `/event/track/` stand-in: offline events flow (tests/pipeline/test_offline.py)
            kw["event_uploader"] = events
        self.pipeline = Pipeline(
            resolver=Resolver(ResolverSettings(), maps or mappings(late=False), SchemaStore()),
            batcher=Batcher(max_rows=max_rows, linger_s=linger_s, clock=self.loop.time),
            uploader=self.tiktok,
            dlq=self.dlq,
            dlq_topic=DLQ,
            backoff=backoff or Backoff(0.001, 0.005, 0.2, random.Random(7)),
            options=self.options,
            clock=self.loop.time,
            **kw,
        )
        p = self.pipeline
        self.consumer = InMemoryConsumer(
            self.broker,
            GROUP,
            [SRC],
            on_assign=wrap_assign(p) if wrap_assign is not None else p.on_assign,
            on_revoke=p.on_revoke,
            on_lost=p.on_lost,
            sleep=asyncio.sleep,
            clock=self.loop.time,
            auto_commit_interval_s=0.005,
            auto_assign=auto_assign,
        )
        self.tiktok.assigned = lambda: self.consumer.assigned
        self.stop_event = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def start(self, assign: list[TopicPartition] | None = None) -> Rig:
        if assign is not None:
            await self.consumer.start()
            self.broker.rebalance(self.consumer, assign=assign)
        self.task = asyncio.create_task(self.pipeline.run(self.consumer, self.stop_event))
        await asyncio.sleep(0.01)
        return self

    async def stop(self) -> None:
        if self.task is None:
            return
        self.stop_event.set()
        try:
            await asyncio.wait_for(asyncio.shield(self.task), 3)
        except TimeoutError:
            self.task.cancel()  # intake stuck for good (the registry scenario on the old design)
        await asyncio.gather(self.task, return_exceptions=True)

    async def __aenter__(self) -> Rig:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- records ------------------------------------------------------------------------------------------

    def produce(self, user: str, key: str, entered: bool = True, *, value: bytes | None = None) -> RecordRef:
        self.seq += 1
        body = value if value is not None else event(user, key, entered, self.seq)
        return self.broker.produce(SRC, body, user.encode(), partition=partition_of(user))

    def committed(self, tp: TopicPartition) -> int:
        return self.broker.committed(GROUP, tp) or 0

    def all_committed(self, tps: list[TopicPartition] | None = None) -> bool:
        tps = tps if tps is not None else self.broker.partitions(SRC)
        return all(self.committed(tp) == self.broker.end_offset(tp) for tp in tps)

    def uncommitted(self) -> dict[int, tuple[int, int]]:
        return {
            tp.partition: (self.committed(tp), self.broker.end_offset(tp))
            for tp in self.broker.partitions(SRC)
            if self.committed(tp) != self.broker.end_offset(tp)
        }

    def letters(self) -> list[dict[str, str | None]]:
        """The dead-letter topic: each letter's headers (first value of each name)."""
        out = []
        for msg in self.broker.records(TopicPartition(DLQ, 0)):
            h: dict[str, str | None] = {}
            for k, v in msg.headers() or []:
                h.setdefault(k, v.decode() if isinstance(v, bytes) else v)
            out.append(h)
        return out

    def lettered_offsets(self) -> set[tuple[int, int]]:
        return {(int(h["dlq.source.partition"] or -1), int(h["dlq.source.offset"] or -1)) for h in self.letters()}

    async def until(self, cond: Callable[[], bool], timeout: float) -> bool:
        deadline = self.loop.time() + timeout
        while not cond():
            if self.loop.time() >= deadline:
                return False
            if self.task is not None and self.task.done():
                self.task.result()  # the loop itself crashed: say so
                return cond()
            await asyncio.sleep(0.002)
        return True
