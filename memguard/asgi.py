"""The ASGI middleware: memguard's body policy in front of any ASGI app.

```python
app = MemGuardMiddleware(app, max_body_size="16MiB")
app.add_middleware(MemGuardMiddleware, max_body_size="16MiB")   # Starlette, FastAPI
```

A request goes through these phases (:meth:`MemGuardMiddleware.__call__` dispatches:
``_bodyless``, or for a request with a body ``_guarded_body`` with the C extension and
``_with_body`` without; :class:`_Responder` holds the state of a request with a body):

1. **admit**: the cached memory pressure (:mod:`memguard.admission`); under critical
   pressure the request is shed with 503 and ``Retry-After`` before the app sees it.
   Paths the middleware answers itself (readiness, liveness, metrics, leak admin; all
   off by default) are answered here.
2. **frame**: Content-Length / Transfer-Encoding checked, the route's limit found; a
   declared length over it is answered with 413 before the first ``receive()``, so a
   server that sends ``100 Continue`` lazily (uvicorn) never invites the body.
3. **wrap receive**: :class:`memguard.body.ASGIBody` counts real bytes, and every few
   MiB checks that buffering the body will not push the worker past its hard limit.
4. **call app**: ``send`` is wrapped so that a refusal remembered during the request
   replaces whatever response the app or its framework makes of it (a 500, a 400).
5. **after response**: the body's timer is cancelled; the request is counted under its
   route template (:mod:`memguard.tracking`, sampled); a worker over its soft limit asks
   for a graceful recycle.

A request with neither Content-Length nor Transfer-Encoding over HTTP/1 has no body:
it goes to the app untouched (no wrapper, no allocation). Non-``http`` scopes are the
app's own call, with no frame of ours.

When a refusal comes after the app has started its response, a second response cannot
be sent: the rest of the app's messages are dropped and the middleware returns with the
response incomplete, which uvicorn and gunicorn's ``asgi`` worker both answer by closing
the connection (the client sees a truncated response, never a wrong complete one).
"""

from __future__ import annotations

import asyncio
import collections.abc
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from time import monotonic_ns
from typing import Any

from memguard.admission import CRITICAL
from memguard.body import SPEEDUPS, ASGIBody, BodyPolicy, record, refusal_response
from memguard.config import resolve
from memguard.errors import RequestRejected, drop_tracebacks
from memguard.memory import MemoryLayer
from memguard.tracking import asgi_route
from memguard.types import ASGIApp, Message, Receive, Scope, Send

if SPEEDUPS:
    from memguard import _speedups
    from memguard._speedups import Guarded
    from memguard._speedups import guard as _guard
    from memguard._speedups import has_body_framing as _speedups_has_body_framing

    # What __call__ returns is a coroutine to asyncio (iscoroutine, create_task) as an
    # ``async def __call__``'s result would be: it has send, throw, close and __await__.
    collections.abc.Coroutine.register(Guarded)

__all__ = ["MemGuardMiddleware"]

log = logging.getLogger("memguard.body")

_FRAMING = frozenset({b"content-length", b"transfer-encoding"})
_HTTP1 = frozenset({"1.1", "1.0"})
_BODY_HEADERS = frozenset({b"content-length", b"transfer-encoding", b"content-type",
                           b"content-encoding", b"accept"})


def _has_body_framing_python(headers: Iterable[Sequence[bytes]]) -> bool:
    """Whether the headers frame a body (Content-Length or Transfer-Encoding)."""
    for name, _ in headers:
        if name in _FRAMING:
            return True
    return False


# Asked of every request, and most have no body: the C function makes the bodyless
# request 1.7k instructions cheaper than this loop (benchmarks/instructions.py, hello).
_has_body_framing: Callable[[Iterable[Sequence[bytes]]], bool] = (
    _speedups_has_body_framing if SPEEDUPS else _has_body_framing_python)


# With the extension, calling the middleware is C (memguard._speedups.Dispatch): the
# choice of path runs no Python frame. Without it, __call__ is _dispatch.
_MiddlewareBase: type = _speedups.Dispatch if SPEEDUPS else object


class MemGuardMiddleware(_MiddlewareBase):  # type: ignore[misc]
    """ASGI middleware; every keyword is a ``body`` or ``memory`` option of
    :mod:`memguard.config`."""

    def __init__(self, app: ASGIApp, **options: Any) -> None:
        self.app = app
        values = resolve(("body", "memory"), options)
        self.policy = BodyPolicy(values)
        self.memory = MemoryLayer(values)
        self._has_endpoints = self.memory.has_endpoints
        # Django's ASGI handler spools the body to a file before any view runs and
        # closes that file only on http.disconnect: refusals reach it as a disconnect.
        self.disconnect_on_refusal = type(app).__module__.startswith("django.")
        # Servers tell an ASGI 3 app from an ASGI 2 one by
        # ``iscoroutinefunction(app.__call__)`` (uvicorn, hypercorn, Starlette): the
        # instance's ``__call__`` attribute is the coroutine implementation, while
        # calling the instance goes through the class's ``__call__``, which returns the
        # frame-less awaitable. Both run the same phases.
        self.__dict__["__call__"] = self.handle

    def _dispatch(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        """The request, as an awaitable (``__call__``; with the extension the same
        choice is made in C). Not a coroutine function itself, so that a request with a
        body can be awaited without a coroutine frame of ours (:meth:`_guarded_body`),
        and other scopes go to the app untouched."""
        if scope["type"] != "http":
            return self.app(scope, receive, send)
        if self._has_endpoints:
            return self._endpoint_or_request(scope, receive, send)
        return self._request(scope, receive, send)

    def _request(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        """An ``http`` request the middleware does not answer itself."""
        # 2. frame: no Content-Length and no Transfer-Encoding over HTTP/1 is no body.
        if (not _has_body_framing(scope["headers"])
                and scope.get("http_version", "1.1") in _HTTP1):
            return self._bodyless(scope, receive, send)
        if SPEEDUPS:
            return self._guarded_body(scope, receive, send)
        return self._with_body(scope, receive, send)

    if not SPEEDUPS:
        __call__ = _dispatch

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The request as a coroutine function: what ``iscoroutinefunction(app.__call__)``
        looks at (see ``__init__``), and what ``app.__call__(...)`` runs."""
        await self._dispatch(scope, receive, send)

    async def _endpoint_or_request(self, scope: Scope, receive: Receive,
                                   send: Send) -> None:
        """A path the middleware answers itself (readiness, metrics...), or the
        request as :meth:`__call__` would run it without endpoints."""
        handler = self.memory.endpoint(scope["path"])
        if handler is not None:
            await handler.asgi(scope, receive, send)
        else:
            await self._request(scope, receive, send)

    def _admitted(self, scope: Scope, now: int) -> RequestRejected | None:
        """1. admit: a cached pressure level, refreshed every few ms (never per request):
        the refusal under critical pressure, else None."""
        admission = self.memory.admission
        if now - admission._checked_ns >= admission.refresh_ns:
            admission.refresh(now)
        if admission.level >= CRITICAL:
            return admission.admit(scope["method"], scope["path"], now)
        return None

    async def _bodyless(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A request without a body: the hot path. Only a refusal raised by the app
        needs us, and the accounting at the end. Admission is :meth:`_admitted` inline
        (a Python call is a tenth of what the middleware adds to such a request)."""
        memory = self.memory
        now = monotonic_ns()
        admission = memory.admission
        if now - admission._checked_ns >= admission.refresh_ns:
            admission.refresh(now)
        if admission.level >= CRITICAL:
            refusal = admission.admit(scope["method"], scope["path"], now)
            if refusal is not None and await _Responder(self, scope, receive,
                                                        send).refuse_now(refusal):
                return
        sample = memory.begin(now)
        root = scope.get("root_path", "")
        try:
            await self.app(scope, receive, send)
        except RequestRejected as exc:
            await _Responder(self, scope, receive, send).refuse_late(exc)
        finally:
            # memory.end(), its two steps inline: one Python call less per request. The
            # start time serves the request count and the once-a-second tick (late by
            # this request at most); the clock is read again only for the soft-limit
            # check, which runs only when the pressure level is not OK.
            memory.track_end(sample, asgi_route(scope, root), scope["path"], now)
            if admission.level:
                memory.after_response(monotonic_ns())
            elif now >= memory.next_tick:
                memory.after_response(now)

    def _guarded_body(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        """A request with a body, with the C extension: awaited through
        :func:`memguard._speedups.guard`, so that no coroutine frame of ours sits between
        the server and the app, where it would be resumed at every suspension of the
        request's task, once per body chunk (1% of a 64 KiB chunk in
        benchmarks/body_guard.py). The phases are :meth:`_with_body`'s."""
        # Admission, the responder and its framing are written out here rather than
        # called (_admitted, _responder, prepare): after a long upload has evicted them
        # from the caches, each call of ours costs 0.3 to 1 us (measured; more the more
        # objects it touches), and fifteen fewer of them took 9 us off a body request.
        now = monotonic_ns()
        memory = self.memory
        admission = memory.admission
        if now - admission._checked_ns >= admission.refresh_ns:
            admission.refresh(now)
        if admission.level >= CRITICAL:
            refusal = admission.admit(scope["method"], scope["path"], now)
            if refusal is not None:
                return self._with_body(scope, receive, send, now, refusal)  # sent there
        responder = _Responder(self, scope, receive, send, memory.begin(now),
                               scope.get("root_path", ""))
        try:
            prepared = responder.frame(now)
        except BaseException:
            responder.account()
            raise
        if isinstance(prepared, RequestRejected):
            return responder.refuse_framing(prepared)
        # The C receiver, unless the body is decoded (ASGIBody.app_receive).
        return _guard(self.app, responder.app_scope, prepared.receiver()
                      if prepared.decoder is None else prepared.receive, responder.send,
                      _after_body, responder, prepared)

    def _responder(self, scope: Scope, receive: Receive, send: Send,
                   now: int) -> _Responder:
        """A request with a body, admitted: its accounting begins, and its state."""
        return _Responder(self, scope, receive, send, self.memory.begin(now),
                          scope.get("root_path", ""))

    async def _with_body(self, scope: Scope, receive: Receive, send: Send,
                         now: int | None = None,
                         refusal: RequestRejected | None = None) -> None:
        """A request with a body, as a coroutine (the pure-Python path): admitted (unless
        the caller did: ``now`` and its ``refusal``), framed, its receive wrapped, the app
        called, and what it did answered."""
        if now is None:
            now = monotonic_ns()
            refusal = self._admitted(scope, now)
        if refusal is not None and await _Responder(self, scope, receive,
                                                    send).refuse_now(refusal):
            return
        responder = self._responder(scope, receive, send, now)
        prepared = responder.prepare(now)
        if isinstance(prepared, RequestRejected):
            await responder.refuse_framing(prepared)
            return
        # 4. call app
        try:
            await self.app(responder.app_scope, prepared.app_receive, responder.send)
        except BaseException as exc:
            tail = _after_body(exc, responder, prepared)
        else:
            tail = _after_body(None, responder, prepared)
        if tail is not None:
            await tail


def _after_body(exc: BaseException | None, responder: _Responder,
                prepared: ASGIBody) -> Awaitable[None] | None:
    """5. after response, for a request with a body: the refusal to send (an awaitable
    that ends the request after sending it), or the app's own error raised on."""
    try:
        if exc is None:
            refuse = responder.rejection is not None
        elif isinstance(exc, Exception):
            refuse = responder.explains(exc)
        else:
            # Our slow-body timer cancels the task that read the first chunk; when
            # another task reads the body, the cancellation reaches the app elsewhere
            # than in receive(). Any other cancellation is not ours.
            refuse = (isinstance(exc, asyncio.CancelledError)
                      and prepared.cancelled_by_timeout())
    except BaseException:
        responder.end(prepared)
        raise
    if refuse:
        return responder.finish_then_end(prepared)
    responder.end(prepared)
    if exc is not None:
        raise exc
    return None


class _Responder:
    """One request with a body: its state lives here, never on the middleware."""

    __slots__ = ("mw", "scope", "app_scope", "receive", "_send", "started", "rejection",
                 "logged", "replaced", "accept", "sample", "root")

    def __init__(self, mw: MemGuardMiddleware, scope: Scope, receive: Receive,
                 send: Send, sample: Any = None, root: str = "") -> None:
        self.mw = mw
        self.sample = sample  # the accounting's (memguard.tracking), ended with the request
        self.root = root      # root_path as the middleware saw it (asgi_route)
        self.scope = scope
        self.app_scope = scope  # the copy the app gets (the route is found in it)
        self.receive = receive
        self._send = send
        self.started = False          # the app's http.response.start went out
        self.rejection: RequestRejected | None = None
        self.logged: RequestRejected | None = None
        self.replaced = False         # our refusal went out in place of the app's response
        self.accept: bytes | None = None

    def prepare(self, now: int) -> ASGIBody | RequestRejected:
        """:meth:`frame`, with the request's accounting ended if it fails unexpectedly."""
        try:
            return self.frame(now)
        except BaseException:
            self.account()
            raise

    def account(self, prepared: ASGIBody | None = None) -> None:
        """5. after response: the body's timer stops (``prepared``, once framed), and
        the request is counted under the route the app found.

        The app's scope is let go here: its ``reject`` (the memguard extension) is one
        of this responder's methods, so holding it made a reference cycle per request,
        freed only by the cycle collector, and with it the scope and all the app put in
        it (promoted to an older generation when a collection ran during the request).
        So are the refusals' tracebacks (errors.drop_tracebacks)."""
        if prepared is not None:
            prepared.close()
        app_scope, self.app_scope = self.app_scope, self.scope
        if self.logged is not None:
            drop_tracebacks(self.rejection)
            drop_tracebacks(self.logged)
        # MemoryLayer.end(), its two steps inline (one Python call less per request).
        memory = self.mw.memory
        now = monotonic_ns()
        memory.track_end(self.sample, asgi_route(app_scope, self.root), self.scope["path"],
                         now)
        if memory.admission.level or now >= memory.next_tick:
            memory.after_response(now)

    end = account  # the request is over, its body framed

    async def finish_then_end(self, prepared: ASGIBody) -> None:
        try:
            await self.finish_refusal()
        finally:
            self.end(prepared)

    async def refuse_framing(self, exc: RequestRejected) -> None:
        """The request is refused on its headers: the app is never called."""
        try:
            await self.send_refusal(exc)
        finally:
            self.account()  # app_scope is still the scope: frame() refused before copying

    def frame(self, now: int) -> ASGIBody | RequestRejected:
        """2. frame and 3. wrap receive: the body wrapper the app reads through, or the
        refusal to send instead of calling the app (admission ran before)."""
        policy = self.mw.policy
        scope = self.scope
        lengths: list[bytes] = []
        codings: list[bytes] = []
        content_type = encoding = None
        for name, value in scope["headers"]:
            if name in _BODY_HEADERS:
                if name == b"content-length":
                    lengths.append(value)
                elif name == b"transfer-encoding":
                    codings.append(value)
                elif name == b"content-type":
                    content_type = value
                elif name == b"content-encoding":
                    encoding = value if encoding is None else encoding + b"," + value
                else:
                    self.accept = value
        limit = reader_limit = policy.limit_for(scope.get("path", ""), content_type)
        declared: int | None = None
        try:
            declared = policy.declared_length(lengths, codings)
            if declared is not None and limit is not None and declared > limit:
                policy.check_declared(declared, limit)
            decoder = policy.decoder_for(encoding, limit) if encoding is not None else None
        except RequestRejected as exc:
            self.note(exc, policy.report_only)
            if not policy.report_only:
                return exc
            reader_limit, decoder = None, None  # reported once is enough
        # A copy of the scope telling the app the limit that applies (for uploads), and
        # a reject(exc) that makes exc the response whatever the framework does with it.
        # (Written here, not called: see _guarded_body.)
        memguard = {"max_body_size": limit, "reject": self.refused_by_app}
        extensions = scope.get("extensions")
        scope = self.app_scope = {**scope, "extensions": {**extensions, "memguard": memguard}
                                  if extensions else {"memguard": memguard}}
        if decoder is not None:
            scope["headers"] = [(k, v) for k, v in scope["headers"]
                                if k not in (b"content-encoding", b"content-length")]
        memory = self.mw.memory
        return ASGIBody(self.receive, reader_limit, policy, self.reject, decoder,
                        self.mw.disconnect_on_refusal,
                        memory.body_guard(declared, now) if memory.guards_bodies else None)

    def explains(self, exc: Exception) -> bool:
        """The app raised ``exc``: True when a refusal is the answer to send (the app
        raised one, or one was pending and the app failed because of it), False when
        ``exc`` is the app's own error to re-raise."""
        if isinstance(exc, RequestRejected) and self.rejection is None:
            self.refused_by_app(exc)
        return self.rejection is not None

    # ---- refusals ------------------------------------------------------------------

    def note(self, exc: RequestRejected, report_only: bool = False) -> None:
        """Log, count and emit a refusal once."""
        if self.logged is exc:
            return
        self.logged = exc
        record(exc, self.scope.get("method", ""), self.scope.get("path", ""), report_only)

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
            log.warning("response to %s %s had started: connection ends without it (%s)",
                        self.scope.get("method"), self.scope.get("path"), exc.reason)
            return
        await self.send_refusal(exc)

    async def send_refusal(self, exc: RequestRejected) -> None:
        self.replaced = True
        status, headers, body = refusal_response(exc, self.accept)
        await self._send({"type": "http.response.start", "status": status,
                          "headers": [(k.encode("latin-1"), v.encode("latin-1"))
                                      for k, v in headers]})
        await self._send({"type": "http.response.body", "body": body, "more_body": False})

    async def refuse_now(self, exc: RequestRejected) -> bool:
        """A refusal decided before the app ran (memory admission); False when
        report-only lets the request go on."""
        report_only = self.mw.policy.report_only
        self.note(exc, report_only)
        if report_only:
            return False
        for name, value in self.scope["headers"]:
            if name == b"accept":
                self.accept = value
        await self.send_refusal(exc)
        return True

    async def refuse_late(self, exc: RequestRejected) -> None:
        """A refusal raised by the app on a body-less request (no send wrapper there):
        answer it if the server still accepts a response start, else let it end."""
        self.note(exc)
        for name, value in self.scope["headers"]:
            if name == b"accept":
                self.accept = value
        try:
            await self.send_refusal(exc)
        except RuntimeError:
            log.warning("response to %s %s had started: connection ends without it (%s)",
                        self.scope.get("method"), self.scope.get("path"), exc.reason)

    def send(self, message: Message) -> Awaitable[None]:
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
