"""Three app shapes for ``benchmarks/sizing``: what decides how many workers pay off.

- ``cpu_app``: every request computes for a few milliseconds and waits for nothing;
- ``io_app``: every request waits 20 ms (a database call) and computes almost nothing;
- ``memory_app``: every worker builds a large cache on its first request (a lookup
  table, a model), then each request reads it, computes a little and waits 20 ms.

WSGI, for gunicorn's sync and gthread workers (the cache is built once per process, under
a lock, as a thread-safe app does). The sizes come from the environment so the benchmark
and ``memguard suggest`` see the same app.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable
from typing import Any

MiB = 1024 * 1024
CPU_LOOPS = int(os.environ.get("SHAPE_CPU_LOOPS", "80000"))
IO_WAIT = float(os.environ.get("SHAPE_IO_WAIT", "0.020"))
CACHE_BYTES = int(os.environ.get("SHAPE_CACHE_MIB", "96")) * MiB

_cache: list[bytes] = []
_cache_lock = threading.Lock()


def _compute(loops: int) -> int:
    total = 0
    for i in range(loops):
        total += i * i % 7
    return total


def _respond(start_response: Any, body: bytes) -> Iterable[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain"),
                              ("Content-Length", str(len(body)))])
    return [body]


def cpu_app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
    return _respond(start_response, b"%d\n" % _compute(CPU_LOOPS))


def io_app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
    time.sleep(IO_WAIT)
    return _respond(start_response, b"ok\n")


def memory_app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
    if not _cache:
        with _cache_lock:
            if not _cache:
                # Written to, page by page: an untouched allocation would not be charged.
                _cache.append(b"\x01" * CACHE_BYTES)
    time.sleep(IO_WAIT)
    table = _cache[0]
    return _respond(start_response, b"%d %d\n" % (table[len(table) // 2], _compute(500)))
