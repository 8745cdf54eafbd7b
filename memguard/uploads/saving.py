"""The four saves (raw body, multipart form; ASGI and WSGI) and what they share:
options, storage prechecks, the body sources and the refusal report."""

from __future__ import annotations

import logging
import os
from collections.abc import (
    AsyncGenerator,
    Awaitable,
    Callable,
    Collection,
    Iterator,
    Mapping,
    MutableMapping,
)
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from memguard import counters, events
from memguard.config import UploadOptions
from memguard.errors import (
    BodyTooLarge,
    InsufficientStorage,
    LengthRequired,
    MalformedRequest,
    RequestRejected,
)
from memguard.sizes import parse_size
from memguard.uploads.filenames import display_name
from memguard.uploads.formparts import (
    Feeder,
    FormReader,
    Namer,
    Part,
    boundary_of,
    decode_header_text,
)
from memguard.uploads.spool import AsyncSpool, RequestBudget, Spool, free_bytes

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

_WSGI_READ = 64 * 1024


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


def _options(max_size: int | str | None, route_limit: Any,
             kwargs: Mapping[str, Any]) -> UploadOptions:
    """The call's options, its body limit being, in order: ``max_size=``, the body
    guard's effective limit for this request, the ``upload_max_size`` option."""
    opts = UploadOptions.resolve(kwargs)
    if max_size is not None:
        return replace(opts, max_size=parse_size(max_size))
    if isinstance(route_limit, int) and not isinstance(route_limit, bool) and route_limit >= 0:
        return replace(opts, max_size=route_limit)
    return opts


def _budget(opts: UploadOptions, directory: Path) -> RequestBudget:
    floor = opts.min_free
    if isinstance(floor, str):  # "5%" of the target filesystem
        st = os.statvfs(directory)
        floor = parse_size(floor, total=st.f_blocks * st.f_frsize)
    return RequestBudget(quota=opts.request_quota, process_limit=opts.process_quota,
                         min_free=floor)


def _precheck(opts: UploadOptions, budget: RequestBudget, directory: Path,
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
    # Figures may hold the client's text (field names, a content type): repr() keeps
    # each record on one line, whatever the client sent.
    logger.warning("upload refused (%s): %s status=%s reason=%s %s", kind, exc.detail,
                   exc.status, exc.reason,
                   " ".join(f"{k}={v!r}" for k, v in sorted(exc.figures.items())))
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
    try:
        from python_multipart.multipart import parse_options_header
    except ImportError:  # the [multipart] extra is not installed: no display name
        return ""
    _, params = parse_options_header(value)
    raw = params.get(b"filename")
    return display_name(decode_header_text(raw)) if raw else ""


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
    received, at the end (the upload is then removed). With it, the file there is
    replaced atomically once the body is whole, and put back if the call still fails or
    is cancelled. ``options`` are the ``upload_*`` options without the prefix
    (``fsync=False``, ``min_free="5%"``, ...).
    """
    scope, receive_ = _asgi_source(request, receive)
    dest = Path(destination)
    route_limit, reject = _middleware_asgi(scope)
    opts = _options(max_size, route_limit, options)
    spool: Spool | None = None
    writer: AsyncSpool | None = None
    try:
        directory = _destination_directory(dest, overwrite)
        headers = _asgi_headers(scope)
        budget = _budget(opts, directory)
        _precheck(opts, budget, directory, _content_length(headers.get(b"content-length")))
        spool = Spool(directory, budget, fsync=opts.fsync, use_tmpfile=opts.tmpfile)
        writer = AsyncSpool(spool)
        batch = max(1, opts.batch_size)
        async with aclosing(_asgi_body(receive_, opts.max_size)) as chunks:
            async for chunk in chunks:
                writer.add(chunk)
                if writer.pending_size >= batch:
                    await writer.flush()
        await writer.finish(dest, overwrite)
        spool.confirm()
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
        except OSError as exc:
            # gunicorn raises NoMoreData (an IOError) or ConnectionResetError when the
            # client goes away mid-body: a refusal with its reason, not a traceback.
            raise MalformedRequest("The client disconnected before the body was complete.",
                                   reason="client_disconnected", received=received,
                                   error=type(exc).__name__) from exc
        if not chunk:
            break
        received += len(chunk)
        if received > limit:
            raise BodyTooLarge("The request body is larger than this upload allows.",
                               reason="body_over_limit", limit=limit, received=received)
        if remaining > 0:
            remaining -= len(chunk)
        # Views into the chunk are kept until written: it must not change.
        yield chunk if type(chunk) is bytes else bytes(chunk)
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
        batch = max(1, opts.batch_size)
        for chunk in _wsgi_body(environ, opts.max_size):
            pending.append(chunk)
            pending_size += len(chunk)
            if pending_size >= batch:
                spool.write(pending)
                pending, pending_size = [], 0
        spool.write(pending)
        spool.commit(dest, overwrite=overwrite)
        spool.confirm()
    except BaseException as exc:
        if spool is not None:
            spool.abandon()
        if isinstance(exc, RequestRejected):
            _reject(exc, "body", reject)
        raise
    disposition = environ.get("HTTP_CONTENT_DISPOSITION")
    return SavedFile(path=dest, size=spool.size, sha256=spool.sha256,
                     filename=_header_filename(disposition),
                     content_type=environ.get("CONTENT_TYPE") or None)


# --------------------------------------------------------------------------------------
# Multipart


def _saved_part(part: Part) -> SavedFile:
    assert part.spool is not None and part.path is not None
    return SavedFile(path=part.path, size=part.spool.size, sha256=part.spool.sha256,
                     filename=part.filename or "", content_type=part.content_type,
                     field_name=part.name)


def _confirmed(parts: list[Part]) -> list[SavedFile]:
    """The form succeeded: its files are the caller's (the files they replaced go)."""
    for part in parts:
        assert part.spool is not None
        part.spool.confirm()
    return [_saved_part(part) for part in parts]


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
    nothing: the files get their names only once the whole form is read, and if naming
    one fails, the others are undone (with ``overwrite``, the files they replaced are put
    back). ``options`` are the ``upload_*`` options without the prefix (``max_files=10``,
    ...).
    """
    scope, receive_ = _asgi_source(request, receive)
    folder = _form_directory(directory)
    route_limit, reject = _middleware_asgi(scope)
    opts = _options(max_size, route_limit, options)
    form: FormReader | None = None
    try:
        headers = _asgi_headers(scope)
        ctype = headers.get(b"content-type")
        boundary = boundary_of(ctype.decode("latin-1") if ctype else None)
        budget = _budget(opts, folder)
        _precheck(opts, budget, folder, _content_length(headers.get(b"content-length")))
        form = FormReader(opts, folder, budget, allowed_fields, name, is_async=True)
        done: list[Part] = []
        feeder = Feeder(form, boundary)
        batch = max(1, opts.batch_size)
        async with aclosing(_asgi_body(receive_, opts.max_size)) as chunks:
            async for chunk in chunks:
                feeder.feed(chunk)
                while form.finished:
                    part = form.finished.pop(0)
                    assert part.file is not None
                    await part.file.drain()
                    done.append(part)
                current = form.part
                if current is not None and current.file is not None \
                        and current.file.pending_size >= batch:
                    await current.file.flush()
        feeder.close()
        # All or nothing: the files get their names only once the whole form is read.
        for part in done:
            assert part.file is not None and part.path is not None
            await part.file.finish(part.path, overwrite)
        files = _confirmed(done)
    except BaseException as exc:
        if form is not None:
            # Newest first: a name two parts replaced gets its first file back last.
            for part in reversed(form.open_files):
                if part.file is not None:
                    await part.file.discard()
        if isinstance(exc, RequestRejected):
            _reject(exc, "multipart", reject)
        raise
    return MultipartResult(fields=dict(form.fields_items), files=files,
                           field_items=form.fields_items)


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
    form: FormReader | None = None
    try:
        boundary = boundary_of(environ.get("CONTENT_TYPE"))
        budget = _budget(opts, folder)
        _precheck(opts, budget, folder, _content_length(environ.get("CONTENT_LENGTH") or None))
        form = FormReader(opts, folder, budget, allowed_fields, name, is_async=False)
        done: list[Part] = []
        feeder = Feeder(form, boundary)
        batch = max(1, opts.batch_size)
        for chunk in _wsgi_body(environ, opts.max_size):
            feeder.feed(chunk)
            while form.finished:
                part = form.finished.pop(0)
                assert part.spool is not None
                part.spool.write(part.sync_pending)
                part.sync_pending, part.sync_pending_size = [], 0
                done.append(part)
            current = form.part
            if current is not None and current.spool is not None \
                    and current.sync_pending_size >= batch:
                current.spool.write(current.sync_pending)
                current.sync_pending, current.sync_pending_size = [], 0
        feeder.close()
        # All or nothing: the files get their names only once the whole form is read.
        for part in done:
            assert part.spool is not None and part.path is not None
            part.spool.commit(part.path, overwrite=overwrite)
        files = _confirmed(done)
    except BaseException as exc:
        if form is not None:
            # Newest first: a name two parts replaced gets its first file back last.
            for part in reversed(form.open_files):
                if part.spool is not None:
                    part.spool.abandon()
        if isinstance(exc, RequestRejected):
            _reject(exc, "multipart", reject)
        raise
    return MultipartResult(fields=dict(form.fields_items), files=files,
                           field_items=form.fields_items)
