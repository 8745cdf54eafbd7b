"""The body guard under the real frameworks and their test clients / httpx transports."""

from __future__ import annotations

import asyncio
import hashlib
import warnings
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from flask import Flask
from flask import request as flask_request
from pydantic import BaseModel
from starlette.applications import Starlette
from starlette.exceptions import StarletteDeprecationWarning
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request as StarletteRequest
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

with warnings.catch_warnings():
    # Starlette 1.x prefers the httpx2 fork for its TestClient; httpx works the same here.
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from fastapi.testclient import TestClient as FastAPIClient
    from starlette.testclient import TestClient

from memguard import MemGuardMiddleware, MemGuardWSGIMiddleware, counters
from memguard.errors import InsufficientStorage

KIB = 1024


@pytest.fixture(autouse=True)
def _fresh_counts() -> None:
    counters.reset()


def chunks(total: int, size: int = 4 * KIB) -> Iterator[bytes]:
    sent = 0
    while sent < total:
        n = min(size, total - sent)
        sent += n
        yield b"z" * n


async def achunks(total: int) -> Any:
    for chunk in chunks(total):
        yield chunk


# ---- Starlette --------------------------------------------------------------------------


async def sl_echo(request: StarletteRequest) -> Response:
    body = await request.body()
    return PlainTextResponse(f"{len(body)}")


async def sl_stream(request: StarletteRequest) -> Response:
    n = 0
    async for chunk in request.stream():
        n += len(chunk)
    return PlainTextResponse(f"{n}")


class SwallowErrors(BaseHTTPMiddleware):
    """A common pattern: turn every exception into a JSON 500."""

    async def dispatch(self, request: StarletteRequest,
                       call_next: RequestResponseEndpoint) -> Response:
        try:
            return await call_next(request)
        except Exception:
            return JSONResponse({"error": "internal"}, status_code=500)


class Passing(BaseHTTPMiddleware):
    async def dispatch(self, request: StarletteRequest,
                       call_next: RequestResponseEndpoint) -> Response:
        response = await call_next(request)
        response.headers["x-passed"] = "1"
        return response


def starlette_app(*middleware: Middleware) -> Starlette:
    return Starlette(routes=[Route("/echo", sl_echo, methods=["POST"]),
                             Route("/stream", sl_stream, methods=["POST"]),
                             Route("/", lambda r: PlainTextResponse("hi"))],
                     middleware=list(middleware))


def test_starlette_add_middleware_within_and_over_the_limit() -> None:
    app = starlette_app()
    app.add_middleware(MemGuardMiddleware, max_body_size="64KiB")
    with TestClient(app) as client:
        assert client.get("/").text == "hi"
        assert client.post("/echo", content=b"a" * 64 * KIB).text == str(64 * KIB)
        r = client.post("/echo", content=b"a" * (64 * KIB + 1))
        assert r.status_code == 413 and r.headers["connection"] == "close"
        r = client.post("/stream", content=chunks(200 * KIB))
        assert r.status_code == 413
        assert client.post("/stream", content=chunks(60 * KIB)).text == str(60 * KIB)


@pytest.mark.parametrize("order", ["guard_outermost", "guard_innermost"])
def test_413_inside_base_http_middleware_stacks_reaches_the_client(order: str) -> None:
    guard = Middleware(MemGuardMiddleware, max_body_size="16KiB")
    stack = [Middleware(SwallowErrors), Middleware(Passing)]
    middleware = [guard, *stack] if order == "guard_outermost" else [*stack, guard]
    with TestClient(starlette_app(*middleware)) as client:
        r = client.post("/echo", content=chunks(100 * KIB))
        assert r.status_code == 413, r.text
        r = client.post("/stream", content=chunks(100 * KIB))
        assert r.status_code == 413, r.text
        ok = client.post("/echo", content=chunks(10 * KIB))
        assert ok.status_code == 200 and ok.text == str(10 * KIB)
        assert ok.headers["x-passed"] == "1"


# ---- FastAPI ----------------------------------------------------------------------------


class Item(BaseModel):
    name: str
    tags: list[str]


def fastapi_app() -> FastAPI:
    app = FastAPI()

    @app.post("/items")
    async def items(item: Item) -> dict[str, int]:
        return {"tags": len(item.tags)}

    @app.post("/raw")
    async def raw(request: Request) -> dict[str, Any]:
        body = await request.body()
        return {"n": len(body), "limit": request.scope["extensions"]["memguard"]
                ["max_body_size"]}

    @app.post("/quota")
    async def quota(request: Request) -> dict[str, int]:
        async for _ in request.stream():
            pass
        raise InsufficientStorage("disk quota exceeded", reason="disk_quota", free=0)

    app.add_middleware(MemGuardMiddleware, routes={"/raw": "256KiB"})
    return app


def test_fastapi_json_is_capped_small_and_never_a_400_or_500() -> None:
    with FastAPIClient(fastapi_app()) as client:
        small = {"name": "a", "tags": ["x"] * 10}
        assert client.post("/items", json=small).json() == {"tags": 10}
        big = b'{"name": "a", "tags": [' + b'"xxxxxxxx",' * 120_000 + b'"x"]}'
        r = client.post("/items", content=big, headers={"content-type": "application/json"})
        assert r.status_code == 413
        # Chunked: FastAPI reads the body itself and turns errors into 400; still 413.
        r = client.post("/items", content=iter([big[i:i + 8192]
                                                for i in range(0, len(big), 8192)]),
                        headers={"content-type": "application/json"})
        assert r.status_code == 413, r.text
        assert counters.get("body", "body_over_limit") == 1


def test_fastapi_route_limit_and_limit_exposed_to_the_app() -> None:
    with FastAPIClient(fastapi_app()) as client:
        r = client.post("/raw", content=b"q" * 1000,
                        headers={"content-type": "application/octet-stream"})
        assert r.json() == {"n": 1000, "limit": 256 * KIB}
        r = client.post("/raw", content=chunks(300 * KIB),
                        headers={"content-type": "application/octet-stream"})
        assert r.status_code == 413


def test_fastapi_app_raised_refusal_is_answered() -> None:
    with FastAPIClient(fastapi_app(), raise_server_exceptions=False) as client:
        r = client.post("/quota", content=b"abc", headers={"accept": "application/json"})
        assert r.status_code == 507
        assert r.headers["content-type"] == "application/problem+json"
        assert r.json()["reason"] == "disk_quota"


# ---- httpx ASGITransport ------------------------------------------------------------------


def test_httpx_asgi_transport() -> None:
    from tests.apps.body_apps import asgi_echo

    app = MemGuardMiddleware(asgi_echo, max_body_size=1000)

    async def main() -> tuple[httpx.Response, httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            ok = await client.post("/", content=b"x" * 1000)
            big = await client.post("/", content=b"x" * 1001)
            return ok, big

    ok, big = asyncio.run(main())
    assert ok.status_code == 200
    assert ok.text.split()[1] == hashlib.sha256(b"x" * 1000).hexdigest()
    assert big.status_code == 413


# ---- Flask ------------------------------------------------------------------------------


def flask_app() -> Flask:
    app = Flask(__name__)

    @app.post("/echo")
    def echo() -> str:
        return str(len(flask_request.get_data()))

    @app.post("/form")
    def form() -> str:
        return str(len(flask_request.form))

    return app


def test_flask_within_over_and_chunked() -> None:
    app = MemGuardWSGIMiddleware(flask_app(), max_body_size="64KiB")
    transport = httpx.WSGITransport(app=app)
    with httpx.Client(transport=transport, base_url="http://t") as client:
        assert client.post("/echo", content=b"a" * 1000).text == "1000"
        r = client.post("/echo", content=b"a" * (64 * KIB + 1))
        assert r.status_code == 413 and "connection" not in r.headers  # PEP 3333
        big_form = "a=" + "b" * (1024 * KIB + 10)
        r = client.post("/form", content=big_form,
                        headers={"content-type": "application/x-www-form-urlencoded"})
        assert r.status_code == 413
        assert client.post("/form", data={"a": "b", "c": "d"}).text == "2"


def test_flask_chunked_body_over_the_limit_replaces_flasks_500() -> None:
    from tests.body_helpers import wsgi_call

    app = MemGuardWSGIMiddleware(flask_app(), max_body_size="64KiB")
    status, headers, body = wsgi_call(
        app, path="/echo", body=b"a" * 100 * KIB,
        environ={"HTTP_TRANSFER_ENCODING": "chunked", "wsgi.input_terminated": True})
    assert status.startswith("413") and b"Internal" not in body
    status, _, body = wsgi_call(
        app, path="/echo", body=b"a" * 10 * KIB,
        environ={"HTTP_TRANSFER_ENCODING": "chunked", "wsgi.input_terminated": True})
    assert status.startswith("200") and body == str(10 * KIB).encode()


# ---- Django -----------------------------------------------------------------------------


def test_django_asgi() -> None:
    from tests.apps.django_app import asgi_application

    app = MemGuardMiddleware(asgi_application, max_body_size="64KiB")

    async def main() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return [await client.post("/echo", content=b"d" * 1000),
                    await client.post("/echo", content=b"d" * (64 * KIB + 1)),
                    await client.post("/echo", content=achunks(100 * KIB))]

    ok, declared, chunked = asyncio.run(main())
    assert ok.status_code == 200 and ok.text.startswith("1000 ")
    assert declared.status_code == 413
    # Django's ASGI handler spools the whole body before any view: memguard cuts it.
    assert chunked.status_code == 413


def test_django_wsgi() -> None:
    from tests.apps.django_app import wsgi_application

    app = MemGuardWSGIMiddleware(wsgi_application, max_body_size="64KiB")
    with httpx.Client(transport=httpx.WSGITransport(app=app), base_url="http://t") as client:
        ok = client.post("/echo", content=b"d" * 1000)
        assert ok.status_code == 200 and ok.text.startswith("1000 ")
        assert client.post("/echo", content=b"d" * (64 * KIB + 1)).status_code == 413
        assert client.get("/nope").status_code == 404


def test_flask_view_uses_the_reject_hook_so_flasks_500_becomes_the_refusal() -> None:
    from flask import request as r

    app = Flask(__name__)

    @app.post("/save")
    def save() -> str:
        r.get_data()
        exc = InsufficientStorage("disk full", reason="disk_full", free=0)
        r.environ["memguard.reject"](exc)
        raise exc

    guarded = MemGuardWSGIMiddleware(app)
    with httpx.Client(transport=httpx.WSGITransport(app=guarded), base_url="http://t") as c:
        resp = c.post("/save", content=b"abc")
    assert resp.status_code == 507 and b"disk full" in resp.content
    assert counters.get("body", "disk_full") == 1


def test_idle_timeout_inside_base_http_middleware_and_task_groups_is_408() -> None:
    from tests.body_helpers import exchange

    app = starlette_app(Middleware(MemGuardMiddleware, body_idle_timeout=0.2),
                        Middleware(SwallowErrors), Middleware(Passing))

    async def main() -> Any:
        slow = await asyncio.wait_for(exchange(
            app, path="/stream", headers=[(b"content-length", b"100")],
            chunks=[b"x" * 10, b"y" * 90], stall_after=1), 10)
        fine = await exchange(app, path="/stream", headers=[(b"content-length", b"3")],
                              chunks=[b"abc"])
        return slow, fine

    slow, fine = asyncio.run(main())
    assert slow.status == 408 and slow.headers[b"connection"] == b"close"
    assert fine.status == 200 and fine.body == b"3"
