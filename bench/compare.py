"""`--compare-ref REF`: this tree against a git commit, interleaved in one run on the same broker and input.

REF is checked out once as a detached `git worktree` under artifacts/bench/ref-<sha> (reused when present). Its
service runs from the same venv as `python -m service run` with cwd and PYTHONPATH set to the worktree, so
`service` is imported from the worktree (sys.path comes before the editable install's finder, which is appended
to sys.meta_path); a child of each side prints `service.__file__` once before anything is measured, and the run
stops if it is not the side's own tree.

For each compared row (default email and mixed; `memory` with --compare-memory) the backlog is produced once to
one topic of the run's tansu, and the two services drain it in turn, this tree then REF, --compare-repeats times
(A, B, A, B …), each drain with a fresh consumer group (auto.offset.reset=earliest: the same records from the
start) and a fresh sandbox process started from this tree (so both sides upload to the same sandbox code). A
drain is measured exactly like the row's own (`Bench.drain`: N / (t_done - t_first_consumed)); the memory row
also reads VmHWM at the end. CPU µs/event is the service process's CPU time over the drain window / N.

Output: a table on stdout, artifacts/bench/compare.md and compare.json (every run's figures).
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench import procs, workload
from bench.procs import Children

if TYPE_CHECKING:
    from bench.harness import Bench, Service

ROWS = ("email", "phone-e164", "phone-national", "mixed", "avro", "memory")
DEFAULT_ROWS = ("email", "mixed")
MEMORY_SEED = 3  # the memory row's own input (harness.row_memory)


@dataclass
class Side:
    key: str  # "this" | "ref"
    label: str
    root: Path
    env: dict[str, str] = field(default_factory=dict)
    service_file: str = ""


@dataclass
class Comparison:
    ref: str
    sha: str = ""
    subject: str = ""
    worktree: str = ""
    this_head: str = ""
    this_dirty_files: int = 0
    sides: list[Side] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    error: str = ""
    started: float = field(default_factory=time.monotonic)


# -- git ---------------------------------------------------------------------------------------------------


def _git(*args: str, cwd: Path = procs.ROOT, timeout_s: float = 120.0) -> str:
    r = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout_s)
    if r.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)}: {r.stderr.strip() or r.stdout.strip()}")
    return r.stdout.strip()


def worktree(ref: str, artifacts: Path) -> tuple[str, Path, bool]:
    """A detached worktree of `ref` at artifacts/ref-<sha 12>: (full sha, path, reused)."""
    sha = _git("rev-parse", "--verify", f"{ref}^{{commit}}")
    path = artifacts / f"ref-{sha[:12]}"
    if path.exists():
        head = _git("rev-parse", "HEAD", cwd=path)
        if head != sha:
            raise RuntimeError(f"{path} is at {head[:12]}, not {sha[:12]}: remove it (git worktree remove {path})")
        return sha, path, True
    path.parent.mkdir(parents=True, exist_ok=True)
    # --force: also when a worktree at this path was registered and its directory since deleted
    _git("worktree", "add", "--detach", "--force", str(path), sha)
    return sha, path, False


def tree_digest(root: Path) -> str:
    """sha256 over service/**/*.py of a tree (to notice the working tree changing during the run)."""
    h = hashlib.sha256()
    for p in sorted((root / "service").rglob("*.py")):
        h.update(str(p.relative_to(root)).encode())
        try:
            h.update(p.read_bytes())
        except OSError:
            h.update(b"<gone>")
    return h.hexdigest()[:16]


def service_file(bench: Bench, side: Side) -> str:
    """`service.__file__` as the side's service process will import it (same interpreter, env and cwd)."""
    env = bench._env()
    env.update(side.env)
    r = subprocess.run(
        [procs.python(), "-c", "import service; print(service.__file__)"],
        cwd=side.root,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    out = r.stdout.strip()
    if r.returncode != 0 or not out:
        raise RuntimeError(f"{side.label}: import service failed: {r.stderr.strip()[-300:]}")
    if not Path(out).resolve().is_relative_to((side.root / "service").resolve()):
        raise RuntimeError(f"{side.label}: service imported from {out}, not from {side.root}")
    return out


def _others_now() -> list[str]:
    """The busiest processes right now that are not this benchmark's (for the report's context)."""
    try:
        r = subprocess.run(
            ["ps", "-eo", "pid,ppid,pcpu,etime,args", "--sort=-pcpu"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return []
    me = os.getpid()
    out = []
    for line in r.stdout.splitlines()[1:]:
        parts = line.split(None, 4)
        if len(parts) < 5 or int(parts[0]) == me or int(parts[1]) == me or parts[4].startswith("ps "):
            continue
        if float(parts[2]) < 5.0 or parts[4].startswith("["):
            break
        out.append(f"{parts[2]}% {parts[4][:90]} (up {parts[3]})")
        if len(out) >= 8:
            break
    return out


# -- measuring -----------------------------------------------------------------------------------------------


def _drain_once(bench: Bench, side: Side, kind: str, topic: str, n: int, label: str, memory: bool) -> dict[str, Any]:
    digest = tree_digest(side.root)  # the code this drain's service imports (this tree may be edited meanwhile)
    sandbox, url = bench.start_sandbox(label)
    services: list[Service] = []
    startup_kb = peak_kb = None
    try:
        group = f"bench-cmp-{kind}-{side.key}-{uuid.uuid4().hex[:6]}"
        env = bench.service_env(topic, group, url, **side.env)
        svc = bench.start_service(env, label, cwd=side.root)
        services = [svc]
        if memory:
            procs.wait_for(lambda: svc.proc.poll() is not None or procs.port_open(svc.port), 30, 0.05)
            startup_kb = procs.proc_status_kb(svc.proc.pid, "VmRSS")
        timeout = bench.args.row_timeout * (n / bench.args.events if memory else 1)
        d = bench.drain(services, n, bench.timeout(timeout), bench.pids(services, sandbox))
        if memory:
            peak_kb = procs.proc_status_kb(svc.proc.pid, "VmHWM")
    finally:
        bench.stop_services(services)
        Children.stop(sandbox, 10)
    d["side"] = side.key
    d["label"] = label
    d["service_digest"] = digest
    if memory:
        d["startup_rss_kb"], d["peak_rss_kb"] = startup_kb, peak_kb
    if d.get("ok"):
        cpu = d["cpu"]
        per_ev = d["seconds"] * 1e6 / n / 100  # percent of a core over the window → µs per event
        d["cpu_us_per_event"] = {k: cpu.get(k, 0.0) * per_ev for k in ("service", "sandbox", "broker", "box")}
        d["cpu_us_per_event"]["ours"] = sum(d["cpu_us_per_event"][k] for k in ("service", "sandbox", "broker"))
    return d


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def _summary(runs: list[dict[str, Any]], n: int) -> dict[str, Any]:
    ok = [d for d in runs if d.get("ok")]
    peaks = [d["peak_rss_kb"] / 1024 for d in runs if d.get("peak_rss_kb")]
    return {
        "runs": len(runs),
        "ok": len(ok),
        "eps": [d["eps"] for d in ok],
        "eps_median": _median([d["eps"] for d in ok]),
        "eps_95_median": _median([d["eps_95"] for d in ok if d.get("eps_95")]),
        "cpu_us_per_event_median": {
            k: _median([d["cpu_us_per_event"][k] for d in ok]) for k in ("service", "sandbox", "broker", "ours")
        },
        "others_cpu_pct_median": _median([d["cpu"].get("other", 0.0) for d in ok]),
        "superseded_share": _median([d["counts"]["superseded"] / n for d in ok]),
        "peak_rss_mb": peaks,
        "peak_rss_mb_median": _median(peaks),
        "errors": [str(d.get("error", "")).splitlines()[0][:120] for d in runs if not d.get("ok")],
    }


def _verdict(a: list[float], b: list[float]) -> str:
    """From the runs, not the medians: every run of one side faster than every run of the other, or overlap."""
    if len(a) < 2 or len(b) < 2:
        return "too few runs to tell"
    if max(a) < min(b):
        return "this tree slower in every run"
    if min(a) > max(b):
        return "this tree faster in every run"
    return "runs overlap"


def compare_row(bench: Bench, cmp: Comparison, kind: str) -> None:
    memory = kind == "memory"
    n = bench.args.memory_events if memory else bench.args.events
    wl = "mixed" if memory else kind
    if memory:
        topic = bench.new_topic("cmp-memory")
        count, secs = bench.produce(topic, workload.generate(wl, n, seed=MEMORY_SEED), bench.timeout(60 + n / 10_000))
        bench.say(f"compare memory: produced {count:,} mixed records to {topic} in {secs:.1f}s")
        ceiling = None
    else:
        topic = bench.backlog(kind, n)
        ceiling, _ = bench.ceiling(topic, n)
    row: dict[str, Any] = {"row": kind, "events": n, "topic": topic, "ceiling_mps": ceiling, "runs": []}
    cmp.rows.append(row)
    last_pair = 0.0
    try:
        for rep in range(bench.args.compare_repeats):
            need = max(30.0, 1.2 * last_pair)
            if bench.remaining() < need:
                cmp.notes.append(
                    f"{kind}: stopped after {rep} of {bench.args.compare_repeats} repeats "
                    f"(run budget: {bench.remaining():.0f} s left, a pair takes ~{last_pair:.0f} s)"
                )
                break
            t = time.monotonic()
            for side in cmp.sides:
                label = f"cmp-{kind}-{side.key}{rep + 1}"
                d = _drain_once(bench, side, wl, topic, n, label, memory)
                row["runs"].append(d)
                fig = f"{d['eps']:,.0f} ev/s" if d.get("ok") else f"error: {str(d.get('error'))[:80]}"
                if memory and d.get("peak_rss_kb"):
                    fig += f", peak RSS {d['peak_rss_kb'] / 1024:.0f} MB"
                cpu = d.get("cpu_us_per_event", {}).get("service")
                bench.say(
                    f"compare {kind} #{rep + 1} {side.label}: {fig}"
                    + (f", service {cpu:.1f} µs/event" if cpu else "")
                    + (f", others {d['cpu'].get('other', 0):.0f}% CPU" if d.get("cpu") else "")
                )
            last_pair = time.monotonic() - t
    finally:
        for side in cmp.sides:  # also when interrupted: the drains so far are reported
            row[side.key] = _summary([d for d in row["runs"] if d["side"] == side.key], n)
        keep = not memory and (kind in bench.selected or ("profile" in bench.selected and kind in ("email", "mixed")))
        if not keep:
            bench.delete_topic(topic)
            bench.topics.pop(kind, None)


def run(bench: Bench) -> Comparison:
    """The comparison phase: worktree, import check, then every compared row interleaved."""
    a = bench.args
    cmp = Comparison(ref=a.compare_ref)
    bench.comparison = cmp
    cmp.notes.append(f"busiest other processes at start: {'; '.join(_others_now()) or 'none above 5% CPU'}")
    digest0 = tree_digest(procs.ROOT)
    try:
        sha, path, reused = worktree(a.compare_ref, bench.logs.parent)
        cmp.sha, cmp.worktree = sha, str(path)
        cmp.subject = _git("log", "-1", "--format=%s", sha)
        cmp.this_head = _git("rev-parse", "--short=12", "HEAD")
        cmp.this_dirty_files = len(_git("status", "--porcelain", "--untracked-files=all", "--", "service").splitlines())
        dirty_ref = _git("status", "--porcelain", "--untracked-files=no", cwd=path)
        bench.say(f"compare: {a.compare_ref} = {sha[:12]} ({'reused' if reused else 'new'} worktree {path})")
        if dirty_ref:
            cmp.notes.append(f"the REF worktree has local changes: {dirty_ref.splitlines()[:5]}")
        cmp.sides = [
            Side("this", "this tree", procs.ROOT),
            Side("ref", f"REF {a.compare_ref}", path, {"PYTHONPATH": str(path)}),
        ]
        for side in cmp.sides:
            side.service_file = service_file(bench, side)
            bench.say(f"compare: {side.label} imports service from {side.service_file}")
        for kind in a.compare_rows:
            if bench.remaining() < 30:
                cmp.notes.append(f"{kind}: skipped, run budget {a.budget:.0f} s used up")
                continue
            bench.say(f"--- compare {kind}")
            try:
                compare_row(bench, cmp, kind)
            except (TimeoutError, RuntimeError) as e:
                cmp.notes.append(f"{kind}: {str(e).splitlines()[0][:150]}")
                bench.say(f"compare {kind}: {e}")
    except (TimeoutError, RuntimeError, subprocess.SubprocessError) as e:
        cmp.error = str(e).splitlines()[0][:300]
        bench.say(f"compare: {cmp.error}")
    seen = [d["service_digest"] for row in cmp.rows for d in row["runs"] if d["side"] == "this"]
    if tree_digest(procs.ROOT) != digest0 or len(set(seen)) > 1:
        cmp.notes.append(
            "service/ of this tree changed while the comparison ran (others edit it): the this-tree drains "
            f"imported {len(set(seen))} different versions of service/ (digest per drain in compare.json)"
        )
    return cmp


# -- output --------------------------------------------------------------------------------------------------


def _f(x: float | None, fmt: str = ",.0f") -> str:
    return "n/a" if x is None else format(x, fmt)


def render(bench: Bench, cmp: Comparison) -> str:
    a = bench.args
    elapsed = time.monotonic() - cmp.started
    ref = f"`{cmp.ref}`" + (f" = {cmp.sha[:12]} ({cmp.subject})" if cmp.sha else "")
    out = [
        f"# audience-sync benchmark: this tree against {cmp.ref} ({time.strftime('%Y-%m-%d %H:%M:%S')}, "
        f"{elapsed:.0f} s)",
        "",
        f"- this tree: {procs.ROOT} at {cmp.this_head or '?'} with {cmp.this_dirty_files} changed or new files "
        "under service/ (uncommitted)",
        f"- REF: {ref}, worktree {cmp.worktree or 'n/a'}",
    ]
    for s in cmp.sides:
        out.append(f"- {s.label}: `service` imported from {s.service_file or '?'}")
    out += [
        f"- {os.cpu_count()} cores; N = {a.events:,} events per row"
        + (f" (memory: {a.memory_events:,})" if "memory" in a.compare_rows else "")
        + f"; {a.compare_repeats} drain(s) per side, in the order this, REF, this, REF …; one tansu, one "
        "pre-produced topic per "
        "row (fresh consumer group per drain), a fresh sandbox (this tree's) per drain; service config as the "
        "main rows (harness.SERVICE_CONFIG).",
        "",
    ]
    if cmp.error:
        out += [f"**Comparison failed:** {cmp.error}", ""]
    out += [
        "| row | this tree ev/s (median) | REF ev/s (median) | ratio this/REF | this tree CPU µs/event "
        "| REF CPU µs/event | peak RSS MB this / REF | runs ev/s: this ; REF | runs |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in cmp.rows:
        this, ref_s = row.get("this", {}), row.get("ref", {})
        ea, eb = this.get("eps_median"), ref_s.get("eps_median")
        ratio = f"{ea / eb:.2f}x" if ea and eb else "n/a"
        ca = this.get("cpu_us_per_event_median", {}).get("service")
        cb = ref_s.get("cpu_us_per_event_median", {}).get("service")
        rss = ""
        if row["row"] == "memory":
            rss = f"{_f(this.get('peak_rss_mb_median'))} / {_f(ref_s.get('peak_rss_mb_median'))}"
        runs = ", ".join(_f(x) for x in this.get("eps", [])) + " ; " + ", ".join(_f(x) for x in ref_s.get("eps", []))
        name = f"e2e {row['row']}" if row["row"] != "memory" else f"memory ({row['events']:,}-event backlog)"
        out.append(
            f"| {name} | {_f(ea)} | {_f(eb)} | {ratio} | {_f(ca, '.1f')} | {_f(cb, '.1f')} | {rss} | {runs} "
            f"| {_verdict(this.get('eps', []), ref_s.get('eps', []))} |"
        )
    out += [
        "",
        "ratio > 1: this tree is faster. CPU µs/event: the service process's CPU time over its drain window / N "
        "(median of the runs). `runs`: whether every run of this tree was slower or faster than every REF run, "
        "or the runs overlap (no difference beyond the run-to-run spread; needs 2 runs a side).",
    ]
    notes = list(cmp.notes)
    for row in cmp.rows:
        this, ref_s = row.get("this", {}), row.get("ref", {})
        parts = [
            f"others' CPU during the drains (median % of a core) this {_f(this.get('others_cpu_pct_median'))}, "
            f"REF {_f(ref_s.get('others_cpu_pct_median'))}"
        ]
        oa = this.get("cpu_us_per_event_median", {}).get("ours")
        ob = ref_s.get("cpu_us_per_event_median", {}).get("ours")
        parts.append(f"service+sandbox+broker µs/event this {_f(oa, '.1f')}, REF {_f(ob, '.1f')}")
        sa, sb = this.get("superseded_share"), ref_s.get("superseded_share")
        if sa is not None and sb is not None:
            parts.append(f"superseded in the buffers this {sa:.1%}, REF {sb:.1%}")
        if row.get("ceiling_mps"):
            parts.append(f"bare consume ceiling {row['ceiling_mps']:,.0f} msg/s")
        for key, s in (("this", this), ("REF", ref_s)):
            if s.get("errors"):
                parts.append(f"{key} errors: {'; '.join(s['errors'])}")
        notes.append(f"{row['row']}: " + "; ".join(parts))
    if a.events < 200_000:
        notes.append(f"N = {a.events:,} is a smoke run: startup and the last linger tail weigh on every figure")
    out += ["", "Notes:", *[f"- {x}" for x in notes]]
    return "\n".join(out) + "\n"


def write(bench: Bench, cmp: Comparison, artifacts: Path) -> str:
    text = render(bench, cmp)
    artifacts.mkdir(parents=True, exist_ok=True)
    (artifacts / "compare.md").write_text(text)
    data = {
        "ref": cmp.ref,
        "sha": cmp.sha,
        "subject": cmp.subject,
        "worktree": cmp.worktree,
        "this_head": cmp.this_head,
        "this_dirty_files_under_service": cmp.this_dirty_files,
        "sides": [s.__dict__ | {"root": str(s.root)} for s in cmp.sides],
        "args": vars(bench.args),
        "nproc": os.cpu_count(),
        "rows": cmp.rows,
        "notes": cmp.notes,
        "error": cmp.error,
        "elapsed_s": time.monotonic() - cmp.started,
    }
    (artifacts / "compare.json").write_text(json.dumps(data, indent=2, default=str))
    return text
