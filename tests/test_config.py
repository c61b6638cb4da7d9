"""service/config.py: the environment contract (README "Configuration"), without a broker."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from service.config import (
    CONSUMER_DEFAULTS,
    DEFAULT_TIKTOK_API_URL,
    ConfigError,
    TokenSource,
    consumer_config,
    kafka_passthrough,
    load_settings,
    mask,
    producer_config,
)

ROOT = Path(__file__).resolve().parent.parent
BASE = {"KAFKA_BOOTSTRAP_SERVERS": "broker-1:9092,broker-2:9092", "TIKTOK_ACCESS_TOKEN": "tok-123"}


def env(**extra: str) -> dict[str, str]:
    out = dict(BASE)
    out.update(extra)
    return out


def config_error(environ: dict[str, str]) -> str:
    with pytest.raises(ConfigError) as info:
        load_settings(environ)
    return str(info.value)


# -- KAFKA_<PROPERTY> passthrough --------------------------------------------------------------------------------


def test_passthrough_maps_underscores_to_dots_lower_cased() -> None:
    got = kafka_passthrough(
        {
            "KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
            "KAFKA_SASL_MECHANISM": "PLAIN",
            "KAFKA_SASL_USERNAME": "api-key",
            "KAFKA_SASL_PASSWORD": "api-secret",
            "KAFKA_SSL_CA_LOCATION": "/etc/ssl/ca.pem",
            "kafka_client_id": "pod-1",  # names are case-insensitive
            "KAFKA_BOOTSTRAP_SERVERS": "b:9092",  # has its own field, never passed twice
            "SOURCE_TOPIC": "t",
            "MY_KAFKA_THING": "x",
        }
    )
    assert got == {
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "PLAIN",
        "sasl.username": "api-key",
        "sasl.password": "api-secret",
        "ssl.ca.location": "/etc/ssl/ca.pem",
        "client.id": "pod-1",
    }


def test_passthrough_keeps_values_verbatim() -> None:
    assert kafka_passthrough({"KAFKA_SASL_OAUTHBEARER_CONFIG": "principal=Admin scope=A_b"}) == {
        "sasl.oauthbearer.config": "principal=Admin scope=A_b"
    }


def test_consumer_config_has_the_contract_defaults() -> None:
    s = load_settings(env(CONSUMER_GROUP="grp"))
    conf = consumer_config(s, env())
    assert conf["bootstrap.servers"] == "broker-1:9092,broker-2:9092"
    assert conf["group.id"] == "grp"
    assert conf["auto.offset.reset"] == "earliest"
    assert conf["enable.auto.offset.store"] == "false"
    assert conf["partition.assignment.strategy"] == "cooperative-sticky"
    assert set(CONSUMER_DEFAULTS) <= set(conf)


def test_consumer_defaults_are_overridable_through_passthrough() -> None:
    environ = env(
        KAFKA_AUTO_OFFSET_RESET="latest",
        KAFKA_PARTITION_ASSIGNMENT_STRATEGY="range",
        KAFKA_SESSION_TIMEOUT_MS="6000",
        KAFKA_SECURITY_PROTOCOL="SSL",
    )
    conf = consumer_config(load_settings(environ), environ)
    assert conf["auto.offset.reset"] == "latest"
    assert conf["partition.assignment.strategy"] == "range"
    assert conf["session.timeout.ms"] == "6000"
    assert conf["security.protocol"] == "SSL"
    assert conf["enable.auto.offset.store"] == "false"


def test_producer_config_keeps_security_drops_consumer_keys_and_forces_idempotence() -> None:
    environ = env(
        KAFKA_SECURITY_PROTOCOL="SASL_SSL",
        KAFKA_SASL_MECHANISM="SCRAM-SHA-512",
        KAFKA_SESSION_TIMEOUT_MS="6000",
        KAFKA_AUTO_COMMIT_INTERVAL_MS="500",
        KAFKA_GROUP_INSTANCE_ID="pod-1",
        KAFKA_ENABLE_IDEMPOTENCE="false",
        KAFKA_ACKS="1",
    )
    conf = producer_config(load_settings(environ), environ)
    assert conf["bootstrap.servers"] == "broker-1:9092,broker-2:9092"
    assert conf["security.protocol"] == "SASL_SSL"
    assert conf["sasl.mechanism"] == "SCRAM-SHA-512"
    for consumer_only in ("session.timeout.ms", "auto.commit.interval.ms", "group.instance.id", "group.id"):
        assert consumer_only not in conf
    assert conf["enable.idempotence"] == "true", "dead letters are written idempotently whatever the env says"
    assert conf["acks"] == "all"


# -- defaults and overrides --------------------------------------------------------------------------------------


def test_defaults() -> None:
    s = load_settings(env())
    assert s.source_topics == ["audience-membership"]
    assert s.dead_letter_topic == "audience-membership.dlq"
    assert s.consumer_group == "audience-sync"
    assert s.tiktok_api_url == DEFAULT_TIKTOK_API_URL
    assert (s.http_host, s.http_port) == ("0.0.0.0", 8080)
    assert s.phone_default_region == "US"
    assert s.mappings_file is None and s.default_advertiser_id is None and s.schema_registry_url is None
    assert (s.send_email, s.send_phone, s.send_idfa, s.send_aaid) == (True, True, True, True)
    assert s.enter_names() == ("Audience Entered",)
    assert s.exit_names() == ("Audience Exited",)
    assert s.max_record_bytes == 1_048_576
    assert (s.batch_max_rows, s.batch_max_bytes, s.batch_linger_ms) == (1000, 2_000_000, 1000)
    assert (s.max_inflight_requests, s.max_pending_events) == (4, 50_000)
    assert (s.drain_timeout_s, s.revoke_timeout_s, s.tiktok_timeout_s) == (20.0, 10.0, 10.0)
    assert (s.tiktok_max_qps, s.tiktok_control_qps, s.tiktok_quota_pause_s) == (8.0, 1.0, 310.0)
    assert s.batch_max_rows_ceiling == 10_000
    assert (s.retry_base_s, s.retry_max_s, s.retry_budget_s, s.auth_retry_s) == (0.5, 30.0, 300.0, 15.0)
    assert (s.dlq_guard_max_consecutive, s.dlq_guard_cooldown_s) == (1000, 300.0)
    assert s.log_level == "INFO"


def test_overrides_are_parsed_to_their_types() -> None:
    s = load_settings(
        env(
            SOURCE_TOPIC=" a , b ,",
            CONSUMER_GROUP="g",
            HTTP_PORT="9100",
            SEND_PHONE="false",
            SEND_AAID="0",
            ENTER_EVENT_NAMES="In, Joined",
            BATCH_MAX_ROWS="10000",
            BATCH_LINGER_MS="0",
            TIKTOK_MAX_QPS="8",
            DRAIN_TIMEOUT_S="2.5",
            DEFAULT_ADVERTISER_ID="7000000000000000001",
            DLQ_GUARD_MAX_CONSECUTIVE="0",
        )
    )
    assert s.source_topics == ["a", "b"]
    assert s.dead_letter_topic == "a.dlq", "the default DLQ follows the first source topic"
    assert s.consumer_group == "g"
    assert s.http_port == 9100
    assert (s.send_phone, s.send_aaid, s.send_email) == (False, False, True)
    assert s.enter_names() == ("In", "Joined")
    assert (s.batch_max_rows, s.batch_linger_ms) == (10_000, 0)
    assert s.tiktok_max_qps == 8.0
    assert s.drain_timeout_s == 2.5
    assert s.default_advertiser_id == "7000000000000000001"
    assert s.dlq_guard_max_consecutive == 0


def test_variable_names_are_case_insensitive_and_empty_values_mean_unset() -> None:
    s = load_settings({"kafka_bootstrap_servers": "b:9092", "tiktok_access_token": "t", "CONSUMER_GROUP": ""})
    assert s.kafka_bootstrap_servers == "b:9092"
    assert s.consumer_group == "audience-sync"


def test_only_the_given_environment_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONSUMER_GROUP", "from-process-env")
    assert load_settings(env()).consumer_group == "audience-sync"
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "proc:9092")
    monkeypatch.setenv("TIKTOK_ACCESS_TOKEN", "proc-token")
    assert load_settings().consumer_group == "from-process-env", "without an argument, os.environ is read"


# -- masking -----------------------------------------------------------------------------------------------------


def test_mask_hides_secret_looking_keys_and_keeps_the_rest() -> None:
    conf = {
        "bootstrap.servers": "b:9092",
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "PLAIN",
        "sasl.username": "ABCDEF123",
        "sasl.password": "s3cr3t",
        "ssl.key.password": "kp",
        "ssl.key.pem": "-----BEGIN PRIVATE KEY-----",
        "ssl.keystore.password": "ksp",
        "sasl.oauthbearer.client.secret": "cs",
        "sasl.jaas.config": "org.apache... password=x",
        "SASL.PASSWORD": "upper",
        "api_token": "t",
        "group.id": "g",
    }
    masked = mask(conf)
    for key in (
        "sasl.password",
        "ssl.key.password",
        "ssl.key.pem",
        "ssl.keystore.password",
        "sasl.oauthbearer.client.secret",
        "sasl.jaas.config",
        "SASL.PASSWORD",
        "api_token",
    ):
        assert masked[key] == "***", key
    for key in ("bootstrap.servers", "security.protocol", "sasl.mechanism", "sasl.username", "group.id"):
        assert masked[key] == conf[key], key
    assert conf["sasl.password"] == "s3cr3t", "mask returns a copy"


def test_masked_consumer_config_never_shows_the_kafka_password() -> None:
    environ = env(KAFKA_SASL_PASSWORD="hunter2-secret", KAFKA_SSL_KEY_PASSWORD="pem-pass")
    text = repr(mask(consumer_config(load_settings(environ), environ)))
    assert "hunter2-secret" not in text and "pem-pass" not in text
    assert "'sasl.password': '***'" in text


def test_the_access_token_does_not_appear_in_settings_repr() -> None:
    s = load_settings(env(TIKTOK_ACCESS_TOKEN="very-secret-token"))
    assert "very-secret-token" not in repr(s) and "very-secret-token" not in str(s)


# -- errors: one line naming the variable ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("environ", "variable"),
    [
        ({"TIKTOK_ACCESS_TOKEN": "t"}, "KAFKA_BOOTSTRAP_SERVERS"),
        (env(KAFKA_BOOTSTRAP_SERVERS=""), "KAFKA_BOOTSTRAP_SERVERS"),
        (env(KAFKA_BOOTSTRAP_SERVERS="   "), "KAFKA_BOOTSTRAP_SERVERS"),
        (env(SOURCE_TOPIC="  "), "SOURCE_TOPIC"),
        (env(CONSUMER_GROUP=" "), "CONSUMER_GROUP"),
        (env(HTTP_PORT="abc"), "HTTP_PORT"),
        (env(HTTP_PORT="70000"), "HTTP_PORT"),
        (env(BATCH_MAX_ROWS="10001"), "BATCH_MAX_ROWS"),
        (env(BATCH_MAX_ROWS="0"), "BATCH_MAX_ROWS"),
        (env(MAX_INFLIGHT_REQUESTS="0"), "MAX_INFLIGHT_REQUESTS"),
        (env(TIKTOK_MAX_QPS="0"), "TIKTOK_MAX_QPS"),
        (env(DRAIN_TIMEOUT_S="-1"), "DRAIN_TIMEOUT_S"),
        (env(SEND_EMAIL="maybe"), "SEND_EMAIL"),
        (env(DEFAULT_ADVERTISER_ID="adv-1"), "DEFAULT_ADVERTISER_ID"),
        (env(MAPPINGS_FILE="/nonexistent/mappings.yaml"), "MAPPINGS_FILE"),
        (env(TIKTOK_ACCESS_TOKEN_FILE="/nonexistent/token"), "TIKTOK_ACCESS_TOKEN_FILE"),
        (env(REFRESH_PUSHGATEWAY_URL="ftp://pushgateway:9091"), "REFRESH_PUSHGATEWAY_URL"),
        (env(REFRESH_PUSHGATEWAY_URL="http://pushgateway:port"), "REFRESH_PUSHGATEWAY_URL"),
        (env(REFRESH_PUSHGATEWAY_URL="   "), "REFRESH_PUSHGATEWAY_URL"),
    ],
)
def test_bad_value_is_one_line_naming_the_variable(environ: dict[str, str], variable: str) -> None:
    msg = config_error(environ)
    assert "\n" not in msg
    assert variable in msg
    assert msg.startswith("configuration error: ")


def test_missing_token_names_both_variables() -> None:
    msg = config_error({"KAFKA_BOOTSTRAP_SERVERS": "b:9092"})
    assert "TIKTOK_ACCESS_TOKEN" in msg and "TIKTOK_ACCESS_TOKEN_FILE" in msg and "\n" not in msg


def test_several_mistakes_are_reported_on_the_same_line() -> None:
    msg = config_error(env(HTTP_PORT="99999", BATCH_MAX_ROWS="0"))
    assert "HTTP_PORT" in msg and "BATCH_MAX_ROWS" in msg and "\n" not in msg


def test_error_messages_never_echo_the_rejected_secret() -> None:
    msg = config_error(env(TIKTOK_ACCESS_TOKEN="tok-should-not-leak", HTTP_PORT="tok-should-not-leak-either"))
    assert "tok-should-not-leak" not in msg


def test_refresh_pushgateway_url_is_optional_and_never_echoes_credentials() -> None:
    assert load_settings(env()).refresh_pushgateway_url is None, "unset: refresh pushes nothing"
    for url in ("http://prometheus-pushgateway.monitoring:9091", "https://pg.example.com/push", "pushgateway:9091"):
        assert load_settings(env(REFRESH_PUSHGATEWAY_URL=f" {url} ")).refresh_pushgateway_url == url
    msg = config_error(env(REFRESH_PUSHGATEWAY_URL="http://admin:hunter2@pushgateway:9091"))
    assert "REFRESH_PUSHGATEWAY_URL: credentials in the URL are not supported" in msg and "hunter2" not in msg


def test_run_with_bad_config_exits_2_with_one_line() -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("KAFKA_", "TIKTOK_"))}
    clean.update(KAFKA_BOOTSTRAP_SERVERS="127.0.0.1:1", TIKTOK_ACCESS_TOKEN="t", BATCH_MAX_ROWS="20000")
    proc = subprocess.run(
        [sys.executable, "-m", "service", "run"], env=clean, cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "BATCH_MAX_ROWS" in lines[0]


# -- DLQ == source refused ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "dlq"),
    [("audience-membership", "audience-membership"), ("a, b", "b"), ("a,b", "a")],
)
def test_dlq_topic_equal_to_a_source_topic_is_refused(source: str, dlq: str) -> None:
    msg = config_error(env(SOURCE_TOPIC=source, DLQ_TOPIC=dlq))
    assert "DLQ_TOPIC" in msg and "SOURCE_TOPIC" in msg and "\n" not in msg


def test_dlq_topic_distinct_from_sources_is_accepted() -> None:
    s = load_settings(env(SOURCE_TOPIC="a,b", DLQ_TOPIC="sync-dead-letters"))
    assert s.dead_letter_topic == "sync-dead-letters"


def test_default_dlq_that_is_also_a_source_topic_is_refused() -> None:
    config_error(env(SOURCE_TOPIC="a,a.dlq"))


def test_source_topic_list_without_a_name_is_refused() -> None:
    config_error(env(SOURCE_TOPIC=","))


# -- token file --------------------------------------------------------------------------------------------------


def test_token_file_is_read_stripped_and_re_read_when_it_changes(tmp_path: Path) -> None:
    path = tmp_path / "access-token"
    path.write_text("first-token\n")
    s = load_settings({"KAFKA_BOOTSTRAP_SERVERS": "b:9092", "TIKTOK_ACCESS_TOKEN_FILE": str(path)})
    assert s.tiktok_access_token is None
    source = TokenSource(s)
    assert source.get() == "first-token"
    path.write_text("  rotated-token \n")
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # a visible mtime change
    assert source.get() == "rotated-token", "a rotated secret needs no restart"


def test_token_file_that_disappears_keeps_the_last_good_token(tmp_path: Path) -> None:
    path = tmp_path / "access-token"
    path.write_text("good-token")
    source = TokenSource(load_settings({"KAFKA_BOOTSTRAP_SERVERS": "b", "TIKTOK_ACCESS_TOKEN_FILE": str(path)}))
    assert source.get() == "good-token"
    path.unlink()
    assert source.get() == "good-token"


def test_token_file_wins_over_the_inline_token(tmp_path: Path) -> None:
    path = tmp_path / "access-token"
    path.write_text("file-token")
    source = TokenSource(load_settings(env(TIKTOK_ACCESS_TOKEN="inline", TIKTOK_ACCESS_TOKEN_FILE=str(path))))
    assert source.get() == "file-token"


def test_inline_token() -> None:
    assert TokenSource(load_settings(env(TIKTOK_ACCESS_TOKEN="inline-token"))).get() == "inline-token"


def test_unknown_log_level_is_refused() -> None:
    msg = config_error(env(LOG_LEVEL="loud"))
    assert msg.startswith("configuration error: LOG_LEVEL")


def test_librdkafka_properties_with_underscores_keep_them() -> None:
    assert kafka_passthrough({"KAFKA_LOG_LEVEL": "3"}) == {"log_level": "3"}


def test_revoke_timeout_stays_under_the_consumer_bridge_timeout() -> None:
    """The rebalance callback waits 30 s for the revoke hook; a longer flush deadline could never be honoured
    (before: any value was accepted, and a 60 s deadline ended in an uncommitted revoke)."""
    assert "REVOKE_TIMEOUT_S" in config_error(env(REVOKE_TIMEOUT_S="60"))
