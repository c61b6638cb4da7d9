"""Phone normalisation options, measured in the harness process on the phone-national row's own input.

The input is the seeded user sequence of `workload.generate("phone-national", events)` (same seed, same
events/users ratio, so the same repeats). The options hash the second half of that sequence, `hash_phone`
(normalise + SHA-256) per event, each for at most `seconds` of wall time:

  a  no cache     `hash_phone` with `identifiers._to_e164` swapped for its `__wrapped__` (phonenumbers per call)
  b  LRU          `hash_phone` as shipped; the cache is first filled with exactly what it would hold at the
                  window's start (an LRU simulated over the first half), so the hit ratio is the steady one
  c  pool         a ProcessPoolExecutor of os.cpu_count() workers (spawned: the harness has librdkafka threads)
                  running option a over chunks of the window; worker start-up is not timed
  d  E.164 input  `hash_phone` on the same users' numbers already in E.164 (the fast path), as a reference

The LRU hit ratio over the whole sequence is simulated with the service's cache size.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from bench import procs, workload
from service.core import identifiers

REGION = "US"
CHUNK = 1000  # items per timing check (single process) and per pool task
POOL_BLOCK = 16  # pool tasks per map() call: enough to keep every worker busy between the time checks


@contextlib.contextmanager
def uncached() -> Iterator[None]:
    """`identifiers.hash_phone` with phonenumbers called every time (the LRU wrapper bypassed)."""
    cached = identifiers._to_e164
    identifiers._to_e164 = cached.__wrapped__  # type: ignore[assignment]
    try:
        yield
    finally:
        identifiers._to_e164 = cached


def _worker_uncached() -> None:
    """Pool initializer: every worker runs the uncached path (option c is a pool *instead of* the cache)."""
    identifiers._to_e164 = identifiers._to_e164.__wrapped__  # type: ignore[assignment]


def _hash(value: str) -> object:
    return identifiers.hash_phone(value, REGION)


def inputs(events: int, seed: int = 1) -> tuple[list[str], list[str]]:
    """(national-format phone per event, the same users' E.164 numbers) for the phone-national row's sequence."""
    national: dict[int, str] = {}
    e164: dict[int, str] = {}
    seq_n: list[str] = []
    seq_e: list[str] = []
    for i, _a, _entered in workload.picks(events, seed=seed):
        p = national.get(i)
        if p is None:
            p = national[i] = workload.user(i, "phone-national").phone or ""
            e164[i] = workload.user(i, "phone-e164").phone or ""
        seq_n.append(p)
        seq_e.append(e164[i])
    return seq_n, seq_e


def simulate_lru(keys: list[str], size: int) -> tuple[int, OrderedDict[str, None]]:
    """Hits of an LRU of `size` over `keys` (what functools.lru_cache does), and its final content, oldest first."""
    lru: OrderedDict[str, None] = OrderedDict()
    hits = 0
    for k in keys:
        if k in lru:
            hits += 1
            lru.move_to_end(k)
        else:
            lru[k] = None
            if len(lru) > size:
                lru.popitem(last=False)
    return hits, lru


def _timed(fn: Callable[[str], object], items: list[str], seconds: float) -> dict[str, Any]:
    meter = procs.CpuMeter({})
    done = 0
    start = time.perf_counter()
    deadline = start + seconds
    for pos in range(0, len(items), CHUNK):
        for v in items[pos : pos + CHUNK]:
            fn(v)
        done += min(CHUNK, len(items) - pos)
        if time.perf_counter() >= deadline:
            break
    wall = time.perf_counter() - start
    return {"items": done, "seconds": wall, "per_s": done / wall, "cpu": meter.read()}


def _pool(items: list[str], seconds: float, workers: int) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    t_spawn = time.perf_counter()
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_uncached) as pool:
        # start every worker and load phonenumbers' US metadata before the clock starts
        list(pool.map(_hash, items[: workers * CHUNK], chunksize=CHUNK // 4))
        spawn_s = time.perf_counter() - t_spawn
        pids = list(pool._processes or {})
        meter = procs.CpuMeter({"workers": pids})
        done = 0
        start = time.perf_counter()
        deadline = start + seconds
        block = CHUNK * POOL_BLOCK
        for pos in range(0, len(items), block):
            part = items[pos : pos + block]
            for _ in pool.map(_hash, part, chunksize=CHUNK):
                pass
            done += len(part)
            if time.perf_counter() >= deadline:
                break
        wall = time.perf_counter() - start
        cpu = meter.read()
    cpu["harness"] = cpu.get("harness", 0.0) + cpu.pop("workers", 0.0)  # the workers are the harness's own
    return {
        "items": done,
        "seconds": wall,
        "per_s": done / wall,
        "cpu": cpu,
        "workers": workers,
        "chunksize": CHUNK,
        "startup_s": spawn_s,
    }


def measure(events: int, seconds: float = 2.0, seed: int = 1, workers: int | None = None) -> dict[str, Any]:
    """The four options over the second half of the phone-national sequence; see the module docstring."""
    t0 = time.perf_counter()
    national, e164 = inputs(events, seed)
    size = identifiers.PHONE_CACHE_SIZE
    half = len(national) // 2
    hits_all, _ = simulate_lru(national, size)
    _, warm = simulate_lru(national[:half], size)
    window, window_e164 = national[half:], e164[half:]
    out: dict[str, Any] = {
        "events": events,
        "users": workload.user_count(events),
        "distinct_numbers": len(set(national)),
        "window": [half, len(national)],
        "seconds_per_option": seconds,
        "cache_size": size,
        "lru_hit_ratio_all": hits_all / len(national) if national else 0.0,
    }
    out["prepare_s"] = time.perf_counter() - t0

    with uncached():
        out["a_uncached"] = _timed(_hash, window, seconds)

    identifiers.clear_phone_cache()
    try:
        t = time.perf_counter()
        for k in warm:  # oldest first, so the real cache ends in the simulated LRU order
            identifiers._to_e164(k.strip(), REGION)
        out["warm_s"] = time.perf_counter() - t
        before = identifiers._to_e164.cache_info()
        out["b_lru"] = _timed(_hash, window, seconds)
        after = identifiers._to_e164.cache_info()
        calls = (after.hits - before.hits) + (after.misses - before.misses)
        out["b_lru"]["hit_ratio"] = (after.hits - before.hits) / calls if calls else 0.0
    finally:
        identifiers.clear_phone_cache()

    try:
        out["c_pool"] = _pool(window, seconds, workers or os.cpu_count() or 1)
    except (OSError, RuntimeError) as e:  # BrokenProcessPool is a RuntimeError
        out["c_pool"] = {"error": f"{type(e).__name__}: {e}".splitlines()[0][:100]}
    out["d_e164"] = _timed(_hash, window_e164, seconds)
    out["total_s"] = time.perf_counter() - t0
    return out
