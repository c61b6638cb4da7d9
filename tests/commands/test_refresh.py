"""`audience-sync refresh` against the real sandbox over HTTP on 127.0.0.1 (and the real broker, tansu, for the
compacted-topic source and the audience store): the audience ends with exactly the snapshot's members, a dry run
and every refusal make no TikTok write call, and only the entry's contract is sent. A run's metrics go to a real
Pushgateway (Debian's prometheus-pushgateway) and are read back from it."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]
from prometheus_client import generate_latest

from service import metrics
from service.commands.refresh import main, parse_source
from service.devtools.broker import LocalBroker, free_port
from service.devtools.sandbox import SandboxThread
from service.devtools.sandbox.state import FilePart
from tests.conftest import ROOT, Pushgateway, produce, read_all

ADV = "7654321098765432109"
TOKEN = "sandbox-token-refresh"
FILE_UPDATE = "/dmp/custom_audience/update/"
FILE_UPLOAD = "/dmp/custom_audience/file/upload/"
FILE_CREATE = "/dmp/custom_audience/create/"
RefreshEnv = Callable[..., dict[str, str]]


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def emails(prefix: str, n: int) -> list[str]:
    return [f"{prefix}{i}@example.com" for i in range(n)]


def file_audience(sb: SandboxThread, contract: str, members: list[str], name: str = "CRM buyers") -> str:
    """A customer-file audience holding `members` (hashes), made through the sandbox's own upload and create."""
    content = "".join(h + "\n" for h in members).encode()
    body: dict[str, object] = {
        "advertiser_id": ADV,
        "calculate_type": contract,
        "file_signature": hashlib.md5(content, usedforsecurity=False).hexdigest(),
        "file": FilePart("seed.csv", content),
    }
    path = sb.state.upload_file(body)["file_path"]
    created = sb.state.create_file_audience(
        {"advertiser_id": ADV, "custom_audience_name": name, "calculate_type": contract, "file_paths": [path]}
    )
    # Forget the set-up's file and its CREATE (state calls are not requests: the request log stays empty).
    sb.state.files.clear()
    sb.state.file_updates.clear()
    return str(created["custom_audience_id"])


def members(sb: SandboxThread, audience_id: str) -> dict[str, set[str]]:
    return {t: set(ids) for t, ids in sb.state.members(audience_id).items()}


def write_calls(sb: SandboxThread) -> list[dict[str, object]]:
    return [r for r in sb.state.requests() if r["path"] != "/dmp/custom_audience/get/"]


@pytest.fixture
def sandbox() -> Iterator[SandboxThread]:
    with SandboxThread(host="127.0.0.1", port=0, tokens=[TOKEN], advertisers=[ADV], audiences=[(ADV, "555")]) as sb:
        yield sb


@pytest.fixture
def refresh_env(sandbox: SandboxThread, tmp_path: Path) -> RefreshEnv:
    """The environment `run` reads; the broker is a closed port unless a test needs one (CSV + audience_id
    never touches Kafka)."""

    def make(entries: dict[str, object], **extra: str) -> dict[str, str]:
        path = tmp_path / "mappings.yaml"
        path.write_text(json.dumps({"audiences": entries}))
        env = {k: v for k, v in os.environ.items() if not k.startswith(("KAFKA_", "TIKTOK_"))}
        env.update(
            KAFKA_BOOTSTRAP_SERVERS="127.0.0.1:9",
            TIKTOK_API_URL=sandbox.url,
            TIKTOK_ACCESS_TOKEN=TOKEN,
            MAPPINGS_FILE=str(path),
            RETRY_BASE_S="0.05",
            RETRY_BUDGET_S="5",
        )
        env.update(extra)
        return env

    return make


def run(capsys: pytest.CaptureFixture[str], env: dict[str, str], *args: str) -> tuple[int, dict[str, Any], str]:
    rc = main(["--json", "--no-progress", *args], env)
    out, err = capsys.readouterr()
    assert TOKEN not in out + err
    return rc, json.loads(out), err


def write_csv(tmp_path: Path, text: str, name: str = "snapshot.csv") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def crm_entry(audience_id: str | None = None, **more: object) -> dict[str, object]:
    entry: dict[str, object] = {"advertiser_id": ADV, "mode": "file", "id_types": ["EMAIL_SHA256"], **more}
    if audience_id is not None:
        entry["audience_id"] = audience_id
    return entry


# -- pure bits ----------------------------------------------------------------------------------------------------


def test_source_forms() -> None:
    assert (parse_source("csv:/data/x.txt").kind, parse_source("csv:/data/x.txt").where) == ("csv", "/data/x.txt")
    assert str(parse_source("export.CSV")) == "csv:export.CSV"
    assert str(parse_source("kafka:crm.members")) == "kafka:crm.members"
    for bad in ("kafka:", "s3://bucket/x.parquet", "members"):
        with pytest.raises(Exception, match="--from"):
            parse_source(bad)


def test_usage_errors_exit_2(refresh_env: RefreshEnv, capsys: pytest.CaptureFixture[str]) -> None:
    env = refresh_env({"crm": crm_entry("555")})
    with pytest.raises(SystemExit) as info:
        main(["--audience-key", "crm", "--from", "members.parquet"], env)
    assert info.value.code == 2
    assert main(["--audience-key", "nope", "--from", "x.csv"], env) == 2
    assert "no entry audiences.nope" in capsys.readouterr().err
    assert main(["--audience-key", "crm", "--from", "/nonexistent/x.csv", "--dry-run"], env) == 2
    assert "cannot read" in capsys.readouterr().err
    no_mappings = {k: v for k, v in env.items() if k != "MAPPINGS_FILE"}
    assert main(["--audience-key", "crm", "--from", "x.csv"], no_mappings) == 2
    assert "MAPPINGS_FILE is not set" in capsys.readouterr().err


# -- from CSV, over HTTP ------------------------------------------------------------------------------------------


def test_dry_run_counts_and_makes_no_call(
    sandbox: SandboxThread, refresh_env: RefreshEnv, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    aid = file_audience(sandbox, "EMAIL_SHA256", [sha(e) for e in emails("old", 1200)])
    before = members(sandbox, aid)
    rows = "\n".join(f"{e},{i}" for i, e in enumerate(emails("new", 1500)))
    path = write_csv(tmp_path, f"email,user_id\n{rows}\nnot-an-email,x\nbad,row,here\n")
    env = refresh_env({"crm": crm_entry(aid)})
    rc, doc, _ = run(capsys, env, "--audience-key", "crm", "--from", f"csv:{path}", "--dry-run")
    assert rc == 0 and doc["status"] == "dry_run" and doc["ok"] is True
    assert doc["identifiers"] == 1500 and doc["files"] == 1 and doc["files_uploaded"] == 0
    assert doc["read"]["rows"] == 1501 and doc["read"]["bad_rows"] == 1
    assert doc["plan"]["contracts"]["EMAIL_SHA256"]["invalid_by_reason"] == {"invalid_email": 1}
    assert sandbox.state.requests() == [], "a dry run makes no TikTok call at all"
    assert members(sandbox, aid) == before
    # Without a token a dry run still works: it never calls TikTok.
    no_token = {k: v for k, v in env.items() if k != "TIKTOK_ACCESS_TOKEN"}
    assert main(["--audience-key", "crm", "--from", str(path), "--dry-run", "--no-progress"], no_token) == 0
    text = capsys.readouterr().out
    assert "refresh of crm from csv:" in text and "(dry run)" in text and "dry_run" in text


def test_replace_leaves_exactly_the_snapshot(
    sandbox: SandboxThread, refresh_env: RefreshEnv, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    aid = file_audience(sandbox, "EMAIL_SHA256", [sha(e) for e in emails("old", 1200) + emails("stay", 300)])
    kept, new = emails("stay", 300), emails("new", 900)
    prehashed = [sha(e) for e in emails("hashed", 100)]
    lines = [f"{e.upper()},," for e in kept] + [f" {e} ,,x" for e in new] + [f",{h},y" for h in prehashed]
    lines += ["not-an-email,,", ",abc,", "", "too,many,fields,here"]
    path = write_csv(tmp_path, "\ufeffemail,EMAIL_SHA256,note\n" + "\n".join(lines) + "\n")
    env = refresh_env({"crm": crm_entry(aid)})
    rc, doc, err = run(capsys, env, "--audience-key", "crm", "--from", f"csv:{path}", "--max-file-bytes", str(65 * 500))
    assert rc == 0, (doc, err)
    expected = {sha(e) for e in kept + new} | set(prehashed)
    assert members(sandbox, aid) == {"EMAIL_SHA256": expected}, "exactly the snapshot's users, the rest removed"
    assert doc["status"] == "replaced" and doc["identifiers"] == 1300 and doc["cover_num_before"] == 1500
    assert doc["files"] == 3 and doc["files_uploaded"] == 3
    assert doc["read"]["bad_rows"] == 1 and doc["read"]["not_sha256"] == {"EMAIL_SHA256": 1}
    updates = sandbox.state.customer_files()["updates"]
    assert [(u["action"], len(u["file_paths"]), u["size_before"], u["size_after"]) for u in updates] == [
        ("REPLACE", 3, 1500, 1300)
    ]
    uploads = [r for r in sandbox.state.requests() if r["path"] == FILE_UPLOAD]
    assert len(uploads) == 3 and all(r["code"] == 0 for r in uploads)
    for secret in (kept[0], new[0], prehashed[0]):
        assert secret not in json.dumps(doc) and secret not in err
    # The same snapshot again: the same files (sorted, deduplicated), the same members.
    rc, doc, _ = run(capsys, env, "--audience-key", "crm", "--from", f"csv:{path}")
    assert rc == 0 and members(sandbox, aid) == {"EMAIL_SHA256": expected}


def test_under_1000_is_refused_before_any_call(
    sandbox: SandboxThread, refresh_env: RefreshEnv, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    aid = file_audience(sandbox, "EMAIL_SHA256", [sha(e) for e in emails("old", 1200)])
    many = emails("new", 999)
    path = write_csv(tmp_path, "email\n" + "\n".join(many + many[:50] + ["x@"]) + "\n")  # 999 distinct
    env = refresh_env({"crm": crm_entry(aid)})
    for extra in ([], ["--dry-run"]):
        rc, doc, err = run(capsys, env, "--audience-key", "crm", "--from", str(path), *extra)
        assert rc == 1 and doc["status"] == "refused" and doc["ok"] is False
        assert "999 distinct EMAIL_SHA256 identifiers" in doc["error"]
        assert "fewer than 1,000 users" in doc["error"] and "fewer than 1,000 users" in err
        assert doc["identifiers"] == 999 and doc["files"] == 0
    assert sandbox.state.requests() == []
    assert len(members(sandbox, aid)["EMAIL_SHA256"]) == 1200


def test_a_streaming_entry_is_refused_with_the_reason(
    sandbox: SandboxThread, refresh_env: RefreshEnv, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_csv(tmp_path, "email\n" + "\n".join(emails("u", 1200)) + "\n")
    env = refresh_env({"vip": {"advertiser_id": ADV, "audience_id": "555"}})
    rc, doc, err = run(capsys, env, "--audience-key", "vip", "--from", str(path))
    assert rc == 2 and doc["status"] == "refused" and doc["mode"] == "stream"
    assert "has no REPLACE" in err and "send exit events" in err and "at 10M users one would take about 0.5-1 GB" in err
    assert sandbox.state.requests() == []


def test_email_contract_ignores_phone_columns(
    sandbox: SandboxThread, refresh_env: RefreshEnv, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    aid = file_audience(sandbox, "EMAIL_SHA256", [sha(e) for e in emails("old", 1000)])
    rows = [f"{e},+1 415 555 {i:04d},{sha(f'+1415555{i:04d}')}" for i, e in enumerate(emails("new", 1100))]
    path = write_csv(tmp_path, "email,phone,PHONE_SHA256\n" + "\n".join(rows) + "\n")
    env = refresh_env({"crm": crm_entry(aid)})
    rc, doc, _ = run(capsys, env, "--audience-key", "crm", "--from", f"csv:{path}")
    assert rc == 0, doc
    assert members(sandbox, aid) == {"EMAIL_SHA256": {sha(e) for e in emails("new", 1100)}}
    assert doc["read"]["columns"] == {"email": "EMAIL_SHA256"}
    assert doc["read"]["ignored_columns"] == ["phone", "PHONE_SHA256"]
    assert list(doc["plan"]["contracts"]) == ["EMAIL_SHA256"]
    files = sandbox.state.customer_files()["files"]
    assert {f["calculate_type"] for f in files} == {"EMAIL_SHA256"}
    sent = set().union(*(sandbox.state.file_identifiers(f["file_path"]) for f in files))
    assert sent == {sha(e) for e in emails("new", 1100)}, "no phone hash was uploaded"


def test_phone_contract_uses_the_entry_region(
    sandbox: SandboxThread, refresh_env: RefreshEnv, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    aid = file_audience(sandbox, "PHONE_SHA256", [sha(f"+4420794{i:05d}") for i in range(1000)])
    numbers = [f"020 7946 {i:04d}" for i in range(1000)]  # national GB numbers: no country code
    path = write_csv(tmp_path, "email,phone\n" + "\n".join(f"a{i}@example.com,{n}" for i, n in enumerate(numbers)))
    entry = {"advertiser_id": ADV, "audience_id": aid, "mode": "file", "id_types": ["PHONE_SHA256"]}
    env = refresh_env({"app": {**entry, "phone_region": "GB"}}, PHONE_DEFAULT_REGION="US")
    rc, doc, _ = run(capsys, env, "--audience-key", "app", "--from", str(path))
    assert rc == 0, doc
    assert members(sandbox, aid) == {"PHONE_SHA256": {sha(f"+44207946{i:04d}") for i in range(1000)}}


def test_wrong_audiences_are_refused_before_uploading(
    sandbox: SandboxThread, refresh_env: RefreshEnv, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    phones = file_audience(sandbox, "PHONE_SHA256", [sha(f"+1415555{i:04d}") for i in range(1000)])
    path = write_csv(tmp_path, "email\n" + "\n".join(emails("u", 1000)) + "\n")
    env = refresh_env({"partner": crm_entry("555"), "phones": crm_entry(phones)})
    rc, _, err = run(capsys, env, "--audience-key", "partner", "--from", str(path))
    assert rc == 2 and "not a customer-file audience" in err
    rc, _, err = run(capsys, env, "--audience-key", "phones", "--from", str(path))
    assert rc == 2 and "holds PHONE_SHA256" in err
    assert write_calls(sandbox) == [], "only reads"


def test_disabled_entry_is_skipped(
    sandbox: SandboxThread, refresh_env: RefreshEnv, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_csv(tmp_path, "email\n" + "\n".join(emails("u", 1000)) + "\n")
    env = refresh_env({"crm": crm_entry("555", enabled=False)})
    rc, doc, _ = run(capsys, env, "--audience-key", "crm", "--from", str(path))
    assert rc == 0 and doc["status"] == "skipped" and "enabled: false" in doc["error"]
    assert sandbox.state.requests() == []


def test_tiktok_refusal_is_a_failure(
    sandbox: SandboxThread, refresh_env: RefreshEnv, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    aid = file_audience(sandbox, "EMAIL_SHA256", [sha(e) for e in emails("old", 1000)])
    path = write_csv(tmp_path, "email\n" + "\n".join(emails("u", 1000)) + "\n")
    env = refresh_env({"crm": crm_entry(aid)}, TIKTOK_ACCESS_TOKEN="revoked-token")
    rc, doc, err = run(capsys, env, "--audience-key", "crm", "--from", str(path))
    assert rc == 1 and doc["status"] == "failed" and "40105" in doc["error"]
    assert "revoked-token" not in json.dumps(doc) + err
    assert len(members(sandbox, aid)["EMAIL_SHA256"]) == 1000


def test_console_entry_point(refresh_env: RefreshEnv, tmp_path: Path) -> None:
    """`python -m service refresh` (what the `audience-sync` script runs) is wired and keeps its exit codes."""
    path = write_csv(tmp_path, "email\n" + "\n".join(emails("u", 1000)) + "\n")
    env = refresh_env({"crm": crm_entry("555")})

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "service", "refresh", *args],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )

    dry = cli("--audience-key", "crm", "--from", str(path), "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    assert json.loads(dry.stdout)["identifiers"] == 1000
    usage = cli("--audience-key", "crm")
    assert usage.returncode == 2 and "--from" in usage.stderr and "Traceback" not in usage.stderr


# -- from a compacted topic, and create-on-demand, on the real broker ----------------------------------------------


def compacted_topic(broker: LocalBroker, partitions: int = 3) -> str:
    topic = f"memberships-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": broker.bootstrap})
    futures = admin.create_topics([NewTopic(topic, partitions, 1, config={"cleanup.policy": "compact"})])
    for fut in futures.values():
        fut.result(timeout=10)
    return topic


def member_event(user: str, action: str = "add", key: str = "crm", **ids: str) -> bytes:
    return orjson.dumps({"audience_key": key, "action": action, "user_id": user, **ids})


@pytest.mark.integration
def test_replace_from_a_compacted_topic(
    broker: LocalBroker,
    sandbox: SandboxThread,
    refresh_env: RefreshEnv,
    capsys: pytest.CaptureFixture[str],
) -> None:
    aid = file_audience(sandbox, "EMAIL_SHA256", [sha(e) for e in emails("old", 1100)])
    topic = compacted_topic(broker)
    records: list[tuple[bytes | None, bytes | None]] = []
    for i in range(1300):
        records.append((f"crm:u{i}".encode(), member_event(f"u{i}", email=f"first{i}@example.com")))
    for i in range(0, 1300, 10):  # a later value wins: a changed email
        records.append((f"crm:u{i}".encode(), member_event(f"u{i}", email=f"changed{i}@example.com")))
    for i in range(1200, 1300):  # left: tombstones for half, delete events for the other half
        left = None if i % 2 else member_event(f"u{i}", action="delete", email=f"first{i}@example.com")
        records.append((f"crm:u{i}".encode(), left))
    records.append((b"crm:u1250", member_event("u1250", email="back@example.com")))  # and back
    records += [
        (f"other:u{i}".encode(), member_event(f"u{i}", key="other", email=f"o{i}@example.com")) for i in range(50)
    ]
    records.append((b"crm:u5", b"{broken"))  # its latest value is unreadable: left out, counted
    produce(broker, topic, records)

    env = refresh_env({"crm": crm_entry(aid)}, KAFKA_BOOTSTRAP_SERVERS=broker.bootstrap)
    rc, doc, err = run(capsys, env, "--audience-key", "crm", "--from", f"kafka:{topic}")
    assert rc == 0, (doc, err)
    expected = {
        sha(f"changed{i}@example.com" if i % 10 == 0 else f"first{i}@example.com") for i in range(1200) if i != 5
    } | {sha("back@example.com")}
    assert members(sandbox, aid) == {"EMAIL_SHA256": expected}
    read = doc["read"]
    assert read["records"] == len(records) and read["other_audiences"] == 50
    assert (read["users"], read["members"], read["left"], read["invalid"]) == (1300, 1200, 99, 1)
    assert doc["identifiers"] == len(expected) == 1200
    assert doc["status"] == "replaced"


@pytest.mark.integration
def test_create_if_missing_creates_records_and_then_replaces(
    broker: LocalBroker,
    sandbox: SandboxThread,
    refresh_env: RefreshEnv,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    store = f"audiences-{uuid.uuid4().hex[:8]}"
    env = refresh_env(
        {"crm_buyers": {"advertiser_id": ADV, "mode": "file", "id_types": ["EMAIL_SHA256"], "create_if_missing": True}},
        KAFKA_BOOTSTRAP_SERVERS=broker.bootstrap,
        AUDIENCE_STORE_TOPIC=store,
    )
    first = write_csv(tmp_path, "email\n" + "\n".join(emails("a", 1100)) + "\n", "first.csv")
    rc, doc, err = run(capsys, env, "--audience-key", "crm_buyers", "--from", str(first))
    assert rc == 0, (doc, err)
    assert doc["status"] == "created" and doc["created"] is True and doc["audience_name"] == "crm_buyers"
    aid = doc["audience_id"]
    audience = sandbox.state.snapshot()["audiences"][aid]  # type: ignore[index]
    assert audience["name"] == "crm_buyers" and audience["type"] == "Customer File Audience"
    assert members(sandbox, aid) == {"EMAIL_SHA256": {sha(e) for e in emails("a", 1100)}}
    recorded = [orjson.loads(m.value()) for m in read_all(broker, store, 2, timeout_s=10)]
    results = [r for r in recorded if r["type"] == "result"]
    assert [(r["advertiser_id"], r["name"], r["audience_id"]) for r in results] == [(ADV, "crm_buyers", aid)]

    second = write_csv(tmp_path, "email\n" + "\n".join(emails("b", 1000)) + "\n", "second.csv")
    rc, doc, err = run(capsys, env, "--audience-key", "crm_buyers", "--from", str(second))
    assert rc == 0, (doc, err)
    assert doc["status"] == "replaced" and doc["created"] is False and doc["audience_id"] == aid
    assert members(sandbox, aid) == {"EMAIL_SHA256": {sha(e) for e in emails("b", 1000)}}
    assert [u["action"] for u in sandbox.state.customer_files()["updates"]] == ["CREATE", "REPLACE"]


def test_transient_errors_are_retried_and_expired_files_uploaded_again(
    sandbox: SandboxThread, refresh_env: RefreshEnv, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    aid = file_audience(sandbox, "EMAIL_SHA256", [sha(e) for e in emails("old", 1000)])
    path = write_csv(tmp_path, "email\n" + "\n".join(emails("new", 1200)) + "\n")
    sandbox.set_faults(
        [
            {"kind": "http", "status": 503, "path": FILE_UPLOAD, "count": 1},
            {"kind": "code", "code": 40905, "path": FILE_UPDATE, "count": 1},  # FILE_NOT_EXIST: the paths expired
            {"kind": "code", "code": 50000, "path": FILE_UPDATE, "count": 1},
        ]
    )
    env = refresh_env({"crm": crm_entry(aid)})
    rc, doc, err = run(capsys, env, "--audience-key", "crm", "--from", str(path), "--max-file-bytes", str(65 * 700))
    assert rc == 0, (doc, err)
    assert members(sandbox, aid) == {"EMAIL_SHA256": {sha(e) for e in emails("new", 1200)}}
    uploads = [r for r in sandbox.state.requests() if r["path"] == FILE_UPLOAD]
    updates = [r for r in sandbox.state.requests() if r["path"] == FILE_UPDATE]
    # 2 files: one 503 then both accepted; after 40905 both uploaded again; the update: 40905, 50000, success.
    assert [r["status"] for r in uploads] == [503, 200, 200, 200, 200]
    assert [r["code"] for r in updates] == [40905, 50000, 0]
    assert doc["files"] == 2 and doc["files_uploaded"] == 2 and "retrying" in err


# -- metrics of the run, pushed to a real Pushgateway (Debian's prometheus-pushgateway) --------------------------

REFRESH = "audience_sync_refresh_"
GROUP = {"job": "audience-sync-refresh", "audience_key": "crm"}


def pushed(pg: Pushgateway) -> dict[tuple[str, str | None], float]:
    """The refresh metrics on the Pushgateway, read back with prometheus_client's parser: (name, status label) →
    value; every series carries exactly the grouping key's labels (and the Pushgateway's empty `instance`)."""
    out: dict[tuple[str, str | None], float] = {}
    for s in pg.samples(REFRESH):
        labels = dict(s.labels)
        status = labels.pop("status", None)
        assert labels == {**GROUP, "instance": ""}, s
        assert (s.name, status) not in out, s
        out[(s.name, status)] = s.value
    return out


def cli(env: dict[str, str], *args: str) -> tuple[int, dict[str, Any], str]:
    """`python -m service refresh --json` as its own process, as a CronJob runs it."""
    res = subprocess.run(
        [sys.executable, "-m", "service", "refresh", "--json", "--no-progress", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert TOKEN not in res.stdout + res.stderr
    return res.returncode, json.loads(res.stdout), res.stderr


def statuses(got: dict[tuple[str, str | None], float]) -> dict[str, float]:
    return {status: v for (name, status), v in got.items() if name == REFRESH + "last_status" and status}


def test_a_successful_refresh_pushes_its_metrics(
    sandbox: SandboxThread,
    refresh_env: RefreshEnv,
    pushgateway: Pushgateway,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    aid = file_audience(sandbox, "EMAIL_SHA256", [sha(e) for e in emails("old", 1200)])
    users = emails("new", 1250)
    path = write_csv(tmp_path, "email\n" + "\n".join(users + users[:50] + ["not-an-email"]) + "\n")  # 1250 distinct
    env = refresh_env({"crm": crm_entry(aid)}, REFRESH_PUSHGATEWAY_URL=pushgateway.url)
    before = time.time()
    rc, doc, err = run(capsys, env, "--audience-key", "crm", "--from", str(path), "--max-file-bytes", str(65 * 500))
    after = time.time()
    assert rc == 0 and doc["status"] == "replaced", (doc, err)
    assert "warning" not in err

    got = pushed(pushgateway)
    assert statuses(got) == {"replaced": 1.0}, "one status series, the run's"
    success = got[(REFRESH + "last_success_timestamp_seconds", None)]
    assert before <= success <= after and got[(REFRESH + "last_run_timestamp_seconds", None)] == success
    assert got[(REFRESH + "identifiers", None)] == doc["identifiers"] == 1250
    assert got[(REFRESH + "files_uploaded", None)] == doc["files_uploaded"] == 3
    assert got[(REFRESH + "snapshot_users", None)] == doc["plan"]["users"] == 1301
    duration = got[(REFRESH + "duration_seconds", None)]
    assert 0 < duration <= after - before and round(duration, 3) == doc["seconds"]
    assert pushgateway.pushes() == 1, "exactly one push per run"
    # The service's own /metrics never shows them: they live in their own registry.
    assert REFRESH not in generate_latest(metrics.REGISTRY).decode()


def test_a_refused_run_pushes_its_status_and_keeps_the_last_success(
    sandbox: SandboxThread,
    refresh_env: RefreshEnv,
    pushgateway: Pushgateway,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    aid = file_audience(sandbox, "EMAIL_SHA256", [sha(e) for e in emails("old", 1200)])
    good = write_csv(tmp_path, "email\n" + "\n".join(emails("new", 1100)) + "\n", "good.csv")
    small = write_csv(tmp_path, "email\n" + "\n".join(emails("new", 999)) + "\n", "small.csv")
    # The flag wins over REFRESH_PUSHGATEWAY_URL (here a closed port).
    env = refresh_env({"crm": crm_entry(aid)}, REFRESH_PUSHGATEWAY_URL="http://127.0.0.1:9")
    flag = ["--pushgateway", pushgateway.url]
    rc, doc, err = run(capsys, env, "--audience-key", "crm", "--from", str(good), *flag)
    assert rc == 0 and doc["status"] == "replaced" and "warning" not in err, (doc, err)
    success = pushed(pushgateway)[(REFRESH + "last_success_timestamp_seconds", None)]

    # The later runs in a process of their own, as each CronJob run is: nothing of the success is left in memory.
    rc, doc, err = cli(env, "--audience-key", "crm", "--from", str(small), *flag)
    assert rc == 1 and doc["status"] == "refused" and "warning" not in err, err
    got = pushed(pushgateway)
    assert statuses(got) == {"refused": 1.0}, "the family is replaced: no series of the earlier status is left"
    assert got[(REFRESH + "last_success_timestamp_seconds", None)] == success, "the previous success stands"
    assert got[(REFRESH + "last_run_timestamp_seconds", None)] > success
    assert got[(REFRESH + "identifiers", None)] == 999 and got[(REFRESH + "files_uploaded", None)] == 0

    # A dry run and a TikTok failure push their status too, and leave the success alone.
    rc, doc, _ = cli(env, "--audience-key", "crm", "--from", str(good), "--dry-run", *flag)
    assert rc == 0 and statuses(pushed(pushgateway)) == {"dry_run": 1.0}
    revoked = {**env, "TIKTOK_ACCESS_TOKEN": "revoked-token"}
    rc, doc, err = cli(revoked, "--audience-key", "crm", "--from", str(good), *flag)
    assert rc == 1 and doc["status"] == "failed" and "revoked-token" not in err
    got = pushed(pushgateway)
    assert statuses(got) == {"failed": 1.0} and got[(REFRESH + "last_success_timestamp_seconds", None)] == success
    assert pushgateway.pushes() == 4, "one push per run"
    assert len(members(sandbox, aid)["EMAIL_SHA256"]) == 1100


def test_usage_errors_push_nothing(
    refresh_env: RefreshEnv, pushgateway: Pushgateway, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_csv(tmp_path, "email\n" + "\n".join(emails("u", 1000)) + "\n")
    env = refresh_env({"crm": crm_entry("555")}, REFRESH_PUSHGATEWAY_URL=pushgateway.url)
    for argv in (
        ["--audience-key", "crm", "--from", "members.parquet"],
        ["--audience-key", "crm", "--from", str(path), "--pushgateway", "ftp://x"],
    ):
        with pytest.raises(SystemExit) as info:
            main(argv, env)
        assert info.value.code == 2
    assert "--pushgateway: must be an http:// or https:// URL" in capsys.readouterr().err
    assert main(["--audience-key", "nope", "--from", str(path)], env) == 2
    assert main(["--audience-key", "crm", "--from", str(path), "--idle-timeout", "0"], env) == 2
    no_mappings = {k: v for k, v in env.items() if k != "MAPPINGS_FILE"}
    assert main(["--audience-key", "crm", "--from", str(path)], no_mappings) == 2
    bad_setting = {**env, "RETRY_BASE_S": "soon"}
    assert main(["--audience-key", "crm", "--from", str(path)], bad_setting) == 2
    bad_url = {**env, "REFRESH_PUSHGATEWAY_URL": "http://user:secret@pushgateway:9091"}
    assert main(["--audience-key", "crm", "--from", str(path)], bad_url) == 2
    err = capsys.readouterr().err
    assert "REFRESH_PUSHGATEWAY_URL: credentials in the URL are not supported" in err and "secret" not in err
    assert pushgateway.samples(REFRESH) == [] and pushgateway.pushes() == 0


def test_an_unreachable_pushgateway_warns_and_changes_nothing(
    sandbox: SandboxThread, refresh_env: RefreshEnv, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    aid = file_audience(sandbox, "EMAIL_SHA256", [sha(e) for e in emails("old", 1200)])
    good = write_csv(tmp_path, "email\n" + "\n".join(emails("new", 1100)) + "\n", "good.csv")
    small = write_csv(tmp_path, "email\n" + "\n".join(emails("new", 999)) + "\n", "small.csv")
    env = refresh_env({"crm": crm_entry(aid)})
    closed = {**env, "REFRESH_PUSHGATEWAY_URL": f"http://127.0.0.1:{free_port()}"}
    not_a_pushgateway = {**env, "REFRESH_PUSHGATEWAY_URL": sandbox.url}  # answers the push with an HTTP error
    for source, extra, want in ((good, ["--dry-run"], 0), (small, [], 1)):
        rc, expected, err = run(capsys, env, "--audience-key", "crm", "--from", str(source), *extra)
        assert rc == want and "warning" not in err
        for bad in (closed, not_a_pushgateway):
            rc, doc, err = run(capsys, bad, "--audience-key", "crm", "--from", str(source), *extra)
            assert rc == want, err
            assert {**doc, "seconds": 0} == {**expected, "seconds": 0}, "the summary does not change"
            warnings = [line for line in err.splitlines() if "warning" in line]
            assert len(warnings) == 1 and "metrics not pushed to the Pushgateway at http://127.0.0.1:" in warnings[0]
    rc, doc, err = run(capsys, closed, "--audience-key", "crm", "--from", str(good), "--json")
    assert rc == 0 and doc["status"] == "replaced" and "Connection refused" in err
    assert members(sandbox, aid) == {"EMAIL_SHA256": {sha(e) for e in emails("new", 1100)}}


def test_nothing_pushed_names_a_user_or_the_token(
    sandbox: SandboxThread,
    refresh_env: RefreshEnv,
    pushgateway: Pushgateway,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    aid = file_audience(sandbox, "EMAIL_SHA256", [sha(e) for e in emails("old", 1000)])
    raw = emails("secret", 1100)
    prehashed = [sha(e) for e in emails("hashed", 100)]
    path = write_csv(
        tmp_path, "email,EMAIL_SHA256\n" + "\n".join([f"{e}," for e in raw] + [f",{h}" for h in prehashed])
    )
    env = refresh_env({"crm": crm_entry(aid)}, REFRESH_PUSHGATEWAY_URL=pushgateway.url)
    rc, doc, _ = run(capsys, env, "--audience-key", "crm", "--from", str(path))
    assert rc == 0 and doc["identifiers"] == 1200
    rc, _, _ = run(
        capsys, {**env, "TIKTOK_ACCESS_TOKEN": "revoked-token"}, "--audience-key", "crm", "--from", str(path)
    )
    assert rc == 1 and pushgateway.pushes() == 2
    text = pushgateway.text()
    assert REFRESH + "identifiers" in text
    for secret in (TOKEN, "revoked-token", *raw, *(sha(e) for e in raw), *prehashed, "@example.com"):
        assert secret not in text
    labels = {k for s in pushgateway.samples(REFRESH) for k in s.labels}
    assert labels <= {"job", "audience_key", "instance", "status"}
