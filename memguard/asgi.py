"""The ASGI middleware: memguard's body policy and memory layer in front of any ASGI app.

```python
app = MemGuardMiddleware(app, max_body_size="16MiB")
app.add_middleware(MemGuardMiddleware, max_body_size="16MiB")   # Starlette, FastAPI
```

A request goes through these phases, top to bottom in :meth:`MemGuardMiddleware.__call__`:

1. **admit**: the cached memory pressure (:meth:`memguard.memory.MemoryLayer.admit`);
   under critical pressure the request is shed with 503 and ``Retry-After`` before the
   app sees it. Paths the middleware answers itself (readiness, liveness, metrics, leak
   admin; all off by default) are answered here.
2. **frame** (requests with a body, :class:`_Request`): Content-Length and
   Transfer-Encoding checked, the route's limit found; a declared length over it is
   answered with 413 before the first ``receive()``, so a server that sends
   ``100 Continue`` lazily (uvicorn) never invites the body.
3. **wrap receive** (:class:`_Body`): real bytes counted, slow bodies timed
   (:mod:`memguard.slowbody`), the worker's memory checked every few MiB.
4. **call app**: ``send`` is wrapped so that a refusal remembered during the request
   replaces whatever response the app or its framework makes of it (a 500, a 400).
5. **end**: the request is counted under its route template; a worker over its soft
   limit asks for a graceful recycle.

A request with neither Content-Length nor Transfer-Encoding over HTTP/1 has no body: it
goes to the app with its own ``receive`` and ``send``. Non-``http`` scopes are the app's
own call.

Paths (route limits, the middleware's own endpoints) are the app's own: without the
``root_path`` prefix it is mounted at, as its router sees them.

When a refusal comes after the app has started its response, a second response cannot
be sent: the rest of the app's messages are dropped and the middleware returns with the
response incomplete, which servers answer by closing the connection (the client sees a
truncated response, never a wrong complete one).
"""

from __future__ import annotations

import asyncio
import sys
from time import monotonic, monotonic_ns
from typing import Any

from memguard.config import resolve
from memguard.errors import MalformedRequest, RequestRejected, RequestTimeout, drop_tracebacks
from memguard.eventloops import under_trio
from memguard.http import (
    BODY_HEADERS,
    LINGER_BYTES,
    LINGER_SECONDS,
    RequestHead,
    log,
    record,
    refusal_response,
)
from memguard.limits import BodyCounter, BodyPolicy, declared_over_limit
from memguard.memory import ROUTE_KEY, MemoryLayer
from memguard.slowbody import BodyTimer
from memguard.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["MemGuardMiddleware"]

_FRAMING = frozenset({b"content-length", b"transfer-encoding"})
_HTTP1 = frozenset({"1.1", "1.0"})


def app_path(path: str, root_path: str) -> str:
    """The path as the app's router sees it: without the prefix it is mounted at (ASGI
    servers include ``root_path`` in ``path``; some older ones do not)."""
    if root_path and path.startswith(root_path):
        rest = path[len(root_path):]
        if not rest or rest[0] == "/":
            return rest or "/"
    return path


class MemGuardMiddleware:
    """ASGI middleware; every keyword is a ``body`` or ``memory`` option of
    :mod:`memguard.config`."""

    def __init__(self, app: ASGIApp, **options: Any) -> None:
        self.app = app
        values = resolve(("body", "memory"), options)
        self.policy = BodyPolicy(values)
        self.memory = MemoryLayer(values)
        # Django's ASGI handler spools the body to a file before any view runs and
        # closes that file only on http.disconnect: refusals reach it as a disconnect.
        self.disconnect_on_refusal = type(app).__module__.startswith("django.")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        memory = self.memory
        root = scope.get("root_path", "")
        if memory.has_endpoints:
            path = scope["path"]
            own_path = app_path(path, root)
            handler = memory.endpoint(own_path)
            if handler is not None:
                # The handlers answer by path (liveness or readiness, the admin's
                # action): they get the app's own.
                await handler.asgi({**scope, "path": own_path} if own_path != path
                                   else scope, receive, send)
                return
        # 1. admit (memguard.memory.MemoryLayer's per-request protocol)
        now = monotonic_ns()
        seq = next(memory.starts)
        sample = memory.start(seq, now) if now >= memory.due else None
        app_scope = scope
        try:
            if memory.shedding:
                refusal = memory.admit(scope["method"], scope["path"], now)
                if refusal is not None and await _refuse_before_app(self, scope, send,
                                                                    refusal):
                    return
            for name, _ in scope["headers"]:
                if name in _FRAMING:
                    break
            else:
                if scope.get("http_version", "1.1") in _HTTP1:
                    # No body: the app gets the server's own receive and send.
                    try:
                        await self.app(scope, receive, send)
                    except RequestRejected as exc:
                        await _refuse_after_app(self, scope, send, exc)
                    return
            # 2.-4. a request with a body
            request = _Request(self, scope, receive, send)
            try:
                await request.run(now)
            finally:
                app_scope = request.app_scope
                request.release()
        finally:
            # 5. end: the request's route key (memguard.memory.routes.RouteKey), built here
            # rather than in a function: on a server each Python call of ours per
            # request costs cache misses (benchmarks/end_to_end.py). The common case, a
            # routed request outside a Mount, is its template itself.
            route = app_scope.get("route")
            key = getattr(route, "path_format", None)
            if key.__class__ is not str or app_scope.get("root_path") is not root:
                key = (None if route is None else getattr(route, "path_format", False),
                       app_scope.get(ROUTE_KEY), app_scope.get("root_path"), root,
                       scope["path"])
            memory.completed.append(key)
            if sample is not None or memory.pressed:
                memory.end(sample, key)


async def _refuse_before_app(mw: MemGuardMiddleware, scope: Scope, send: Send,
                             exc: RequestRejected) -> bool:
    """A refusal decided before the app ran (memory admission); False when report-only
    lets the request go on."""
    report_only = mw.policy.report_only
    record(exc, scope["method"], scope["path"], report_only)
    if report_only:
        return False
    await _send_response(send, exc, _accept(scope))
    drop_tracebacks(exc)
    return True


async def _refuse_after_app(mw: MemGuardMiddleware, scope: Scope, send: Send,
                            exc: RequestRejected) -> None:
    """A refusal the app raised on a bodyless request: answered if the server still
    accepts a response start, else the connection ends."""
    record(exc, scope["method"], scope["path"], False)
    try:
        await _send_response(send, exc, _accept(scope))
    except RuntimeError:
        log.warning("response to %s had started: connection ends without it (%s)",
                    scope["method"], exc.reason)
    drop_tracebacks(exc)


def _accept(scope: Scope) -> bytes | None:
    for name, value in scope["headers"]:
        if name == b"accept":
            return bytes(value)
    return None


async def _send_response(send: Send, exc: RequestRejected, accept: bytes | None,
                         more_body: bool = False) -> None:
    status, headers, body = refusal_response(exc, accept, close=True)
    await send({"type": "http.response.start", "status": status,
                "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]})
    await send({"type": "http.response.body", "body": body, "more_body": more_body})


class _Request:
    """One request with a body: its state lives here, never on the middleware."""

    __slots__ = ("mw", "scope", "app_scope", "_send", "receive", "head", "body",
                 "started", "rejection", "logged", "replaced")

    def __init__(self, mw: MemGuardMiddleware, scope: Scope, receive: Receive,
                 send: Send) -> None:
        self.mw = mw
        self.scope = scope
        self.app_scope = scope  # the copy the app gets (its router records the route there)
        self.receive = receive
        self._send = send
        self.head = RequestHead()
        self.body: _Body | None = None
        self.started = False         # the app's http.response.start went out
        self.rejection: RequestRejected | None = None
        self.logged: RequestRejected | None = None
        self.replaced = False        # our refusal went out in place of the app's response

    async def run(self, now: int) -> None:
        mw = self.mw
        policy = mw.policy
        scope = self.scope
        head = self.head
        for name, value in scope["headers"]:
            if name in BODY_HEADERS:
                head.add(name, value)
        limit = reader_limit = policy.limit_for(
            app_path(scope["path"], scope.get("root_path", "")), head.content_type)
        declared: int | None = None
        decoder = None
        try:
            declared = head.declared_length()
            if declared is not None and limit is not None and declared > limit:
                raise declared_over_limit(declared, limit)
            decoder = policy.decoder_for(head.encoding, limit)
        except RequestRejected as exc:
            self.note(exc, policy.report_only)
            if not policy.report_only:
                await self.send_refusal(exc)
                return
            reader_limit = None  # reported once is enough
        # The app's copy of the scope tells it the limit that applies (for uploads), and
        # gives it reject(exc), which makes exc the response whatever the framework does.
        memguard = {"max_body_size": limit, "reject": self.refused_by_app}
        extensions = scope.get("extensions")
        app_scope = self.app_scope = {
            **scope, "extensions": {**extensions, "memguard": memguard}
            if extensions else {"memguard": memguard}}
        if decoder is not None:
            app_scope["headers"] = [(k, v) for k, v in scope["headers"]
                                    if k not in (b"content-encoding", b"content-length")]
        memory = mw.memory
        body = self.body = _Body(self, reader_limit, decoder,
                                 memory.body_guard(declared, now))
        # 4. call app
        try:
            await mw.app(app_scope, body.receive if decoder is None else body.receive_decoded,
                         self.send)
        except Exception as exc:
            if isinstance(exc, RequestRejected) and self.rejection is None:
                self.refused_by_app(exc)
            if self.rejection is None:
                raise
        finally:
            body.close()
        if self.rejection is not None:
            await self.finish_refusal()

    def release(self) -> None:
        """The request is over: no reference cycle may outlive it. The app's scope holds
        ``reject`` (one of this request's methods), the body wrapper holds the request;
        both are let go, and so are the refusals' tracebacks."""
        self.app_scope = self.scope
        self.body = None
        drop_tracebacks(self.rejection)
        drop_tracebacks(self.logged)

    # ---- refusals ------------------------------------------------------------------

    def note(self, exc: RequestRejected, report_only: bool = False) -> None:
        """Log, count and emit a refusal once."""
        if self.logged is exc:
            return
        self.logged = exc
        record(exc, self.scope["method"], self.scope["path"], report_only)

    def reject(self, exc: RequestRejected) -> None:
        """A refusal found by the body wrapper: remember it (report-only: just note it)."""
        report_only = self.mw.policy.report_only
        self.note(exc, report_only)
        if not report_only and self.rejection is None:
            self.rejection = exc

    def refused_by_app(self, exc: RequestRejected) -> None:
        """A refusal the app raised or handed to the ``reject`` hook: it has happened
        already, so it is answered even in report-only mode."""
        self.note(exc)
        if self.rejection is None:
            self.rejection = exc

    async def finish_refusal(self) -> None:
        exc = self.rejection
        assert exc is not None
        if self.replaced:
            return
        if self.started:
            log.warning("response to %s had started: connection ends without it (%s)",
                        self.scope["method"], exc.reason)
            return
        await self.send_refusal(exc)

    async def send_refusal(self, exc: RequestRejected) -> None:
        """Our answer, then, while the client may still be sending the body, a bounded
        drain of it, so that it reads the answer rather than a reset."""
        self.replaced = True
        body = self.body
        # A timed-out body is not arriving, nor is the rest of one that has ended. One
        # refused on its headers is on its way, unless the client waits for 100 Continue
        # (a drain would send it) or its framing is in doubt.
        if isinstance(exc, RequestTimeout) or (
                not body.more if body is not None
                else self.head.expects_continue or isinstance(exc, MalformedRequest)):
            await _send_response(self._send, exc, self.head.accept)
            return
        await _send_response(self._send, exc, self.head.accept, more_body=True)
        try:
            await _drain(self.receive)
        finally:
            await self._send({"type": "http.response.body", "body": b"",
                              "more_body": False})

    def send(self, message: Message) -> Any:
        """The app's ``send``: while no refusal is pending, the server's own awaitable,
        with no coroutine frame of ours per response message."""
        if self.rejection is None:
            if message["type"] == "http.response.start":
                self.started = True
            return self._send(message)
        return self._send_refused(message)

    async def _send_refused(self, message: Message) -> None:
        # A refusal is pending: the app's response (often a 500 or 400 made of our
        # exception by a framework) is replaced by it, or dropped if one went out.
        if self.replaced or self.started:
            return
        if message["type"] == "http.response.start":
            assert self.rejection is not None
            await self.send_refusal(self.rejection)


async def _drain(receive: Receive) -> None:
    """Read and discard the rest of a refused body: at most LINGER_BYTES, for at most
    LINGER_SECONDS (under asyncio or trio; elsewhere nothing is drained)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        if under_trio():
            await _drain_trio(receive)
        return
    deadline = monotonic() + LINGER_SECONDS
    drained = 0
    while drained < LINGER_BYTES:
        left = deadline - monotonic()
        if left <= 0:
            return
        try:
            message = await asyncio.wait_for(receive(), left)
        except (asyncio.TimeoutError, OSError, RuntimeError):
            return
        size = _drained(message)
        if size < 0:
            return
        drained += size


def _drained(message: Message) -> int:
    """The size of a drained body chunk, or -1 once the body (or the request) is over."""
    if message.get("type") != "http.request":
        return -1
    size = len(message.get("body", b""))
    return size if message.get("more_body", False) else -1


async def _drain_trio(receive: Receive) -> None:
    import trio

    drained = 0
    with trio.move_on_after(LINGER_SECONDS):
        while drained < LINGER_BYTES:
            try:
                message = await receive()
            except (OSError, RuntimeError):
                return
            size = _drained(message)
            if size < 0:
                return
            drained += size


class _Body:
    """Wraps one request's ``receive``: counts real bytes, times slow bodies, checks the
    worker's memory every few MiB, decodes when asked. A refusal is raised into the app
    *and* remembered by the request, so that whatever the app or its framework does with
    the exception, the client gets the refusal."""

    __slots__ = ("request", "_receive", "counter", "decoder", "memory", "memory_at",
                 "held", "timer", "done", "error", "disconnect", "more")

    def __init__(self, request: _Request, limit: int | None, decoder: Any,
                 memory: Any) -> None:
        self.request = request
        self._receive = request.receive
        self.counter = BodyCounter(limit)
        self.decoder = decoder
        # memguard.memory.admission.BodyMemoryGuard: the worker's memory against its hard
        # limit, read every few MiB (None: no hard limit).
        self.memory = memory
        self.memory_at = memory.next_check if memory is not None else sys.maxsize
        # Chunks handed to the app, kept to see whether it still holds them at the next
        # memory check (it buffers the body) or let go of them (it streams it).
        self.held: list[bytes] = []
        policy = request.mw.policy
        self.timer = (BodyTimer(policy, self.counter, request.reject)
                      if policy.timed else None)
        self.done = False
        # The server has more of the body to give (its last message's more_body): a
        # refused body is drained only then, and decoding may still hand out pieces
        # after the last one arrived.
        self.more = True
        self.error: RequestRejected | None = None
        # True: a refusal reaches the app as http.disconnect instead of an exception
        # (Django's ASGI handler leaks its spooled body file on any other exception).
        self.disconnect = request.mw.disconnect_on_refusal

    async def _wait(self) -> Message:
        """The server's next message, with the slow-body timer around the wait."""
        timer = self.timer
        if timer is None:
            return await self._receive()
        if not timer.enter():
            if timer.trio_timed:
                try:
                    return await timer.trio_receive(self._receive)
                except RequestTimeout as exc:
                    return self._refuse(exc)
            self.timer = None
            return await self._receive()
        try:
            return await self._receive()
        except asyncio.CancelledError:
            timeout = timer.cancelled()
            if timeout is None:
                raise
            return self._refuse(timeout)
        finally:
            timer.leave()

    async def receive(self) -> Message:
        if self.done:
            if self.error is not None:
                return self._signal(self.error)
            return await self._receive()
        message = await self._wait()
        if self.done or message["type"] != "http.request":
            self._finish()
            return message
        chunk = message.get("body", b"")
        if not message.get("more_body", False):
            self.more = False
        try:
            self.counter.add(len(chunk))
            if self.counter.received >= self.memory_at:
                self._check_memory(chunk)
        except RequestRejected as exc:
            if self.request.mw.policy.report_only:
                self.request.reject(exc)
                self.counter.limit = self.memory = None
                self.memory_at = sys.maxsize
            else:
                return self._refuse(exc)
        if not self.held and chunk:
            self.held.append(chunk)
        if not self.more:
            self._finish()
        return message

    async def receive_decoded(self) -> Message:
        decoder = self.decoder
        if self.done:
            if self.error is not None:
                return self._signal(self.error)
            return await self._receive()
        try:
            if decoder.pending:
                out = decoder.feed(b"")
                more = self.more
            else:
                message = await self._wait()
                if self.done or message["type"] != "http.request":
                    self._finish()
                    return message
                data = message.get("body", b"")
                self.counter.add(len(data))
                out = decoder.feed(data)
                more = self.more = message.get("more_body", False)
            if self.counter.received >= self.memory_at or (
                    self.memory is not None and decoder.decoded >= self.memory_at):
                # What the app may buffer is the decoded size.
                self._check_memory(out, decoder.decoded)
            more = more or decoder.pending
            if not more:
                decoder.finish()
                self._finish()
            return {"type": "http.request", "body": out, "more_body": more}
        except RequestRejected as exc:
            if not self.request.mw.policy.report_only:
                return self._refuse(exc)
            self.request.reject(exc)
            self.counter.limit = self.memory = None
            self.memory_at = sys.maxsize
            decoder.lift_limits()
            return {"type": "http.request", "body": b"", "more_body": True}

    def _check_memory(self, chunk: bytes, received: int | None = None) -> None:
        """A memory check is due: does the app still hold the chunks it was handed?"""
        held = self.held
        buffered: bool | None = None
        if held:
            # A held chunk's references: the list, the loop variable, the call's argument.
            buffered = any(sys.getrefcount(c) > 3 for c in held)
        if chunk:
            held.append(chunk)
            if len(held) > 4:
                del held[0]
        assert self.memory is not None
        self.memory_at = self.memory.reached(
            self.counter.received if received is None else received, buffered)

    def _refuse(self, exc: RequestRejected) -> Message:
        self.request.reject(exc)
        self.error = exc
        self._finish()
        return self._signal(exc)

    def _signal(self, exc: RequestRejected) -> Message:
        if self.disconnect:
            return {"type": "http.disconnect"}
        raise exc

    def _finish(self) -> None:
        self.done = True
        self.held.clear()
        if self.timer is not None:
            self.timer.close()

    def close(self) -> None:
        """The app has returned: the timer stops, the chunks are let go."""
        self.held.clear()
        if self.timer is not None:
            self.timer.close()
            self.timer = None
