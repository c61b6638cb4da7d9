"""service/logs.py: LOG_FORMAT=text|json, the JSON line shape, context fields, and the redactor under the privacy
rule (no raw email, phone, IP address, user agent or access token in any log line)."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from service.config import ConfigError, load_settings
from service.logs import CONTEXT_FIELDS, Redactor, env_secrets, setup_logging

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "tok-LOGS-s3cr3t-8e1f0a"
BASE = {"KAFKA_BOOTSTRAP_SERVERS": "broker-1:9092", "TIKTOK_ACCESS_TOKEN": TOKEN}
CONTEXT = {
    "topic": "audience-membership",
    "partition": 3,
    "offset": 1234567,
    "reason": "missing_audience_id",
    "audience_key": "high_value_customers",
    "tiktok_code": 40002,
    "tiktok_request_id": "20261122013000000000ABCDEF",
}

# Raw identifiers in the forms a CDP sends them; none may survive in a log line.
EMAILS = ["Priv.User7@Secret-Corp7.Example", "  MIXED.case+tag@sub.mail-priv.example ", "broken.email1@@nowhere-priv"]
PHONES = ["+1 650 555 0199", "+14155551100", "+44 20 7946 0018", "(415) 555-1100", "415-555-1100", "+0 7319 146"]
IPS = ["81.2.69.160", "2a02:c7f:8e1a::3d", "8.8.4.4"]
USER_AGENTS = [
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
    "Version/17.4 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0.0.0 Mobile "
    "Safari/537.36",
    "Dalvik/2.1.0 (Linux; U; Android 13; SM-S911B Build/TP1A.220624.014)",
    "PrivApp/5.2 (Android 14; Pixel 8; build PRIV01234) okhttp/4.12.0",
    "PrivApp/1408 CFNetwork/1494.0.7 Darwin/23.4.0",
]
RAW = [e.strip() for e in EMAILS] + PHONES + IPS + USER_AGENTS + [TOKEN]

# Must stay readable: the service's own identifiers, addresses and times.
KEPT = [
    "1100000001",  # TikTok audience id
    "7654321098765432109",  # advertiser id
    "127.0.0.1:9092",
    "10.0.3.4:9092",
    "[::1]:8080",
    "2026-11-22T01:30:00.123+00:00",
    "12:30:45",
    "5f3a2b18-9c4d-4e7f-b8e2-17d3a1e69b25",
    "0315b4020af3eccab7706679580ac87a710d82970733b8719e70af9b57e7b9e6",
    "/etc/audience-sync/mappings.yaml",
    "http://127.0.0.1:8080/metrics",
    "TikTok rejected the access token",
    "confluent-kafka 2.16.1",
    "audience-membership[3]@1234567",
]


@pytest.fixture
def capture() -> Iterator[Any]:
    """setup_logging into a buffer; the root logger's handlers and level are restored afterwards."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    buffers: list[io.StringIO] = []

    def start(log_format: str, level: str = "DEBUG") -> io.StringIO:
        buf = io.StringIO()
        setup_logging(level, log_format, secrets=lambda: [TOKEN], stream=buf, hooks=False)
        buffers.append(buf)
        return buf

    try:
        yield start
    finally:
        for h in root.handlers[:]:
            if h not in saved[0]:
                root.removeHandler(h)
        root.setLevel(saved[1])


def lines(buf: io.StringIO) -> list[dict[str, Any]]:
    out = []
    for line in buf.getvalue().splitlines():
        obj = orjson.loads(line)
        assert isinstance(obj, dict)
        out.append(obj)
    return out


# -- JSON lines ------------------------------------------------------------------------------------------------


def test_json_line_has_time_level_logger_message_then_context_fields(capture: Any) -> None:
    buf = capture("json")
    logging.getLogger("service.pipeline.dead_letters").warning("dead-lettered %d record(s)", 2, extra=CONTEXT)
    [obj] = lines(buf)
    assert list(obj)[:4] == ["time", "level", "logger", "message"]
    assert obj["level"] == "WARNING" and obj["logger"] == "service.pipeline.dead_letters"
    assert obj["message"] == "dead-lettered 2 record(s)"
    assert obj["time"].endswith("Z") and obj["time"][10] == "T" and len(obj["time"]) == len("2026-11-22T01:30:00.123Z")
    assert {k: obj[k] for k in CONTEXT} == CONTEXT  # numbers stay numbers
    assert set(CONTEXT) == set(CONTEXT_FIELDS)


def test_json_one_line_per_record_even_with_newlines_and_a_traceback(capture: Any) -> None:
    buf = capture("json")
    log = logging.getLogger("service")
    log.info('two\nlines and a quote " and ünicode')
    try:
        raise RuntimeError("upload failed")
    except RuntimeError:
        log.exception("unexpected", extra={"topic": "t"})
    first, second = lines(buf)
    assert first["message"] == 'two\nlines and a quote " and ünicode'
    assert second["message"] == "unexpected" and second["topic"] == "t"
    assert "Traceback" in second["exception"] and "RuntimeError: upload failed" in second["exception"]


def test_json_respects_the_level(capture: Any) -> None:
    buf = capture("json", "WARNING")
    logging.getLogger("service").info("not shown")
    logging.getLogger("service").error("shown")
    assert [o["message"] for o in lines(buf)] == ["shown"]


def test_text_line_keeps_its_format_and_appends_context_fields(capture: Any) -> None:
    buf = capture("text")
    log = logging.getLogger("service.pipeline.uploads")
    log.info("plain")
    log.error("TikTok refused the batch", extra={"tiktok_code": 40002, "tiktok_request_id": "req-1", "other": "x"})
    plain, refused = buf.getvalue().splitlines()
    assert plain.endswith(" INFO service.pipeline.uploads: plain")
    assert refused.endswith(
        "ERROR service.pipeline.uploads: TikTok refused the batch tiktok_code=40002 tiktok_request_id=req-1"
    )


def test_setup_replaces_its_own_handler(capture: Any) -> None:
    first = capture("text")
    second = capture("json")
    logging.getLogger("service").warning("once")
    assert first.getvalue() == ""
    assert [o["message"] for o in lines(second)] == ["once"]


# -- the privacy rule ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("log_format", ["text", "json"])
@pytest.mark.parametrize("raw", RAW)
def test_no_raw_identifier_nor_token_in_any_part_of_a_line(capture: Any, log_format: str, raw: str) -> None:
    buf = capture(log_format)
    log = logging.getLogger("service.pipeline.intake")
    log.warning("as an argument: %s; in the message itself: " + raw.replace("%", "%%"), raw)
    log.warning("in context fields", extra={"reason": raw, "audience_key": f"k {raw} k", "detail": {"nested": [raw]}})
    try:
        raise ValueError(f"bad value {raw!r}")
    except ValueError:
        log.exception("in a traceback")
    out = buf.getvalue()
    if log_format == "json":
        assert len(lines(buf)) == 3
        out = "\n".join(str(v) for o in lines(buf) for v in o.values())
    assert raw.lower() not in out.lower()
    assert "in context fields" in out  # the line itself is kept, only the identifier goes


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_service_values_stay_readable(capture: Any, log_format: str) -> None:
    buf = capture(log_format)
    text = " | ".join(KEPT)
    logging.getLogger("service").info("%s", text, extra={"topic": "audience-membership", "partition": 3})
    out = lines(buf)[0]["message"] if log_format == "json" else buf.getvalue()
    for kept in KEPT:
        assert kept in out


@pytest.mark.parametrize("key", ["email", "phone", "ip", "client_ip", "user_agent", "userAgent", "access_token"])
def test_fields_named_like_identifiers_are_redacted_whatever_their_value(capture: Any, key: str) -> None:
    buf = capture("json")
    logging.getLogger("service").info("x", extra={key: "harmless-looking", "audience_key": "vip"})
    [obj] = lines(buf)
    assert obj[key] == "[redacted]" and obj["audience_key"] == "vip"


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("Access-Token: abc123def456", "Access-Token: ***"),
        ('{"access_token": "abc123def456"}', '{"access_token": "***"}'),
        ("Authorization: Bearer abc.def.ghi", "Authorization: Bearer ***"),
        ("mail Priv.User7@Secret-Corp7.Example.", "mail [email]"),
        ("call +1 650 555 0199 now", "call [phone] now"),
        ("from 81.2.69.160:443 via 10.0.0.8", "from [ip]:443 via 10.0.0.8"),
        ("ua=Dalvik/2.1.0 (Linux; U; Android 13) end", "ua=[user-agent] end"),
    ],
)
def test_redactor_replacements(text: str, want: str) -> None:
    assert Redactor().redact(text) == want


def test_token_file_rotation_keeps_both_tokens_redacted(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("first-token-aaaaaa\n")
    redactor = Redactor(env_secrets({"TIKTOK_ACCESS_TOKEN_FILE": str(token_file), "KAFKA_SASL_PASSWORD": "kpass-123"}))
    assert redactor.redact("t=first-token-aaaaaa p=kpass-123") == "t=*** p=***"
    token_file.write_text("second-token-bbbbbb\n")
    os.utime(token_file, (1, 1))  # a different mtime, whatever the file system's resolution
    assert redactor.redact("first-token-aaaaaa second-token-bbbbbb") == "*** ***"


def test_short_secret_values_are_not_used() -> None:
    redactor = Redactor(env_secrets({"TIKTOK_ACCESS_TOKEN": "1", "KAFKA_SSL_KEY_PASSWORD": ""}))
    assert redactor.redact("1 partition, 10 records") == "1 partition, 10 records"


# -- configuration and the command line ------------------------------------------------------------------------


def test_log_format_setting() -> None:
    assert load_settings(BASE).log_format == "text"
    assert load_settings({**BASE, "LOG_FORMAT": " JSON "}).log_format == "json"
    assert load_settings({**BASE, "LOG_FORMAT": ""}).log_format == "text"


def test_unknown_log_format_is_a_config_error_naming_the_variable() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({**BASE, "LOG_FORMAT": "logfmt"})
    assert str(info.value) == "configuration error: LOG_FORMAT: must be one of text, json"


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KAFKA_", "TIKTOK_", "LOG_"))}
    env.update(extra)
    return env


def test_run_refuses_an_unknown_log_format_with_exit_2() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "service", "run"],
        env=child_env(**BASE, LOG_FORMAT="yaml"),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "audience-sync: configuration error: LOG_FORMAT: must be one of text, json"
    ]


def test_json_mode_turns_warnings_and_uncaught_exceptions_into_json_lines() -> None:
    code = (
        "import logging, threading, warnings\n"
        "from service.logs import setup_logging\n"
        "setup_logging('INFO', 'json')\n"
        "logging.getLogger('service').info('hello', extra={'topic': 't'})\n"
        "warnings.warn('careful with Priv.User7@Secret-Corp7.Example')\n"
        "t = threading.Thread(target=lambda: 1 / 0, name='worker'); t.start(); t.join()\n"
        f"raise SystemError('token {TOKEN}')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env=child_env(TIKTOK_ACCESS_TOKEN=TOKEN),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    objs = [orjson.loads(line) for line in proc.stderr.splitlines()]  # every line is JSON
    assert [o["level"] for o in objs] == ["INFO", "WARNING", "ERROR", "CRITICAL"]
    assert objs[0]["topic"] == "t"
    assert objs[1]["logger"] == "py.warnings" and "[email]" in objs[1]["message"]
    assert "ZeroDivisionError" in objs[2]["exception"] and "worker" in objs[2]["message"]
    assert "SystemError: token ***" in objs[3]["exception"]
    assert TOKEN not in proc.stderr and "Secret-Corp7" not in proc.stderr
