"""memguard's exceptions: one base class, each refusal carrying its HTTP answer.

A :class:`RequestRejected` raised anywhere below the middleware (by the body wrapper,
by :mod:`memguard.uploads`, by an app) becomes a response with its ``status``, a short
body, ``Connection: close``, a log line with its ``reason`` code and a counter.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "BodyTooLarge",
    "InsufficientStorage",
    "LengthRequired",
    "MalformedRequest",
    "MemGuardError",
    "MemoryPressure",
    "RequestRejected",
    "RequestTimeout",
    "UnsupportedMediaType",
    "drop_tracebacks",
]


class MemGuardError(Exception):
    """Base class of every exception memguard raises."""


class RequestRejected(MemGuardError):
    """A request memguard refuses, with the HTTP status and a reason code.

    ``reason`` is a short stable code (``"content_length_over_limit"``) used in logs and
    metric labels; ``detail`` is the human sentence sent to the client; ``figures`` are
    the numbers behind the decision (limit, received, ...) for the log line.
    """

    status: int = 400
    default_reason: str = "rejected"
    #: Where the refusal is counted (:mod:`memguard.counters`): ``body`` for the body
    #: policy, ``memory`` for the worker's or the container's memory.
    area: str = "body"

    def __init__(
        self,
        detail: str,
        *,
        reason: str | None = None,
        headers: dict[str, str] | None = None,
        **figures: Any,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.reason = reason or self.default_reason
        self.headers = dict(headers or {})
        self.figures = figures


class MalformedRequest(RequestRejected):
    status = 400
    default_reason = "malformed"


class RequestTimeout(RequestRejected):
    status = 408
    default_reason = "timeout"


class LengthRequired(RequestRejected):
    status = 411
    default_reason = "length_required"


class BodyTooLarge(RequestRejected):
    status = 413
    default_reason = "body_too_large"


class UnsupportedMediaType(RequestRejected):
    status = 415
    default_reason = "unsupported_media_type"


class MemoryPressure(RequestRejected):
    """The worker or its container is short of memory: retry elsewhere or later."""

    status = 503
    default_reason = "memory_pressure"
    area = "memory"


class InsufficientStorage(RequestRejected):
    status = 507
    default_reason = "insufficient_storage"


def drop_tracebacks(exc: BaseException | None) -> None:
    """Let go of a refusal's traceback, and of those of the exceptions it was raised
    while handling (a slow body's CancelledError), once its request is over.

    A frame that caught the exception and returned (``except ... as exc: return``)
    keeps it in its locals, and the traceback keeps the frame: a reference cycle that
    holds the frames and the request's objects until the cycle collector runs, and in
    an older generation for longer. Never call it on an exception still being raised."""
    for _ in range(8):  # a chain is short; a longer one is not ours to walk
        if exc is None:
            return
        exc.__traceback__ = None
        exc = exc.__context__
