"""Configuration from the environment (12-factor), validated before anything starts.

pydantic-settings does the parsing and type checks; this module adds the contract's rules on top: the librdkafka
passthrough (`KAFKA_<PROPERTY>`), the token-or-token-file rule, and one clear line per mistake.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.kafka import msk_iam
from service.logs import LOG_FORMATS

DEFAULT_TIKTOK_API_URL = "https://business-api.tiktok.com/open_api/v1.3"

# librdkafka defaults the contract fixes; each can be overridden through KAFKA_<PROPERTY>.
CONSUMER_DEFAULTS: dict[str, str] = {
    "auto.offset.reset": "earliest",
    "enable.auto.offset.store": "false",
    "partition.assignment.strategy": "cooperative-sticky",
}

_AWS_REGION = re.compile(r"[a-z]{2}(-[a-z]+)+-\d+")

# Keys whose values never reach a log line.
_SECRET_HINTS = ("password", "secret", "token", "key", "jaas")


class ConfigError(Exception):
    """Bad configuration: the message is one line naming the variable."""


class Settings(BaseSettings):
    """Every environment variable the service reads (see README "Configuration")."""

    model_config = SettingsConfigDict(case_sensitive=False, extra="ignore", env_ignore_empty=True)

    kafka_bootstrap_servers: str
    kafka_msk_iam_region: str | None = None
    source_topic: str = "audience-membership"
    dlq_topic: str | None = None
    consumer_group: str = "audience-sync"
    tiktok_api_url: str = DEFAULT_TIKTOK_API_URL
    tiktok_access_token: SecretStr | None = None
    tiktok_access_token_file: Path | None = None
    http_host: str = "0.0.0.0"
    http_port: int = Field(8080, ge=0, le=65535)
    mappings_file: Path | None = None
    default_advertiser_id: str | None = None
    phone_default_region: str = "US"
    schema_registry_url: str | None = None
    audience_store_topic: str | None = None

    send_email: bool = True
    send_phone: bool = True
    send_idfa: bool = True
    send_aaid: bool = True
    enter_event_names: str = "Audience Entered"
    exit_event_names: str = "Audience Exited"
    max_record_bytes: int = Field(1_048_576, ge=1)

    batch_max_rows: int = Field(1000, ge=1, le=10_000)
    # Rows per request while requests are scarce (a backlog with the QPS cap binding); >= batch_max_rows.
    batch_max_rows_ceiling: int = Field(10_000, ge=1, le=10_000)
    batch_max_bytes: int = Field(2_000_000, ge=1024)
    batch_linger_ms: int = Field(1000, ge=0)
    max_inflight_requests: int = Field(4, ge=1, le=256)
    # File audiences (mode: file): seconds between uploads and users per upload, unless the entry says otherwise.
    file_interval_s: float = Field(300.0, ge=1, le=7 * 86400)
    file_max_rows: int = Field(100_000, ge=1, le=1_000_000)
    max_pending_events: int = Field(50_000, ge=100)
    drain_timeout_s: float = Field(20.0, gt=0)
    revoke_timeout_s: float = Field(10.0, gt=0, le=25)  # the consumer bridge waits 30 s for the revoke hook

    tiktok_timeout_s: float = Field(10.0, gt=0)
    # TikTok's Basic tier (every new app) is 10 QPS / 600 QPM per developer app: 8 leaves room for the
    # control-plane limiter and for window alignment (docs/operations.md "TikTok rate budget").
    tiktok_max_qps: float = Field(8.0, gt=0)
    # /event/track/ (offline events) has its own budget, 1,000 QPS per app (docs/tiktok-api.md §8.1).
    tiktok_events_max_qps: float = Field(50.0, gt=0, le=1000)
    tiktok_control_qps: float = Field(1.0, gt=0)
    tiktok_quota_pause_s: float = Field(310.0, gt=0)
    retry_base_s: float = Field(0.5, gt=0)
    retry_max_s: float = Field(30.0, gt=0)
    retry_budget_s: float = Field(300.0, gt=0)
    auth_retry_s: float = Field(15.0, gt=0)

    dlq_guard_max_consecutive: int = Field(1000, ge=0)
    dlq_guard_cooldown_s: float = Field(300.0, gt=0)
    dlq_guard_max_ratio: float = Field(0.0, ge=0, lt=1)
    dlq_guard_window: int = Field(1000, ge=1)

    audience_health_interval_s: float = Field(300.0, ge=0)  # 0 disables the audience health poll

    # `refresh` only: the Prometheus Pushgateway its runs push their metrics to; unset, nothing is pushed.
    refresh_pushgateway_url: str | None = None

    log_level: str = "INFO"
    log_format: str = "text"

    @classmethod
    def settings_customise_sources(cls, settings_cls: Any, init_settings: Any, *args: Any, **kw: Any) -> Any:
        # `load_settings` hands over the environment explicitly, so tests never leak the process's own.
        return (init_settings,)

    @field_validator("log_level")
    @classmethod
    def _level(cls, v: str) -> str:
        if v.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ValueError("must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL")
        return v.upper()

    @field_validator("log_format")
    @classmethod
    def _log_format(cls, v: str) -> str:
        if v.strip().lower() not in LOG_FORMATS:
            raise ValueError(f"must be one of {', '.join(LOG_FORMATS)}")
        return v.strip().lower()

    @field_validator("default_advertiser_id")
    @classmethod
    def _digits(cls, v: str | None) -> str | None:
        if v is not None and not v.isdigit():
            raise ValueError("must be a numeric TikTok advertiser id")
        return v

    @field_validator("kafka_msk_iam_region")
    @classmethod
    def _region(cls, v: str | None) -> str | None:
        if v is not None and not _AWS_REGION.fullmatch(v.strip()):
            raise ValueError("must be an AWS region such as us-east-1")
        return v.strip() if v is not None else None

    @field_validator("refresh_pushgateway_url")
    @classmethod
    def _pushgateway(cls, v: str | None) -> str | None:
        return None if v is None else check_pushgateway_url(v)

    @field_validator("kafka_bootstrap_servers", "source_topic", "consumer_group", "tiktok_api_url")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        return v.strip()

    @model_validator(mode="after")
    def _checks(self) -> Settings:
        if self.tiktok_access_token is None and self.tiktok_access_token_file is None:
            raise ValueError("TIKTOK_ACCESS_TOKEN or TIKTOK_ACCESS_TOKEN_FILE must be set")
        if self.tiktok_access_token_file is not None and not self.tiktok_access_token_file.is_file():
            raise ValueError(f"TIKTOK_ACCESS_TOKEN_FILE: no such file {self.tiktok_access_token_file}")
        if self.mappings_file is not None and not self.mappings_file.is_file():
            raise ValueError(f"MAPPINGS_FILE: no such file {self.mappings_file}")
        if not self.source_topics:
            raise ValueError("SOURCE_TOPIC: no topic name")
        if self.dead_letter_topic in self.source_topics:
            raise ValueError(
                f"DLQ_TOPIC {self.dead_letter_topic!r} must not be one of SOURCE_TOPIC "
                "(a dead letter would be consumed again)"
            )
        if self.batch_max_rows_ceiling < self.batch_max_rows:
            raise ValueError(
                f"BATCH_MAX_ROWS_CEILING ({self.batch_max_rows_ceiling}) must be >= BATCH_MAX_ROWS "
                f"({self.batch_max_rows})"
            )
        return self

    @property
    def source_topics(self) -> list[str]:
        return [t.strip() for t in self.source_topic.split(",") if t.strip()]

    @property
    def dead_letter_topic(self) -> str:
        return self.dlq_topic or f"{self.source_topics[0]}.dlq"

    @property
    def audience_store(self) -> str:
        """The compacted topic holding audiences created on demand (one per consumer group)."""
        return self.audience_store_topic or f"{self.consumer_group}.audiences"

    def enter_names(self) -> tuple[str, ...]:
        return tuple(n.strip() for n in self.enter_event_names.split(",") if n.strip())

    def exit_names(self) -> tuple[str, ...]:
        return tuple(n.strip() for n in self.exit_event_names.split(",") if n.strip())


def check_pushgateway_url(text: str) -> str:
    """A Pushgateway address: `http(s)://host[:port][/prefix]`, or `host[:port]` (http, as prometheus_client
    assumes). ValueError otherwise, never quoting the value. No credentials in it: the URL may be printed."""
    url = text.strip()
    if not url:
        raise ValueError("must not be empty")
    try:
        parts = urlsplit(url if "://" in url else f"http://{url}")
        parts.port  # noqa: B018 -- raises ValueError for a port that is not a number in range
    except ValueError:
        raise ValueError("not a URL (expected http://host:9091)") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL of a Pushgateway, such as http://pushgateway:9091")
    if parts.username is not None or parts.password is not None:
        raise ValueError("credentials in the URL are not supported")
    if parts.query or parts.fragment:
        raise ValueError("must have no query or fragment")
    return url


# librdkafka properties whose names contain an underscore: `_` → `.` would mangle them.
_UNDERSCORE_PROPERTIES = {"log_level"}


def kafka_passthrough(environ: Mapping[str, str]) -> dict[str, str]:
    """`KAFKA_SECURITY_PROTOCOL=SASL_SSL` → `security.protocol`; KAFKA_* settings of our own (the bootstrap
    servers, the MSK IAM region) have their own fields."""
    own = {name.upper() for name in Settings.model_fields if name.startswith("kafka_")}
    out: dict[str, str] = {}
    for name, value in environ.items():
        upper = name.upper()
        if upper.startswith("KAFKA_") and upper not in own:
            raw = upper[len("KAFKA_") :].lower()
            out[raw if raw in _UNDERSCORE_PROPERTIES else raw.replace("_", ".")] = value
    return out


def msk_iam_config(settings: Settings, passthrough: Mapping[str, str]) -> dict[str, Any]:
    """With KAFKA_MSK_IAM_REGION: SASL_SSL + OAUTHBEARER (unless set explicitly) and the token callback.

    ConfigError when the signer is not installed or another SASL mechanism was set explicitly."""
    region = settings.kafka_msk_iam_region
    if region is None:
        return {}
    mechanism = passthrough.get("sasl.mechanism", "OAUTHBEARER")
    if mechanism.upper() != "OAUTHBEARER":
        raise ConfigError(
            f"KAFKA_MSK_IAM_REGION: MSK IAM needs SASL mechanism OAUTHBEARER, but KAFKA_SASL_MECHANISM is {mechanism!r}"
        )
    try:
        provider = msk_iam.MskIamTokenProvider(region)
    except msk_iam.SignerUnavailable as exc:
        raise ConfigError(str(exc)) from None
    return {**{k: v for k, v in msk_iam.SASL_DEFAULTS.items() if k not in passthrough}, "oauth_cb": provider}


def consumer_config(settings: Settings, environ: Mapping[str, str]) -> dict[str, Any]:
    passthrough = kafka_passthrough(environ)
    conf: dict[str, Any] = {"bootstrap.servers": settings.kafka_bootstrap_servers, "group.id": settings.consumer_group}
    conf.update(CONSUMER_DEFAULTS)
    conf.update(passthrough)
    conf.update(msk_iam_config(settings, passthrough))
    return conf


_CONSUMER_ONLY = {
    "group.id",
    "auto.offset.reset",
    "enable.auto.offset.store",
    "enable.auto.commit",
    "auto.commit.interval.ms",
    "partition.assignment.strategy",
    "session.timeout.ms",
    "heartbeat.interval.ms",
    "max.poll.interval.ms",
    "group.protocol",
    "group.instance.id",
    "fetch.min.bytes",
    "fetch.wait.max.ms",
    "isolation.level",
}


def client_config(settings: Settings, environ: Mapping[str, str]) -> dict[str, Any]:
    """Connection and security settings only: for the service's own producers, admin and helper consumers."""
    passthrough = kafka_passthrough(environ)
    conf: dict[str, Any] = {"bootstrap.servers": settings.kafka_bootstrap_servers}
    conf.update({k: v for k, v in passthrough.items() if k not in _CONSUMER_ONLY})
    conf.update(msk_iam_config(settings, passthrough))
    return conf


def producer_config(settings: Settings, environ: Mapping[str, str]) -> dict[str, Any]:
    """The DLQ producer: idempotent, acks from all replicas; consumer-only passthrough keys are dropped."""
    return {**client_config(settings, environ), "enable.idempotence": "true", "acks": "all"}


def mask(conf: Mapping[str, Any]) -> dict[str, Any]:
    """A copy safe to log: values of secret-looking keys replaced."""
    return {k: ("***" if any(h in k.lower() for h in _SECRET_HINTS) else v) for k, v in conf.items()}


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    env = os.environ if environ is None else environ
    fields = Settings.model_fields
    values = {k.lower(): v for k, v in env.items() if k.lower() in fields and v != ""}
    try:
        settings = Settings.model_validate(values)
    except ValidationError as exc:
        raise ConfigError(_one_line(exc)) from None
    msk_iam_config(settings, kafka_passthrough(env))  # fail at startup, not at the first connection
    return settings


def _one_line(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors(include_url=False, include_input=False):
        loc = "_".join(str(x) for x in err["loc"]).upper()
        msg = str(err["msg"]).removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "configuration error: " + "; ".join(parts)


class TokenSource:
    """The access token, re-read from its file when the file changes (a rotated secret needs no restart)."""

    def __init__(self, settings: Settings) -> None:
        self._static = settings.tiktok_access_token
        self._path = settings.tiktok_access_token_file
        self._mtime: float | None = None
        self._cached = ""

    def get(self) -> str:
        if self._path is None:
            return self._static.get_secret_value() if self._static else ""
        try:
            mtime = self._path.stat().st_mtime
            if mtime != self._mtime:
                self._cached = self._path.read_text().strip()
                self._mtime = mtime
        except OSError:
            pass  # keep the last good token; the auth probe reports the outage
        return self._cached
