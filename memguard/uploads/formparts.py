"""python-multipart's callbacks with memguard's caps: one multipart body, part by part.

:class:`FormReader` is the callback set given to ``python_multipart``'s streaming
``MultipartParser``; it counts parts, fields and files as the parser meets them and
applies every cap at once, so a hostile body stops at the first part over a limit
(20,000 empty parts cost milliseconds: the parse ends at part ``max_parts + 1``).
Field values are collected (bounded); file data is queued, as views into the received
chunks, on the part's :class:`~memguard.uploads.spool.Spool`, which the caller
(:mod:`memguard.uploads.saving`) writes after each ``parser.write``. :class:`Feeder` adds what
the parser does not check: the bytes before the first boundary and after the last, and
the time spent parsing.
"""

from __future__ import annotations

import secrets
import sys
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any, NoReturn

from memguard.config import UploadOptions
from memguard.errors import (
    BodyTooLarge,
    MalformedRequest,
    RequestTimeout,
    UnsupportedMediaType,
)
from memguard.uploads.filenames import display_name, is_safe_component
from memguard.uploads.spool import TEMP_PREFIX, AsyncSpool, RequestBudget, Spool

__all__ = ["Feeder", "FormReader", "Namer", "Part", "boundary_of",
           "decode_header_text"]

Namer = Callable[[str, str, "str | None"], str]

PREAMBLE_LIMIT = 64 * 1024  # bytes before the first boundary (only CR/LF are allowed)
EPILOGUE_LIMIT = 64 * 1024  # bytes after the closing boundary


def decode_header_text(raw: bytes) -> str:
    # Header values arrive as latin-1 text; browsers put raw UTF-8 in them.
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


class Part:
    __slots__ = ("name", "filename", "content_type", "size", "value", "spool", "file",
                 "path", "sync_pending", "sync_pending_size")

    def __init__(self, name: str, filename: str | None, content_type: str | None) -> None:
        self.name = name
        self.filename = filename  # None: a field; a str (maybe ""): a file
        self.content_type = content_type
        self.size = 0
        self.value = bytearray()
        self.spool: Spool | None = None
        self.file: AsyncSpool | None = None
        self.path: Path | None = None
        self.sync_pending: list[bytes | memoryview] = []
        self.sync_pending_size = 0


class FormReader:
    """python-multipart's callbacks: counts, caps and allow-lists, applied as the parser
    meets each part, so a hostile body stops at the first part over a limit. Field
    values collect here (bounded); file data is queued on the part's spool, and the
    driver (async or sync) writes it after each ``parser.write``."""

    def __init__(self, opts: UploadOptions, directory: Path, budget: RequestBudget,
                 allowed: Collection[str] | None, namer: Namer | None, is_async: bool) -> None:
        self.opts = opts
        self.directory = directory
        self.budget = budget
        self.allowed = None if allowed is None else frozenset(allowed)
        self.namer = namer
        self.is_async = is_async
        self.fields_items: list[tuple[str, str]] = []
        self.fields_memory = 0  # bytes the collected fields' strings take
        self.parts = self.fields = self.files = 0
        self.part: Part | None = None
        self.open_files: list[Part] = []  # every file part begun: for abandon()
        self.finished: list[Part] = []  # file parts whose data is complete
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
        name = decode_header_text(raw_name)
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
            self.part = Part(name, None, ctype)
            return
        self.files += 1
        if self.files > self.opts.max_files:
            raise BodyTooLarge("The form has too many files.", reason="too_many_files",
                               limit=self.opts.max_files)
        part = Part(name, display_name(decode_header_text(raw_filename)), ctype)
        part.path = self.directory / self._file_name(part)
        part.spool = Spool(self.directory, self.budget, fsync=self.opts.fsync,
                           use_tmpfile=self.opts.tmpfile)
        if self.is_async:
            part.file = AsyncSpool(part.spool)
        self.open_files.append(part)
        self.part = part

    def _file_name(self, part: Part) -> str:
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
            if self.fields_memory + part.size > self.opts.max_fields_memory:
                self._fields_over_memory(self.fields_memory + part.size)
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
            # What the strings really take: CPython stores a str with one character
            # beyond Latin-1 at 2 or 4 bytes per character, so count the objects.
            self.fields_memory += sys.getsizeof(value) + sys.getsizeof(part.name)
            if self.fields_memory > self.opts.max_fields_memory:
                self._fields_over_memory(self.fields_memory)
            self.fields_items.append((part.name, value))
        else:
            self.finished.append(part)

    def _fields_over_memory(self, held: int) -> NoReturn:
        raise BodyTooLarge("The form's fields need more memory than allowed.",
                           reason="fields_over_memory_limit",
                           limit=self.opts.max_fields_memory, held=held, fields=self.fields)

    def on_end(self) -> None:
        self.ended = True


class Feeder:
    """Feeds chunks to python-multipart and keeps the checks the parser does not:
    bytes before the first boundary and after the last, and time spent parsing."""

    def __init__(self, form: FormReader, boundary: bytes) -> None:
        from python_multipart.exceptions import FormParserError, MultipartParseError
        from python_multipart.multipart import MultipartParser

        self.form = form
        self._parse_error: type[Exception] = MultipartParseError
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
        form = self.form
        if form.ended:
            self.after_end += len(chunk)
            if self.after_end > EPILOGUE_LIMIT:
                raise MalformedRequest("Too much data after the form's closing boundary.",
                                       reason="epilogue_too_long", limit=EPILOGUE_LIMIT)
            return
        started = time.perf_counter()
        try:
            self.parser.write(chunk)
        except self._parse_error as exc:
            raise MalformedRequest("The multipart body is malformed.",
                                   reason="multipart_syntax", error=str(exc)[:200]) from None
        self.parse_time += time.perf_counter() - started
        self.fed += len(chunk)
        if self.parse_time > form.opts.parse_budget:
            raise RequestTimeout("The form took too long to parse.", reason="parse_budget",
                                 limit=form.opts.parse_budget,
                                 spent=round(self.parse_time, 3), parts=form.parts)
        if form.parts == 0 and self.fed > PREAMBLE_LIMIT:
            raise MalformedRequest("No multipart boundary where the form should start.",
                                   reason="preamble_too_long", limit=PREAMBLE_LIMIT)

    def close(self) -> None:
        if not self.form.ended:
            raise MalformedRequest("The multipart body ended before its closing boundary.",
                                   reason="multipart_incomplete", parts=self.form.parts)


def boundary_of(content_type: str | None) -> bytes:
    # The first step of every form upload: a missing extra is said here, by name.
    try:
        from python_multipart.multipart import parse_options_header
    except ImportError:
        raise RuntimeError("form uploads need python-multipart: "
                           "pip install 'memguard-web[multipart]'") from None

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
