"""A streaming HTTP client for big uploads in tests and benchmarks.

The body comes from a generator of distinct random blocks, never a file held in memory,
and the client knows its SHA-256 without buffering it.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import random
import socket
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

BLOCK = 1024 * 1024


@dataclass
class Payload:
    """``size`` bytes made of a few random 1 MiB blocks in a non-repeating order."""

    size: int
    seed_blocks: int = 7

    def __post_init__(self) -> None:
        rng = random.Random(self.size)
        self.blocks = [rng.randbytes(BLOCK) for _ in range(self.seed_blocks)]

    def chunks(self) -> Iterator[bytes]:
        sent = 0
        i = 0
        while sent < self.size:
            block = self.blocks[(i * i + i // 3) % self.seed_blocks]
            take = min(BLOCK, self.size - sent)
            yield block if take == BLOCK else block[:take]
            sent += take
            i += 1

    def sha256(self) -> str:
        h = hashlib.sha256()
        for chunk in self.chunks():
            h.update(chunk)
        return h.hexdigest()


BOUNDARY = "memguard-bench-boundary-7f3a9c"


def multipart_parts(payload: Payload, field: str = "file", filename: str = "video.mp4",
                    fields: dict[str, str] | None = None) -> tuple[bytes, bytes, int]:
    """Head and tail framing one file part (after some plain fields), and total length."""
    head = b""
    for name, value in (fields or {}).items():
        head += (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n"
                 f"{value}\r\n").encode()
    head += (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{field}\"; "
             f"filename=\"{filename}\"\r\nContent-Type: video/mp4\r\n\r\n").encode()
    tail = f"\r\n--{BOUNDARY}--\r\n".encode()
    return head, tail, len(head) + payload.size + len(tail)


def post_stream(url: str, path: str, chunks: Iterator[bytes], length: int | None,
                headers: dict[str, str] | None = None,
                timeout: float = 120) -> tuple[int, dict[str, Any] | str, float]:
    """POST ``chunks`` (with Content-Length ``length``, or chunked when ``None``).

    Returns (status, JSON body or text, seconds from the first byte to the response).
    A server that answers early (413) and closes is fine: its answer is read.
    """
    host, port = url.split("://", 1)[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    started = time.perf_counter()
    try:
        conn.putrequest("POST", path)
        for k, v in (headers or {}).items():
            conn.putheader(k, v)
        if length is None:
            conn.putheader("Transfer-Encoding", "chunked")
        else:
            conn.putheader("Content-Length", str(length))
        conn.endheaders()
        try:
            for chunk in chunks:
                if length is None:
                    conn.send(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
                else:
                    conn.send(chunk)
            if length is None:
                conn.send(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered before the body ended; read that answer
        resp = conn.getresponse()
        raw = resp.read()
        seconds = time.perf_counter() - started
        try:
            body: dict[str, Any] | str = json.loads(raw)
        except ValueError:
            body = raw.decode(errors="replace")
        return resp.status, body, seconds
    finally:
        conn.close()


def abort_upload(url: str, path: str, declared: int, send: int,
                 headers: dict[str, str] | None = None, prefix: bytes = b"",
                 before_reset: Callable[[], None] | None = None) -> None:
    """Declare ``declared`` bytes, send ``prefix`` and ``send`` random bytes, call
    ``before_reset`` (to look at the server meanwhile), then reset the connection."""
    host, port = url.split("://", 1)[1].split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    try:
        head = f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {declared}\r\n"
        for k, v in (headers or {}).items():
            head += f"{k}: {v}\r\n"
        sock.sendall(head.encode() + b"\r\n" + prefix)
        for chunk in Payload(send, seed_blocks=2).chunks():
            sock.sendall(chunk)
        time.sleep(0.3)  # let the server take what was sent
        if before_reset is not None:
            before_reset()
        # RST, not FIN: the harshest way a client can go away.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    finally:
        sock.close()
