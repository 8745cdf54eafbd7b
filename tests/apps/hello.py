"""The smallest WSGI and ASGI apps, for server fixtures and probes."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from tests.support.servers import run_lifespan


def wsgi_app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
    body = f"hello from {os.getpid()}\n".encode()
    start_response("200 OK", [("Content-Type", "text/plain"),
                              ("Content-Length", str(len(body)))])
    return [body]


async def asgi_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        await run_lifespan(receive, send)
        return
    body = f"hello from {os.getpid()}\n".encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
