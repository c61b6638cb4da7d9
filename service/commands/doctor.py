"""`audience-sync doctor`: preflight before `run` or a replay: broker, topics, token, advertisers, mapped audiences,
mappings file. One line per check with a fix hint on each failure; exit 1 if any check fails (warnings do not).
Then each mappings entry's effective settings (mode, id types, enabled, audience, phone region), defaults resolved.

Every check is a pure function from fetched data to a `Check`, so each verdict and hint is unit-testable with
literals; the fetching (Kafka metadata, TikTok reads) is a thin layer on top. A check that cannot run because
an earlier one failed (no token, advertiser not accessible, broker down) is reported as skipped, not failed,
so the first failure is the one to fix.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import orjson
from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient

from service.config import ConfigError, Settings, TokenSource, load_settings, producer_config
from service.core.answers import Verdict
from service.core.file_batcher import FILE_INTERVAL_S, FILE_MAX_ROWS
from service.core.mappings import AudienceMapping, Mappings, MappingsError, load_mappings
from service.core.model import ID_TYPES
from service.tiktok.audiences_api import (
    TARGETING_MINIMUM,
    AdvertiserInfo,
    AudienceInfo,
    AudiencesApi,
    TikTokApiError,
    UserInfo,
    open_api,
    truncate_name,
)
from service.tiktok.customer_files_api import CUSTOMER_FILE_TYPE

PROG = "audience-sync doctor"
DEFAULT_TIMEOUT_S = 10.0
PER_ID_CONCURRENCY = 4  # per-audience fallback reads: polite to TikTok's rate limit

# TikTok codes with a specific operator hint (docs/tiktok-api.md §4.2).
_NOT_EXIST = 40007
_PARAM_ERROR = 40002
_ADVERTISER_MISSING = frozenset({40300, 40302})


class Status(StrEnum):
    OK = "ok"
    WARN = "warn"
    FAIL = "fail"
    SKIP = "skip"


SYMBOLS = {Status.OK: "✓", Status.WARN: "!", Status.FAIL: "✗", Status.SKIP: "-"}
WORDS = {Status.OK: "OK  ", Status.WARN: "WARN", Status.FAIL: "FAIL", Status.SKIP: "SKIP"}


@dataclass(frozen=True, slots=True)
class Check:
    """One reported line: `check` is a stable kind for machines, `subject` what was checked."""

    check: str
    subject: str
    status: Status
    detail: str
    hint: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "check": self.check,
            "subject": self.subject,
            "status": str(self.status),
            "detail": self.detail,
            "hint": self.hint,
        }


@dataclass(frozen=True, slots=True)
class BrokerView:
    """What one metadata request told us; `error` set when the broker could not be reached."""

    bootstrap: str
    topics: Mapping[str, int] | None = None  # topic → partition count
    brokers: int = 0
    error: str | None = None


@dataclass(slots=True)
class Plan:
    """What the mappings and DEFAULT_ADVERTISER_ID ask the doctor to verify at TikTok."""

    advertisers: dict[str, list[str]] = field(default_factory=dict)  # advertiser id → who uses it
    audiences: list[tuple[AudienceMapping, str]] = field(default_factory=list)  # entry with id, its advertiser
    creates: list[tuple[AudienceMapping, str]] = field(default_factory=list)  # create_if_missing without id
    unresolved: list[AudienceMapping] = field(default_factory=list)  # no advertiser anywhere


# -- planning (pure) -----------------------------------------------------------------------------------------


def make_plan(mappings: Mappings | None, default_advertiser: str | None) -> Plan:
    plan = Plan()
    if default_advertiser:
        plan.advertisers.setdefault(default_advertiser, []).append("DEFAULT_ADVERTISER_ID")
    for entry in mappings or ():
        adv = entry.advertiser_id or default_advertiser
        if adv is None:
            plan.unresolved.append(entry)
            continue
        plan.advertisers.setdefault(adv, []).append(entry.audience_key)
        if entry.audience_id is not None:
            plan.audiences.append((entry, adv))
        elif entry.create_if_missing:
            plan.creates.append((entry, adv))
    return plan


# -- effective settings of each entry (pure) ------------------------------------------------------------------

_SHORT = {"EMAIL_SHA256": "email", "PHONE_SHA256": "phone", "IDFA_SHA256": "idfa", "AAID_SHA256": "aaid"}


def entry_settings(
    entry: AudienceMapping,
    default_advertiser: str | None,
    default_region: str,
    file_defaults: tuple[float, int] = (FILE_INTERVAL_S, FILE_MAX_ROWS),
) -> dict[str, Any]:
    """What an entry means once every default is applied (no identifier, nothing secret: safe to print).

    `file_defaults`: FILE_INTERVAL_S and FILE_MAX_ROWS, the cadence of a file entry that sets none of its own.
    """
    types = entry.effective_id_types
    file = entry.mode == "file"
    return {
        "audience_key": entry.audience_key,
        "mode": entry.mode,
        "id_types": list(types),
        "id_types_default": entry.id_types is None,
        "contract": entry.contract,
        "enabled": entry.enabled,
        "advertiser_id": entry.advertiser_id or default_advertiser,
        "advertiser_source": "entry"
        if entry.advertiser_id
        else ("DEFAULT_ADVERTISER_ID" if default_advertiser else None),
        "audience_id": entry.audience_id,
        "create_if_missing": entry.create_if_missing,
        "audience_name": entry.effective_audience_name,
        "audience_name_default": entry.audience_name == entry.audience_key and entry.create_if_missing,
        "phone_region": entry.effective_phone_region(default_region) if "PHONE_SHA256" in types else None,
        "phone_region_source": ("entry" if entry.phone_region else "PHONE_DEFAULT_REGION")
        if "PHONE_SHA256" in types
        else None,
        "file_interval_s": (entry.file_interval_s or file_defaults[0]) if file else None,
        "file_max_rows": (entry.file_max_rows or file_defaults[1]) if file else None,
        "file_cadence_source": (
            "entry" if entry.file_interval_s or entry.file_max_rows else "FILE_INTERVAL_S/FILE_MAX_ROWS"
        )
        if file
        else None,
    }


def all_entry_settings(
    mappings: Mappings | None,
    default_advertiser: str | None,
    default_region: str,
    file_defaults: tuple[float, int] = (FILE_INTERVAL_S, FILE_MAX_ROWS),
) -> list[dict[str, Any]]:
    return [entry_settings(e, default_advertiser, default_region, file_defaults) for e in mappings or ()]


def _entry_row(doc: Mapping[str, Any]) -> list[str]:
    types = doc["id_types"]
    ids = ",".join(_SHORT[t] for t in types) + (" (all)" if len(types) == len(ID_TYPES) else "")
    mode = f"file {doc['contract']}" if doc["mode"] == "file" else "stream"
    if doc["audience_id"] is not None:
        audience = doc["audience_id"]
    else:
        audience = f'create "{doc["audience_name"]}"' + (" (the key)" if doc["audience_name_default"] else "")
    region = "-"
    if doc["phone_region"] is not None:
        region = doc["phone_region"] + (" (default)" if doc["phone_region_source"] != "entry" else "")
    cadence = []
    if doc["file_interval_s"] is not None:
        cadence.append(f"every {doc['file_interval_s']:g}s")
    if doc["file_max_rows"] is not None:
        cadence.append(f"or {doc['file_max_rows']:,} users")
    return [
        doc["audience_key"],
        mode,
        ids,
        "yes" if doc["enabled"] else "NO (paused)",
        audience,
        region,
        " ".join(cadence) or "-",
    ]


def render_entries(entries: Sequence[Mapping[str, Any]]) -> list[str]:
    """The effective settings as an aligned table (no lines when there are no entries)."""
    if not entries:
        return []
    head = ["entry", "mode", "id types", "enabled", "audience", "phone region", "file cadence"]
    rows = [head] + [_entry_row(e) for e in entries]
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = [f"entries ({len(entries)}), effective settings:"]
    lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return lines


# -- checks (pure) -------------------------------------------------------------------------------------------


def check_mappings(path: Path | None, result: Mappings | MappingsError | None) -> Check:
    if path is None:
        return Check(
            "mappings", "MAPPINGS_FILE", Status.SKIP, "not set: audience and advertiser ids must come from events"
        )
    if isinstance(result, MappingsError) or result is None:
        return Check(
            "mappings",
            str(path),
            Status.FAIL,
            str(result) if result is not None else "not loaded",
            "fix the file (the message names the key and field); the running service keeps its last good mappings",
        )
    return Check("mappings", str(path), Status.OK, f"valid, {len(result)} audience(s)")


OFFLINE_UNVERIFIED = (
    "format only (digits): TikTok documents no endpoint this service can confirm for reading an event set, so "
    "it is not verified with TikTok; the first /event/track/ answer is"
)


def check_offline_event_sets(result: Mappings | MappingsError | None) -> list[Check]:
    """The mappings file's `offline_events:` event sets: their format, and whether any is configured at all."""
    if not isinstance(result, Mappings) or result.offline is None:
        return []
    o = result.offline
    sets = (
        [(f"default_event_set_id {o.default_event_set_id}", o.default_event_set_id)] if o.default_event_set_id else []
    )
    sets += [(f"event_sets.{adv} {set_id}", set_id) for adv, set_id in sorted(o.event_set_ids.items())]
    if not sets:
        return [
            Check(
                "event_set",
                "offline_events",
                Status.WARN,
                "no event set configured: Segment commerce events are skipped and canonical offline events "
                "dead-lettered missing_event_set_id",
                "set offline_events.default_event_set_id or offline_events.event_sets in the mappings file",
            )
        ]
    out = []
    for subject, set_id in sets:
        if set_id.isascii() and set_id.isdigit():
            out.append(Check("event_set", subject, Status.OK, OFFLINE_UNVERIFIED))
        else:  # parse_mappings refuses these; kept for mappings built in code
            out.append(Check("event_set", subject, Status.FAIL, "not a TikTok id (digits only)"))
    return out


def check_broker(view: BrokerView) -> Check:
    if view.error is not None or view.topics is None:
        return Check(
            "broker",
            view.bootstrap,
            Status.FAIL,
            f"unreachable: {view.error or 'no metadata'}",
            "is the broker up and KAFKA_BOOTSTRAP_SERVERS right? Check listeners/firewall and the security "
            "settings (KAFKA_SECURITY_PROTOCOL, KAFKA_SASL_MECHANISM, ...)",
        )
    return Check(
        "broker", view.bootstrap, Status.OK, f"reachable, {view.brokers} broker(s), {len(view.topics)} topic(s)"
    )


def check_topics(view: BrokerView, source_topics: Sequence[str], dlq_topic: str) -> list[Check]:
    roles = [(t, "source", "SOURCE_TOPIC") for t in source_topics] + [(dlq_topic, "DLQ", "DLQ_TOPIC")]
    out: list[Check] = []
    for topic, role, var in roles:
        if view.topics is None:
            out.append(Check("topic", topic, Status.SKIP, f"{role} topic not checked: broker unreachable"))
            continue
        partitions = view.topics.get(topic)
        if partitions is None:
            parts = 1 if role == "DLQ" else 6
            out.append(
                Check(
                    "topic",
                    topic,
                    Status.FAIL,
                    f"{role} topic does not exist",
                    f"create it (kafka-topics.sh --bootstrap-server {view.bootstrap} --create --topic {topic} "
                    f"--partitions {parts}) or set {var} to an existing topic",
                )
            )
        else:
            out.append(Check("topic", topic, Status.OK, f"{role} topic, {partitions} partition(s)"))
    return out


def tiktok_hint(err: TikTokApiError, *, advertiser: str | None = None, users: Sequence[str] = ()) -> str:
    """What an operator should do about a TikTok refusal, by code (docs/tiktok-api.md §4.2)."""
    where = f" (used by {', '.join(users)})" if users else ""
    if err.code is None:
        return "TikTok did not answer: check TIKTOK_API_URL, DNS, proxy and firewall, then run doctor again"
    if err.verdict is Verdict.AUTH:
        return (
            "the access token was refused: issue a new long-lived token (POST /oauth2/access_token/) and set "
            "TIKTOK_ACCESS_TOKEN or TIKTOK_ACCESS_TOKEN_FILE (no 'Bearer ' prefix)"
        )
    if err.answer.rate_limited:
        return "rate limited by TikTok: run doctor again in a minute"
    if advertiser is not None and err.code in _ADVERTISER_MISSING:
        return f"advertiser {advertiser} does not exist: fix advertiser_id{where} in MAPPINGS_FILE"
    if advertiser is not None and err.verdict is Verdict.PERMISSION:
        return (
            f"the token's user cannot use advertiser {advertiser}{where}: grant access in TikTok Business Center "
            "(audience management), or use a token authorised for that advertiser"
        )
    request_id = err.answer.request_id or "-"
    return f"see TikTok code {err.code} in docs/tiktok-api.md §4.2; quote request_id {request_id} to support"


def _tiktok_detail(err: TikTokApiError) -> str:
    a = err.answer
    if a.code is None:
        return f"TikTok unreachable: {a.message}"
    return f"TikTok code {a.code}: {a.message} (request_id {a.request_id or '-'})"


def check_token(api_url: str, result: UserInfo | TikTokApiError) -> Check:
    if isinstance(result, TikTokApiError):
        return Check("token", api_url, Status.FAIL, _tiktok_detail(result), tiktok_hint(result))
    who = f' for "{result.display_name}"' if result.display_name else ""
    return Check("token", api_url, Status.OK, f"valid{who}")


def check_advertiser(
    advertiser_id: str, users: Sequence[str], result: Sequence[AdvertiserInfo] | TikTokApiError
) -> Check:
    if isinstance(result, TikTokApiError):
        return Check(
            "advertiser",
            advertiser_id,
            Status.FAIL,
            _tiktok_detail(result),
            tiktok_hint(result, advertiser=advertiser_id, users=users),
        )
    match = next((a for a in result if a.advertiser_id == advertiser_id), None)
    if match is None:
        return Check(
            "advertiser",
            advertiser_id,
            Status.FAIL,
            "not among the advertisers this token can read",
            f"grant the token's user access to advertiser {advertiser_id} in TikTok Business Center, "
            f"or fix advertiser_id (used by {', '.join(users)})",
        )
    return Check("advertiser", advertiser_id, Status.OK, f'accessible, "{match.name}" (used by {", ".join(users)})')


def _subject(entry: AudienceMapping) -> str:
    if entry.audience_id is not None:
        return f"{entry.audience_key} → {entry.audience_id}"
    return f'{entry.audience_key} → "{entry.audience_name or ""}"'


def check_audience(entry: AudienceMapping, advertiser_id: str, result: AudienceInfo | TikTokApiError | None) -> Check:
    """Exists, belongs to the advertiser, and is big enough to target (below the minimum is a warning)."""
    aud = entry.audience_id or "?"
    subject = _subject(entry)
    listing = f"`audience-sync audiences list --advertiser {advertiser_id}`"
    if result is None or (isinstance(result, TikTokApiError) and result.code == _NOT_EXIST):
        return Check(
            "audience",
            subject,
            Status.FAIL,
            f"audience {aud} does not exist for advertiser {advertiser_id}",
            f"deleted or mistyped: find the right id with {listing} and set audiences.{entry.audience_key}"
            ".audience_id, then replay the dead letters",
        )
    if isinstance(result, TikTokApiError) and result.code == _PARAM_ERROR:
        return Check(
            "audience",
            subject,
            Status.FAIL,
            f"audience {aud} does not belong to advertiser {advertiser_id} ({_tiktok_detail(result)})",
            f"set audiences.{entry.audience_key}.advertiser_id to the audience's owner, or an audience_id of "
            f"advertiser {advertiser_id} (see {listing})",
        )
    if isinstance(result, TikTokApiError):
        return Check("audience", subject, Status.FAIL, _tiktok_detail(result), tiktok_hint(result))
    if entry.is_file and result.audience_type and result.audience_type != CUSTOMER_FILE_TYPE:
        return Check(
            "audience",
            subject,
            Status.FAIL,
            f"mode: file, but audience {aud} is a {result.audience_type} audience: only a customer-file audience "
            "takes file updates",
            f"set audiences.{entry.audience_key}.mode: stream, or point it at a customer-file audience (or drop "
            "audience_id and set create_if_missing: true, then run `audience-sync refresh` once)",
        )
    size = f'"{result.name}" of advertiser {advertiser_id}, {result.cover_num:,} member(s)'
    if result.cover_num < TARGETING_MINIMUM:
        return Check(
            "audience",
            subject,
            Status.WARN,
            f"{size}: below TikTok's {TARGETING_MINIMUM:,}-member targeting minimum",
            "ads cannot target it yet; keep syncing (cover_num is TikTok's matched-user estimate and lags uploads)",
        )
    return Check("audience", subject, Status.OK, size)


def check_create_if_missing(
    entry: AudienceMapping, advertiser_id: str, existing: Sequence[AudienceInfo] | TikTokApiError
) -> Check:
    name = entry.audience_name or ""
    subject = _subject(entry)
    if isinstance(existing, TikTokApiError):
        return Check("audience", subject, Status.FAIL, _tiktok_detail(existing), tiktok_hint(existing))
    stored = name if entry.is_file else truncate_name(name)  # customer-file names are kept whole (<= 128)
    same = [a.audience_id for a in existing if a.name == stored]
    if not same:
        when = (
            "by the first `audience-sync refresh`, or by its events once 1,000 users are to be added"
            if entry.is_file
            else "on first event"
        )
        return Check(
            "audience",
            subject,
            Status.OK,
            f"create_if_missing: no audience with this name for advertiser {advertiser_id} yet; will be created {when}",
        )
    return Check(
        "audience",
        subject,
        Status.WARN,
        f"create_if_missing: advertiser {advertiser_id} already has an audience with this name (id {', '.join(same)})",
        f'set audiences.{entry.audience_key}.audience_id: "{same[0]}" to reuse it; otherwise the first event '
        "may create a second audience with the same name",
    )


def check_unresolved(entry: AudienceMapping) -> Check:
    return Check(
        "audience",
        _subject(entry),
        Status.WARN,
        "no advertiser_id and no DEFAULT_ADVERTISER_ID: not verified; events must carry audience_settings.advertiserId",
        f"set audiences.{entry.audience_key}.advertiser_id or DEFAULT_ADVERTISER_ID",
    )


def skipped(check: str, subject: str, why: str) -> Check:
    return Check(check, subject, Status.SKIP, f"not checked: {why}")


def counts(checks: Sequence[Check]) -> dict[str, int]:
    return {str(s): sum(1 for c in checks if c.status is s) for s in Status}


def exit_code(checks: Sequence[Check]) -> int:
    return 1 if any(c.status is Status.FAIL for c in checks) else 0


def render_text(checks: Sequence[Check], *, unicode: bool = True, entries: Sequence[Mapping[str, Any]] = ()) -> str:
    """One line per check (and its hint), the entries' effective settings, then the counts line."""
    marks = SYMBOLS if unicode else WORDS
    width = max((len(c.check) for c in checks), default=0)
    lines = []
    for c in checks:
        lines.append(f"{marks[c.status]} {c.check.ljust(width)}  {c.subject}: {c.detail}")
        if c.hint and c.status in (Status.FAIL, Status.WARN):
            lines.append(f"    {'fix' if c.status is Status.FAIL else 'hint'}: {c.hint}")
    lines += render_entries(entries)
    n = counts(checks)
    lines.append(f"doctor: {n['fail']} failed, {n['warn']} warning(s), {n['ok']} ok, {n['skip']} skipped")
    return "\n".join(lines)


def render_json(checks: Sequence[Check], entries: Sequence[Mapping[str, Any]] = ()) -> str:
    doc = {
        "ok": exit_code(checks) == 0,
        "counts": counts(checks),
        "checks": [c.to_json() for c in checks],
        "entries": list(entries),
    }
    return orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode()


# -- fetching (thin I/O) -------------------------------------------------------------------------------------


def admin_config(settings: Settings, environ: Mapping[str, str]) -> dict[str, str]:
    """The producer-side KAFKA_* passthrough (security settings included) without the producer's own extras.
    librdkafka's own log lines are silenced: the broker check reports the failure once, with a hint."""
    conf = producer_config(settings, environ)
    for key in ("enable.idempotence", "acks"):
        conf.pop(key, None)
    conf["log_level"] = "0"
    return conf


def fetch_broker(conf: Mapping[str, str], timeout_s: float) -> BrokerView:
    bootstrap = conf.get("bootstrap.servers", "")
    try:
        md = AdminClient(dict(conf)).list_topics(timeout=timeout_s)
    except KafkaException as exc:
        err = exc.args[0] if exc.args else None
        return BrokerView(bootstrap, error=err.str() if isinstance(err, KafkaError) else str(exc))
    topics = {name: len(t.partitions) for name, t in md.topics.items() if t.error is None}
    return BrokerView(bootstrap, topics=topics, brokers=len(md.brokers))


async def _advertiser(api: AudiencesApi, adv: str) -> list[AdvertiserInfo] | TikTokApiError:
    try:
        return await api.advertiser_info([adv])  # one per call: a failure then names its advertiser
    except TikTokApiError as exc:
        return exc


async def _audiences(
    api: AudiencesApi, adv: str, ids: Sequence[str], limit: asyncio.Semaphore
) -> dict[str, AudienceInfo | TikTokApiError | None]:
    """One batched read; if TikTok refuses the batch (one foreign or deleted id fails it all), ask per id so
    the failure lands on the right mapping entry."""
    try:
        found = {a.audience_id: a for a in await api.get_audiences(adv, ids)}
        return {i: found.get(i) for i in ids}
    except TikTokApiError as exc:
        if exc.code is None or exc.verdict is Verdict.AUTH or len(ids) == 1:
            return dict.fromkeys(ids, exc)

    async def one(aud: str) -> AudienceInfo | TikTokApiError | None:
        async with limit:
            try:
                got = await api.get_audiences(adv, [aud])
            except TikTokApiError as exc:
                return exc
            return next((a for a in got if a.audience_id == aud), None)

    results = await asyncio.gather(*(one(i) for i in ids))
    return dict(zip(ids, results, strict=True))


async def _listing(api: AudiencesApi, adv: str) -> list[AudienceInfo] | TikTokApiError:
    try:
        return await api.list_audiences(adv)
    except TikTokApiError as exc:
        return exc


async def tiktok_checks(api: AudiencesApi, api_url: str, plan: Plan) -> list[Check]:
    try:
        user: UserInfo | TikTokApiError = await api.user_info()
    except TikTokApiError as exc:
        user = exc
    checks = [check_token(api_url, user)]
    if isinstance(user, TikTokApiError):
        why = "the token check failed"
        checks += [skipped("advertiser", a, why) for a in plan.advertisers]
        checks += [skipped("audience", _subject(e), why) for e, _ in plan.audiences + plan.creates]
        return checks + [check_unresolved(e) for e in plan.unresolved]

    advs = list(plan.advertisers)
    adv_results = await asyncio.gather(*(_advertiser(api, a) for a in advs))
    adv_checks = [check_advertiser(a, plan.advertisers[a], r) for a, r in zip(advs, adv_results, strict=True)]
    checks += adv_checks
    usable = {c.subject for c in adv_checks if c.status is Status.OK}

    by_adv: dict[str, list[str]] = {}
    for entry, adv in plan.audiences:
        if adv in usable and entry.audience_id is not None:
            by_adv.setdefault(adv, []).append(entry.audience_id)
    limit = asyncio.Semaphore(PER_ID_CONCURRENCY)
    fetched = await asyncio.gather(*(_audiences(api, a, list(dict.fromkeys(ids)), limit) for a, ids in by_adv.items()))
    found = dict(zip(by_adv, fetched, strict=True))
    for entry, adv in plan.audiences:
        if adv not in usable:
            checks.append(skipped("audience", _subject(entry), f"advertiser {adv} is not accessible"))
        else:
            checks.append(check_audience(entry, adv, found[adv].get(entry.audience_id or "")))

    list_advs = sorted({adv for _, adv in plan.creates if adv in usable})
    listings = dict(zip(list_advs, await asyncio.gather(*(_listing(api, a) for a in list_advs)), strict=True))
    for entry, adv in plan.creates:
        if adv not in usable:
            checks.append(skipped("audience", _subject(entry), f"advertiser {adv} is not accessible"))
        else:
            checks.append(check_create_if_missing(entry, adv, listings[adv]))
    return checks + [check_unresolved(e) for e in plan.unresolved]


async def diagnose(
    settings: Settings, environ: Mapping[str, str], mappings_path: Path | None, timeout_s: float
) -> list[Check]:
    """All checks; the broker's blocking metadata call runs in a thread while TikTok is asked."""
    mappings: Mappings | MappingsError | None = None
    if mappings_path is not None:
        try:
            mappings = load_mappings(mappings_path)
        except MappingsError as exc:
            mappings = exc
    checks = [check_mappings(mappings_path, mappings), *check_offline_event_sets(mappings)]
    plan = make_plan(mappings if isinstance(mappings, Mappings) else None, settings.default_advertiser_id)
    token = TokenSource(settings)
    broker_task = asyncio.create_task(asyncio.to_thread(fetch_broker, admin_config(settings, environ), timeout_s))
    try:
        async with open_api(
            settings.tiktok_api_url, token.get, timeout_s=timeout_s, control_qps=settings.tiktok_control_qps
        ) as api:
            remote = await tiktok_checks(api, settings.tiktok_api_url, plan)
    finally:
        view = await broker_task
    checks.append(check_broker(view))
    checks += check_topics(view, settings.source_topics, settings.dead_letter_topic)
    return checks + remote


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print one JSON document for machines")
    p.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        help=f"seconds per broker or TikTok request [{DEFAULT_TIMEOUT_S:g}]",
    )
    p.add_argument("--ascii", action="store_true", help="OK/WARN/FAIL instead of ✓/!/✗")
    return p


def main(argv: list[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.timeout <= 0:
        print(f"{PROG}: --timeout must be positive", file=sys.stderr)
        return 2
    env = dict(os.environ if environ is None else environ)
    # The mappings file is a check of its own (a broken file is a finding, not a reason not to run the rest).
    raw_path = ""
    for key in [k for k in env if k.lower() == "mappings_file"]:
        raw_path = env.pop(key) or raw_path
    try:
        settings = load_settings(env)
    except ConfigError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    checks = asyncio.run(diagnose(settings, env, Path(raw_path) if raw_path else None, args.timeout))
    entries = all_entry_settings(
        _loaded(raw_path),
        settings.default_advertiser_id,
        settings.phone_default_region,
        (settings.file_interval_s, settings.file_max_rows),
    )
    if args.json:
        out = render_json(checks, entries)
    else:
        encoding = (getattr(sys.stdout, "encoding", None) or "").lower().replace("-", "")
        out = render_text(checks, unicode=not args.ascii and encoding == "utf8", entries=entries)
    sys.stdout.write(out + "\n")
    return exit_code(checks)


def _loaded(raw_path: str) -> Mappings | None:
    """The mappings for the settings table; None when unset or invalid (the mappings check reports why)."""
    if not raw_path:
        return None
    try:
        return load_mappings(raw_path)
    except MappingsError:
        return None
