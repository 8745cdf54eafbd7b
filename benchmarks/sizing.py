"""`memguard suggest` against a sweep: every worker count, in a real memory cgroup.

For three app shapes (``benchmarks/apps/shapes.py``: CPU-bound, I/O-bound with a 20 ms
wait, memory-heavy with a per-worker cache), each in a fresh memory cgroup
(``MemoryCgroup``, no swap: the kernel's OOM killer is real), plain gunicorn with sync
workers runs with every worker count from 1 until two counts in a row had OOM kills (past
the memory bound). Each point: gunicorn starts in the group, ``wrk`` warms it for a
second, then loads it with ``CONNECTIONS`` connections over loopback for ``SECONDS``;
throughput is wrk's requests per second, OOM kills the group's ``oom_kill`` counter.

``memguard suggest --app X --json --memory <group limit>`` runs as a user would (a
subprocess, outside the group), and its configuration runs as printed (memguard's ready
config, its worker count and limits) beside the sweep in each round. Rounds are
interleaved (every point once per round); the sweep's figures are medians over rounds,
and the spread (max - min over the median) says how noisy the machine was.

The best of many noisy medians is biased upwards, and a shared machine's load drifts
within a sweep, so the ratio is measured apart: suggest's configuration and the best sweep
point without an OOM kill run alternately, ``PAIRS`` times (the order flipped each pair),
and the ratio is the median of the pairs' ratios.

Quick mode (CI, under two minutes): one round, one second per point, worker counts on a
doubling ladder up to the first OOM kill, one pair.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.harness import Bound, Result, median
from tests.support.cgroups import MemoryCgroup, cgroup_unavailable_reason
from tests.support.servers import serve

REPO = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024
CONNECTIONS = 64
SECONDS = 2.0
QUICK_SECONDS = 1.0
ROUNDS = 3
PAIRS = 5
QUICK_PAIRS = 1
MAX_WORKERS = 80  # a sweep stops here even without OOM kills
QUICK_LADDER = (1, 2, 4, 8, 16, 32, 64)
TARGET = 0.95  # suggest's throughput over the best without OOM kills


@dataclass(frozen=True)
class Shape:
    name: str
    app: str
    limit: int  # the memory cgroup's limit, bytes
    what: str


SHAPES = (
    Shape("cpu", "benchmarks.apps.shapes:cpu_app", 128 * MiB,
          "CPU-bound: a few ms of computing per request, no waiting"),
    Shape("io", "benchmarks.apps.shapes:io_app", 192 * MiB,
          "I/O-bound: 20 ms of waiting per request, almost no computing"),
    Shape("memory", "benchmarks.apps.shapes:memory_app", 512 * MiB,
          "memory-heavy: a 96 MiB cache per worker, built on its first request; 20 ms wait"),
)


def suggest(shape: Shape) -> dict[str, Any]:
    """``memguard suggest`` as a user runs it, for this shape and group limit."""
    argv = [sys.executable, "-m", "memguard", "suggest", "--app", shape.app, "--json",
            "--memory", f"{shape.limit // MiB}MiB"]
    out = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=180,
                         check=True).stdout
    advice: dict[str, Any] = json.loads(out)
    return advice


def _suggest_args(advice: dict[str, Any]) -> tuple[list[str], dict[str, str]]:
    """gunicorn's arguments (but the worker count) and environment for the configuration
    suggest printed."""
    args = ["-c", "python:memguard.gunicorn.conf", "-k", advice["worker_class"]]
    if advice["threads"] > 1:
        args += ["--threads", str(advice["threads"])]
    if advice["preload"]:
        args.append("--preload")
    env = {
        "MEMGUARD_WORKER_MEMORY_LIMIT": f"{advice['worker_memory_limit'] // MiB}MiB",
        "MEMGUARD_WORKER_MEMORY_HARD_LIMIT": f"{advice['worker_memory_hard_limit'] // MiB}MiB",
        "MEMGUARD_TOTAL_MEMORY_LIMIT": f"{advice['total_memory_limit'] // MiB}MiB",
    }
    return args, env


def _wrk(url: str, seconds: float, connections: int = CONNECTIONS) -> dict[str, Any]:
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--timeout", "5s", url],
        capture_output=True, text=True, timeout=seconds + 60).stdout
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if rate is None:
        raise RuntimeError(f"unexpected wrk output:\n{out}")
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
                       out)
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    failed = sum(int(x) for x in errors.groups()) if errors else 0
    return {"rps": float(rate.group(1)),
            "failed": failed + (int(non_2xx.group(1)) if non_2xx else 0)}


def measure(shape: Shape, workers: int, args: list[str], env: dict[str, str],
            seconds: float) -> dict[str, Any]:
    """One point: gunicorn with ``workers`` and ``args`` in a fresh group, warmed, then
    loaded. The warm-up keeps no more connections than workers: requests it leaves queued
    would be served, and counted against, the measured run."""
    with MemoryCgroup(shape.limit) as group:
        try:
            with serve("gunicorn", shape.app, ["-k", "sync", "-w", str(workers), *args],
                       env=env, cwd=REPO, cgroup=group, timeout=60) as server:
                # gunicorn forks its workers a random 0-100 ms apart: all of them (unless
                # the kernel is already killing them), then every worker builds what it
                # builds on first use.
                deadline = time.monotonic() + 30
                while (len(server.children()) < workers and not group.oom_kills
                       and time.monotonic() < deadline):
                    time.sleep(0.05)
                _wrk(server.url + "/", 1, connections=min(workers, CONNECTIONS))
                load = _wrk(server.url + "/", seconds)
                return {**load, "oom_kills": group.oom_kills, "peak_mib": group.peak // MiB}
        except (RuntimeError, TimeoutError) as exc:
            # The pool could not even start (the master itself was killed): a failed point.
            return {"rps": 0.0, "failed": -1, "oom_kills": max(1, group.oom_kills),
                    "peak_mib": group.peak // MiB, "error": str(exc).splitlines()[0][:200]}


def _counts(quick: bool) -> list[int]:
    return list(QUICK_LADDER) if quick else list(range(1, MAX_WORKERS + 1))


def sweep(shape: Shape, advice: dict[str, Any], quick: bool) -> dict[str, Any]:
    rounds = 1 if quick else ROUNDS
    seconds = QUICK_SECONDS if quick else SECONDS
    points: dict[int, list[dict[str, Any]]] = {}
    picked: list[dict[str, Any]] = []
    counts: list[int] = []
    args, env = _suggest_args(advice)
    for round_ in range(rounds):
        if round_ == 0:
            oom_in_a_row = 0
            for n in _counts(quick):
                data = measure(shape, n, [], {}, seconds)
                points.setdefault(n, []).append(data)
                counts.append(n)
                print(f"   {shape.name:6} w={n:<3} {data['rps']:8.1f} req/s  OOM kills"
                      f" {data['oom_kills']}  peak {data['peak_mib']} MiB", flush=True)
                oom_in_a_row = oom_in_a_row + 1 if data["oom_kills"] else 0
                if oom_in_a_row == (1 if quick else 2):
                    break
        else:
            for n in counts:
                points[n].append(measure(shape, n, [], {}, seconds))
        data = measure(shape, advice["workers"], args, env, seconds)
        picked.append(data)
        print(f"   {shape.name:6} suggest (w={advice['workers']}) round {round_ + 1}:"
              f" {data['rps']:.1f} req/s, OOM kills {data['oom_kills']},"
              f" failed {data['failed']}", flush=True)
    rows = [_merge(n, points[n]) for n in counts]
    fit = [r for r in rows if r["oom_kills"] == 0]
    best = max(fit, key=lambda r: r["rps"]) if fit else None
    pairs = _head_to_head(shape, advice, best["workers"], QUICK_PAIRS if quick else PAIRS,
                          seconds) if best else []
    picked += [p["suggest"] for p in pairs]
    suggested = _merge(advice["workers"], picked)
    same_count = next((r for r in rows if r["workers"] == advice["workers"]), None)
    ratios = [p["suggest"]["rps"] / p["best"]["rps"] for p in pairs if p["best"]["rps"]]
    return {
        "shape": shape.name,
        "what": shape.what,
        "app": shape.app,
        "group_limit_mib": shape.limit // MiB,
        "rounds": rounds,
        "seconds": seconds,
        "rows": rows,
        "best": best,
        "suggest": {
            **suggested,
            "command": advice["command"],
            "decided_by": advice["decided_by"],
            "cpu_bound": advice["cpu_bound"],
            "memory_bound": advice["memory_bound"],
            "cpu_share": advice["inputs"].get("cpu_share"),
            "limits_mib": {k: advice[k] // MiB for k in (
                "worker_memory_limit", "worker_memory_hard_limit", "total_memory_limit")},
            "ratio_to_best": round(median(ratios), 3) if ratios else None,
            "pair_ratios": [round(r, 3) for r in ratios],
            "sweep_ratio_to_best": (round(same_count["rps"] / best["rps"], 3)
                                    if best and same_count else None),
        },
        "pairs": pairs,
        "first_oom_workers": next((r["workers"] for r in rows if r["oom_kills"]), None),
    }


def _head_to_head(shape: Shape, advice: dict[str, Any], best: int, pairs: int,
                  seconds: float) -> list[dict[str, Any]]:
    """Suggest's configuration and the best sweep point, run alternately."""
    args, env = _suggest_args(advice)
    out = []
    for i in range(pairs):
        pair: dict[str, Any] = {}
        for which in (("suggest", "best") if i % 2 == 0 else ("best", "suggest")):
            if which == "suggest":
                pair[which] = measure(shape, advice["workers"], args, env, seconds)
            else:
                pair[which] = measure(shape, best, [], {}, seconds)
        print(f"   {shape.name:6} pair {i + 1}: suggest {pair['suggest']['rps']:.1f},"
              f" best (w={best}) {pair['best']['rps']:.1f} req/s", flush=True)
        out.append(pair)
    return out


def _merge(workers: int, rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over rounds; OOM kills and failures: the worst round."""
    rates = [r["rps"] for r in rounds]
    mid = median(rates)
    return {
        "workers": workers,
        "rps": round(mid, 1),
        "spread": round((max(rates) - min(rates)) / mid, 3) if mid else None,
        "oom_kills": max(r["oom_kills"] for r in rounds),
        "failed": max(r["failed"] for r in rounds),
        "peak_mib": max(r["peak_mib"] for r in rounds),
        "rounds_rps": rates,
    }


def run(quick: bool) -> Result:
    reason = cgroup_unavailable_reason()
    if reason is None and shutil.which("wrk") is None:
        reason = "wrk not installed (Debian package wrk; make bench installs it)"
    if reason is not None:
        return Result("sizing", {"skipped": reason}, notes=[f"skipped: {reason}"])
    only = os.environ.get("SIZING_ONLY")  # for working on one shape: SIZING_ONLY=io
    shapes = [s for s in SHAPES if not only or s.name == only]
    results = []
    bounds: list[Bound] = []
    table: list[dict[str, Any]] = []
    for shape in shapes:
        advice = suggest(shape)
        print(f"   {shape.name}: suggest says {advice['workers']} workers"
              f" (decided by {advice['decided_by']})", flush=True)
        data = sweep(shape, advice, quick)
        results.append(data)
        pick = data["suggest"]
        bounds.append(Bound(f"{shape.name}: suggest's configuration, OOM kills",
                            pick["oom_kills"], 0, hard=True))
        if pick["ratio_to_best"] is not None:
            bounds.append(Bound(f"{shape.name}: suggest's throughput / best without OOM",
                                pick["ratio_to_best"], TARGET, unit="x", at_least=True))
        table += _table_rows(data)
    spreads = [r["spread"] for d in results for r in d["rows"] if r["spread"] is not None]
    notes = []
    if spreads:
        notes.append(f"noise: throughput spread over rounds (max - min over median), median"
                     f" {median(spreads):.1%}, worst {max(spreads):.1%}")
    return Result(
        "sizing",
        figures={"connections": CONNECTIONS, "worker_class": "sync", "shapes": results},
        bounds=bounds, notes=notes, table=table,
    )


def _table_rows(data: dict[str, Any]) -> list[dict[str, Any]]:
    best = data["best"]["workers"] if data["best"] else None
    pick = data["suggest"]
    rows = [{"shape": data["shape"], "workers": r["workers"], "rps": r["rps"],
             "spread": r["spread"], "oom_kills": r["oom_kills"], "failed": r["failed"],
             "peak_mib": r["peak_mib"],
             "mark": ("best" if r["workers"] == best else "")
             + (" suggest's count" if r["workers"] == pick["workers"] else "")}
            for r in data["rows"]]
    rows.append({"shape": data["shape"], "workers": pick["workers"], "rps": pick["rps"],
                 "spread": pick["spread"], "oom_kills": pick["oom_kills"],
                 "failed": pick["failed"], "peak_mib": pick["peak_mib"],
                 "mark": f"suggest, as printed: {pick['ratio_to_best']} x best"})
    return rows


def markdown(result: dict[str, Any]) -> str:
    """The README tables from a result file (``python -m benchmarks.sizing [JSON]``)."""
    out = []
    for data in result["figures"]["shapes"]:
        pick = data["suggest"]
        best = data["best"]
        out += [
            f"**{data['shape']}** ({data['what']}; {data['group_limit_mib']} MiB group):"
            f" suggest picks **{pick['workers']}** (decided by {pick['decided_by']}; cpu"
            f" bound {pick['cpu_bound']}, memory bound {pick['memory_bound']}), best"
            f" without OOM: {best['workers'] if best else 'none'} workers;"
            f" suggest's configuration as printed: {pick['rps']:.0f} req/s,"
            f" **{pick['ratio_to_best']} x best**, {pick['oom_kills']} OOM kills.",
            "",
            "| workers | req/s (median) | spread | OOM kills | failed | peak MiB | |",
            "|---:|---:|---:|---:|---:|---:|---|",
        ]
        for r in data["rows"]:
            mark = []
            if best and r["workers"] == best["workers"]:
                mark.append("best without OOM")
            if r["workers"] == pick["workers"]:
                mark.append("**suggest's count**")
            out.append(f"| {r['workers']} | {r['rps']:.0f} | {r['spread']:.0%} |"
                       f" {r['oom_kills']} | {r['failed']} | {r['peak_mib']} |"
                       f" {', '.join(mark)} |")
        out.append(f"| **{pick['workers']}, as printed** | **{pick['rps']:.0f}** |"
                   f" {pick['spread']:.0%} | {pick['oom_kills']} | {pick['failed']} |"
                   f" {pick['peak_mib']} | memguard's config and limits |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    source = Path(sys.argv[1]) if len(sys.argv) > 1 else REPO / "benchmarks/results/sizing.json"
    print(markdown(json.loads(source.read_text())))
