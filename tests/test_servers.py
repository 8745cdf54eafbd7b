"""The middleware under every server it is documented for, each really started on a
loopback port: readiness, a streamed upload saved with ``save_body`` and a form saved
with ``save_multipart`` (byte-identical, flat memory), a body over a route's limit
answered with its status, and the same worker alive at the end. docs/servers.md holds
the table of what passes where; tests/test_body_hostile.py runs the hostile framing
cases against the same servers.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from memguard.system import read_vm_hwm
from tests.apps.upload_client import BOUNDARY, Payload, multipart_parts, post_stream
from tests.support.servers import (
    Server,
    http_request,
    serve,
    server_unavailable_reason,
    stream_upload,
    unexpected_errors,
)

pytestmark = pytest.mark.server

MiB = 1024 * 1024
GROWTH_LIMIT = 32 * MiB
ASGI = "tests.apps.uploads_app:guarded_app"
WSGI = "tests.apps.uploads_app:guarded_wsgi"


@dataclass(frozen=True)
class Served:
    kind: str
    app: str
    args: tuple[str, ...] = ()
    # The status of a chunked body over a route's limit (411 where the server gives no
    # wsgi.input_terminated: memguard cannot read a chunked body to its end there).
    chunked_over_limit: int = 413
    # Why the server itself holds a whole body in memory (None: it streams it); the
    # upload tests then measure memguard's cost above the server's own.
    holds_body: str | None = None
    # Twisted takes a client's half-close for a client gone (and drops the answer).
    half_close: bool = True


SERVERS = {
    "uvicorn": Served("uvicorn", ASGI, ("--no-access-log",)),
    "gunicorn-sync": Served("gunicorn", WSGI, ("-w", "1", "--timeout", "120")),
    "gunicorn-gthread": Served("gunicorn", WSGI, ("-w", "1", "-k", "gthread", "--threads", "4")),
    "gunicorn-asgi": Served("gunicorn", ASGI, ("-w", "1", "-k", "asgi")),
    "hypercorn": Served("hypercorn", ASGI, ("-w", "1")),
    "hypercorn-trio": Served("hypercorn", ASGI, ("-w", "1", "-k", "trio")),
    "granian": Served("granian", ASGI, ("--interface", "asgi", "--workers", "1")),
    "uwsgi": Served("uwsgi", WSGI, ("--master", "--workers", "1"), chunked_over_limit=411),
    "daphne": Served("daphne", ASGI, half_close=False,
                     holds_body="Daphne queues the whole body as messages before the app "
                                "reads the first"),
    "waitress": Served("waitress", WSGI),
}


@dataclass
class Running:
    served: Served
    server: Server
    worker: int  # the process that serves requests
    updir: Path
    tmpdir: Path


@pytest.fixture(scope="module", params=list(SERVERS))
def running(request: pytest.FixtureRequest,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    served = SERVERS[request.param]
    if reason := server_unavailable_reason(served.kind):
        pytest.skip(reason)
    root = tmp_path_factory.mktemp(request.param)
    updir, tmpdir = root / "uploads", root / "tmp"
    updir.mkdir()
    tmpdir.mkdir()
    repo = Path(__file__).resolve().parent.parent
    env = {"UPLOAD_DIR": str(updir), "TMPDIR": str(tmpdir),
           "MEMGUARD_READINESS_PATH": "/readyz", "MEMGUARD_READINESS_DETAILS": "true"}
    with serve(served.kind, served.app, served.args, env=env, cwd=repo) as srv:
        status, _, body = http_request(srv.url)
        assert status == 200, body
        yield Running(served, srv, int(body.split()[1]), updir, tmpdir)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(MiB):
            digest.update(block)
    return digest.hexdigest()


def test_readiness_is_answered_by_the_worker(running: Running) -> None:
    status, _, body = http_request(running.server.url, path="/readyz")
    report = json.loads(body)
    assert status == 200 and report["status"] == "ready", body
    assert report["pid"] == running.worker


def warm_up(running: Running) -> None:
    """A small upload of each kind first, so that code, threads and buffers exist before
    the baseline peak is read: what is measured is the big body's cost alone."""
    small = Payload(2 * MiB, seed_blocks=2)
    assert post_stream(running.server.url, "/g/body?name=warm.bin", small.chunks(),
                       small.size)[0] == 200
    head, tail, length = multipart_parts(small)
    assert post_stream(running.server.url, "/g/form", iter([head, *small.chunks(), tail]),
                       length, {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
                       )[0] == 200
    for path in running.updir.iterdir():
        path.unlink()


def server_cost_first(running: Running, chunks: Iterator[bytes], length: int,
                      headers: dict[str, str] | None = None) -> None:
    """Where the server itself holds a whole body, send the same body to a route that
    keeps none of it first: the peak then includes the server's own cost, and what is
    measured next is memguard's alone."""
    if running.served.holds_body:
        status, body, _ = post_stream(running.server.url, "/g/drain", chunks, length, headers)
        assert status == 200 and isinstance(body, dict) and body["size"] == length, body


def test_streamed_upload_is_byte_identical_with_flat_memory(running: Running) -> None:
    warm_up(running)
    payload = Payload(128 * MiB)
    server_cost_first(running, payload.chunks(), payload.size)
    before = read_vm_hwm(running.worker)
    status, body, _ = post_stream(running.server.url, "/g/body?name=big.bin",
                                  payload.chunks(), payload.size)
    after = read_vm_hwm(running.worker)
    assert status == 200, body
    assert isinstance(body, dict) and body["size"] == payload.size
    expected = payload.sha256()
    assert body["sha256"] == expected
    assert file_sha256(running.updir / "big.bin") == expected
    assert before is not None and after is not None
    assert after - before < GROWTH_LIMIT, f"peak RSS grew {(after - before) / MiB:.1f} MiB"
    (running.updir / "big.bin").unlink()
    assert list(running.tmpdir.iterdir()) == []


def test_multipart_upload_is_byte_identical_with_flat_memory(running: Running) -> None:
    warm_up(running)
    payload = Payload(64 * MiB)
    head, tail, length = multipart_parts(payload, fields={"title": "holiday"})
    form_type = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
    server_cost_first(running, iter([head, *payload.chunks(), tail]), length, form_type)
    before = read_vm_hwm(running.worker)
    status, body, _ = post_stream(
        running.server.url, "/g/form", iter([head, *payload.chunks(), tail]), length,
        form_type)
    after = read_vm_hwm(running.worker)
    assert status == 200, body
    assert isinstance(body, dict) and body["fields"] == {"title": "holiday"}
    (saved,) = body["files"]
    path = Path(saved["path"])
    assert path.parent == running.updir and saved["filename"] == "video.mp4"
    assert file_sha256(path) == saved["sha256"] == payload.sha256()
    assert before is not None and after is not None
    assert after - before < GROWTH_LIMIT, f"peak RSS grew {(after - before) / MiB:.1f} MiB"
    path.unlink()
    assert list(running.tmpdir.iterdir()) == []


def test_body_over_the_route_limit_is_refused(running: Running) -> None:
    # /g/small allows 2 MiB. A declared length over it: 413 before the body is read.
    half_close = running.served.half_close
    status, response, _ = stream_upload(running.server.port, "/g/small", 3 * MiB,
                                        half_close=half_close)
    assert status == 413, response[:300]
    # Chunked: found while streaming (or 411 where the server cannot end a chunked body).
    status, response, _ = stream_upload(running.server.port, "/g/small", 3 * MiB,
                                        chunked=True, half_close=half_close)
    assert status == running.served.chunked_over_limit, response[:300]
    assert list(running.updir.iterdir()) == []


def test_the_same_worker_serves_on_with_no_error_logged(running: Running) -> None:
    """Runs after the tests above (pytest keeps the file's order for each server)."""
    status, _, body = http_request(running.server.url)
    assert status == 200 and int(body.split()[1]) == running.worker
    assert running.server.proc.poll() is None
    log = running.server.log()
    assert unexpected_errors(log) == [], log[-3000:]
