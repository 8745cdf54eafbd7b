"""Each example app, under a real gunicorn with its own gunicorn.conf.py, exercised."""

from __future__ import annotations

import http.client
import json
import socket
from pathlib import Path

import pytest

from tests.support.payloads import patterned_body, patterned_sha256
from tests.support.servers import Server, http_request, serve

pytestmark = pytest.mark.server

EXAMPLES = {
    "fastapi": ("examples/fastapi_app/gunicorn.conf.py", "examples.fastapi_app.app:app"),
    "flask": ("examples/flask_app/gunicorn.conf.py", "examples.flask_app.app:app"),
    "django": ("examples/django_app/gunicorn.conf.py", "examples.django_app.app:application"),
}
UPLOAD_SIZE = 48 * 1024 * 1024
LEAK_BYTES = 16 * 1024 * 1024  # the examples recycle at 160 MiB: ~10 leaks per worker


def _upload(server: Server, path: str, size: int) -> tuple[int, dict[str, object]]:
    conn = http.client.HTTPConnection(server.host, server.port, timeout=60)
    try:
        conn.request("POST", path, body=patterned_body(size),
                     headers={"Content-Length": str(size),
                              "Content-Type": "application/octet-stream"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def _raw(server: Server, head: bytes) -> bytes:
    with socket.create_connection((server.host, server.port), timeout=10) as sock:
        sock.sendall(head)
        data = b""
        while b"\r\n\r\n" not in data:
            more = sock.recv(65536)
            if not more:
                break
            data += more
        return data


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_example_under_gunicorn(name: str, repo: Path, tmp_path: Path) -> None:
    conf, app = EXAMPLES[name]
    uploads = tmp_path / "uploads"
    prometheus = tmp_path / "prometheus"  # multiprocess mode: every worker's counts
    prometheus.mkdir()
    env = {"UPLOAD_DIR": str(uploads), "LEAK_BYTES": str(LEAK_BYTES),
           "PROMETHEUS_MULTIPROC_DIR": str(prometheus)}
    with serve("gunicorn", app, ["-c", conf], cwd=repo, env=env, timeout=60) as server:
        server.wait_for_workers(2)
        status, _, body = http_request(server.url)
        assert status == 200 and json.loads(body)["pid"] in server.children()

        # A streamed upload arrives whole, under a generated name.
        status, saved = _upload(server, "/upload", UPLOAD_SIZE)
        assert status == 200, saved
        assert saved["size"] == UPLOAD_SIZE and saved["sha256"] == patterned_sha256(UPLOAD_SIZE)
        files = list(uploads.iterdir())
        assert [f.name for f in files] == [saved["name"]]
        assert files[0].stat().st_size == UPLOAD_SIZE

        # The naive route declared over its 1 GiB limit: 413 before any body is sent.
        answer = _raw(server, b"POST /naive HTTP/1.1\r\nHost: x\r\n"
                              b"Content-Length: 2147483648\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]

        # Hostile framing: a precise 4xx, never a 500.
        answer = _raw(server, b"POST /upload HTTP/1.1\r\nHost: x\r\n"
                              b"Content-Length: 12abc\r\n\r\n")
        assert answer[:12] in (b"HTTP/1.1 400", b"HTTP/1.0 400"), answer[:200]

        # The leaky route: workers are recycled before they can grow without bound,
        # and no request fails while they are.
        pids = set()
        for _ in range(60):
            status, _, body = http_request(server.url, path="/leak", timeout=30)
            assert status == 200
            pids.add(json.loads(body)["pid"])
        log = server.log()
        assert "recycl" in log, log[-3000:]
        assert len(pids) > 2, "the leaking workers should have been replaced"
        status, _, _ = http_request(server.url)
        assert status == 200
        if name == "fastapi":  # readiness and Prometheus, as Kubernetes would use them
            status, _, body = http_request(server.url, path="/readyz")
            assert status == 200 and json.loads(body)["status"] == "ready"
            status, _, body = http_request(server.url, path="/metrics")
            assert status == 200
            assert b'memguard_route_memory_growth_bytes_count{route="/leak"}' in body
