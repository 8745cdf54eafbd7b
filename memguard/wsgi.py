"""The WSGI middleware: memguard's body policy and memory layer in front of any WSGI app.

```python
wsgi = MemGuardWSGIMiddleware(wsgi, max_body_size="16MiB")
```

The phases are those of :mod:`memguard.asgi`, in WSGI terms (see :class:`_Request`):
admit (the cached memory pressure: 503 under critical pressure), frame (Content-Length
checked before anything is read; over the limit: 413), wrap ``wsgi.input``
(:class:`WSGIInput`, a counting stream in the manner of Werkzeug's ``LimitedStream``,
which also checks the worker's memory every few MiB), call the app with a wrapped
``start_response``, and end (the returned iterable's ``close()``, PEP 3333). The request
is accounted under its route template as soon as the app returns its iterable (Flask's
rule is recorded by a hook installed here; Django needs
``memguard.memory.DjangoRouteMiddleware``).

A request with neither Content-Length nor Transfer-Encoding has no body and goes to the
app untouched. A chunked body is read only when the server sets ``wsgi.input_terminated``
(gunicorn does); otherwise it cannot be read safely and is answered with 411.

A refusal raised while the app runs replaces the app's response (``start_response`` is
held back when the refusal is already known, or called again with ``exc_info`` while
the headers are unsent). When the headers are already on the wire, the refusal is raised
to the server, which ends the connection.

Refusals carry no ``Connection: close``: PEP 3333 forbids hop-by-hop headers from an
application (Waitress and wsgiref enforce it). Servers end the connection themselves
after a refused body (gunicorn's sync worker closes every connection; gthread drains at
most 64 KiB of an unread body). Under gunicorn the rest of a refused body is drained
(at most a few MiB, for at most a second) before the answer goes out, so a client still
sending reads the answer rather than a reset.

Paths (route limits, the middleware's own endpoints) are the app's own: ``PATH_INFO``,
without the ``SCRIPT_NAME`` prefix it is mounted at.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator
from time import monotonic_ns
from types import TracebackType
from typing import IO, Any

from memguard.config import resolve
from memguard.decoding import Decoder
from memguard.errors import (
    LengthRequired,
    MalformedRequest,
    RequestRejected,
    RequestTimeout,
    drop_tracebacks,
)
from memguard.http import (
    LINGER_BYTES,
    LINGER_SECONDS,
    declared_length,
    record,
    refusal_response,
    status_line,
)
from memguard.limits import BodyCounter, BodyPolicy, declared_over_limit
from memguard.memory import ROUTE_KEY, MemoryLayer, install_flask_route_hook

__all__ = ["MemGuardWSGIMiddleware", "WSGIInput"]

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
        if memory.has_endpoints:
            handler = memory.endpoint(environ.get("PATH_INFO", "") or "/")
            if handler is not None:
                answer: Iterable[bytes] = handler.wsgi(environ, start_response)
                return answer
        # 1. admit (memguard.memory.MemoryLayer's per-request protocol)
        now = monotonic_ns()
        seq = next(memory.starts)
        sample = memory.start(seq, now) if now >= memory.due else None
        try:
            if memory.shedding:
                refusal = memory.admit(environ.get("REQUEST_METHOD", ""),
                                       _full_path(environ), now)
                if refusal is not None:
                    request = _Request(self, environ, start_response)
                    request.note(refusal, self.policy.report_only)
                    if not self.policy.report_only:
                        return request.refused(refusal)
            # 2. frame: no Content-Length and no Transfer-Encoding is no body.
            if "CONTENT_LENGTH" not in environ and "HTTP_TRANSFER_ENCODING" not in environ:
                try:
                    return self.app(environ, start_response)
                except RequestRejected as exc:
                    return _Request(self, environ, start_response).refuse_now(exc)
            if environ.get("CONTENT_LENGTH") == "" and "HTTP_TRANSFER_ENCODING" not in environ:
                return self.app(environ, start_response)  # wsgiref's "no length"
            return _Request(self, environ, start_response).run(now)
        finally:
            # 5. end (the app has built its response): its route key
            # (memguard.memory.routes.RouteKey), the name a framework hook recorded or
            # else the raw path, built here rather than in a function: each Python call
            # per request runs with cold caches on a server.
            key = environ.get(ROUTE_KEY)
            if key.__class__ is not str:
                key = (None, key, None, None, _full_path(environ))
            memory.completed.append(key)
            if sample is not None or memory.pressed:
                memory.end(sample, key)


def _full_path(environ: Environ) -> str:
    return str(environ.get("SCRIPT_NAME", "")) + str(environ.get("PATH_INFO", ""))


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
        limit = reader_limit = policy.limit_for(environ.get("PATH_INFO", "") or "/",
                                                environ.get("CONTENT_TYPE"))
        cl = environ.get("CONTENT_LENGTH")
        te = environ.get("HTTP_TRANSFER_ENCODING")
        decoder = None
        try:
            declared = declared_length(
                [cl.encode("latin-1")] if cl is not None else [],
                [te.encode("latin-1")] if te is not None else [])
            if declared is None and not environ.get("wsgi.input_terminated"):
                raise LengthRequired("a chunked body needs a server that can terminate it "
                                     "(wsgi.input_terminated)", reason="length_required")
            if declared is not None and limit is not None and declared > limit:
                raise declared_over_limit(declared, limit)
            encoding = environ.get("HTTP_CONTENT_ENCODING")
            decoder = policy.decoder_for(encoding.encode("latin-1") if encoding else None,
                                         limit)
        except RequestRejected as exc:
            self.note(exc, policy.report_only)
            if not policy.report_only:
                return self.refused(exc)
            try:
                declared = declared_length([cl.encode("latin-1")] if cl else [], [])
            except RequestRejected:
                declared = None
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
        record(exc, self.environ.get("REQUEST_METHOD", ""), _full_path(self.environ),
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
        status, headers, body = refusal_response(exc, self.environ.get("HTTP_ACCEPT"))
        if exc_info is None and self.started:
            exc_info = (type(exc), exc, exc.__traceback__)
        if not isinstance(exc, RequestTimeout):
            self.linger(exc)
        self.start_response(status_line(status), headers, exc_info)
        return [body]

    def linger(self, exc: RequestRejected) -> None:
        """Drain the rest of a refused body, bounded (gunicorn only: its socket takes a
        timeout, so a client that went silent cannot hold the worker)."""
        environ = self.environ
        sock = environ.get("gunicorn.socket")
        if sock is None or environ.get("HTTP_EXPECT"):
            return
        if self.input is not None:
            self.input.drain(sock, LINGER_BYTES, LINGER_SECONDS)
            return
        if isinstance(exc, MalformedRequest):
            return  # refused on its headers, its framing in doubt: not read at all
        # Refused on its headers: none of the body was read, and the client sends it.
        length = environ.get("CONTENT_LENGTH", "")
        if length.isascii() and length.isdigit():
            _drain(environ["wsgi.input"], sock, min(int(length), LINGER_BYTES),
                   LINGER_SECONDS)
        elif "HTTP_TRANSFER_ENCODING" in environ and environ.get("wsgi.input_terminated"):
            _drain(environ["wsgi.input"], sock, LINGER_BYTES, LINGER_SECONDS)

    def refuse_now(self, exc: RequestRejected) -> list[bytes]:
        """A refusal the app raised on a bodyless request."""
        self.note(exc)
        # The app may have called start_response before raising: exc_info lets the
        # server replace those unsent headers.
        answer = self.refusal(exc, (type(exc), exc, exc.__traceback__))
        self.release()
        return answer


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


# ---- the wsgi.input wrapper ---------------------------------------------------------

_READ_CHUNK = 64 * 1024


def _drain(stream: IO[bytes], sock: Any, left: int, seconds: float) -> None:
    """Read and discard up to ``left`` bytes of the server's body stream, for at most
    ``seconds``. Best effort: any error of the server's stream (a reset, a malformed
    chunk) ends it."""
    deadline = time.monotonic() + seconds
    try:
        sock.settimeout(seconds)
        while left > 0 and time.monotonic() < deadline:
            data = stream.read(min(left, _READ_CHUNK))
            if not data:
                return
            left -= len(data)
    except Exception:
        return


class WSGIInput:
    """A ``wsgi.input`` that counts, limits, times and optionally decodes the body.

    Reads never ask the server's stream for more than the declared length (a blocking
    read past it would hang on servers that do not bound the stream) nor for more than
    one byte past the limit. Under gunicorn, the idle timeout is enforced on the socket
    itself (``settimeout`` on ``environ["gunicorn.socket"]`` for the duration of the
    body); elsewhere it and the minimum rate are judged when a read returns.
    """

    def __init__(self, stream: IO[bytes], declared: int | None, limit: int | None,
                 policy: BodyPolicy, on_reject: Any, decoder: Decoder | None = None,
                 sock: Any = None, memory: Any = None) -> None:
        self._stream = stream
        self.memory = memory  # memguard.memory.admission.BodyMemoryGuard, or None
        self.declared = declared
        self.counter = BodyCounter(limit)
        self.error: RequestRejected | None = None
        self.on_reject = on_reject
        self.report_only = policy.report_only
        self.decoder = decoder
        self.idle = policy.idle_timeout
        self.min_rate = policy.min_rate
        self.grace = policy.rate_grace
        self._start = 0.0
        self._last = 0.0
        self._eof = False
        self._buffer = bytearray()  # decoded bytes not yet read (decoding only)
        self._sock = sock
        self._sock_timeout: float | None = None
        self._sock_set = False

    @property
    def received(self) -> int:
        """Bytes read from the server's stream so far (before any decoding)."""
        return self.counter.received

    # ---- raw reads, counted ------------------------------------------------------

    def _fail(self, exc: RequestRejected) -> None:
        self.on_reject(exc)
        if not self.report_only:
            self.error = exc
            self._eof = True
            raise exc

    def _raw(self, size: int, line: bool = False) -> bytes:
        if self.error is not None:
            raise self.error
        if self._eof or size == 0:
            return b""
        counter = self.counter
        if self.declared is not None:
            size = min(size, self.declared - counter.received)
            if size <= 0:
                self._eof = True
                self._restore()
                return b""
        if counter.limit is not None:
            size = min(size, counter.limit - counter.received + 1)
        if self._start == 0.0:
            self._begin()
        try:
            data = self._stream.readline(size) if line else self._stream.read(size)
        except TimeoutError:
            self._fail(RequestTimeout("no request body data arrived in time",
                                      reason="body_idle_timeout", idle_timeout=self.idle,
                                      received=self.received))
            raise  # report-only: the server's read failed all the same
        except OSError as exc:
            # uWSGI's own read timeout (--socket-timeout) is a bare OSError, no errno.
            if exc.errno is not None or "timeout" not in str(exc):
                raise
            self._fail(RequestTimeout("no request body data arrived within the server's "
                                      "read timeout", reason="body_idle_timeout",
                                      received=self.received))
            raise
        n = len(data)
        if n == 0:
            self._eof = True
            self._restore()
            if self.declared is not None and self.received < self.declared:
                self._fail(MalformedRequest("request body ended before its Content-Length",
                                            reason="body_incomplete",
                                            declared=self.declared, received=self.received))
            return data
        try:
            counter.add(n)
        except RequestRejected as exc:
            counter.limit = None
            self._fail(exc)
        if self.memory is not None and self.decoder is None:
            self._check_memory(n)
        if self.min_rate:
            now = time.monotonic()
            if now > self._start + self.grace + self.received / self.min_rate:
                self._fail(RequestTimeout(
                    "request body is arriving too slowly", reason="body_too_slow",
                    min_rate=self.min_rate, received=self.received,
                    seconds=round(now - self._start, 2)))
                self.min_rate = 0
        return data

    def _check_memory(self, size: int) -> None:
        """``size`` more bytes the app may buffer (decoded bytes when decoding)."""
        assert self.memory is not None
        try:
            self.memory.chunk(size)
        except RequestRejected as exc:
            self.memory = None
            self._fail(exc)

    def _begin(self) -> None:
        self._start = time.monotonic()
        if self._sock is not None and self.idle:
            try:
                self._sock_timeout = self._sock.gettimeout()
                self._sock.settimeout(self.idle)
                self._sock_set = True
            except (OSError, AttributeError):
                pass

    def _restore(self) -> None:
        """Put the socket's timeout back once the body is read (not after a refusal:
        then the server's next read should fail fast, so it closes the connection)."""
        if self._sock_set and self.error is None:
            self._sock_set = False
            try:
                self._sock.settimeout(self._sock_timeout)
            except OSError:
                pass

    # ---- decoded reads -----------------------------------------------------------

    def _fill(self) -> bool:
        """Decode more into the buffer; False at the end of the body."""
        decoder = self.decoder
        assert decoder is not None
        while True:
            try:
                if decoder.pending:
                    out = decoder.feed(b"")
                else:
                    data = self._raw(_READ_CHUNK)
                    if not data:
                        if decoder.decoded or decoder.encoded:
                            decoder.finish()
                        return False
                    out = decoder.feed(data)
            except RequestRejected as exc:
                if exc is self.error:
                    raise
                self._fail(exc)
                self.counter.limit = None
                decoder.lift_limits()
                continue
            if out:
                if self.memory is not None:
                    self._check_memory(len(out))
                self._buffer += out
                return True

    def _take(self, size: int) -> bytes:
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        return data

    # ---- the file-like interface (PEP 3333) --------------------------------------

    def read(self, size: int | None = -1) -> bytes:
        if self.decoder is None:
            if size is not None and size >= 0:
                return self._raw(size)
            parts: list[bytes] = []
            while True:
                data = self._raw(_READ_CHUNK)
                if not data:
                    return b"".join(parts)
                parts.append(data)
        if size is None or size < 0:
            while self._fill():
                pass
            return self._take(len(self._buffer))
        while len(self._buffer) < size and self._fill():
            pass
        return self._take(size)

    def readline(self, size: int | None = -1) -> bytes:
        if self.decoder is None:
            limit = _READ_CHUNK if size is None or size < 0 else size
            parts: list[bytes] = []
            while True:
                data = self._raw(limit, line=True)
                parts.append(data)
                if not data or data.endswith(b"\n") or (size is not None and size >= 0):
                    return b"".join(parts)
        while True:
            end = self._buffer.find(b"\n")
            if end >= 0 and (size is None or size < 0 or end < size):
                return self._take(end + 1)
            if size is not None and 0 <= size <= len(self._buffer):
                return self._take(size)
            if not self._fill():
                return self._take(len(self._buffer))

    def readlines(self, hint: int = -1) -> list[bytes]:
        lines: list[bytes] = []
        total = 0
        while True:
            line = self.readline()
            if not line:
                return lines
            lines.append(line)
            total += len(line)
            if 0 < hint <= total:
                return lines

    def __iter__(self) -> Iterator[bytes]:
        while True:
            line = self.readline()
            if not line:
                return
            yield line

    def drain(self, sock: Any, most: int, seconds: float) -> None:
        """Read and discard what is left of the body: at most ``most`` bytes, for at most
        ``seconds`` (the socket's timeout bounds each read)."""
        left = most if self.declared is None else min(self.declared - self.received, most)
        _drain(self._stream, sock, left, seconds)

    def close(self) -> None:
        self._restore()
