"""A recycling worker stops accepting connections when its recycle starts, on asyncio's
loop and on uvloop, and serves those it had accepted: real gunicorn and uvicorn.

Left to themselves, uvicorn accepts until its next tick after the SIGTERM (0.1 s) and
gunicorn's ``asgi`` worker until its main loop reads ``alive`` (1 s); at a leak's pace
those new requests are what tips a container over.
"""

from __future__ import annotations

import importlib.util
import socket
import threading
import time
from pathlib import Path

import pytest

from tests.support.rawhttp import read_response, request_head
from tests.support.servers import http_request, serve
from tests.test_gunicorn_recycle import load

pytestmark = pytest.mark.server

APP = "tests.apps.recycle_app:app"
CONF = ["-c", "python:memguard.gunicorn.conf"]
UVLOOP = importlib.util.find_spec("uvloop") is not None


def _uvloop(loop: str) -> object:
    return pytest.param(loop, marks=pytest.mark.skipif(
        not UVLOOP, reason="uvloop is not installed (uvicorn[standard] brings it)"))


LOOPS = ["asyncio", _uvloop("uvloop")]

# The server's command line for a kind and a loop, with `workers` processes.
SERVERS = {
    "uvicorn_worker": lambda loop, workers: ("gunicorn", [
        *CONF, "-w", str(workers), "-k",
        "uvicorn_worker.UvicornWorker" if loop == "uvloop" else "uvicorn_worker.UvicornH11Worker"]),
    "asgi": lambda loop, workers: ("gunicorn", [
        *CONF, "-w", str(workers), "-k", "asgi", "--asgi-loop", loop]),
    # uvicorn's supervisor replaces a worker only with --workers 2 or more.
    "uvicorn": lambda loop, workers: ("uvicorn", [
        "--workers", str(max(workers, 2)), "--loop", loop]),
}


def _answer(body: bytes) -> tuple[int, str]:
    pid, loop = body.decode().split()
    return int(pid), loop


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("kind", list(SERVERS))
def test_a_recycling_worker_accepts_no_new_connection(kind: str, loop: str,
                                                      repo: Path) -> None:
    """One worker (two under standalone uvicorn) asks for its recycle and answers. Eight
    connections opened after that answer are all served, none by the recycling worker:
    they wait in the socket's queue for its replacement or go to the other worker."""
    server_kind, args = SERVERS[kind](loop, 1)
    with serve(server_kind, APP, args, cwd=repo, timeout=60) as server:
        status, _, body = http_request(server.url, path="/recycle")
        assert status == 200
        recycling, served_on = _answer(body)
        assert served_on.startswith(loop)  # the server runs the loop under test
        answers: list[tuple[int, str] | str] = []

        def get() -> None:
            try:
                answers.append(_answer(http_request(server.url, timeout=30)[2]))
            except Exception as exc:  # a reset, a closed connection: a failed request
                answers.append(repr(exc))

        threads = [threading.Thread(target=get) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        log = server.log()
    assert len(answers) == 8
    assert all(isinstance(a, tuple) for a in answers), answers
    assert recycling not in {a[0] for a in answers if isinstance(a, tuple)}, log[-3000:]
    assert "recycling worker" in log


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("kind", list(SERVERS))
def test_a_connection_accepted_before_the_recycle_is_served_after_it(kind: str, loop: str,
                                                                     repo: Path) -> None:
    """A client connects, the worker accepts, and the client's request comes only after
    the worker's recycle has started (a client slowed down between the two): it is
    answered, not closed unanswered by the worker's shutdown."""
    server_kind, args = SERVERS[kind](loop, 1)
    with serve(server_kind, APP, args, cwd=repo, timeout=60) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as slow:
            time.sleep(0.3)  # accepted by now: the loop is idle
            status, _, _ = http_request(server.url, path="/recycle")
            assert status == 200
            time.sleep(0.5)  # past the signal's delay and uvicorn's next tick
            slow.sendall(request_head("GET", "Connection: close").encode() + b"\r\n")
            statuses, body = read_response(slow, time.monotonic() + 30)
        log = server.log()
    assert statuses == [200], log[-3000:]
    assert _answer(body)[1].startswith(loop)
    assert "recycling worker" in log


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("kind", list(SERVERS))
def test_recycles_under_load_fail_no_request(kind: str, loop: str, repo: Path) -> None:
    """300 requests from 4 clients while every worker recycles after its 25th: each
    recycle stops accepting at once and serves what it accepted, and none fails."""
    server_kind, args = SERVERS[kind](loop, 2)
    with serve(server_kind, APP, args, cwd=repo, env={"RECYCLE_EVERY": "25"},
               timeout=60) as server:
        ok, failed, errors = load(server.url, count=300, clients=4)
        log = server.log()
    assert (ok, failed) == (300, 0), (errors[:5], log[-3000:])
    assert log.count("recycling worker") >= 8, log[-3000:]
