"""The WSGI body guard, driven directly: framing, limits, input wrapper, timeouts."""

from __future__ import annotations

import gzip
import io
import socket
import time
from collections.abc import Iterable, Iterator
from typing import Any

import pytest

from memguard import MemGuardWSGIMiddleware, counters
from memguard.errors import BodyTooLarge
from tests.apps.body_apps import wsgi_echo
from tests.body_helpers import cyclic_garbage, gzip_bomb, wsgi_call


@pytest.fixture(autouse=True)
def _fresh_counts() -> None:
    counters.reset()


def test_bodyless_request_is_untouched() -> None:
    seen: dict[str, Any] = {}
    stream = io.BytesIO(b"")

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        seen["input"] = environ["wsgi.input"]
        start_response("200 OK", [])
        return [b"ok"]

    status, _, body = wsgi_call(MemGuardWSGIMiddleware(app), "GET",
                                environ={"wsgi.input": stream})
    assert status == "200 OK" and body == b"ok" and seen["input"] is stream


def test_within_limit_and_limit_exposed() -> None:
    app = MemGuardWSGIMiddleware(wsgi_echo, max_body_size=100)
    status, _, body = wsgi_call(app, body=b"x" * 100, environ={"CONTENT_LENGTH": "100"})
    assert status == "200 OK" and body.split()[0] == b"100" and body.split()[2] == b"100"


def test_declared_over_limit_is_refused_without_reading() -> None:
    stream = io.BytesIO(b"x" * 200)
    app = MemGuardWSGIMiddleware(wsgi_echo, max_body_size=100)
    status, headers, body = wsgi_call(app, environ={"CONTENT_LENGTH": "200",
                                                    "wsgi.input": stream})
    assert status.startswith("413 ") and stream.tell() == 0
    # No Connection header: PEP 3333 forbids hop-by-hop headers from an application.
    assert "connection" not in headers and body.startswith(b"413 ")
    assert counters.get("body", "content_length_over_limit") == 1


@pytest.mark.parametrize("environ, status, reason", [
    ({"CONTENT_LENGTH": "abc"}, "400", "content_length_invalid"),
    ({"CONTENT_LENGTH": "-5"}, "400", "content_length_invalid"),
    ({"CONTENT_LENGTH": "5", "HTTP_TRANSFER_ENCODING": "chunked"}, "400",
     "content_length_with_transfer_encoding"),
    ({"HTTP_TRANSFER_ENCODING": "chunked"}, "411", "length_required"),
])
def test_framing(environ: dict[str, Any], status: str, reason: str) -> None:
    got, _, _ = wsgi_call(MemGuardWSGIMiddleware(wsgi_echo), body=b"hello", environ=environ)
    assert got.startswith(status) and counters.get("body", reason) == 1


def test_wsgiref_gets_no_hop_by_hop_header() -> None:
    status, headers, _ = wsgi_call(MemGuardWSGIMiddleware(wsgi_echo, max_body_size=1),
                                   environ={"CONTENT_LENGTH": "2",
                                            "SERVER_SOFTWARE": "WSGIServer/0.2"})
    assert status.startswith("413") and "connection" not in headers


CHUNKED = {"HTTP_TRANSFER_ENCODING": "chunked", "wsgi.input_terminated": True}


def test_chunked_over_limit_reads_at_most_one_byte_past_it() -> None:
    stream = io.BytesIO(b"x" * 10_000)
    app = MemGuardWSGIMiddleware(wsgi_echo, max_body_size=1000)
    status, _, _ = wsgi_call(app, environ={**CHUNKED, "wsgi.input": stream})
    assert status.startswith("413") and stream.tell() == 1001


def test_read_all_at_once_is_bounded_too() -> None:
    stream = io.BytesIO(b"x" * 10_000)

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        environ["wsgi.input"].read()
        start_response("200 OK", [])
        return [b"read it all"]

    status, _, _ = wsgi_call(MemGuardWSGIMiddleware(app, max_body_size=1000),
                             environ={**CHUNKED, "wsgi.input": stream})
    assert status.startswith("413") and stream.tell() <= 1001


def test_a_500_made_of_the_refusal_becomes_the_refusal() -> None:
    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        try:
            environ["wsgi.input"].read()
        except Exception:
            start_response("500 Internal Server Error", [])
            return [b"Internal Server Error"]
        start_response("200 OK", [])
        return [b"fine"]

    status, _, body = wsgi_call(MemGuardWSGIMiddleware(app, max_body_size=10),
                                body=b"x" * 50, environ=CHUNKED)
    assert status.startswith("413") and b"Internal" not in body


class Closing:
    def __init__(self, parts: Iterator[bytes]) -> None:
        self.parts = parts
        self.closed = False

    def __iter__(self) -> Iterator[bytes]:
        return self.parts

    def close(self) -> None:
        self.closed = True


def test_lazy_reader_refused_before_anything_was_sent() -> None:
    results: list[Closing] = []

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])

        def parts() -> Iterator[bytes]:
            while environ["wsgi.input"].read(10):
                yield b""
            yield b"done"

        results.append(Closing(parts()))
        return results[0]

    status, _, body = wsgi_call(MemGuardWSGIMiddleware(app, max_body_size=25),
                                body=b"x" * 100, environ=CHUNKED)
    assert status.startswith("413") and body.startswith(b"413") and results[0].closed


def test_lazy_reader_refused_after_sending_ends_the_response_with_an_error() -> None:
    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        start_response("200 OK", [])

        def parts() -> Iterator[bytes]:
            while chunk := environ["wsgi.input"].read(10):
                yield chunk

        return parts()

    with pytest.raises(BodyTooLarge):
        wsgi_call(MemGuardWSGIMiddleware(app, max_body_size=25), body=b"x" * 100,
                  environ=CHUNKED)


def test_report_only() -> None:
    app = MemGuardWSGIMiddleware(wsgi_echo, max_body_size=10, report_only=True)
    status, _, body = wsgi_call(app, body=b"x" * 50, environ={"CONTENT_LENGTH": "50"})
    assert status == "200 OK" and body.startswith(b"50 ")
    status, _, body = wsgi_call(app, body=b"x" * 50, environ=CHUNKED)
    assert status == "200 OK" and body.startswith(b"50 ")
    assert counters.get("body", "report_only:content_length_over_limit") == 1
    assert counters.get("body", "report_only:body_over_limit") == 1
    assert counters.get("body", "body_over_limit") == 0


def test_input_wrapper_file_interface() -> None:
    lines = b"one\ntwo\nthree\n" + b"x" * 100_000 + b"\nlast"
    got: dict[str, Any] = {}

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        stream = environ["wsgi.input"]
        got["first"] = stream.readline()
        got["two"] = stream.readline(2)
        got["rest_of_two"] = stream.readline()
        got["lines"] = list(stream)
        got["eof"] = stream.read(10)
        start_response("200 OK", [])
        return [b""]

    app_ = MemGuardWSGIMiddleware(app)
    wsgi_call(app_, body=lines + b"garbage past the length",
              environ={"CONTENT_LENGTH": str(len(lines))})
    assert got["first"] == b"one\n" and got["two"] == b"tw" and got["rest_of_two"] == b"o\n"
    assert b"".join(got["lines"]) == b"three\n" + b"x" * 100_000 + b"\nlast"
    assert got["eof"] == b""


def test_short_body_is_400() -> None:
    status, _, _ = wsgi_call(MemGuardWSGIMiddleware(wsgi_echo), body=b"x" * 10,
                             environ={"CONTENT_LENGTH": "100"})
    assert status.startswith("400") and counters.get("body", "body_incomplete") == 1


def test_gzip_decoded_and_bomb_refused() -> None:
    raw = bytes(range(256)) * 500
    data = gzip.compress(raw)
    app = MemGuardWSGIMiddleware(wsgi_echo, decompress=True)
    status, _, body = wsgi_call(app, body=data, environ={"CONTENT_LENGTH": str(len(data)),
                                                         "HTTP_CONTENT_ENCODING": "gzip"})
    assert status == "200 OK" and body.split()[0] == str(len(raw)).encode()
    bomb = gzip_bomb(100)
    status, _, _ = wsgi_call(app, body=bomb, environ={"CONTENT_LENGTH": str(len(bomb)),
                                                      "HTTP_CONTENT_ENCODING": "gzip",
                                                      "CONTENT_TYPE": "application/gzip"})
    assert status.startswith("413") and counters.get("body", "decompression_ratio") == 1
    status, _, _ = wsgi_call(app, body=b"abc", environ={"CONTENT_LENGTH": "3",
                                                        "HTTP_CONTENT_ENCODING": "zstd"})
    assert status.startswith("415")


class Drip(io.RawIOBase):
    def __init__(self, chunks: int, delay: float) -> None:
        self.chunks, self.delay = chunks, delay

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        if not self.chunks:
            return b""
        self.chunks -= 1
        time.sleep(self.delay)
        return b"x"


def test_min_rate_judged_as_reads_return() -> None:
    app = MemGuardWSGIMiddleware(wsgi_echo, body_min_rate=1000, body_rate_grace=0.2)
    status, _, _ = wsgi_call(app, environ={**CHUNKED, "wsgi.input": Drip(100, 0.01)})
    assert status.startswith("408") and counters.get("body", "body_too_slow") == 1


def test_idle_timeout_on_the_gunicorn_socket() -> None:
    client, server = socket.socketpair()
    try:
        client.sendall(b"x" * 10)
        app = MemGuardWSGIMiddleware(wsgi_echo, body_idle_timeout=0.2)
        started = time.monotonic()
        with server.makefile("rb") as stream:
            status, headers, _ = wsgi_call(app, environ={
                "CONTENT_LENGTH": "100", "wsgi.input": stream, "gunicorn.socket": server})
        assert status.startswith("408") and "connection" not in headers
        assert time.monotonic() - started < 5
        assert counters.get("body", "body_idle_timeout") == 1
    finally:
        client.close()
        server.close()


class UwsgiTimingOut(io.RawIOBase):
    """uWSGI's wsgi.input once its --socket-timeout expires: a bare OSError, no errno."""

    def read(self, size: int = -1) -> bytes:
        raise OSError(f"timeout during read({size}) on wsgi.input")


class ServerFailing(io.RawIOBase):
    def read(self, size: int = -1) -> bytes:
        raise ConnectionResetError(104, "Connection reset by peer")


def test_the_servers_own_read_timeout_is_408() -> None:
    app = MemGuardWSGIMiddleware(wsgi_echo, body_idle_timeout=1)
    status, headers, body = wsgi_call(app, environ={"CONTENT_LENGTH": "100",
                                                    "wsgi.input": UwsgiTimingOut()})
    assert status.startswith("408") and b"read timeout" in body
    assert counters.get("body", "body_idle_timeout") == 1
    # Any other failure of the server's stream is not taken for a timeout.
    with pytest.raises(ConnectionResetError):
        wsgi_call(app, environ={"CONTENT_LENGTH": "100", "wsgi.input": ServerFailing()})


def test_socket_timeout_restored_after_a_whole_body() -> None:
    client, server = socket.socketpair()
    try:
        client.sendall(b"x" * 100)
        app = MemGuardWSGIMiddleware(wsgi_echo, body_idle_timeout=5)
        with server.makefile("rb") as stream:
            status, _, _ = wsgi_call(app, environ={
                "CONTENT_LENGTH": "100", "wsgi.input": stream, "gunicorn.socket": server})
        assert status == "200 OK" and server.gettimeout() is None
    finally:
        client.close()
        server.close()


def test_read_zero_is_not_the_end_of_the_body() -> None:
    got: list[bytes] = []

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        got.append(environ["wsgi.input"].read(0))
        got.append(environ["wsgi.input"].read())
        start_response("200 OK", [])
        return [b""]

    wsgi_call(MemGuardWSGIMiddleware(app), body=b"abc", environ={"CONTENT_LENGTH": "3"})
    assert got == [b"", b"abc"]


def test_app_raising_a_refusal_without_a_body_after_start_response() -> None:
    from memguard.errors import MemoryPressure

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        start_response("200 OK", [])
        raise MemoryPressure("busy", reason="memory_high", headers={"Retry-After": "2"})

    status, headers, body = wsgi_call(MemGuardWSGIMiddleware(app), "GET")
    assert status.startswith("503") and headers["retry-after"] == "2"
    assert counters.get("memory", "memory_high") == 1


def _wsgi_refusing(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
    environ["wsgi.input"].read()
    raise BodyTooLarge("the app's own limit")


_ZIPPED = gzip.compress(b"a" * 100)
_CYCLE_CASES: dict[str, tuple[Any, dict[str, Any], dict[str, Any]]] = {
    "bodyless": (wsgi_echo, {}, {"method": "GET"}),
    "within the limit": (wsgi_echo, {}, {"body": b"a" * 30,
                                         "environ": {"CONTENT_LENGTH": "30"}}),
    "declared over the limit": (wsgi_echo, {"max_body_size": 10},
                                {"body": b"a" * 30, "environ": {"CONTENT_LENGTH": "30"}}),
    "counted over the limit": (wsgi_echo, {"max_body_size": 10}, {
        "body": b"a" * 30,
        "environ": {"HTTP_TRANSFER_ENCODING": "chunked", "wsgi.input_terminated": True}}),
    "decoded": (wsgi_echo, {"decompress": True}, {
        "body": _ZIPPED, "environ": {"CONTENT_LENGTH": str(len(_ZIPPED)),
                                     "HTTP_CONTENT_ENCODING": "gzip"}}),
    "refused by the app": (_wsgi_refusing, {}, {"body": b"a" * 30,
                                                "environ": {"CONTENT_LENGTH": "30"}}),
}


@pytest.mark.parametrize("case", list(_CYCLE_CASES))
def test_no_reference_cycle_outlives_a_wsgi_request(case: str) -> None:
    """The environ holds two of the request's methods (``memguard.reject``, the input
    wrapper's ``on_reject``) and the request holds the environ; a refusal's traceback
    holds the frame that caught it. The request lets go of them at its end, so nothing
    is left for the cycle collector."""
    app, options, request = _CYCLE_CASES[case]
    guarded = MemGuardWSGIMiddleware(app, **options)
    wsgi_call(guarded, **request)
    with cyclic_garbage() as left:
        status = wsgi_call(guarded, **request)[0]
    assert status.startswith("413" if "over" in case or "refused" in case else "200")
    assert left == []
