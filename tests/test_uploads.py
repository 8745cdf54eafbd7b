"""save_body / save_multipart (ASGI) and their WSGI twins, in process.

The real-server layer (uvicorn, gunicorn, big bodies, peak RSS) is in
test_uploads_servers.py; here every edge is driven exactly through scope/receive or a
WSGI environ.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import io
import logging
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from memguard import counters
from memguard.errors import (
    BodyTooLarge,
    InsufficientStorage,
    LengthRequired,
    MalformedRequest,
    RequestRejected,
    RequestTimeout,
    UnsupportedMediaType,
)
from memguard.uploads import (
    save_body,
    save_body_wsgi,
    save_multipart,
    save_multipart_wsgi,
    spool,
)

B = "testboundary42"
CT = f"multipart/form-data; boundary={B}"


def listing(*dirs: Path) -> list[str]:
    return sorted(str(p) for d in dirs for p in d.rglob("*"))


@pytest.fixture
def updir(tmp_path: Path) -> Iterator[Path]:
    d = tmp_path / "uploads"
    d.mkdir()
    yield d


@pytest.fixture(params=[True, False], ids=["o_tmpfile", "named_temp"])
def temp_mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """Run a test with both temporary-file strategies (O_TMPFILE and a named file)."""
    if request.param and not spool._HAVE_TMPFILE:
        pytest.skip("no O_TMPFILE here")
    monkeypatch.setattr(spool, "_HAVE_TMPFILE", request.param)
    return bool(request.param)


def scope_for(headers: dict[str, str] | None = None, extensions: Any = None) -> dict[str, Any]:
    scope: dict[str, Any] = {
        "type": "http", "method": "POST", "path": "/", "query_string": b"",
        "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()],
    }
    if extensions is not None:
        scope["extensions"] = extensions
    return scope


class Feed:
    """An ASGI receive that plays ``chunks`` (then an optional disconnect) and counts."""

    def __init__(self, chunks: list[bytes], *, disconnect: bool = False,
                 pause: asyncio.Event | None = None) -> None:
        self.chunks = list(chunks)
        self.disconnect = disconnect
        self.calls = 0
        self.pause = pause

    async def __call__(self) -> dict[str, Any]:
        self.calls += 1
        if self.chunks:
            chunk = self.chunks.pop(0)
            more = bool(self.chunks) or self.disconnect or self.pause is not None
            return {"type": "http.request", "body": chunk, "more_body": more}
        if self.pause is not None:
            self.pause.set()
            await asyncio.sleep(3600)
        return {"type": "http.disconnect"}


def split(data: bytes, size: int = 65536) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)] or [b""]


def form_body(*parts: tuple[str, str | None, bytes], boundary: str = B) -> bytes:
    out = b""
    for name, filename, value in parts:
        disp = f'form-data; name="{name}"'
        if filename is not None:
            disp += f'; filename="{filename}"'
        out += f"--{boundary}\r\nContent-Disposition: {disp}\r\n".encode()
        if filename is not None:
            out += b"Content-Type: application/octet-stream\r\n"
        out += b"\r\n" + value + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


def run(coro: Any) -> Any:
    return asyncio.run(coro)


# ---- raw body -------------------------------------------------------------------------


def test_save_body_streams_to_disk_whole(updir: Path, temp_mode: bool) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    dest = updir / "video.mp4"
    saved = run(save_body(scope_for({"content-type": "video/mp4",
                                     "content-length": str(len(data))}),
                          dest, receive=Feed(split(data)), batch_size="256KiB"))
    assert dest.read_bytes() == data
    assert saved.path == dest and saved.size == len(data)
    assert saved.sha256 == hashlib.sha256(data).hexdigest()
    assert saved.content_type == "video/mp4" and saved.filename == ""
    assert listing(updir) == [str(dest)]  # no temporary file left next to it


@pytest.mark.parametrize("fsync", [False, True])
def test_fsync_only_when_asked_then_file_and_directory(
    updir: Path, temp_mode: bool, fsync: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """upload_fsync is off by default; on, the file is fsynced before it gets its name
    (and its writeback started as it is written), and its directory after."""
    synced: list[tuple[str, bool]] = []  # (what, did the destination exist yet)
    dest = updir / "video.mp4"
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        kind = "dir" if os.path.isdir(f"/proc/self/fd/{fd}") else "file"
        synced.append((kind, dest.exists()))
        real_fsync(fd)

    monkeypatch.setattr(spool.os, "fsync", spy)
    data = os.urandom(20 * 1024 * 1024 + 5)
    options = {"fsync": True} if fsync else {}
    saved = run(save_body(scope_for({"content-length": str(len(data))}), dest,
                          receive=Feed(split(data)), **options))
    assert dest.read_bytes() == data and saved.sha256 == hashlib.sha256(data).hexdigest()
    assert synced == ([("file", False), ("dir", True)] if fsync else [])
    assert listing(updir) == [str(dest)]


def test_save_body_takes_a_starlette_request(updir: Path) -> None:
    from starlette.requests import Request

    data = b"abc" * 1000
    request = Request(scope_for({"content-disposition": 'attachment; filename="../a\u202e.txt"'}),
                      Feed([data]))
    saved = run(save_body(request, updir / "x"))
    assert saved.size == 3000 and (updir / "x").read_bytes() == data
    assert saved.filename == "a.txt"


def test_content_length_over_limit_is_refused_before_reading(updir: Path) -> None:
    feed = Feed([b"x" * 10])
    with pytest.raises(BodyTooLarge) as info:
        run(save_body(scope_for({"content-length": "5000"}), updir / "f", receive=feed,
                      max_size=4096))
    assert info.value.reason == "content_length_over_limit" and info.value.status == 413
    assert feed.calls == 0
    assert listing(updir) == []


def test_chunked_body_over_limit_leaves_nothing(updir: Path, temp_mode: bool) -> None:
    chunks = split(os.urandom(5 * 1024 * 1024))
    with pytest.raises(BodyTooLarge) as info:
        run(save_body(scope_for(), updir / "f", receive=Feed(chunks), max_size="2MiB",
                      batch_size="64KiB"))
    assert info.value.reason == "body_over_limit"
    assert info.value.figures["limit"] == 2 * 1024 * 1024
    assert listing(updir) == []


def test_route_limit_from_the_middleware_applies_and_max_size_overrides_it(updir: Path) -> None:
    ext = {"memguard": {"max_body_size": 1000}}
    with pytest.raises(BodyTooLarge):
        run(save_body(scope_for(extensions=ext), updir / "a", receive=Feed([b"x" * 1001])))
    saved = run(save_body(scope_for(extensions=ext), updir / "b", receive=Feed([b"x" * 1001]),
                          max_size=2000))
    assert saved.size == 1001
    assert listing(updir) == [str(updir / "b")]


def test_default_limit_is_the_upload_max_size_option(updir: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEMGUARD_UPLOAD_MAX_SIZE", "100")
    with pytest.raises(BodyTooLarge) as info:
        run(save_body(scope_for(), updir / "a", receive=Feed([b"x" * 101])))
    assert info.value.figures["limit"] == 100


def test_disconnect_mid_body_leaves_nothing(updir: Path, temp_mode: bool) -> None:
    chunks = split(os.urandom(3 * 1024 * 1024))
    with pytest.raises(MalformedRequest) as info:
        run(save_body(scope_for(), updir / "f", receive=Feed(chunks, disconnect=True),
                      batch_size="64KiB"))
    assert info.value.reason == "client_disconnected"
    assert info.value.figures["received"] == 3 * 1024 * 1024
    assert listing(updir) == []


def test_cancellation_mid_body_leaves_nothing(updir: Path, temp_mode: bool) -> None:
    async def scenario() -> None:
        paused = asyncio.Event()
        feed = Feed(split(os.urandom(2 * 1024 * 1024)), pause=paused)
        task = asyncio.create_task(save_body(scope_for(), updir / "f", receive=feed,
                                             batch_size="64KiB"))
        await paused.wait()
        await asyncio.sleep(0.05)
        if not temp_mode:
            # The named fallback is visible while it is written: the check below can fail.
            assert [p.name for p in updir.iterdir()][0].startswith(spool.TEMP_PREFIX)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        spool.executor().submit(lambda: None).result()  # let any batch in flight finish

    run(scenario())
    deadline = time.monotonic() + 5
    while listing(updir) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert listing(updir) == []


def test_existing_destination_is_not_replaced(updir: Path) -> None:
    dest = updir / "keep.txt"
    dest.write_bytes(b"original")
    feed = Feed([b"new"])
    with pytest.raises(FileExistsError):
        run(save_body(scope_for(), dest, receive=feed))
    assert feed.calls == 0 and dest.read_bytes() == b"original"
    saved = run(save_body(scope_for(), dest, receive=Feed([b"new"]), overwrite=True))
    assert dest.read_bytes() == b"new" and saved.size == 3
    assert listing(updir) == [str(dest)]


def test_destination_appearing_during_the_upload_wins(updir: Path, temp_mode: bool) -> None:
    dest = updir / "race.txt"

    async def scenario() -> None:
        async def receive() -> dict[str, Any]:
            dest.write_bytes(b"theirs")  # someone else creates the name meanwhile
            return {"type": "http.request", "body": b"mine", "more_body": False}

        with pytest.raises(FileExistsError):
            await save_body(scope_for(), dest, receive=receive)

    run(scenario())
    assert dest.read_bytes() == b"theirs"
    assert listing(updir) == [str(dest)]


def test_request_quota_gives_507_and_leaves_nothing(updir: Path, temp_mode: bool) -> None:
    with pytest.raises(InsufficientStorage) as info:
        run(save_body(scope_for(), updir / "f", receive=Feed(split(os.urandom(3 << 20))),
                      request_quota="1MiB", batch_size="256KiB"))
    assert info.value.status == 507 and info.value.reason == "request_temp_quota"
    assert listing(updir) == []
    assert spool.PROCESS_QUOTA.in_use == 0


def test_request_quota_with_content_length_refuses_before_reading(updir: Path) -> None:
    feed = Feed([b"x"])
    with pytest.raises(InsufficientStorage):
        run(save_body(scope_for({"content-length": "4096"}), updir / "f", receive=feed,
                      request_quota=1000))
    assert feed.calls == 0


def test_process_quota_counts_concurrent_uploads(updir: Path) -> None:
    async def scenario() -> None:
        paused = asyncio.Event()
        first = asyncio.create_task(save_body(
            scope_for(), updir / "a", receive=Feed(split(os.urandom(600_000)), pause=paused),
            process_quota=1_000_000, batch_size=65536))
        await paused.wait()
        await asyncio.sleep(0.05)
        assert spool.PROCESS_QUOTA.in_use >= 500_000
        with pytest.raises(InsufficientStorage) as info:
            await save_body(scope_for(), updir / "b", receive=Feed(split(os.urandom(600_000))),
                            process_quota=1_000_000, batch_size=65536)
        assert info.value.reason == "process_temp_quota"
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        spool.executor().submit(lambda: None).result()

    run(scenario())
    time.sleep(0.05)
    assert spool.PROCESS_QUOTA.in_use == 0
    assert listing(updir) == []


def test_free_space_floor_gives_507(updir: Path) -> None:
    # More than the filesystem holds: never free, whatever other processes free meanwhile
    # (one byte over the free space read a moment before is not).
    floor = shutil.disk_usage(updir).total + 1
    feed = Feed([b"x" * 100])
    with pytest.raises(InsufficientStorage) as info:
        run(save_body(scope_for(), updir / "f", receive=feed, min_free=floor))
    assert info.value.reason == "free_space_floor"
    with pytest.raises(InsufficientStorage):
        run(save_body(scope_for(), updir / "g", receive=Feed([b"x"]), min_free="100%"))
    assert listing(updir) == []


def test_refusal_is_logged_and_counted(updir: Path, caplog: pytest.LogCaptureFixture) -> None:
    before = counters.get("uploads", "body_over_limit")
    with caplog.at_level(logging.WARNING, logger="memguard.uploads"), \
            pytest.raises(BodyTooLarge):
        run(save_body(scope_for(), updir / "f", receive=Feed([b"x" * 20]), max_size=10))
    assert counters.get("uploads", "body_over_limit") == before + 1
    record = next(r for r in caplog.records if r.name == "memguard.uploads")
    message = record.getMessage()
    assert "reason=body_over_limit" in message and "limit=10" in message


def test_bad_content_length_is_400(updir: Path) -> None:
    with pytest.raises(MalformedRequest) as info:
        run(save_body(scope_for({"content-length": "12, 12"}), updir / "f", receive=Feed([])))
    assert info.value.reason == "invalid_content_length"


def test_scope_without_receive_is_a_type_error(updir: Path) -> None:
    with pytest.raises(TypeError):
        run(save_body(scope_for(), updir / "f"))


def test_unknown_option_names_the_closest(updir: Path) -> None:
    with pytest.raises(TypeError, match="upload_max_files"):
        run(save_multipart(scope_for({"content-type": CT}), updir, receive=Feed([b""]),
                           max_file=3))


# ---- multipart ------------------------------------------------------------------------


def test_multipart_saves_files_and_fields(updir: Path, temp_mode: bool) -> None:
    big = os.urandom(2 * 1024 * 1024 + 3)
    body = form_body(("title", None, "Holiday \u00e9t\u00e9".encode()),
                     ("video", "../../etc/passwd", big),
                     ("notes", "C:\\Users\\x\\n\u202etxt.exe", b"hello"),
                     ("title", None, b"second"))
    result = run(save_multipart(scope_for({"content-type": CT}), updir,
                                receive=Feed(split(body, 10_000)), batch_size="128KiB"))
    assert result.fields == {"title": "second"}
    assert result.field_items == [("title", "Holiday \u00e9t\u00e9"), ("title", "second")]
    video, notes = result.files
    assert video.path.parent == updir and video.path.read_bytes() == big
    assert video.sha256 == hashlib.sha256(big).hexdigest() and video.size == len(big)
    assert video.filename == "passwd" and video.field_name == "video"
    assert video.content_type == "application/octet-stream"
    assert notes.filename == "ntxt.exe" and notes.path.read_bytes() == b"hello"
    assert len(video.path.name) == 32
    assert listing(updir) == sorted([str(video.path), str(notes.path)])


def test_naming_function_is_confined(updir: Path) -> None:
    body = form_body(("f", "../../x.txt", b"data"))
    result = run(save_multipart(scope_for({"content-type": CT}), updir, receive=Feed([body]),
                                name=lambda field, filename, ctype: f"{field}-{filename}"))
    assert result.files[0].path == updir / "f-x.txt"
    for bad in ("../escape", "/etc/passwd", "..", "a/b", ".memguard-x.part"):
        with pytest.raises(ValueError):
            run(save_multipart(scope_for({"content-type": CT}), updir, receive=Feed([body]),
                               name=lambda *_, bad=bad: bad))
    assert listing(updir) == [str(updir / "f-x.txt")]
    assert not (updir.parent / "escape").exists()


def test_filename_star_and_nul_tricks_cannot_escape(updir: Path) -> None:
    head = (f"--{B}\r\nContent-Disposition: form-data; name=\"f\"; filename=\"a\x00b.txt\"; "
            f"filename*=UTF-8''..%2F..%2Fetc%2Fpasswd\r\n\r\n").encode()
    body = head + b"payload\r\n" + f"--{B}--\r\n".encode()
    result = run(save_multipart(scope_for({"content-type": CT}), updir, receive=Feed([body])))
    (saved,) = result.files
    assert saved.filename == "ab.txt" and saved.path.parent == updir
    assert listing(updir.parent) == [str(updir), str(saved.path)]


def test_very_long_filename_is_capped(updir: Path) -> None:
    body = form_body(("f", "a" * 3000 + ".bin", b"x"))
    result = run(save_multipart(scope_for({"content-type": CT}), updir, receive=Feed([body]),
                                max_part_header_size="8KiB"))
    assert len(result.files[0].filename) == 255 and result.files[0].filename.endswith(".bin")


def test_a_failing_later_part_removes_files_already_saved(updir: Path, temp_mode: bool) -> None:
    body = form_body(("a", "one.bin", os.urandom(300_000)), ("b", "two.bin", b"2" * 10),
                     ("c", "three.bin", b"3" * 5000))
    with pytest.raises(BodyTooLarge) as info:
        run(save_multipart(scope_for({"content-type": CT}), updir,
                           receive=Feed(split(body, 4096)), max_file_size=4096))
    assert info.value.reason == "file_too_large"
    assert listing(updir) == []


def test_twenty_thousand_parts_stop_at_the_cap_in_milliseconds(updir: Path) -> None:
    body = b"".join(f"--{B}\r\nContent-Disposition: form-data; name=\"p\"\r\n\r\n\r\n".encode()
                    for _ in range(20_000)) + f"--{B}--\r\n".encode()
    feed = Feed(split(body))
    started = time.process_time()
    with pytest.raises(BodyTooLarge) as info:
        run(save_multipart(scope_for({"content-type": CT}), updir, receive=feed))
    spent = time.process_time() - started
    assert info.value.reason == "too_many_parts" and info.value.figures["limit"] == 1000
    assert feed.calls < len(split(body)) // 2  # stopped early, the rest never read
    assert spent < 1.0  # generous on a shared machine; measured ~0.02 s


def test_parse_budget_gives_408(updir: Path) -> None:
    body = b"".join(f"--{B}\r\nContent-Disposition: form-data; name=\"p\"\r\n\r\n\r\n".encode()
                    for _ in range(20_000)) + f"--{B}--\r\n".encode()
    with pytest.raises(RequestTimeout) as info:
        run(save_multipart(scope_for({"content-type": CT}), updir, receive=Feed(split(body)),
                           max_parts=100_000, max_fields=100_000, parse_budget=0.0001))
    assert info.value.status == 408 and info.value.reason == "parse_budget"


@pytest.mark.parametrize(("options", "parts", "reason"), [
    ({"max_files": 2}, [("f", "1", b""), ("f", "2", b""), ("f", "3", b"")], "too_many_files"),
    ({"max_fields": 1}, [("a", None, b""), ("b", None, b"")], "too_many_fields"),
    ({"max_field_size": 10}, [("a", None, b"x" * 11)], "field_too_large"),
    ({"max_size": 500}, [("f", "big", b"x" * 1000)], "body_over_limit"),
])
def test_part_caps(updir: Path, options: dict[str, Any], parts: Any, reason: str) -> None:
    body = form_body(*parts)
    with pytest.raises(BodyTooLarge) as info:
        run(save_multipart(scope_for({"content-type": CT}), updir, receive=Feed(split(body, 100)),
                           **options))
    assert info.value.reason == reason
    assert listing(updir) == []


def test_allow_list_refuses_other_fields(updir: Path) -> None:
    body = form_body(("video", "v.mp4", b"123"), ("admin", None, b"1"))
    with pytest.raises(MalformedRequest) as info:
        run(save_multipart(scope_for({"content-type": CT}), updir, receive=Feed([body]),
                           allowed_fields={"video", "title"}))
    assert info.value.reason == "field_not_allowed"
    assert listing(updir) == []


@pytest.mark.parametrize(("ctype", "body", "error", "reason"), [
    ("multipart/form-data", b"whatever", MalformedRequest, "missing_boundary"),
    ("application/json", b"{}", UnsupportedMediaType, "not_multipart"),
    (None, b"", UnsupportedMediaType, "not_multipart"),
    (f"multipart/form-data; boundary={'b' * 300}", b"", MalformedRequest, "invalid_boundary"),
    (CT, b"\r\n" * 100_000 + form_body(("a", None, b"1")), MalformedRequest,
     "preamble_too_long"),
    (CT, b"junk preamble\r\n" + form_body(("a", None, b"1")), MalformedRequest,
     "multipart_syntax"),
    (CT, f"--{B}\r\nContent-Disposition: form-data; name=\"a\"; x=\"{'y' * 10000}\"\r\n\r\n"
         .encode(), MalformedRequest, "multipart_syntax"),  # huge part header
    (CT, f"--{B}\r\n".encode() + b"".join(b"X-%d: 1\r\n" % i for i in range(20)) + b"\r\n",
     MalformedRequest, "multipart_syntax"),  # too many part headers
    (CT, f"--{B}\r\nContent-Type: text/plain\r\n\r\nx\r\n--{B}--\r\n".encode(),
     MalformedRequest, "part_without_disposition"),
    (CT, f"--{B}\r\nContent-Disposition: form-data\r\n\r\nx\r\n--{B}--\r\n".encode(),
     MalformedRequest, "part_without_name"),
    (CT, form_body(("a", "f.bin", b"x" * 1000))[:-20], MalformedRequest, "multipart_incomplete"),
    (CT, b"", MalformedRequest, "multipart_incomplete"),
    (CT, form_body(("a", None, b"\xff\xfe")), MalformedRequest, "field_not_utf8"),
    (CT, form_body(("a", None, b"1")) + b"e" * 200_000, MalformedRequest, "epilogue_too_long"),
])
def test_hostile_multipart_corpus(updir: Path, ctype: str | None, body: bytes,
                                  error: type[RequestRejected], reason: str) -> None:
    headers = {"content-type": ctype} if ctype else {}
    with pytest.raises(error) as info:
        run(save_multipart(scope_for(headers), updir, receive=Feed(split(body))))
    assert info.value.reason == reason
    assert listing(updir) == []


def test_multipart_disconnect_leaves_nothing(updir: Path, temp_mode: bool) -> None:
    body = form_body(("a", "one.bin", b"1" * 1000), ("b", "two.bin", os.urandom(1 << 20)))
    with pytest.raises(MalformedRequest) as info:
        run(save_multipart(scope_for({"content-type": CT}), updir,
                           receive=Feed(split(body)[:-3], disconnect=True), batch_size=65536))
    assert info.value.reason == "client_disconnected"
    assert listing(updir) == []


# ---- WSGI -----------------------------------------------------------------------------


def environ_for(body: bytes, *, length: bool = True, terminated: bool = False,
                ctype: str | None = None, extra: dict[str, Any] | None = None,
                declared: int | None = None) -> dict[str, Any]:
    env: dict[str, Any] = {"REQUEST_METHOD": "POST", "wsgi.input": io.BytesIO(body)}
    if length:
        env["CONTENT_LENGTH"] = str(len(body) if declared is None else declared)
    if terminated:
        env["wsgi.input_terminated"] = True
    if ctype:
        env["CONTENT_TYPE"] = ctype
    env.update(extra or {})
    return env


def test_wsgi_body_with_content_length(updir: Path, temp_mode: bool) -> None:
    data = os.urandom(1_500_000)
    env = environ_for(data + b"NEXT REQUEST", declared=len(data))  # reads exactly the body
    saved = save_body_wsgi(env, updir / "w.bin", batch_size=100_000)
    assert (updir / "w.bin").read_bytes() == data
    assert saved.sha256 == hashlib.sha256(data).hexdigest()


def test_wsgi_input_terminated_reads_to_eof(updir: Path) -> None:
    data = os.urandom(300_000)
    saved = save_body_wsgi(environ_for(data, length=False, terminated=True), updir / "t")
    assert saved.size == len(data)


def test_wsgi_without_length_is_411(updir: Path) -> None:
    with pytest.raises(LengthRequired):
        save_body_wsgi(environ_for(b"abc", length=False), updir / "n")
    assert listing(updir) == []


def test_wsgi_short_body_is_a_disconnect(updir: Path, temp_mode: bool) -> None:
    with pytest.raises(MalformedRequest) as info:
        save_body_wsgi(environ_for(b"x" * 200_000, declared=300_000), updir / "s")
    assert info.value.reason == "client_disconnected"
    assert listing(updir) == []


def test_wsgi_limit_from_environ_and_terminated_stream(updir: Path) -> None:
    env = environ_for(b"x" * 5000, length=False, terminated=True,
                      extra={"memguard.max_body_size": 4000})
    with pytest.raises(BodyTooLarge) as info:
        save_body_wsgi(env, updir / "l")
    assert info.value.reason == "body_over_limit"
    assert listing(updir) == []


def test_wsgi_multipart(updir: Path, temp_mode: bool) -> None:
    big = os.urandom(700_000)
    body = form_body(("k", None, b"v"), ("f", "../x.bin", big))
    result = save_multipart_wsgi(environ_for(body, ctype=CT), updir, batch_size=65536)
    assert result.fields == {"k": "v"}
    (saved,) = result.files
    assert saved.path.read_bytes() == big and saved.filename == "x.bin"


def test_wsgi_multipart_failure_leaves_nothing(updir: Path, temp_mode: bool) -> None:
    body = form_body(("f", "a.bin", os.urandom(200_000)), ("g", "b.bin", b"y" * 10))
    with pytest.raises(BodyTooLarge):
        save_multipart_wsgi(environ_for(body, ctype=CT), updir, max_files=1)
    assert listing(updir) == []


def test_flask_view(updir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.apps import uploads_app

    monkeypatch.setattr(uploads_app, "UPLOAD_DIR", updir)
    client = uploads_app.flask_app.test_client()
    data = os.urandom(100_000)
    resp = client.post("/body?name=f.bin", data=data)
    assert resp.status_code == 200 and resp.json["sha256"] == hashlib.sha256(data).hexdigest()
    resp = client.post("/form", data={"t": "1", "f": (io.BytesIO(b"abc"), "../../e.txt")})
    assert resp.status_code == 200 and resp.json["files"][0]["filename"] == "e.txt"
    resp = client.post('/body?name=g.bin&opts={"max_size": 10}', data=b"x" * 11)
    assert resp.status_code == 413 and resp.json["reason"] == "content_length_over_limit"


def test_public_names() -> None:
    import memguard.uploads

    assert set(memguard.uploads.__all__) == {
        "MultipartResult", "SavedFile", "save_body", "save_body_wsgi", "save_multipart",
        "save_multipart_wsgi"}
    assert inspect.iscoroutinefunction(save_body)
    assert inspect.iscoroutinefunction(save_multipart)
    assert not inspect.iscoroutinefunction(save_body_wsgi)
    assert not inspect.iscoroutinefunction(save_multipart_wsgi)


def test_wsgi_read_error_is_a_disconnect(updir: Path, temp_mode: bool) -> None:
    class Resetting(io.RawIOBase):
        def __init__(self) -> None:
            self.calls = 0

        def read(self, size: int = -1) -> bytes:
            self.calls += 1
            if self.calls > 3:
                raise ConnectionResetError("peer reset")
            return b"x" * min(size, 65536)

    env = environ_for(b"", declared=10 * 65536)
    env["wsgi.input"] = Resetting()
    with pytest.raises(MalformedRequest) as info:
        save_body_wsgi(env, updir / "r", batch_size=65536)
    assert info.value.reason == "client_disconnected"
    assert info.value.figures["error"] == "ConnectionResetError"
    assert listing(updir) == []
