"""Metric names and label sets are a contract with dashboards and alerts: changing one must be deliberate."""

from typing import Any

from prometheus_client import CollectorRegistry, Metric, generate_latest

from service import metrics as m

# (exposed family name, type, label names). Counters are exposed with `_total`.
EXPECTED = {
    ("audience_sync_build", "info", ("version",)),
    ("audience_sync_events_consumed", "counter", ("topic",)),
    ("audience_sync_events_skipped", "counter", ("reason",)),
    ("audience_sync_offline_events", "counter", ("event", "outcome")),
    ("audience_sync_offline_match_keys", "counter", ("key",)),
    ("audience_sync_file_uploads", "counter", ("outcome",)),
    ("audience_sync_file_rows", "histogram", ()),
    ("audience_sync_file_updates", "counter", ("action", "outcome")),
    ("audience_sync_file_pending_users", "gauge", ()),
    ("audience_sync_file_audiences_waiting_for_users", "gauge", ()),
    ("audience_sync_events_uploaded", "counter", ("action",)),
    ("audience_sync_events_superseded", "counter", ()),
    ("audience_sync_events_dead_lettered", "counter", ("reason",)),
    ("audience_sync_dead_letter_failures", "counter", ()),
    ("audience_sync_identifiers", "counter", ("type", "outcome")),
    ("audience_sync_match_errors", "counter", ("type", "reason")),
    ("audience_sync_batches_sent", "counter", ("action", "trigger")),
    ("audience_sync_rows_sent", "counter", ("action",)),
    ("audience_sync_batch_rows", "histogram", ()),
    ("audience_sync_batch_rows_limit", "gauge", ()),
    ("audience_sync_upload_duration_seconds", "histogram", ("status_class",)),
    ("audience_sync_tiktok_answers", "counter", ("status_class", "verdict", "code")),
    ("audience_sync_upload_retries", "counter", ("cause",)),
    ("audience_sync_rate_limit_wait_seconds", "counter", ()),
    ("audience_sync_rate_limit_qps", "gauge", ()),
    ("audience_sync_tiktok_quota_paused", "gauge", ()),
    ("audience_sync_control_rate_limit_wait_seconds", "counter", ()),
    ("audience_sync_tiktok_quota_pauses", "counter", ()),
    ("audience_sync_inflight_requests", "gauge", ()),
    ("audience_sync_pending_events", "gauge", ()),
    ("audience_sync_paused_partitions", "gauge", ()),
    ("audience_sync_batch_keys_backing_off", "gauge", ()),
    ("audience_sync_event_to_ack_seconds", "histogram", ()),
    ("audience_sync_consumer_lag_records", "gauge", ("topic", "partition")),
    ("audience_sync_auth_ok", "gauge", ()),
    ("audience_sync_rebalances", "counter", ("event",)),
    ("audience_sync_last_upload_success_timestamp_seconds", "gauge", ()),
    ("audience_sync_dlq_guard_tripped", "gauge", ()),
    ("audience_sync_mappings_reloads", "counter", ("outcome",)),
    ("audience_sync_mappings_entries", "gauge", ()),
    ("audience_sync_audience_members", "gauge", ("audience_key", "advertiser_id")),
    ("audience_sync_audience_valid", "gauge", ("audience_key", "advertiser_id")),
    ("audience_sync_audience_expiry_timestamp_seconds", "gauge", ("audience_key", "advertiser_id")),
    ("audience_sync_audience_first_upload_timestamp_seconds", "gauge", ("audience_key", "advertiser_id")),
    ("audience_sync_audience_health_last_poll_timestamp_seconds", "gauge", ()),
}

# The audience health gauges alone name an audience: by its mappings-file key and advertiser, never by its TikTok
# id, so their series are bounded by the mappings file (one per entry and gauge, README "Metrics").
AUDIENCE_HEALTH = {
    "audience_sync_audience_members",
    "audience_sync_audience_valid",
    "audience_sync_audience_expiry_timestamp_seconds",
    "audience_sync_audience_first_upload_timestamp_seconds",
}
MAPPINGS_BOUNDED_LABELS = {"audience_key", "advertiser_id"}

# Labels whose values come from a closed set: cardinality stays bounded whatever the traffic.
BOUNDED_LABELS = {
    "topic",
    "partition",
    "reason",
    "action",
    "type",
    "outcome",
    "code",  # bounded by Answer.code_label: known codes, ranges, other, none
    "trigger",
    "status_class",
    "verdict",
    "cause",
    "event",  # rebalance events; offline events: a TikTok standard event name (validated) or "unknown"
    "key",  # offline match key types (service/core/offline.py MATCH_KEYS)
    "version",
}


# `audience-sync refresh` runs, pushed to a Pushgateway (service/commands/refresh.py), never on the service's
# /metrics: their own registry. The grouping key adds job and audience_key; the only label of their own is `status`.
EXPECTED_REFRESH = {
    ("audience_sync_refresh_last_run_timestamp_seconds", "gauge", ()),
    ("audience_sync_refresh_last_success_timestamp_seconds", "gauge", ()),
    ("audience_sync_refresh_last_status", "gauge", ("status",)),
    ("audience_sync_refresh_duration_seconds", "gauge", ()),
    ("audience_sync_refresh_identifiers", "gauge", ()),
    ("audience_sync_refresh_files_uploaded", "gauge", ()),
    ("audience_sync_refresh_snapshot_users", "gauge", ()),
}


def _declared(registry: CollectorRegistry = m.REGISTRY) -> set[tuple[str, str, tuple[str, ...]]]:
    out = set()
    for collector in list(registry._collector_to_names):
        name = getattr(collector, "_name", "")
        if name.startswith("audience_sync_"):
            labels = tuple(collector._labelnames)
            if collector._type == "info":
                labels = ("version",)  # Info's label set is given at `.info()` time
            out.add((name, collector._type, labels))
    return out


def test_metric_names_and_label_sets_are_stable() -> None:
    assert _declared() == EXPECTED


def test_no_label_can_carry_a_user_or_an_audience() -> None:
    labels = {label for name, _, ls in EXPECTED if name not in AUDIENCE_HEALTH for label in ls}
    assert labels <= BOUNDED_LABELS
    assert not labels & {"user", "email", "phone", "audience", "audience_id", "advertiser", "advertiser_id"}


def test_only_the_audience_health_gauges_name_an_audience_and_only_by_its_mappings_key() -> None:
    for name, kind, labels in EXPECTED:
        if name in AUDIENCE_HEALTH:
            assert kind == "gauge" and set(labels) == MAPPINGS_BOUNDED_LABELS, name
        else:
            assert not set(labels) & MAPPINGS_BOUNDED_LABELS, name
    all_labels = {label for _, _, ls in EXPECTED for label in ls}
    assert not all_labels & {"user", "email", "phone", "audience", "audience_id", "advertiser"}


def test_refresh_metrics_are_stable_and_only_in_their_own_registry() -> None:
    assert _declared(m.REFRESH_REGISTRY) == EXPECTED_REFRESH
    assert all(name.startswith("audience_sync_refresh_") for name, _, _ in EXPECTED_REFRESH)
    assert "audience_sync_refresh_" not in generate_latest(m.REGISTRY).decode(), "never on the service's /metrics"
    assert not {name for name, _, _ in EXPECTED} & {name for name, _, _ in EXPECTED_REFRESH}
    assert set(m.REFRESH_SUCCEEDED) < set(m.REFRESH_STATUSES)


def test_a_failed_refresh_pushes_everything_but_the_last_success() -> None:
    def names(collector: Any) -> set[str]:
        return {family.name for family in collector.collect()}

    everything = names(m.REFRESH_REGISTRY)
    assert names(m.refresh_push_collector(succeeded=True)) == everything
    assert names(m.refresh_push_collector(succeeded=False)) == everything - {m.REFRESH_LAST_SUCCESS_NAME}


def test_exposition_uses_base_units_and_total_suffixes() -> None:
    families: list[Metric] = [f for f in m.REGISTRY.collect() if f.name.startswith("audience_sync_")]
    for fam in families:
        if fam.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in fam.samples), fam.name
        assert "_ms" not in fam.name and "_milliseconds" not in fam.name


def test_observe_many_writes_what_per_value_observes_write() -> None:
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    values = [0.0, 0.001, 0.05, 0.05, 0.1, 0.25, 0.2500001, 3.0, 99.0, 1e9]
    one, many = CollectorRegistry(), CollectorRegistry()
    h1 = Histogram("lat_seconds", "x", buckets=(0.05, 0.1, 0.25, 1, 5), registry=one)
    h2 = Histogram("lat_seconds", "x", buckets=(0.05, 0.1, 0.25, 1, 5), registry=many)
    for v in values:
        h1.observe(v)
    m.observe_many(h2, values)
    m.observe_many(h2, [])

    def series(reg: CollectorRegistry) -> list[bytes]:
        return [line for line in generate_latest(reg).splitlines() if b"_created" not in line]

    assert series(many) == series(one)
