"""What memguard's middleware costs per request, with its defaults.

1. In-process: a Starlette hello world called directly through ASGI (no server, no
   socket), bare and behind ``MemGuardMiddleware()`` (every default: admission, sampled
   tracking, body guard), plus the psutil-per-request anchor. Rounds interleave the
   variants; the figure is the median over rounds of (wrapped - bare) microseconds per
   request. Target: <= 3 us.
2. End to end: the same apps under uvicorn (one process each, all started at once),
   loaded in turn by ``wrk`` over loopback for a few seconds each, several rounds.
   The figure is the median throughput ratio wrapped / bare. Target: <= 2% loss.
3. Leak reports while active: tracemalloc slows every allocation; measured on an
   allocation-heavy function and on the hello world, tracing off vs a running
   :class:`memguard.leaks.LeakReporter`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmarks.harness import Bound, Result, median
from benchmarks.overhead_apps import anchor, bare, guarded, passthrough
from memguard.leaks import LeakReporter
from tests.support.servers import http_request

REPO = Path(__file__).resolve().parent.parent


def _scope() -> dict[str, Any]:
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
            "method": "GET", "scheme": "http", "path": "/", "raw_path": b"/",
            "root_path": "", "query_string": b"",
            "headers": [(b"host", b"127.0.0.1"), (b"user-agent", b"bench")],
            "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000)}


async def _receive() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}


async def _send(message: dict[str, Any]) -> None:
    pass


async def _batch(app: Any, n: int) -> float:
    """Microseconds of this process's CPU time per request over ``n`` requests (CPU
    time, not wall time: other processes on this shared machine do not count)."""
    scope = _scope
    started = time.process_time_ns()
    for _ in range(n):
        await app(scope(), _receive, _send)
    return (time.process_time_ns() - started) / n / 1000


def in_process(rounds: int, per_round: int) -> dict[str, Any]:
    apps = {"bare": bare, "passthrough": passthrough, "memguard": guarded, "psutil": anchor}
    loop = asyncio.new_event_loop()
    try:
        for app in apps.values():  # warm up: imports, caches, the first samples
            loop.run_until_complete(_batch(app, 2000))
        times: dict[str, list[float]] = {name: [] for name in apps}
        for _ in range(rounds):
            for name, app in apps.items():
                times[name].append(loop.run_until_complete(_batch(app, per_round)))
    finally:
        loop.close()
    added = [m - b for m, b in zip(times["memguard"], times["bare"], strict=True)]
    anchor_added = [p - b for p, b in zip(times["psutil"], times["bare"], strict=True)]
    pass_added = [p - b for p, b in zip(times["passthrough"], times["bare"], strict=True)]
    return {
        "rounds": rounds, "requests_per_round": per_round,
        "bare_us": round(median(times["bare"]), 2),
        "memguard_us": round(median(times["memguard"]), 2),
        "psutil_us": round(median(times["psutil"]), 2),
        "memguard_added_us": round(median(added), 2),
        "psutil_added_us": round(median(anchor_added), 2),
        "passthrough_added_us": round(median(pass_added), 2),
    }


def _cpu_ns(pid: int) -> int:
    """Time the process has spent on a CPU, in ns (``/proc/PID/schedstat``)."""
    with open(f"/proc/{pid}/schedstat") as f:
        return int(f.read().split()[0])


def _wrk(port: int, pid: int | None, seconds: float, connections: int,
         ) -> tuple[float, float]:
    """(requests per second, server CPU microseconds per request)."""
    cpu_before = _cpu_ns(pid) if pid else 0
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", f"http://127.0.0.1:{port}/"],
        capture_output=True, text=True, timeout=seconds + 30, check=True).stdout
    cpu = (_cpu_ns(pid) - cpu_before) if pid else 0
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    if rate is None or total is None:
        raise RuntimeError(f"unexpected wrk output:\n{out}")
    return float(rate.group(1)), cpu / 1000 / max(1, int(total.group(1)))


@contextlib.contextmanager
def _uvicorn(app: str) -> Iterator[tuple[int, int]]:
    """uvicorn on its own port (``--port``, not ``--fd``): uvicorn takes a socket handed
    by descriptor for a Unix socket, so asyncio leaves Nagle's algorithm on and every
    keep-alive response waits ~40 ms for a delayed ACK, which wrk would measure."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--host", "127.0.0.1", "--port", str(port),
         "--log-level", "warning", "--no-access-log", app],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                http_request(f"http://127.0.0.1:{port}", timeout=1)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"uvicorn {app} did not start") from None
                time.sleep(0.05)
        yield port, proc.pid
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def end_to_end(rounds: int, seconds: float) -> dict[str, Any]:
    if shutil.which("wrk") is None:
        return {"skipped": "wrk not installed (Debian package wrk; make bench installs it)"}
    names = ("bare", "passthrough", "guarded", "anchor")
    rps: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    with contextlib.ExitStack() as stack:
        servers = {name: stack.enter_context(_uvicorn(f"benchmarks.overhead_apps:{name}"))
                   for name in names}
        for port, pid in servers.values():
            _wrk(port, pid, 1, 8)  # warm up
        for i in range(rounds):
            order = names if i % 2 == 0 else tuple(reversed(names))
            for name in order:
                rate, cpu_per_request = _wrk(*servers[name], seconds, 8)
                rps[name].append(rate)
                cpu[name].append(cpu_per_request)
    ratios = [g / b for g, b in zip(rps["guarded"], rps["bare"], strict=True)]
    anchor_ratios = [a / b for a, b in zip(rps["anchor"], rps["bare"], strict=True)]
    pass_ratios = [p / b for p, b in zip(rps["passthrough"], rps["bare"], strict=True)]

    def cpu_added(name: str) -> float:
        return median([x - b for x, b in zip(cpu[name], cpu["bare"], strict=True)])

    def cpu_loss(name: str) -> float:
        # A CPU-bound server's throughput is 1 / (CPU per request).
        return (1 - median(cpu["bare"]) / median(cpu[name])) * 100
    return {
        "rounds": rounds, "seconds_per_run": seconds, "connections": 8,
        "bare_rps": round(median(rps["bare"])),
        "memguard_rps": round(median(rps["guarded"])),
        "psutil_rps": round(median(rps["anchor"])),
        "memguard_ratio": round(median(ratios), 4),
        "psutil_ratio": round(median(anchor_ratios), 4),
        "memguard_loss_percent": round((1 - median(ratios)) * 100, 2),
        "psutil_loss_percent": round((1 - median(anchor_ratios)) * 100, 2),
        # A middleware that does nothing: what this machine's noise alone makes of it.
        "passthrough_loss_percent": round((1 - median(pass_ratios)) * 100, 2),
        # The server process's own CPU time per request (schedstat): steadier than
        # requests/s when other work shares the machine.
        "bare_cpu_us": round(median(cpu["bare"]), 2),
        "memguard_cpu_us": round(median(cpu["guarded"]), 2),
        "psutil_cpu_us": round(median(cpu["anchor"]), 2),
        "memguard_cpu_added_us": round(cpu_added("guarded"), 2),
        "psutil_cpu_added_us": round(cpu_added("anchor"), 2),
        "passthrough_cpu_added_us": round(cpu_added("passthrough"), 2),
        "memguard_cpu_loss_percent": round(cpu_loss("guarded"), 2),
        "psutil_cpu_loss_percent": round(cpu_loss("anchor"), 2),
        "passthrough_cpu_loss_percent": round(cpu_loss("passthrough"), 2),
    }


def _allocate() -> int:
    total = 0
    for i in range(20000):
        record = {"id": i, "name": f"item-{i}", "tags": [str(i), "x"]}
        total += len(record["name"])
    return total


def leak_report_cost(rounds: int) -> dict[str, Any]:
    def timed(fn: Any) -> float:
        started = time.perf_counter()
        fn()
        return time.perf_counter() - started

    loop = asyncio.new_event_loop()
    off_alloc, on_alloc, off_req, on_req = [], [], [], []
    reporter = LeakReporter()
    try:
        for _ in range(rounds):
            off_alloc.append(timed(_allocate))
            off_req.append(loop.run_until_complete(_batch(bare, 1000)))
            reporter.start()
            try:
                on_alloc.append(timed(_allocate))
                on_req.append(loop.run_until_complete(_batch(bare, 1000)))
            finally:
                reporter.stop()
    finally:
        loop.close()
    one_frame = []
    for _ in range(rounds):
        tracemalloc.start(1)
        try:
            one_frame.append(timed(_allocate))
        finally:
            tracemalloc.stop()
    return {
        "allocation_heavy_ms_off": round(median(off_alloc) * 1000, 2),
        "allocation_heavy_slowdown": round(median(on_alloc) / median(off_alloc), 2),
        "allocation_heavy_slowdown_1_frame": round(median(one_frame) / median(off_alloc), 2),
        "hello_world_us_off": round(median(off_req), 2),
        "hello_world_us_tracing": round(median(on_req), 2),
        "hello_world_slowdown": round(median(on_req) / median(off_req), 2),
        "frames": reporter.frames,
    }


def run(quick: bool) -> Result:
    inproc = in_process(rounds=10 if quick else 40, per_round=2000 if quick else 5000)
    e2e = end_to_end(rounds=2 if quick else 5, seconds=2 if quick else 5)
    leaks = leak_report_cost(rounds=3 if quick else 10)
    bounds = [
        Bound("in-process added per request (defaults)", inproc["memguard_added_us"], 3.0,
              "us"),
    ]
    if "memguard_loss_percent" in e2e:
        bounds.append(Bound("end-to-end throughput loss under uvicorn (requests/s)",
                            e2e["memguard_loss_percent"], 2.0, "%"))
        bounds.append(Bound("end-to-end throughput loss under uvicorn (server CPU/request)",
                            e2e["memguard_cpu_loss_percent"], 2.0, "%"))
    notes = [
        "in-process: Starlette hello world called through ASGI, process CPU time, variants "
        "interleaved per round, median over rounds of (wrapped - bare)",
        "end-to-end: uvicorn, one process per variant, wrk -t1 -c8, runs interleaved "
        "(order reversed every other round), median of per-round ratios",
        "psutil anchor: two psutil memory_info() calls per request",
        "leak report cost: tracemalloc with the reporter's frame depth, off vs on, "
        "same process, interleaved",
    ]
    table = [
        {"what": "in-process added per request", "memguard": f"{inproc['memguard_added_us']} us",
         "psutil anchor": f"{inproc['psutil_added_us']} us"},
    ]
    if "memguard_ratio" in e2e:
        table.append({"what": "uvicorn + wrk throughput loss (requests/s)",
                      "memguard": f"{e2e['memguard_loss_percent']}%",
                      "psutil anchor": f"{e2e['psutil_loss_percent']}%"})
        table.append({"what": "uvicorn + wrk throughput loss (server CPU per request)",
                      "memguard": f"{e2e['memguard_cpu_loss_percent']}%",
                      "psutil anchor": f"{e2e['psutil_cpu_loss_percent']}%"})
    return Result(name="overhead",
                  figures={"in_process": inproc, "end_to_end": e2e, "leak_report": leaks},
                  bounds=bounds, notes=notes, table=table)
