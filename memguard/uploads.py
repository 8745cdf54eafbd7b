"""Streaming saves: a request body, or the files of a multipart form, straight to disk.

``await request.body()`` holds a whole upload in memory (twice, measured: 1.38 GB of RSS
for a 652 MB body). These calls never hold more than about two write batches (1 MiB
each by default) of one upload::

    saved = await save_body(request, "/data/video.mp4")           # ASGI
    result = await save_multipart(request, "/data/uploads/")      # result.fields, .files
    saved = save_body_wsgi(request.environ, "/data/video.mp4")    # Flask, Django WSGI

Each file is written to a temporary file in its destination's directory, hashed with
SHA-256 on the way, fsynced (``upload_fsync``) and given its name atomically; on a
client disconnect, a limit, an exception or a cancellation, nothing is left behind
(see :mod:`memguard.spool`). In ASGI apps the writes run in writer threads, one batch
in flight while the next is received, so the event loop never waits for the disk.

A refusal is a :class:`~memguard.errors.RequestRejected` with its HTTP status (413 too
large, 400 malformed, 408 parse budget, 411 no length, 415 not multipart, 507 storage):
``MemGuardMiddleware`` turns it into the response; without the middleware, catch it.
Every refusal is logged on ``memguard.uploads`` with its reason code and figures and
counted (``counters.get("uploads", reason)``).

A client's file name is never used as a path: multipart files get generated names
(or names from the caller's ``name=`` function, which must be one plain component) and
the client's name is kept, sanitised, as :attr:`SavedFile.filename` for display.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import time
from collections import deque
from collections.abc import (
    AsyncGenerator,
    Awaitable,
    Callable,
    Collection,
    Iterator,
    Mapping,
    MutableMapping,
)
from concurrent.futures import Future
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memguard import counters, events
from memguard.config import resolve
from memguard.errors import (
    BodyTooLarge,
    InsufficientStorage,
    LengthRequired,
    MalformedRequest,
    RequestRejected,
    RequestTimeout,
    UnsupportedMediaType,
)
from memguard.filenames import display_name, is_safe_component
from memguard.sizes import parse_size
from memguard.spool import TEMP_PREFIX, RequestBudget, Spool, executor, free_bytes

__all__ = [
    "MultipartResult",
    "SavedFile",
    "save_body",
    "save_body_wsgi",
    "save_multipart",
    "save_multipart_wsgi",
]

logger = logging.getLogger("memguard.uploads")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Namer = Callable[[str, str, "str | None"], str]

_WSGI_READ = 64 * 1024
_PREAMBLE_LIMIT = 64 * 1024  # bytes before the first boundary (only CR/LF are allowed)
_EPILOGUE_LIMIT = 64 * 1024  # bytes after the closing boundary


@dataclass(frozen=True)
class SavedFile:
    """A file saved whole at :attr:`path`."""

    path: Path
    size: int
    sha256: str
    filename: str
    """The client's name for the file, sanitised, for display only (never a path)."""
    content_type: str | None
    field_name: str | None = None
    """The multipart field the file came in (``None`` for a raw body)."""


@dataclass
class MultipartResult:
    """What :func:`save_multipart` stored: the form's fields and its saved files."""

    fields: dict[str, str] = field(default_factory=dict)
    """Field name -> value; when a name repeats, the last value (all are in field_items)."""
    files: list[SavedFile] = field(default_factory=list)
    field_items: list[tuple[str, str]] = field(default_factory=list)


# --------------------------------------------------------------------------------------
# Options


@dataclass(frozen=True)
class _Options:
    max_size: int
    fsync: bool
    min_free: int | str
    request_quota: int | None
    process_quota: int | None
    batch: int
    max_parts: int
    max_fields: int
    max_files: int
    max_field_size: int
    max_file_size: int | None
    max_part_header_size: int
    max_part_headers: int
    parse_budget: float
    tmpfile: bool


def _options(max_size: int | str | None, route_limit: Any, kwargs: Mapping[str, Any]) -> _Options:
    values = resolve(["uploads"], {f"upload_{k}": v for k, v in kwargs.items()})
    if max_size is not None:
        limit = parse_size(max_size)
    elif isinstance(route_limit, int) and not isinstance(route_limit, bool) and route_limit >= 0:
        limit = route_limit  # the body guard's effective limit for this request
    else:
        limit = values["upload_max_size"]
    return _Options(
        max_size=limit,
        fsync=values["upload_fsync"],
        min_free=values["upload_min_free"],
        request_quota=values["upload_request_quota"],
        process_quota=values["upload_process_quota"],
        batch=max(1, values["upload_batch_size"]),
        max_parts=values["upload_max_parts"],
        max_fields=values["upload_max_fields"],
        max_files=values["upload_max_files"],
        max_field_size=values["upload_max_field_size"],
        max_file_size=values["upload_max_file_size"],
        max_part_header_size=values["upload_max_part_header_size"],
        max_part_headers=values["upload_max_part_headers"],
        parse_budget=values["upload_parse_budget"],
        tmpfile=values["upload_tmpfile"],
    )


def _budget(opts: _Options, directory: Path) -> RequestBudget:
    floor = opts.min_free
    if isinstance(floor, str):  # "5%" of the target filesystem
        st = os.statvfs(directory)
        floor = parse_size(floor, total=st.f_blocks * st.f_frsize)
    return RequestBudget(quota=opts.request_quota, process_limit=opts.process_quota,
                         min_free=floor)


def _precheck(opts: _Options, budget: RequestBudget, directory: Path,
              length: int | None) -> None:
    """Refuse before reading a byte when the declared length cannot fit."""
    if length is None:
        return
    if length > opts.max_size:
        raise BodyTooLarge("The request body is larger than this upload allows.",
                           reason="content_length_over_limit", limit=opts.max_size,
                           content_length=length)
    if budget.quota is not None and length > budget.quota:
        raise _storage("request_temp_quota", "one request may use", limit=budget.quota,
                       content_length=length)
    if budget.min_free:
        free = free_bytes(directory)
        if free - length < budget.min_free:
            raise _storage("free_space_floor", "the server has free", free=free,
                           floor=budget.min_free, content_length=length,
                           directory=str(directory))


def _storage(reason: str, what: str, **figures: Any) -> RequestRejected:
    return InsufficientStorage(f"This upload needs more disk space than {what}.",
                               reason=reason, **figures)


def _reject(exc: RequestRejected, kind: str, reject: Any) -> None:
    """The log line, counter and event every refusal of ours gets, once; and the
    body-guard middleware's ``reject`` hook, when there is one, so that the refusal
    becomes the response even if the framework turns the exception into a 500."""
    if callable(reject):
        reject(exc)
    if getattr(exc, "_memguard_upload_seen", False):
        return  # raised by the middleware's body wrapper, which reports its own
    exc._memguard_upload_seen = True  # type: ignore[attr-defined]
    logger.warning("upload refused (%s): %s status=%s reason=%s %s", kind, exc.detail,
                   exc.status, exc.reason,
                   " ".join(f"{k}={v}" for k, v in sorted(exc.figures.items())))
    counters.increment("uploads", exc.reason)
    events.emit("refusal", area="uploads", reason=exc.reason, status=exc.status,
                **{k: v for k, v in exc.figures.items() if isinstance(v, (int, float, str))})


def _content_length(value: str | bytes | None) -> int | None:
    if value is None:
        return None
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    text = text.strip()
    if not text.isascii() or not text.isdigit():
        raise MalformedRequest("Invalid Content-Length header.",
                               reason="invalid_content_length", value=text[:40])
    return int(text)


def _header_filename(value: str | None) -> str:
    """The display name from a request's own ``Content-Disposition`` (raw uploads)."""
    if not value:
        return ""
    from python_multipart.multipart import parse_options_header

    _, params = parse_options_header(value)
    raw = params.get(b"filename")
    return display_name(_decode_header_text(raw)) if raw else ""


def _decode_header_text(raw: bytes) -> str:
    # Header values arrive as latin-1 text; browsers put raw UTF-8 in them.
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


# --------------------------------------------------------------------------------------
# Asynchronous writing: a few batches in flight per file, in order

# Batches one upload may have queued for its writer while the next is received. Waiting
# for every batch before reading on stalls the client (uvicorn stops reading the socket
# once it holds 64 KiB); three keep the loop reading while the disk and SHA-256 work,
# for at most (3 + 1) x batch_size of memory.
_DEPTH = 3


def _chained(prev: Future[Any] | None, func: Callable[..., Any], *args: Any) -> Any:
    """Run ``func`` after ``prev`` (a batch never overtakes the one before it); if
    ``prev`` failed, fail the same way without writing."""
    if prev is not None:
        prev.result()
    return func(*args)


def _after_quietly(prev: Future[Any] | None, func: Callable[..., Any], *args: Any) -> Any:
    if prev is not None:
        try:
            prev.result()
        except BaseException:
            pass
    return func(*args)


async def _result(job: Future[Any]) -> Any:
    if job.done():
        return job.result()
    # Shielded: cancelling the caller must never cancel a queued job, or a later job
    # (chained on it) could run while an earlier one still writes.
    return await asyncio.shield(asyncio.wrap_future(job))


class _AsyncFile:
    """Gathers chunks for one :class:`Spool` and writes them, in order, in writer
    threads, with up to ``_DEPTH`` batches in flight while more is received."""

    __slots__ = ("spool", "pending", "pending_size", "tail", "inflight")

    def __init__(self, spool: Spool) -> None:
        self.spool = spool
        self.pending: list[bytes | memoryview] = []
        self.pending_size = 0
        self.tail: Future[Any] | None = None  # the last job submitted
        self.inflight: deque[Future[Any]] = deque()

    def add(self, chunk: bytes | memoryview) -> None:
        self.pending.append(chunk)
        self.pending_size += len(chunk)

    def _submit(self, func: Callable[..., Any], *args: Any) -> Future[Any]:
        self.tail = executor().submit(_chained, self.tail, func, *args)
        return self.tail

    async def flush(self) -> None:
        chunks, self.pending, self.pending_size = self.pending, [], 0
        inflight = self.inflight
        inflight.append(self._submit(self.spool.write, chunks))
        # Collect finished jobs (a refusal such as a full quota surfaces here, early)
        # and wait only when too many are queued.
        while inflight and (inflight[0].done() or len(inflight) > _DEPTH):
            await _result(inflight.popleft())

    async def finish(self, destination: Path, overwrite: bool) -> None:
        chunks, self.pending, self.pending_size = self.pending, [], 0
        spool = self.spool

        def write_and_commit() -> Path:
            spool.write(chunks)
            return spool.commit(destination, overwrite=overwrite)

        self.inflight.clear()
        await _result(self._submit(write_and_commit))

    async def discard(self) -> None:
        """Remove the file, waiting for the jobs in flight first, so that the file is
        gone when the caller sees the exception (if this wait is itself cancelled, the
        removal still happens, after the last job)."""
        tail = self.tail
        try:
            if tail is not None and not tail.done():
                await asyncio.wait([asyncio.wrap_future(tail)])
        finally:
            self.abandon()

    def abandon(self) -> None:
        """Remove the file once no thread touches it: now, or as a job queued after the
        last one (closing a descriptor another thread writes to could hit a reused one)."""
        self.pending = []
        self.inflight.clear()
        tail, self.tail = self.tail, None
        if tail is None or tail.done():
            _abandon(self.spool)
            return
        try:
            executor().submit(_after_quietly, tail, _abandon, self.spool)
        except RuntimeError:  # interpreter shutting down: no new jobs
            tail.add_done_callback(lambda _: _abandon(self.spool))


def _abandon(spool: Spool) -> None:
    """Discard a spool; if it had already been committed (a cancellation that arrived
    while the commit ran), remove the committed file too: the caller never learnt of it."""
    spool.discard()
    if spool.path is not None:
        try:
            os.unlink(spool.path)
        except OSError:
            pass
        spool.path = None


def _asgi_source(request: Any, receive: Receive | None) -> tuple[Scope, Receive]:
    if isinstance(request, MutableMapping):
        if receive is None:
            raise TypeError("save_body(scope, ...) needs receive=: the ASGI receive callable")
        return request, receive
    scope = getattr(request, "scope", None)
    request_receive = getattr(request, "receive", None)
    if scope is None or request_receive is None:
        raise TypeError(f"expected a Starlette/FastAPI Request or an ASGI scope, not "
                        f"{type(request).__name__}")
    if getattr(request, "_stream_consumed", False):
        raise RuntimeError("the request body was already read; call save_body/save_multipart "
                           "before anything reads request.body(), .form() or .stream()")
    return scope, receive if receive is not None else request_receive


def _asgi_headers(scope: Scope) -> dict[bytes, bytes]:
    headers: dict[bytes, bytes] = {}
    for name, value in scope.get("headers", ()):
        headers.setdefault(bytes(name).lower(), bytes(value))
    return headers


def _middleware_asgi(scope: Scope) -> tuple[Any, Any]:
    """The body guard's (limit, reject hook) for this request, when it runs."""
    extensions = scope.get("extensions") or {}
    memguard = extensions.get("memguard") or {}
    return memguard.get("max_body_size"), memguard.get("reject")


async def _asgi_body(receive: Receive, limit: int) -> AsyncGenerator[bytes, None]:
    """Yield the body's chunks, enforcing ``limit`` on real bytes (chunked bodies too)."""
    received = 0
    while True:
        try:
            message = await receive()
        except RequestRejected as exc:
            # The body guard's wrapper refused the body: it logs and answers that itself.
            exc._memguard_upload_seen = True  # type: ignore[attr-defined]
            raise
        kind = message["type"]
        if kind == "http.request":
            chunk = message.get("body", b"")
            if chunk:
                received += len(chunk)
                if received > limit:
                    raise BodyTooLarge("The request body is larger than this upload allows.",
                                       reason="body_over_limit", limit=limit,
                                       received=received)
                # Views into the chunk are kept until written: it must not change.
                yield chunk if type(chunk) is bytes else bytes(chunk)
            if not message.get("more_body", False):
                return
        elif kind == "http.disconnect":
            raise MalformedRequest("The client disconnected before the body was complete.",
                                   reason="client_disconnected", received=received)


# --------------------------------------------------------------------------------------
# Raw body


async def save_body(
    request: Any,
    destination: str | os.PathLike[str],
    *,
    receive: Receive | None = None,
    max_size: int | str | None = None,
    overwrite: bool = False,
    **options: Any,
) -> SavedFile:
    """Stream the request body to the file ``destination``; return it as saved.

    ``request`` is a Starlette/FastAPI ``Request``, or an ASGI scope with ``receive=``.
    The body limit is ``max_size``, else the body-guard middleware's limit for this
    route, else the ``upload_max_size`` option. ``destination``'s directory must exist.
    Without ``overwrite`` an existing file there is never replaced: ``FileExistsError``
    is raised before the body is read, or, if the name appears while the body is
    received, at the end (the upload is then removed). ``options`` are the ``upload_*``
    options without the prefix (``fsync=False``, ``min_free="5%"``, ...).
    """
    scope, receive_ = _asgi_source(request, receive)
    dest = Path(destination)
    route_limit, reject = _middleware_asgi(scope)
    opts = _options(max_size, route_limit, options)
    spool: Spool | None = None
    writer: _AsyncFile | None = None
    try:
        directory = _destination_directory(dest, overwrite)
        headers = _asgi_headers(scope)
        budget = _budget(opts, directory)
        _precheck(opts, budget, directory, _content_length(headers.get(b"content-length")))
        spool = Spool(directory, budget, fsync=opts.fsync, use_tmpfile=opts.tmpfile)
        writer = _AsyncFile(spool)
        batch = opts.batch
        async with aclosing(_asgi_body(receive_, opts.max_size)) as chunks:
            async for chunk in chunks:
                writer.add(chunk)
                if writer.pending_size >= batch:
                    await writer.flush()
        await writer.finish(dest, overwrite)
    except BaseException as exc:
        if writer is not None:
            await writer.discard()
        if isinstance(exc, RequestRejected):
            _reject(exc, "body", reject)
        raise
    ctype = headers.get(b"content-type")
    disposition = headers.get(b"content-disposition")
    return SavedFile(
        path=dest, size=spool.size, sha256=spool.sha256,
        filename=_header_filename(disposition.decode("latin-1") if disposition else None),
        content_type=ctype.decode("latin-1") if ctype else None,
    )


def _destination_directory(dest: Path, overwrite: bool) -> Path:
    directory = dest.parent
    if not directory.is_dir():
        raise FileNotFoundError(f"the directory of {dest} does not exist")
    if not overwrite and os.path.lexists(dest):
        raise FileExistsError(f"{dest} exists (pass overwrite=True to replace it)")
    return directory


# --------------------------------------------------------------------------------------
# WSGI


def _wsgi_body(environ: Mapping[str, Any], limit: int) -> Iterator[bytes]:
    """Yield the body's chunks from ``wsgi.input``.

    With ``wsgi.input_terminated`` (gunicorn sets it, and must for chunked bodies) the
    stream ends at the body's end, so read to EOF; otherwise read exactly
    CONTENT_LENGTH bytes (PEP 3333), and refuse a body with neither (411).
    """
    stream = environ["wsgi.input"]
    length = _content_length(environ.get("CONTENT_LENGTH") or None)
    terminated = bool(environ.get("wsgi.input_terminated"))
    if length is None and not terminated:
        raise LengthRequired("A Content-Length header is required for this upload.",
                             reason="length_required")
    received = 0
    remaining = length if length is not None else -1
    read = stream.read
    while remaining != 0:
        size = _WSGI_READ if remaining < 0 else min(_WSGI_READ, remaining)
        try:
            chunk = read(size)
        except RequestRejected as exc:
            exc._memguard_upload_seen = True  # type: ignore[attr-defined]
            raise
        if not chunk:
            break
        received += len(chunk)
        if received > limit:
            raise BodyTooLarge("The request body is larger than this upload allows.",
                               reason="body_over_limit", limit=limit, received=received)
        if remaining > 0:
            remaining -= len(chunk)
        yield chunk
    if length is not None and received < length:
        raise MalformedRequest("The client disconnected before the body was complete.",
                               reason="client_disconnected", received=received,
                               content_length=length)


def save_body_wsgi(
    environ: MutableMapping[str, Any],
    destination: str | os.PathLike[str],
    *,
    max_size: int | str | None = None,
    overwrite: bool = False,
    **options: Any,
) -> SavedFile:
    """:func:`save_body` for WSGI: pass ``request.environ`` before anything reads the body
    (Flask's ``request.data``/``.form``, Django's ``request.body``/``.POST``)."""
    dest = Path(destination)
    opts = _options(max_size, environ.get("memguard.max_body_size"), options)
    reject = environ.get("memguard.reject")
    spool: Spool | None = None
    try:
        directory = _destination_directory(dest, overwrite)
        budget = _budget(opts, directory)
        _precheck(opts, budget, directory, _content_length(environ.get("CONTENT_LENGTH") or None))
        spool = Spool(directory, budget, fsync=opts.fsync, use_tmpfile=opts.tmpfile)
        pending: list[bytes] = []
        pending_size = 0
        batch = opts.batch
        for chunk in _wsgi_body(environ, opts.max_size):
            pending.append(chunk)
            pending_size += len(chunk)
            if pending_size >= batch:
                spool.write(pending)
                pending, pending_size = [], 0
        spool.write(pending)
        spool.commit(dest, overwrite=overwrite)
    except BaseException as exc:
        if spool is not None:
            _abandon(spool)
        if isinstance(exc, RequestRejected):
            _reject(exc, "body", reject)
        raise
    disposition = environ.get("HTTP_CONTENT_DISPOSITION")
    return SavedFile(path=dest, size=spool.size, sha256=spool.sha256,
                     filename=_header_filename(disposition),
                     content_type=environ.get("CONTENT_TYPE") or None)


# --------------------------------------------------------------------------------------
# Multipart


class _Part:
    __slots__ = ("name", "filename", "content_type", "size", "value", "spool", "file",
                 "path", "sync_pending", "sync_pending_size")

    def __init__(self, name: str, filename: str | None, content_type: str | None) -> None:
        self.name = name
        self.filename = filename  # None: a field; a str (maybe ""): a file
        self.content_type = content_type
        self.size = 0
        self.value = bytearray()
        self.spool: Spool | None = None
        self.file: _AsyncFile | None = None
        self.path: Path | None = None
        self.sync_pending: list[bytes | memoryview] = []
        self.sync_pending_size = 0


class _Form:
    """python-multipart's callbacks: counts, caps and allow-lists, applied as the parser
    meets each part, so a hostile body stops at the first part over a limit. Field
    values collect here (bounded); file data is queued on the part's spool, and the
    driver (async or sync) writes it after each ``parser.write``."""

    def __init__(self, opts: _Options, directory: Path, budget: RequestBudget,
                 allowed: Collection[str] | None, namer: Namer | None, is_async: bool) -> None:
        self.opts = opts
        self.directory = directory
        self.budget = budget
        self.allowed = None if allowed is None else frozenset(allowed)
        self.namer = namer
        self.is_async = is_async
        self.result = MultipartResult()
        self.parts = self.fields = self.files = 0
        self.part: _Part | None = None
        self.open_files: list[_Part] = []  # every file part begun: for abandon()
        self.finished: list[_Part] = []  # file parts whose data is complete
        self.ended = False
        self._headers: dict[bytes, bytes] = {}
        self._hname = bytearray()
        self._hvalue = bytearray()

    def callbacks(self) -> dict[str, Any]:
        return {
            "on_part_begin": self.on_part_begin,
            "on_header_field": self.on_header_field,
            "on_header_value": self.on_header_value,
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
            "on_part_data": self.on_part_data,
            "on_part_end": self.on_part_end,
            "on_end": self.on_end,
        }

    def on_part_begin(self) -> None:
        self.parts += 1
        if self.parts > self.opts.max_parts:
            raise BodyTooLarge("The form has too many parts.", reason="too_many_parts",
                               limit=self.opts.max_parts)
        self._headers = {}
        self.part = None

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._hname += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._hvalue += data[start:end]

    def on_header_end(self) -> None:
        self._headers[bytes(self._hname).lower()] = bytes(self._hvalue)
        self._hname.clear()
        self._hvalue.clear()

    def on_headers_finished(self) -> None:
        from python_multipart.multipart import parse_options_header

        disposition = self._headers.get(b"content-disposition")
        if disposition is None:
            raise MalformedRequest("A form part has no Content-Disposition header.",
                                   reason="part_without_disposition", part=self.parts)
        kind, params = parse_options_header(disposition)
        raw_name = params.get(b"name")
        if kind != b"form-data" or raw_name is None:
            raise MalformedRequest("A form part is not a named form-data part.",
                                   reason="part_without_name", part=self.parts)
        name = _decode_header_text(raw_name)
        if self.allowed is not None and name not in self.allowed:
            raise MalformedRequest("The form has a field this upload does not accept.",
                                   reason="field_not_allowed", field=name[:100])
        ctype_raw = self._headers.get(b"content-type")
        ctype = ctype_raw.decode("latin-1") if ctype_raw is not None else None
        raw_filename = params.get(b"filename")
        if raw_filename is None:
            self.fields += 1
            if self.fields > self.opts.max_fields:
                raise BodyTooLarge("The form has too many fields.", reason="too_many_fields",
                                   limit=self.opts.max_fields)
            self.part = _Part(name, None, ctype)
            return
        self.files += 1
        if self.files > self.opts.max_files:
            raise BodyTooLarge("The form has too many files.", reason="too_many_files",
                               limit=self.opts.max_files)
        part = _Part(name, display_name(_decode_header_text(raw_filename)), ctype)
        part.path = self.directory / self._file_name(part)
        part.spool = Spool(self.directory, self.budget, fsync=self.opts.fsync,
                           use_tmpfile=self.opts.tmpfile)
        if self.is_async:
            part.file = _AsyncFile(part.spool)
        self.open_files.append(part)
        self.part = part

    def _file_name(self, part: _Part) -> str:
        if self.namer is None:
            return secrets.token_hex(16)
        chosen = self.namer(part.name, part.filename or "", part.content_type)
        if not isinstance(chosen, str) or not is_safe_component(chosen) \
                or chosen.startswith(TEMP_PREFIX):
            raise ValueError(f"the name= function returned {chosen!r}: it must be one plain "
                             f"file name (no separators, not '.' or '..', no NUL)")
        return chosen

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        part = self.part
        if part is None:
            return
        size = end - start
        part.size += size
        if part.filename is None:
            if part.size > self.opts.max_field_size:
                raise BodyTooLarge("A form field is larger than allowed.",
                                   reason="field_too_large", limit=self.opts.max_field_size,
                                   field=part.name[:100])
            part.value += data[start:end]
            return
        limit = self.opts.max_file_size
        if limit is not None and part.size > limit:
            raise BodyTooLarge("A file in the form is larger than allowed.",
                               reason="file_too_large", limit=limit, field=part.name[:100])
        # A view, not a copy: ``data`` is the immutable chunk the server gave us.
        chunk = memoryview(data)[start:end]
        if part.file is not None:
            part.file.add(chunk)
        else:
            part.sync_pending.append(chunk)
            part.sync_pending_size += size

    def on_part_end(self) -> None:
        part = self.part
        self.part = None
        if part is None:
            return
        if part.filename is None:
            try:
                value = part.value.decode("utf-8")
            except UnicodeDecodeError:
                raise MalformedRequest("A form field is not valid UTF-8.",
                                       reason="field_not_utf8", field=part.name[:100]) from None
            self.result.field_items.append((part.name, value))
            self.result.fields[part.name] = value
        else:
            self.finished.append(part)

    def on_end(self) -> None:
        self.ended = True

    def saved(self, part: _Part) -> SavedFile:
        assert part.spool is not None and part.path is not None
        saved = SavedFile(path=part.path, size=part.spool.size, sha256=part.spool.sha256,
                          filename=part.filename or "", content_type=part.content_type,
                          field_name=part.name)
        self.result.files.append(saved)
        return saved


class _Feeder:
    """Feeds chunks to python-multipart and keeps the checks the parser does not:
    bytes before the first boundary and after the last, and time spent parsing."""

    def __init__(self, form: _Form, boundary: bytes) -> None:
        from python_multipart.exceptions import FormParserError
        from python_multipart.multipart import MultipartParser

        self.form = form
        self.fed = 0
        self.after_end = 0
        self.parse_time = 0.0
        try:
            self.parser = MultipartParser(
                boundary, form.callbacks(),  # type: ignore[arg-type]
                max_header_count=form.opts.max_part_headers,
                max_header_size=form.opts.max_part_header_size,
            )
        except FormParserError as exc:
            raise MalformedRequest("The multipart boundary is invalid.",
                                   reason="invalid_boundary", error=str(exc)) from None

    def feed(self, chunk: bytes) -> None:
        from python_multipart.exceptions import MultipartParseError

        form = self.form
        if form.ended:
            self.after_end += len(chunk)
            if self.after_end > _EPILOGUE_LIMIT:
                raise MalformedRequest("Too much data after the form's closing boundary.",
                                       reason="epilogue_too_long", limit=_EPILOGUE_LIMIT)
            return
        started = time.perf_counter()
        try:
            self.parser.write(chunk)
        except MultipartParseError as exc:
            raise MalformedRequest("The multipart body is malformed.",
                                   reason="multipart_syntax", error=str(exc)[:200]) from None
        self.parse_time += time.perf_counter() - started
        self.fed += len(chunk)
        if self.parse_time > form.opts.parse_budget:
            raise RequestTimeout("The form took too long to parse.", reason="parse_budget",
                                 limit=form.opts.parse_budget,
                                 spent=round(self.parse_time, 3), parts=form.parts)
        if form.parts == 0 and self.fed > _PREAMBLE_LIMIT:
            raise MalformedRequest("No multipart boundary where the form should start.",
                                   reason="preamble_too_long", limit=_PREAMBLE_LIMIT)

    def close(self) -> None:
        if not self.form.ended:
            raise MalformedRequest("The multipart body ended before its closing boundary.",
                                   reason="multipart_incomplete", parts=self.form.parts)


def _boundary(content_type: str | None) -> bytes:
    from python_multipart.multipart import parse_options_header

    kind, params = parse_options_header(content_type)
    if kind != b"multipart/form-data":
        raise UnsupportedMediaType("This upload expects multipart/form-data.",
                                   reason="not_multipart",
                                   content_type=(content_type or "")[:100])
    boundary = params.get(b"boundary")
    if not boundary:
        raise MalformedRequest("The multipart Content-Type has no boundary.",
                               reason="missing_boundary")
    return boundary


def _form_directory(directory: str | os.PathLike[str]) -> Path:
    path = Path(directory)
    if not path.is_dir():
        raise FileNotFoundError(f"upload directory {path} does not exist")
    return path


async def save_multipart(
    request: Any,
    directory: str | os.PathLike[str],
    *,
    receive: Receive | None = None,
    max_size: int | str | None = None,
    allowed_fields: Collection[str] | None = None,
    name: Namer | None = None,
    overwrite: bool = False,
    **options: Any,
) -> MultipartResult:
    """Parse a ``multipart/form-data`` body, saving each file part under ``directory``.

    Files get generated names (32 hex characters), or ``name(field, filename,
    content_type)`` (the sanitised client file name) which must return one plain file
    name. ``allowed_fields`` refuses any part whose name is not in it (400). All or
    nothing: if any part fails, files this call already saved are removed. ``options``
    are the ``upload_*`` options without the prefix (``max_files=10``, ...).
    """
    scope, receive_ = _asgi_source(request, receive)
    folder = _form_directory(directory)
    route_limit, reject = _middleware_asgi(scope)
    opts = _options(max_size, route_limit, options)
    form: _Form | None = None
    try:
        headers = _asgi_headers(scope)
        ctype = headers.get(b"content-type")
        boundary = _boundary(ctype.decode("latin-1") if ctype else None)
        budget = _budget(opts, folder)
        _precheck(opts, budget, folder, _content_length(headers.get(b"content-length")))
        form = _Form(opts, folder, budget, allowed_fields, name, is_async=True)
        feeder = _Feeder(form, boundary)
        batch = opts.batch
        async with aclosing(_asgi_body(receive_, opts.max_size)) as chunks:
            async for chunk in chunks:
                feeder.feed(chunk)
                while form.finished:
                    part = form.finished.pop(0)
                    assert part.file is not None and part.path is not None
                    await part.file.finish(part.path, overwrite)
                    form.saved(part)
                current = form.part
                if current is not None and current.file is not None \
                        and current.file.pending_size >= batch:
                    await current.file.flush()
        feeder.close()
    except BaseException as exc:
        if form is not None:
            for part in form.open_files:
                if part.file is not None:
                    await part.file.discard()
        if isinstance(exc, RequestRejected):
            _reject(exc, "multipart", reject)
        raise
    return form.result


def save_multipart_wsgi(
    environ: MutableMapping[str, Any],
    directory: str | os.PathLike[str],
    *,
    max_size: int | str | None = None,
    allowed_fields: Collection[str] | None = None,
    name: Namer | None = None,
    overwrite: bool = False,
    **options: Any,
) -> MultipartResult:
    """:func:`save_multipart` for WSGI: pass ``request.environ`` before anything reads the
    body (Flask's ``request.form``/``.files``, Django's ``request.POST``/``.FILES``)."""
    folder = _form_directory(directory)
    opts = _options(max_size, environ.get("memguard.max_body_size"), options)
    reject = environ.get("memguard.reject")
    form: _Form | None = None
    try:
        boundary = _boundary(environ.get("CONTENT_TYPE"))
        budget = _budget(opts, folder)
        _precheck(opts, budget, folder, _content_length(environ.get("CONTENT_LENGTH") or None))
        form = _Form(opts, folder, budget, allowed_fields, name, is_async=False)
        feeder = _Feeder(form, boundary)
        batch = opts.batch
        for chunk in _wsgi_body(environ, opts.max_size):
            feeder.feed(chunk)
            while form.finished:
                part = form.finished.pop(0)
                assert part.spool is not None and part.path is not None
                part.spool.write(part.sync_pending)
                part.sync_pending = []
                part.spool.commit(part.path, overwrite=overwrite)
                form.saved(part)
            current = form.part
            if current is not None and current.spool is not None \
                    and current.sync_pending_size >= batch:
                current.spool.write(current.sync_pending)
                current.sync_pending, current.sync_pending_size = [], 0
        feeder.close()
    except BaseException as exc:
        if form is not None:
            for part in form.open_files:
                if part.spool is not None:
                    _abandon(part.spool)
        if isinstance(exc, RequestRejected):
            _reject(exc, "multipart", reject)
        raise
    return form.result
