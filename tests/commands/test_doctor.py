"""`audience-sync doctor`: the pure checks with literals, then the whole preflight against the sandbox over
loopback and the real broker (tansu), one failure at a time, each with its hint and exit code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from service.commands.doctor import (
    OFFLINE_UNVERIFIED,
    BrokerView,
    Check,
    Status,
    check_audience,
    check_broker,
    check_create_if_missing,
    check_mappings,
    check_offline_event_sets,
    check_token,
    check_topics,
    entry_settings,
    exit_code,
    main,
    make_plan,
    render_entries,
    render_json,
    render_text,
    tiktok_hint,
)
from service.core.answers import Answer, Verdict
from service.core.mappings import AudienceMapping, Mappings, MappingsError, parse_mappings
from service.devtools.broker import LocalBroker, free_port
from service.devtools.sandbox import SandboxThread
from service.tiktok.audiences_api import AudienceInfo, TikTokApiError, UserInfo
from tests.conftest import ROOT, Topics

ADV = "7654321098765432109"
OTHER = "1111111111"
TOKEN = "sandbox-token"
DoctorEnv = Callable[..., dict[str, str]]


def err(code: int | None, verdict: Verdict = Verdict.REJECTED) -> TikTokApiError:
    return TikTokApiError("/x/", Answer(verdict, 200 if code is not None else None, code, "msg", "RID"))


def info(cover: int, name: str = "n", aid: str = "1") -> AudienceInfo:
    return AudienceInfo(aid, name, cover, cover > 0, "Partner", "", "")


ENTRY = AudienceMapping("vip", ADV, "555")


# -- pure checks ------------------------------------------------------------------------------------------------


def test_make_plan_resolves_advertisers() -> None:
    m = Mappings(
        {
            "a": AudienceMapping("a", ADV, "1"),
            "b": AudienceMapping("b", None, "2"),
            "c": AudienceMapping("c", OTHER, None, "New", True),
        }
    )
    plan = make_plan(m, "42")
    assert plan.advertisers == {"42": ["DEFAULT_ADVERTISER_ID", "b"], ADV: ["a"], OTHER: ["c"]}
    assert [(e.audience_key, a) for e, a in plan.audiences] == [("a", ADV), ("b", "42")]
    assert [(e.audience_key, a) for e, a in plan.creates] == [("c", OTHER)]
    no_default = make_plan(m, None)
    assert [e.audience_key for e in no_default.unresolved] == ["b"] and "42" not in no_default.advertisers


def test_check_audience_verdicts() -> None:
    assert check_audience(ENTRY, ADV, info(5000)).status is Status.OK
    small = check_audience(ENTRY, ADV, info(999))
    assert small.status is Status.WARN and "1,000-member" in small.detail and small.hint
    missing = check_audience(ENTRY, ADV, err(40007))
    assert (
        missing.status is Status.FAIL
        and "does not exist" in missing.detail
        and "audiences.vip.audience_id" in (missing.hint or "")
    )
    assert check_audience(ENTRY, ADV, None).status is Status.FAIL  # not in TikTok's answer
    foreign = check_audience(ENTRY, ADV, err(40002))
    assert foreign.status is Status.FAIL and "does not belong" in foreign.detail
    assert "audiences.vip.advertiser_id" in (foreign.hint or "")
    auth = check_audience(ENTRY, ADV, err(40105, Verdict.AUTH))
    assert auth.status is Status.FAIL and "TIKTOK_ACCESS_TOKEN" in (auth.hint or "")


def test_check_create_if_missing() -> None:
    long = "L" * 80
    entry = AudienceMapping("seed", ADV, None, long, True)
    ok = check_create_if_missing(entry, ADV, [info(0, "other")])
    assert ok.status is Status.OK and "will be created on first event" in ok.detail
    dup = check_create_if_missing(entry, ADV, [info(0, "L" * 67 + "...", "99")])  # TikTok stores the truncated name
    assert dup.status is Status.WARN and 'audience_id: "99"' in (dup.hint or "")
    assert check_create_if_missing(entry, ADV, err(50000, Verdict.RETRY)).status is Status.FAIL


def test_check_token_mappings_broker_topics() -> None:
    assert check_token("u", UserInfo("1", "Me")).status is Status.OK
    bad = check_token("u", err(40105, Verdict.AUTH))
    assert bad.status is Status.FAIL and "40105" in bad.detail and "RID" in bad.detail
    down = check_token("u", err(None, Verdict.RETRY))
    assert "TIKTOK_API_URL" in (down.hint or "")

    assert check_mappings(None, None).status is Status.SKIP
    assert check_mappings(Path("m.yaml"), Mappings({})).status is Status.OK
    broken = check_mappings(Path("m.yaml"), MappingsError("m.yaml: audiences.x.audience_id: must be a TikTok id"))
    assert broken.status is Status.FAIL and "audiences.x.audience_id" in broken.detail

    view = BrokerView("b:9092", {"src": 4}, brokers=1)
    assert check_broker(view).status is Status.OK
    src, dlq = check_topics(view, ["src"], "src.dlq")
    assert src.status is Status.OK and "4 partition" in src.detail
    assert dlq.status is Status.FAIL and "--topic src.dlq" in (dlq.hint or "") and "DLQ_TOPIC" in (dlq.hint or "")
    down_view = BrokerView("b:9092", error="Local: Broker transport failure")
    assert check_broker(down_view).status is Status.FAIL
    assert {c.status for c in check_topics(down_view, ["src"], "src.dlq")} == {Status.SKIP}


def test_hints_by_code() -> None:
    assert "Business Center" in tiktok_hint(err(40001, Verdict.PERMISSION), advertiser=ADV, users=["vip"])
    assert "does not exist" in tiktok_hint(err(40300, Verdict.PERMISSION), advertiser=ADV, users=["vip"])
    assert "rate limited" in tiktok_hint(err(40100, Verdict.RETRY))


def test_render_and_exit_code() -> None:
    checks = [
        Check("broker", "b", Status.OK, "fine"),
        Check("audience", "x", Status.WARN, "small", "grow it"),
        Check("topic", "t", Status.FAIL, "missing", "create it"),
        Check("audience", "y", Status.SKIP, "not checked"),
    ]
    text = render_text(checks, unicode=False)
    assert text.splitlines() == [
        "OK   broker    b: fine",
        "WARN audience  x: small",
        "    hint: grow it",
        "FAIL topic     t: missing",
        "    fix: create it",
        "SKIP audience  y: not checked",
        "doctor: 1 failed, 1 warning(s), 1 ok, 1 skipped",
    ]
    assert render_text(checks).startswith("✓ broker")
    assert exit_code(checks) == 1 and exit_code(checks[:2]) == 0 and exit_code(checks[3:]) == 0
    doc = json.loads(render_json(checks))
    assert doc["ok"] is False and doc["counts"] == {"ok": 1, "warn": 1, "fail": 1, "skip": 1}


# -- against the sandbox and the broker -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sandbox() -> Iterator[SandboxThread]:
    with SandboxThread(advertisers=[ADV], audiences=[(ADV, "555"), (ADV, "556"), (OTHER, "777")]) as sb:
        sb.state.set_cover_num("555", 5000)
        sb.state.set_cover_num("556", 12)
        sb.state.add_audience(ADV, "558", "Existing seed")
        sb.state.set_cover_num("558", 2000)
        sb.state.add_advertiser("3333333333", permission_denied=True)
        yield sb


GOOD = {
    "audiences": {
        "vip": {"advertiser_id": ADV, "audience_id": "555"},
        "new_seed": {"advertiser_id": ADV, "audience_name": "Lookalike seed - Q4", "create_if_missing": True},
    }
}


@pytest.fixture
def doctor_env(broker: LocalBroker, topics: Topics, sandbox: SandboxThread, tmp_path: Path) -> DoctorEnv:
    def make(mappings: dict[str, object] | str | None = None, **extra: str) -> dict[str, str]:
        env = {
            "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap,
            "SOURCE_TOPIC": topics.source,
            "DLQ_TOPIC": topics.dlq,
            "TIKTOK_API_URL": sandbox.url,
            "TIKTOK_ACCESS_TOKEN": TOKEN,
            "DEFAULT_ADVERTISER_ID": ADV,
        }
        if mappings is not None:
            path = tmp_path / "mappings.yaml"
            path.write_text(mappings if isinstance(mappings, str) else json.dumps(mappings))
            env["MAPPINGS_FILE"] = str(path)
        env.update(extra)
        return env

    return make


def run(capsys: pytest.CaptureFixture[str], environ: dict[str, str], *args: str) -> tuple[int, dict[str, Any]]:
    rc = main(["--json", "--timeout", "5", *args], environ)
    out, err = capsys.readouterr()
    assert err == ""
    return rc, json.loads(out)


def split_report(out: str) -> tuple[list[str], list[str]]:
    """(check lines with their hints, the entries table) of a text report; the counts line is left out."""
    lines = out.splitlines()[:-1]
    cut = next((i for i, line in enumerate(lines) if line.startswith("entries (")), len(lines))
    return lines[:cut], lines[cut:]


def by_subject(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    checks = doc["checks"]
    return {f"{c['check']}:{c['subject']}": c for c in checks}


@pytest.mark.integration
def test_all_green(doctor_env: DoctorEnv, topics: Topics, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["--timeout", "5"], doctor_env(GOOD))
    out = capsys.readouterr().out
    assert rc == 0, out
    assert out.splitlines()[-1] == "doctor: 0 failed, 0 warning(s), 8 ok, 0 skipped"
    checks, entries = split_report(out)
    assert all(line.startswith("✓") for line in checks), out
    assert entries[0] == "entries (2), effective settings:"
    assert entries[2].split() == [
        "vip",
        "stream",
        "email,phone,idfa,aaid",
        "(all)",
        "yes",
        "555",
        "US",
        "(default)",
        "-",
    ]
    assert f"{topics.source}: source topic, 4 partition(s)" in out
    assert f"{topics.dlq}: DLQ topic, 1 partition(s)" in out
    assert "will be created on first event" in out and "5,000 member(s)" in out
    assert TOKEN not in out


@pytest.mark.integration
def test_json_shape(doctor_env: DoctorEnv, topics: Topics, capsys: pytest.CaptureFixture[str]) -> None:
    rc, doc = run(capsys, doctor_env(GOOD))
    assert rc == 0 and doc["ok"] is True
    assert doc["counts"] == {"ok": 8, "warn": 0, "fail": 0, "skip": 0}
    checks = doc["checks"]
    assert isinstance(checks, list)
    assert [c["check"] for c in checks] == [
        "mappings",
        "broker",
        "topic",
        "topic",
        "token",
        "advertiser",
        "audience",
        "audience",
    ]
    assert all(set(c) == {"check", "subject", "status", "detail", "hint"} for c in checks)
    assert by_subject(doc)[f"topic:{topics.source}"]["status"] == "ok"
    vip, seed = doc["entries"]
    assert vip["audience_key"] == "vip" and vip["mode"] == "stream" and vip["contract"] is None
    assert seed["audience_name"] == "Lookalike seed - Q4" and seed["create_if_missing"] is True


@pytest.mark.integration
def test_bad_token(doctor_env: DoctorEnv, capsys: pytest.CaptureFixture[str]) -> None:
    rc, doc = run(capsys, doctor_env(GOOD, TIKTOK_ACCESS_TOKEN="revoked-token"))
    assert rc == 1
    token = next(c for c in doc["checks"] if c["check"] == "token")
    assert token["status"] == "fail" and "40105" in token["detail"] and "TIKTOK_ACCESS_TOKEN" in token["hint"]
    others = [c["status"] for c in doc["checks"] if c["check"] in ("advertiser", "audience")]
    assert others and set(others) == {"skip"}
    assert "revoked-token" not in json.dumps(doc)


@pytest.mark.integration
def test_unknown_and_forbidden_advertiser(doctor_env: DoctorEnv, capsys: pytest.CaptureFixture[str]) -> None:
    mappings = {
        "audiences": {
            "vip": {"advertiser_id": ADV, "audience_id": "555"},
            "ghost": {"advertiser_id": "404404", "audience_id": "1"},
            "locked": {"advertiser_id": "3333333333", "audience_id": "2"},
        }
    }
    rc, doc = run(capsys, doctor_env(mappings))
    assert rc == 1
    checks = by_subject(doc)
    ghost = checks["advertiser:404404"]
    assert ghost["status"] == "fail" and "40300" in str(ghost["detail"])
    assert "advertiser 404404 does not exist" in str(ghost["hint"]) and "ghost" in str(ghost["hint"])
    locked = checks["advertiser:3333333333"]
    assert locked["status"] == "fail" and "40001" in str(locked["detail"]) and "Business Center" in str(locked["hint"])
    assert checks["audience:ghost → 1"]["status"] == "skip"
    assert checks["audience:vip → 555"]["status"] == "ok"


@pytest.mark.integration
def test_foreign_and_deleted_audience(doctor_env: DoctorEnv, capsys: pytest.CaptureFixture[str]) -> None:
    mappings = {
        "audiences": {
            "vip": {"advertiser_id": ADV, "audience_id": "555"},
            "theirs": {"advertiser_id": ADV, "audience_id": "777"},
            "gone": {"audience_id": "999999"},  # advertiser from DEFAULT_ADVERTISER_ID
        }
    }
    rc, doc = run(capsys, doctor_env(mappings))
    assert rc == 1
    checks = by_subject(doc)
    theirs = checks["audience:theirs → 777"]
    assert theirs["status"] == "fail" and "does not belong to advertiser" in str(theirs["detail"])
    assert "audiences.theirs.advertiser_id" in str(theirs["hint"])
    gone = checks["audience:gone → 999999"]
    assert gone["status"] == "fail" and "does not exist" in str(gone["detail"])
    assert checks["audience:vip → 555"]["status"] == "ok"  # the batch failure is attributed per audience


@pytest.mark.integration
def test_missing_topic(doctor_env: DoctorEnv, topics: Topics, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["--timeout", "5", "--ascii"], doctor_env(GOOD, SOURCE_TOPIC="no-such-topic-x1"))
    out = capsys.readouterr().out
    assert rc == 1
    lines = out.splitlines()
    i = next(i for i, line in enumerate(lines) if "no-such-topic-x1" in line)
    assert lines[i].startswith("FAIL topic") and "does not exist" in lines[i]
    assert lines[i + 1].startswith("    fix: create it") and "SOURCE_TOPIC" in lines[i + 1]
    assert any(line.startswith("OK   topic") and topics.dlq in line for line in lines)


@pytest.mark.integration
def test_missing_dlq_topic(doctor_env: DoctorEnv, topics: Topics, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["--timeout", "5", "--ascii"], doctor_env(GOOD, DLQ_TOPIC="no-such-dlq-x1"))
    out = capsys.readouterr().out
    assert rc == 1, out
    lines = out.splitlines()
    i = next(i for i, line in enumerate(lines) if "no-such-dlq-x1" in line)
    assert lines[i].startswith("FAIL topic") and "DLQ topic does not exist" in lines[i]
    fix = lines[i + 1]
    assert fix.startswith("    fix: create it") and "--topic no-such-dlq-x1 --partitions 1" in fix, fix
    assert "DLQ_TOPIC" in fix and "SOURCE_TOPIC" not in fix
    assert any(line.startswith("OK   topic") and topics.source in line for line in lines)
    assert lines[-1].startswith("doctor: 1 failed, 0 warning(s)")


@pytest.mark.integration
def test_console_entry_point(doctor_env: DoctorEnv, topics: Topics) -> None:
    """Through `python -m service doctor` (what the `audience-sync` script runs): wired, reads its settings from
    the environment, prints the report, and exits 0 when all is well, 1 on a failed check, 2 on bad config."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("KAFKA_", "TIKTOK_"))}

    def doctor(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "service", "doctor", "--ascii", "--timeout", "5"],
            env={**base, **env},
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )

    ok = doctor(doctor_env(GOOD))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    lines = ok.stdout.splitlines()
    assert lines[-1] == "doctor: 0 failed, 0 warning(s), 8 ok, 0 skipped", ok.stdout
    checks, entries = split_report(ok.stdout)
    assert all(line.startswith("OK ") for line in checks) and len(entries) == 4, ok.stdout
    assert any(f"{topics.source}: source topic, 4 partition(s)" in line for line in lines)
    assert any("5,000 member(s)" in line for line in lines)
    assert TOKEN not in ok.stdout + ok.stderr

    failed = doctor(doctor_env(GOOD, TIKTOK_ACCESS_TOKEN="revoked-token"))
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert any(line.startswith("FAIL token") and "40105" in line for line in failed.stdout.splitlines())
    assert "    fix: " in failed.stdout and failed.stdout.splitlines()[-1].startswith("doctor: 1 failed")
    assert "revoked-token" not in failed.stdout + failed.stderr

    bad_config = doctor({k: v for k, v in doctor_env(GOOD).items() if k != "KAFKA_BOOTSTRAP_SERVERS"})
    assert bad_config.returncode == 2 and bad_config.stdout == ""
    assert "KAFKA_BOOTSTRAP_SERVERS" in bad_config.stderr and "Traceback" not in bad_config.stderr


@pytest.mark.integration
def test_small_audience_warns_only(doctor_env: DoctorEnv, capsys: pytest.CaptureFixture[str]) -> None:
    mappings = {
        "audiences": {
            "vip": {"advertiser_id": ADV, "audience_id": "555"},
            "tiny": {"advertiser_id": ADV, "audience_id": "556"},
            "seed": {"advertiser_id": ADV, "audience_name": "Existing seed", "create_if_missing": True},
        }
    }
    rc = main(["--timeout", "5"], doctor_env(mappings))
    out = capsys.readouterr().out
    assert rc == 0, out
    tiny = next(line for line in out.splitlines() if "tiny → 556" in line)
    assert tiny.startswith("! audience") and "12 member(s): below TikTok's 1,000-member targeting minimum" in tiny
    seed = next(line for line in out.splitlines() if "Existing seed" in line)
    assert seed.startswith("! audience") and "already has an audience with this name (id 558)" in seed
    assert 'audiences.seed.audience_id: "558"' in out
    assert out.splitlines()[-1].startswith("doctor: 0 failed, 2 warning(s)")


@pytest.mark.integration
def test_invalid_mappings_file(doctor_env: DoctorEnv, capsys: pytest.CaptureFixture[str]) -> None:
    bad = "audiences:\n  vip:\n    advertiser_id: '" + ADV + "'\n    audience_id: 'abc'\n"
    rc, doc = run(capsys, doctor_env(bad))
    assert rc == 1
    [m] = [c for c in doc["checks"] if c["check"] == "mappings"]
    assert m["status"] == "fail" and "audiences.vip.audience_id: must be a TikTok id" in m["detail"] and m["hint"]
    assert by_subject(doc)[f"advertiser:{ADV}"]["status"] == "ok"  # DEFAULT_ADVERTISER_ID still checked
    rc, doc = run(capsys, doctor_env(None, MAPPINGS_FILE="/nonexistent/mappings.yaml"))
    assert rc == 1 and "cannot read mappings file" in by_subject(doc)["mappings:/nonexistent/mappings.yaml"]["detail"]


@pytest.mark.integration
def test_broker_unreachable(doctor_env: DoctorEnv, capsys: pytest.CaptureFixture[str]) -> None:
    closed = f"127.0.0.1:{free_port()}"
    rc = main(["--json", "--timeout", "1.5"], doctor_env(GOOD, KAFKA_BOOTSTRAP_SERVERS=closed))
    doc = json.loads(capsys.readouterr().out)
    assert rc == 1
    checks = by_subject(doc)
    broker = checks[f"broker:{closed}"]
    assert broker["status"] == "fail" and "unreachable" in str(broker["detail"])
    assert "KAFKA_BOOTSTRAP_SERVERS" in str(broker["hint"])
    assert {c["status"] for k, c in checks.items() if k.startswith("topic:")} == {"skip"}
    assert checks["token:" + doctor_env()["TIKTOK_API_URL"]]["status"] == "ok"  # TikTok checks still ran


def test_bad_config_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main([], {"TIKTOK_ACCESS_TOKEN": "t"})
    out, err = capsys.readouterr()
    assert rc == 2 and out == "" and "KAFKA_BOOTSTRAP_SERVERS" in err and len(err.strip().splitlines()) == 1
    assert main(["--timeout", "0"], {}) == 2


def test_admin_config_reuses_kafka_passthrough() -> None:
    from service.commands.doctor import admin_config
    from service.config import load_settings

    environ = {
        "KAFKA_BOOTSTRAP_SERVERS": "b:9092",
        "TIKTOK_ACCESS_TOKEN": "t",
        "KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "KAFKA_SESSION_TIMEOUT_MS": "6000",
    }
    conf = admin_config(load_settings(environ), environ)
    assert conf["bootstrap.servers"] == "b:9092" and conf["security.protocol"] == "SASL_SSL"
    assert "session.timeout.ms" not in conf and "enable.idempotence" not in conf and "acks" not in conf
    assert conf["log_level"] == "0"


# -- effective settings per entry ---------------------------------------------------------------------------------

CONTRACTS = parse_mappings(
    {
        "audiences": {
            "vip": {"advertiser_id": ADV, "audience_id": "555"},
            "crm": {
                "mode": "file",
                "id_types": ["EMAIL_SHA256"],
                "create_if_missing": True,
                "file_interval_s": 3600,
                "file_max_rows": 50000,
            },
            "app": {
                "advertiser_id": OTHER,
                "audience_id": "7",
                "id_types": ["PHONE_SHA256", "GAID_SHA256"],
                "phone_region": "GB",
                "enabled": False,
                "audience_name": "App users",
            },
            "android": {"audience_id": "8", "mode": "file", "id_types": ["AAID_SHA256"]},
        }
    }
)


def test_entry_settings_resolve_every_default() -> None:
    docs = {d["audience_key"]: d for d in (entry_settings(e, "42", "US") for e in CONTRACTS)}
    vip, crm, app, android = docs["vip"], docs["crm"], docs["app"], docs["android"]
    assert vip["id_types"] == ["EMAIL_SHA256", "PHONE_SHA256", "IDFA_SHA256", "AAID_SHA256"] and vip["id_types_default"]
    assert (vip["mode"], vip["contract"], vip["enabled"]) == ("stream", None, True)
    assert (vip["phone_region"], vip["phone_region_source"]) == ("US", "PHONE_DEFAULT_REGION")
    assert (vip["advertiser_id"], vip["advertiser_source"]) == (ADV, "entry")
    assert (crm["mode"], crm["contract"], crm["id_types"]) == ("file", "EMAIL_SHA256", ["EMAIL_SHA256"])
    assert (crm["audience_name"], crm["audience_name_default"], crm["audience_id"]) == ("crm", True, None)
    assert (crm["advertiser_id"], crm["advertiser_source"]) == ("42", "DEFAULT_ADVERTISER_ID")
    assert crm["phone_region"] is None and crm["phone_region_source"] is None  # no phones sent: no region
    assert (crm["file_interval_s"], crm["file_max_rows"]) == (3600.0, 50000)
    assert app["enabled"] is False and app["id_types"] == ["PHONE_SHA256", "AAID_SHA256"]
    assert (app["phone_region"], app["phone_region_source"]) == ("GB", "entry")
    assert app["audience_name"] == "App users" and app["audience_name_default"] is False
    assert android["contract"] == "GAID_SHA256"
    assert entry_settings(AudienceMapping("x", None, "1"), None, "US")["advertiser_source"] is None
    json.dumps(list(docs.values()))  # JSON-ready


def test_entries_table() -> None:
    lines = render_entries([entry_settings(e, "42", "US") for e in CONTRACTS])
    assert lines[0] == "entries (4), effective settings:"
    header, vip, crm, app, android = (line.strip().split("  ") for line in lines[1:])
    rows = {r[0].strip(): [c.strip() for c in r if c.strip()] for r in (vip, crm, app, android)}
    assert [c.strip() for c in header if c.strip()] == [
        "entry",
        "mode",
        "id types",
        "enabled",
        "audience",
        "phone region",
        "file cadence",
    ]
    assert rows["vip"] == ["vip", "stream", "email,phone,idfa,aaid (all)", "yes", "555", "US (default)", "-"]
    assert rows["crm"] == [
        "crm",
        "file EMAIL_SHA256",
        "email",
        "yes",
        'create "crm" (the key)',
        "-",
        "every 3600s or 50,000 users",
    ]
    assert rows["app"] == ["app", "stream", "phone,aaid", "NO (paused)", "7", "GB", "-"]
    assert rows["android"][:3] == ["android", "file GAID_SHA256", "aaid"]
    assert render_entries([]) == []
    vip_entry = CONTRACTS.get("vip")
    assert vip_entry is not None
    broker = [Check("broker", "b", Status.OK, "fine")]
    text = render_text(broker, unicode=False, entries=[entry_settings(vip_entry, None, "US")])
    assert text.splitlines()[1].startswith("entries (1)") and text.splitlines()[-1].startswith("doctor: 0 failed")


def test_file_entry_on_a_partner_audience_fails() -> None:
    crm = AudienceMapping("crm", ADV, "555", mode="file", id_types=("EMAIL_SHA256",))
    partner = check_audience(crm, ADV, info(5000))
    assert partner.status is Status.FAIL and "is a Partner audience" in partner.detail
    assert "audiences.crm.mode: stream" in (partner.hint or "")
    customer = AudienceInfo("555", "n", 5000, True, "Customer File Audience", "", "")
    assert check_audience(crm, ADV, customer).status is Status.OK
    assert check_audience(ENTRY, ADV, info(5000)).status is Status.OK  # a streaming entry: not its business


def test_file_create_if_missing_names_are_not_truncated() -> None:
    long = "L" * 80
    entry = AudienceMapping("seed", ADV, None, long, True, mode="file", id_types=("EMAIL_SHA256",))
    ok = check_create_if_missing(entry, ADV, [info(0, "L" * 67 + "...", "99")])
    assert ok.status is Status.OK and "first `audience-sync refresh`" in ok.detail
    assert check_create_if_missing(entry, ADV, [info(0, long, "99")]).status is Status.WARN


@pytest.mark.integration
def test_entries_in_the_report(doctor_env: DoctorEnv, capsys: pytest.CaptureFixture[str]) -> None:
    mappings = {
        "audiences": {
            "vip": {"advertiser_id": ADV, "audience_id": "555", "id_types": ["EMAIL_SHA256"]},
            "crm": {"mode": "file", "id_types": ["PHONE_SHA256"], "phone_region": "de", "create_if_missing": True},
        }
    }
    rc = main(["--timeout", "5", "--ascii"], doctor_env(mappings))
    out = capsys.readouterr().out
    assert rc == 0, out
    _, entries = split_report(out)
    assert entries[2].split() == ["vip", "stream", "email", "yes", "555", "-", "-"]
    assert entries[3].split() == [
        "crm",
        "file",
        "PHONE_SHA256",
        "phone",
        "yes",
        "create",
        '"crm"',
        "(the",
        "key)",
        "DE",
        "every",
        "300s",
        "or",
        "100,000",
        "users",
    ]
    rc, doc = run(capsys, doctor_env("audiences:\n  vip: {audience_id: abc}\n"))
    assert rc == 1 and doc["entries"] == []  # an invalid file has no settings to show; its check says why


def test_offline_event_sets_are_checked_for_format_and_say_they_are_not_verified() -> None:
    assert check_offline_event_sets(None) == []
    assert check_offline_event_sets(Mappings({})) == []
    m = parse_mappings(
        {"audiences": {}, "offline_events": {"default_event_set_id": "71", "event_sets": {"7654": "72"}}}, "m.yaml"
    )
    checks = check_offline_event_sets(m)
    assert [(c.subject, c.status) for c in checks] == [
        ("default_event_set_id 71", Status.OK),
        ("event_sets.7654 72", Status.OK),
    ]
    assert all("not verified with TikTok" in c.detail and c.detail == OFFLINE_UNVERIFIED for c in checks)
    (empty,) = check_offline_event_sets(parse_mappings({"audiences": {}, "offline_events": {}}, "m.yaml"))
    assert empty.status is Status.WARN and "missing_event_set_id" in empty.detail
    from service.core.offline import OfflineSettings

    odd = Mappings({}, "m.yaml", OfflineSettings(default_event_set_id="7a"))
    assert [c.status for c in check_offline_event_sets(odd)] == [Status.FAIL]
