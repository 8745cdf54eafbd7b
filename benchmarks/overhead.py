"""What memguard's middleware costs per request, with its defaults.

1. In-process: a Starlette hello world called directly through ASGI (no server, no
   socket), bare and behind ``MemGuardMiddleware()`` (every default: admission, sampled
   tracking, body guard), plus the psutil-per-request anchor. Rounds interleave the
   variants; the figure is the median over rounds of (wrapped - bare) microseconds per
   request.
   A diagnostic only: a server pays far more per request than this says (its caches are
   cold for our code); the target is judged end to end, in ``benchmarks/end_to_end.py``.
2. Leak reports while active: tracemalloc slows every allocation; measured on an
   allocation-heavy function and on the hello world, tracing off vs a running
   :class:`memguard.memory.LeakReporter`.
"""

from __future__ import annotations

import asyncio
import time
import tracemalloc
from pathlib import Path
from typing import Any

from benchmarks.harness import Result, median
from benchmarks.overhead_apps import anchor, bare, guarded, passthrough
from memguard.memory import LeakReporter

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
    leaks = leak_report_cost(rounds=3 if quick else 10)
    notes = [
        "in-process: Starlette hello world called through ASGI, process CPU time, variants "
        "interleaved per round, median over rounds of (wrapped - bare); a diagnostic, not "
        "a target (see end_to_end)",
        "psutil anchor: two psutil memory_info() calls per request",
        "leak report cost: tracemalloc with the reporter's frame depth, off vs on, "
        "same process, interleaved",
    ]
    table = [
        {"what": "in-process added per request (diagnostic)",
         "memguard": f"{inproc['memguard_added_us']} us",
         "psutil anchor": f"{inproc['psutil_added_us']} us"},
    ]
    return Result(name="overhead", figures={"in_process": inproc, "leak_report": leaks},
                  bounds=[], notes=notes, table=table)
