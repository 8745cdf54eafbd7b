"""Apps for the body-guard tests: raw ASGI/WSGI echoes, Starlette, FastAPI, Flask.

The ``guarded_*`` objects read their options from ``MEMGUARD_*`` environment variables,
so the real-server tests configure them per server.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

from memguard import MemGuardMiddleware, MemGuardWSGIMiddleware
from memguard.types import Receive, Scope, Send
from tests.support.servers import run_lifespan


async def asgi_echo(scope: Scope, receive: Receive, send: Send) -> None:
    """Answers ``<length> <sha256>`` of the body it read, plus the limit it was told."""
    if scope["type"] == "lifespan":
        await run_lifespan(receive, send)
        return
    digest = hashlib.sha256()
    length = 0
    more = True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        chunk = message.get("body", b"")
        digest.update(chunk)
        length += len(chunk)
        more = message.get("more_body", False)
    limit = scope.get("extensions", {}).get("memguard", {}).get("max_body_size")
    body = f"{length} {digest.hexdigest()} {limit}\n".encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def wsgi_echo(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
    stream = environ["wsgi.input"]
    digest = hashlib.sha256()
    length = 0
    if "CONTENT_LENGTH" in environ or environ.get("wsgi.input_terminated"):
        while True:
            chunk = stream.read(65536)
            if not chunk:
                break
            digest.update(chunk)
            length += len(chunk)
    limit = environ.get("memguard.max_body_size")
    body = f"{length} {digest.hexdigest()} {limit}\n".encode()
    start_response("200 OK", [("Content-Type", "text/plain"),
                              ("Content-Length", str(len(body)))])
    return [body]


guarded_asgi = MemGuardMiddleware(asgi_echo)
guarded_wsgi = MemGuardWSGIMiddleware(wsgi_echo)
