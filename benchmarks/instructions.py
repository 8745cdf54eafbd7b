"""A diagnostic, not a target: what memguard adds per request in instructions and cache
misses, counted by valgrind's cachegrind in a real uvicorn serving a Starlette hello world.

The end-to-end benchmark measures time on a shared machine, where a run resolves about a
microsecond; cachegrind counts instructions and simulated L1 misses, the same from run
to run, so a change of a few hundred instructions per request shows. Each variant (bare,
a do-nothing pass-through middleware, memguard with every default) is served under
cachegrind twice, for ``FEW`` and ``MANY`` requests from 8 keep-alive connections after
a warm-up; the difference over ``MANY - FEW`` requests is the per-request figure, free of
startup. Under valgrind a request takes about 40 times longer, so the server's clock is
slowed as much (libfaketime): memguard's clock-driven work (samples, pressure refresh)
then runs as often per request as at full speed. The hash seed is fixed, since string
hashes change dict probing, and with it the counts, from one process to the next.

Needs ``valgrind`` and ``libfaketime`` (Debian: ``apt-get install valgrind faketime``);
``python -m benchmarks instructions`` (about two minutes). Not part of ``make bench``.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.end_to_end import _free_port
from benchmarks.harness import Result

REPO = Path(__file__).resolve().parent.parent
APPS = "benchmarks.apps.hello"
VARIANTS = ("bare", "passthrough", "guarded")
FEW, MANY, WARMUP = 400, 2400, 80
CONNECTIONS = 8
# Valgrind's slowdown of this server, to slow its clock by as much.
CLOCK_RATE = "x0.025"
FAKETIME_LIBRARIES = ("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
                      "/usr/lib/faketime/libfaketime.so.1")
EVENTS = ("Ir", "I1mr", "ILmr", "Dr", "D1mr", "DLmr", "Dw", "D1mw", "DLmw")
SHOWN = {"Ir": "instructions", "I1mr": "L1 instruction misses",
         "D1mr": "L1 data read misses", "D1mw": "L1 data write misses"}


async def _connection(port: int, count: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    request = f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
    for _ in range(count):
        writer.write(request)
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        await reader.readexactly(length)
    writer.close()


def _send(port: int, count: int) -> None:
    async def all_connections() -> None:
        await asyncio.gather(*(_connection(port, count // CONNECTIONS)
                               for _ in range(CONNECTIONS)))
    asyncio.run(all_connections())


def _wait_ready(port: int, proc: subprocess.Popen[bytes], timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("the server under cachegrind exited before it was ready")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError("the server under cachegrind did not become ready")


def _totals(path: Path) -> dict[str, int]:
    for line in path.read_text().splitlines():
        if line.startswith("summary:"):
            return dict(zip(EVENTS, (int(x) for x in line.split()[1:]), strict=True))
    raise RuntimeError(f"no summary in {path}")


def _served(variant: str, requests: int, faketime: str, out: Path) -> dict[str, int]:
    """Cachegrind's totals for one uvicorn process serving ``requests`` after the
    warm-up."""
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONHASHSEED": "0",
           "LD_PRELOAD": faketime, "FAKETIME": f"+0 {CLOCK_RATE}"}
    command = ["valgrind", "--tool=cachegrind", "--cache-sim=yes",
               f"--cachegrind-out-file={out}", sys.executable, "-m", "uvicorn",
               "--host", "127.0.0.1", "--port", str(port), "--http", "h11",
               "--log-level", "warning", "--no-access-log", f"{APPS}:{variant}"]
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_ready(port, proc)
        _send(port, WARMUP)
        _send(port, requests)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return _totals(out)


def run(quick: bool) -> Result:
    faketime = next((lib for lib in FAKETIME_LIBRARIES if Path(lib).exists()), None)
    if shutil.which("valgrind") is None or faketime is None:
        return Result(name="instructions",
                      figures={"skipped": "valgrind or libfaketime not installed"},
                      notes=["apt-get install valgrind faketime"])
    per_request: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="memguard-cachegrind-") as scratch:
        for variant in VARIANTS:
            few = _served(variant, FEW, faketime, Path(scratch) / f"{variant}-few.out")
            many = _served(variant, MANY, faketime, Path(scratch) / f"{variant}-many.out")
            per_request[variant] = {e: (many[e] - few[e]) / (MANY - FEW) for e in EVENTS}
    bare = per_request["bare"]
    figures: dict[str, Any] = {"requests": MANY - FEW, "connections": CONNECTIONS,
                               "clock_rate": CLOCK_RATE,
                               "bare_per_request": {e: round(v) for e, v in bare.items()}}
    table = []
    for variant in VARIANTS[1:]:
        added = {e: per_request[variant][e] - bare[e] for e in EVENTS}
        figures[f"{variant}_added_per_request"] = {e: round(v) for e, v in added.items()}
        table.append({"what": "memguard, all defaults" if variant == "guarded"
                      else "pass-through middleware",
                      **{label: f"{added[e]:+,.0f} ({added[e] / bare[e] * 100:+.2f} %)"
                         for e, label in SHOWN.items()}})
    notes = [f"bare uvicorn + Starlette hello: {bare['Ir']:,.0f} instructions per request",
             "reproduce: .venv/bin/python -m benchmarks instructions"]
    return Result(name="instructions", figures=figures, notes=notes, table=table)
