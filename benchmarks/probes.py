"""How much each way of reading a process's memory costs, small process and big.

``current_rss()`` (one ``pread`` on a kept-open ``/proc/self/statm``) is what memguard
may afford on the request path; psutil's ``memory_info()`` is what most code does
instead; ``process_memory()`` (``/proc/PID/smaps_rollup``: USS and PSS) is for the
master's watchdog on a timer, and its cost grows with the process. Each probe is timed
in a fresh child process, once small and once holding a written 300 MiB ballast; the
probes are interleaved in rounds of batches, and the medians are reported in
microseconds per call. Nothing here is a memory bound, so nothing fails CI; the bounds
are the design's expectations, reported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

from benchmarks.harness import Bound, Result, median

MiB = 1024 * 1024
BIG_MIB = 300


def _measure(ballast_mib: int, rounds: int, batch: int) -> dict[str, Any]:
    """Runs in the child: time each probe, interleaved, ``rounds`` batches of ``batch``."""
    import psutil

    from memguard.system import current_rss, process_memory

    # Written, so that the pages are resident (calloc'ed zero pages would not be).
    ballast = b"\x01" * (ballast_mib * MiB) if ballast_mib else b""
    pid = os.getpid()
    proc = psutil.Process(pid)  # kept, as code that calls it per request would
    probes = {
        "current_rss": current_rss,
        "psutil_memory_info": proc.memory_info,
        "process_memory": lambda: process_memory(pid),
    }
    # process_memory is ~100x slower: fewer calls per batch keep the rounds even.
    batches = {"current_rss": batch, "psutil_memory_info": max(1, batch // 10),
               "process_memory": max(1, batch // 100)}
    samples: dict[str, list[float]] = {name: [] for name in probes}
    for fn in probes.values():
        fn()  # warm: first open, imports
    for _ in range(rounds):
        for name, fn in probes.items():
            n = batches[name]
            started = time.perf_counter_ns()
            for _ in range(n):
                fn()
            samples[name].append((time.perf_counter_ns() - started) / n / 1000)
    mem = process_memory(pid)
    return {
        "ballast_mib": ballast_mib,
        "rss_mib": round(mem.rss / MiB, 1),
        "uss_mib": round((mem.uss or 0) / MiB, 1),
        "source": mem.source,
        "median_us": {name: round(median(v), 3) for name, v in samples.items()},
        "min_us": {name: round(min(v), 3) for name, v in samples.items()},
        "rounds": rounds,
        "calls_per_batch": batches,
        "ballast_len": len(ballast),
    }


def _child(ballast_mib: int, rounds: int, batch: int) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.probes", str(ballast_mib), str(rounds), str(batch)],
        capture_output=True, text=True, check=True, timeout=600,
    ).stdout
    result: dict[str, Any] = json.loads(out)
    return result


def run(quick: bool) -> Result:
    rounds, batch = (15, 1000) if quick else (60, 2000)
    small = _child(0, rounds, batch)
    big = _child(BIG_MIB, rounds, batch)
    figures = {"small": small, "big": big}
    s, b = small["median_us"], big["median_us"]
    table = [
        {"process": f"small ({small['rss_mib']} MiB RSS)", **{k: v for k, v in s.items()}},
        {"process": f"big ({big['rss_mib']} MiB RSS)", **{k: v for k, v in b.items()}},
    ]
    bounds = [
        Bound("current_rss, small process", s["current_rss"], 5.0, "us"),
        Bound("current_rss, 300 MiB process", b["current_rss"], 5.0, "us"),
        Bound("psutil memory_info / current_rss (small)",
              s["psutil_memory_info"] / s["current_rss"], 3.0, "x", at_least=True),
        Bound("process_memory (smaps_rollup), 300 MiB process", b["process_memory"] / 1000,
              25.0, "ms"),
    ]
    notes = [
        "current_rss: one os.pread on a kept-open /proc/self/statm; psutil: "
        "Process.memory_info() on a kept Process; process_memory: /proc/PID/smaps_rollup.",
        f"medians of {rounds} interleaved batches per probe, in a fresh child process each.",
    ]
    return Result("probes", figures, bounds, notes, table)


if __name__ == "__main__":
    ballast, rounds_arg, batch_arg = (int(a) for a in sys.argv[1:4])
    print(json.dumps(_measure(ballast, rounds_arg, batch_arg)))
