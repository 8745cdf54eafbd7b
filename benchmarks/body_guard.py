"""Body guard cost, in-process: what MemGuardMiddleware adds to a request.

- Starlette hello world (GET, no body): requests per second bare vs wrapped; the
  difference in microseconds per request is the pass-through cost (target <= 1.5 us).
- A small POST with a Content-Length (the body path: framing, limit lookup, receive
  wrapper, one timer per request).
- A 64 MiB upload streamed in 64 KiB chunks through Starlette's ``request.stream()``:
  bare vs wrapped with the default options (timer armed), and wrapped with the slow-body
  timer off, so the timer's share shows (target <= 3%).

Bare and wrapped run in the same process, in interleaved rounds; figures are medians.
The driver calls the ASGI app directly (no transport), so the middleware's cost is not
hidden behind a client's.

The uploads run in several processes, one after the other, and the figure is the median
of their medians: on this machine two processes running the same code for 600 rounds
each differed by a full point (4.0 and 2.9 %, 95% intervals apart), far more than the
rounds of one process differ, so one process is one sample however long it runs.
``python -m benchmarks.body_guard --uploads ROUNDS SAVE_ROUNDS`` is one such process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from benchmarks.harness import Bound, Result, median
from memguard import MemGuardMiddleware
from memguard.types import ASGIApp, Message

CHUNK = 64 * 1024
UPLOAD = 64 * 1024 * 1024


async def hello(request: Request) -> Response:
    return PlainTextResponse("Hello, world!")


async def upload(request: Request) -> Response:
    n = 0
    async for chunk in request.stream():
        n += len(chunk)
    return PlainTextResponse(str(n))


async def upload_to_file(request: Request) -> Response:
    """What a streaming upload endpoint does with the chunks: write them to a file."""
    n = 0
    with tempfile.TemporaryFile() as f:
        async for chunk in request.stream():
            f.write(chunk)
            n += len(chunk)
    return PlainTextResponse(str(n))


def starlette_app() -> Starlette:
    return Starlette(routes=[Route("/", hello), Route("/upload", upload, methods=["POST"]),
                             Route("/save", upload_to_file, methods=["POST"])])


def _scope(method: str, path: str, headers: list[tuple[bytes, bytes]]) -> dict[str, Any]:
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
            "method": method, "scheme": "http", "path": path, "raw_path": path.encode(),
            "query_string": b"", "root_path": "", "headers": headers,
            "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000)}


HEADERS = [(b"host", b"localhost:8000"), (b"user-agent", b"bench/1.0"),
           (b"accept", b"*/*"), (b"accept-encoding", b"gzip, deflate"),
           (b"connection", b"keep-alive")]


@contextlib.asynccontextmanager
async def _server_tick() -> AsyncIterator[None]:
    """The timer every server's event loop has: uvicorn's main loop sleeps 0.1 s between
    ticks, gunicorn's asgi worker 1 s. It matters to the upload: with a timer
    scheduled, each asyncio loop iteration looks at the earliest one, and a driver loop
    without any would charge that look to the body guard, whose slow-body sweeper would
    be its only timer (about 380 instructions per 64 KiB chunk, measured with
    callgrind)."""

    async def tick() -> None:
        while True:
            await asyncio.sleep(0.1)

    task = asyncio.ensure_future(tick())
    try:
        yield
    finally:
        task.cancel()


async def _requests(app: ASGIApp, count: int, method: str = "GET", path: str = "/",
                    body: bytes = b"") -> float:
    """Seconds per request for ``count`` requests."""
    headers = list(HEADERS)
    if body:
        headers += [(b"content-type", b"application/octet-stream"),
                    (b"content-length", str(len(body)).encode())]
    message = {"type": "http.request", "body": body, "more_body": False}

    async def receive() -> Message:
        return message

    async def send(message: Message) -> None:
        pass

    async with _server_tick():
        started = time.process_time()
        for _ in range(count):
            await app(_scope(method, path, headers), receive, send)
        return (time.process_time() - started) / count


async def _upload(app: ASGIApp, path: str = "/upload") -> float:
    """Seconds for one 64 MiB upload in 64 KiB chunks.

    The fake server does the least a real one does per chunk: the reading task waits
    once for the data (``sleep(0)``: one trip through the event loop, which has the
    server's tick timer scheduled) and the chunk is copied out of the server's read
    buffer (uvicorn hands the app ``bytes(self.body)``). Without those, "bare" would be
    a dict per chunk and no server at all.
    """
    buffer = bytearray(b"u" * CHUNK)
    chunks = UPLOAD // CHUNK
    sent = 0

    async def receive() -> Message:
        nonlocal sent
        await asyncio.sleep(0)
        sent += 1
        return {"type": "http.request", "body": bytes(buffer), "more_body": sent < chunks}

    async def send(message: Message) -> None:
        pass

    headers = [*HEADERS, (b"content-type", b"application/octet-stream"),
               (b"content-length", str(UPLOAD).encode())]
    async with _server_tick():
        started = time.process_time()
        await app(_scope("POST", path, headers), receive, send)
        return time.process_time() - started


# For the real-server measurement (uvicorn imports these by name).
served_bare = starlette_app()
served_guarded = MemGuardMiddleware(starlette_app(), max_body_size="128MiB")


def _server_cpu(pid: int) -> float:
    """The server process's CPU seconds, all threads, from the scheduler's nanosecond
    accounting (/proc/PID/task/*/schedstat; psutil's cpu_times are 10 ms ticks)."""
    import glob

    total = 0
    for path in glob.glob(f"/proc/{pid}/task/*/schedstat"):
        try:
            with open(path) as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue  # a thread that just exited
    return total / 1e9


def _socket_upload(port: int) -> None:
    """POST 64 MiB in 64 KiB writes over loopback and read the answer."""
    import socket

    piece = b"u" * CHUNK
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(f"POST /upload HTTP/1.1\r\nHost: b\r\nContent-Type: "
                     f"application/octet-stream\r\nContent-Length: {UPLOAD}\r\n"
                     f"Connection: close\r\n\r\n".encode())
        for _ in range(UPLOAD // CHUNK):
            sock.sendall(piece)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    if not answer.startswith(b"HTTP/1.1 200") or not answer.endswith(str(UPLOAD).encode()):
        raise RuntimeError(f"upload failed: {answer[:200]!r}")


def _real_uvicorn(rounds: int) -> dict[str, list[float]]:
    """Server CPU seconds per 64 MiB upload, uvicorn serving bare vs wrapped."""
    from pathlib import Path

    from tests.support.servers import serve

    repo = Path(__file__).resolve().parent.parent
    args = ["--no-access-log", "--log-level", "warning"]
    times: dict[str, list[float]] = {"bare": [], "wrapped": []}
    with serve("uvicorn", "benchmarks.body_guard:served_bare", args, cwd=repo) as bare, \
            serve("uvicorn", "benchmarks.body_guard:served_guarded", args, cwd=repo) as wrapped:
        servers = {"bare": bare, "wrapped": wrapped}
        for server in servers.values():
            _socket_upload(server.port)  # warm up
        for _ in range(rounds):
            for name, server in servers.items():
                before = _server_cpu(server.pid)
                _socket_upload(server.port)
                times[name].append(_server_cpu(server.pid) - before)
    return times


def _interleaved(variants: dict[str, Callable[[], Any]], rounds: int) -> dict[str, list[float]]:
    """Each round runs every variant once, each in a fresh event loop, in an order
    shuffled per round (seeded), so that no variant always follows the same one."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    order = list(variants)
    shuffle = random.Random(0).shuffle
    for _ in range(rounds):
        shuffle(order)
        for name in order:
            times[name].append(asyncio.run(variants[name]()))
    return times


def _paired(times: dict[str, list[float]], a: str, b: str) -> list[float]:
    return [y - x for x, y in zip(times[a], times[b], strict=True)]


def _paired_pct(times: dict[str, list[float]], a: str, b: str) -> float:
    """Median over rounds of ``b``'s time over ``a``'s in the same round, in percent."""
    return median([(y / x - 1) * 100 for x, y in zip(times[a], times[b], strict=True)])


def _upload_times(rounds: int, save_rounds: int) -> dict[str, list[float]]:
    """One process's uploads: bare, wrapped, wrapped without slow-body timing and
    wrapped without the memory accounting (issue 5's per-request samples, on by default),
    in interleaved rounds; then bare and wrapped writing the chunks to a file."""
    app = starlette_app()
    guarded = MemGuardMiddleware(starlette_app(), max_body_size="128MiB")
    untimed = MemGuardMiddleware(starlette_app(), max_body_size="128MiB",
                                 body_idle_timeout=0, body_min_rate=0)
    unaccounted = MemGuardMiddleware(starlette_app(), max_body_size="128MiB",
                                     track_memory=False)
    times = _interleaved({"bare": lambda: _upload(app), "wrapped": lambda: _upload(guarded),
                          "untimed": lambda: _upload(untimed),
                          "unaccounted": lambda: _upload(unaccounted)}, rounds)
    save = _interleaved({"bare": lambda: _upload(app, "/save"),
                         "wrapped": lambda: _upload(guarded, "/save")}, save_rounds)
    times["save_bare"], times["save_wrapped"] = save["bare"], save["wrapped"]
    return times


def _upload_processes(processes: int, rounds: int,
                      save_rounds: int) -> list[dict[str, list[float]]]:
    """:func:`_upload_times` in ``processes`` fresh processes, one after the other."""
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    results = []
    for _ in range(processes):
        out = subprocess.run(
            [sys.executable, "-m", "benchmarks.body_guard", "--uploads", str(rounds),
             str(save_rounds)], capture_output=True, text=True, check=True, cwd=repo,
            timeout=600)
        results.append(json.loads(out.stdout))
    return results


async def raw_hello(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", b"13")]})
    await send({"type": "http.response.body", "body": b"Hello, world!"})


def run(quick: bool) -> Result:
    app = starlette_app()
    guarded = MemGuardMiddleware(starlette_app(), max_body_size="128MiB")
    untimed = MemGuardMiddleware(starlette_app(), max_body_size="128MiB",
                                 body_idle_timeout=0, body_min_rate=0)
    raw_guarded = MemGuardMiddleware(raw_hello)
    # Rounds are short (5000 requests: about 50 ms; an upload: a few ms), so there are
    # many of them: on this shared machine the median steadies with their number.
    count = 2000 if quick else 5000
    rounds = 9 if quick else 101
    processes, up_rounds, save_rounds = (3, 5, 3) if quick else (9, 101, 21)

    hello_t = _interleaved({"bare": lambda: _requests(app, count),
                            "wrapped": lambda: _requests(guarded, count),
                            "raw_bare": lambda: _requests(raw_hello, count),
                            "raw_wrapped": lambda: _requests(raw_guarded, count)}, rounds)
    post_t = _interleaved({
        "bare": lambda: _requests(app, count // 2, "POST", "/upload", b"x" * 100),
        "wrapped": lambda: _requests(guarded, count // 2, "POST", "/upload", b"x" * 100),
        "untimed": lambda: _requests(untimed, count // 2, "POST", "/upload", b"x" * 100)},
        rounds)
    uploads = _upload_processes(processes, up_rounds, save_rounds)

    us = 1e6
    hello_bare, hello_wrapped = median(hello_t["bare"]), median(hello_t["wrapped"])
    added_us = median(_paired(hello_t, "bare", "wrapped")) * us
    raw_added_us = median(_paired(hello_t, "raw_bare", "raw_wrapped")) * us
    post_added_us = median(_paired(post_t, "bare", "wrapped")) * us
    post_untimed_us = median(_paired(post_t, "bare", "untimed")) * us
    # Per process, the median over its rounds; the figures are the medians of those.
    up_by_process = [_paired_pct(t, "bare", "wrapped") for t in uploads]
    up_pct = median(up_by_process)
    up_untimed_pct = median([_paired_pct(t, "bare", "untimed") for t in uploads])
    up_unaccounted_pct = median([_paired_pct(t, "bare", "unaccounted") for t in uploads])
    save_by_process = [_paired_pct(t, "save_bare", "save_wrapped") for t in uploads]
    save_pct = median(save_by_process)
    up_bare = median([median(t["bare"]) for t in uploads])
    up_added_s = median([median(_paired(t, "bare", "wrapped")) for t in uploads])
    real_t = _real_uvicorn(5 if quick else 31)
    real_pct = median([(w / b - 1) * 100 for b, w in zip(real_t["bare"], real_t["wrapped"],
                                                           strict=True)])
    chunks = UPLOAD // CHUNK
    figures = {
        "clock": "process CPU time (time.process_time): steadier than wall time on a "
                 "shared machine",
        "hello_requests_per_round": count, "rounds": rounds,
        "upload_processes": processes, "upload_rounds_per_process": up_rounds,
        "upload_to_file_rounds_per_process": save_rounds,
        "hello_bare_us": round(hello_bare * us, 3),
        "hello_wrapped_us": round(hello_wrapped * us, 3),
        "hello_bare_rps": round(1 / hello_bare),
        "hello_wrapped_rps": round(1 / hello_wrapped),
        "hello_added_us": round(added_us, 3),
        "hello_added_us_median_of_medians": round((hello_wrapped - hello_bare) * us, 3),
        "raw_asgi_hello_bare_us": round(median(hello_t["raw_bare"]) * us, 3),
        "raw_asgi_hello_added_us": round(raw_added_us, 3),
        "small_post_bare_us": round(median(post_t["bare"]) * us, 3),
        "small_post_added_us": round(post_added_us, 3),
        "small_post_added_no_timeouts_us": round(post_untimed_us, 3),
        "upload_bytes": UPLOAD, "upload_chunk": CHUNK,
        "upload_bare_ms": round(up_bare * 1e3, 3),
        "upload_wrapped_ms": round(median([median(t["wrapped"]) for t in uploads]) * 1e3, 3),
        "upload_no_timeouts_ms": round(median([median(t["untimed"]) for t in uploads]) * 1e3,
                                       3),
        "upload_overhead_pct": round(up_pct, 2),
        "upload_overhead_pct_by_process": [round(p, 2) for p in up_by_process],
        "upload_overhead_no_timeouts_pct": round(up_untimed_pct, 2),
        "upload_overhead_no_accounting_pct": round(up_unaccounted_pct, 2),
        "upload_added_us": round(up_added_s * us, 1),
        "upload_added_per_chunk_us": round(up_added_s * us / chunks, 3),
        "upload_bare_mib_s": round(UPLOAD / up_bare / 2**20),
        "upload_to_file_bare_ms": round(median([median(t["save_bare"]) for t in uploads]) * 1e3,
                                        3),
        "upload_to_file_wrapped_ms": round(
            median([median(t["save_wrapped"]) for t in uploads]) * 1e3, 3),
        "upload_to_file_overhead_pct_by_process": [round(p, 2) for p in save_by_process],
        "upload_to_file_overhead_pct": round(save_pct, 2),
        "uvicorn_upload_server_cpu_bare_ms": round(median(real_t["bare"]) * 1e3, 1),
        "uvicorn_upload_server_cpu_wrapped_ms": round(median(real_t["wrapped"]) * 1e3, 1),
        "uvicorn_upload_server_cpu_overhead_pct": round(real_pct, 2),
    }
    return Result(
        name="body_guard",
        figures=figures,
        bounds=[
            Bound("added per bodyless request (Starlette hello)", added_us, 1.5, "us"),
            Bound("64 MiB streamed upload overhead", up_pct, 3.0, "%"),
            Bound("64 MiB streamed upload written to a file, overhead", save_pct, 3.0, "%"),
            Bound("64 MiB upload to a real uvicorn, server CPU overhead", real_pct, 3.0, "%"),
        ],
        notes=[
            "In-process: the ASGI app is called directly, no transport or server. "
            "Times are process CPU time; rounds interleave the variants; figures are "
            "medians of per-round paired differences (bare vs wrapped in the same round).",
            "hello: Starlette GET /, no body: the middleware's pass-through path; raw_asgi: "
            "the same against a bare ASGI callable (a smaller, steadier baseline).",
            "small_post: 100-byte POST with Content-Length: framing, limit lookup, scope "
            "copy with the extension, receive and send wrappers, slow-body registration.",
            "upload: 64 MiB in 64 KiB chunks read with request.stream(); the fake server "
            "yields to the loop once per chunk and copies it out of a buffer, as a real "
            "one does; wrapped = default options, no_timeouts = idle timeout and min rate "
            "off, no_accounting = track_memory off (each 64 MiB upload is a sampled "
            "request: two RSS reads). upload_to_file: the same chunks written to a "
            "temporary file, as an upload endpoint does (process CPU time includes the "
            "write syscalls). Both "
            "run in upload_processes fresh processes one after the other: each gives "
            "the median of its rounds' paired ratios, the figure is the median of those "
            "(by_process lists them), because processes differ more than rounds do.",
            "uvicorn_upload: a real uvicorn on loopback (one for the bare app, one for the "
            "wrapped), 64 MiB sent in 64 KiB writes; the figure is the server process's "
            "CPU time per upload (schedstat), rounds interleaved, median of "
            "paired ratios.",
        ],
        table=[
            {"benchmark": "body_guard", "case": "Starlette hello, added per request",
             "value": f"{added_us:.2f} us", "target": "<= 1.5 us"},
            {"benchmark": "body_guard", "case": "64 MiB streamed upload, overhead",
             "value": f"{up_pct:.2f} %", "target": "<= 3 %"},
            {"benchmark": "body_guard", "case": "64 MiB upload written to a file, overhead",
             "value": f"{save_pct:.2f} %", "target": "<= 3 %"},
            {"benchmark": "body_guard", "case": "64 MiB upload to real uvicorn, server CPU",
             "value": f"{real_pct:.2f} %", "target": "<= 3 %"},
        ],
    )


if __name__ == "__main__":
    # One upload process of run(): python -m benchmarks.body_guard --uploads ROUNDS SAVE
    if len(sys.argv) != 4 or sys.argv[1] != "--uploads":
        sys.exit("usage: python -m benchmarks.body_guard --uploads ROUNDS SAVE_ROUNDS")
    print(json.dumps(_upload_times(int(sys.argv[2]), int(sys.argv[3]))))
