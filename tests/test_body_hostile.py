"""Hostile request bodies sent with raw sockets to REAL servers, each case against every
server the middleware is served by (docs/servers.md has the table). What matters is what
the client gets: a 4xx (never a 5xx, never a silence), and a worker that still serves,
the same one, afterwards.

Some requests are refused or rewritten by the server before memguard sees them (h11 and
gunicorn reject a conflicting Content-Length; Granian drops a Content-Length sent with
chunked framing): each such case says so and asserts the server's own answer. memguard's
own checks for those are covered in-process by test_body_asgi.py and test_body_wsgi.py.
"""

from __future__ import annotations

import gzip
import select
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.body_helpers import gzip_bomb
from tests.support.rawhttp import exchange, read_response, request_head, server_closed
from tests.support.servers import (
    Server,
    http_request,
    serve,
    server_unavailable_reason,
    unexpected_errors,
)

pytestmark = pytest.mark.server

LIMIT = 1024 * 1024
ENV = {"MEMGUARD_MAX_BODY_SIZE": str(LIMIT), "MEMGUARD_BODY_IDLE_TIMEOUT": "1",
       "MEMGUARD_BODY_DECOMPRESS": "true"}
ASGI = "tests.apps.body_apps:guarded_asgi"
WSGI = "tests.apps.body_apps:guarded_wsgi"


@dataclass(frozen=True)
class Served:
    """A server, and what it does itself before memguard sees a request."""

    kind: str
    app: str
    args: tuple[str, ...] = ()
    # It sends "100 Continue" only once the app asks for the body (so a body memguard
    # refuses from its declared length is never invited).
    lazy_continue: bool = False
    # Content-Length with Transfer-Encoding: chunked. None: refused with 400 (by the
    # server or by memguard); "chunked": the server drops the Content-Length and reads
    # the chunked body, as RFC 9112 section 6.3 allows.
    length_with_chunked: str | None = None
    # The status a chunked body over the limit gets (411: the server gives no
    # wsgi.input_terminated, so memguard cannot read a chunked body to its end).
    chunked_over_limit: int = 413
    # The server reads the whole body before it calls the app: a body refused for its
    # size is refused once it has all arrived, and a stalled body never reaches the app.
    buffers_body: bool = False
    # Exceptions the server itself logs, for reasons of its own (its tests say which).
    known_errors: tuple[str, ...] = ()


SERVERS = {
    "uvicorn": Served("uvicorn", ASGI, ("--no-access-log",), lazy_continue=True),
    "gunicorn-sync": Served("gunicorn", WSGI, ("-w", "1")),
    "gunicorn-gthread": Served("gunicorn", WSGI, ("-w", "1", "-k", "gthread", "--threads", "4")),
    "gunicorn-asgi": Served("gunicorn", ASGI, ("-w", "1", "-k", "asgi"), lazy_continue=True),
    "hypercorn": Served("hypercorn", ASGI, ("-w", "1")),
    # Hypercorn's trio worker sends "100 Continue" from its reading task, and its close
    # (send_eof) takes no send lock: once the refusal's response is out, the two can
    # meet on the socket and it logs trio.BusyResourceError. The client has its answer.
    "hypercorn-trio": Served("hypercorn", ASGI, ("-w", "1", "-k", "trio"),
                             known_errors=("trio.BusyResourceError",)),
    "granian": Served("granian", ASGI, ("--interface", "asgi", "--workers", "1"),
                      lazy_continue=True, length_with_chunked="chunked"),
    # A stalled body: uWSGI's own read timeout (--socket-timeout, 4 s) ends the read.
    "uwsgi": Served("uwsgi", WSGI, ("--master", "--workers", "1"), chunked_over_limit=411),
    "daphne": Served("daphne", ASGI, buffers_body=True),
    "waitress": Served("waitress", WSGI, length_with_chunked="chunked", buffers_body=True),
}


@dataclass
class Running:
    name: str
    served: Served
    server: Server
    processes: set[int]  # the server's processes when it started: still there at the end


@pytest.fixture(scope="module", params=list(SERVERS))
def running(request: pytest.FixtureRequest) -> Iterator[Running]:
    served = SERVERS[request.param]
    if reason := server_unavailable_reason(served.kind):
        pytest.skip(reason)
    repo = Path(__file__).resolve().parent.parent
    with serve(served.kind, served.app, served.args, env=ENV, cwd=str(repo)) as srv:
        yield Running(request.param, served, srv, {srv.pid, *srv.children()})


def post(*headers: str) -> str:
    return request_head("POST", *headers)


def assert_4xx(statuses: list[int], *expected: int) -> None:
    final = statuses[-1]
    assert 400 <= final < 500, statuses
    if expected:
        assert final in expected, statuses


def test_malformed_content_length_is_400(running: Running) -> None:
    for value in ("abc", "-1", "1e3", "0x10"):
        statuses, _ = exchange(running.server.port, post(f"Content-Length: {value}"),
                               b"0123456789")
        assert_4xx(statuses, 400)


def test_conflicting_framing(running: Running) -> None:
    port = running.server.port
    statuses, _ = exchange(port, post("Content-Length: 5", "Content-Length: 6"), b"hello!")
    assert_4xx(statuses, 400)

    statuses, body = exchange(port, post("Content-Length: 5", "Transfer-Encoding: chunked"),
                              b"5\r\nhello\r\n0\r\n\r\n")
    if running.served.length_with_chunked == "chunked":
        # The server itself kept the chunked framing: the app read "hello", five bytes.
        assert statuses[-1] == 200 and body.startswith(b"5 "), (statuses, body)
    else:
        assert_4xx(statuses, 400)

    # Identical duplicates are either accepted whole or refused as 400, never a 5xx.
    statuses, body = exchange(port, post("Content-Length: 5", "Content-Length: 5"), b"hello")
    assert statuses[-1] in (200, 400), statuses
    if statuses[-1] == 200:
        assert body.startswith(b"5 ")


def test_declared_length_over_limit_is_413_before_the_body(running: Running) -> None:
    if running.served.buffers_body:
        # The server takes the whole body first (and would wait for it, Expect or not).
        statuses, body = exchange(running.server.port, post(f"Content-Length: {2 * LIMIT}"),
                                  b"d" * (2 * LIMIT))
        assert statuses[-1] == 413 and body.startswith(b"413 "), (statuses, body)
        return
    statuses, body = exchange(running.server.port, post(f"Content-Length: {LIMIT * 50}",
                                                        "Expect: 100-continue"))
    assert statuses[-1] == 413, statuses
    if running.served.lazy_continue:
        assert statuses == [413], "the server invited a body memguard had refused"
    assert body.startswith(b"413 ")


def test_chunked_body_over_limit_is_cut_while_sending(running: Running) -> None:
    expected = running.served.chunked_over_limit
    piece = b"%x\r\n%s\r\n" % (65536, b"c" * 65536)
    if running.served.buffers_body:
        # The server takes the whole chunked body first: memguard counts it then.
        statuses, body = exchange(running.server.port, post("Transfer-Encoding: chunked"),
                                  piece * 64 + b"0\r\n\r\n")
        assert statuses[-1] == 413 and b"over the limit" in body, (statuses, body)
        return
    with socket.create_connection(("127.0.0.1", running.server.port), timeout=15) as sock:
        sock.sendall(post("Transfer-Encoding: chunked").encode() + b"\r\n")
        for _ in range(64):
            if select.select([sock], [], [], 0)[0]:
                break
            try:
                sock.sendall(piece)
            except (BrokenPipeError, ConnectionResetError):
                break
        statuses, body = read_response(sock, time.monotonic() + 15)
        assert statuses[-1] == expected, (statuses, body)
        if expected == 413:
            assert b"over the limit" in body, body
        else:
            assert b"wsgi.input_terminated" in body, body
        # The rest of the body is never read: the server ends the connection.
        assert server_closed(sock)


def test_stalled_body_is_408(running: Running) -> None:
    if running.served.buffers_body:
        # The server holds a stalled body itself (until its own idle timeout: Waitress's
        # channel_timeout, 120 s; Twisted's, 60 s, under Daphne): the app, so memguard,
        # sees the request only once the body is complete.
        with socket.create_connection(("127.0.0.1", running.server.port), timeout=15) as sock:
            sock.sendall(post("Content-Length: 1000").encode() + b"\r\n" + b"x" * 10)
            sock.settimeout(2.5)
            with pytest.raises(TimeoutError):
                sock.recv(1)
            sock.sendall(b"x" * 990)
            statuses, body = read_response(sock, time.monotonic() + 15)
            assert statuses[-1] == 200 and body.startswith(b"1000 "), (statuses, body)
        return
    # Some bytes, then silence; the idle timeout is 1 s here.
    started = time.monotonic()
    statuses, _ = exchange(running.server.port, post("Content-Length: 1000"), b"x" * 10)
    assert statuses[-1] == 408, statuses
    assert time.monotonic() - started < 10


def test_gzip_bomb_is_413(running: Running) -> None:
    # Decompression is on: 200 MiB of zeros in ~200 KiB.
    bomb = gzip_bomb(200)
    statuses, _ = exchange(running.server.port, post(f"Content-Length: {len(bomb)}",
                                                     "Content-Encoding: gzip"), bomb)
    assert statuses[-1] == 413, statuses


def test_still_serving_with_the_same_workers(running: Running) -> None:
    """Runs after the cases above (pytest keeps the file's order for each server)."""
    srv = running.server
    assert http_request(srv.url)[0] == 200
    status, _, body = http_request(srv.url, "POST", body=b"y" * 1000)
    assert status == 200 and body.startswith(b"1000 ")
    raw = b"within the limit" * 1000
    status, _, body = http_request(srv.url, "POST", body=gzip.compress(raw),
                                   headers={"Content-Encoding": "gzip"})
    assert status == 200 and body.startswith(f"{len(raw)} ".encode())
    assert srv.proc.poll() is None
    assert {srv.pid, *srv.children()} == running.processes, "a worker died or was replaced"
    log = srv.log()
    assert unexpected_errors(log, running.served.known_errors) == [], log[-3000:]
    assert "refused POST / with 413 content_length_over_limit" in log
