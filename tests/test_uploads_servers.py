"""Uploads through real servers on loopback: uvicorn, gunicorn sync and gunicorn asgi.

A 256 MiB body streamed from a generator arrives byte-identical and the worker's peak
RSS (VmHWM) grows by less than 32 MiB; an aborted upload, a body over the limit and a
full quota leave no file in the upload directory or the server's TMPDIR.
"""

from __future__ import annotations

import json
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from memguard.system import read_vm_hwm
from tests.apps.upload_client import (
    BOUNDARY,
    Payload,
    abort_upload,
    multipart_parts,
    post_stream,
)
from tests.support.servers import Server, http_request, serve

pytestmark = pytest.mark.server

MiB = 1024 * 1024
BIG = 256 * MiB
GROWTH_LIMIT = 32 * MiB

SERVERS = {
    "uvicorn": ("uvicorn", "tests.apps.uploads_app:app", ["--log-level", "warning"]),
    "gunicorn-sync": ("gunicorn", "tests.apps.uploads_app:flask_app",
                      ["-w", "1", "-k", "sync", "--timeout", "120"]),
    "gunicorn-asgi": ("gunicorn", "tests.apps.uploads_app:app", ["-w", "1", "-k", "asgi"]),
}


@contextmanager
def upload_server(name: str, repo: Path, root: Path,
                  env: dict[str, str] | None = None) -> Iterator[tuple[Server, int, Path, Path]]:
    """(server, worker pid, upload dir, TMPDIR) for one of SERVERS."""
    kind, app, args = SERVERS[name]
    updir, tmpdir = root / "uploads", root / "tmp"
    updir.mkdir()
    tmpdir.mkdir()
    full_env = {"UPLOAD_DIR": str(updir), "TMPDIR": str(tmpdir), **(env or {})}
    with serve(kind, app, args, env=full_env, cwd=repo) as server:
        worker = server.wait_for_workers(1)[0] if kind == "gunicorn" else server.pid
        yield server, worker, updir, tmpdir


def opts_path(path: str, **opts: Any) -> str:
    sep = "&" if "?" in path else "?"
    return f"{path}{sep}opts={urllib.parse.quote(json.dumps(opts))}" if opts else path


def leftovers(*dirs: Path) -> list[str]:
    return sorted(str(p) for d in dirs for p in d.rglob("*"))


def wait_empty(*dirs: Path, timeout: float = 10) -> list[str]:
    deadline = time.monotonic() + timeout
    while (left := leftovers(*dirs)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def wait_partial(directory: Path, timeout: float = 10) -> list[str]:
    """What is in ``directory`` once a partial upload file shows up (a loaded machine
    may take a while to read what the kernel's socket buffers took)."""
    deadline = time.monotonic() + timeout
    while True:
        found = leftovers(directory)
        if any(Path(p).name.startswith(".memguard-") for p in found) \
                or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def warm_up(server: Server, updir: Path) -> None:
    """One small upload of each kind so code, threads and buffers exist before the
    baseline VmHWM is read: what is measured next is the big body's cost alone."""
    payload = Payload(2 * MiB, seed_blocks=2)
    status, _, _ = post_stream(server.url, "/body?name=warm.bin", payload.chunks(), payload.size)
    assert status == 200
    head, tail, length = multipart_parts(payload)
    status, _, _ = post_stream(server.url, "/form", iter([head, *payload.chunks(), tail]), length,
                               {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"})
    assert status == 200
    for p in updir.iterdir():
        p.unlink()


@pytest.mark.parametrize("name", list(SERVERS))
def test_big_upload_is_byte_identical_with_flat_memory(name: str, repo: Path,
                                                       tmp_path: Path) -> None:
    payload = Payload(BIG)
    expected = payload.sha256()
    with upload_server(name, repo, tmp_path) as (server, worker, updir, tmpdir):
        warm_up(server, updir)
        before = read_vm_hwm(worker)
        status, body, _ = post_stream(server.url, "/body?name=big.bin", payload.chunks(),
                                      payload.size)
        after = read_vm_hwm(worker)
        assert status == 200, body
        assert isinstance(body, dict) and body["size"] == BIG and body["sha256"] == expected
        assert before is not None and after is not None
        assert after - before < GROWTH_LIMIT, f"peak RSS grew {(after - before) / MiB:.1f} MiB"
        assert leftovers(tmpdir) == []


@pytest.mark.parametrize("name", list(SERVERS))
def test_big_multipart_upload_with_flat_memory(name: str, repo: Path, tmp_path: Path) -> None:
    payload = Payload(128 * MiB)
    head, tail, length = multipart_parts(payload, fields={"title": "holiday"})
    with upload_server(name, repo, tmp_path) as (server, worker, updir, tmpdir):
        warm_up(server, updir)
        before = read_vm_hwm(worker)
        status, body, _ = post_stream(
            server.url, "/form", iter([head, *payload.chunks(), tail]), length,
            {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"})
        after = read_vm_hwm(worker)
        assert status == 200, body
        assert isinstance(body, dict) and body["fields"] == {"title": "holiday"}
        (saved,) = body["files"]
        assert saved["sha256"] == payload.sha256() and saved["filename"] == "video.mp4"
        assert Path(saved["path"]).parent == updir
        assert before is not None and after is not None
        assert after - before < GROWTH_LIMIT, f"peak RSS grew {(after - before) / MiB:.1f} MiB"
        assert leftovers(tmpdir) == []


@pytest.mark.parametrize("name", list(SERVERS))
def test_abort_limit_and_quota_leave_nothing(name: str, repo: Path, tmp_path: Path) -> None:
    # The named temporary file (not O_TMPFILE) so that a partial file would be visible.
    with upload_server(name, repo, tmp_path, env={"MEMGUARD_UPLOAD_TMPFILE": "0"}) as (
            server, _, updir, tmpdir):
        # 1. The client resets the connection mid-body, in a raw body and in a form's
        # file part.
        form_type = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
        head, _, _ = multipart_parts(Payload(MiB, seed_blocks=1))
        for path, headers, prefix in (("/body?name=aborted.bin", {}, b""),
                                      ("/form", form_type, head)):
            seen: list[str] = []
            abort_upload(server.url, path, declared=64 * MiB, send=16 * MiB, headers=headers,
                         prefix=prefix,
                         before_reset=lambda seen=seen: seen.extend(wait_partial(updir)))
            # The partial file existed while the body was arriving...
            assert any(Path(p).name.startswith(".memguard-") for p in seen), seen
            # ...and is gone once the server noticed the reset.
            assert wait_empty(updir, tmpdir) == []
        # Bodies just over the limits: the server has then read (nearly) all of the body
        # when it answers and closes, so the close is a FIN; with megabytes unread it
        # would be a reset, which can destroy the answer before the client reads it.
        over = MiB + 48 * 1024
        # 2. Over the limit, chunked (no Content-Length: found while streaming).
        status, body, _ = post_stream(server.url, opts_path("/body?name=big.bin",
                                                            max_size=MiB),
                                      Payload(over).chunks(), None)
        assert status == 413 and isinstance(body, dict) and body["reason"] == "body_over_limit"
        # 3. A tiny temp-disk quota, chunked, a raw body and a form.
        status, body, _ = post_stream(server.url, opts_path("/body?name=q.bin",
                                                            request_quota="1MiB"),
                                      Payload(over).chunks(), None)
        assert status == 507 and isinstance(body, dict)
        assert body["reason"] == "request_temp_quota"
        payload = Payload(over)
        head, tail, _ = multipart_parts(payload)
        status, body, _ = post_stream(server.url, opts_path("/form", request_quota="1MiB"),
                                      iter([head, *payload.chunks(), tail]), None,
                                      {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"})
        assert status == 507 and isinstance(body, dict)
        assert body["reason"] == "request_temp_quota"
        assert wait_empty(updir, tmpdir) == []
        # The worker survived all of it.
        assert http_request(server.url)[0] == 200


def _wchar(pid: int) -> int:
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    raise AssertionError("no wchar in /proc/PID/io")


def test_django_asgi_upload_route_bypasses_the_spool(repo: Path, tmp_path: Path) -> None:
    updir, tmpdir = tmp_path / "uploads", tmp_path / "tmp"
    updir.mkdir()
    tmpdir.mkdir()
    payload = Payload(128 * MiB)
    with serve("uvicorn", "tests.apps.django_uploads:application", ["--log-level", "warning"],
               env={"UPLOAD_DIR": str(updir), "TMPDIR": str(tmpdir)}, cwd=repo) as server:
        small = Payload(2 * MiB, seed_blocks=2)
        assert post_stream(server.url, "/upload", small.chunks(), small.size)[0] == 200
        before, written = read_vm_hwm(server.pid), _wchar(server.pid)
        status, body, _ = post_stream(server.url, "/upload", payload.chunks(), payload.size)
        after, written = read_vm_hwm(server.pid), _wchar(server.pid) - written
        assert status == 200, body
        assert isinstance(body, dict) and body["sha256"] == payload.sha256()
        assert body["django_body_bytes"] == 0  # the Django view ran, with an empty body
        assert before is not None and after is not None
        assert after - before < GROWTH_LIMIT
        # Written once: Django's handler would have spooled all of it to a temp file first.
        assert payload.size <= written < 1.2 * payload.size
        assert leftovers(tmpdir) == []


def test_django_wsgi_view_streams_with_save_body_wsgi(repo: Path, tmp_path: Path) -> None:
    updir, tmpdir = tmp_path / "uploads", tmp_path / "tmp"
    updir.mkdir()
    tmpdir.mkdir()
    payload = Payload(64 * MiB)
    with serve("gunicorn", "tests.apps.django_uploads:wsgi_application",
               ["-w", "1", "-k", "sync", "--timeout", "60"],
               env={"UPLOAD_DIR": str(updir), "TMPDIR": str(tmpdir)}, cwd=repo) as server:
        worker = server.wait_for_workers(1)[0]
        small = Payload(2 * MiB, seed_blocks=2)
        assert post_stream(server.url, "/wsgi-upload", small.chunks(), small.size)[0] == 200
        before = read_vm_hwm(worker)
        status, body, _ = post_stream(server.url, "/wsgi-upload", payload.chunks(), payload.size)
        after = read_vm_hwm(worker)
        assert status == 200, body
        assert isinstance(body, dict) and body["sha256"] == payload.sha256()
        assert before is not None and after is not None
        assert after - before < GROWTH_LIMIT
        # Chunked (gunicorn sets wsgi.input_terminated): read to the end of the body.
        status, body, _ = post_stream(server.url, "/wsgi-upload", small.chunks(), None)
        assert status == 200 and isinstance(body, dict) and body["size"] == small.size
        assert leftovers(tmpdir) == []
