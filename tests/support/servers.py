"""Real servers on loopback for memguard's tests, benchmarks and demo.

Nothing here is mocked: :func:`serve` starts a real server on a loopback socket bound
to port 0 and always stops it, with every process it started (by its process group).
"""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tests.support.payloads import patterned_body

if TYPE_CHECKING:
    from tests.support.cgroups import MemoryCgroup


@dataclass
class Server:
    """A running server: its process, port, and the log it writes."""

    proc: subprocess.Popen[bytes]
    host: str
    port: int
    log_path: Path
    _sock: socket.socket | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        """The server's main process (gunicorn's master), not the ``sh`` of a cgroup."""
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def children(self) -> list[int]:
        import psutil

        try:
            return [c.pid for c in psutil.Process(self.proc.pid).children()]
        except psutil.NoSuchProcess:
            return []

    def wait_for_workers(self, count: int, timeout: float = 30) -> list[int]:
        """Wait until the master has ``count`` children (workers boot one by one)."""
        deadline = time.monotonic() + timeout
        while True:
            pids = self.children()
            if len(pids) >= count or time.monotonic() > deadline:
                return pids
            time.sleep(0.05)


async def run_lifespan(receive: Any, send: Any) -> None:
    """Answer an ASGI ``lifespan`` scope: what a bare test app needs to start and stop."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def stream_upload(port: int, path: str, total: int, *, chunk: int = 256 * 1024,
                  chunked: bool = False, timeout: float = 120, host: str = "127.0.0.1",
                  half_close: bool = True) -> tuple[int | None, bytes, int]:
    """POST ``total`` bytes (Content-Length declared, or chunked) from a generator,
    reading the response while sending, on a second thread.

    A server that refuses mid-body answers, then closes with the rest of the body unread,
    which sends a reset: a client that reads only after sending everything (http.client)
    loses the answer to it. Browsers and curl read early; so does this.
    Once all is sent, the client half-closes (shuts its side down) unless
    ``half_close`` is false: Twisted (under Daphne) takes that for a client gone and
    drops the answer. Returns (status or None, response bytes, bytes sent)."""
    sock = socket.create_connection((host, port), timeout=timeout)
    response = bytearray()
    done = threading.Event()

    def read() -> None:
        try:
            while True:
                data = sock.recv(65536)
                if not data:
                    break
                response.extend(data)
                if not half_close and _complete(response):
                    break
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
        for piece in patterned_body(total, chunk):
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
    if half_close:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)
    done.wait(timeout)
    sock.close()
    status: int | None = None
    head = bytes(response[:64])
    if head.startswith(b"HTTP/1."):
        status = int(head.split(b" ", 2)[1])
    return status, bytes(response), sent


def _complete(response: bytearray) -> bool:
    """Whether ``response`` holds a whole final response with a Content-Length."""
    head, sep, body = bytes(response).partition(b"\r\n\r\n")
    if not sep or head.startswith(b"HTTP/1.1 100"):
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return False


def _free_listener(host: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Accepted sockets inherit TCP_NODELAY from the listener on Linux. uvicorn wraps a
    # socket passed with --fd as AF_UNIX and so never sets it itself: without this, every
    # keep-alive response would wait for the client's delayed ACK (~40 ms).
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((host, 0))
    sock.listen(1024)
    sock.set_inheritable(True)
    return sock


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the process group of ``proc`` (which ``start_new_session`` made ours)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def http_request(
    url: str, method: str = "GET", path: str = "/", body: bytes | None = None,
    headers: Mapping[str, str] | None = None, timeout: float = 10,
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 request with the standard library: (status, headers, body)."""
    host_port = url.split("://", 1)[1]
    host, _, port = host_port.partition(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=dict(headers or {}))
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
    finally:
        conn.close()


SERVER_KINDS = ("gunicorn", "uvicorn", "hypercorn", "granian", "daphne", "waitress", "uwsgi")


def unexpected_errors(log: str, known: Sequence[str] = ()) -> list[str]:
    """The errors in a server's ``log`` other than memguard's refusals (a framework may
    log the refusal the app raised, as Flask does, while the middleware answers it with
    its status) and the exception types in ``known`` (a server's own, documented)."""
    found = []
    for segment in log.split("Traceback (most recent call last):")[1:]:
        lines = [line for line in segment.splitlines()[1:] if line.strip()]
        raised = next((line for line in lines if not line.startswith((" ", "\t"))), "")
        if not raised.startswith(("memguard.errors.", *(f"{k}:" for k in known))):
            found.append(raised)
    for sign in ("Exception in ASGI", "Error handling request", "Internal Server Error"):
        if sign in log:
            found.append(sign)
    return found


_SERVER_PACKAGES = {"gunicorn": "gunicorn", "uvicorn": "uvicorn", "hypercorn": "hypercorn",
                    "granian": "granian", "daphne": "daphne", "waitress": "waitress"}


def server_unavailable_reason(kind: str) -> str | None:
    """``None`` when ``kind`` can be started here, otherwise why not (for a skip)."""
    if kind == "uwsgi":
        if not Path(sys.executable).with_name("uwsgi").exists():
            return ("uWSGI is not installed: it compiles with gcc on install "
                    "(`make install` tries; see its warning)")
        return None
    import importlib.util

    if importlib.util.find_spec(_SERVER_PACKAGES[kind]) is None:
        return f"{kind} is not installed (it is in the dev dependency group: make install)"
    return None


def _server_argv(kind: str, app: str, args: Sequence[str], *, fd: int, host: str, port: int,
                 cwd: str | Path | None, python: str) -> list[str]:
    """The command line that runs ``app`` under ``kind`` on the listening socket ``fd``
    (for uWSGI, with ``UWSGI_RELOADS`` set in its environment: see :func:`serve`)."""
    if kind == "gunicorn":
        return [python, "-m", "gunicorn", "--bind", f"fd://{fd}", *args, app]
    if kind == "uvicorn":
        return [python, "-m", "uvicorn", "--fd", str(fd), *args, app]
    if kind == "hypercorn":
        return [python, "-m", "hypercorn", "--bind", f"fd://{fd}", *args, app]
    if kind == "granian":
        return [python, "-m", "granian", "--host", host, "--port", str(port), *args, app]
    if kind == "daphne":
        return [python, "-m", "daphne", "--fd", str(fd), *args, app]
    if kind == "waitress":
        # waitress-serve takes no descriptor; its serve() takes sockets.
        return [python, "-m", "tests.support.waitress_fd", str(fd), *args, app]
    if kind == "uwsgi":
        module, _, attr = app.partition(":")
        return [str(Path(python).with_name("uwsgi")), "--http-socket", f"{host}:{port}",
                "--module", f"{module}:{attr or 'application'}",
                "--home", str(Path(python).parent.parent),
                "--pythonpath", str(cwd or os.getcwd()), "--need-app", "--die-on-term",
                "--strict", *args]
    raise ValueError(f"unknown server kind {kind!r}: expected one of {SERVER_KINDS}")



@contextlib.contextmanager
def serve(
    kind: str,
    app: str,
    args: Sequence[str] = (),
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | Path | None = None,
    cgroup: MemoryCgroup | None = None,
    ready_path: str = "/",
    timeout: float = 30,
    host: str = "127.0.0.1",
    python: str = sys.executable,
) -> Iterator[Server]:
    """Run the server ``kind`` (one of :data:`SERVER_KINDS`) serving ``app`` on a
    loopback port until exit.

    The listening socket is bound to port 0 here and handed to the server by descriptor,
    so the port is known before the server starts and no two tests can race for one
    (Granian alone takes no descriptor: it is given the port, freed just before). The
    server runs in its own session; on exit it gets SIGTERM (a graceful stop), then its
    whole process group gets SIGKILL, and the function waits until the group is gone.
    ``python`` is the interpreter (and so the environment) the server runs from.
    """
    sock = _free_listener(host)
    fd = sock.fileno()
    port = sock.getsockname()[1]
    argv = _server_argv(kind, app, args, fd=fd, host=host, port=port, cwd=cwd, python=python)
    pass_fds: tuple[int, ...] = (fd,)
    if kind == "granian":
        sock.close()
        pass_fds = ()
    log_fd, log_name = tempfile.mkstemp(prefix="memguard-server-", suffix=".log")
    log_path = Path(log_name)
    full_env = dict(os.environ)
    full_env.update(env or {})
    full_env.setdefault("PYTHONUNBUFFERED", "1")
    if kind == "uwsgi":
        # uWSGI adopts an inherited socket that an --http-socket names only when it
        # believes it was re-executed by itself, which this variable tells it.
        full_env["UWSGI_RELOADS"] = "1"
    if cgroup is not None:
        argv = cgroup.wrap(argv)
    proc = subprocess.Popen(
        argv, stdout=log_fd, stderr=log_fd, stdin=subprocess.DEVNULL, pass_fds=pass_fds,
        cwd=cwd, env=full_env, start_new_session=True,
    )
    os.close(log_fd)
    server = Server(proc=proc, host=host, port=port, log_path=log_path, _sock=sock)
    try:
        _wait_ready(server, ready_path, timeout)
        yield server
    finally:
        _stop(server)
        sock.close()
        with contextlib.suppress(OSError):
            log_path.unlink()


def _wait_ready(server: Server, path: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(
                f"server exited with {server.proc.returncode} before answering:\n{server.log()}"
            )
        try:
            http_request(server.url, path=path, timeout=2)
            return
        except (OSError, http.client.HTTPException) as exc:
            last_error = exc
            time.sleep(0.05)
    raise TimeoutError(f"server did not answer within {timeout}s ({last_error}):\n{server.log()}")


def _stop(server: Server, grace: float = 15) -> None:
    proc = server.proc
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    kill_group(proc)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)
    # Wait for stragglers (workers) in the group to be reaped by init.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except (ProcessLookupError, PermissionError):
            return
        time.sleep(0.02)
