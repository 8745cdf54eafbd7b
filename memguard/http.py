"""HTTP framing and refusals, shared by the ASGI and WSGI middlewares and the uploads.

- :class:`RequestHead`: what the body policy needs from a request's headers (framing,
  Content-Type, Content-Encoding, Accept, Expect), filled in the one pass over them.
- :func:`declared_length`: the one Content-Length parser (ASCII digits only; one value,
  or duplicates that agree; never with Transfer-Encoding).
- :func:`refusal_response` and :func:`record`: what a refusal looks like on the wire,
  and its log line, counter and event.
"""

from __future__ import annotations

import http
import json
import logging
from collections.abc import Sequence
from typing import Any

from memguard import counters, events
from memguard.errors import MalformedRequest, RequestRejected

__all__ = [
    "BODY_HEADERS",
    "LINGER_BYTES",
    "LINGER_SECONDS",
    "RequestHead",
    "declared_length",
    "log_value",
    "reason_phrase",
    "record",
    "refusal_response",
    "status_line",
]

log = logging.getLogger("memguard.body")

# After a refusal, what is read and discarded of the rest of the body before the
# connection closes, so that a client still sending reads the answer instead of a reset
# (nginx's lingering close).
LINGER_BYTES = 4 << 20
LINGER_SECONDS = 1.0
# More digits than this is beyond any limit (and beyond int()'s comfort).
_MAX_DIGITS = 18
_ASCII_DIGITS = frozenset(b"0123456789")
BODY_HEADERS = frozenset({b"content-length", b"transfer-encoding", b"content-type",
                           b"content-encoding", b"accept", b"expect"})


class RequestHead:
    """What the body policy needs from a request's headers, found in one pass."""

    __slots__ = ("lengths", "codings", "content_type", "content_types", "encoding",
                 "accept", "expects_continue")

    def __init__(self) -> None:
        self.lengths: list[bytes] = []
        self.codings: list[bytes] = []
        self.content_type: bytes | None = None  # the first, as frameworks parse it
        self.content_types = 0
        self.encoding: bytes | None = None
        self.accept: bytes | None = None
        self.expects_continue = False  # the client waits for 100 Continue to send

    def add(self, name: bytes, value: bytes) -> None:
        if name == b"content-length":
            self.lengths.append(value)
        elif name == b"transfer-encoding":
            self.codings.append(value)
        elif name == b"content-type":
            self.content_types += 1
            if self.content_type is None:
                self.content_type = value
        elif name == b"content-encoding":
            self.encoding = value if self.encoding is None else self.encoding + b"," + value
        elif name == b"accept":
            self.accept = value
        elif name == b"expect":
            self.expects_continue = value.strip().lower() == b"100-continue"

    def declared_length(self) -> int | None:
        """The body's length, ``None`` for a chunked body (see :func:`declared_length`);
        a second Content-Type is refused: the limit would follow one and the framework
        parse the other."""
        if self.content_types > 1:
            raise MalformedRequest("more than one Content-Type header",
                                   reason="content_type_duplicate")
        return declared_length(self.lengths, self.codings)


def _is_digits(value: bytes) -> bool:
    # bytes.isdigit() is ASCII-only, but a str's accepts "²": WSGI values are str.
    return bool(value) and _ASCII_DIGITS.issuperset(value)


def declared_length(lengths: Sequence[bytes], codings: Sequence[bytes]) -> int | None:
    """The body's declared length, or ``None`` for a chunked body.

    Raises :class:`MalformedRequest` for a Content-Length that is not ASCII digits only,
    duplicates that differ, Content-Length with Transfer-Encoding, and a
    Transfer-Encoding whose last coding is not ``chunked``.
    """
    if codings:
        if lengths:
            raise MalformedRequest("Content-Length and Transfer-Encoding together",
                                   reason="content_length_with_transfer_encoding")
        joined = b",".join(codings)
        if joined.split(b",")[-1].strip().lower() != b"chunked":
            raise MalformedRequest("Transfer-Encoding must end with chunked",
                                   reason="transfer_encoding_unsupported",
                                   transfer_encoding=log_value(joined.decode("latin-1")))
        return None
    length: int | None = None
    for value in lengths:
        for item in value.split(b","):
            item = item.strip(b" \t")
            if not _is_digits(item):
                raise MalformedRequest(
                    "Content-Length must be digits only", reason="content_length_invalid",
                    content_length=log_value(value.decode("latin-1")[:40]))
            number = int(item) if len(item) <= _MAX_DIGITS else 10**_MAX_DIGITS
            if length is not None and number != length:
                raise MalformedRequest(
                    "conflicting Content-Length values", reason="content_length_conflict",
                    content_lengths=[log_value(v.decode("latin-1")[:40]) for v in lengths])
            length = number
    return length


def reason_phrase(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def status_line(status: int) -> str:
    """``"413 Content Too Large"``: a WSGI status."""
    return f"{status} {reason_phrase(status)}"


def refusal_response(exc: RequestRejected, accept: bytes | str | None,
                     close: bool = False) -> tuple[int, list[tuple[str, str]], bytes]:
    """Status, headers and body answering ``exc``: problem+json when the client accepts
    JSON, else one line of plain text. ``close`` adds ``Connection: close`` (ASGI
    servers honour it; a WSGI app must not send hop-by-hop headers, PEP 3333)."""
    phrase = reason_phrase(exc.status)
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


def log_value(value: Any) -> str:
    """A value from the request, safe in a log line: control characters (a ``%0A`` in a
    path would start a forged line) and quotes are escaped, as ``repr`` does."""
    text = value if isinstance(value, str) else str(value)
    if text.isprintable() and '"' not in text and "\\" not in text:
        return text
    return repr(text)[1:-1]


def record(exc: RequestRejected, method: str, path: str, report_only: bool) -> None:
    """The log line, counter and event of one refusal (or of one report-only let go).
    Counted under the refusal's area: ``body`` for the body policy, ``memory`` for
    memory pressure."""
    figures = " ".join(f"{k}={v}" for k, v in exc.figures.items())
    method, path = log_value(method), log_value(path)
    if report_only:
        log.warning("report-only: would refuse %s %s with %s %s (%s) %s", method, path,
                    exc.status, exc.reason, exc.detail, figures)
        counters.increment(exc.area, f"report_only:{exc.reason}")
    else:
        log.warning("refused %s %s with %s %s (%s) %s", method, path, exc.status,
                    exc.reason, exc.detail, figures)
        counters.increment(exc.area, exc.reason)
    fields = {k: v for k, v in exc.figures.items() if k not in ("kind", "ts", "pid")}
    fields.update(status=exc.status, reason=exc.reason, method=method, path=path,
                  report_only=report_only)
    events.emit("refusal", **fields)
