"""The hello worlds ``benchmarks/end_to_end.py`` serves: bare, behind a do-nothing
middleware (the floor), and behind memguard with every default; ASGI (Starlette) and
WSGI (Flask), plus a Starlette app that streams a request body and counts it."""

from __future__ import annotations

from typing import Any

from flask import Flask
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from memguard import MemGuardMiddleware, MemGuardWSGIMiddleware


async def hello(request: Request) -> PlainTextResponse:
    return PlainTextResponse("Hello, world!")


async def stream(request: Request) -> PlainTextResponse:
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
    return PlainTextResponse(str(size))


def starlette_app() -> Starlette:
    return Starlette(routes=[Route("/", hello), Route("/", stream, methods=["POST"])])


class PassThrough:
    """ASGI middleware that does nothing."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)


class WSGIPassThrough:
    """WSGI middleware that does nothing."""

    def __init__(self, app: Any) -> None:
        self.app = app

    def __call__(self, environ: Any, start_response: Any) -> Any:
        return self.app(environ, start_response)


def flask_app() -> Flask:
    app = Flask(__name__)

    @app.get("/")
    def index() -> str:
        return "Hello, world!"

    return app


bare = starlette_app()
passthrough = PassThrough(starlette_app())
guarded = MemGuardMiddleware(starlette_app())
streaming_bare = starlette_app()
streaming_guarded = MemGuardMiddleware(starlette_app(), max_body_size="128MiB")
flask_bare = flask_app()
flask_passthrough = WSGIPassThrough(flask_app())
flask_guarded = MemGuardWSGIMiddleware(flask_app())
# Without the per-request accounting: where its share of the cost shows.
guarded_untracked = MemGuardMiddleware(starlette_app(), track_memory=False)
guarded_s50 = MemGuardMiddleware(starlette_app(), memory_sample_interval=0.05)
flask_guarded_untracked = MemGuardWSGIMiddleware(flask_app(), track_memory=False)
