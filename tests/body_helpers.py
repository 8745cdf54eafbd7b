"""A direct ASGI/WSGI harness for the body-guard tests: exact control of chunks, timing
and what the app saw (no transport in between)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import io
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from memguard.types import ASGIApp, Message, Receive


@dataclass
class Exchange:
    status: int | None = None
    headers: dict[bytes, bytes] = field(default_factory=dict)
    body: bytes = b""
    complete: bool = False
    messages: list[Message] = field(default_factory=list)
    receive_calls: int = 0
    delivered: int = 0  # body bytes the fake server handed out


async def exchange(
    app: ASGIApp, method: str = "POST", path: str = "/", *,
    headers: Sequence[tuple[bytes, bytes]] = (), chunks: Sequence[bytes] = (),
    delay: float = 0.0, stall_after: int | None = None, http_version: str = "1.1",
    scope_extra: dict[str, Any] | None = None, receive: Receive | None = None,
) -> Exchange:
    """Run one request through ``app``; ``chunks`` arrive ``delay`` seconds apart, and
    after ``stall_after`` chunks the client goes silent. ``receive`` replaces that fake
    server's receive altogether (for servers that behave otherwise)."""
    ex = Exchange()
    pending = list(chunks)
    scope: dict[str, Any] = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": http_version,
        "method": method, "scheme": "http", "path": path, "raw_path": path.encode(),
        "query_string": b"", "root_path": "", "headers": list(headers),
        "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80), **(scope_extra or {}),
    }
    sent = 0

    async def fake_receive() -> Message:
        nonlocal sent
        ex.receive_calls += 1
        if stall_after is not None and sent >= stall_after:
            await asyncio.sleep(3600)
        if not pending:
            if sent == 0 and not chunks:
                sent += 1
                return {"type": "http.request", "body": b"", "more_body": False}
            await asyncio.sleep(3600)
        if delay and sent:
            await asyncio.sleep(delay)
        chunk = pending.pop(0)
        sent += 1
        ex.delivered += len(chunk)
        return {"type": "http.request", "body": chunk, "more_body": bool(pending)}

    async def send(message: Message) -> None:
        ex.messages.append(message)
        if message["type"] == "http.response.start":
            assert ex.status is None, "second response start"
            ex.status = message["status"]
            ex.headers = dict(message.get("headers", []))
        elif message["type"] == "http.response.body":
            assert ex.status is not None
            assert not ex.complete, "body after the end of the response"
            ex.body += message.get("body", b"")
            ex.complete = not message.get("more_body", False)

    await app(scope, receive if receive is not None else fake_receive, send)
    return ex


def run(app: ASGIApp, *args: Any, **kwargs: Any) -> Exchange:
    return asyncio.run(exchange(app, *args, **kwargs))


def wsgi_call(app: Any, method: str = "POST", path: str = "/", body: bytes = b"",
              environ: dict[str, Any] | None = None) -> tuple[str, dict[str, str], bytes]:
    """Call a WSGI app as a strict server would (start_response replacement rules)."""
    env: dict[str, Any] = {
        "REQUEST_METHOD": method, "PATH_INFO": path, "SCRIPT_NAME": "", "QUERY_STRING": "",
        "SERVER_NAME": "test", "SERVER_PORT": "80", "SERVER_PROTOCOL": "HTTP/1.1",
        "wsgi.input": io.BytesIO(body), "wsgi.errors": io.StringIO(),
        "wsgi.url_scheme": "http", "wsgi.version": (1, 0), "wsgi.multithread": False,
        "wsgi.multiprocess": False, "wsgi.run_once": False,
    }
    env.update(environ or {})
    state: dict[str, Any] = {"sent": False}

    def start_response(status: str, headers: list[tuple[str, str]],
                       exc_info: Any = None) -> Any:
        if exc_info is not None:
            if state["sent"]:
                raise exc_info[1].with_traceback(exc_info[2])
        elif "status" in state:
            raise AssertionError("start_response called twice without exc_info")
        state["status"], state["headers"] = status, dict((k.lower(), v) for k, v in headers)
        return lambda data: None

    result = app(env, start_response)
    out = b""
    try:
        for chunk in result:
            if chunk:
                state["sent"] = True
            out += chunk
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()
    return state["status"], state["headers"], out


def gzip_bomb(mib: int) -> bytes:
    """``mib`` MiB of zeros, gzipped (about 1 KiB per MiB), built without ever holding
    the inflated bytes."""
    import zlib

    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    zeros = bytes(1 << 20)
    parts = [packer.compress(zeros) for _ in range(mib)]
    parts.append(packer.flush())
    return b"".join(parts)


@contextlib.contextmanager
def cyclic_garbage() -> Iterator[list[str]]:
    """What the block leaves for the cycle collector: the type names of the objects no
    longer reachable when it ends, in the list it yields (filled then). The collector is
    off during the block, so nothing is freed behind the count."""
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    left: list[str] = []
    try:
        yield left
        gc.collect()
        left.extend(sorted({type(o).__name__ for o in gc.garbage}))
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
