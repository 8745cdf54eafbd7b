"""Apps for the memory tests: a leaking route beside clean ones, a naive body buffer,
a switchable memory ballast for pressure, in Starlette (ASGI) and plain WSGI.

Options come from ``MEMGUARD_*`` environment variables (the tests set them per server).
``wrap_asgi`` / ``wrap_wsgi`` put memguard's memory layer in front of an app.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

from memguard import MemGuardMiddleware, MemGuardWSGIMiddleware
from memguard.memory import MemoryLayer

LEAK_SIZE = int(os.environ.get("TEST_LEAK_SIZE", str(64 * 1024)))

_kept: list[bytes] = []
_ballast: list[bytes] = []


# A body limit well above the 652 MB upload: only the worker's memory can stop it.
BODY_LIMIT = os.environ.get("TEST_MAX_BODY_SIZE", "1GiB")


def wrap_asgi(app: Any) -> MemGuardMiddleware:
    return MemGuardMiddleware(app, max_body_size=BODY_LIMIT)


def wrap_wsgi(app: Any) -> MemGuardWSGIMiddleware:
    return MemGuardWSGIMiddleware(app, max_body_size=BODY_LIMIT)


# ---- Starlette ---------------------------------------------------------------------


async def leak(request: Request) -> PlainTextResponse:
    # A record kept per request, as a cache without eviction keeps them: a few objects,
    # one of them big (b"x" * n writes every page, so RSS really grows).
    _kept.append({"n": len(_kept), "payload": b"x" * LEAK_SIZE,
                  "headers": [f"{k}: {v}" for k, v in request.headers.items()],
                  "path": request.url.path, "query": dict(request.query_params)})
    return PlainTextResponse(f"kept {len(_kept)}")


async def clean(request: Request) -> PlainTextResponse:
    scratch = b"y" * LEAK_SIZE  # as much memory, returned before the response
    return PlainTextResponse(f"item {request.path_params['item_id']} {len(scratch)}")


async def hello(request: Request) -> PlainTextResponse:
    return PlainTextResponse("hello")


async def naive_upload(request: Request) -> PlainTextResponse:
    body = await request.body()  # the naive endpoint: the whole body in memory, twice
    return PlainTextResponse(f"got {len(body)}")


async def streamed_upload(request: Request) -> PlainTextResponse:
    received = 0
    async for chunk in request.stream():  # counted and dropped: memory stays flat
        received += len(chunk)
    return PlainTextResponse(f"streamed {received}")


async def ballast(request: Request) -> PlainTextResponse:
    """POST /ballast?mib=N holds N MiB (0 releases it): pressure on demand."""
    mib = int(request.query_params.get("mib", "0"))
    _ballast.clear()
    if mib:
        _ballast.extend(b"z" * (1 << 20) for _ in range(mib))
    return PlainTextResponse(f"ballast {mib} MiB")


async def stats(request: Request) -> JSONResponse:
    layer = _layer
    assert layer is not None and layer.tracker is not None
    return JSONResponse({"pid": os.getpid(), **layer.tracker.snapshot(),
                         "admission": layer.admission.figures()})


starlette_app = Starlette(routes=[
    Route("/leak", leak),
    Route("/items/{item_id:int}", clean),
    Route("/", hello),
    Route("/upload", naive_upload, methods=["POST"]),
    Route("/stream", streamed_upload, methods=["POST"]),
    Route("/ballast", ballast, methods=["POST"]),
    Route("/_stats", stats),
])

app = wrap_asgi(starlette_app)
_layer: MemoryLayer | None = app.memory


# ---- plain WSGI -----------------------------------------------------------------------


def wsgi_inner(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    path = environ.get("PATH_INFO", "")
    if path == "/upload":
        data = environ["wsgi.input"].read()  # the naive WSGI endpoint: all of it at once
        body = f"got {len(data)}".encode()
    elif path == "/ballast":
        query = dict(p.split("=", 1) for p in environ.get("QUERY_STRING", "").split("&") if p)
        mib = int(query.get("mib", "0"))
        _ballast.clear()
        _ballast.extend(b"z" * (1 << 20) for _ in range(mib))
        body = f"ballast {mib} MiB".encode()
    elif path == "/_stats":
        assert wsgi_app.memory.tracker is not None
        body = json.dumps({"pid": os.getpid(), **wsgi_app.memory.tracker.snapshot()}).encode()
    else:
        body = f"hello from {os.getpid()}".encode()
    start_response("200 OK", [("Content-Type", "text/plain"),
                              ("Content-Length", str(len(body)))])
    return [body]


wsgi_app = wrap_wsgi(wsgi_inner)
