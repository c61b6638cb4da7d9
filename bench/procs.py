"""Child processes of the benchmark (sandbox, service, py-spy), their /metrics, CPU time and memory.

Every child is started here and registered; `Children.kill_all()` (called from the harness's `finally`)
terminates each by its own pid, then kills what is left.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Children:
    """Every process the harness started, so that nothing outlives it."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def popen(
        self, argv: list[str], *, log: Path, env: dict[str, str] | None = None, cwd: Path | None = None
    ) -> subprocess.Popen[bytes]:
        """Start a child logging to `log`, in `cwd` (default: this repository's root)."""
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=cwd or ROOT)
        self.procs.append(proc)
        return proc

    @staticmethod
    def stop(proc: subprocess.Popen[bytes], timeout_s: float = 20.0, sig: int = signal.SIGTERM) -> int | None:
        """Signal one child by its pid, wait, then SIGKILL it; returns its exit status."""
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(5)
        return proc.returncode

    def kill_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()
        deadline = time.monotonic() + 10
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.1, deadline - time.monotonic()))
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(5)
        self.procs = [p for p in self.procs if p.poll() is None]


def wait_for(pred: Callable[[], bool], timeout_s: float, interval_s: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval_s)
    return pred()


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


# -- /proc ------------------------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one process (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK
    except (OSError, IndexError, ValueError):
        return 0.0


def box_cpu_seconds() -> float:
    """Busy CPU seconds of the whole machine (all cores), from /proc/stat."""
    with open("/proc/stat") as f:
        parts = [int(x) for x in f.readline().split()[1:]]
    idle = parts[3] + (parts[4] if len(parts) > 4 else 0)
    return (sum(parts[:8]) - idle) / CLK_TCK


def proc_status_kb(pid: int, field: str) -> int | None:
    """A `kB` field of /proc/<pid>/status, e.g. VmHWM (peak RSS) or VmRSS."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class CpuMeter:
    """CPU seconds per named process and for the whole box over a window."""

    def __init__(self, pids: dict[str, list[int]]) -> None:
        self.pids = pids
        self.t0 = time.monotonic()
        self.box0 = box_cpu_seconds()
        self.start = {name: sum(cpu_seconds(p) for p in ps) for name, ps in pids.items()}
        self.harness0 = _self_cpu()

    def read(self) -> dict[str, float]:
        """Percent of one core per process group over the window, plus `box` (all cores) and `other`."""
        wall = max(1e-6, time.monotonic() - self.t0)
        out: dict[str, float] = {}
        ours = 0.0
        for name, ps in self.pids.items():
            used = sum(cpu_seconds(p) for p in ps) - self.start[name]
            ours += used
            out[name] = 100 * used / wall
        harness = _self_cpu() - self.harness0
        ours += harness
        out["harness"] = 100 * harness / wall
        box = box_cpu_seconds() - self.box0
        out["box"] = 100 * box / wall
        out["other"] = max(0.0, 100 * (box - ours) / wall)
        return out


def _self_cpu() -> float:
    t = os.times()
    return t.user + t.system


# -- the service's /metrics --------------------------------------------------------------------------------


def scrape(port: int, timeout_s: float = 2.0) -> str | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout_s) as r:
            body: bytes = r.read()
        return body.decode()
    except (OSError, urllib.error.URLError):
        return None


def http_status(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)
    except OSError:
        return -1


def parse_metrics(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Prometheus text format → {name: [(labels, value)]} (enough for counters, gauges and histograms)."""
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        name, _, lbl = head.partition("{")
        labels: dict[str, str] = {}
        if lbl:
            for part in _split_labels(lbl.rstrip("}")):
                k, _, v = part.partition("=")
                labels[k] = v.strip('"')
        try:
            out.setdefault(name, []).append((labels, float(value)))
        except ValueError:
            continue
    return out


def _split_labels(s: str) -> list[str]:
    parts: list[str] = []
    cur: list[str] = []
    quoted = False
    for ch in s:
        if ch == '"':
            quoted = not quoted
        if ch == "," and not quoted:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if cur:
        parts.append("".join(cur))
    return parts


def total(metrics: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str) -> float:
    return sum(v for lbl, v in metrics.get(name, []) if all(lbl.get(k) == x for k, x in labels.items()))


def histogram_buckets(metrics: dict[str, list[tuple[dict[str, str], float]]], name: str) -> dict[float, float]:
    """Cumulative counts by upper bound (`le`), summed over other labels."""
    out: dict[float, float] = {}
    for lbl, v in metrics.get(name + "_bucket", []):
        le = float("inf") if lbl.get("le") in ("+Inf", "inf") else float(lbl["le"])
        out[le] = out.get(le, 0.0) + v
    return out


def histogram_quantile(q: float, buckets: dict[float, float]) -> float | None:
    """Prometheus' histogram_quantile: linear interpolation inside the bucket holding the rank."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    count = buckets[bounds[-1]]
    rank = q * count
    prev_bound, prev_count = 0.0, 0.0
    for b in bounds:
        c = buckets[b]
        if c >= rank:
            if b == float("inf"):
                return prev_bound  # like Prometheus: the highest finite bound
            if c == prev_count:
                return b
            return prev_bound + (b - prev_bound) * (rank - prev_count) / (c - prev_count)
        prev_bound, prev_count = b, c
    return prev_bound


def python() -> str:
    return sys.executable
