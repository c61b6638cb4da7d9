"""Log setup: `LOG_FORMAT=text` (one readable line, the default) or `json` (one JSON object per line), both
through one redactor so that no raw identifier or secret reaches a log line.

JSON lines carry `time` (ISO 8601 UTC, milliseconds), `level`, `logger`, `message`, then every field the code
passes with `extra={...}`, as JSON keys: the context fields are named in `CONTEXT_FIELDS` (`topic`,
`partition`, `offset`, `reason`, `audience_key`, `tiktok_code`, `tiktok_request_id`); text lines append the ones
present as `key=value`. An exception adds `exception` (the formatted traceback).

The privacy rule (README "Logs"): raw emails, phones, IP addresses, user agents and the access token never appear
in logs. The code never logs payload values; `Redactor` is the net under that promise, applied to the final text
line and to every string of a JSON line (message, context fields, traceback), never to the record the other
handlers see:

* secrets by value: `TIKTOK_ACCESS_TOKEN`, the content of `TIKTOK_ACCESS_TOKEN_FILE` (re-read when it changes;
  earlier tokens stay redacted after a rotation) and `KAFKA_*` secrets (the names `mask()` hides) → `***`;
  an `Access-Token:` / `access_token=` / `Bearer` value → `***`;
* by shape: email-like text (anything around an `@`) → `[email]`; phone-like text (`+` and 7 or more digits,
  `(415) 555-0100`, `415-555-0100`) → `[phone]`; public IP addresses → `[ip]` (private, loopback and
  link-local ones are the service's own infrastructure: broker and registry addresses stay readable);
  user-agent strings (`Product/1.0 (comment) ...`) → `[user-agent]`;
* by name: a context field called like an identifier or a secret (`email`, `phone`, `ip`, `user_agent`,
  `token`, `password`, ...) → `[redacted]`, whatever its value.

Bare digit strings are not redacted: TikTok advertiser and audience ids, offsets and counts look the same as a
national phone number without punctuation, and the code never logs a phone number in the first place.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import sys
import threading
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Final

from pythonjsonlogger.json import JsonFormatter

LOG_FORMATS: Final = ("text", "json")
DEFAULT_FORMAT: Final = "text"

# The context fields the code passes with `extra={...}` (any other extra key is emitted as well in JSON).
CONTEXT_FIELDS: Final = (
    "topic",
    "partition",
    "offset",
    "reason",
    "audience_key",
    "tiktok_code",
    "tiktok_request_id",
)

TEXT_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# -- redaction -----------------------------------------------------------------------------------------------

_MIN_SECRET_LEN: Final = 6  # shorter "secrets" (a flag like "1") would blank out ordinary text
_MAX_REMEMBERED_SECRETS: Final = 16
_SECRET_NAME_HINTS: Final = ("password", "secret", "token", "key", "jaas")  # as config.mask()
_SENSITIVE_KEY: Final = re.compile(
    r"(?i)^(?:.*_)?(?:e-?mail|phone|msisdn|ip|ip_?addr(?:ess)?|remote_?addr(?:ess)?|client_?ip|user_?agent|"
    r"useragent|ua|idfa|aaid|gaid|maid|advertising_?id|device_?id|access_?token|token|password|secret|"
    r"authorization|cookie|traits)$"
)

_EMAIL: Final = re.compile(r"[^\s@\"'<>()\[\]{},;:=]+@+[^\s@\"'<>()\[\]{},;:=]+")
_PHONE: Final = re.compile(
    r"(?<![\w+])\+\d(?:[\s().-]*\d){6,}"  # +1 650 555 0199, +14155550100, +44 (20) 7946-0001
    r"|\(\d{3}\)\s*\d{3}[\s.-]\d{4}\b"  # (415) 555-0100
    r"|(?<![\w.-])\d{3}[.-]\d{3}[.-]\d{4}(?![\w.-])"  # 415-555-0100, 415.555.0100
)
_IPV4: Final = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?!\w|\.\d)")
_IPV6: Final = re.compile(
    r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{1,4}|(?:\d{1,3}\.){3}\d{1,3})?(?![\w:])"
)
_UA_TOKEN: Final = r"[A-Za-z][\w.!-]*/[\w.+-]+"
_USER_AGENT: Final = re.compile(
    # Product/1.0 (comment) Product/version (comment) ...: browsers, Dalvik, most app user agents
    rf"(?<![\w/])[A-Za-z][\w.!-]*/\d[\w.+-]*\s*\([^()\n]*\)(?:\s*{_UA_TOKEN}(?:\s*\([^()\n]*\))?)*"
    # iOS and Android HTTP stacks without a comment: MyApp/1.2 CFNetwork/1408.0.4 Darwin/22.5.0, okhttp/4.9.0
    rf"|(?<![\w/])(?:{_UA_TOKEN}\s+)*(?:okhttp|CFNetwork|Darwin)/\d[\w.+-]*(?:\s+{_UA_TOKEN})*"
)
_CREDENTIAL: Final = re.compile(
    r"(?i)(\baccess[-_]?token[\"']?\s*[:=]\s*[\"']?|\bauthorization[\"']?\s*[:=]\s*[\"']?(?:bearer\s+)?|\bbearer\s+)"
    r"[^\s\"',;}]+"
)


def _ip(match: re.Match[str]) -> str:
    text = match.group(0)
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return text
    return "[ip]" if address.is_global else text


class Redactor:
    """Removes raw identifiers and secrets from log text (see the module docstring for what and how).

    `secrets` is called for every line and returns the secret values in effect now; every value it ever
    returned stays redacted (bounded), so a rotated token does not reappear."""

    def __init__(self, secrets: Callable[[], Iterable[str]] | None = None) -> None:
        self._secrets = secrets
        self._known: dict[str, None] = {}  # insertion-ordered set, newest last
        self._lock = threading.Lock()

    def _current(self) -> list[str]:
        if self._secrets is not None:
            fresh = [s for s in self._secrets() if len(s) >= _MIN_SECRET_LEN and s not in self._known]
            if fresh:
                with self._lock:
                    for s in fresh:
                        self._known[s] = None
                    while len(self._known) > _MAX_REMEMBERED_SECRETS:
                        del self._known[next(iter(self._known))]
        # Longest first, so a secret containing another is replaced whole.
        return sorted(self._known, key=len, reverse=True)

    def redact(self, text: str) -> str:
        for secret in self._current():
            if secret in text:
                text = text.replace(secret, "***")
        text = _CREDENTIAL.sub(lambda m: m.group(1) + "***", text)
        if "@" in text:
            text = _EMAIL.sub("[email]", text)
        if "/" in text:
            text = _USER_AGENT.sub("[user-agent]", text)
        text = _PHONE.sub("[phone]", text)
        if "." in text:
            text = _IPV4.sub(_ip, text)
        if ":" in text:
            text = _IPV6.sub(_ip, text)
        return text

    def redact_value(self, value: Any) -> Any:
        """A JSON-able value with every string redacted (dict values by key name too)."""
        if isinstance(value, str):
            return self.redact(value)
        if isinstance(value, bool | int | float) or value is None:
            return value
        if isinstance(value, Mapping):
            return {str(k): self.redact_field(str(k), v) for k, v in value.items()}
        if isinstance(value, list | tuple | set | frozenset):
            return [self.redact_value(v) for v in value]
        return self.redact(str(value))

    def redact_field(self, key: str, value: Any) -> Any:
        if value is not None and _SENSITIVE_KEY.match(key):
            return "[redacted]"
        return self.redact_value(value)


def env_secrets(environ: Mapping[str, str] | None = None) -> Callable[[], list[str]]:
    """The secret values of the environment, for `Redactor`: the TikTok token (variable or file, the file
    re-read when its mtime changes) and `KAFKA_*` values whose names look secret."""
    env = os.environ if environ is None else environ
    static = [v.strip() for k, v in env.items() if k.upper() == "TIKTOK_ACCESS_TOKEN" and v.strip()]
    static += [
        v.strip()
        for k, v in env.items()
        if k.upper().startswith("KAFKA_") and any(h in k.lower() for h in _SECRET_NAME_HINTS) and v.strip()
    ]
    token_file = next((v for k, v in env.items() if k.upper() == "TIKTOK_ACCESS_TOKEN_FILE" and v), None)
    path = Path(token_file) if token_file else None
    cache: dict[str, Any] = {"mtime": None, "value": ""}

    def current() -> list[str]:
        if path is None:
            return static
        try:
            mtime = path.stat().st_mtime
            if mtime != cache["mtime"]:
                cache["value"] = path.read_text().strip()
                cache["mtime"] = mtime
        except OSError:
            pass
        return [*static, cache["value"]] if cache["value"] else static

    return current


# -- formatters ----------------------------------------------------------------------------------------------


class TextFormatter(logging.Formatter):
    """`time LEVEL logger: message key=value ...` (the context fields present), redacted as a whole."""

    def __init__(self, redactor: Redactor) -> None:
        super().__init__(TEXT_FORMAT)
        self.redactor = redactor

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        context = [f"{k}={getattr(record, k)}" for k in CONTEXT_FIELDS if getattr(record, k, None) is not None]
        if context:
            head, sep, tail = line.partition("\n")  # after the message, before a traceback
            line = f"{head} {' '.join(context)}{sep}{tail}"
        return self.redactor.redact(line)


class JsonLineFormatter(JsonFormatter):
    """python-json-logger's formatter: `time`, `level`, `logger`, `message`, then the `extra` fields and
    `exception`; every string redacted."""

    def __init__(self, redactor: Redactor) -> None:
        super().__init__(
            "%(levelname)s %(name)s %(message)s",
            rename_fields={"levelname": "level", "name": "logger", "exc_info": "exception"},
            json_ensure_ascii=False,
        )
        self.redactor = redactor

    def add_fields(self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]) -> None:
        # `time` first (python-json-logger's own timestamp option would add it last).
        stamp = datetime.fromtimestamp(record.created, tz=UTC).isoformat(timespec="milliseconds")
        log_data["time"] = stamp.removesuffix("+00:00") + "Z"
        super().add_fields(log_data, record, message_dict)

    def process_log_record(self, log_data: dict[str, Any]) -> dict[str, Any]:
        return {k: self.redactor.redact_field(k, v) for k, v in log_data.items()}


def make_formatter(log_format: str, redactor: Redactor) -> logging.Formatter:
    if log_format == "json":
        return JsonLineFormatter(redactor)
    if log_format == "text":
        return TextFormatter(redactor)
    raise ValueError(f"LOG_FORMAT must be one of {', '.join(LOG_FORMATS)}, got {log_format!r}")


# -- setup -----------------------------------------------------------------------------------------------------

_HANDLER_NAME: Final = "audience-sync"


def setup_logging(
    level: str = "INFO",
    log_format: str = DEFAULT_FORMAT,
    *,
    secrets: Callable[[], Iterable[str]] | None = None,
    stream: Any = None,
    hooks: bool = True,
) -> logging.Handler:
    """One handler on the root logger writing to stderr (replacing an earlier one of ours). In JSON mode (and
    with `hooks`), Python warnings and uncaught exceptions are logged too, so that every line the process
    writes to stderr is a JSON object. `secrets` defaults to `env_secrets()`."""
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(make_formatter(log_format, Redactor(env_secrets() if secrets is None else secrets)))
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    if log_format == "json" and hooks:
        logging.captureWarnings(True)
        sys.excepthook = _log_uncaught
        threading.excepthook = _log_uncaught_in_thread
    return handler


def _log_uncaught(kind: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, exc, tb)
        return
    logging.getLogger("service").critical("uncaught exception", exc_info=(kind, exc, tb))


def _log_uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return
    name = args.thread.name if args.thread is not None else "?"
    logging.getLogger("service").error(
        "uncaught exception in thread %s",
        name,
        exc_info=(args.exc_type, args.exc_value or args.exc_type(), args.exc_traceback),
    )
