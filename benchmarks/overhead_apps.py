"""The apps ``benchmarks/overhead.py`` compares: a Starlette hello world, bare, behind
memguard's middleware with its defaults, and behind the psutil-per-request anchor (two
``memory_info()`` calls per request, the usual way to measure a request's memory)."""

from __future__ import annotations

from typing import Any

import psutil
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from memguard import MemGuardMiddleware


async def hello(request: Request) -> PlainTextResponse:
    return PlainTextResponse("Hello, world!")


def make_app() -> Starlette:
    return Starlette(routes=[Route("/", hello)])


class PsutilPerRequest:
    """The anchor: RSS before and after every request through psutil."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.process = psutil.Process()
        self.growth = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        before = self.process.memory_info().rss
        try:
            await self.app(scope, receive, send)
        finally:
            self.growth += self.process.memory_info().rss - before


bare = make_app()
guarded = MemGuardMiddleware(make_app())
anchor = PsutilPerRequest(make_app())


class PassThrough:
    """The calibration: a pure ASGI middleware that does nothing."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)


passthrough = PassThrough(make_app())
