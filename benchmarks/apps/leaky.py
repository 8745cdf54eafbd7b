"""Apps that leak, for ``benchmarks/recycle``. ``LEAK_PATTERN`` picks how:

- ``steady``: every request keeps 2 MiB;
- ``bursty``: every 25th request of a process keeps 24 MiB (about 1 MiB per request on
  average, in large steps);
- ``slow``: every request keeps 256 KiB;
- ``none``: requests keep nothing (the reference for ``slow``);
- ``huge``: requests keep nothing, but ``/huge`` grows by 4 MiB every 50 ms (80 MiB/s) up
  to ``HUGE_MIB`` (640 MiB by default: more than the whole group) inside one request.

``BOOT_SECONDS`` is slept at import (an app that loads models), ``REQUEST_SECONDS`` in
each request (a database call). Kept memory is written to (``b"\\x01" * n``): an
untouched allocation would not count.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterable
from typing import Any

MiB = 1024 * 1024
PATTERN = os.environ.get("LEAK_PATTERN", "steady")
HUGE_BYTES = int(os.environ.get("HUGE_MIB", "640")) * MiB
HUGE_STEP = 4 * MiB
HUGE_PAUSE = 0.05

_kept: list[bytes] = []
_served = [0]
REQUEST_SECONDS = float(os.environ.get("REQUEST_SECONDS", "0"))
time.sleep(float(os.environ.get("BOOT_SECONDS", "0")))


def _leak() -> None:
    _served[0] += 1
    if PATTERN == "steady":
        _kept.append(b"\x01" * (2 * MiB))
    elif PATTERN == "bursty" and _served[0] % 25 == 0:
        _kept.append(b"\x01" * (24 * MiB))
    elif PATTERN == "slow":
        _kept.append(b"\x01" * (256 * 1024))


def _body() -> bytes:
    return f"{os.getpid()} {_served[0]} {len(_kept)}\n".encode()


def wsgi_app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
    if environ.get("PATH_INFO") == "/huge":
        grown: list[bytes] = []
        while len(grown) * HUGE_STEP < HUGE_BYTES:
            grown.append(b"\x01" * HUGE_STEP)
            time.sleep(HUGE_PAUSE)
        body = f"grew {len(grown) * HUGE_STEP} bytes\n".encode()
    else:
        if environ.get("PATH_INFO") == "/leak":
            _leak()
            if REQUEST_SECONDS:
                time.sleep(REQUEST_SECONDS)
        body = _body()
    start_response("200 OK", [("Content-Type", "text/plain"),
                              ("Content-Length", str(len(body)))])
    return [body]


async def asgi_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        # Imported here: plain gunicorn's sync workers must not pay for importing
        # memguard at each boot when memguard's own rows have it from their master.
        from tests.support.servers import run_lifespan

        await run_lifespan(receive, send)
        return
    if scope["path"] == "/huge":
        grown: list[bytes] = []
        while len(grown) * HUGE_STEP < HUGE_BYTES:
            grown.append(b"\x01" * HUGE_STEP)
            await asyncio.sleep(HUGE_PAUSE)
        body = f"grew {len(grown) * HUGE_STEP} bytes\n".encode()
    else:
        if scope["path"] == "/leak":
            _leak()
            if REQUEST_SECONDS:
                await asyncio.sleep(REQUEST_SECONDS)
        body = _body()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
