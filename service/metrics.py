"""Every metric the service exports, defined in one place (arroyo's `metric_defs` idea).

Prometheus conventions: base units, `_total` counters, histograms not summaries. Labels are bounded enums
(reason codes, id types, actions, status classes, partitions); never a user, an email or an audience id. The
audience health gauges alone carry `audience_key` and `advertiser_id`, and only for entries of the mappings file:
one series per entry and gauge, bounded by that file (README "Metrics").
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    Info,
    Metric,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.registry import Collector

REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)
GCCollector(registry=REGISTRY)

P = "audience_sync_"

BUILD = Info(P + "build", "Version of the running service.", registry=REGISTRY)

EVENTS_CONSUMED = Counter(
    P + "events_consumed_total", "Records read from the source topics.", ["topic"], registry=REGISTRY
)
EVENTS_SKIPPED = Counter(
    P + "events_skipped_total", "Records that are not audience events.", ["reason"], registry=REGISTRY
)
EVENTS_UPLOADED = Counter(P + "events_uploaded_total", "Events acknowledged by TikTok.", ["action"], registry=REGISTRY)
OFFLINE_EVENTS = Counter(
    P + "offline_events_total",
    "Offline conversion events by TikTok event name and outcome (sent, dead_lettered, skipped).",
    ["event", "outcome"],
    registry=REGISTRY,
)
OFFLINE_MATCH_KEYS = Counter(
    P + "offline_match_keys_total",
    "Match keys present on valid offline events, by type (email, phone, external_id, ttclid, ttp, ip, user_agent).",
    ["key"],
    registry=REGISTRY,
)
FILE_UPLOADS = Counter(
    P + "file_uploads_total",
    "Identifier files sent to dmp/custom_audience/file/upload/ for file audiences, by outcome (uploaded, failed).",
    ["outcome"],
    registry=REGISTRY,
)
FILE_ROWS = Histogram(
    P + "file_rows",
    "Identifiers per uploaded file (file audiences).",
    buckets=(1, 10, 100, 1000, 10_000, 100_000, 1_000_000),
    registry=REGISTRY,
)
FILE_UPDATES = Counter(
    P + "file_updates_total",
    "File-audience changes applied at TikTok, by action (APPEND, REMOVE, CREATE) and outcome (accepted, refused, "
    "retried).",
    ["action", "outcome"],
    registry=REGISTRY,
)
FILE_PENDING_USERS = Gauge(
    P + "file_pending_users",
    "Users netted for file audiences and waiting for the next upload.",
    registry=REGISTRY,
)
FILE_WAITING_AUDIENCES = Gauge(
    P + "file_audiences_waiting_for_users",
    "File audiences to be created on demand that hold fewer than 1,000 users to add (TikTok's minimum): their "
    "records wait, uncommitted.",
    registry=REGISTRY,
)
EVENTS_SUPERSEDED = Counter(
    P + "events_superseded_total",
    "Events replaced by a newer event for the same user and audience before upload.",
    registry=REGISTRY,
)
EVENTS_DEAD_LETTERED = Counter(
    P + "events_dead_lettered_total",
    "Records written to the dead-letter topic.",
    ["reason"],
    registry=REGISTRY,
)
DEAD_LETTER_FAILURES = Counter(
    P + "dead_letter_failures_total",
    "Dead-letter writes the broker did not acknowledge (retried).",
    registry=REGISTRY,
)
IDENTIFIERS = Counter(
    P + "identifiers_total",
    "Identifiers seen, by type and outcome (valid: hashed and sent; invalid: dropped).",
    ["type", "outcome"],
    registry=REGISTRY,
)
MATCH_ERRORS = Counter(
    P + "match_errors_total",
    "Identifiers dropped because they could not be normalised.",
    ["type", "reason"],
    registry=REGISTRY,
)
BATCHES_SENT = Counter(
    P + "batches_sent_total",
    "Mapping requests sent (first attempts), by action and flush trigger.",
    ["action", "trigger"],
    registry=REGISTRY,
)
ROWS_SENT = Counter(P + "rows_sent_total", "Rows in mapping requests (first attempts).", ["action"], registry=REGISTRY)
BATCH_ROWS = Histogram(
    P + "batch_rows",
    "Rows per mapping request.",
    buckets=(1, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10000),
    registry=REGISTRY,
)
BATCH_ROWS_LIMIT = Gauge(
    P + "batch_rows_limit",
    "Rows a mapping request may carry now: BATCH_MAX_ROWS, or BATCH_MAX_ROWS_CEILING while requests are scarce "
    "(the QPS cap or the in-flight slots bind under a backlog).",
    registry=REGISTRY,
)
UPLOAD_DURATION = Histogram(
    P + "upload_duration_seconds",
    "Mapping request latency, by status class.",
    ["status_class"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    registry=REGISTRY,
)
TIKTOK_ANSWERS = Counter(
    P + "tiktok_answers_total",
    "TikTok answers by HTTP status class, verdict and TikTok code (codes outside the table are `other`).",
    ["status_class", "verdict", "code"],
    registry=REGISTRY,
)
RETRIES = Counter(P + "upload_retries_total", "Mapping requests retried, by cause.", ["cause"], registry=REGISTRY)
RATE_LIMIT_WAIT = Counter(
    P + "rate_limit_wait_seconds_total", "Time uploads waited on the request-rate limiter.", registry=REGISTRY
)
CONTROL_RATE_LIMIT_WAIT = Counter(
    P + "control_rate_limit_wait_seconds_total",
    "Time control-plane calls (audience create/get/list, user and advertiser info) waited on their limiter.",
    registry=REGISTRY,
)
RATE_LIMIT_QPS = Gauge(
    P + "rate_limit_qps",
    "Current request-rate limit (lowered on TikTok rate-limit answers).",
    registry=REGISTRY,
)
TIKTOK_QUOTA_PAUSED = Gauge(
    P + "tiktok_quota_paused",
    "1 while uploads wait out TikTok's 5-minute pause after the app's per-minute quota was spent (persistent 40100).",
    registry=REGISTRY,
)
TIKTOK_QUOTA_PAUSES = Counter(
    P + "tiktok_quota_pauses_total",
    "Times uploads paused for TikTok's per-minute quota (TikTok answered only rate limits for 20 s).",
    registry=REGISTRY,
)
INFLIGHT = Gauge(P + "inflight_requests", "Mapping requests in flight.", registry=REGISTRY)
PENDING = Gauge(
    P + "pending_events",
    "Consumed records not yet finished (buffered, in flight or dead-lettering).",
    registry=REGISTRY,
)
PAUSED_PARTITIONS = Gauge(
    P + "paused_partitions",
    "Partitions paused (backpressure, auth outage, DLQ guard, registry outage).",
    registry=REGISTRY,
)
BATCH_KEYS_BACKING_OFF = Gauge(
    P + "batch_keys_backing_off",
    "Batch keys (advertiser, action, identifier types) holding their buffer while a retry waits.",
    registry=REGISTRY,
)
EVENT_TO_ACK = Histogram(
    P + "event_to_ack_seconds",
    "From the event's time to TikTok's acknowledgement.",
    buckets=(0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.75, 1, 1.5, 2, 3, 5, 10, 30, 60, 300, 900),
    registry=REGISTRY,
)
CONSUMER_LAG = Gauge(
    P + "consumer_lag_records",
    "Records behind the high watermark, from librdkafka statistics (stored offsets).",
    ["topic", "partition"],
    registry=REGISTRY,
)
AUTH_OK = Gauge(P + "auth_ok", "1 while TikTok accepts the access token, 0 during an auth outage.", registry=REGISTRY)
REBALANCES = Counter(P + "rebalances_total", "Partition assignment changes.", ["event"], registry=REGISTRY)
LAST_UPLOAD = Gauge(
    P + "last_upload_success_timestamp_seconds",
    "Unix time of the last acknowledged mapping request.",
    registry=REGISTRY,
)
DLQ_GUARD_TRIPPED = Gauge(
    P + "dlq_guard_tripped",
    "1 while the DLQ guard holds dead letters and pauses consumption (too many in a row for one reason).",
    registry=REGISTRY,
)
MAPPINGS_RELOADS = Counter(
    P + "mappings_reloads_total", "Mappings file reloads, by outcome.", ["outcome"], registry=REGISTRY
)
MAPPINGS_ENTRIES = Gauge(P + "mappings_entries", "Audience keys in the active mappings file.", registry=REGISTRY)

# Audience health (pipeline/audience_health.py): a slow poll of every audience of the mappings file.
AUDIENCE_LABELS = ("audience_key", "advertiser_id")
AUDIENCE_MEMBERS = Gauge(
    P + "audience_members",
    "TikTok's matched-user count (cover_num) of each mapped audience, read by the audience health poll.",
    AUDIENCE_LABELS,
    registry=REGISTRY,
)
AUDIENCE_VALID = Gauge(
    P + "audience_valid",
    "1 while TikTok reports the mapped audience valid (is_valid), 0 when invalid or missing for the advertiser.",
    AUDIENCE_LABELS,
    registry=REGISTRY,
)
AUDIENCE_EXPIRY = Gauge(
    P + "audience_expiry_timestamp_seconds",
    "Unix time at which TikTok expires the mapped audience (expired_time).",
    AUDIENCE_LABELS,
    registry=REGISTRY,
)
AUDIENCE_FIRST_UPLOAD = Gauge(
    P + "audience_first_upload_timestamp_seconds",
    "When the service started syncing the mapped audience: TikTok's create time for an audience created on "
    "demand, else this process's first health poll of it (alerts take the minimum over replicas and restarts).",
    AUDIENCE_LABELS,
    registry=REGISTRY,
)
AUDIENCE_HEALTH_POLLED = Gauge(
    P + "audience_health_last_poll_timestamp_seconds",
    "Unix time of the last audience health poll that read every mapped audience.",
    registry=REGISTRY,
)


# `audience-sync refresh` runs (service/commands/refresh.py): a CLI run, a CronJob pod nobody scrapes, pushes these
# to a Prometheus Pushgateway once at its end (REFRESH_PUSHGATEWAY_URL, --pushgateway) under the grouping key
# job="audience-sync-refresh", audience_key=<mappings key>. Their own registry: they never appear on the service's
# /metrics. Values of the last run; the only label is `status` (one of REFRESH_STATUSES).
REFRESH_REGISTRY = CollectorRegistry(auto_describe=True)
REFRESH_STATUSES = ("replaced", "created", "dry_run", "skipped", "refused", "failed")
REFRESH_SUCCEEDED = frozenset({"replaced", "created"})  # the audience now holds exactly the snapshot
REFRESH_LAST_RUN = Gauge(
    P + "refresh_last_run_timestamp_seconds",
    "Unix time at which the last refresh run of the audience key ended, whatever its outcome.",
    registry=REFRESH_REGISTRY,
)
REFRESH_LAST_SUCCESS_NAME = P + "refresh_last_success_timestamp_seconds"
REFRESH_LAST_SUCCESS = Gauge(
    REFRESH_LAST_SUCCESS_NAME,
    "Unix time at which the last successful refresh (status replaced or created) of the audience key ended; "
    "pushed only by a successful run, so a failed one leaves the previous value on the Pushgateway.",
    registry=REFRESH_REGISTRY,
)
REFRESH_LAST_STATUS = Gauge(
    P + "refresh_last_status",
    "1 for the status of the last refresh run (replaced, created, dry_run, skipped, refused, failed); one series.",
    ["status"],
    registry=REFRESH_REGISTRY,
)
REFRESH_DURATION = Gauge(
    P + "refresh_duration_seconds",
    "How long the last refresh run took, reading, uploading and replacing included.",
    registry=REFRESH_REGISTRY,
)
REFRESH_IDENTIFIERS = Gauge(
    P + "refresh_identifiers",
    "Distinct identifiers of the entry's contract in the last run's snapshot: the size of the REPLACE when one "
    "was applied (also given for a dry run or a refusal).",
    registry=REFRESH_REGISTRY,
)
REFRESH_FILES_UPLOADED = Gauge(
    P + "refresh_files_uploaded",
    "Identifier files the last refresh run uploaded to TikTok (0 for a dry run or a refusal).",
    registry=REFRESH_REGISTRY,
)
REFRESH_SNAPSHOT_USERS = Gauge(
    P + "refresh_snapshot_users",
    "Users (rows, or current members of a compacted topic) the last refresh run read from its snapshot.",
    registry=REFRESH_REGISTRY,
)


class _Without(Collector):
    """The families of `registry` except those named in `names`."""

    def __init__(self, registry: CollectorRegistry, names: Iterable[str]) -> None:
        self._registry = registry
        self._names = frozenset(names)

    def collect(self) -> Iterable[Metric]:
        return [family for family in self._registry.collect() if family.name not in self._names]


def refresh_push_collector(*, succeeded: bool) -> Collector:
    """What a refresh run pushes: REFRESH_REGISTRY, without the last-success timestamp unless the run succeeded.
    `pushadd_to_gateway` (POST) replaces only the families it sends, so a failed run keeps the last success's."""
    return REFRESH_REGISTRY if succeeded else _Without(REFRESH_REGISTRY, [REFRESH_LAST_SUCCESS_NAME])


def observe_many(histogram: Histogram, values: Iterable[float]) -> None:
    """`histogram.observe(v)` for each value, with one lock round per bucket touched instead of two per value.

    Used where a whole batch is observed at once (event → ack latency of every row of an upload): per-row
    observes were a measurable share of the CPU per event. It writes the same series `observe` writes (the
    per-bucket counts and the sum) through prometheus_client's value objects; tests/test_metrics.py checks the
    exposition equals per-value observes, so a library change that breaks this fails there.
    """
    bounds = histogram._upper_bounds
    counts = [0] * len(bounds)
    total = 0.0
    for v in values:
        total += v
        counts[bisect_left(bounds, v)] += 1
    if not any(counts):
        return
    histogram._sum.inc(total)
    for i, n in enumerate(counts):
        if n:
            histogram._buckets[i].inc(n)
