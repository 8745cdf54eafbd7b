"""Apps that hold a lot of memory in every worker, for `memguard suggest` tests.

Each process keeps ``HOG_MIB`` MiB (default 150) of touched memory: allocated at the first
request (a per-process cache filled lazily, so ``--preload`` cannot share it), or at import
with ``HOG_AT=import``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from tests.support.servers import run_lifespan

HOG_BYTES = int(os.environ.get("HOG_MIB", "150")) * 1024 * 1024
_held: list[bytes] = []


def _hold() -> None:
    if not _held:
        # b"\x01" * n writes every page: an untouched allocation would not count in RSS.
        _held.append(b"\x01" * HOG_BYTES)


if os.environ.get("HOG_AT") == "import":
    _hold()


def wsgi_app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
    _hold()
    body = f"holding {sum(map(len, _held))} bytes in {os.getpid()}\n".encode()
    start_response("200 OK", [("Content-Type", "text/plain"),
                              ("Content-Length", str(len(body)))])
    return [body]


async def asgi_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        await run_lifespan(receive, send)
        return
    _hold()
    body = f"holding {sum(map(len, _held))} bytes in {os.getpid()}\n".encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
