"""CPU profile of the service with py-spy (sampling, out of process), aggregated from `--format raw`.

py-spy attaches by pid (needs ptrace: root or CAP_SYS_PTRACE); if that fails it launches the service itself
(`py-spy record -- python -m service run`). The raw output is collapsed stacks, one `frame;frame;... count` per
line, which speedscope and flamegraph.pl read as is.
"""

from __future__ import annotations

import re
import shutil
import sys
from collections import Counter
from pathlib import Path

# The entry chain of the main thread (`python -m service run` → cli → app): in most samples, says nothing.
_ENTRY = frozenset(
    {
        "<module> (service/__main__.py)",
        "main (service/cli.py)",
        "cmd_run (service/cli.py)",
        "run (service/commands/run.py)",
        "_main (service/commands/run.py)",
        "serve (service/commands/run.py)",
    }
)
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^():]*?)(?::(?P<line>\d+))?\)$")


def py_spy_binary() -> str | None:
    """py-spy next to this interpreter (the project's .venv), else on PATH."""
    cand = Path(sys.executable).parent / "py-spy"
    if cand.exists():
        return str(cand)
    return shutil.which("py-spy")


def _short(frame: str, keep_line: bool = False) -> str:
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    path = m.group("file")
    for marker in ("site-packages/", "lib/python3.11/", "/work/main/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    if keep_line and m.group("line"):
        return f"{m.group('func')} ({path}:{m.group('line')})"
    return f"{m.group('func')} ({path})"


def parse_raw(path: Path) -> list[tuple[list[str], int]]:
    stacks: list[tuple[list[str], int]] = []
    for line in path.read_text(errors="replace").splitlines():
        head, _, n = line.rpartition(" ")
        if not head or not n.isdigit():
            continue
        frames = [f for f in head.split(";") if f and not f.startswith(("process ", "thread "))]
        if frames:
            stacks.append((frames, int(n)))
    return stacks


def summarise(path: Path, top: int = 15) -> dict[str, object]:
    """Self time by leaf function, and inclusive time of the service's own functions (percent of samples)."""
    stacks = parse_raw(path)
    total = sum(n for _, n in stacks)
    leaf: Counter[str] = Counter()
    leaf_line: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    for frames, n in stacks:
        # py-spy writes the root first, the leaf last
        leaf[_short(frames[-1])] += n
        leaf_line[_short(frames[-1], keep_line=True)] += n
        seen = set()
        for f in frames:
            s = _short(f)
            if s.split("(", 1)[-1].startswith("service/") and s not in seen and s not in _ENTRY:
                seen.add(s)
                inclusive[s] += n

    def pct(c: Counter[str]) -> list[tuple[str, float]]:
        return [(k, 100.0 * v / total) for k, v in c.most_common(top)] if total else []

    return {
        "samples": total,
        "self_by_function": pct(leaf),
        "self_by_line": pct(leaf_line),
        "inclusive_service": pct(inclusive),
    }
