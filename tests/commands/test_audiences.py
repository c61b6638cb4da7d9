"""`audience-sync audiences` against the sandbox over loopback: table and JSON output, paging, chunking, the
name rule, and the exit codes (1 TikTok refused, 2 bad configuration) with the token never printed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.commands.audiences import main, render_table
from service.devtools.broker import free_port
from service.devtools.sandbox import SandboxThread

ADV = "7654321098765432109"
OTHER = "1111111111"
TOKEN = "sandbox-token"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def sandbox() -> Iterator[SandboxThread]:
    with SandboxThread(advertisers=[ADV], audiences=[(ADV, "555"), (OTHER, "777")]) as sb:
        sb.state.set_cover_num("555", 4321)
        yield sb


def env(sb: SandboxThread, **extra: str) -> dict[str, str]:
    """Only TikTok settings: KAFKA_BOOTSTRAP_SERVERS is deliberately absent."""
    return {"TIKTOK_API_URL": sb.url, "TIKTOK_ACCESS_TOKEN": TOKEN, **extra}


def run(capsys: pytest.CaptureFixture[str], argv: list[str], environ: dict[str, str]) -> tuple[int, str, str]:
    rc = main(argv, environ)
    out, err = capsys.readouterr()
    return rc, out, err


def test_render_table_aligns_columns() -> None:
    rows: list[dict[str, object]] = [{"a": "1", "b": "long value"}, {"a": "12345", "b": True}]
    text = render_table(rows, [("A", "a"), ("B", "b")])
    assert text.splitlines() == ["A      B", "1      long value", "12345  yes"]


def test_list_table_pages_through_everything(sandbox: SandboxThread, capsys: pytest.CaptureFixture[str]) -> None:
    adv = sandbox.state.add_advertiser("2020202020")
    names = [f"paged {i}" for i in range(7)]
    for name in names:
        sandbox.state.add_audience(adv, None, name)
    before = len(sandbox.state.requests("/dmp/custom_audience/list/"))
    rc, out, err = run(capsys, ["list", "--advertiser", adv, "--page-size", "3"], env(sandbox))
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["AUDIENCE_ID", "NAME", "MEMBERS", "VALID", "TYPE", "CREATED", "EXPIRES"]
    assert len(lines) == 1 + 7 and all(n in out for n in names)
    name_col = lines[0].index("NAME")
    assert all(line[name_col:].startswith("paged ") for line in lines[1:])
    assert len(sandbox.state.requests("/dmp/custom_audience/list/")) - before == 3  # 7 audiences, 3 per page


def test_list_json(sandbox: SandboxThread, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, ["list", "--advertiser", ADV, "--json"], env(sandbox))
    assert rc == 0
    doc = json.loads(out)
    assert doc["advertiser_id"] == ADV and doc["count"] == len(doc["audiences"])
    first = doc["audiences"][0]
    assert first["audience_id"] == "555" and first["cover_num"] == 4321 and first["is_valid"] is True
    assert set(first) == {"audience_id", "name", "cover_num", "is_valid", "type", "create_time", "expired_time"}


def test_get_several_ids(sandbox: SandboxThread, capsys: pytest.CaptureFixture[str]) -> None:
    extra = [sandbox.state.add_audience(ADV, None, f"get {i}") for i in range(3)]
    rc, out, _ = run(capsys, ["get", "--advertiser", ADV, "555", *extra, "--json"], env(sandbox))
    assert rc == 0
    assert [a["audience_id"] for a in json.loads(out)["audiences"]] == ["555", *extra]
    rc, out, _ = run(capsys, ["get", "--advertiser", ADV, "555", extra[0]], env(sandbox))
    assert rc == 0 and len(out.splitlines()) == 3 and "4321" in out and "get 0" in out


def test_create_truncates_long_name(sandbox: SandboxThread, capsys: pytest.CaptureFixture[str]) -> None:
    name = "Q4 high value customers, lookalike seed, EMEA and APAC, refreshed daily!"
    name = (name + " " + "x" * 80)[:80]
    rc, out, _ = run(capsys, ["create", "--advertiser", ADV, "--name", name, "--json"], env(sandbox))
    assert rc == 0
    doc = json.loads(out)
    assert doc["name"] == name[:67] + "..." and doc["truncated"] is True and doc["requested_name"] == name
    assert sandbox.state.audiences[doc["audience_id"]].name == doc["name"]
    rc, out, _ = run(capsys, ["create", "--advertiser", ADV, "--name", "Short name"], env(sandbox))
    assert rc == 0 and out.startswith("created audience ") and '"Short name"' in out and "note" not in out


def test_tiktok_error_is_one_line_exit_1(sandbox: SandboxThread, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run(capsys, ["get", "--advertiser", ADV, "777"], env(sandbox))  # another advertiser's
    assert rc == 1 and out == ""
    assert len(err.strip().splitlines()) == 1
    assert "40002" in err and "request_id " in err and "request_id -" not in err
    rc, _, err = run(capsys, ["list", "--advertiser", "404"], env(sandbox))
    assert rc == 1 and "40300" in err
    secret = "not-the-token-s3cr3t"
    rc, out, err = run(capsys, ["list", "--advertiser", ADV], env(sandbox, TIKTOK_ACCESS_TOKEN=secret))
    assert rc == 1 and "40105" in err and secret not in out + err


def test_unreachable_tiktok_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}/open_api/v1.3"
    rc, _, err = run(capsys, ["list", "--advertiser", ADV], {"TIKTOK_API_URL": url, "TIKTOK_ACCESS_TOKEN": "t"})
    assert rc == 1 and "unreachable" in err


def test_token_file(sandbox: SandboxThread, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "token"
    f.write_text(TOKEN + "\n")
    rc, _, err = run(
        capsys, ["list", "--advertiser", ADV], {"TIKTOK_API_URL": sandbox.url, "TIKTOK_ACCESS_TOKEN_FILE": str(f)}
    )
    assert rc == 0, err


@pytest.mark.parametrize(
    ("environ", "needle"),
    [
        ({}, "TIKTOK_ACCESS_TOKEN or TIKTOK_ACCESS_TOKEN_FILE must be set"),
        ({"TIKTOK_ACCESS_TOKEN_FILE": "/nonexistent/token"}, "TIKTOK_ACCESS_TOKEN_FILE: cannot read"),
        ({"TIKTOK_ACCESS_TOKEN": "t", "TIKTOK_TIMEOUT_S": "-1"}, "TIKTOK_TIMEOUT_S"),
    ],
)
def test_bad_config_exit_2(environ: dict[str, str], needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run(capsys, ["list", "--advertiser", ADV], environ)
    assert rc == 2 and out == "" and needle in err and len(err.strip().splitlines()) == 1


def test_bad_arguments_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["get", "--advertiser", "abc", "1"], {"TIKTOK_ACCESS_TOKEN": "t"})
    assert exc.value.code == 2
    with pytest.raises(SystemExit):
        main(["list", "--advertiser", ADV, "--page-size", "500"], {"TIKTOK_ACCESS_TOKEN": "t"})
    capsys.readouterr()


def test_console_entry_point(sandbox: SandboxThread) -> None:
    """Through `python -m service`: the subcommand is wired and needs no Kafka settings."""
    child_env = {k: v for k, v in os.environ.items() if not k.startswith(("KAFKA_", "TIKTOK_"))}
    child_env.update(env(sandbox))
    proc = subprocess.run(
        [sys.executable, "-m", "service", "audiences", "get", "--advertiser", ADV, "555", "--json"],
        env=child_env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["audiences"][0]["audience_id"] == "555"
