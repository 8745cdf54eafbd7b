"""A standalone-uvicorn app that asks to be recycled once it has kept 60 MiB.

It installs :class:`memguard.recycle.SignalRecycler`, as an app (or the middleware)
does under ``uvicorn --workers N``: the recycle is a SIGTERM to itself, uvicorn drains
and exits, and its supervisor starts a replacement.
"""

from __future__ import annotations

import os
from typing import Any

from memguard import system
from memguard.recycle import SignalRecycler, request_recycle, set_recycler
from tests.support.servers import run_lifespan

MIB = 1 << 20
LIMIT = 60 * MIB
set_recycler(SignalRecycler())
_kept: list[bytes] = []
_baseline = system.current_rss()


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        await run_lifespan(receive, send)
        return
    if scope["path"] == "/leak":
        _kept.append(os.urandom(16) * (10 * MIB // 16))
    body = f"{os.getpid()}\n".encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
    growth = system.current_rss() - _baseline
    if growth > LIMIT:  # after the response: the memory engineer's middleware does this
        request_recycle("soft_limit", growth=growth, limit=LIMIT)
