"""Worker recycling against leaks: gunicorn, uWSGI, Granian and memguard, in one run.

Every row runs in a fresh 400 MiB memory cgroup (``MemoryCgroup``: the kernel's OOM killer
is real), with 4 workers, serving ``benchmarks/apps/leaky.py`` to 8 client threads (the
standard library's ``http.client``, one connection per request). Leak patterns:

- ``steady``: every request keeps 2 MiB;
- ``bursty``: every 25th request of a worker keeps 24 MiB;
- ``huge``: one request (a quarter of the way in) grows at 80 MiB/s to 640 MiB.

Per row: failed requests (an exception or a status other than 200; the huge request is
counted apart, since it cannot succeed in 400 MiB), the group's OOM kills, restarts (new
pids seen in the group, sampled every 20 ms, after the pool was up), the group's peak and
the wall time of the load. memguard's rows use the limits ``memguard suggest`` gives for
this app and group; each one's wall time is compared with plain gunicorn's with the same
worker class. Plain gunicorn (sync and UvicornWorker) and memguard run three times,
interleaved, and their medians are reported (the worst round for failures and OOM
kills). Quick mode (CI): the steady pattern, fewer requests, one round of plain gunicorn
and memguard's sync worker; memguard rows must have 0 OOM kills (hard).
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import importlib.util
import itertools
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.harness import Bound, Result, median
from memguard.system import process_memory
from tests.support.cgroups import MemoryCgroup, cgroup_unavailable_reason
from tests.support.servers import serve

REPO = Path(__file__).resolve().parent.parent
APP = "benchmarks.apps.leaky"
MiB = 1024 * 1024
GROUP_LIMIT = 400 * MiB
WORKERS = 4
CLIENTS = 8
ROW_DEADLINE = 180.0  # seconds of load per row at most; requests not sent by then fail
REQUEST_TIMEOUT = 60.0
SETTLE = 1.0  # seconds the pid sampler keeps watching after the load

# Per pattern: requests in full and quick mode, what each request keeps on average, and
# a --max-requests hand-tuned (knowing the leak rate in advance) to survive it.
PATTERNS: dict[str, dict[str, Any]] = {
    "steady": {"requests": 2000, "quick": 1000, "kept_per_request": 2 * MiB, "step": 2 * MiB,
               "tuned": 30},
    "bursty": {"requests": 3000, "quick": 1000, "kept_per_request": 24 * MiB / 25,
               "step": 24 * MiB, "tuned": 60},
    "huge": {"requests": 3000, "quick": 300, "kept_per_request": 0, "step": 1, "tuned": 30},
}

# memguard's rows run with the limits `memguard suggest` gives for this app (measured
# without its leak), 4 workers and the 400 MiB group: what a user following the README
# runs (soft 81 MiB, hard 97 MiB, pool 360 MiB here).
# Plain gunicorn's and memguard's rows run this many times, interleaved (wall times on a
# shared machine are noisy): medians are reported.
ROUNDS = 3
# "Close to plain gunicorn's" wall time, as a figure: memguard's rows do the same work
# with more, gentler restarts (and no failed requests).
WALL_RATIO_TARGET = 1.25
SUGGEST_ARGS = ["--memory", f"{GROUP_LIMIT // MiB}MiB", "--web-concurrency", str(WORKERS)]


@dataclass
class Row:
    name: str
    server: str  # "gunicorn", "uwsgi" or "granian"
    interface: str = "wsgi"
    args: Callable[[str], list[str]] = field(default=lambda pattern: [])
    env: dict[str, str] = field(default_factory=dict)
    memguard: bool = False
    suggest: str | None = None  # the worker class to ask `memguard suggest` limits for
    # The plain gunicorn row with the same worker class, whose wall time this row's is
    # compared with.
    reference: str = "gunicorn"


def _uwsgi(tuned: bool) -> Callable[[str], list[str]]:
    def args(pattern: str) -> list[str]:
        extra = ["--reload-on-rss", "80", "--evil-reload-on-rss", "100"]
        if tuned:
            extra += ["--min-worker-lifetime", "0", "--mem-collector-freq", "1"]
        return extra
    return args


UVICORN_PLAIN = "gunicorn + uvicorn_worker.UvicornWorker"
# Plain gunicorn, one row per worker class memguard runs with: the references.
REFERENCES = ("gunicorn", UVICORN_PLAIN)
ROWS: list[Row] = [
    Row("gunicorn", "gunicorn", args=lambda p: ["-k", "sync"]),
    Row(UVICORN_PLAIN, "gunicorn", interface="asgi", reference=UVICORN_PLAIN,
        args=lambda p: ["-k", "uvicorn_worker.UvicornWorker"]),
    Row("gunicorn --max-requests 1000 --max-requests-jitter 50", "gunicorn",
        args=lambda p: ["-k", "sync", "--max-requests", "1000", "--max-requests-jitter", "50"]),
    Row("gunicorn --max-requests (hand-tuned)", "gunicorn",
        args=lambda p: ["-k", "sync", "--max-requests", str(PATTERNS[p]["tuned"])]),
    Row("uwsgi reload-on-rss 80, evil-reload-on-rss 100", "uwsgi", args=_uwsgi(False)),
    Row("uwsgi same + min-worker-lifetime 0, mem-collector-freq 1", "uwsgi",
        args=_uwsgi(True)),
    Row("granian --workers-max-rss 80 --rss-sample-interval 1 --respawn-failed-workers",
        "granian", args=lambda p: ["--workers-max-rss", "80", "--rss-sample-interval", "1",
                                   "--respawn-failed-workers"]),
    Row("memguard (gunicorn sync)", "gunicorn", memguard=True, suggest="sync",
        args=lambda p: ["-c", "python:memguard.gunicorn.conf", "-k", "sync"]),
    Row("memguard (gunicorn + uvicorn_worker.UvicornWorker)", "gunicorn", interface="asgi",
        memguard=True, suggest="uvicorn_worker.UvicornWorker", reference=UVICORN_PLAIN,
        args=lambda p: ["-c", "python:memguard.gunicorn.conf",
                        "-k", "uvicorn_worker.UvicornWorker"]),
]
QUICK_ROWS = ("gunicorn", "memguard (gunicorn sync)")


def suggested_limits(row: Row) -> dict[str, str]:
    """The ``MEMGUARD_*`` limits ``memguard suggest`` gives for the row's app and worker
    class in the benchmark's group."""
    assert row.suggest is not None
    env = {**os.environ, "LEAK_PATTERN": "none"}
    out = subprocess.run(
        [sys.executable, "-m", "memguard", "suggest", "--app", f"{APP}:{row.interface}_app",
         "--worker-class", row.suggest, *SUGGEST_ARGS, "--json"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=True)
    advice = json.loads(out.stdout)
    return {"MEMGUARD_WORKER_MEMORY_LIMIT": str(advice["worker_memory_limit"]),
            "MEMGUARD_WORKER_MEMORY_HARD_LIMIT": str(advice["worker_memory_hard_limit"]),
            "MEMGUARD_TOTAL_MEMORY_LIMIT": str(advice["total_memory_limit"])}


def _skip_reason(row: Row) -> str | None:
    if row.memguard and importlib.util.find_spec("memguard.gunicorn") is None:
        return ("memguard.gunicorn (the worker-recycling integration, issue 6 parts 1-6) is"
                " not on this branch yet: row wired, not run")
    if row.server in ("uwsgi", "granian") and _executable(row.server) is None:
        return (f"{row.server} is not installed (pip install 'memguard-web[bench]';"
                " uwsgi compiles with gcc)")
    return None


def _executable(name: str) -> str | None:
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else shutil.which(name)


# --------------------------------------------------------------------------------------
# Servers


@dataclass
class Running:
    url: str
    log: Callable[[], str]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _get(url: str, path: str, timeout: float) -> int:
    host, _, port = url.split("://", 1)[1].partition(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request("GET", path, headers={"Connection": "close"})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


@contextlib.contextmanager
def _start(row: Row, pattern: str, group: MemoryCgroup,
           extra_env: dict[str, str]) -> Iterator[Running]:
    env = {**os.environ, **row.env, **extra_env, "LEAK_PATTERN": pattern,
           "PYTHONUNBUFFERED": "1"}
    app = f"{APP}:{row.interface}_app"
    if row.server == "gunicorn":
        args = ["-w", str(WORKERS), "--graceful-timeout", "10", *row.args(pattern)]
        with serve("gunicorn", app, args, env=env, cwd=REPO, cgroup=group) as server:
            yield Running(server.url, server.log)
        return
    port = _free_port()
    exe = _executable(row.server)
    assert exe is not None
    if row.server == "uwsgi":
        argv = [exe, "--http-socket", f"127.0.0.1:{port}", "--module", app, "--master",
                "--processes", str(WORKERS), "--die-on-term", "--need-app",
                "--disable-logging", "--chdir", str(REPO), "--home", sys.prefix,
                *row.args(pattern)]
    else:
        argv = [exe, "--interface", row.interface, "--workers", str(WORKERS), "--host",
                "127.0.0.1", "--port", str(port), "--no-access-log", *row.args(pattern), app]
    log_fd, log_name = tempfile.mkstemp(prefix="memguard-bench-", suffix=".log")
    proc = group.popen(argv, stdout=log_fd, stderr=log_fd, stdin=subprocess.DEVNULL,
                       cwd=str(REPO), env=env)
    os.close(log_fd)
    log_path = Path(log_name)
    running = Running(f"http://127.0.0.1:{port}", lambda: log_path.read_text(errors="replace"))
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{row.server} exited with {proc.returncode}:\n"
                                   f"{running.log()[-3000:]}")
            try:
                if _get(running.url, "/", 2) == 200:
                    break
            except (OSError, http.client.HTTPException):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{row.server} did not answer:\n{running.log()[-3000:]}")
            time.sleep(0.05)
        yield running
    finally:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        with contextlib.suppress(OSError):
            log_path.unlink()


# --------------------------------------------------------------------------------------
# Load and measurement


class PidSampler(threading.Thread):
    """Every pid that appears in the group while the load runs."""

    def __init__(self, group: MemoryCgroup) -> None:
        super().__init__(daemon=True)
        self.group = group
        self.seen: set[int] = set(group.pids())
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.wait(0.02):
            self.seen.update(self.group.pids())


def _wait_for_pool(group: MemoryCgroup, count: int, timeout: float = 30) -> set[int]:
    """The group's pids once ``count`` processes are up and the set stopped changing."""
    deadline = time.monotonic() + timeout
    last: set[int] = set()
    stable_since = time.monotonic()
    while time.monotonic() < deadline:
        pids = set(group.pids())
        if pids != last:
            last, stable_since = pids, time.monotonic()
        elif len(pids) >= count and time.monotonic() - stable_since > 0.5:
            break
        time.sleep(0.05)
    return last


def _load(url: str, total: int, huge_at: int | None) -> dict[str, Any]:
    counter = itertools.count()
    lock = threading.Lock()
    failures: Counter[str] = Counter()
    huge: dict[str, Any] = {}
    ok = [0]
    deadline = time.monotonic() + ROW_DEADLINE

    def client() -> None:
        while True:
            i = next(counter)
            if i >= total:
                return
            if time.monotonic() > deadline:
                with lock:
                    failures["not sent: row deadline"] += 1
                continue
            path = "/huge" if i == huge_at else "/leak"
            try:
                status = _get(url, path, REQUEST_TIMEOUT)
                outcome = "ok" if status == 200 else f"status {status}"
            except (OSError, http.client.HTTPException) as exc:
                outcome = type(exc).__name__
            with lock:
                if i == huge_at:
                    huge["outcome"] = outcome
                elif outcome == "ok":
                    ok[0] += 1
                else:
                    failures[outcome] += 1

    wall = _in_threads([client] * CLIENTS)
    return {"wall": wall, "ok": ok[0], "failures": dict(failures),
            "huge": huge.get("outcome")}


def _run_row(row: Row, pattern: str, requests: int,
             env: dict[str, str] | None = None) -> dict[str, Any]:
    base: dict[str, Any] = {"pattern": pattern, "server": row.name, "requests": requests}
    if env:
        base["memguard_env"] = env
    skip = _skip_reason(row)
    if skip is not None:
        return {**base, "skipped": skip}
    huge_at = requests // 4 if pattern == "huge" else None
    with MemoryCgroup(GROUP_LIMIT) as group:
        try:
            with _start(row, pattern, group, env or {}) as running:
                initial = _wait_for_pool(group, WORKERS + 1)
                start_uss = _worker_uss(initial)
                sampler = PidSampler(group)
                sampler.seen = set(initial)
                sampler.start()
                try:
                    load = _load(running.url, requests, huge_at)
                    # A worker killed near the end is replaced after the load: count it.
                    time.sleep(SETTLE)
                finally:
                    sampler.stopping.set()
                    sampler.join()
                log = running.log()
                oom_kills = group.oom_kills
                peak = group.peak
        except (RuntimeError, TimeoutError) as exc:
            return {**base, "skipped": f"could not start: {exc}"[:2000]}
    failed = sum(load["failures"].values())
    return {
        **base,
        "failed": failed,
        "failures": load["failures"],
        "huge_request": load["huge"],
        "oom_kills": oom_kills,
        "restarts": len(sampler.seen - initial),
        "wall_s": round(load["wall"], 2),
        "peak_mib": round(peak / MiB, 1),
        "worker_uss_at_start_mib": round(start_uss / MiB, 1),
        "log_recycle_lines": sum("recycl" in line.lower() for line in log.splitlines()),
        "log_sigkill_lines": log.count("SIGKILL"),
    }


def _in_threads(targets: list[Callable[[], None]]) -> float:
    """Run each target in its own thread, all at once; the seconds until all ended."""
    started = time.monotonic()
    threads = [threading.Thread(target=target, daemon=True) for target in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.monotonic() - started


def _worker_uss(pids: set[int]) -> int:
    """A fresh worker's USS: the median of the smallest WORKERS processes (the master and
    any helper process are larger)."""
    sizes = []
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            sizes.append(process_memory(pid).uss or 0)
    sizes.sort()
    return int(median([float(s) for s in sizes[:WORKERS]])) if sizes else 0


def _min_restarts(pattern: str, requests: int, start_uss: int, soft: int,
                  hard: int | None) -> int:
    """The fewest restarts the leaked bytes allow at memguard's limits: each worker
    lifetime absorbs the leak steps that fit between a fresh worker's USS and the soft
    limit, plus the one that crosses it if that one stays under the hard limit (past it
    the worker is stopped); the first WORKERS lifetimes need no restart."""
    info = PATTERNS[pattern]
    leaked = info["kept_per_request"] * requests
    step = int(info["step"])
    if not leaked:
        return 0
    steps = math.ceil(max(soft - start_uss, 1) / step)
    if hard is not None:
        steps = max(1, min(steps, (hard - start_uss - 1) // step))
    return max(0, int(math.ceil(leaked / (steps * step))) - WORKERS)


def run(quick: bool) -> Result:
    reason = cgroup_unavailable_reason()
    notes: list[str] = []
    if reason is not None:
        return Result("recycle", {"skipped": reason}, notes=[f"skipped: {reason}"])
    if os.environ.get("RECYCLE_ONLY") == "pool":
        pool_rows, pool_bounds, pool_notes = pool_scenarios(quick)
        return Result("recycle_pool", figures={"rows": pool_rows, "versions": _versions()},
                      bounds=pool_bounds, notes=pool_notes,
                      table=[_pool_table_row(r) for r in pool_rows])
    patterns = ["steady"] if quick else list(PATTERNS)
    rows = [r for r in ROWS if not quick or r.name in QUICK_ROWS]
    # For working on one row or pattern: RECYCLE_ONLY="uwsgi" or "bursty".
    only = os.environ.get("RECYCLE_ONLY")
    if only:
        patterns = [p for p in patterns if only in p] or patterns
        rows = [r for r in rows if only in r.name] or rows
    limits = {row.name: suggested_limits(row) for row in rows if row.suggest}
    rounds = 1 if quick else ROUNDS
    results: list[dict[str, Any]] = []
    bounds: list[Bound] = []
    for pattern in patterns:
        requests = PATTERNS[pattern]["quick" if quick else "requests"]
        runs: dict[str, list[dict[str, Any]]] = {row.name: [] for row in rows}
        for round_ in range(rounds):
            for row in rows:
                if round_ and not (row.memguard or row.name in REFERENCES):
                    continue
                print(f"   {pattern:7} {row.name} (round {round_ + 1}) ...", flush=True)
                data = _run_row(row, pattern, requests, limits.get(row.name))
                runs[row.name].append(data)
                if "skipped" in data:
                    print(f"      skipped: {data['skipped'][:200]}", flush=True)
                    continue
                print(f"      failed {data['failed']}, OOM kills {data['oom_kills']},"
                      f" restarts {data['restarts']}, {data['wall_s']} s", flush=True)
        for row in rows:
            data = _merge_rounds(runs[row.name])
            results.append(data)
            if row.memguard and "skipped" not in data:
                bounds += _memguard_bounds(row, pattern, requests, data)
    _add_wall_ratios(results, rows)
    for r in results:
        if r["server"].startswith("memguard") and "wall_vs_reference" in r:
            bounds.append(Bound(f"{r['pattern']} {r['server']}: wall time vs plain gunicorn "
                                f"with the same worker class", r["wall_vs_reference"],
                                WALL_RATIO_TARGET, unit="x"))
    pool_rows, pool_bounds, pool_notes = pool_scenarios(quick)
    bounds += pool_bounds
    notes += pool_notes
    skipped = sorted({r["skipped"] for r in results if "skipped" in r})
    notes += [f"skipped rows: {s}" for s in skipped]
    table = [{k: r.get(k) for k in ("pattern", "server", "failed", "huge_request", "oom_kills",
                                    "restarts", "wall_s", "skipped")} for r in results]
    return Result(
        "recycle",
        figures={"group_limit_mib": GROUP_LIMIT // MiB, "workers": WORKERS,
                 "clients": CLIENTS, "rounds": rounds, "memguard_limits": limits,
                 "rows": results, "pool_rows": pool_rows,
                 "versions": _versions()},
        bounds=bounds, notes=notes, table=table,
    )


# --------------------------------------------------------------------------------------
# The worker pool (issue 17): spawn before stop, UvicornWorker's recycle cost, zero
# configuration. ``RECYCLE_ONLY=pool`` runs only these.

# Room for the three workers at their limit, each with the growth it may have while its
# replacement boots, and one replacement: spawn before stop needs that much.
POOL_GROUP = 640 * MiB
POOL_WORKERS = 3
POOL_CLIENTS = 6  # two per worker: every worker always has a request waiting
POOL_LIMIT = "100MiB"
POOL_ENV = {"BOOT_SECONDS": "2", "REQUEST_SECONDS": "0.02"}
POOL_CLASSES = {"sync": "sync", "UvicornWorker": "uvicorn_worker.UvicornWorker"}
# --max-requests giving about memguard's restart count at the slow leak: a fresh worker's
# ~20 MiB to the 100 MiB limit at 256 KiB a request.
POOL_MAX_REQUESTS = 320
# Rounds of the slow-boot pools; each round's ratio pairs two pools that ran side by side.
POOL_ROUNDS = 5


def _timed_load(url: str, seconds: float, clients: int) -> dict[str, Any]:
    """``clients`` threads sending GET /leak for ``seconds``: throughput, latencies."""
    lock = threading.Lock()
    latencies: list[float] = []
    failures: Counter[str] = Counter()
    deadline = time.monotonic() + seconds

    def client() -> None:
        while time.monotonic() < deadline:
            started = time.monotonic()
            try:
                status = _get(url, "/leak", REQUEST_TIMEOUT)
                outcome = "ok" if status == 200 else f"status {status}"
            except (OSError, http.client.HTTPException) as exc:
                outcome = type(exc).__name__
            took = time.monotonic() - started
            with lock:
                if outcome == "ok":
                    latencies.append(took)
                else:
                    failures[outcome] += 1

    wall = _in_threads([client] * clients)
    latencies.sort()

    def pct(q: float) -> float:
        return round(1000 * latencies[min(int(q * len(latencies)), len(latencies) - 1)], 1)

    return {"ok": len(latencies), "failed": sum(failures.values()),
            "failures": dict(failures), "rps": round(len(latencies) / wall, 1),
            "p50_ms": pct(0.50) if latencies else None,
            "p99_ms": pct(0.99) if latencies else None}


@contextlib.contextmanager
def _pool(kind: str, pattern: str, memguard: bool) -> Iterator[tuple[str, Any, MemoryCgroup]]:
    """One slow-boot pool, booted: 3 workers of ``kind``, the app booting in 2 s and
    waiting 20 ms per request, ``pattern`` ``slow`` (256 KiB kept per request) or
    ``none``; memguard's config or plain ``--max-requests``. Yields (name, server,
    group)."""
    worker_class = POOL_CLASSES[kind]
    args = ["-w", str(POOL_WORKERS), "-k", worker_class, "--graceful-timeout", "10"]
    env = {**os.environ, **POOL_ENV, "LEAK_PATTERN": pattern, "PYTHONUNBUFFERED": "1"}
    if memguard:
        args = ["-c", "python:memguard.gunicorn.conf", *args]
        env["MEMGUARD_WORKER_MEMORY_LIMIT"] = POOL_LIMIT
        name = f"memguard {kind}"
    else:
        args += ["--max-requests", str(POOL_MAX_REQUESTS), "--max-requests-jitter", "20"]
        name = f"gunicorn --max-requests {POOL_MAX_REQUESTS} {kind}"
    interface = "asgi" if kind == "UvicornWorker" else "wsgi"
    with MemoryCgroup(POOL_GROUP) as group, serve(
            "gunicorn", f"{APP}:{interface}_app", args, env=env, cwd=REPO, cgroup=group,
            timeout=60) as server:
        _wait_for_pool(group, POOL_WORKERS + 1)
        yield name, server, group


def _loads_at_once(urls: list[str], seconds: float, clients: int) -> list[dict[str, Any]]:
    """:func:`_timed_load` on every URL at the same time: what this shared machine does
    meanwhile hits every pool alike."""
    results: list[dict[str, Any]] = [{} for _ in urls]

    def run(i: int) -> None:
        results[i] = _timed_load(urls[i], seconds, clients)

    _in_threads([functools.partial(run, i) for i in range(len(urls))])
    return results


def _pool_round(kind: str, seconds: float, quick: bool) -> list[dict[str, Any]]:
    """memguard's pool without a leak, with the slow leak, and (full mode) plain
    ``--max-requests`` with the slow leak: booted together, loaded at once."""
    variants = [("none", True), ("slow", True)] + ([] if quick else [("slow", False)])
    with contextlib.ExitStack() as stack:
        pools = [stack.enter_context(_pool(kind, pattern, memguard))
                 for pattern, memguard in variants]
        loads = _loads_at_once([server.url for _, server, _ in pools], seconds, POOL_CLIENTS)
        time.sleep(SETTLE)
        rows = []
        for (name, server, group), (pattern, _), load in zip(pools, variants, loads,
                                                              strict=True):
            log = server.log()
            shorts = [float(x) for x in re.findall(r"the pool ran short ([\d.]+)s", log)]
            rows.append({
                "scenario": "slow_boot", "server": name, "pattern": pattern, **load,
                "oom_kills": group.oom_kills,
                "recycles": sum("recycling worker" in line for line in log.splitlines()),
                "restarts_logged": log.count("Booting worker") - POOL_WORKERS,
                "spawn_first": log.count("(spawn_first): the pool ran short"),
                "stop_then_start": log.count("(stop_then_start): the pool ran short"),
                "short_seconds_total": round(sum(shorts), 2)})
    return rows


def pool_scenarios(quick: bool) -> tuple[list[dict[str, Any]], list[Bound], list[str]]:
    """The slow-boot pool, the bursty UvicornWorker comparison, and zero configuration."""
    rounds = 1 if quick else POOL_ROUNDS
    seconds = 8.0 if quick else 20.0
    rows: list[dict[str, Any]] = []
    bounds: list[Bound] = []
    notes: list[str] = []
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for round_ in range(rounds):
        for kind in POOL_CLASSES:
            print(f"   slow boot {kind}: no leak, slow leak, --max-requests, loaded at once "
                  f"(round {round_ + 1}) ...", flush=True)
            for data in _pool_round(kind, seconds, quick):
                print(f"      {data['server']} {data['pattern']}: {data['rps']} req/s, p99 "
                      f"{data['p99_ms']} ms, failed {data['failed']}, OOM "
                      f"{data['oom_kills']}, recycles {data['recycles']} "
                      f"({data['spawn_first']} spawned first)", flush=True)
                runs.setdefault((data["server"], data["pattern"]), []).append(data)
    for done in runs.values():
        merged = dict(done[-1])
        for key in ("rps", "p50_ms", "p99_ms", "recycles", "spawn_first"):
            merged[key] = median([float(r[key] or 0) for r in done])
        merged["failed"] = max(r["failed"] for r in done)
        merged["oom_kills"] = max(r["oom_kills"] for r in done)
        merged["rounds"] = [{k: r[k] for k in ("rps", "p99_ms", "failed", "oom_kills",
                                               "recycles", "spawn_first")} for r in done]
        rows.append(merged)
    for kind in POOL_CLASSES:
        base = runs.get((f"memguard {kind}", "none"))
        leak = next((r for r in rows if r["server"] == f"memguard {kind}"
                     and r["pattern"] == "slow"), None)
        if not base or leak is None:
            continue
        # Paired per round (the two pools ran side by side), then the median.
        pairs = list(zip(runs[(leak["server"], "slow")], base, strict=True))
        leak["throughput_vs_no_leak_rounds"] = [round(s["rps"] / b["rps"], 3)
                                                for s, b in pairs if b["rps"]]
        leak["p99_vs_no_leak_rounds"] = [round(s["p99_ms"] / b["p99_ms"], 2)
                                         for s, b in pairs if b["p99_ms"]]
        leak["throughput_vs_no_leak"] = round(median(leak["throughput_vs_no_leak_rounds"]), 3)
        leak["p99_vs_no_leak"] = round(median(leak["p99_vs_no_leak_rounds"]), 2)
        label = f"slow boot, {kind}, slow leak"
        bounds += [Bound(f"{label}: throughput with recycles / without",
                         leak["throughput_vs_no_leak"], 0.97, at_least=True, unit="x"),
                   Bound(f"{label}: p99 with recycles / without", leak["p99_vs_no_leak"],
                         1.2, unit="x"),
                   Bound(f"{label}: failed requests", leak["failed"], 0),
                   Bound(f"{label}: OOM kills", leak["oom_kills"], 0, hard=True)]
    # The bursty pattern under UvicornWorker: memguard at 80 MiB against a blind restart
    # every 20 requests; and both worker classes with no MEMGUARD_* variable at all.
    uvicorn_args = ["-k", "uvicorn_worker.UvicornWorker"]
    conf = ["-c", "python:memguard.gunicorn.conf"]
    bursty = [
        (Row("memguard (UvicornWorker, 80 MiB)", "gunicorn", interface="asgi",
             memguard=True, args=lambda p: [*conf, *uvicorn_args]),
         {"MEMGUARD_WORKER_MEMORY_LIMIT": "80MiB"}),
        (Row("gunicorn --max-requests 20 --max-requests-jitter 5 (UvicornWorker)",
             "gunicorn", interface="asgi",
             args=lambda p: [*uvicorn_args, "--max-requests", "20",
                             "--max-requests-jitter", "5"]), {}),
        (Row("memguard, no MEMGUARD_* variable (sync)", "gunicorn", memguard=True,
             args=lambda p: [*conf, "-k", "sync"]), {}),
        (Row("memguard, no MEMGUARD_* variable (UvicornWorker)", "gunicorn", interface="asgi",
             memguard=True, args=lambda p: [*conf, *uvicorn_args]), {}),
    ]
    requests = PATTERNS["bursty"]["quick" if quick else "requests"]
    bursty_runs: dict[str, list[dict[str, Any]]] = {}
    for round_ in range(rounds):
        for row, env in bursty:
            print(f"   bursty {row.name} (round {round_ + 1}) ...", flush=True)
            data = _run_row(row, "bursty", requests, env)
            # An empty env still runs with the memguard config: no limit is passed.
            data["scenario"] = "bursty"
            bursty_runs.setdefault(row.name, []).append(data)
            if "skipped" not in data:
                print(f"      failed {data['failed']}, OOM kills {data['oom_kills']}, "
                      f"restarts {data['restarts']}, {data['wall_s']} s", flush=True)
    merged_bursty = {name: _merge_rounds(done) for name, done in bursty_runs.items()}
    rows += [{**m, "scenario": "bursty"} for m in merged_bursty.values()]
    mg = merged_bursty.get(bursty[0][0].name, {})
    mr = merged_bursty.get(bursty[1][0].name, {})
    if mg.get("wall_s") and mr.get("wall_s"):
        ratio = round(mg["wall_s"] / mr["wall_s"], 2)
        mg["wall_vs_max_requests_20"] = ratio
        bounds.append(Bound("bursty, UvicornWorker: memguard's time / --max-requests 20",
                            ratio, 0.5, unit="x"))
    for row, _ in bursty[2:]:
        m = merged_bursty.get(row.name, {})
        if "oom_kills" in m:
            bounds += [Bound(f"bursty, {row.name}: OOM kills", m["oom_kills"], 0, hard=True),
                       Bound(f"bursty, {row.name}: failed requests", m["failed"], 0)]
    notes.append(f"pool scenarios: {rounds} round(s), medians (worst round for failures "
                 "and OOM kills); on a shared 2-core machine wall times and throughput "
                 "move by several percent from round to round")
    return rows, bounds, notes


def _pool_table_row(r: dict[str, Any]) -> dict[str, Any]:
    keys = ("scenario", "server", "pattern", "rps", "p99_ms", "failed", "oom_kills",
            "recycles", "spawn_first", "throughput_vs_no_leak", "p99_vs_no_leak", "wall_s",
            "restarts", "wall_vs_max_requests_20")
    return {k: r.get(k) for k in keys if r.get(k) is not None}


def _merge_rounds(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One row's figures over its rounds: the worst failures and OOM kills, the median
    restarts, wall time and peak; each round's figures kept beside them."""
    done = [r for r in runs if "skipped" not in r]
    if not done:
        return runs[0]
    merged = dict(done[0])
    if len(done) > 1:
        merged["failed"] = max(r["failed"] for r in done)
        merged["oom_kills"] = max(r["oom_kills"] for r in done)
        for key in ("restarts", "wall_s", "peak_mib"):
            merged[key] = median([float(r[key]) for r in done])
        merged["restarts"] = round(merged["restarts"])
        merged["rounds"] = [{k: r[k] for k in ("failed", "oom_kills", "restarts", "wall_s")}
                            for r in done]
    return merged


def _memguard_bounds(row: Row, pattern: str, requests: int,
                     data: dict[str, Any]) -> list[Bound]:
    label = f"{pattern} {row.name}"
    bounds = [Bound(f"{label}: OOM kills", data["oom_kills"], 0, hard=True),
              Bound(f"{label}: failed requests", data["failed"], 0)]
    env = data.get("memguard_env") or {}
    soft = env.get("MEMGUARD_WORKER_MEMORY_LIMIT")
    if soft is not None:
        # The minimum is defined by a per-worker soft limit.
        hard = env.get("MEMGUARD_WORKER_MEMORY_HARD_LIMIT")
        minimum = _min_restarts(pattern, requests, int(data["worker_uss_at_start_mib"] * MiB),
                                int(soft), int(hard) if hard is not None else None)
        if minimum:
            bounds.append(Bound(f"{label}: restarts (minimum {minimum}) <= 1.5 x",
                                data["restarts"], math.ceil(1.5 * minimum)))
    return bounds


def _add_wall_ratios(results: list[dict[str, Any]], rows: list[Row]) -> None:
    """Each row's wall time over plain gunicorn's (sync) and over its reference's (plain
    gunicorn with the same worker class), in the same pattern."""
    wall = {(r["pattern"], r["server"]): r["wall_s"] for r in results if "wall_s" in r}
    reference = {row.name: row.reference for row in rows}
    for r in results:
        if "wall_s" not in r:
            continue
        plain = wall.get((r["pattern"], "gunicorn"))
        if plain:
            r["wall_vs_gunicorn"] = round(r["wall_s"] / plain, 2)
        same = wall.get((r["pattern"], reference.get(r["server"], "gunicorn")))
        if same:
            r["wall_vs_reference"] = round(r["wall_s"] / same, 2)


def _versions() -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {}
    for name in ("gunicorn", "uwsgi", "granian", "uvicorn", "uvicorn-worker"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def markdown(rows: list[dict[str, Any]]) -> str:
    """The README table from a result's rows (``python -m benchmarks.recycle [JSON]``)."""
    out = ["| pattern | server | failed | OOM kills | restarts | wall (s) | x gunicorn"
           " | x gunicorn, same worker class |",
           "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "skipped" in r:
            out.append(f"| {r['pattern']} | {r['server']} | skipped | | | | | |")
            continue
        failed = str(r["failed"])
        if r.get("huge_request") is not None:
            failed += f" (+ the huge one: {r['huge_request']})"
        out.append(f"| {r['pattern']} | {r['server']} | {failed} | {r['oom_kills']} |"
                   f" {r['restarts']} | {r['wall_s']:.1f} | {r.get('wall_vs_gunicorn', '')} |"
                   f" {r.get('wall_vs_reference', '') if r['server'] != 'gunicorn' else ''} |")
    return "\n".join(out)


if __name__ == "__main__":
    source = Path(sys.argv[1]) if len(sys.argv) > 1 else REPO / "benchmarks/results/recycle.json"
    print(markdown(json.loads(source.read_text())["figures"]["rows"]))
