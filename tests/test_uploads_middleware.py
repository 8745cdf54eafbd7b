"""save_* under the real body guard (MemGuardMiddleware / MemGuardWSGIMiddleware) on
real servers: the route's limit is the default, and a refusal raised by an app that
does not catch it becomes the right response, with nothing left on disk."""

from __future__ import annotations

import json
import urllib.parse
from pathlib import Path

import pytest

from tests.apps.upload_client import BOUNDARY, Payload, multipart_parts, post_stream
from tests.support.servers import http_request, serve
from tests.test_uploads_servers import leftovers, wait_empty

pytestmark = pytest.mark.server

MiB = 1024 * 1024
JSON = {"Accept": "application/json"}  # the middleware then answers problem+json
FORM = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}", **JSON}

GUARDED = {
    "uvicorn": ("uvicorn", "tests.apps.uploads_app:guarded_app", ["--log-level", "warning"]),
    "gunicorn-sync": ("gunicorn", "tests.apps.uploads_app:guarded_wsgi",
                      ["-w", "1", "-k", "sync", "--timeout", "60"]),
    "gunicorn-asgi": ("gunicorn", "tests.apps.uploads_app:guarded_app",
                      ["-w", "1", "-k", "asgi"]),
}


def q(path: str, **opts: object) -> str:
    return f"{path}{'&' if '?' in path else '?'}opts={urllib.parse.quote(json.dumps(opts))}"


def reason(body: object) -> str:
    """The reason code of a refusal answered by the middleware (problem+json)."""
    assert isinstance(body, dict), body
    return str(body["reason"])


@pytest.mark.parametrize("name", list(GUARDED))
def test_uploads_under_the_body_guard(name: str, repo: Path, tmp_path: Path) -> None:
    kind, app, args = GUARDED[name]
    updir, tmpdir = tmp_path / "uploads", tmp_path / "tmp"
    updir.mkdir()
    tmpdir.mkdir()
    with serve(kind, app, args, env={"UPLOAD_DIR": str(updir), "TMPDIR": str(tmpdir)},
               cwd=repo) as server:
        # The route allows 300 MiB (the global default is 1 MiB): 24 MiB goes through.
        payload = Payload(24 * MiB)
        status, body, _ = post_stream(server.url, "/g/body?name=ok.bin", payload.chunks(),
                                      payload.size)
        assert status == 200, body
        assert isinstance(body, dict) and body["sha256"] == payload.sha256()
        head, tail, length = multipart_parts(payload)
        status, body, _ = post_stream(server.url, "/g/form", iter([head, *payload.chunks(), tail]),
                                      length, FORM)
        assert status == 200 and isinstance(body, dict) and body["files"][0]["size"] == payload.size
        for p in updir.iterdir():
            p.unlink()

        # /g/small's route limit (2 MiB) is save_body's default: a chunked body just over
        # it is refused with 413 while streaming, whichever layer notices first. (Just
        # over: with megabytes left unread the server's close would be a reset, which
        # can destroy the answer before the client reads it.)
        status, body, _ = post_stream(server.url, "/g/small?name=s.bin",
                                      Payload(2 * MiB + 48 * 1024).chunks(), None, JSON)
        assert status == 413 and reason(body) in ("body_over_limit", "body_too_large"), body
        # Refusals raised by save_* itself, uncaught by the app, become responses.
        status, body, _ = post_stream(server.url, q("/g/body?name=q.bin", request_quota="1MiB"),
                                      Payload(MiB + 48 * 1024).chunks(), None, JSON)
        assert status == 507 and reason(body) == "request_temp_quota"
        parts = b"".join(f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"p\"\r\n\r\n"
                         f"\r\n".encode() for _ in range(1_100)) + f"--{BOUNDARY}--\r\n".encode()
        status, body, _ = post_stream(server.url, "/g/form", iter([parts]), len(parts), FORM)
        assert status == 413 and reason(body) == "too_many_parts"
        status, body, _ = post_stream(server.url, "/g/form", iter([b"no boundary here"]), 16,
                                      {"Content-Type": "multipart/form-data", **JSON})
        assert status == 400 and reason(body) == "missing_boundary"

        assert wait_empty(updir, tmpdir) == []
        assert leftovers(updir) == []
        assert http_request(server.url)[0] == 200
