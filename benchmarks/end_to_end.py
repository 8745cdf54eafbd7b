"""What memguard costs where users feel it: a real server's CPU time per request.

Each comparison starts its servers once (bare, a do-nothing pass-through middleware, and
memguard with every default), all pinned to one CPU, and loads them *at once* with one
``wrk`` each, pinned to the other CPU. Loading the variants together makes this shared
machine's noise hit them alike; one after the other, single rounds spread by +-10 %.
A round's figure for a variant is the server's CPU time (``/proc/PID/schedstat``) over
the requests wrk completed; the result is the median over rounds of the paired
difference against the bare server, in percent of the bare server's CPU per request.
The pass-through row is the floor: what a middleware that does nothing measures.

Comparisons:

- ``uvicorn``: a Starlette hello world under uvicorn (h11, one process);
- ``gunicorn-asgi``: the same app under gunicorn's native ``asgi`` worker;
- ``gunicorn-sync``: a Flask hello world under gunicorn's sync worker, with
  ``MemGuardWSGIMiddleware``;
- ``upload``: 64 MiB POSTs streamed (``request.stream()``) by a Starlette app under
  uvicorn, bare and wrapped, each round sending the same number of uploads to each.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.harness import Bound, Result, median

REPO = Path(__file__).resolve().parent.parent
SERVER_CPU = "0"
LOAD_CPU = "1"
APPS = "benchmarks.apps.hello"


@dataclass(frozen=True)
class Variant:
    name: str
    command: list[str]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _cpu_ns(pids: Sequence[int]) -> int:
    """CPU time of these processes (a gunicorn master and its worker), in ns."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/schedstat") as f:
            total += int(f.read().split()[0])
    return total


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def _wait_ready(port: int, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                if sock.recv(64).startswith(b"HTTP/1.1 200"):
                    return
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start")
        time.sleep(0.05)


@contextlib.contextmanager
def _server(variant: Variant) -> Iterator[tuple[int, list[int]]]:
    """The server on its own port, pinned to SERVER_CPU: (port, pids to measure)."""
    port = _free_port()
    command = [arg.replace("{port}", str(port)) for arg in variant.command]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(["taskset", "-c", SERVER_CPU, *command], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        _wait_ready(port, proc, variant.name)
        time.sleep(0.3)  # gunicorn: let the worker settle
        yield port, [proc.pid, *_children(proc.pid)]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _start_wrk(port: int, seconds: float, connections: int,
               script: str | None) -> subprocess.Popen[str]:
    command = ["taskset", "-c", LOAD_CPU, "wrk", "-t1", f"-c{connections}",
               f"-d{int(seconds)}s", f"http://127.0.0.1:{port}/"]
    if script is not None:
        command[-1:-1] = ["-s", script]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _requests(output: str) -> int:
    found = re.search(r"(\d+) requests in", output)
    if found is None:
        raise RuntimeError(f"unexpected wrk output:\n{output}")
    return int(found.group(1))


def compare(variants: Sequence[Variant], rounds: int, seconds: float,
            connections: int = 8, script: str | None = None) -> dict[str, Any]:
    """Every variant loaded at once, ``rounds`` times: CPU microseconds per request per
    round, and the median paired difference against the first variant (bare)."""
    cpu: dict[str, list[float]] = {v.name: [] for v in variants}
    with contextlib.ExitStack() as stack:
        servers = {v.name: stack.enter_context(_server(v)) for v in variants}
        for round_index in range(rounds + 1):  # the first round warms up
            before = {name: _cpu_ns(pids) for name, (_, pids) in servers.items()}
            loads = {name: _start_wrk(port, seconds, connections, script)
                     for name, (port, _) in servers.items()}
            outputs = {name: proc.communicate(timeout=seconds + 60)[0]
                       for name, proc in loads.items()}
            if round_index == 0:
                continue
            for name, (_, pids) in servers.items():
                done = _requests(outputs[name])
                cpu[name].append((_cpu_ns(pids) - before[name]) / 1000 / max(done, 1))
    bare = variants[0].name
    figures: dict[str, Any] = {"rounds": rounds, "seconds_per_round": seconds,
                               "connections": connections,
                               f"{bare}_cpu_us": round(median(cpu[bare]), 2)}
    for variant in variants[1:]:
        name = variant.name
        added = [(w - b) / b * 100 for w, b in zip(cpu[name], cpu[bare], strict=True)]
        added_us = [w - b for w, b in zip(cpu[name], cpu[bare], strict=True)]
        figures[f"{name}_cpu_us"] = round(median(cpu[name]), 2)
        figures[f"{name}_added_percent"] = round(median(added), 2)
        figures[f"{name}_added_us"] = round(median(added_us), 2)
        figures[f"{name}_rounds_percent"] = [round(x, 2) for x in added]
    return figures


def _uvicorn(app: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "uvicorn", "--host", "127.0.0.1", "--port", "{port}",
            "--http", "h11", "--log-level", "warning", "--no-access-log", *extra,
            f"{APPS}:{app}"]


def _gunicorn(app: str, worker_class: str) -> list[str]:
    return [sys.executable, "-m", "gunicorn", "-b", "127.0.0.1:{port}", "-w", "1",
            "-k", worker_class, "--log-level", "warning", f"{APPS}:{app}"]


def _upload_script(directory: Path, size: int) -> str:
    """A wrk Lua script that POSTs ``size`` bytes per request."""
    path = directory / f"upload-{size}.lua"
    path.write_text(
        'wrk.method = "POST"\n'
        f'wrk.body = string.rep("x", {size})\n'
        'wrk.headers["Content-Type"] = "application/octet-stream"\n')
    return str(path)


def run(quick: bool) -> Result:
    if shutil.which("wrk") is None or shutil.which("taskset") is None:
        return Result(name="end_to_end", figures={"skipped": "wrk or taskset not installed"},
                      bounds=[], notes=["make bench installs wrk"], table=[])
    rounds = 5 if quick else 15
    seconds = 1.0 if quick else 2.0
    figures: dict[str, Any] = {}
    figures["uvicorn"] = compare(
        [Variant("bare", _uvicorn("bare")), Variant("passthrough", _uvicorn("passthrough")),
         Variant("memguard", _uvicorn("guarded"))], rounds, seconds)
    figures["gunicorn_asgi"] = compare(
        [Variant("bare", _gunicorn("bare", "asgi")),
         Variant("passthrough", _gunicorn("passthrough", "asgi")),
         Variant("memguard", _gunicorn("guarded", "asgi"))], rounds, seconds)
    figures["gunicorn_sync"] = compare(
        [Variant("bare", _gunicorn("flask_bare", "sync")),
         Variant("passthrough", _gunicorn("flask_passthrough", "sync")),
         Variant("memguard", _gunicorn("flask_guarded", "sync"))], rounds, seconds)
    scratch = REPO / "benchmarks" / "results"
    script = _upload_script(scratch, 64 << 20)
    try:
        figures["upload"] = compare(
            [Variant("bare", _uvicorn("streaming_bare")),
             Variant("memguard", _uvicorn("streaming_guarded"))],
            3 if quick else 11, 4.0 if quick else 6.0, connections=2, script=script)
    finally:
        Path(script).unlink()
    bounds = [
        Bound("uvicorn hello: memguard's added server CPU",
              figures["uvicorn"]["memguard_added_percent"], 3.0, "%"),
        Bound("gunicorn asgi hello: memguard's added server CPU",
              figures["gunicorn_asgi"]["memguard_added_percent"], 3.0, "%"),
        Bound("gunicorn sync Flask hello: memguard's added server CPU",
              figures["gunicorn_sync"]["memguard_added_percent"], 3.0, "%"),
        Bound("64 MiB upload under uvicorn: memguard's added server CPU",
              figures["upload"]["memguard_added_percent"], 1.0, "%"),
    ]
    table = []
    for key, label in (("uvicorn", "Starlette hello, uvicorn (h11)"),
                       ("gunicorn_asgi", "Starlette hello, gunicorn asgi worker"),
                       ("gunicorn_sync", "Flask hello, gunicorn sync"),
                       ("upload", "64 MiB streamed upload, uvicorn (h11)")):
        row = figures[key]
        table.append({
            "what": label, "bare CPU/request": f"{row['bare_cpu_us']} us",
            "pass-through": (f"{row['passthrough_added_percent']:+.2f} %"
                             if "passthrough_added_percent" in row else "-"),
            "memguard": (f"{row['memguard_added_percent']:+.2f} % "
                         f"({row['memguard_added_us']:+.2f} us)"),
        })
    notes = [
        "servers pinned to CPU 0, one wrk per server pinned to CPU 1, all loaded at once",
        "figure: median over rounds of (variant - bare) server CPU per request, in % of bare",
        "reproduce: .venv/bin/python -m benchmarks end_to_end",
    ]
    return Result(name="end_to_end", figures=figures, bounds=bounds, notes=notes,
                  table=table)
