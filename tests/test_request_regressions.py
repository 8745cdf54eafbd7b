"""Regression tests for the request-path defects of issue 16, through real servers.

Each test is named after the behaviour it holds memguard to, and each failed on the
request path before it was rewritten (commit e6f3625). The numbers are the issue's.
Clients are raw sockets where the defect lives in what a client sends or how it reads
(two Content-Type headers, a stalled body, a body sent whole before reading).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import pytest

from memguard import MemGuardWSGIMiddleware
from tests.body_helpers import gzip_bomb
from tests.support.servers import http_request, serve

pytestmark = pytest.mark.server

MiB = 1024 * 1024
REPO = Path(__file__).resolve().parent.parent
APPS = "tests.apps.request_regressions"
UVICORN = ["--no-access-log"]


# ---- a raw HTTP/1.1 client ----------------------------------------------------------

@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def read_answer(sock: socket.socket, timeout: float = 15) -> Answer:
    """One response (after any 100 Continue) read from ``sock``."""
    deadline = time.monotonic() + timeout
    data = b""
    while True:
        end = data.find(b"\r\n\r\n")
        if end >= 0:
            lines = data[:end].decode("latin-1").split("\r\n")
            status = int(lines[0].split(" ", 2)[1])
            rest = data[end + 4:]
            if status == 100:
                data = rest
                continue
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            length = int(headers.get("content-length", "0"))
            if len(rest) >= length:
                return Answer(status, headers, rest[:length])
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            raise AssertionError(f"no answer within {timeout}s; got {data[:300]!r}") from None
        if not chunk:
            raise AssertionError(f"connection ended without an answer; got {data[:300]!r}")
        data += chunk


def head(method: str, path: str, *headers: str) -> bytes:
    return "\r\n".join([f"{method} {path} HTTP/1.1", "Host: t", *headers, "", ""]).encode(
        "latin-1")


def exchange(port: int, request_head: bytes, body: bytes = b"", piece: int = 64 * 1024,
             timeout: float = 15) -> Answer:
    """Send the head, then the body piece by piece until the server answers; read it."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request_head)
        for start in range(0, len(body), piece):
            if select.select([sock], [], [], 0)[0]:
                break  # answered early: what matters is the answer
            try:
                sock.sendall(body[start:start + piece])
            except (BrokenPipeError, ConnectionResetError):
                break
        return read_answer(sock, timeout)


def no_crash_in(log: str) -> None:
    for sign in ("Traceback", "Exception in ASGI", "Error handling request"):
        assert sign not in log, log[-3000:]


# ---- 1. two Content-Type headers; a body without one -------------------------------------

def test_second_content_type_is_refused_and_untyped_json_is_capped() -> None:
    two_mib_json = json.dumps([{}] * (MiB // 2)).encode()
    assert len(two_mib_json) > 2 * MiB * 0.9
    with serve("uvicorn", f"{APPS}:json_app", UVICORN, cwd=REPO) as srv:
        # The app parses JSON: a small body with one Content-Type is served.
        answer = exchange(srv.port, head("POST", "/items", "Content-Type: application/json",
                                         "Content-Length: 9"), b'[{}, {}]\n')
        assert (answer.status, answer.json()) == (200, {"type": "list", "length": 2})

        # JSON first (what FastAPI parses), octet-stream second (what the old limit read).
        answer = exchange(srv.port, head(
            "POST", "/items", "Content-Type: application/json",
            "Content-Type: application/octet-stream", "Accept: application/json",
            f"Content-Length: {len(two_mib_json)}"), two_mib_json)
        assert answer.status == 400, answer
        assert answer.json()["reason"] == "content_type_duplicate"

        # No Content-Type at all: FastAPI parses it as JSON, so the JSON cap (1 MiB) holds.
        answer = exchange(srv.port, head("POST", "/items", "Accept: application/json",
                                         f"Content-Length: {len(two_mib_json)}"),
                          two_mib_json)
        assert answer.status == 413, answer
        assert answer.json()["reason"] == "content_length_over_limit"
        log = srv.log()
    no_crash_in(log)


# ---- 3. the slow-body timeout when receive() runs in a task of the app's own ----------

@pytest.mark.parametrize("path", ["/wait_for", "/race"])
def test_stalled_body_read_from_another_task_is_answered_408(path: str) -> None:
    with serve("uvicorn", f"{APPS}:receive_in_task", UVICORN, cwd=REPO) as srv:
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", srv.port), timeout=15) as sock:
            # 10 of the 1000 bytes announced, then silence (the idle timeout is 1 s).
            sock.sendall(head("POST", path, "Content-Length: 1000") + b"x" * 10)
            answer = read_answer(sock, timeout=10)
        assert answer.status == 408, answer
        assert time.monotonic() - started < 6
        # The worker still reads bodies in tasks of the app's own.
        status, _, body = http_request(srv.url, "POST", path, body=b"y" * 1000)
        assert (status, body) == (200, b"1000\n")
        log = srv.log()
    no_crash_in(log)
    assert "body_idle_timeout" in log


# ---- 5. multi-member gzip ---------------------------------------------------------------

def test_every_gzip_member_is_decoded_and_trailing_garbage_refused() -> None:
    first, second = b"first member " * 1000, b"second member " * 1000
    members = gzip.compress(first) + gzip.compress(second)
    env = {"MEMGUARD_BODY_DECOMPRESS": "true"}
    with serve("uvicorn", "tests.apps.body_apps:guarded_asgi", UVICORN, env=env,
               cwd=REPO) as srv:
        status, _, body = http_request(srv.url, "POST", body=members,
                                       headers={"Content-Encoding": "gzip"})
        whole = first + second
        assert status == 200, body
        assert body.split()[:2] == [str(len(whole)).encode(),
                                    hashlib.sha256(whole).hexdigest().encode()]

        # One member decoding to more pieces than arrived (DECODE_PIECE is 256 KiB).
        large = bytes(range(256)) * 4096
        status, _, body = http_request(srv.url, "POST", body=gzip.compress(large),
                                       headers={"Content-Encoding": "gzip",
                                                "Content-Type": "application/octet-stream"})
        assert status == 200, body
        assert body.split()[:2] == [str(len(large)).encode(),
                                    hashlib.sha256(large).hexdigest().encode()]

        status, _, body = http_request(srv.url, "POST", body=gzip.compress(first) + b"garbage",
                                       headers={"Content-Encoding": "gzip",
                                                "Accept": "application/json"})
        assert status == 400, body
        assert json.loads(body)["reason"] == "body_decode_error"
        log = srv.log()
    no_crash_in(log)


# ---- 6. WSGI: the decoded size feeds the memory check --------------------------------------

def test_wsgi_decoded_body_is_held_to_the_worker_hard_limit() -> None:
    # 192 MiB of zeros in ~200 KiB of gzip, against a worker allowed 64 MiB more than
    # its RSS at import; the app buffers the decoded body with wsgi.input.read().
    bomb = gzip_bomb(192)
    env = {"MEMGUARD_TEST_HEADROOM": str(64 * MiB)}
    with serve("gunicorn", f"{APPS}:wsgi_buffering", ["-w", "1", "--timeout", "60"],
               env=env, cwd=REPO) as srv:
        status, _, body = http_request(srv.url, "POST", body=bomb, timeout=60,
                                       headers={"Content-Encoding": "gzip",
                                                "Accept": "application/json"})
        assert status == 413, body[:300]
        assert json.loads(body)["reason"] in ("body_exceeds_worker_memory",
                                              "decoded_body_over_limit")
        # A small compressed body is still decoded for the app.
        status, _, body = http_request(srv.url, "POST", body=gzip.compress(b"z" * 5000),
                                       headers={"Content-Encoding": "gzip"})
        assert (status, body) == (200, b"5000\n")
        log = srv.log()
    no_crash_in(log)


# ---- 11. a Content-Length of non-ASCII digits under WSGI report-only ------------------------

class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def wsgiref_server() -> Iterator[Callable[[Any], int]]:
    """Serve a WSGI app with the standard library's server (which passes a header's
    value to the app as is, latin-1 decoded) on a loopback port; yields a starter."""
    servers: list[tuple[WSGIServer, threading.Thread]] = []

    def start(app: Any) -> int:
        server = make_server("127.0.0.1", 0, app, handler_class=_QuietHandler)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        servers.append((server, thread))
        return int(server.server_address[1])

    yield start
    for server, thread in servers:
        server.shutdown()
        server.server_close()
        thread.join(5)


def _no_body_read(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "3")])
    return [b"ok\n"]


def test_wsgi_report_only_superscript_content_length_is_never_a_500(
        wsgiref_server: Callable[[Any], int]) -> None:
    report_only = wsgiref_server(MemGuardWSGIMiddleware(_no_body_read, report_only=True))
    enforcing = wsgiref_server(MemGuardWSGIMiddleware(_no_body_read))
    # b"\xb2" is "²" in latin-1: the environ's CONTENT_LENGTH is "²", which str.isdigit()
    # accepts and int() refuses.
    request = b"POST / HTTP/1.0\r\nHost: t\r\nContent-Length: \xb2\r\n\r\nxx"
    for port in (report_only, enforcing):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(request)
            answer = read_answer(sock, timeout=10)
        assert answer.status == 200 or 400 <= answer.status < 500, answer
        if port == enforcing:
            assert answer.status == 400, answer


# ---- 12. log lines cannot be forged through the path ----------------------------------------

def test_refusal_log_line_escapes_a_newline_in_the_path() -> None:
    env = {"MEMGUARD_MAX_BODY_SIZE": "1KiB"}
    with serve("uvicorn", "tests.apps.body_apps:guarded_asgi", UVICORN, env=env,
               cwd=REPO) as srv:
        answer = exchange(srv.port, head("POST", "/up%0AFORGED%20admin%20login",
                                         "Content-Length: 4096"), b"x" * 4096)
        assert answer.status == 413, answer
        log = srv.log()
    refusals = [line for line in log.splitlines() if "refused POST" in line]
    assert len(refusals) == 1, log
    assert "/up\\nFORGED admin login" in refusals[0], refusals
    assert not any(line.startswith("FORGED") for line in log.splitlines()), log


# ---- 13. mount prefixes: memguard's paths are the app's own ----------------------------------

def test_endpoints_and_routes_match_the_path_under_a_mount_prefix() -> None:
    # ASGI: the proxy strips /api, uvicorn is told the app is mounted there.
    with serve("uvicorn", f"{APPS}:mounted", [*UVICORN, "--root-path", "/api"],
               cwd=REPO, ready_path="/hello") as srv:
        status, headers, body = http_request(srv.url, path="/readyz")
        assert (status, headers["content-type"]) == (200, "application/json"), body
        assert json.loads(body) == {"status": "ready"}
        status, _, body = http_request(srv.url, path="/livez")
        assert (status, json.loads(body)) == (200, {"status": "alive"})
        assert http_request(srv.url, path="/hello")[::2] == (200, b"hello\n")

    # WSGI: gunicorn takes SCRIPT_NAME from its environment and strips it from PATH_INFO.
    env = {"SCRIPT_NAME": "/api", "MEMGUARD_BODY_ROUTES": "/upload=100B"}
    with serve("gunicorn", "tests.apps.body_apps:guarded_wsgi", ["-w", "1"], env=env,
               cwd=REPO, ready_path="/api/") as srv:
        status, _, body = http_request(srv.url, "POST", "/api/upload", body=b"u" * 1000,
                                       headers={"Accept": "application/json"})
        assert status == 413, body
        assert json.loads(body)["reason"] == "content_length_over_limit"
        status, _, body = http_request(srv.url, "POST", "/api/other", body=b"o" * 1000)
        assert status == 200 and body.startswith(b"1000 "), body
        log = srv.log()
    no_crash_in(log)


# ---- 16. a streaming upload beside a leaking route -----------------------------------------

def upload(port: int, path: str, total: int, piece: int,
           between: Callable[[], None] = lambda: None, timeout: float = 60) -> Answer:
    """POST ``total`` bytes (Content-Length) in pieces, calling ``between`` after each,
    reading the answer on a second thread as it comes (a refusal mid-body included)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    answer: list[Answer | BaseException] = []

    def read() -> None:
        try:
            answer.append(read_answer(sock, timeout))
        except BaseException as exc:  # handed to the test's thread
            answer.append(exc)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        sock.sendall(head("POST", path, "Content-Type: application/octet-stream",
                          "Accept: application/json", f"Content-Length: {total}"))
        block = b"s" * piece
        for _ in range(total // piece):
            if answer:
                break
            sock.sendall(block)
            between()
    except OSError:
        pass  # refused mid-body: the answer is what matters
    reader.join(timeout)
    sock.close()
    assert answer, "no answer"
    if isinstance(answer[0], BaseException):
        raise answer[0]
    return answer[0]


def test_streaming_upload_beside_a_leaking_route_is_never_refused_as_buffering() -> None:
    # The worker may grow 100 MiB past its RSS at import. While 64 MiB stream in, /leak
    # keeps 64 MiB: the worker stays under its hard limit, but its RSS plus the growth
    # seen during the upload passes it.
    env = {"MEMGUARD_TEST_HEADROOM": str(100 * MiB)}
    with serve("uvicorn", f"{APPS}:memory_app", UVICORN, env=env, cwd=REPO,
               ready_path="/rss") as srv:
        leaks = http_request(srv.url, "POST", "/leak")  # the keep-alive-free warm-up
        assert leaks[0] == 200
        rss_before = int(http_request(srv.url, path="/rss")[2])

        def leak_twice() -> None:
            for _ in range(2):
                assert http_request(srv.url, "POST", "/leak")[0] == 200

        answer = upload(srv.port, "/stream", 64 * MiB, 4 * MiB, between=leak_twice)
        assert (answer.status, answer.body) == (200, f"{64 * MiB}\n".encode()), answer
        rss_after = int(http_request(srv.url, path="/rss")[2])
        assert rss_after - rss_before > 48 * MiB, (rss_before, rss_after)

        # The same body buffered (await request.body()) is refused before the hard limit.
        answer = upload(srv.port, "/buffer", 64 * MiB, 4 * MiB)
        assert answer.status == 413, answer
        assert answer.json()["reason"] == "body_exceeds_worker_memory"
        log = srv.log()
    no_crash_in(log)
    assert log.count("body_exceeds_worker_memory") == 1, log


# ---- 17. lingering close: the client that sends everything before reading ------------------

@pytest.mark.parametrize("kind,app", [
    ("uvicorn", "tests.apps.body_apps:guarded_asgi"),
    ("gunicorn", "tests.apps.body_apps:guarded_wsgi"),
])
def test_refused_body_is_drained_so_a_client_sending_it_whole_reads_the_413(
        kind: str, app: str) -> None:
    # Like http.client: the whole body goes out before the answer is read. A server that
    # answers and closes with the body unread resets the connection under the client.
    # The client's send buffer is small (64 KiB) so that what the kernel takes in
    # without the server reading (4 MiB on loopback by default) does not hide that.
    size = 3 * MiB  # within the drained 4 MiB (a 32 MiB body is still reset)
    env = {"MEMGUARD_MAX_BODY_SIZE": "1MiB"}
    args = UVICORN if kind == "uvicorn" else ["-w", "1"]
    with serve(kind, app, args, env=env, cwd=REPO) as srv:
        for path in ("/declared", "/chunked"):
            framing = ("Transfer-Encoding: chunked" if path == "/chunked"
                       else f"Content-Length: {size}")
            body = b"b" * size
            if path == "/chunked":
                body = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 65536]), body[i:i + 65536])
                                for i in range(0, size, 65536)) + b"0\r\n\r\n"
            with socket.socket() as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
                sock.settimeout(15)
                sock.connect(("127.0.0.1", srv.port))
                sock.sendall(head("POST", path, "Content-Type: application/octet-stream",
                                  framing))
                sock.sendall(body)
                answer = read_answer(sock)
            assert answer.status == 413, (path, answer)
            assert answer.body.startswith(b"413 "), answer
        log = srv.log()
    no_crash_in(log)
