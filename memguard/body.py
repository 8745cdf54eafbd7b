"""Request-body policy: framing checks, limits, byte counting, slow bodies, decompression.

This module holds what :mod:`memguard.asgi` and :mod:`memguard.wsgi` share: the compiled
options (:class:`BodyPolicy`), the ``receive()`` wrapper (:class:`ASGIBody`), the
``wsgi.input`` wrapper (:class:`WSGIInput`), the streaming decoder and the refusal
response. The middlewares only compose these in their request phases.

Matching rules
--------------
- A **route pattern** is an exact path (``"/health"``) or a prefix ending in ``*``
  (``"/upload/*"`` matches ``/upload/``, ``/upload/a/b`` and ``/upload`` itself);
  ``"*"`` matches every path. The path is the full request path (ASGI ``scope["path"]``,
  WSGI ``SCRIPT_NAME + PATH_INFO``), percent-decoded, without the query string.
- The **longest** matching pattern wins, so an exact pattern (which matches all of the
  path) beats every prefix pattern. A route's limit replaces ``max_body_size``, so it may
  raise or lower it.
- A **content-type cap** matches the media type (lower-cased, parameters dropped):
  ``"application/json"`` exactly, ``"text/*"`` any subtype, ``"application/*+json"`` any
  subtype with that suffix, ``"*/*"`` any type. An exact name wins, then the longest
  matching pattern.
- The **effective limit** of a request is the smaller of its route limit (or
  ``max_body_size``) and its content-type cap. Content-type caps only ever lower a limit:
  JSON and url-encoded bodies are parsed in memory, so a route raised for uploads does
  not raise them. A route may lift them for itself by giving a mapping instead of a size:
  ``{"/import": {"*": "64MiB", "application/json": "64MiB"}}`` (``"*"`` is the route's
  limit; the other keys replace the content-type caps on that route).
"""

from __future__ import annotations

import asyncio
import contextvars
import http
import json
import logging
import sys
import time
import weakref
import zlib
from collections.abc import Iterator, Mapping
from typing import IO, Any

from memguard import counters, events, extensions
from memguard.errors import (
    BodyTooLarge,
    MalformedRequest,
    RequestRejected,
    RequestTimeout,
    UnsupportedMediaType,
)
from memguard.types import Message, Receive

__all__ = ["ASGIBody", "BodyPolicy", "Decoder", "WSGIInput", "record", "refusal_response"]

log = logging.getLogger("memguard.body")

_monotonic = time.monotonic

# The per-chunk path in C (memguard/_speedups.c), when it was built: ASGIBody's base
# then holds the counting and timing fields, and the body's receiver is the receive the
# app gets. Without it (memguard.extensions), the same class runs in Python.
_COUNTER_FIELDS = ("_receive", "received", "_threshold", "_calls", "_fast", "_timed",
                   "_waiting", "done")
_speedups = extensions.load("_speedups")
SPEEDUPS = _speedups is not None
_CounterBase: type = _speedups.BodyCounter if _speedups is not None else object
# No count reaches this: "no threshold".
_NEVER = sys.maxsize


# Decompression: largest decoded piece handed to the app at once, and the decoded size
# below which the expansion ratio is not judged (small JSON compresses 100x honestly).
DECODE_PIECE = 256 * 1024
RATIO_FLOOR = 1024 * 1024
# Longer than this many digits is beyond any limit (and beyond int()'s comfort).
_MAX_DIGITS = 18
_CACHE_SIZE = 256
_MISSING = object()


def _smaller(a: int | None, b: int | None) -> int | None:
    if a is None:
        return b
    if b is None:
        return a
    return a if a <= b else b


class _TypeCaps:
    """Content-type caps, compiled: exact names, then patterns longest first."""

    def __init__(self, caps: Mapping[str, int | None]) -> None:
        self.exact: dict[str, int | None] = {}
        self.patterns: list[tuple[str, str, int | None]] = []  # (prefix, suffix, cap)
        for pattern, cap in caps.items():
            if pattern == "*/*":
                self.patterns.append(("", "", cap))
            elif "*" in pattern:
                prefix, _, suffix = pattern.partition("*")
                self.patterns.append((prefix, suffix, cap))
            else:
                self.exact[pattern] = cap
        self.patterns.sort(key=lambda p: len(p[0]) + len(p[1]), reverse=True)
        self._cache: dict[str, int | None] = {}

    def cap(self, media_type: str) -> int | None:
        try:
            return self._cache[media_type]
        except KeyError:
            pass
        cap: int | None = None
        if media_type in self.exact:
            cap = self.exact[media_type]
        else:
            for prefix, suffix, pattern_cap in self.patterns:
                if (media_type.startswith(prefix) and media_type.endswith(suffix)
                        and len(media_type) >= len(prefix) + len(suffix)):
                    cap = pattern_cap
                    break
        if len(self._cache) < _CACHE_SIZE:  # media types with junk in them stay uncached
            self._cache[media_type] = cap
        return cap


class BodyPolicy:
    """The resolved ``body`` options, compiled once per middleware (read-only after)."""

    def __init__(self, options: Mapping[str, Any]) -> None:
        self.options = dict(options)
        self.max_body_size: int | None = options["max_body_size"]
        self.idle_timeout: float = options["body_idle_timeout"]
        self.min_rate: int = options["body_min_rate"]
        self.rate_grace: float = options["body_rate_grace"]
        self.decompress: bool = options["decompress"]
        self.max_decoded_size: int | None = options["max_decoded_size"]
        self.max_ratio: float = options["max_decompression_ratio"]
        self.report_only: bool = options["report_only"]
        self.timed = bool(self.idle_timeout or self.min_rate)
        # How often the sweeper looks: an eighth of the idle timeout, within 20-500 ms. A
        # wait is timed from the first look that finds it, so a timeout comes two periods
        # late at most: a quarter of the idle timeout (and one second).
        self.sweep_period = min(0.5, max(0.02, (self.idle_timeout or 4.0) / 8))
        self.type_caps = _TypeCaps(options["content_types"])
        self._exact: dict[str, tuple[int | None, _TypeCaps]] = {}
        self._prefixes: list[tuple[str, int | None, _TypeCaps]] = []
        for pattern, value in options["routes"].items():
            if isinstance(value, Mapping):
                route_limit = value.get("*", self.max_body_size)
                caps = _TypeCaps({**options["content_types"],
                                  **{k: v for k, v in value.items() if k != "*"}})
            else:
                route_limit, caps = value, self.type_caps
            if pattern.endswith("*"):
                self._prefixes.append((pattern[:-1], route_limit, caps))
            else:
                self._exact[pattern] = (route_limit, caps)
        self._prefixes.sort(key=lambda p: len(p[0]), reverse=True)
        self._routed = bool(self._exact or self._prefixes)
        # Without routes the limit depends on the Content-Type value only: cached by its
        # raw value (bounded: multipart boundaries make every value new).
        self._by_raw_type: dict[bytes | str, int | None] = {}

    def limit_for(self, path: str, content_type: bytes | str | None) -> int | None:
        """The effective limit for a request to ``path`` with this Content-Type."""
        if not self._routed:
            if not content_type:
                return self.max_body_size
            hit = self._by_raw_type.get(content_type, _MISSING)
            if hit is not _MISSING:
                return hit  # type: ignore[return-value]
            limit = self._limit_for(path, content_type)
            if len(self._by_raw_type) < _CACHE_SIZE:
                self._by_raw_type[content_type] = limit
            return limit
        return self._limit_for(path, content_type)

    def _limit_for(self, path: str, content_type: bytes | str | None) -> int | None:
        route_limit, caps = self.max_body_size, self.type_caps
        hit = self._exact.get(path)
        if hit is not None:
            route_limit, caps = hit  # an exact pattern matches all of the path: longest
        else:
            for prefix, limit, prefix_caps in self._prefixes:
                if path.startswith(prefix) or path == prefix.rstrip("/"):
                    route_limit, caps = limit, prefix_caps
                    break
        if not content_type:
            return route_limit
        if isinstance(content_type, bytes):
            content_type = content_type.decode("latin-1")
        media_type = content_type.partition(";")[0].strip().lower()
        return _smaller(route_limit, caps.cap(media_type))

    # ---- framing ----------------------------------------------------------------

    @staticmethod
    def declared_length(values: list[bytes], transfer_encodings: list[bytes]) -> int | None:
        """The body's declared length, or ``None`` for a chunked body.

        Raises :class:`MalformedRequest` for a Content-Length that is not digits only,
        duplicates that differ, Content-Length with Transfer-Encoding, and a
        Transfer-Encoding whose last coding is not ``chunked``.
        """
        if transfer_encodings:
            if values:
                raise MalformedRequest(
                    "Content-Length and Transfer-Encoding together",
                    reason="content_length_with_transfer_encoding")
            codings = b",".join(transfer_encodings).split(b",")
            if codings[-1].strip().lower() != b"chunked":
                raise MalformedRequest(
                    "Transfer-Encoding must end with chunked",
                    reason="transfer_encoding_unsupported",
                    transfer_encoding=b",".join(transfer_encodings).decode("latin-1"))
            return None
        if len(values) == 1 and values[0].isdigit() and len(values[0]) <= _MAX_DIGITS:
            return int(values[0])  # the common case, fast
        length: int | None = None
        for value in values:
            for item in value.split(b","):
                item = item.strip(b" \t")
                if not item.isdigit():
                    raise MalformedRequest(
                        "Content-Length must be digits only", reason="content_length_invalid",
                        content_length=value.decode("latin-1")[:40])
                number = int(item) if len(item) <= _MAX_DIGITS else 10**_MAX_DIGITS
                if length is not None and number != length:
                    raise MalformedRequest(
                        "conflicting Content-Length values", reason="content_length_conflict",
                        content_lengths=[v.decode("latin-1")[:40] for v in values])
                length = number
        return length

    @staticmethod
    def check_declared(declared: int, limit: int | None) -> None:
        if limit is not None and declared > limit:
            raise BodyTooLarge(
                f"request body of {declared} bytes is over the limit of {limit} bytes",
                reason="content_length_over_limit", limit=limit, declared=declared)

    def decoder_for(self, encoding: bytes | None, limit: int | None) -> Decoder | None:
        """A decoder for this Content-Encoding when ``decompress`` is on, else ``None``."""
        if not self.decompress or encoding is None:
            return None
        name = encoding.strip().lower()
        if name in (b"", b"identity"):
            return None
        if name not in (b"gzip", b"x-gzip", b"deflate"):
            raise UnsupportedMediaType(
                "unsupported Content-Encoding", reason="content_encoding_unsupported",
                content_encoding=encoding.decode("latin-1")[:40])
        return Decoder(name, _smaller(limit, self.max_decoded_size) if self.max_decoded_size
                       is not None else limit, self.max_ratio)


# ---- refusals ---------------------------------------------------------------------------


def record(exc: RequestRejected, method: str, path: str, report_only: bool) -> None:
    """The log line, counter and event of one refusal (or of one that report-only let go)."""
    figures = " ".join(f"{k}={v}" for k, v in exc.figures.items())
    if report_only:
        log.warning("report-only: would refuse %s %s with %s %s (%s) %s", method, path,
                    exc.status, exc.reason, exc.detail, figures)
        counters.increment("body", f"report_only:{exc.reason}")
    else:
        log.warning("refused %s %s with %s %s (%s) %s", method, path, exc.status, exc.reason,
                    exc.detail, figures)
        counters.increment("body", exc.reason)
    fields = {k: v for k, v in exc.figures.items() if k not in ("kind", "ts", "pid")}
    fields.update(status=exc.status, reason=exc.reason, method=method, path=path,
                  report_only=report_only)
    events.emit("refusal", **fields)


def refusal_response(exc: RequestRejected, accept: bytes | str | None,
                     close: bool = True) -> tuple[int, list[tuple[str, str]], bytes]:
    """Status, headers and body answering ``exc``: problem+json when the client accepts
    JSON, else one line of plain text; always ``Connection: close``."""
    try:
        phrase = http.HTTPStatus(exc.status).phrase
    except ValueError:
        phrase = "Error"
    if isinstance(accept, str):
        accept = accept.encode("latin-1")
    if accept and b"json" in accept:
        body = json.dumps({"type": "about:blank", "title": phrase, "status": exc.status,
                           "detail": exc.detail, "reason": exc.reason}).encode()
        content_type = "application/problem+json"
    else:
        body = f"{exc.status} {phrase}: {exc.detail}\n".encode()
        content_type = "text/plain; charset=utf-8"
    headers = [("content-type", content_type), ("content-length", str(len(body)))]
    if close:
        headers.append(("connection", "close"))
    headers.extend((k.lower(), v) for k, v in exc.headers.items())
    return exc.status, headers, body


# ---- decompression ------------------------------------------------------------------


class Decoder:
    """Streaming gzip/deflate decoding with a cap on decoded bytes and on expansion.

    Never produces more than :data:`DECODE_PIECE` bytes (or one byte past the limit) per
    call: the rest of the input waits in zlib's ``unconsumed_tail`` for the next call.
    """

    __slots__ = ("_z", "encoded", "decoded", "limit", "ratio")

    def __init__(self, encoding: bytes, limit: int | None, ratio: float) -> None:
        wbits = zlib.MAX_WBITS if encoding == b"deflate" else 16 + zlib.MAX_WBITS
        self._z = zlib.decompressobj(wbits)
        self.encoded = 0
        self.decoded = 0
        self.limit = limit
        self.ratio = ratio

    @property
    def pending(self) -> bool:
        return bool(self._z.unconsumed_tail)

    def feed(self, data: bytes) -> bytes:
        """Decode from ``data`` (after any pending input); ``b""`` continues the tail."""
        self.encoded += len(data)
        source = self._z.unconsumed_tail + data if self._z.unconsumed_tail else data
        room = DECODE_PIECE if self.limit is None else min(DECODE_PIECE,
                                                           self.limit - self.decoded + 1)
        try:
            out = self._z.decompress(source, max(room, 1))
        except zlib.error as exc:
            raise MalformedRequest("request body could not be decoded",
                                   reason="body_decode_error", error=str(exc)) from None
        self.decoded += len(out)
        if self.limit is not None and self.decoded > self.limit:
            raise BodyTooLarge(
                f"decoded request body is over the limit of {self.limit} bytes",
                reason="decoded_body_over_limit", limit=self.limit, decoded=self.decoded,
                encoded=self.encoded)
        if (self.ratio and self.decoded > RATIO_FLOOR
                and self.decoded > self.ratio * self.encoded):
            raise BodyTooLarge(
                "request body expands too much when decoded", reason="decompression_ratio",
                ratio=round(self.decoded / max(self.encoded, 1), 1), max_ratio=self.ratio,
                decoded=self.decoded, encoded=self.encoded)
        return out

    def finish(self) -> None:
        if not self._z.eof:
            raise MalformedRequest("compressed request body is truncated",
                                   reason="body_decode_error", encoded=self.encoded)


# ---- the ASGI receive() wrapper -----------------------------------------------------


def _over_limit(limit: int, received: int) -> BodyTooLarge:
    return BodyTooLarge(f"request body is over the limit of {limit} bytes",
                        reason="body_over_limit", limit=limit, received=received)


class ASGIBody(_CounterBase):  # type: ignore[misc]
    """Wraps one request's ``receive``: counts real bytes, enforces slow-body timeouts,
    decodes when asked. A refusal is raised into the app *and* handed to ``on_reject``
    (the middleware's responder), which remembers it so that whatever the app or its
    framework does with the exception, the client gets the refusal.

    Idle timeout and minimum rate cost a counter step per chunk, no clock read and no
    timer per request: a body that is being read registers with its event loop's
    :class:`_Sweeper`, one callback per loop that looks at the bodies in flight a few
    times a second and cancels, for one over a limit, the task that read its first chunk
    (found once, not per chunk). A wait is timed from the first look that finds it, so
    an idle timeout fires between ``body_idle_timeout`` and that plus two sweep periods
    (a quarter of it at most, and at most one second), never early.
    """

    __slots__ = ("limit", "error", "on_reject", "policy", "decoder", "_sweeper",
                 "_start", "_timeout", "disconnect", "memory", "_memory_at",
                 "_t_enter", "_seen_calls", "_task",
                 *(() if SPEEDUPS else _COUNTER_FIELDS))

    def __init__(self, receive: Receive, limit: int | None, policy: BodyPolicy,
                 on_reject: Any, decoder: Decoder | None = None,
                 disconnect: bool = False, memory: Any = None) -> None:
        self._receive = receive
        # memguard.admission.BodyMemoryGuard: the worker's memory against its hard limit,
        # read every few MiB received (None: no worker limit).
        self.memory = memory
        # Bytes received at which the memory guard next reads RSS: one integer compare
        # per chunk instead of a method call.
        self._memory_at = memory.next_check if memory is not None else 0
        self.limit = limit
        self.error: RequestRejected | None = None
        self.on_reject = on_reject
        self.policy = policy
        self.decoder = decoder
        # True: a refusal reaches the app as http.disconnect instead of an exception
        # (Django's ASGI handler leaks its spooled body file on any other exception).
        self.disconnect = disconnect
        self._timed = policy.timed
        self._sweeper: _Sweeper | None = None
        self._start = 0.0
        self._timeout: RequestTimeout | None = None
        self._t_enter = 0.0   # when the sweeper first found the current wait
        self._seen_calls = 0  # the _calls count it found it at
        # The task that read the first chunk: the one a slow-body timeout cancels (found
        # once, not per chunk: on 3.11 that lookup is a Python call, 0.3 us).
        self._task: asyncio.Task[Any] | None = None
        if not SPEEDUPS:
            # The C base starts zeroed, which reads the same (and each of its fields
            # costs a generic setattr from Python): nothing received, not waiting, not
            # done.
            self.done = False
            self.received = 0
            self._waiting = False
            self._calls = 0
            self._fast = False
            self._threshold = _NEVER
        elif decoder is None:
            # The C path takes every chunk from the first (the app calls the body's
            # receiver) and hands Python the messages it does not count (_finish).
            # _set_threshold(), written out: a Python call less per request.
            self._threshold = min(limit + 1 if limit is not None else _NEVER,
                                  self._memory_at if memory is not None else _NEVER)
            self._fast = True

    @property
    def receive(self) -> Receive:
        """The body's receive() in Python: decoding, or counting. A property, not an
        attribute set in ``__init__``: a bound method of the body kept on the body is a
        reference cycle per request."""
        return self._receive_decoded if self.decoder is not None else self._receive_plain

    @property
    def app_receive(self) -> Receive:
        """What the app gets as ``receive``: the body's C receiver when the C path is
        there (calling it costs no coroutine frame per chunk), else the Python method."""
        if SPEEDUPS and self.decoder is None:
            return self.receiver()  # type: ignore[no-any-return]
        return self.receive

    def _set_threshold(self) -> None:
        """The first byte count the C path hands back to Python: one past the limit, or
        where the memory guard reads RSS next."""
        limit = self.limit + 1 if self.limit is not None else _NEVER
        memory_at = self._memory_at if self.memory is not None else _NEVER
        self._threshold = min(limit, memory_at)

    def _reject(self, exc: RequestRejected) -> RequestRejected | None:
        """Hand a refusal to the responder; ``None`` when report-only lets it go."""
        self.on_reject(exc)
        if self.policy.report_only:
            return None
        self.error = exc
        self.done = True
        self.close()
        return exc

    def _signal(self, exc: RequestRejected) -> Message:
        if self.disconnect:
            return {"type": "http.disconnect"}
        raise exc

    async def _wait(self) -> Message:
        """The bounded wait for the next message (the decoding path uses it)."""
        if self._timed and self._calls == 0:
            self._start_reading()
        if not self._timed:
            return await self._receive()
        self._calls += 1
        self._waiting = True
        try:
            message = await self._receive()
        except asyncio.CancelledError as exc:
            self._waiting = False
            return self._failed(exc)
        self._waiting = False
        return message

    def _timed_out(self) -> RequestRejected:
        """Our timer cancelled the task: undo the cancellation, refuse with 408."""
        timeout = self._timeout
        assert timeout is not None
        if self._task is not None and hasattr(self._task, "uncancel"):
            self._task.uncancel()
        exc = self._reject(timeout)
        assert exc is not None  # report-only never cancels a wait
        return exc

    def cancelled_by_timeout(self) -> bool:
        """A CancelledError reached the middleware: True when it is our slow-body timer's
        and no receive() has answered it yet (the body is read in another task than the
        one that read the first chunk and was cancelled), with the 408 now noted."""
        if self._timeout is None or self.error is not None:
            return False
        self._timed_out()
        return True

    def _start_reading(self) -> None:
        """The body's first receive(), when timed: it registers with its loop's sweeper,
        and the task reading it is noted (the one a slow-body timeout cancels). Without
        an asyncio loop (trio), ``_timed`` turns False: counting only. The C path calls
        it too, once."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not asyncio (trio): no timeouts, counting still applies
            self._timed = False
            return
        sweeper = _Sweeper._last
        if sweeper is None or sweeper._loop() is not loop:
            sweeper = _Sweeper.of(loop)
        self._sweeper = sweeper
        self._start = _monotonic()
        sweeper.add(self, loop)
        # With the loop: without, 3.11's current_task() asks for the running loop again,
        # and that checks the process id, a system call.
        self._task = asyncio.current_task(loop)

    async def _receive_plain(self) -> Message:
        # The per-chunk path without the C extension (with it: a finished or refused
        # body); the wait is _wait() inlined, one coroutine frame less.
        if self.done:
            if self.error is not None:
                return self._signal(self.error)
            return await self._receive()
        if self._timed and self._calls == 0:
            self._start_reading()
        if self._timed:
            self._calls += 1
            self._waiting = True
            try:
                message = await self._receive()
            except asyncio.CancelledError as exc:
                self._waiting = False
                return self._failed(exc)
            self._waiting = False
        else:
            message = await self._receive()
        return self._finish(message)

    def _finish(self, message: Message) -> Message:
        """The received ``message``, counted and checked against the limit and the
        memory guard. The C path calls it for every message it does not take itself
        (it has not counted those)."""
        if message["type"] != "http.request":
            self.done = True
            self.close()
            return message
        size = len(message.get("body", b""))
        self.received += size
        if self.limit is not None and self.received > self.limit:
            exc = self._reject(_over_limit(self.limit, self.received))
            if exc is not None:
                return self._signal(exc)
            self.limit = None
        if self.memory is not None and self.received >= self._memory_at:
            try:
                self._memory_at = self.memory.reached(self.received)
            except RequestRejected as memory_exc:
                self.memory = None
                exc = self._reject(memory_exc)
                if exc is not None:
                    return self._signal(exc)
        if not message.get("more_body", False):
            self.done = True
            self.close()
        if SPEEDUPS and not self.done:
            self._set_threshold()
        return message

    def _failed(self, exc: BaseException) -> Message:
        """A receive() was cancelled: by our slow-body timer (answered once, with 408), or
        by someone else (raised on)."""
        if self._timeout is None or self.error is not None:
            raise exc
        return self._signal(self._timed_out())

    async def _receive_decoded(self) -> Message:
        decoder = self.decoder
        assert decoder is not None
        if self.done:
            if self.error is not None:
                return self._signal(self.error)
            return await self._receive()
        try:
            if decoder.pending:
                out = decoder.feed(b"")
                return {"type": "http.request", "body": out, "more_body": True}
            message = await self._wait()
            if self.error is not None:
                return message  # the disconnect standing for a timeout
            if message["type"] != "http.request":
                self.done = True
                self.close()
                return message
            data = message.get("body", b"")
            self.received += len(data)
            if self.limit is not None and self.received > self.limit:
                raise _over_limit(self.limit, self.received)
            out = decoder.feed(data)
            if self.memory is not None:
                self.memory.chunk(len(out))  # what the app may buffer is the decoded size
            more = message.get("more_body", False) or decoder.pending
            if not more:
                decoder.finish()
                self.done = True
                self.close()
            return {"type": "http.request", "body": out, "more_body": more}
        except RequestRejected as exc:
            if exc is self.error:
                raise
            self.memory = None
            rejected = self._reject(exc)
            if rejected is not None:
                return self._signal(rejected)
            # Report-only: stop decoding limits, hand over what is left undecoded-capped.
            self.limit = decoder.limit = None
            decoder.ratio = 0
            return {"type": "http.request", "body": b"", "more_body": True}

    # ---- slow bodies ----------------------------------------------------------------

    def check(self, now: float) -> bool:
        """The sweeper's look at this body; False once it needs no more looks."""
        if self.done:
            return False
        if not self._waiting:
            return True
        if self._calls != self._seen_calls:
            # A wait no look has found yet: it began since the last one. Timed from now,
            # it can end a period late, never early (no clock read per chunk for it).
            self._seen_calls = self._calls
            self._t_enter = now
        policy = self.policy
        exc: RequestTimeout | None = None
        if policy.idle_timeout and now - self._t_enter >= policy.idle_timeout:
            exc = RequestTimeout("no request body data arrived in time",
                                 reason="body_idle_timeout", idle_timeout=policy.idle_timeout,
                                 received=self.received)
        elif (policy.min_rate and now - self._start > policy.rate_grace
              and now >= self._start + policy.rate_grace + self.received / policy.min_rate):
            # Judged only while the app waits on the client: a slow app is not the
            # client's fault (when it asks, the data is already there).
            exc = RequestTimeout(
                "request body is arriving too slowly", reason="body_too_slow",
                min_rate=policy.min_rate, received=self.received,
                seconds=round(now - self._start, 2))
        if exc is None:
            return True
        if policy.report_only:
            self.on_reject(exc)
            return False  # reported once; stop watching this body
        self._timeout = exc
        if self._task is not None:
            self._task.cancel()
        return False

    def close(self) -> None:
        self._fast = False  # a finished or refused body answers from Python
        if self._sweeper is not None:
            self._sweeper.bodies.discard(self)
            self._sweeper = None


class _Sweeper:
    """Looks at the bodies being read on one event loop every ``period`` seconds, only
    while there are any (no callback stays scheduled on an idle loop).

    The latest one is kept at hand, which makes one per loop where it matters (a server
    runs one loop per worker); a body read on another loop (a thread's, a test's) gets a
    new one, and one that still has bodies lives on in its scheduled callback. It holds
    its loop weakly: a mapping from loops to sweepers kept every loop that ever read a
    body alive, since each sweeper referred to its own key.
    """

    _last: _Sweeper | None = None

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        # Both weak: the scheduled callback refers to its loop, and the loop's timer
        # queue keeps the callback alive until it runs or is cancelled.
        self._loop = weakref.ref(loop)
        self._handle: weakref.ref[asyncio.TimerHandle] | None = None
        self.bodies: set[ASGIBody] = set()
        self.period = 0.5
        # The sweeps run in a context of their own: scheduled from a request's task,
        # the callback would copy that request's context and keep its variables alive
        # for as long as the loop has bodies to look at.
        self.context = contextvars.Context()

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> _Sweeper:
        last = cls._last
        if last is not None and last._loop() is not loop:
            previous = last._loop()
            if (previous is None or previous.is_closed()) and not last.bodies:
                # Its loop has ended and it has nothing left to watch: it serves this
                # one (a loop per test, per thread, per asyncio.run).
                last._loop, last._handle, last.period = weakref.ref(loop), None, 0.5
            else:
                last = None
        if last is None:
            last = cls._last = cls(loop)
        return last

    def scheduled(self) -> bool:
        """A sweep is due."""
        handle = self._handle() if self._handle is not None else None
        return handle is not None and not handle.cancelled()

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        # call_at: call_later is call_at(time() + delay), one Python call more.
        self._handle = weakref.ref(loop.call_at(loop.time() + self.period, self.sweep,
                                                context=self.context))

    def add(self, body: ASGIBody, loop: asyncio.AbstractEventLoop) -> None:
        """Watch ``body``, read on ``loop`` (the running one)."""
        self.bodies.add(body)
        period = body.policy.sweep_period
        if period < self.period:
            self.period = period
            handle = self._handle() if self._handle is not None else None
            if handle is not None:
                handle.cancel()
            self._handle = None
        # Not scheduled(), written out; a handle of ours is cancelled only just above,
        # which forgets it, so a live one is due.
        if self._handle is None or self._handle() is None:
            self._schedule(loop)

    def sweep(self) -> None:
        self._handle = None
        loop = self._loop()
        if not self.bodies or loop is None:
            self.period = 0.5
            return
        now = _monotonic()
        for body in list(self.bodies):
            if not body.check(now):
                self.bodies.discard(body)
        if self.bodies:
            self._schedule(loop)
        else:
            self.period = 0.5


# ---- the wsgi.input wrapper ---------------------------------------------------------

_READ_CHUNK = 64 * 1024


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
        self.memory = memory  # memguard.admission.BodyMemoryGuard, or None
        self.declared = declared
        self.limit = limit
        self.received = 0
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
        if self.declared is not None:
            size = min(size, self.declared - self.received)
            if size <= 0:
                self._eof = True
                self._restore()
                return b""
        if self.limit is not None:
            size = min(size, self.limit - self.received + 1)
        if self._start == 0.0:
            self._begin()
        try:
            data = self._stream.readline(size) if line else self._stream.read(size)
        except TimeoutError:
            self._fail(RequestTimeout("no request body data arrived in time",
                                      reason="body_idle_timeout", idle_timeout=self.idle,
                                      received=self.received))
            raise  # report-only: the server's read failed all the same
        n = len(data)
        self.received += n
        if n == 0:
            self._eof = True
            self._restore()
            if self.declared is not None and self.received < self.declared:
                self._fail(MalformedRequest("request body ended before its Content-Length",
                                            reason="body_incomplete",
                                            declared=self.declared, received=self.received))
            return data
        if self.limit is not None and self.received > self.limit:
            self._fail(_over_limit(self.limit, self.received))
            self.limit = None
        if self.memory is not None:
            try:
                self.memory.chunk(n)
            except RequestRejected as exc:
                self.memory = None
                self._fail(exc)
        if self.min_rate:
            now = time.monotonic()
            if now > self._start + self.grace + self.received / self.min_rate:
                self._fail(RequestTimeout(
                    "request body is arriving too slowly", reason="body_too_slow",
                    min_rate=self.min_rate, received=self.received,
                    seconds=round(now - self._start, 2)))
                self.min_rate = 0
        return data

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
                self.limit = decoder.limit = None
                decoder.ratio = 0
                continue
            if out:
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

    def close(self) -> None:
        self._restore()
