"""The ASGI body guard, driven directly: framing, limits, refusals, timeouts, decoding."""

from __future__ import annotations

import asyncio
import contextvars
import gc
import gzip
import json
import logging
import sys
import time
import weakref
import zlib
from pathlib import Path
from typing import Any

import pytest

import memguard
from memguard import MemGuardMiddleware, counters, events
from memguard.errors import BodyTooLarge, MemoryPressure, RequestTimeout
from memguard.slowbody import Sweeper as _Sweeper
from memguard.types import Message, Receive, Scope, Send
from tests.apps.body_apps import asgi_echo
from tests.body_helpers import cyclic_garbage, exchange, gzip_bomb, run


@pytest.fixture(autouse=True)
def _fresh_counts() -> None:
    counters.reset()


# An untyped body on a route without its own limit is capped as JSON (memguard.limits).
OCTETS = (b"content-type", b"application/octet-stream")


def cl(n: int | str) -> tuple[bytes, bytes]:
    return (b"content-length", str(n).encode())


TE = (b"transfer-encoding", b"chunked")
EXPECT = (b"expect", b"100-continue")


def test_public_names() -> None:
    assert memguard.__all__ == ["MemGuardMiddleware", "MemGuardWSGIMiddleware", "__version__"]
    from memguard.asgi import MemGuardMiddleware as A
    from memguard.wsgi import MemGuardWSGIMiddleware as W

    assert memguard.MemGuardMiddleware is A and memguard.MemGuardWSGIMiddleware is W


def test_unknown_option_names_the_closest() -> None:
    with pytest.raises(TypeError, match="max_body_size"):
        MemGuardMiddleware(asgi_echo, max_body_sise="1MiB")
    with pytest.raises(ValueError, match="max_body_size"):
        MemGuardMiddleware(asgi_echo, max_body_size="lots")


def test_bodyless_request_reaches_app_with_the_servers_own_receive() -> None:
    seen: dict[str, Any] = {}

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen["receive"], seen["scope"] = receive, scope
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def main() -> None:
        scope = {"type": "http", "http_version": "1.1", "method": "GET", "path": "/",
                 "headers": [(b"host", b"x"), (b"accept", b"*/*")]}

        async def receive() -> Message:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: Message) -> None:
            pass

        await MemGuardMiddleware(app)(scope, receive, send)
        assert seen["receive"] is receive and seen["scope"] is scope

    asyncio.run(main())


def test_non_http_scopes_pass_through() -> None:
    calls: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        calls.append(scope["type"])

    async def main() -> None:
        mw = MemGuardMiddleware(app, max_body_size=1)
        for kind in ("lifespan", "websocket"):
            await mw({"type": kind, "headers": [cl(10**9)]}, None, None)  # type: ignore[arg-type]

    asyncio.run(main())
    assert calls == ["lifespan", "websocket"]


def test_body_within_limit_is_delivered_whole_and_limit_is_exposed() -> None:
    app = MemGuardMiddleware(asgi_echo, max_body_size=100)
    ex = run(app, headers=[cl(100)], chunks=[b"a" * 40, b"b" * 60])
    assert ex.status == 200
    length, _, limit = ex.body.split()
    assert length == b"100" and limit == b"100"


def test_extensions_are_copied_not_mutated() -> None:
    shared = {"http.response.trailers": {}}
    seen: dict[str, Any] = {}

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.update(scope["extensions"])
        await asgi_echo(scope, receive, send)

    ex = run(MemGuardMiddleware(app), headers=[cl(3), OCTETS], chunks=[b"abc"],
             scope_extra={"extensions": shared})
    assert ex.status == 200
    assert seen["memguard"]["max_body_size"] == 16 * 1024 * 1024
    assert callable(seen["memguard"]["reject"])
    assert "http.response.trailers" in seen and shared == {"http.response.trailers": {}}


def test_declared_length_over_limit_is_refused_before_the_first_receive(
        caplog: pytest.LogCaptureFixture) -> None:
    app = MemGuardMiddleware(asgi_echo, max_body_size="1KiB")
    with caplog.at_level(logging.WARNING, logger="memguard.body"):
        # A client that waits for 100 Continue: nothing invites the body (without the
        # header, the body is drained after the answer, tests/test_request_regressions).
        ex = run(app, path="/up", headers=[cl(1025), EXPECT], chunks=[b"x" * 1025])
    assert ex.receive_calls == 0
    assert ex.status == 413 and ex.complete
    assert ex.headers[b"connection"] == b"close"
    assert ex.headers[b"content-type"].startswith(b"text/plain")
    assert ex.body.startswith(b"413 Content Too Large") or ex.body.startswith(b"413 Request")
    assert counters.get("body", "content_length_over_limit") == 1
    (rec,) = [r for r in caplog.records if r.name == "memguard.body"]
    assert "content_length_over_limit" in rec.getMessage()
    assert "limit=1024" in rec.getMessage() and "declared=1025" in rec.getMessage()


def test_problem_json_when_the_client_accepts_json() -> None:
    app = MemGuardMiddleware(asgi_echo, max_body_size=10)
    ex = run(app, headers=[cl(11), (b"accept", b"application/json")], chunks=[b"x" * 11])
    assert ex.status == 413
    assert ex.headers[b"content-type"] == b"application/problem+json"
    doc = json.loads(ex.body)
    assert doc["status"] == 413 and doc["reason"] == "content_length_over_limit"


@pytest.mark.parametrize("headers, reason", [
    ([cl("abc")], "content_length_invalid"),
    ([cl("-1")], "content_length_invalid"),
    ([cl("+5")], "content_length_invalid"),
    ([cl("1e3")], "content_length_invalid"),
    ([cl("")], "content_length_invalid"),
    ([cl(5), cl(6)], "content_length_conflict"),
    ([cl("5, 6")], "content_length_conflict"),
    ([cl(5), TE], "content_length_with_transfer_encoding"),
    ([(b"transfer-encoding", b"gzip")], "transfer_encoding_unsupported"),
])
def test_bad_framing_is_400(headers: list[tuple[bytes, bytes]], reason: str) -> None:
    ex = run(MemGuardMiddleware(asgi_echo), headers=headers, chunks=[b"hello"])
    assert ex.status == 400 and ex.receive_calls == 0
    assert ex.headers[b"connection"] == b"close"
    assert counters.get("body", reason) == 1


def test_identical_duplicate_content_lengths_are_accepted() -> None:
    ex = run(MemGuardMiddleware(asgi_echo), headers=[cl(5), cl(5)], chunks=[b"hello"])
    assert ex.status == 200 and ex.body.startswith(b"5 ")
    ex = run(MemGuardMiddleware(asgi_echo), headers=[cl("5, 5")], chunks=[b"hello"])
    assert ex.status == 200


def test_huge_declared_length_is_413_not_a_crash() -> None:
    ex = run(MemGuardMiddleware(asgi_echo), headers=[cl("9" * 5000)], chunks=[b"x"])
    assert ex.status == 413


def test_chunked_body_over_limit_is_cut_at_the_chunk_that_crosses(
        caplog: pytest.LogCaptureFixture) -> None:
    app = MemGuardMiddleware(asgi_echo, max_body_size=1000)
    chunks = [b"x" * 300] * 10
    with caplog.at_level(logging.WARNING, logger="memguard.body"):
        ex = run(app, headers=[TE], chunks=chunks)
    assert ex.status == 413 and ex.complete
    # The fourth chunk crossed; the rest was drained after the answer, unseen by the app.
    assert "received=1200" in caplog.records[0].getMessage()
    assert ex.delivered == 3000
    assert counters.get("body", "body_over_limit") == 1


def test_http2_request_without_length_is_still_counted() -> None:
    app = MemGuardMiddleware(asgi_echo, max_body_size=10)
    ex = run(app, headers=[], chunks=[b"x" * 8, b"x" * 8], http_version="2")
    assert ex.status == 413


def test_a_500_made_of_our_refusal_still_reaches_the_client_as_413() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        try:
            while (await receive()).get("more_body"):
                pass
        except Exception:  # what a framework's error handler does
            await send({"type": "http.response.start", "status": 500, "headers": []})
            await send({"type": "http.response.body", "body": b"Internal Server Error"})
            return

    ex = run(MemGuardMiddleware(app, max_body_size=10), headers=[TE], chunks=[b"x" * 6] * 3)
    assert ex.status == 413 and b"Internal" not in ex.body and ex.complete


def test_any_exception_after_a_refusal_becomes_the_refusal() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        try:
            while (await receive()).get("more_body"):
                pass
        except BodyTooLarge as exc:
            raise RuntimeError("framework wrapped it") from exc

    ex = run(MemGuardMiddleware(app, max_body_size=10), headers=[TE], chunks=[b"x" * 6] * 3)
    assert ex.status == 413


def test_refusal_after_the_response_started_leaves_it_incomplete(
        caplog: pytest.LogCaptureFixture) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        try:
            while True:
                message = await receive()
                await send({"type": "http.response.body", "body": message["body"],
                            "more_body": True})
                if not message.get("more_body"):
                    break
        finally:
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    with caplog.at_level(logging.WARNING, logger="memguard.body"):
        ex = run(MemGuardMiddleware(app, max_body_size=10), headers=[TE],
                 chunks=[b"x" * 6] * 3)
    assert ex.status == 200 and not ex.complete and ex.body == b"x" * 6
    assert any("had started" in r.getMessage() for r in caplog.records)


def test_app_raising_a_refusal_on_a_bodyless_request_gets_its_answer() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        raise MemoryPressure("busy", reason="memory_high", headers={"Retry-After": "3"}, rss=1)

    ex = run(MemGuardMiddleware(app), method="GET")
    assert ex.status == 503 and ex.headers[b"retry-after"] == b"3"
    assert ex.headers[b"connection"] == b"close"
    assert counters.get("memory", "memory_high") == 1


def test_app_raising_a_refusal_while_reading_gets_its_answer() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        raise BodyTooLarge("quota", reason="upload_quota", limit=1)

    ex = run(MemGuardMiddleware(app), headers=[cl(3)], chunks=[b"abc"])
    assert ex.status == 413 and counters.get("body", "upload_quota") == 1


def test_report_only_lets_everything_through_and_counts(
        caplog: pytest.LogCaptureFixture) -> None:
    app = MemGuardMiddleware(asgi_echo, max_body_size=10, report_only=True)
    with caplog.at_level(logging.WARNING, logger="memguard.body"):
        declared = run(app, headers=[cl(20)], chunks=[b"x" * 20])
        chunked = run(app, headers=[TE], chunks=[b"x" * 8] * 3)
        bad = run(app, headers=[cl(5), cl(6)], chunks=[b"x" * 5])
    assert declared.status == 200 and declared.body.startswith(b"20 ")
    assert chunked.status == 200 and chunked.body.startswith(b"24 ")
    assert bad.status == 200
    assert counters.get("body", "report_only:content_length_over_limit") == 1
    assert counters.get("body", "report_only:body_over_limit") == 1
    assert counters.get("body", "report_only:content_length_conflict") == 1
    assert counters.get("body", "body_over_limit") == 0
    assert sum("would refuse" in r.getMessage() for r in caplog.records) == 3


def test_refusals_are_event_log_lines(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    events.configure(str(path))
    try:
        run(MemGuardMiddleware(asgi_echo, max_body_size=10), path="/x",
            headers=[cl(11)], chunks=[b"x" * 11])
    finally:
        events.configure(None)
    (line,) = path.read_text().splitlines()
    event = json.loads(line)
    assert event["kind"] == "refusal" and event["status"] == 413
    assert event["reason"] == "content_length_over_limit" and event["path"] == "/x"
    assert event["limit"] == 10 and event["declared"] == 11


# ---- routes and content types -------------------------------------------------------


def test_route_limits_longest_match_wins_and_can_raise_or_lower() -> None:
    app = MemGuardMiddleware(asgi_echo, max_body_size=100,
                             routes={"/upload/*": 1000, "/upload/small/*": 10, "/api": 5})
    assert run(app, path="/upload/a", headers=[cl(500)], chunks=[b"x" * 500]).status == 200
    assert run(app, path="/upload/small/a", headers=[cl(11)], chunks=[b"x" * 11]).status == 413
    assert run(app, path="/upload", headers=[cl(500)], chunks=[b"x" * 500]).status == 200
    assert run(app, path="/api", headers=[cl(6)], chunks=[b"x" * 6]).status == 413
    assert run(app, path="/api/v1", headers=[cl(50)], chunks=[b"x" * 50]).status == 200
    assert run(app, path="/other", headers=[cl(101)], chunks=[b"x" * 101]).status == 413


def test_content_type_caps_lower_the_route_limit() -> None:
    app = MemGuardMiddleware(asgi_echo, routes={"/upload/*": "5GiB"})
    policy = app.policy
    mib = 1024 * 1024
    assert policy.limit_for("/upload/x", b"application/json; charset=utf-8") == mib
    assert policy.limit_for("/upload/x", b"application/vnd.api+json") == mib
    assert policy.limit_for("/upload/x", b"Application/X-WWW-Form-Urlencoded") == mib
    assert policy.limit_for("/upload/x", b"multipart/form-data; boundary=z") == 5 * 1024**3
    assert policy.limit_for("/upload/x", b"application/octet-stream") == 5 * 1024**3
    assert policy.limit_for("/x", b"application/octet-stream") == 16 * mib
    ex = run(app, path="/upload/x", headers=[cl(mib + 1), (b"content-type", b"application/json")],
             chunks=[b"x" * (mib + 1)])
    assert ex.status == 413


def test_a_route_mapping_lifts_the_content_type_cap_for_itself() -> None:
    app = MemGuardMiddleware(asgi_echo, routes={
        "/import": {"*": "64MiB", "application/json": "32MiB"}},
        content_types={"text/*": "1KiB", "application/json": None, "application/*+json": "2k"})
    policy = app.policy
    assert policy.limit_for("/import", "application/json") == 32 * 1024**2
    assert policy.limit_for("/import", "text/csv") == 1024
    assert policy.limit_for("/import", "image/png") == 64 * 1024**2
    assert policy.limit_for("/elsewhere", "application/json") == 16 * 1024**2
    assert policy.limit_for("/elsewhere", "application/ld+json") == 2048


def test_routes_and_limits_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEMGUARD_MAX_BODY_SIZE", "2KiB")
    monkeypatch.setenv("MEMGUARD_BODY_ROUTES", "/up/*=1MiB, /tiny=10")
    policy = MemGuardMiddleware(asgi_echo).policy
    assert policy.limit_for("/", None) == 2048
    assert policy.limit_for("/up/a", None) == 1024**2
    assert policy.limit_for("/tiny", None) == 10
    monkeypatch.setenv("MEMGUARD_BODY_ROUTES", "/bad")
    with pytest.raises(ValueError, match="PATTERN=SIZE"):
        MemGuardMiddleware(asgi_echo)


def test_unlimited_route() -> None:
    app = MemGuardMiddleware(asgi_echo, max_body_size=10, routes={"/free/*": None})
    ex = run(app, path="/free/a", headers=[TE], chunks=[b"x" * 100] * 3)
    assert ex.status == 200 and ex.body.split()[2] == b"None"


# ---- slow bodies ----------------------------------------------------------------------


def test_idle_body_gets_408() -> None:
    app = MemGuardMiddleware(asgi_echo, body_idle_timeout=0.2)

    async def main() -> Any:
        return await asyncio.wait_for(
            exchange(app, headers=[cl(100)], chunks=[b"x" * 10, b"y" * 90], stall_after=1),
            timeout=10)

    ex = asyncio.run(main())
    assert ex.status == 408 and ex.headers[b"connection"] == b"close"
    assert counters.get("body", "body_idle_timeout") == 1


def test_idle_timeout_is_never_early_and_at_most_two_sweeps_late() -> None:
    """No clock is read per chunk: the sweeper times a wait from the first look that
    finds it. Three chunks arrive (the later ones on the C path, where it is built),
    then the client goes silent."""
    idle = 0.4
    app = MemGuardMiddleware(asgi_echo, body_idle_timeout=idle)
    period = app.policy.sweep_period
    calls: list[float] = []

    async def main() -> tuple[Any, float]:
        async def receive() -> Message:
            calls.append(time.monotonic())
            if len(calls) > 3:
                await asyncio.sleep(3600)  # the client stalls
            return {"type": "http.request", "body": b"x" * 10, "more_body": True}

        ex = await asyncio.wait_for(exchange(app, headers=[TE], receive=receive), 10)
        return ex, time.monotonic()

    ex, ended = asyncio.run(main())
    assert ex.status == 408
    assert counters.get("body", "body_idle_timeout") == 1
    waited = ended - calls[3]
    assert period == idle / 8
    assert idle <= waited < idle + 2 * period + 0.3  # 0.3 s of slack for a loaded machine


def test_drip_below_min_rate_gets_408_after_the_grace() -> None:
    app = MemGuardMiddleware(asgi_echo, body_idle_timeout=5, body_min_rate=10_000,
                             body_rate_grace=0.3)
    ex = run(app, headers=[TE], chunks=[b"x" * 10] * 200, delay=0.02)
    assert ex.status == 408
    assert counters.get("body", "body_too_slow") == 1
    assert ex.delivered < 2000


def test_a_normal_paced_body_is_not_hurt_by_the_defaults() -> None:
    app = MemGuardMiddleware(asgi_echo)
    ex = run(app, headers=[TE], chunks=[b"x" * 1000] * 20, delay=0.01)
    assert ex.status == 200 and ex.body.startswith(b"20000 ")


def test_a_slow_app_is_not_blamed_for_the_wait() -> None:
    async def slow(scope: Scope, receive: Receive, send: Send) -> None:
        more = True
        while more:
            await asyncio.sleep(0.15)  # the app itself takes longer than the idle timeout
            more = (await receive()).get("more_body", False)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    app = MemGuardMiddleware(slow, body_idle_timeout=0.1)
    ex = run(app, headers=[TE], chunks=[b"x"] * 4)
    assert ex.status == 200


def test_timeout_after_the_body_does_not_touch_disconnect_waits() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        assert not (await receive()).get("more_body")
        # Waiting for a disconnect after the body is not a slow body.
        try:
            await asyncio.wait_for(receive(), 0.3)
        except asyncio.TimeoutError:
            pass
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    ex = run(MemGuardMiddleware(app, body_idle_timeout=0.1), headers=[cl(2)], chunks=[b"ok"])
    assert ex.status == 200


# ---- compressed bodies ----------------------------------------------------------------

GZ = (b"content-encoding", b"gzip")


def test_gzip_is_passed_through_encoded_by_default() -> None:
    data = gzip.compress(b"a" * 5000)
    ex = run(MemGuardMiddleware(asgi_echo), headers=[cl(len(data)), GZ], chunks=[data])
    assert ex.status == 200 and ex.body.startswith(f"{len(data)} ".encode())


@pytest.mark.parametrize("encoding, compress", [
    (b"gzip", gzip.compress), (b"x-gzip", gzip.compress), (b"deflate", zlib.compress)])
def test_decompression_delivers_the_decoded_body(encoding: bytes, compress: Any) -> None:
    import hashlib

    raw = bytes(range(256)) * 3000
    data = compress(raw)
    seen: dict[str, Any] = {}

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen["headers"] = dict(scope["headers"])
        await asgi_echo(scope, receive, send)

    ex = run(MemGuardMiddleware(app, decompress=True),
             headers=[cl(len(data)), (b"content-encoding", encoding)],
             chunks=[data[i:i + 1000] for i in range(0, len(data), 1000)])
    assert ex.status == 200
    length, digest, _ = ex.body.split()
    assert int(length) == len(raw) and digest.decode() == hashlib.sha256(raw).hexdigest()
    assert b"content-encoding" not in seen["headers"]
    assert b"content-length" not in seen["headers"]


def test_gzip_bomb_is_413_without_inflating_it() -> None:
    bomb = gzip_bomb(200)  # ~200 KiB
    app = MemGuardMiddleware(asgi_echo, decompress=True, max_body_size="1GiB")
    ex = run(app, headers=[cl(len(bomb)), GZ, OCTETS],
             chunks=[bomb[i:i + 65536] for i in range(0, len(bomb), 65536)])
    assert ex.status == 413
    assert counters.get("body", "decompression_ratio") == 1


def test_decoded_size_limit() -> None:
    data = gzip.compress(bytes(range(256)) * 400)  # 100 KiB of low-ratio data
    app = MemGuardMiddleware(asgi_echo, decompress=True, max_decoded_size="50KiB")
    ex = run(app, headers=[cl(len(data)), GZ], chunks=[data])
    assert ex.status == 413
    assert counters.get("body", "decoded_body_over_limit") == 1


def test_unknown_encoding_is_415_when_decompressing() -> None:
    app = MemGuardMiddleware(asgi_echo, decompress=True)
    ex = run(app, headers=[cl(3), (b"content-encoding", b"br"), EXPECT], chunks=[b"abc"])
    assert ex.status == 415 and ex.receive_calls == 0


def test_corrupt_or_truncated_gzip_is_400() -> None:
    data = gzip.compress(b"hello world" * 100)
    app = MemGuardMiddleware(asgi_echo, decompress=True)
    assert run(app, headers=[cl(20), GZ], chunks=[b"not gzip at all....."]).status == 400
    truncated = data[:-12]
    ex = run(app, headers=[cl(len(truncated)), GZ], chunks=[truncated])
    assert ex.status == 400 and counters.get("body", "body_decode_error") == 2


def test_idle_timeout_finds_a_reader_in_another_task_and_leaves_nothing_behind() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()  # first chunk in the request's task, the rest in another
        await asyncio.get_running_loop().create_task(receive())

    async def main() -> Any:
        ex = await exchange(MemGuardMiddleware(app, body_idle_timeout=0.1),
                            headers=[cl(100)], chunks=[b"x" * 10, b"y" * 90], stall_after=1)
        ok = await exchange(MemGuardMiddleware(asgi_echo, body_idle_timeout=0.1),
                            headers=[cl(3)], chunks=[b"abc"])
        return ex, ok, set(_Sweeper.of(asyncio.get_running_loop()).bodies)

    ex, ok, left = asyncio.run(main())
    assert ex.status == 408 and ok.status == 200
    assert left == set()


def test_a_loop_that_read_timed_bodies_is_freed_when_it_ends() -> None:
    """The slow-body sweeper holds its loop weakly: loops that read bodies (one per test,
    per thread, per ``asyncio.run``) do not accumulate."""
    loops: list[weakref.ref[asyncio.AbstractEventLoop]] = []

    async def main() -> int:
        loops.append(weakref.ref(asyncio.get_running_loop()))
        ex = await exchange(MemGuardMiddleware(asgi_echo, body_idle_timeout=5),
                            headers=[cl(20)], chunks=[b"a" * 10] * 2)
        return ex.status

    assert [asyncio.run(main()) for _ in range(3)] == [200] * 3
    gc.collect()
    assert [ref() for ref in loops] == [None] * 3


def test_a_sweeper_serves_the_next_loop_once_its_own_has_ended() -> None:
    """A sweeper whose loop has closed and that has no body left takes the next loop's
    bodies; one whose loop still runs (another thread's, or one run by turns) keeps it,
    and the other loop gets a sweeper of its own."""
    async def read_one() -> _Sweeper:
        ex = await exchange(MemGuardMiddleware(asgi_echo, body_idle_timeout=5),
                            headers=[cl(20)], chunks=[b"a" * 10] * 2)
        assert ex.status == 200
        return _Sweeper.of(asyncio.get_running_loop())

    first = asyncio.run(read_one())
    second = asyncio.run(read_one())
    assert second is first and not second.bodies
    one, two = asyncio.new_event_loop(), asyncio.new_event_loop()
    try:
        a = one.run_until_complete(read_one())
        b = two.run_until_complete(read_one())
        assert b is not a  # loop one has not ended: its sweeper stays its own
        assert one.run_until_complete(read_one()) is not b
    finally:
        one.close()
        two.close()


def test_the_sweeper_keeps_no_request_context_alive() -> None:
    """The sweeper's callback is scheduled from the first request that reads a body and
    lives on while bodies are read; it must not hold that request's context variables
    (a request-scoped session, a user) once the request is over."""
    request_state: contextvars.ContextVar[Any] = contextvars.ContextVar("request_state")

    class State:
        pass

    kept: list[weakref.ref[State]] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        state = State()
        kept.append(weakref.ref(state))
        request_state.set(state)
        await asgi_echo(scope, receive, send)

    async def main() -> tuple[int, bool, State | None]:
        # A task per request, as servers run them: its context ends with it.
        ex = await asyncio.get_running_loop().create_task(exchange(
            MemGuardMiddleware(app, body_idle_timeout=60), headers=[cl(20)],
            chunks=[b"a" * 10] * 2))
        await asyncio.sleep(0)  # the callback that resumed this task holds the finished one
        gc.collect()
        scheduled = _Sweeper.of(asyncio.get_running_loop()).scheduled()
        return ex.status, scheduled, kept[0]()

    status, scheduled, state = asyncio.run(main())
    assert status == 200 and scheduled  # the sweep is still due, ...
    assert state is None  # ... and the request's state is gone


def test_idle_timeout_when_another_task_reads_the_body_and_nobody_awaits_it() -> None:
    """The request's task waits on something else than the body (an event its reader
    task sets): the timer cancels the task waiting in receive(), which gets the 408 as
    RequestTimeout; the request's own task is never cancelled."""
    outcome: dict[str, Any] = {}

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()  # the first chunk, in the request's task
        done = asyncio.Event()

        async def read_rest() -> None:
            try:
                while (await receive()).get("more_body"):
                    pass
            except asyncio.CancelledError:
                outcome["reader"] = "cancelled"
                raise
            except RequestTimeout:
                outcome["reader"] = "timed out"
            finally:
                done.set()

        reader = asyncio.get_running_loop().create_task(read_rest())
        try:
            await done.wait()
        finally:
            reader.cancel()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def main() -> Any:
        ex = await exchange(MemGuardMiddleware(app, body_idle_timeout=0.1),
                            headers=[cl(100)], chunks=[b"x" * 10, b"y" * 90], stall_after=1)
        # A cancellation of this task left pending would be raised here...
        await asyncio.sleep(0)
        task = asyncio.current_task()
        assert task is not None
        # ...and where tasks count cancellation requests (3.11+), none is left counted.
        return ex, task.cancelling() if sys.version_info >= (3, 11) else 0

    ex, cancelling = asyncio.run(main())
    assert ex.status == 408 and ex.headers[b"connection"] == b"close"
    assert counters.get("body", "body_idle_timeout") == 1
    assert cancelling == 0  # the cancellation was ours, and undone
    assert outcome["reader"] == "timed out"  # the waiting task got the timeout


def test_report_only_still_answers_refusals_the_app_raised() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        raise BodyTooLarge("quota", reason="upload_quota", limit=1)

    ex = run(MemGuardMiddleware(app, report_only=True), headers=[cl(3)], chunks=[b"abc"])
    assert ex.status == 413 and counters.get("body", "upload_quota") == 1


@pytest.mark.parametrize("options, message", [
    ({"routes": {"upload/*": "1MiB"}}, "must start with '/'"),
    ({"routes": {"/a/*/b": "1MiB"}}, "only at the end"),
    ({"routes": {"/a": "10%"}}, "percentage"),
    ({"max_body_size": "50%"}, "percentage"),
    ({"content_types": {"json": "1MiB"}}, "type/subtype"),
    ({"body_idle_timeout": -1}, "negative"),
    ({"decompress": "maybe"}, "boolean"),
])
def test_bad_options_are_refused_with_the_option_named(options: dict[str, Any],
                                                       message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MemGuardMiddleware(asgi_echo, **options)


def test_options_reference_covers_the_body_section() -> None:
    from memguard.config import reference_markdown

    text = reference_markdown(["body"])
    for name in ("max_body_size", "routes", "content_types", "body_idle_timeout",
                 "body_min_rate", "body_rate_grace", "decompress", "max_decoded_size",
                 "max_decompression_ratio", "report_only"):
        assert f"`{name}`" in text


def test_exact_route_beats_prefix_and_catch_all_type() -> None:
    policy = MemGuardMiddleware(asgi_echo, max_body_size=100, routes={
        "/upload": 5, "/upload/*": 1000, "*": 50},
        content_types={"*/*": 70, "image/*": 20, "image/png": None}).policy
    assert policy.limit_for("/upload", None) == 5
    assert policy.limit_for("/upload/x", None) == 1000
    assert policy.limit_for("/other", None) == 50
    assert policy.limit_for("/upload/x", "text/csv") == 70
    assert policy.limit_for("/upload/x", "image/jpeg") == 20
    assert policy.limit_for("/upload/x", "image/png") == 1000
    with pytest.raises(ValueError, match="at most one"):
        MemGuardMiddleware(asgi_echo, content_types={"*/*+json": 1})


def test_figures_named_like_event_fields_do_not_break_a_refusal(tmp_path: Path) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        raise BodyTooLarge("quota", reason="upload_quota", path="/srv/x", kind="odd", status=1)

    events.configure(str(tmp_path / "e.jsonl"))
    try:
        ex = run(MemGuardMiddleware(app), path="/up", headers=[cl(3)], chunks=[b"abc"])
    finally:
        events.configure(None)
    assert ex.status == 413
    event = json.loads((tmp_path / "e.jsonl").read_text())
    assert event["kind"] == "refusal" and event["path"] == "/up" and event["status"] == 413


async def _app_refusing_after_one_chunk(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["method"] == "POST":
        await receive()
    raise BodyTooLarge("the app's own limit")


_CYCLE_CASES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "bodyless": ({}, {"method": "GET"}),
    "within the limit": ({}, {"headers": [cl(30)], "chunks": [b"a" * 10] * 3}),
    "untimed": ({"body_idle_timeout": 0, "body_min_rate": 0},
                {"headers": [cl(30)], "chunks": [b"a" * 10] * 3}),
    "declared over the limit": ({"max_body_size": 10},
                                {"headers": [cl(30)], "chunks": [b"a" * 10] * 3}),
    "counted over the limit": ({"max_body_size": 15},
                               {"headers": [(b"transfer-encoding", b"chunked")],
                                "chunks": [b"a" * 10] * 3}),
    "report only": ({"max_body_size": 15, "report_only": True},
                    {"headers": [(b"transfer-encoding", b"chunked")],
                     "chunks": [b"a" * 10] * 3}),
    "decoded": ({"decompress": True},
                {"headers": [(b"content-encoding", b"gzip"),
                             cl(len(gzip.compress(b"a" * 100)))],
                 "chunks": [gzip.compress(b"a" * 100)]}),
    "slow body": ({"body_idle_timeout": 0.05},
                  {"headers": [cl(30)], "chunks": [b"a" * 10] * 3, "stall_after": 1}),
    "refused by the app": ({}, {"headers": [cl(30)], "chunks": [b"a" * 10] * 3}),
    "refused by a bodyless app": ({}, {"method": "GET"}),
}


@pytest.mark.parametrize("case", list(_CYCLE_CASES))
def test_no_reference_cycle_outlives_a_request(case: str) -> None:
    """A request leaves nothing for the cycle collector: the app's scope holds the
    responder's ``reject``, a refusal's traceback holds the frames that caught it, and a
    body once held its own bound method. Each of those was a cycle per request, which
    kept the request's objects (the scope and all the app put in it) until a collection,
    in an older generation when one ran during the request."""
    options, request = _CYCLE_CASES[case]
    app = _app_refusing_after_one_chunk if case.startswith("refused") else asgi_echo
    guarded = MemGuardMiddleware(app, **options)
    expected = {"declared over the limit": 413, "counted over the limit": 413,
                "slow body": 408}.get(case, 413 if case.startswith("refused") else 200)

    async def main() -> tuple[int | None, list[str]]:
        await exchange(guarded, **request)  # first-time set-up (the sweeper) is not counted
        with cyclic_garbage() as left:
            ex = await exchange(guarded, **request)
        return ex.status, left

    status, left = asyncio.run(main())
    assert status == expected
    assert left == []
