"""`make run` (`audience-sync demo`): the whole stack comes up, traffic flows, and it stops cleanly."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from service.devtools.broker import free_port

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
LINE = re.compile(r"consumed (\d+)\s+uploaded (\d+) .*dead-lettered (\d+)")


def start(*args: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KAFKA_", "TIKTOK_"))}
    return subprocess.Popen(
        [sys.executable, "-m", "service", "demo", "--http-port", str(free_port()), *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def counts(output: str) -> list[tuple[int, int, int]]:
    return [(int(a), int(b), int(c)) for a, b, c in LINE.findall(output)]


def test_demo_runs_traffic_end_to_end_and_stops_at_its_duration() -> None:
    proc = start("--duration", "12", "--rate", "100")
    out, _ = proc.communicate(timeout=90)
    assert proc.returncode == 0, out
    seen = counts(out)
    assert seen, out
    consumed, uploaded, dead = seen[-1]
    assert uploaded > 0 and consumed >= uploaded, out
    assert dead == 0, out
    conversions = [int(n) for n in re.findall(r"conversions sent (\d+)", out)]
    assert conversions and conversions[-1] > 0, out  # offline conversions flow next to audiences
    assert "stopped cleanly" in out


def test_demo_stops_cleanly_on_ctrl_c_and_leaves_no_process_behind() -> None:
    proc = start("--rate", "100")
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        got = counts(line)
        if got and got[0][1] > 0:
            break
    assert any(c[1] > 0 for c in counts("".join(lines))), "".join(lines)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole foreground group
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, "".join(lines) + out
    assert "stopped cleanly" in out
    time.sleep(0.5)
    with pytest.raises(ProcessLookupError):  # signal 0 to the group: fails only when no process is left in it
        os.killpg(proc.pid, 0)
