"""Apps that leak on purpose, for the recycling tests.

Every request to ``/`` keeps ``LEAK_BYTES`` (default 2 MiB, env ``LEAKY_BYTES``) in a
module-level list, touched so the pages are really resident. ``/grow?mib=N`` keeps N MiB
in one go; ``/grow-later?mib=N`` does it from a thread after the response (an idle
worker that grew); ``/collect`` runs ``gc.collect()``; ``/slow-leak?mib=N&seconds=S``
keeps growing by 1 MiB steps inside one long request (the master must stop it).
"""

from __future__ import annotations

import gc
import os
import threading
import time
from collections.abc import Iterable
from typing import Any
from urllib.parse import parse_qs

LEAK_BYTES = int(os.environ.get("LEAKY_BYTES", str(2 << 20)))
REQUEST_SECONDS = float(os.environ.get("LEAKY_REQUEST_SECONDS", "0"))
# Bursty: only every Nth request of a worker keeps LEAK_BYTES.
LEAK_EVERY = int(os.environ.get("LEAKY_EVERY", "1"))
# A cache warmed by the first requests: only the first N requests keep anything.
LEAK_UNTIL = int(os.environ.get("LEAKY_WARMUP", str(1 << 62)))
_served = [0]
MIB = 1 << 20
_kept: list[bytes] = []

# A slow boot (an app that loads models or warms caches): seconds spent at import.
time.sleep(float(os.environ.get("LEAKY_BOOT_SECONDS", "0")))

# A worker born over its limit: the app holds this much from import on.
_born = int(os.environ.get("LEAKY_BORN_MIB", "0"))
if _born:
    _kept.append(os.urandom(16) * (_born * MIB // 16))

# Many small lists (always tracked by the GC) made at import (with --preload: in the master), whose
# reference counts and GC headers a worker's gc.collect() would write to.
_objects = [[i, str(i)] for i in range(int(os.environ.get("LEAKY_OBJECTS", "0")))]


def _keep(n: int) -> None:
    # bytes(n) would be calloc'd zero pages that are not resident until written;
    # repeating a random block writes every page.
    _kept.append(os.urandom(16) * (n // 16))


def _query(environ_or_qs: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(environ_or_qs).items()}


def _route(path: str, query: dict[str, str]) -> bytes:
    if path == "/grow":
        _keep(int(query.get("mib", "1")) * MIB)
    elif path == "/slow-leak":
        mib = int(query.get("mib", "100"))
        pause = float(query.get("seconds", "5")) / max(mib, 1)
        for _ in range(mib):
            _keep(MIB)
            time.sleep(pause)
    elif path == "/grow-later":
        # Growth outside any request: only the master's watchdog can see it.
        mib, delay = int(query.get("mib", "1")), float(query.get("delay", "0.3"))
        threading.Timer(delay, _keep, args=(mib * MIB,)).start()
    elif path == "/collect":
        gc.collect()
    elif path == "/ping":
        pass
    elif path == "/gc-state":
        # Objects frozen (gc.freeze) are in no generation: get_objects() leaves them out.
        app_collectable = any(o is _kept for o in gc.get_objects())
        return f"frozen {gc.get_freeze_count()} app_collectable {app_collectable}\n".encode()
    else:
        _served[0] += 1
        if _served[0] % LEAK_EVERY == 0 and _served[0] <= LEAK_UNTIL:
            _keep(LEAK_BYTES)
        if REQUEST_SECONDS:
            time.sleep(REQUEST_SECONDS)  # a database call, say
    return f"ok {os.getpid()} {len(_kept)}\n".encode()


def wsgi_app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
    body = _route(environ.get("PATH_INFO", "/"), _query(environ.get("QUERY_STRING", "")))
    start_response("200 OK", [("Content-Type", "text/plain"),
                              ("Content-Length", str(len(body)))])
    return [body]
