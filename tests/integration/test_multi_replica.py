"""Three replicas in one consumer group on a 12-partition topic; one is killed with kill -9 mid-stream.

The consumer group is the distributed engine: this is the proof that scaling out (deploy/k8s, KEDA) keeps the
contract. Nothing is lost, the dead replica's partitions move to the survivors, and TikTok ends in the exact
last-event-wins state.

Accounting. No record is produced before the three replicas share the 12 partitions, so every survivor reads its
own partitions from offset 0 and the dead replica's partitions from the offset that replica had committed when it
died (C). Hence, exactly: sum of the survivors' consumed = all records - sum of C over the dead replica's
partitions. Each consumed record reaches one outcome (uploaded, superseded, dead-lettered or skipped), and at the
end the group's committed offsets are the partitions' ends. Partition ends come from the producer's delivery
reports, never from ListOffsets (tansu's ListOffsets(latest) is wrong for multi-record batches,
see docs/design.md "A real broker for tests and `make run`").
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable

import pytest
from confluent_kafka import KafkaError, Message, Producer

from service.core.dead_letters import header_value
from service.devtools.broker import LocalBroker
from service.devtools.sample import expected_membership, generate
from service.devtools.sandbox import SandboxThread
from tests.conftest import ServiceProcess, Topics, committed, read_all, wait_until
from tests.integration.test_pipeline import membership

pytestmark = pytest.mark.integration

PARTITIONS = 12
GOOD_EVENTS = 20_000
BAD_EVERY = 400  # one undecodable record after every 400 good ones: the DLQ path runs across the kill as well
RATE_PER_S = 1_600  # bounded, so the kill lands mid-stream
KILL_AT = 0.35  # fraction of the records produced when the replica is killed

_EVENT = re.compile(r": (assigned|revoked|lost) (.*)$")
_PARTITION = re.compile(r"\[(\d+)\]")


@pytest.fixture
def topics(broker: LocalBroker) -> Topics:
    return Topics(broker, PARTITIONS)


def owned(svc: ServiceProcess) -> set[int]:
    """The partitions a replica owns now, replayed from its "assigned/revoked/lost ..." log lines."""
    mine: set[int] = set()
    for line in svc.log_path.read_text(errors="replace").splitlines():
        found = _EVENT.search(line)
        if found is None:
            continue
        parts = {int(p) for p in _PARTITION.findall(found.group(2))}
        if found.group(1) == "assigned":
            mine |= parts
        else:
            mine -= parts
    return mine


def ever_assigned_after(svc: ServiceProcess, offset: int) -> set[int]:
    """Partitions named in "assigned" lines written after byte `offset` of the log."""
    text = svc.log_path.read_bytes()[offset:].decode(errors="replace")
    out: set[int] = set()
    for line in text.splitlines():
        found = _EVENT.search(line)
        if found is not None and found.group(1) == "assigned":
            out |= {int(p) for p in _PARTITION.findall(found.group(2))}
    return out


def lag_partitions(svc: ServiceProcess, topic: str) -> set[int] | None:
    """Partitions with an `audience_sync_consumer_lag_records` series on this replica (None: not reachable)."""
    try:
        text = svc.metrics()
    except OSError:
        return None
    out: set[int] = set()
    for line in text.splitlines():
        if line.startswith("audience_sync_consumer_lag_records{") and f'topic="{topic}"' in line:
            found = re.search(r'partition="(\d+)"', line)
            if found:
                out.add(int(found.group(1)))
    return out


def outcomes(svc: ServiceProcess) -> float:
    return (
        svc.metric("audience_sync_events_uploaded_total")
        + svc.metric("audience_sync_events_superseded_total")
        + svc.metric("audience_sync_events_dead_lettered_total")
        + svc.metric("audience_sync_events_skipped_total")
    )


class Feeder(threading.Thread):
    """Produces the records at a bounded rate; the delivery reports give every partition's end and where the
    bad records landed."""

    def __init__(self, bootstrap: str, topic: str, records: list[tuple[bytes, bytes]], rate: float) -> None:
        super().__init__(name="feeder", daemon=True)
        self.bootstrap, self.topic, self.records, self.rate = bootstrap, topic, records, rate
        self.produced = 0
        self.delivered = 0
        self.ends: dict[int, int] = {}
        self.bad_positions: set[tuple[int, int]] = set()
        self.errors: list[str] = []
        self.finished_at = 0.0

    def _report(self, err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            self.errors.append(str(err))
            return
        p, o = msg.partition(), msg.offset()
        self.delivered += 1
        self.ends[p] = max(self.ends.get(p, 0), o + 1)
        if (msg.key() or b"").startswith(b"bad-"):
            self.bad_positions.add((p, o))

    def run(self) -> None:
        p = Producer({"bootstrap.servers": self.bootstrap, "enable.idempotence": True, "linger.ms": 5})
        start = time.monotonic()
        chunk = max(1, int(self.rate / 20))
        for i in range(0, len(self.records), chunk):
            for key, value in self.records[i : i + chunk]:
                while True:
                    try:
                        p.produce(self.topic, key=key, value=value, on_delivery=self._report)
                        break
                    except BufferError:
                        p.poll(0.05)
                self.produced += 1
            p.poll(0)
            ahead = start + self.produced / self.rate - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
        left = p.flush(30)
        if left:
            self.errors.append(f"{left} records not delivered")
        self.finished_at = time.monotonic()


def test_three_replicas_one_killed_mid_stream_lose_nothing_and_rebalance_to_the_survivors(
    broker: LocalBroker,
    topics: Topics,
    sandbox: SandboxThread,
    service_env: Callable[..., dict[str, str]],
    services: Callable[[dict[str, str]], ServiceProcess],
) -> None:
    events = list(generate(GOOD_EVENTS, seed=71, users=3000))
    expected = expected_membership(events)
    records: list[tuple[bytes, bytes]] = []
    for i, e in enumerate(events):
        records.append((e.key, e.value))
        if i % BAD_EVERY == BAD_EVERY - 1:
            records.append((f"bad-{i}".encode(), b"{not json"))
    n_bad = len(records) - len(events)

    replicas = [
        services(
            service_env(
                sandbox.url,
                BATCH_MAX_ROWS="200",
                KAFKA_STATISTICS_INTERVAL_MS="1000",
                KAFKA_CLIENT_ID=f"replica-{i}",
            )
        )
        for i in range(3)
    ]
    all_partitions = set(range(PARTITIONS))

    def shared_out() -> bool:
        sets = [owned(r) for r in replicas]
        return all(sets) and sum(len(s) for s in sets) == PARTITIONS and set().union(*sets) == all_partitions

    wait_until(lambda: all(r.http_status("/readyz") == 200 for r in replicas), 60, "three replicas ready")
    wait_until(shared_out, 60, "the 12 partitions shared by the three replicas")
    time.sleep(1.0)
    assert shared_out(), "assignment settled"
    before = {r.port: owned(r) for r in replicas}

    victim, survivors = replicas[0], replicas[1:]
    assigns0 = {r.port: r.metric("audience_sync_rebalances_total", event="assign") for r in survivors}
    revokes0 = {r.port: r.metric("audience_sync_rebalances_total", event="revoke") for r in survivors}
    log_marks = {r.port: r.log_path.stat().st_size for r in survivors}

    feeder = Feeder(broker.bootstrap, topics.source, records, RATE_PER_S)
    t0 = time.monotonic()
    feeder.start()
    wait_until(
        lambda: feeder.produced >= KILL_AT * len(records) and victim.metric("audience_sync_events_uploaded_total") > 0,
        60,
        "the victim uploading mid-stream",
    )
    victim_parts = owned(victim)
    victim_consumed = victim.metric("audience_sync_events_consumed_total")
    produced_at_kill = feeder.produced
    victim.kill9()
    t_kill = time.monotonic()
    assert not feeder.finished_at, "the kill landed mid-stream"

    # What the victim had committed when it died: the survivors resume its partitions from there. Read before the
    # group notices the death (about half of session.timeout.ms), so no survivor has committed them yet.
    time.sleep(1.0)
    at_kill = committed(broker, topics.group, topics.source, PARTITIONS)
    resumed_from = {p: max(0, at_kill[p]) for p in victim_parts}
    early = sum(r.metric("audience_sync_rebalances_total", event="assign") for r in survivors) - sum(assigns0.values())
    assert early == 0, "the committed offsets were read before the survivors took over"

    def recovered() -> bool:
        return set().union(*(owned(r) for r in survivors)) == all_partitions

    wait_until(recovered, 60, "the survivors to own all 12 partitions")
    t_recovered = time.monotonic()

    feeder.join(60)
    assert not feeder.is_alive() and not feeder.errors, feeder.errors
    total = sum(feeder.ends.values())
    assert total == len(records) == feeder.delivered
    assert len(feeder.bad_positions) == n_bad

    def all_committed() -> bool:
        return committed(broker, topics.group, topics.source, PARTITIONS) == {
            p: feeder.ends.get(p, -1001) for p in range(PARTITIONS)
        }

    wait_until(lambda: membership(sandbox) == expected, 120, "exact membership after the kill")
    wait_until(all_committed, 30, "every partition committed to its end", interval_s=0.5)
    wait_until(
        lambda: all(r.metric("audience_sync_events_consumed_total") == outcomes(r) for r in survivors),
        15,
        "every consumed record on the survivors at a final outcome",
    )
    t_done = time.monotonic()

    # Rebalanced to the survivors: each saw an assignment after the kill, and between them they now own all 12.
    for r in survivors:
        assert r.metric("audience_sync_rebalances_total", event="assign") > assigns0[r.port]
        assert owned(r) >= before[r.port], "cooperative-sticky: a survivor keeps its own partitions"
        assert r.metric("audience_sync_rebalances_total", event="revoke") == revokes0[r.port]
    taken_over = set().union(*(ever_assigned_after(r, log_marks[r.port]) for r in survivors))
    assert taken_over >= victim_parts, "the dead replica's partitions appear in the survivors' assigned lines"
    final = [owned(r) for r in survivors]
    assert not (final[0] & final[1]) and final[0] | final[1] == all_partitions

    # Every record accounted for: the survivors read exactly what the victim had not committed, plus their own.
    consumed = [r.metric("audience_sync_events_consumed_total") for r in survivors]
    reread = victim_consumed - sum(resumed_from.values())
    assert sum(consumed) == total - sum(resumed_from.values()), "nothing lost, nothing read twice beyond C"
    uploaded = sum(r.metric("audience_sync_events_uploaded_total") for r in survivors)
    superseded = sum(r.metric("audience_sync_events_superseded_total") for r in survivors)
    dead = sum(r.metric("audience_sync_events_dead_lettered_total") for r in survivors)
    skipped = sum(r.metric("audience_sync_events_skipped_total") for r in survivors)
    assert uploaded + superseded + dead + skipped == sum(consumed)
    assert skipped == 0

    # Every bad record in the DLQ; only the victim's uncommitted tail may be there twice.
    letters = read_all(broker, topics.dlq, n_bad, timeout_s=30)
    positions = [
        (
            int(header_value(m.headers(), "dlq.source.partition") or -1),
            int(header_value(m.headers(), "dlq.source.offset") or -1),
        )
        for m in letters
    ]
    assert set(positions) == feeder.bad_positions, "every undecodable record dead-lettered, nothing else"
    twice = [pos for pos in set(positions) if positions.count(pos) > 1]
    assert all(p in victim_parts and o >= resumed_from[p] for p, o in twice), twice
    assert all(header_value(m.headers(), "dlq.reason") == "invalid_payload" for m in letters)

    # Lag series only for owned partitions (statistics every second here; revoke removes a series).
    def lag_matches() -> bool:
        got = [lag_partitions(r, topics.source) for r in survivors]
        return all(g is not None and g == owned(r) for g, r in zip(got, survivors, strict=True))

    wait_until(lag_matches, 15, "consumer-lag series exactly on the owned partitions")

    print(
        f"\nmulti-replica: {total} records ({len(events)} events + {n_bad} undecodable) on {PARTITIONS} partitions"
        f" at {RATE_PER_S}/s; partitions before the kill {[sorted(before[r.port]) for r in replicas]}"
        f"\n  kill -9 of replica-0 after {t_kill - t0:.1f}s ({produced_at_kill} produced, it had consumed"
        f" {victim_consumed:.0f} and committed {sum(resumed_from.values())} on {sorted(victim_parts)};"
        f" {reread:.0f} re-read by the survivors)"
        f"\n  survivors consumed {[int(c) for c in consumed]}, uploaded {uploaded:.0f}, superseded {superseded:.0f},"
        f" dead-lettered {dead:.0f}; DLQ holds {len(letters)} letters for {n_bad} bad records"
        f"\n  partitions owned after {[sorted(f) for f in final]}; recovered (all 12 owned) {t_recovered - t_kill:.1f}s"
        f" after the kill; caught up (exact membership, all committed) {t_done - t_kill:.1f}s after the kill,"
        f" {t_done - feeder.finished_at:.1f}s after the last record was produced"
    )
    for r in survivors:
        assert r.stop() == 0
