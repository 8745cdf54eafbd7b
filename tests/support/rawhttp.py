"""Raw HTTP/1.1 over a socket, for requests no HTTP client would send (hostile framing,
bodies that stall) and for reading what a server answers to them."""

from __future__ import annotations

import select
import socket
import time
from collections.abc import Iterable


def request_head(method: str, *headers: str, path: str = "/") -> str:
    """A request line and headers, without the blank line that ends the head."""
    return "\r\n".join([f"{method} {path} HTTP/1.1", "Host: t", *headers, ""])


def read_response(sock: socket.socket, deadline: float) -> tuple[list[int], bytes]:
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
        return read_response(sock, deadline)


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

