"""Hostile request bodies sent with raw sockets to REAL servers: uvicorn, and gunicorn
with sync, gthread and its native asgi worker. What matters is what the client gets: a
4xx (never a 5xx, never a silence), and a server that still serves afterwards.

Some of these requests are refused by the server's own parser before memguard sees them
(h11 and gunicorn reject conflicting Content-Length, for example); memguard's own checks
for those are covered in-process by test_body_asgi.py and test_body_wsgi.py.
"""

from __future__ import annotations

import gzip
import select
import socket
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

from tests.body_helpers import gzip_bomb
from tests.support.servers import Server, http_request, serve

pytestmark = pytest.mark.server

LIMIT = 1024 * 1024
ENV = {"MEMGUARD_MAX_BODY_SIZE": str(LIMIT), "MEMGUARD_BODY_IDLE_TIMEOUT": "1",
       "MEMGUARD_BODY_DECOMPRESS": "true"}

SERVERS = {
    "uvicorn": ("uvicorn", "tests.apps.body_apps:guarded_asgi", ["--no-access-log"]),
    "gunicorn-sync": ("gunicorn", "tests.apps.body_apps:guarded_wsgi", ["-w", "1"]),
    "gunicorn-gthread": ("gunicorn", "tests.apps.body_apps:guarded_wsgi",
                         ["-w", "1", "-k", "gthread", "--threads", "4"]),
    "gunicorn-asgi": ("gunicorn", "tests.apps.body_apps:guarded_asgi",
                      ["-w", "1", "-k", "asgi"]),
}
LAZY_CONTINUE = {"uvicorn", "gunicorn-asgi"}  # send 100 Continue only on first receive()


@pytest.fixture(scope="module", params=list(SERVERS))
def server(request: pytest.FixtureRequest) -> Iterator[tuple[str, Server]]:
    kind, app, args = SERVERS[request.param]
    repo = Path(__file__).resolve().parent.parent
    with serve(kind, app, args, env=ENV, cwd=str(repo)) as srv:
        yield request.param, srv


def _read_response(sock: socket.socket, deadline: float) -> tuple[list[int], bytes]:
    """Statuses seen (a 100 first, possibly) and the final response's body."""
    data = b""
    statuses: list[int] = []
    while True:
        head_end = data.find(b"\r\n\r\n")
        if head_end >= 0:
            head = data[:head_end].decode("latin-1")
            status = int(head.split(" ", 2)[1])
            rest = data[head_end + 4:]
            if status == 100:
                statuses.append(100)
                data = rest
                continue
            length = 0
            for line in head.split("\r\n")[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            if len(rest) >= length:
                return [*statuses, status], rest[:length]
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, TimeoutError):
            chunk = b""
        if not chunk:
            raise AssertionError(f"no complete response; got {data[:200]!r}")
        data += chunk


def exchange(port: int, head: str, body: bytes = b"", *, feed: Iterable[bytes] = (),
             timeout: float = 15) -> tuple[list[int], bytes]:
    """Send ``head`` (+ ``body``), then ``feed`` piece by piece until the server answers."""
    deadline = time.monotonic() + timeout
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head.encode("latin-1") + b"\r\n" + body)
        for piece in feed:
            readable, _, _ = select.select([sock], [], [], 0)
            if readable:
                break
            try:
                sock.sendall(piece)
            except (BrokenPipeError, ConnectionResetError):
                break
        return _read_response(sock, deadline)


def server_closed(sock: socket.socket, timeout: float = 10) -> bool:
    """True when the server ends the connection (EOF or reset) within ``timeout``."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
        return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def req(method: str, *headers: str, path: str = "/") -> str:
    return "\r\n".join([f"{method} {path} HTTP/1.1", "Host: t", *headers, ""])


def assert_4xx(statuses: list[int], *expected: int) -> None:
    final = statuses[-1]
    assert 400 <= final < 500, statuses
    if expected:
        assert final in expected, statuses


def test_hostile_suite_then_still_serving(server: tuple[str, Server]) -> None:
    name, srv = server
    port = srv.port

    # Malformed framing: a 4xx, from memguard or from the server's own parser.
    for cl in ("abc", "-1", "1e3", "0x10"):
        statuses, _ = exchange(port, req("POST", f"Content-Length: {cl}"), b"0123456789")
        assert_4xx(statuses, 400)
    statuses, _ = exchange(port, req("POST", "Content-Length: 5", "Content-Length: 6"),
                           b"hello!")
    assert_4xx(statuses, 400)
    statuses, _ = exchange(port, req("POST", "Content-Length: 5",
                                     "Transfer-Encoding: chunked"), b"5\r\nhello\r\n0\r\n\r\n")
    assert_4xx(statuses, 400)

    # Identical duplicates are either accepted whole or refused as 400, never a 5xx.
    statuses, body = exchange(port, req("POST", "Content-Length: 5", "Content-Length: 5"),
                              b"hello")
    assert statuses[-1] in (200, 400), statuses
    if statuses[-1] == 200:
        assert body.startswith(b"5 ")

    # Oversized declared length with Expect: 100-continue: 413 without inviting the body.
    statuses, body = exchange(port, req("POST", f"Content-Length: {LIMIT * 50}",
                                        "Expect: 100-continue"))
    assert statuses[-1] == 413, statuses
    if name in LAZY_CONTINUE:
        assert statuses == [413], "the server invited a body memguard had refused"
    assert body.startswith(b"413 ")

    # Chunked body over the limit: cut with 413 while the client is still sending.
    piece = b"%x\r\n%s\r\n" % (65536, b"c" * 65536)
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        sock.sendall(req("POST", "Transfer-Encoding: chunked").encode() + b"\r\n")
        for _ in range(64):
            if select.select([sock], [], [], 0)[0]:
                break
            try:
                sock.sendall(piece)
            except (BrokenPipeError, ConnectionResetError):
                break
        statuses, body = _read_response(sock, time.monotonic() + 15)
        assert statuses[-1] == 413 and b"over the limit" in body, (statuses, body)
        # The rest of the body is never read: the server ends the connection.
        assert server_closed(sock)

    # A slow drip: some bytes, then silence. Idle timeout is 1 s here.
    started = time.monotonic()
    statuses, body = exchange(port, req("POST", "Content-Length: 1000"), b"x" * 10)
    assert statuses[-1] == 408, statuses
    assert time.monotonic() - started < 10

    # A gzip bomb (decompression on): 200 MiB of zeros in ~200 KiB.
    bomb = gzip_bomb(200)
    statuses, body = exchange(port, req("POST", f"Content-Length: {len(bomb)}",
                                        "Content-Encoding: gzip"), bomb)
    assert statuses[-1] == 413, statuses

    # And the server still serves, bodies and all.
    assert http_request(srv.url)[0] == 200
    status, _, body = http_request(srv.url, "POST", body=b"y" * 1000)
    assert status == 200 and body.startswith(b"1000 ")
    raw = b"within the limit" * 1000
    status, _, body = http_request(srv.url, "POST", body=gzip.compress(raw),
                                   headers={"Content-Encoding": "gzip"})
    assert status == 200 and body.startswith(f"{len(raw)} ".encode())
    assert srv.proc.poll() is None
    log = srv.log()
    for sign in ("Traceback", "Exception in ASGI", "Error handling request",
                 "Internal Server Error"):
        assert sign not in log, log[-3000:]
    assert "refused POST / with 413 content_length_over_limit" in log
