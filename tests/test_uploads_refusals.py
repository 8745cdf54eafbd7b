"""Regression tests for issue 16's upload defects: the fields' memory budget, overwrite
that never loses the old file, storage refusals without asyncio error records."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from memguard.errors import BodyTooLarge, InsufficientStorage, MalformedRequest
from memguard.uploads import (
    save_body,
    save_body_wsgi,
    save_multipart,
    save_multipart_wsgi,
    spool,
)
from tests import test_uploads
from tests.test_uploads import (
    CT,
    B,
    Feed,
    environ_for,
    form_body,
    listing,
    run,
    scope_for,
    split,
)

updir = test_uploads.updir  # the fixtures, shared
temp_mode = test_uploads.temp_mode

KIB = 1024
MIB = 1024 * KIB

# ---- defect 2: the non-file fields of one form have a memory budget --------------------


def wide_field(size: int) -> bytes:
    """``size`` bytes of UTF-8 whose one character beyond Latin-1 makes CPython store the
    whole string at four bytes per character."""
    return b"a" * (size - 4) + "\U0001f600".encode()


def multipart(form: bytes, directory: Any, wsgi: bool, **options: Any) -> Any:
    if wsgi:
        return save_multipart_wsgi(environ_for(form, ctype=CT), directory,  # type: ignore[arg-type]
                                   **options)
    return run(save_multipart({"type": "http", "headers": [(b"content-type", CT.encode())]},
                              directory, receive=Feed(split(form)),  # type: ignore[arg-type]
                              **options))


@pytest.mark.parametrize("wsgi", [False, True], ids=["asgi", "wsgi"])
def test_fields_are_counted_at_the_memory_their_strings_take(updir: Any, wsgi: bool) -> None:
    # Fields of 1 MiB, each with one emoji: 4 MiB of strings each (the issue: 64 of them
    # held 256 MiB from a 64 MiB body).
    form = form_body(*[(f"f{i}", None, wide_field(MIB)) for i in range(8)])
    with pytest.raises(BodyTooLarge) as info:
        multipart(form, updir, wsgi)
    assert info.value.status == 413 and info.value.reason == "fields_over_memory_limit"
    assert info.value.figures["limit"] == 4 * MIB
    assert info.value.figures["fields"] == 1  # the first field already takes 4 MiB
    assert listing(updir) == []  # type: ignore[arg-type]


@pytest.mark.parametrize("wsgi", [False, True], ids=["asgi", "wsgi"])
def test_the_budget_is_a_total_over_every_field(updir: Any, wsgi: bool) -> None:
    ascii_fields = [(f"f{i}", None, b"a" * 900 * KIB) for i in range(4)]
    result = multipart(form_body(*ascii_fields), updir, wsgi)  # 3.5 MiB: under 4 MiB
    assert len(result.fields) == 4  # type: ignore[attr-defined]
    with pytest.raises(BodyTooLarge) as info:
        multipart(form_body(*ascii_fields, ("last", None, b"a" * 900 * KIB)), updir, wsgi)
    assert info.value.reason == "fields_over_memory_limit"
    # Refused while the fifth field arrives, before its bytes are all held.
    assert info.value.figures["fields"] == 5
    result = multipart(form_body(*ascii_fields, ("last", None, b"a" * 900 * KIB)), updir,
                       wsgi, max_fields_memory="5MiB")
    assert len(result.fields) == 5  # type: ignore[attr-defined]


# ---- defect 4: overwrite=True never loses the old file ---------------------------------


def named(field: str, filename: str, content_type: str | None) -> str:
    return f"{field}.bin"


@pytest.mark.parametrize("wsgi", [False, True], ids=["asgi", "wsgi"])
def test_a_refused_later_part_keeps_the_file_it_would_replace(
        updir: Path, temp_mode: bool, wsgi: bool) -> None:
    old = updir / "doc.bin"
    old.write_bytes(b"old")
    form = form_body(("doc", "d.bin", os.urandom(200_000)), ("pad", None, b"p" * 200_000))
    # Then a part with no name: 400 part_without_name, read well after doc.bin's part.
    form = form[:-len(f"--{B}--\r\n")] + (
        f"--{B}\r\nContent-Disposition: form-data\r\n\r\nx\r\n--{B}--\r\n".encode())
    with pytest.raises(MalformedRequest) as info:
        multipart(form, updir, wsgi, name=named, overwrite=True)
    assert info.value.reason == "part_without_name"
    assert old.read_bytes() == b"old"
    assert listing(updir) == [str(old)]


@pytest.mark.parametrize("wsgi", [False, True], ids=["asgi", "wsgi"])
def test_overwrite_replaces_every_file_once_the_whole_form_succeeds(
        updir: Path, temp_mode: bool, wsgi: bool) -> None:
    (updir / "a.bin").write_bytes(b"old a")
    (updir / "b.bin").write_bytes(b"old b")
    new_a, new_b = os.urandom(100_000), os.urandom(70_000)
    result = multipart(form_body(("a", "x", new_a), ("b", "y", new_b)), updir, wsgi,
                       name=named, overwrite=True)
    assert [f.path.name for f in result.files] == ["a.bin", "b.bin"]  # type: ignore[attr-defined]
    assert (updir / "a.bin").read_bytes() == new_a and (updir / "b.bin").read_bytes() == new_b
    assert listing(updir) == [str(updir / "a.bin"), str(updir / "b.bin")]  # nothing kept aside


@pytest.mark.parametrize("wsgi", [False, True], ids=["asgi", "wsgi"])
def test_without_overwrite_an_existing_name_fails_the_whole_form(
        updir: Path, temp_mode: bool, wsgi: bool) -> None:
    (updir / "b.bin").write_bytes(b"theirs")
    with pytest.raises(FileExistsError):
        multipart(form_body(("a", "x", b"1" * 1000), ("b", "y", b"2" * 1000)), updir, wsgi,
                  name=named)
    assert (updir / "b.bin").read_bytes() == b"theirs"
    assert listing(updir) == [str(updir / "b.bin")]  # a.bin was not left behind


def test_save_body_cancelled_during_its_commit_keeps_the_old_file(
        updir: Path, temp_mode: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    dest = updir / "doc.bin"
    dest.write_bytes(b"old")
    committing = threading.Event()
    real_fsync = os.fsync

    def slow_fsync(fd: int) -> None:
        committing.set()
        time.sleep(0.2)
        real_fsync(fd)

    monkeypatch.setattr(spool.os, "fsync", slow_fsync)

    async def scenario() -> None:
        task = asyncio.create_task(save_body(
            scope_for(), dest, receive=Feed(split(os.urandom(300_000))), overwrite=True,
            fsync=True))
        while not committing.is_set():
            await asyncio.sleep(0.005)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(scenario())
    assert dest.read_bytes() == b"old"
    assert listing(updir) == [str(dest)]


def test_save_body_wsgi_interrupted_after_its_commit_keeps_the_old_file(
        updir: Path, temp_mode: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    dest = updir / "doc.bin"
    dest.write_bytes(b"old")
    real_replace = os.replace
    interrupted: list[bool] = []

    def replace_then_interrupt(src: Any, dst: Any) -> None:
        real_replace(src, dst)
        if Path(dst) == dest and not interrupted:
            interrupted.append(True)
            raise KeyboardInterrupt  # a signal arriving once the new file has its name

    monkeypatch.setattr(spool.os, "replace", replace_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        save_body_wsgi(environ_for(b"new" * 1000), dest, overwrite=True)
    assert interrupted and dest.read_bytes() == b"old"
    assert listing(updir) == [str(dest)]


# ---- defect 14: a storage refusal leaves no asyncio error record -----------------------


def test_a_507_with_writes_queued_behind_it_logs_no_asyncio_error(
        updir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    real_writev = os.writev

    def slow_writev(fd: int, buffers: Any) -> int:
        time.sleep(0.01)  # the disk lags: batches queue behind the one refused
        return real_writev(fd, buffers)

    monkeypatch.setattr(spool.os, "writev", slow_writev)
    with caplog.at_level(logging.ERROR):
        for _ in range(5):
            with pytest.raises(InsufficientStorage):
                run(save_body(scope_for(), updir / "f", receive=Feed(split(os.urandom(2 << 20))),
                              request_quota="640KiB", batch_size="64KiB"))
            gc.collect()  # an unretrieved future's error is logged when it is collected
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert listing(updir) == []


def test_a_refused_job_still_queued_at_discard_logs_no_asyncio_error(
        updir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The race above, made certain: the upload is abandoned while its writer job is
    still queued (every writer thread busy), and that job then fails (507)."""
    gate = threading.Event()

    async def scenario() -> None:
        budget = spool.RequestBudget(quota=10, process_limit=None, min_free=0)
        writer = spool.AsyncSpool(spool.Spool(updir, budget))
        blockers = [spool.executor().submit(gate.wait) for _ in range(64)]
        writer.add(b"x" * 100)
        await writer.flush()  # queued behind the blockers: not done yet
        assert writer.tail is not None and not writer.tail.done()
        asyncio.get_running_loop().call_later(0.05, gate.set)
        await writer.discard()  # waits for the job, which fails: over the quota
        for blocker in blockers:
            blocker.result()

    try:
        with caplog.at_level(logging.ERROR):
            run(scenario())
            gc.collect()
    finally:
        gate.set()
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert listing(updir) == []


# ---- defect 12: the client's text cannot forge a log line -----------------------------


def test_an_upload_refusal_log_line_keeps_the_clients_text_on_one_line(
        updir: Path, caplog: pytest.LogCaptureFixture) -> None:
    # A raw CR LF cannot be in a part header; what can is every other line break a log
    # viewer honours (U+2028, NEL) and terminal escapes.
    form = form_body(("x\u2028\x85\x1b[2J\x0bfake", None, b"1"))
    with caplog.at_level(logging.WARNING, logger="memguard.uploads"), \
            pytest.raises(MalformedRequest):
        multipart(form, updir, False, allowed_fields={"title"})
    (record,) = [r for r in caplog.records if r.name == "memguard.uploads"]
    message = record.getMessage()
    assert "reason=field_not_allowed" in message
    assert message.isprintable() and "x\\u2028\\x85\\x1b[2J\\x0bfake" in message
