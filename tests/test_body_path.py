"""The ASGI request path's mechanics: what its receive wrapper does with message shapes,
cancellations, timeouts, other awaitables and references, and how the middleware sends
each scope its way."""

from __future__ import annotations

import asyncio
import gc
import inspect
import logging
import sys
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from memguard import MemGuardMiddleware
from memguard.errors import BodyTooLarge
from memguard.types import Message, Receive, Scope, Send
from tests.body_helpers import Exchange, exchange


def cl(n: int) -> tuple[bytes, bytes]:
    return (b"content-length", str(n).encode())


def test_app_gets_every_chunk_and_the_count_is_exact() -> None:
    seen: list[bytes] = []
    bodies: list[Any] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        bodies.append(receive)
        while True:
            message = await receive()
            seen.append(message["body"])
            if not message["more_body"]:
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    chunks = [bytes([i]) * (1000 + i) for i in range(50)]
    ex = asyncio.run(exchange(MemGuardMiddleware(app, max_body_size=10**6),
                              headers=[cl(sum(map(len, chunks)))], chunks=chunks))
    assert ex.status == 200 and seen == chunks
    counter = bodies[0].__self__.counter  # the app's receive is the body wrapper's
    assert counter.received == sum(map(len, chunks))


@pytest.mark.parametrize("last", [
    {"type": "http.request", "body": b"z" * 10, "more_body": False},
    {"type": "http.request", "body": b"z" * 10},
    {"body": b"z" * 10, "type": "".join(["http.", "request"])},
])
def test_the_last_chunk_ends_the_body_and_later_receives_reach_the_server(
        last: Message) -> None:
    """The last chunk (``more_body`` False or absent) is counted, and ends the body: the
    app's next receive() is the server's own (here its http.disconnect)."""
    messages = [{"type": "http.request", "body": b"a" * 10, "more_body": True}, last,
                {"type": "http.disconnect"}]
    seen: list[Message] = []
    bodies: list[Any] = []

    async def receive() -> Message:
        await asyncio.sleep(0)
        return messages.pop(0)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        bodies.append(receive)
        seen.extend([await receive(), await receive(), await receive()])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    ex = asyncio.run(exchange(MemGuardMiddleware(app, max_body_size=20),
                              headers=[cl(20)], receive=receive))
    assert ex.status == 200
    assert [m["type"] for m in seen] == ["http.request", "http.request", "http.disconnect"]
    read = bodies[0].__self__
    assert read.done and read.counter.received == 20


@pytest.mark.parametrize(("last", "status"), [
    ({"type": "http.request", "body": b"z" * 11, "more_body": False}, 413),
    ({"type": "http.request", "body": b"z" * 11}, 413),
    ({"type": "http.disconnect", "body": b"z" * 11}, 200),  # not a body: not counted
])
def test_a_last_chunk_over_the_limit_is_413_and_only_body_bytes_count(
        last: Message, status: int) -> None:
    messages = [{"type": "http.request", "body": b"a" * 10, "more_body": True}, last]

    async def receive() -> Message:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    ex = asyncio.run(exchange(MemGuardMiddleware(app, max_body_size=20),
                              headers=[(b"transfer-encoding", b"chunked")], receive=receive))
    assert ex.status == status


def test_the_apps_receive_takes_no_arguments() -> None:
    """With the C path the app's receive is the body's receiver (a vectorcall object):
    called as ASGI says, with nothing; anything else is a TypeError, as it would be for
    a server's ``async def receive()``."""
    errors: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        for args, kwargs in (((1,), {}), ((), {"x": 1})):
            try:
                receive(*args, **kwargs)  # type: ignore[call-arg]
            except TypeError as exc:
                errors.append(str(exc))
        await _reader(scope, receive, send)

    ex = asyncio.run(exchange(MemGuardMiddleware(app), headers=[cl(3)], chunks=[b"abc"]))
    assert ex.status == 200 and len(errors) == 2


def test_limit_crossed_in_the_middle_of_the_c_path_is_413(
        caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="memguard.body"):
        ex = asyncio.run(exchange(MemGuardMiddleware(_reader, max_body_size=25_000),
                                  headers=[(b"transfer-encoding", b"chunked")],
                                  chunks=[b"x" * 1000] * 40))
    assert ex.status == 413
    # Cut at the chunk that crossed; the rest drained after the answer.
    assert "received=26000" in caplog.records[0].getMessage()
    assert ex.delivered == 40_000


def _shaped(shape: str, chunk: bytes, more: bool) -> Message:
    """A body message built the ways servers might: the usual literal, another key
    order, keys that are equal to the interned names but not them, an extra key, a
    deleted entry before the body."""
    if shape == "literal":
        return {"type": "http.request", "body": chunk, "more_body": more}
    if shape == "reordered":
        return {"more_body": more, "body": chunk, "type": "http.request"}
    if shape == "built_keys":
        return {"".join(["ty", "pe"]): "http.request", "".join(["bo", "dy"]): chunk,
                "".join(["more_", "body"]): more}
    if shape == "extra_key":
        return {"type": "http.request", "trailers": False, "body": chunk, "more_body": more}
    message: Message = {"type": "http.request", "x": 1, "body": chunk, "more_body": more}
    del message["x"]
    return message


@pytest.mark.parametrize("shape", ["literal", "reordered", "built_keys", "extra_key",
                                   "deleted_entry"])
def test_the_limit_holds_whatever_shape_the_server_gives_its_messages(
        shape: str, caplog: pytest.LogCaptureFixture) -> None:
    """The C path reads ``body`` and ``more_body`` in place where the message is the
    usual literal, and looks them up otherwise: either way every byte is counted."""
    sent = 0

    async def receive() -> Message:
        nonlocal sent
        sent += 1
        await asyncio.sleep(0)
        return _shaped(shape, b"x" * 1000, sent < 40)

    with caplog.at_level(logging.WARNING, logger="memguard.body"):
        ex = asyncio.run(exchange(MemGuardMiddleware(_reader, max_body_size=25_000),
                                  headers=[(b"transfer-encoding", b"chunked")],
                                  receive=receive))
    assert ex.status == 413
    # Cut at the chunk that crossed; the rest drained after the answer.
    assert "received=26000" in caplog.records[0].getMessage()
    assert sent == 40

    sent = 0
    ex = asyncio.run(exchange(MemGuardMiddleware(_reader, max_body_size=40_000),
                              headers=[(b"transfer-encoding", b"chunked")], receive=receive))
    assert ex.status == 200 and sent == 40


async def _reader(scope: Scope, receive: Receive, send: Send) -> None:
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b""})


def test_cancelling_the_apps_own_wait_is_not_a_timeout() -> None:
    """A cancellation that is not the guard's (the app's own timeout) reaches the app
    as CancelledError / TimeoutError, and the body can be read on afterwards."""
    outcome: dict[str, Any] = {}
    gate = asyncio.Event()

    async def server_receive_factory() -> Any:
        chunks = [b"a" * 10, b"b" * 10, b"c" * 10]

        async def receive() -> Message:
            chunk = chunks.pop(0)
            if chunk.startswith(b"b"):
                await gate.wait()  # the second chunk comes late
            return {"type": "http.request", "body": chunk, "more_body": bool(chunks)}
        return receive

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        outcome["first"] = (await receive())["body"]
        try:
            await asyncio.wait_for(receive(), 0.05)
        except asyncio.TimeoutError:
            outcome["timed_out"] = True
        gate.set()
        rest = b""
        while True:
            message = await receive()
            rest += message["body"]
            if not message["more_body"]:
                break
        outcome["rest"] = rest
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def main() -> Exchange:
        return await exchange(MemGuardMiddleware(app, body_idle_timeout=30),
                              headers=[cl(30)], receive=await server_receive_factory())

    ex = asyncio.run(main())
    assert outcome["first"] == b"a" * 10 and outcome["timed_out"]
    # The cancelled wait consumed the server's second receive() (as it would without
    # memguard); what is left arrives whole.
    assert outcome["rest"] == b"c" * 10
    assert ex.status == 200


class _OneChunkThen:
    """A server's receive(): one middle chunk, then every later call awaits ``wait()``."""

    def __init__(self, wait: Callable[[], Awaitable[Message]]) -> None:
        self.wait = wait
        self.calls = 0

    async def __call__(self) -> Message:
        self.calls += 1
        if self.calls == 1:
            return {"type": "http.request", "body": b"x", "more_body": True}
        return await self.wait()


def test_task_cancelled_while_waiting_propagates() -> None:
    started = asyncio.Event()

    async def stalled() -> Message:
        started.set()
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    async def main() -> None:
        task = asyncio.ensure_future(exchange(MemGuardMiddleware(_reader), headers=[cl(10)],
                                              receive=_OneChunkThen(stalled)))
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())


def test_a_server_receive_returning_a_future_is_awaited() -> None:
    async def main() -> Any:
        loop = asyncio.get_running_loop()
        chunks = [b"x" * 5, b"y" * 5]

        def receive() -> asyncio.Future[Message]:
            future: asyncio.Future[Message] = loop.create_future()
            chunk = chunks.pop(0)
            loop.call_soon(future.set_result, {"type": "http.request", "body": chunk,
                                                "more_body": bool(chunks)})
            return future

        return await exchange(MemGuardMiddleware(_reader), headers=[cl(10)],
                              receive=receive)

    assert asyncio.run(main()).status == 200


def test_no_reference_is_leaked_per_chunk() -> None:
    """The same message object handed out many times, and the body object: their
    reference counts come back to where they were (a leak in C would grow them)."""
    message = {"type": "http.request", "body": b"z" * 100, "more_body": True}
    last = {"type": "http.request", "body": b"", "more_body": False}
    count = 2000
    state = {"n": 0}

    async def receive() -> Message:
        state["n"] += 1
        return message if state["n"] < count else last

    async def main() -> tuple[int, int, int]:
        before = sys.getrefcount(message)
        holder: list[Any] = []

        async def app(scope: Scope, receive_: Receive, send_: Send) -> None:
            holder.append(receive_)
            await _reader(scope, receive_, send_)

        await exchange(MemGuardMiddleware(app, max_body_size=10**9),
                       headers=[(b"transfer-encoding", b"chunked")], receive=receive)
        return before, sys.getrefcount(message), sys.getrefcount(holder[0])

    before, after, holder_refs = asyncio.run(main())
    assert after == before
    # The list, getrefcount's argument, and the middleware's frame is gone: 2 (or 3 if
    # the pure path's bound method is what the app got).
    assert holder_refs <= 3


def test_a_task_dropped_while_it_waits_is_collected(caplog: pytest.LogCaptureFixture) -> None:
    """While the app waits in receive(), its task's frame holds the awaitable, which holds
    the body, which holds the task (for the slow-body timer): a cycle. A task dropped
    while suspended (its server gone without cancelling it) must still be collectable.
    (asyncio logs "Task was destroyed but it is pending": caplog keeps it quiet.)"""

    class Sentinel:
        pass

    async def main() -> Any:
        loop = asyncio.get_running_loop()
        never: list[asyncio.Future[Message]] = [loop.create_future()]
        server_receive = _OneChunkThen(lambda: never[0])

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            sentinel = Sentinel()
            refs.append(weakref.ref(sentinel))
            while (await receive()).get("more_body"):
                pass

        refs: list[weakref.ref[Sentinel]] = []
        task = loop.create_task(exchange(MemGuardMiddleware(app), headers=[cl(10)],
                                         receive=server_receive))
        for _ in range(5):
            await asyncio.sleep(0)
        assert server_receive.calls == 2 and not task.done()  # in the second receive()
        del task
        never.clear()
        gc.collect()
        return refs[0]

    ref = asyncio.run(main())
    gc.collect()
    assert ref() is None


class _Name(bytes):
    """A bytes subclass: equal to the plain name, so it frames a body too."""


FRAMING_CASES = [
    ([], False),
    ([(b"host", b"x"), (b"accept", b"*/*")], False),
    ([(b"host", b"x"), (b"content-length", b"5")], True),
    ([(b"transfer-encoding", b"chunked")], True),
    ([[b"content-length", b"5"]], True),                      # lists, not tuples
    (((b"host", b"x"), (b"content-length", b"5")), True),     # a tuple of headers
    ([(_Name(b"content-length"), b"5")], True),
    ([(b"Content-Length", b"5")], False),   # ASGI names are lower-case: not a match
    ([(b"content-length-x", b"5"), (b"content-lengt", b"5")], False),
    ([("content-length", "5")], False),     # str names are not ASGI's bytes
]


class _Name(bytes):
    """A bytes subclass: equal to the plain name, so it frames a body too."""


FRAMING_CASES = [
    ([], False),
    ([(b"host", b"x"), (b"accept", b"*/*")], False),
    ([(b"host", b"x"), (b"content-length", b"5")], True),
    ([(b"transfer-encoding", b"chunked")], True),
    ([[b"content-length", b"5"]], True),                      # lists, not tuples
    (((b"host", b"x"), (b"content-length", b"5")), True),     # a tuple of headers
    ([(_Name(b"content-length"), b"5")], True),
    ([(b"Content-Length", b"5")], False),   # ASGI names are lower-case: not a match
    ([(b"content-length-x", b"5"), (b"content-lengt", b"5")], False),
]


@pytest.mark.parametrize(("headers", "framed"), FRAMING_CASES)
def test_only_a_framed_request_gets_the_body_wrapper(headers: Any, framed: bool) -> None:
    """A bodyless request reaches the app with the server's own receive (nothing
    allocated for it); a framed one with the body wrapper's."""
    got: list[Any] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        got.append(receive)
        await _hello(scope, receive, send)

    async def server_receive() -> Message:
        return {"type": "http.request", "body": b"12345", "more_body": False}

    async def send(message: Message) -> None:
        pass

    scope = {**GET_SCOPE, "headers": headers}
    asyncio.run(MemGuardMiddleware(app)(scope, server_receive, send))
    assert (got[0] is not server_receive) is framed


async def _hello(scope: Scope, receive: Receive, send: Send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"hi"})


GET_SCOPE: dict[str, Any] = {"type": "http", "asgi": {"version": "3.0"},
                             "http_version": "1.1", "method": "GET", "path": "/",
                             "raw_path": b"/", "query_string": b"", "root_path": "",
                             "headers": []}
POST_SCOPE: dict[str, Any] = {**GET_SCOPE, "method": "POST", "headers": [cl(2)]}


def test_servers_still_see_an_asgi3_coroutine_app() -> None:
    """uvicorn, hypercorn and Starlette tell ASGI 3 apps by
    ``iscoroutinefunction(app.__call__)``; asyncio's tasks take what the call returns."""
    from uvicorn.config import Config

    mw = MemGuardMiddleware(_hello)
    assert inspect.iscoroutinefunction(mw.__call__)
    assert asyncio.iscoroutinefunction(mw.__call__)
    config = Config(mw)
    config.load()
    assert config.interface == "asgi3"
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    async def main() -> None:
        for scope in (GET_SCOPE, POST_SCOPE):
            awaitable = mw(dict(scope), _never_called, send)
            assert asyncio.iscoroutine(awaitable)
            await asyncio.get_running_loop().create_task(awaitable)  # type: ignore[arg-type]

    asyncio.run(main())
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"] * 2


async def _never_called() -> Message:
    raise AssertionError("receive() called by an app that reads no body")


def test_an_app_that_raises_when_called_is_an_app_that_raised() -> None:
    """The app is called when the request is first awaited, as a coroutine's body runs;
    an exception at the call is handled as one raised inside the app."""
    def refusing(scope: Scope, receive: Receive, send: Send) -> Any:
        raise BodyTooLarge("quota", reason="upload_quota", limit=1)

    def failing(scope: Scope, receive: Receive, send: Send) -> Any:
        raise ValueError("broken app")

    ex = asyncio.run(exchange(MemGuardMiddleware(refusing), method="GET"))
    assert ex.status == 413
    ex = asyncio.run(exchange(MemGuardMiddleware(refusing), headers=[cl(3)], chunks=[b"abc"]))
    assert ex.status == 413
    with pytest.raises(ValueError, match="broken app"):
        asyncio.run(exchange(MemGuardMiddleware(failing), method="GET"))


@pytest.mark.parametrize("how", ["closed", "dropped"])
def test_a_request_closed_or_dropped_before_its_end_is_still_accounted(how: str) -> None:
    """close(), or the awaitable dropped while suspended, ends the request's accounting
    (the tracker counts it finished), as a coroutine's finally blocks would."""
    mw = MemGuardMiddleware(_slow_hello)
    tracker = mw.memory.tracker
    assert tracker is not None

    async def main() -> None:
        awaitable: Any = mw(dict(POST_SCOPE), _never_called, _discard)
        step = awaitable.__await__()
        next(step)  # the app waits in its sleep
        if how == "closed":
            step.close()
        else:
            del step, awaitable
            gc.collect()

    before = tracker._finished_n
    asyncio.run(main())
    assert tracker._finished_n == before + 1


async def _slow_hello(scope: Scope, receive: Receive, send: Send) -> None:
    await asyncio.sleep(3600)


async def _discard(message: Message) -> None:
    pass


@pytest.mark.parametrize("shed, expected", [("all", [503, 503]), ("heavy", [200, 503]),
                                            ("off", [200, 200])])
def test_critical_pressure_sheds_before_the_app_with_or_without_a_body(
        shed: str, expected: list[int]) -> None:
    """A worker over its hard limit: requests are shed with 503 before the app runs
    (``heavy``: only POST, PUT, PATCH), whichever path, C or coroutine, carries them."""
    called: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        called.append(scope["method"])
        if scope["method"] == "POST":
            while (await receive()).get("more_body"):
                pass
        await _hello(scope, receive, send)

    mw = MemGuardMiddleware(app, worker_memory_hard_limit="1MiB", memory_shed=shed)
    get = asyncio.run(exchange(mw, method="GET"))
    post = asyncio.run(exchange(mw, headers=[cl(3)], chunks=[b"abc"]))
    assert [get.status, post.status] == expected
    assert called == [m for m, status in zip(["GET", "POST"], expected, strict=True)
                      if status == 200]
    for ex in (get, post):
        if ex.status == 503:
            assert b"retry-after" in ex.headers and ex.receive_calls == 0


def test_the_dispatch_sends_each_scope_its_way() -> None:
    """The middleware's call picks the path: other scopes get the app's own call with
    the server's receive and send, HTTP/2 or a framed request gets the body path (its
    scope carries the memguard extension), a plain HTTP/1 request without framing gets
    none, and a scope that is not a plain dict is read the same way."""
    seen: list[Any] = []

    class Recorder:
        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] != "http":
                seen.append((scope["type"], receive, send))
                return
            seen.append("memguard" in scope.get("extensions", {}))
            await _hello(scope, receive, send)

    class Scope(dict[str, Any]):
        pass

    mw = MemGuardMiddleware(Recorder())
    asyncio.run(mw({"type": "websocket"}, _never_called, _discard))
    asyncio.run(mw({"type": "lifespan"}, _never_called, _discard))
    assert seen == [("websocket", _never_called, _discard),
                    ("lifespan", _never_called, _discard)]
    seen.clear()

    async def main() -> None:
        await mw(dict(GET_SCOPE), _never_called, _discard)
        await mw({**GET_SCOPE, "http_version": "2"}, _never_called, _discard)
        await mw(dict(POST_SCOPE), _never_called, _discard)
        await mw(Scope(GET_SCOPE), _never_called, _discard)
        await mw(Scope(POST_SCOPE), _never_called, _discard)

    asyncio.run(main())
    assert seen == [False, True, True, False, True]
    with pytest.raises(KeyError):
        asyncio.run(mw({"headers": []}, _never_called, _discard))


def test_the_dispatch_and_the_body_path_leak_no_reference() -> None:
    """What the middleware's call and the C awaitable hold is released when the request
    ends, on every path (counted on the receive and send callables)."""
    mw = MemGuardMiddleware(_reader_then_hello)
    small = MemGuardMiddleware(_reader_then_hello, max_body_size=1)

    async def receive() -> Message:
        return {"type": "http.request", "body": b"ab", "more_body": False}

    statuses: list[int] = []

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    async def main() -> None:
        for _ in range(100):
            await mw(dict(GET_SCOPE), receive, send)
            await mw(dict(POST_SCOPE), receive, send)
            await small(dict(POST_SCOPE), receive, send)  # 413 on the declared length
            await small({**POST_SCOPE, "headers": [(b"transfer-encoding", b"chunked")]},
                        receive, send)  # 413 on the bytes received
            mw({"type": "lifespan"}, receive, send).close()

    before = sys.getrefcount(receive), sys.getrefcount(send)
    asyncio.run(main())
    gc.collect()
    assert (sys.getrefcount(receive), sys.getrefcount(send)) == before
    assert statuses == [200, 200, 413, 413] * 100


async def _reader_then_hello(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        return
    if scope["method"] == "POST":
        while (await receive()).get("more_body"):
            pass
    await _hello(scope, receive, send)
