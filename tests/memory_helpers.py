"""Helpers for the memory tests: a streamed upload that reads the answer while sending,
and a keep-alive client."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator


def _chunks(total: int, chunk: int) -> Iterator[bytes]:
    block = b"u" * chunk  # one buffer reused: the test process never holds the body
    sent = 0
    while sent < total:
        n = min(chunk, total - sent)
        yield block if n == chunk else block[:n]
        sent += n


def stream_upload(port: int, path: str, total: int, *, chunk: int = 256 * 1024,
                  chunked: bool = False, timeout: float = 120,
                  ) -> tuple[int | None, bytes, int]:
    """POST ``total`` bytes (Content-Length declared) from a generator, reading the
    response while sending: a server that refuses mid-body answers and closes before the
    client has sent everything. Returns (status or None, response bytes, bytes sent)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    response = bytearray()
    done = threading.Event()

    def read() -> None:
        try:
            while True:
                data = sock.recv(65536)
                if not data:
                    break
                response.extend(data)
        except OSError:
            pass
        finally:
            done.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    sent = 0
    try:
        framing = ("Transfer-Encoding: chunked" if chunked else f"Content-Length: {total}")
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     f"Content-Type: application/octet-stream\r\n{framing}\r\n\r\n".encode())
        for piece in _chunks(total, chunk):
            if done.is_set():
                break
            if chunked:
                sock.sendall(b"%x\r\n" % len(piece))
            sock.sendall(piece)
            if chunked:
                sock.sendall(b"\r\n")
            sent += len(piece)
        if chunked and not done.is_set():
            sock.sendall(b"0\r\n\r\n")
    except OSError:
        pass  # the server stopped reading: its answer is what matters
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_WR)
    done.wait(timeout)
    sock.close()
    status: int | None = None
    head = bytes(response[:64])
    if head.startswith(b"HTTP/1."):
        status = int(head.split(b" ", 2)[1])
    return status, bytes(response), sent
