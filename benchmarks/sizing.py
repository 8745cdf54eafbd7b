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
config, its worker class, count, threads and limits) as one more point.

This machine is shared: its load drifts by more than a factor of two within minutes, so
every point runs once per round, in an order shuffled anew each round (the first round
goes up in counts, to find where the OOM kills start), and figures are medians over
``ROUNDS`` rounds, with the spread (max - min over the median) of each point. Suggest's
ratio to the best is the median of per-round ratios (suggest's run over the best point's
run in the same round), so both see the same load. A point whose median is within the
best point's rounds (at or above its lowest) is a tie with it: the sweep cannot tell them
apart. Per point, wrk's own CPU time and the host's busy share are kept: they show
whether the load generator or the machine, not the app, set the throughput.

Quick mode (CI, under two minutes): one round, one second per point, worker counts on a
doubling ladder up to the first OOM kill.
"""

from __future__ import annotations

import json
import os
import random
import re
import resource
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
ROUNDS = 5
MAX_WORKERS = 80  # a sweep stops here even without OOM kills
QUICK_LADDER = (1, 2, 4, 8, 16, 32, 64)
TARGET = 0.95  # suggest's throughput over the best without OOM kills
SUGGEST = "suggest"  # the key of suggest's configuration among the sweep's points


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
    """gunicorn's arguments and environment for the configuration suggest printed."""
    args = ["-c", "python:memguard.gunicorn.conf", "-k", advice["worker_class"],
            "-w", str(advice["workers"])]
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


def _host_ticks() -> tuple[int, int]:
    """(all, idle) jiffies of every CPU, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return sum(fields), fields[3] + fields[4]


def _wrk(url: str, seconds: float, connections: int = CONNECTIONS) -> dict[str, Any]:
    before, ticks = resource.getrusage(resource.RUSAGE_CHILDREN), _host_ticks()
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--timeout", "5s", url],
        capture_output=True, text=True, timeout=seconds + 60).stdout
    after, ticks_after = resource.getrusage(resource.RUSAGE_CHILDREN), _host_ticks()
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if rate is None:
        raise RuntimeError(f"unexpected wrk output:\n{out}")
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
                       out)
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    failed = sum(int(x) for x in errors.groups()) if errors else 0
    wrk_cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    total, idle = ticks_after[0] - ticks[0], ticks_after[1] - ticks[1]
    return {"rps": float(rate.group(1)),
            "failed": failed + (int(non_2xx.group(1)) if non_2xx else 0),
            "wrk_cpus": round(wrk_cpu / seconds, 3),
            "host_busy": round(1 - idle / total, 3) if total else None}


def measure(shape: Shape, workers: int, args: list[str], env: dict[str, str],
            seconds: float) -> dict[str, Any]:
    """One point: gunicorn with ``args`` (``workers`` processes) in a fresh group, warmed,
    then loaded. The warm-up keeps no more connections than workers: requests it leaves
    queued would be served, and counted against, the measured run."""
    with MemoryCgroup(shape.limit) as group:
        try:
            with serve("gunicorn", shape.app, args, env=env, cwd=REPO, cgroup=group,
                       timeout=60) as server:
                # gunicorn forks its workers a random 0-100 ms apart: all of them (unless
                # the kernel is already killing them), then every worker builds what it
                # builds on first use.
                deadline = time.monotonic() + 30
                while (len(server.children()) < workers and not group.oom_kills
                       and time.monotonic() < deadline):
                    time.sleep(0.05)
                _wrk(server.url + "/", 1, connections=min(workers, CONNECTIONS))
                load = _wrk(server.url + "/", seconds)
                # memguard's recycles (suggest's configuration; plain gunicorn has none).
                recycles = server.log().count("recycling worker")
                return {**load, "oom_kills": group.oom_kills, "peak_mib": group.peak // MiB,
                        "recycles": recycles}
        except (RuntimeError, TimeoutError) as exc:
            # The pool could not even start (the master itself was killed): a failed point.
            return {"rps": 0.0, "failed": -1, "oom_kills": max(1, group.oom_kills),
                    "peak_mib": group.peak // MiB, "wrk_cpus": None, "host_busy": None,
                    "recycles": None,
                    "error": str(exc).splitlines()[0][:200]}


def _counts(quick: bool) -> list[int]:
    return list(QUICK_LADDER) if quick else list(range(1, MAX_WORKERS + 1))


def _show(shape: Shape, key: int | str, round_: int, data: dict[str, Any]) -> None:
    label = f"w={key}" if isinstance(key, int) else key
    print(f"   {shape.name:6} round {round_ + 1} {label:7}"
          f" {data['rps']:8.1f} req/s  OOM kills {data['oom_kills']}  recycles"
          f" {data['recycles']}  peak"
          f" {data['peak_mib']} MiB  wrk {data['wrk_cpus']} CPUs  host busy"
          f" {data['host_busy']}", flush=True)


def sweep(shape: Shape, advice: dict[str, Any], quick: bool) -> dict[str, Any]:
    rounds = 1 if quick else ROUNDS
    seconds = QUICK_SECONDS if quick else SECONDS
    points: dict[int | str, list[dict[str, Any]]] = {}
    counts: list[int] = []
    suggest_args, suggest_env = _suggest_args(advice)

    def run_point(key: int | str, round_: int) -> dict[str, Any]:
        if key == SUGGEST:
            data = measure(shape, advice["workers"], suggest_args, suggest_env, seconds)
        else:
            assert isinstance(key, int)
            data = measure(shape, key, ["-k", "sync", "-w", str(key)], {}, seconds)
        points.setdefault(key, []).append(data)
        _show(shape, key, round_, data)
        return data

    # Round 1 finds the range: up in counts until past the memory bound.
    oom_in_a_row = 0
    for n in _counts(quick):
        counts.append(n)
        oom_in_a_row = oom_in_a_row + 1 if run_point(n, 0)["oom_kills"] else 0
        if oom_in_a_row == (1 if quick else 2):
            break
    run_point(SUGGEST, 0)
    shuffle = random.Random(f"{shape.name}").shuffle
    for round_ in range(1, rounds):
        order: list[int | str] = [*counts, SUGGEST]
        shuffle(order)
        for key in order:
            run_point(key, round_)

    rows = [_merge(n, points[n]) for n in counts]
    fit = [r for r in rows if r["oom_kills"] == 0]
    best = max(fit, key=lambda r: r["rps"]) if fit else None
    floor = min(best["rounds_rps"]) if best else None
    for row in rows:
        row["tie_with_best"] = bool(floor is not None and row["oom_kills"] == 0
                                    and row["rps"] >= floor)
    picked = _merge(advice["workers"], points[SUGGEST])
    ratios = ([s["rps"] / b["rps"] for s, b in zip(points[SUGGEST], points[best["workers"]],
                                                      strict=True)
               if b["rps"]] if best else [])
    ratio = round(median(ratios), 3) if ratios else None
    tie = bool(floor is not None and picked["oom_kills"] == 0 and picked["rps"] >= floor)
    verdict = ("no point without OOM kills" if best is None
               else "OOM kill" if picked["oom_kills"]
               else "reaches the target" if ratio is not None and ratio >= TARGET
               else "a tie with the best, within its rounds' spread" if tie
               else "below the target")
    same_count = next((r for r in rows if r["workers"] == advice["workers"]), None)
    one = next((r for r in rows if r["workers"] == 1), None)
    return {
        "shape": shape.name,
        "what": shape.what,
        "app": shape.app,
        "group_limit_mib": shape.limit // MiB,
        "rounds": rounds,
        "seconds": seconds,
        "rows": rows,
        "best": best,
        "ties_with_best": [r["workers"] for r in rows if r["tie_with_best"]],
        # Throughput at the best count over what that many workers serving as one does:
        # near 1 for an app that waits, unless the machine or wrk was the bottleneck.
        "best_scaling": (round(best["rps"] / (best["workers"] * one["rps"]), 3)
                         if best and one and one["rps"] else None),
        "suggest": {
            **picked,
            "worker_class": advice["worker_class"],
            "threads": advice["threads"],
            "preload": advice["preload"],
            "command": advice["command"],
            "decided_by": advice["decided_by"],
            "cpu_bound": advice["cpu_bound"],
            "memory_bound": advice["memory_bound"],
            "cpu_share": advice["inputs"].get("cpu_share"),
            "limits_mib": {k: advice[k] // MiB for k in (
                "worker_memory_limit", "worker_memory_hard_limit", "total_memory_limit")},
            "ratio_to_best": ratio,
            "round_ratios": [round(r, 3) for r in ratios],
            "tie_with_best": tie,
            "verdict": verdict,
            "sweep_ratio_to_best": (round(same_count["rps"] / best["rps"], 3)
                                    if best and same_count else None),
        },
        "first_oom_workers": next((r["workers"] for r in rows if r["oom_kills"]), None),
    }


def _merge(workers: int, rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over rounds; OOM kills, failures, peak and wrk's CPU: the worst round."""
    rates = [r["rps"] for r in rounds]
    mid = median(rates)
    wrk = [r["wrk_cpus"] for r in rounds if r.get("wrk_cpus") is not None]
    busy = [r["host_busy"] for r in rounds if r.get("host_busy") is not None]
    return {
        "workers": workers,
        "rps": round(mid, 1),
        "spread": round((max(rates) - min(rates)) / mid, 3) if mid else None,
        "oom_kills": max(r["oom_kills"] for r in rounds),
        "failed": max(r["failed"] for r in rounds),
        "peak_mib": max(r["peak_mib"] for r in rounds),
        "recycles": [r.get("recycles") for r in rounds],
        "wrk_cpus": max(wrk) if wrk else None,
        "host_busy": round(median(busy), 3) if busy else None,
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
    notes = []
    for shape in shapes:
        advice = suggest(shape)
        print(f"   {shape.name}: suggest says {advice['workers']} {advice['worker_class']}"
              f" workers x {advice['threads']} threads (decided by {advice['decided_by']})",
              flush=True)
        data = sweep(shape, advice, quick)
        results.append(data)
        pick = data["suggest"]
        bounds.append(Bound(f"{shape.name}: suggest's configuration, OOM kills",
                            pick["oom_kills"], 0, hard=True))
        if pick["ratio_to_best"] is not None:
            bounds.append(Bound(f"{shape.name}: suggest's throughput / best without OOM",
                                pick["ratio_to_best"], TARGET, unit="x", at_least=True))
        notes.append(f"{shape.name}: suggest {_pick_text(pick)}: {pick['ratio_to_best']} x"
                     f" the best ({data['best']['workers'] if data['best'] else None} sync"
                     f" workers), {pick['verdict']}")
        table += _table_rows(data)
    spreads = [r["spread"] for d in results for r in d["rows"] if r["spread"] is not None]
    if spreads and not quick:
        notes.append(f"noise: throughput spread over rounds (max - min over median), median"
                     f" {median(spreads):.1%}, worst {max(spreads):.1%}")
    wrk = [r["wrk_cpus"] for d in results for r in d["rows"] if r["wrk_cpus"] is not None]
    if wrk:
        notes.append(f"load generator: wrk used at most {max(wrk):.2f} of a CPU")
    return Result(
        "sizing",
        figures={"connections": CONNECTIONS, "sweep_worker_class": "sync",
                 "tie_rule": "a point ties with the best when its median is at or above the"
                             " best point's lowest round",
                 "ratio_rule": "median over rounds of suggest's run / the best point's run in"
                               " the same round",
                 "shapes": results},
        bounds=bounds, notes=notes, table=table,
    )


def _pick_text(pick: dict[str, Any]) -> str:
    threads = f" x {pick['threads']} threads" if pick["threads"] > 1 else ""
    return f"{pick['workers']} {pick['worker_class']} workers{threads}"


def _table_rows(data: dict[str, Any]) -> list[dict[str, Any]]:
    best = data["best"]["workers"] if data["best"] else None
    pick = data["suggest"]
    rows = [{"shape": data["shape"], "workers": r["workers"], "rps": r["rps"],
             "spread": r["spread"], "oom_kills": r["oom_kills"], "failed": r["failed"],
             "peak_mib": r["peak_mib"],
             "mark": ("best" if r["workers"] == best else "tie" if r["tie_with_best"] else "")}
            for r in data["rows"]]
    rows.append({"shape": data["shape"], "workers": pick["workers"], "rps": pick["rps"],
                 "spread": pick["spread"], "oom_kills": pick["oom_kills"],
                 "failed": pick["failed"], "peak_mib": pick["peak_mib"],
                 "mark": f"suggest ({_pick_text(pick)}), as printed:"
                         f" {pick['ratio_to_best']} x best, {pick['verdict']}"})
    return rows


def markdown(result: dict[str, Any]) -> str:
    """The README tables from a result file (``python -m benchmarks.sizing [JSON]``)."""
    out = []
    for data in result["figures"]["shapes"]:
        pick = data["suggest"]
        best = data["best"]
        out += [
            f"**{data['shape']}** ({data['what']}; {data['group_limit_mib']} MiB group):"
            f" suggest picks **{_pick_text(pick)}** (decided by {pick['decided_by']}; cpu"
            f" bound {pick['cpu_bound']}, memory bound {pick['memory_bound']}), best"
            f" without OOM: {best['workers'] if best else 'none'} sync workers;"
            f" suggest's configuration as printed: {pick['rps']:.0f} req/s,"
            f" **{pick['ratio_to_best']} x best** ({pick['verdict']}),"
            f" {pick['oom_kills']} OOM kills, memguard recycles per round"
            f" {pick['recycles']}.",
            "",
            "| workers | req/s (median) | spread | OOM kills | failed | peak MiB | |",
            "|---:|---:|---:|---:|---:|---:|---|",
        ]
        for r in data["rows"]:
            mark = []
            if best and r["workers"] == best["workers"]:
                mark.append("best without OOM")
            elif r["tie_with_best"]:
                mark.append("tie")
            if r["workers"] == pick["workers"] and pick["worker_class"] == "sync":
                mark.append("**suggest's count**")
            out.append(f"| {r['workers']} | {r['rps']:.0f} | {r['spread']:.0%} |"
                       f" {r['oom_kills']} | {r['failed']} | {r['peak_mib']} |"
                       f" {', '.join(mark)} |")
        out.append(f"| **{_pick_text(pick)}, as printed** | **{pick['rps']:.0f}** |"
                   f" {pick['spread']:.0%} | {pick['oom_kills']} | {pick['failed']} |"
                   f" {pick['peak_mib']} | memguard's config and limits |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    source = Path(sys.argv[1]) if len(sys.argv) > 1 else REPO / "benchmarks/results/sizing.json"
    print(markdown(json.loads(source.read_text())))
