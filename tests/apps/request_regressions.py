"""Apps for tests/test_request_regressions.py: the request-path defects of issue 16,
each served by a real server.

- ``json_app``: FastAPI parsing a JSON body, behind memguard's defaults.
- ``receive_in_task``: a raw ASGI app that awaits ``receive()`` in a task of its own
  (``/wait_for``: ``asyncio.wait_for``; ``/race``: a task per chunk from
  ``ensure_future``, raced against another future with ``asyncio.wait``), behind a 1 s
  body idle timeout.
- ``mounted``: a Starlette app that answers only ``/hello`` (anything else is its 404),
  with memguard's readiness and liveness paths.
- ``memory_app``: ``/leak`` keeps 2 MiB per request, ``/stream`` reads the body chunk
  by chunk and keeps nothing, ``/buffer`` buffers it; the worker's hard limit is its RSS
  at import plus ``MEMGUARD_TEST_HEADROOM`` bytes.
- ``wsgi_buffering``: a WSGI app that buffers its decoded body with ``read()``, with
  decompression on and the same kind of hard limit.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterable
from typing import Annotated, Any

import psutil
from fastapi import Body, FastAPI
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from memguard import MemGuardMiddleware, MemGuardWSGIMiddleware
from memguard.types import Receive, Scope, Send
from tests.support.servers import run_lifespan

MiB = 1024 * 1024
# The worker's hard limit: its RSS once the app is imported, plus this headroom.
HEADROOM = int(os.environ.get("MEMGUARD_TEST_HEADROOM", str(128 * MiB)))


def _hard_limit() -> int:
    return psutil.Process().memory_info().rss + HEADROOM


# ---- 1. JSON parsed by FastAPI ------------------------------------------------------

_api = FastAPI()


@_api.post("/items")
async def items(payload: Annotated[Any, Body()]) -> dict[str, Any]:
    return {"type": type(payload).__name__, "length": len(payload)}


json_app = MemGuardMiddleware(_api)


# ---- 3. receive() awaited in a task of the app's own --------------------------------

async def _next_message(receive: Receive) -> dict[str, Any]:
    return await receive()


async def _read_in_tasks(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        await run_lifespan(receive, send)
        return
    loop = asyncio.get_running_loop()
    received = 0
    more = True
    while more:
        if scope["path"] == "/wait_for":
            # On 3.11, wait_for runs receive() in a task of its own.
            message = await asyncio.wait_for(receive(), 30)
        else:
            # receive() is called in the task (not only awaited there: a receive()
            # that is not a coroutine would be called in the request's own task).
            reading = asyncio.ensure_future(_next_message(receive))
            never = loop.create_future()
            await asyncio.wait({reading, never}, timeout=30,
                               return_when=asyncio.FIRST_COMPLETED)
            never.cancel()
            message = reading.result()
        if message["type"] != "http.request":
            return
        received += len(message.get("body", b""))
        more = message.get("more_body", False)
    body = f"{received}\n".encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


receive_in_task = MemGuardMiddleware(_read_in_tasks, body_idle_timeout=1)


# ---- 13. mounted under a prefix -------------------------------------------------------

async def _hello(request: Request) -> PlainTextResponse:
    return PlainTextResponse("hello\n")


mounted = MemGuardMiddleware(Starlette(routes=[Route("/hello", _hello)]),
                             readiness_path="/readyz", liveness_path="/livez")


# ---- 16. a streaming upload beside a leaking route --------------------------------------

_leaked: list[bytes] = []


async def _leak(request: Request) -> PlainTextResponse:
    _leaked.append(b"L" * (2 * MiB))  # written, so resident
    return PlainTextResponse(f"{len(_leaked)}\n")


async def _stream(request: Request) -> PlainTextResponse:
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
    return PlainTextResponse(f"{received}\n")


async def _buffer(request: Request) -> PlainTextResponse:
    return PlainTextResponse(f"{len(await request.body())}\n")


async def _rss(request: Request) -> PlainTextResponse:
    return PlainTextResponse(f"{psutil.Process().memory_info().rss}\n")


memory_app = MemGuardMiddleware(
    Starlette(routes=[Route("/leak", _leak, methods=["POST"]),
                      Route("/stream", _stream, methods=["POST"]),
                      Route("/buffer", _buffer, methods=["POST"]),
                      Route("/rss", _rss)]),
    max_body_size="1GiB", worker_memory_hard_limit=_hard_limit())


# ---- 6. WSGI: a decoded body buffered by the app ----------------------------------------

def _buffering(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
    body = environ["wsgi.input"].read()
    answer = f"{len(body)}\n".encode()
    start_response("200 OK", [("Content-Type", "text/plain"),
                              ("Content-Length", str(len(answer)))])
    return [answer]


wsgi_buffering = MemGuardWSGIMiddleware(
    _buffering, decompress=True, max_body_size="1GiB", max_decompression_ratio=100000,
    worker_memory_hard_limit=_hard_limit())
