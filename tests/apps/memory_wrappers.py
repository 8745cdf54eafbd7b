"""A small pure-ASGI/WSGI wrapper around :class:`memguard.memory.MemoryLayer`, for the
memory tests only, used until the body guard middleware (``MemGuardMiddleware``,
``MemGuardWSGIMiddleware``) wires the layer in itself. It follows the middleware's
phases: admit, wrap receive (bodies only), call app, after response.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from time import monotonic_ns
from typing import Any

from memguard import counters
from memguard.errors import RequestRejected
from memguard.memory import MemoryLayer
from memguard.tracking import asgi_route, wsgi_route

log = logging.getLogger("memguard.memory")


def _refusal(exc: RequestRejected) -> tuple[int, list[tuple[str, str]], bytes]:
    counters.increment("admission" if exc.status == 503 else "body", exc.reason)
    log.warning("refused (%s %s): %s", exc.status, exc.reason, exc.figures)
    body = json.dumps({"error": exc.reason, "detail": exc.detail}).encode()
    headers = [("content-type", "application/json"), ("content-length", str(len(body))),
               ("connection", "close"), *exc.headers.items()]
    return exc.status, headers, body


class MemoryOnlyASGI:
    def __init__(self, app: Any, **options: Any) -> None:
        self.app = app
        self.layer = MemoryLayer(**options)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        layer = self.layer
        path = scope["path"]
        if layer.has_endpoints:
            handler = layer.endpoint(path)
            if handler is not None:
                await handler.asgi(scope, receive, send)
                return
        now = monotonic_ns()
        refusal = layer.admit(scope["method"], path, now)
        if refusal is not None:
            await self._send_refusal(send, refusal)
            return
        length = None
        has_body = False
        for name, value in scope["headers"]:
            if name == b"content-length":
                length, has_body = int(value), True
            elif name == b"transfer-encoding":
                has_body = True
        guard = layer.body_guard(length, now) if has_body else None
        state: dict[str, Any] = {"rejected": None, "started": False, "replaced": False}
        if guard is not None:
            inner_receive = receive

            async def receive() -> dict[str, Any]:
                if state["rejected"] is not None:
                    return {"type": "http.disconnect"}
                message: dict[str, Any] = await inner_receive()
                if message["type"] == "http.request":
                    try:
                        guard.chunk(len(message.get("body", b"")))
                    except RequestRejected as exc:
                        state["rejected"] = exc
                        raise
                return message

        inner_send = send

        async def send(message: dict[str, Any]) -> None:
            exc = state["rejected"]
            if exc is None:
                if message["type"] == "http.response.start":
                    state["started"] = True
                await inner_send(message)
            elif not state["replaced"] and not state["started"]:
                state["replaced"] = True
                await self._send_refusal(inner_send, exc)

        sample = layer.begin(now)
        root = scope.get("root_path", "")
        try:
            await self.app(scope, receive, send)
        except RequestRejected as exc:
            state["rejected"] = state["rejected"] or exc
        except Exception:
            if state["rejected"] is None:
                raise
        finally:
            layer.end(sample, asgi_route(scope, root), path, monotonic_ns())
        if state["rejected"] is not None and not state["replaced"] and not state["started"]:
            state["replaced"] = True
            await self._send_refusal(inner_send, state["rejected"])

    @staticmethod
    async def _send_refusal(send: Any, exc: RequestRejected) -> None:
        status, headers, body = _refusal(exc)
        await send({"type": "http.response.start", "status": status,
                    "headers": [(k.encode(), v.encode()) for k, v in headers]})
        await send({"type": "http.response.body", "body": body})


class MemoryOnlyWSGI:
    def __init__(self, app: Any, **options: Any) -> None:
        self.app = app
        self.layer = MemoryLayer(**options)

    def __call__(self, environ: dict[str, Any],
                 start_response: Callable[..., Any]) -> Iterable[bytes]:
        layer = self.layer
        path = environ.get("PATH_INFO", "")
        if layer.has_endpoints:
            handler = layer.endpoint(path)
            if handler is not None:
                result: Iterable[bytes] = handler.wsgi(environ, start_response)
                return result
        now = monotonic_ns()
        refusal = layer.admit(environ["REQUEST_METHOD"], path, now)
        if refusal is not None:
            status, headers, body = _refusal(refusal)
            start_response(f"{status} Refused", headers)
            return [body]
        sample = layer.begin(now)
        try:
            return list(self.app(environ, start_response))
        finally:
            layer.end(sample, wsgi_route(environ), path, monotonic_ns())
