"""The WSGI middleware: memguard's body policy in front of any WSGI app.

```python
wsgi = MemGuardWSGIMiddleware(wsgi, max_body_size="16MiB")
```

The phases are those of :mod:`memguard.asgi`, in WSGI terms (see :class:`_Request`):
admit (the cached memory pressure: 503 under critical pressure), frame (Content-Length
checked before anything is read; over the limit: 413), wrap ``wsgi.input``
(:class:`memguard.body.WSGIInput`, which also checks the worker's memory every few MiB),
call the app with a wrapped ``start_response``, and after the response (the returned
iterable's ``close()``). The request is accounted under its route template as soon as
the app returns its iterable (Flask's rule is recorded by a hook installed here; Django
needs ``memguard.tracking.DjangoRouteMiddleware``).

A request with neither Content-Length nor Transfer-Encoding has no body and goes to the
app untouched. A chunked body is read only when the server sets ``wsgi.input_terminated``
(gunicorn does); otherwise it cannot be read safely and is answered with 411.

A refusal raised while the app runs replaces the app's response (``start_response`` is
held back when the refusal is already known, or called again with ``exc_info`` while
the headers are unsent). When the headers are already on the wire, the refusal is raised
to the server, which ends the connection (gunicorn logs "Error handling request" and
closes the socket).

``Connection: close`` is sent with refusals except to wsgiref (which forbids hop-by-hop
headers from apps). gunicorn drops that header from WSGI apps but ends the connection
itself after a refused body: the sync worker closes every connection, and gthread drains
at most 64 KiB of an unread body before it closes instead of keeping the connection
alive. For a body refused mid-stream under gunicorn, the idle timeout is left on the
socket, so that drain cannot hang on a client that went silent.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator
from time import monotonic_ns
from types import TracebackType
from typing import Any

from memguard.admission import CRITICAL
from memguard.body import BodyPolicy, WSGIInput, record, refusal_response
from memguard.config import resolve
from memguard.errors import LengthRequired, RequestRejected, drop_tracebacks
from memguard.memory import MemoryLayer
from memguard.tracking import ROUTE_KEY, install_flask_route_hook

__all__ = ["MemGuardWSGIMiddleware"]

Environ = dict[str, Any]
ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]
StartResponse = Callable[..., Callable[[bytes], object]]
WSGIApp = Callable[[Environ, StartResponse], Iterable[bytes]]


class MemGuardWSGIMiddleware:
    """WSGI middleware; every keyword is a ``body`` or ``memory`` option of
    :mod:`memguard.config`."""

    def __init__(self, app: WSGIApp, **options: Any) -> None:
        self.app = app
        values = resolve(("body", "memory"), options)
        self.policy = BodyPolicy(values)
        self.memory = MemoryLayer(values)
        if self.memory.tracker is not None:
            install_flask_route_hook(app)

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        memory = self.memory
        path = environ.get("PATH_INFO", "")
        if memory.has_endpoints:
            handler = memory.endpoint(path)
            if handler is not None:
                answer: Iterable[bytes] = handler.wsgi(environ, start_response)
                return answer
        # 1. admit: a cached pressure level, refreshed every few ms (never per request).
        now = monotonic_ns()
        admission = memory.admission
        if now - admission._checked_ns >= admission.refresh_ns:
            admission.refresh(now)
        if admission.level >= CRITICAL:
            refusal = admission.admit(environ.get("REQUEST_METHOD", ""), path, now)
            if refusal is not None:
                request = _Request(self, environ, start_response)
                request.note(refusal, self.policy.report_only)
                if not self.policy.report_only:
                    return request.refusal(refusal)
        sample = memory.begin(now)
        try:
            # 2. frame: no Content-Length and no Transfer-Encoding is no body.
            if "CONTENT_LENGTH" not in environ and "HTTP_TRANSFER_ENCODING" not in environ:
                try:
                    return self.app(environ, start_response)
                except RequestRejected as exc:
                    answer = _Request(self, environ, start_response).refuse_now(exc)
                    drop_tracebacks(exc)  # this frame holds it: a cycle (errors.py)
                    return answer
            if environ.get("CONTENT_LENGTH") == "" and "HTTP_TRANSFER_ENCODING" not in environ:
                return self.app(environ, start_response)  # wsgiref's "no length"
            return _Request(self, environ, start_response).run(now)
        finally:
            # 5. after response (the app has built it): account it under its route.
            memory.end(sample, environ.get(ROUTE_KEY), path, monotonic_ns())


def _discard(data: bytes) -> None:
    """The ``write`` callable handed to an app whose response is being replaced."""


class _Request:
    """One WSGI request with a body: all its state, none on the middleware."""

    def __init__(self, mw: MemGuardWSGIMiddleware, environ: Environ,
                 start_response: StartResponse) -> None:
        self.mw = mw
        self.environ = environ
        self.start_response = start_response
        self.rejection: RequestRejected | None = None
        self.logged: RequestRejected | None = None
        self.started = False     # the app's start_response reached the server
        self.replaced = False    # our refusal is the response
        self.input: WSGIInput | None = None

    def run(self, now: int) -> Iterable[bytes]:
        policy = self.mw.policy
        environ = self.environ
        # 2. frame (admission ran in MemGuardWSGIMiddleware.__call__)
        path = environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "")
        limit = reader_limit = policy.limit_for(path, environ.get("CONTENT_TYPE"))
        cl = environ.get("CONTENT_LENGTH")
        te = environ.get("HTTP_TRANSFER_ENCODING")
        decoder = None
        try:
            declared = policy.declared_length(
                [cl.encode("latin-1")] if cl is not None else [],
                [te.encode("latin-1")] if te is not None else [])
            if declared is None and not environ.get("wsgi.input_terminated"):
                raise LengthRequired("a chunked body needs a server that can terminate it "
                                     "(wsgi.input_terminated)", reason="length_required")
            if declared is not None:
                policy.check_declared(declared, limit)
            encoding = environ.get("HTTP_CONTENT_ENCODING")
            decoder = policy.decoder_for(encoding.encode("latin-1") if encoding else None,
                                         limit)
        except RequestRejected as exc:
            self.note(exc, policy.report_only)
            if not policy.report_only:
                return self.refused(exc)
            declared = int(cl) if cl and cl.isdigit() else None
            reader_limit = None  # reported once is enough
        environ["memguard.max_body_size"] = limit
        environ["memguard.reject"] = self.refused_by_app
        # 3. wrap wsgi.input
        self.input = WSGIInput(environ["wsgi.input"], declared, reader_limit, policy, self.reject,
                               decoder, sock=environ.get("gunicorn.socket"),
                               memory=self.mw.memory.body_guard(declared, now))
        environ["wsgi.input"] = self.input
        if decoder is not None:
            environ.pop("CONTENT_LENGTH", None)
            environ.pop("HTTP_CONTENT_ENCODING", None)
            environ["wsgi.input_terminated"] = True
        # 4. call app
        try:
            result = self.mw.app(environ, self.wrapped_start_response)
        except Exception as exc:
            if isinstance(exc, RequestRejected) and self.rejection is None:
                self.refused_by_app(exc)
            if self.rejection is None:
                raise
            return self.refused(self.rejection,
                                sys.exc_info() if self.started else None)
        if self.rejection is not None:
            _close(result)
            return self.refused(self.rejection)
        return _Body(self, result)

    def release(self, unwinding: bool = False) -> None:
        """The request is over: no reference cycle may outlive it. The environ holds
        two of this request's methods (``memguard.reject``, and the input wrapper's
        ``on_reject``), so the request lets go of the environ and of the input wrapper,
        and of its refusals' tracebacks (errors.drop_tracebacks), unless an exception is
        on its way out (``unwinding``: the server closes the response as it unwinds),
        which may be one of them."""
        self.environ = {}
        self.input = None
        if not unwinding:
            drop_tracebacks(self.rejection)
            drop_tracebacks(self.logged)

    def refused(self, exc: RequestRejected, exc_info: Any = None) -> list[bytes]:
        """:meth:`refusal` as the request's end (the app's iterable is not returned)."""
        answer = self.refusal(exc, exc_info)
        self.release()  # refusal() returned: nothing is being raised
        return answer

    # ---- refusals ------------------------------------------------------------------

    def note(self, exc: RequestRejected, report_only: bool = False) -> None:
        if self.logged is exc:
            return
        self.logged = exc
        record(exc, self.environ.get("REQUEST_METHOD", ""),
               self.environ.get("SCRIPT_NAME", "") + self.environ.get("PATH_INFO", ""),
               report_only)

    def reject(self, exc: RequestRejected) -> None:
        """A refusal found by the input wrapper (report-only: just note it)."""
        report_only = self.mw.policy.report_only
        self.note(exc, report_only)
        if not report_only and self.rejection is None:
            self.rejection = exc

    def refused_by_app(self, exc: RequestRejected) -> None:
        """A refusal the app raised or handed to ``environ["memguard.reject"]``: it has
        happened already, so it is answered even in report-only mode."""
        self.note(exc)
        if self.rejection is None:
            self.rejection = exc

    def wrapped_start_response(self, status: str, headers: list[tuple[str, str]],
                               exc_info: ExcInfo | None = None) -> Callable[[bytes], object]:
        if self.rejection is not None:
            return _discard  # the app's answer to our refusal; ours replaces it
        self.started = True
        return self.start_response(status, headers, exc_info)

    def refusal(self, exc: RequestRejected, exc_info: Any = None) -> list[bytes]:
        """Our response for ``exc``. With ``exc_info`` (the app's start_response already
        went through), the server replaces the unsent headers or, if they are sent,
        re-raises, and the connection ends."""
        self.replaced = True
        accept = self.environ.get("HTTP_ACCEPT")
        close = not self.environ.get("SERVER_SOFTWARE", "").startswith("WSGIServer/")
        status, headers, body = refusal_response(exc, accept, close=close)
        phrase = f"{status} {_phrase(status)}"
        if exc_info is None and self.started:
            exc_info = (type(exc), exc, exc.__traceback__)
        self.start_response(phrase, headers, exc_info)
        return [body]

    def refuse_now(self, exc: RequestRejected) -> list[bytes]:
        self.note(exc)
        # The app may have called start_response before raising: exc_info lets the
        # server replace those unsent headers.
        return self.refusal(exc, (type(exc), exc, exc.__traceback__))


def _phrase(status: int) -> str:
    import http

    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def _close(result: Iterable[bytes]) -> None:
    close = getattr(result, "close", None)
    if close is not None:
        close()


class _Body:
    """The app's response iterable, watched: a refusal raised while it is iterated (an
    app that reads its input lazily) becomes our response if nothing was sent yet.
    ``close()`` is the after-response phase and always closes the app's iterable."""

    def __init__(self, request: _Request, result: Iterable[bytes]) -> None:
        self.request = request
        self.result = result

    def __iter__(self) -> Iterator[bytes]:
        request = self.request
        sent = False
        try:
            for chunk in self.result:
                if request.rejection is not None:
                    break
                if chunk:
                    sent = True
                yield chunk
        except Exception as exc:
            if isinstance(exc, RequestRejected) and request.rejection is None:
                request.refused_by_app(exc)
            if request.rejection is None:
                raise
        if request.rejection is not None:
            if sent:
                # Headers and some of the body are out: only ending the connection
                # tells the client this response is not whole.
                raise request.rejection
            yield from request.refusal(request.rejection, sys.exc_info()
                                       if sys.exc_info()[0] else None)

    def close(self) -> None:
        try:
            _close(self.result)
        finally:
            # 5. after response
            if self.request.input is not None:
                self.request.input.close()
            self.request.release(unwinding=sys.exc_info()[1] is not None)
