"""Property tests on the counting wrappers: any body, any chunking, any limit."""

from __future__ import annotations

import gzip
import io
import itertools
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from memguard import MemGuardMiddleware, MemGuardWSGIMiddleware
from memguard.types import Receive, Scope, Send
from tests.body_helpers import run, wsgi_call

SETTINGS = settings(max_examples=60, deadline=None)


@st.composite
def chunked_bodies(draw: Any, max_size: int = 3000) -> tuple[bytes, list[bytes]]:
    body = draw(st.binary(max_size=max_size))
    cuts = sorted(draw(st.lists(st.integers(0, len(body)), max_size=12)))
    bounds = [0, *cuts, len(body)]
    return body, [body[a:b] for a, b in itertools.pairwise(bounds)]


def collecting_app(seen: list[bytes]) -> Any:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        more = True
        while more:
            message = await receive()
            seen.append(message.get("body", b""))
            more = message.get("more_body", False)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    return app


@SETTINGS
@given(chunked_bodies(), st.integers(0, 3500), st.booleans())
def test_asgi_counting(case: tuple[bytes, list[bytes]], limit: int, declared: bool) -> None:
    body, chunks = case
    seen: list[bytes] = []
    headers = ([(b"content-length", str(len(body)).encode())] if declared
               else [(b"transfer-encoding", b"chunked")])
    ex = run(MemGuardMiddleware(collecting_app(seen), max_body_size=limit),
             headers=headers, chunks=chunks)
    if len(body) <= limit:
        assert ex.status == 200 and b"".join(seen) == body
        return
    assert ex.status == 413 and ex.complete
    # The rest of a refused body is drained after the answer (all of these bodies).
    assert ex.delivered == len(body)
    if declared:
        assert seen == []  # refused on its headers
        return
    # The app saw the chunks before the first one that crossed the limit, never further.
    total, crossing = 0, 0
    for chunk in chunks:
        total += len(chunk)
        if total > limit:
            crossing = total
            break
    assert b"".join(seen) == body[:crossing - len(chunk)]


@SETTINGS
@given(chunked_bodies(), st.integers(0, 3500),
       st.lists(st.integers(-1, 700), min_size=1, max_size=8).filter(lambda s: any(s)))
def test_wsgi_counting(case: tuple[bytes, list[bytes]], limit: int, sizes: list[int]) -> None:
    body, _ = case
    stream = io.BytesIO(body)
    got: list[bytes] = []

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        for size in itertools.cycle(sizes):
            data = environ["wsgi.input"].read(size)
            if not data and size != 0:  # read(0) is b"" without being the end
                break
            got.append(data)
        start_response("200 OK", [])
        return [b"ok"]

    status, _, _ = wsgi_call(MemGuardWSGIMiddleware(app, max_body_size=limit), environ={
        "HTTP_TRANSFER_ENCODING": "chunked", "wsgi.input_terminated": True,
        "wsgi.input": stream})
    if len(body) <= limit:
        assert status == "200 OK" and b"".join(got) == body
    else:
        assert status.startswith("413") and stream.tell() <= limit + 1
        assert len(b"".join(got)) <= limit


@SETTINGS
@given(chunked_bodies(max_size=20000), st.integers(1, 9))
def test_gzip_round_trip_any_chunking(case: tuple[bytes, list[bytes]], level: int) -> None:
    raw, _ = case
    data = gzip.compress(raw, compresslevel=level)
    cuts = list(range(0, len(data), max(1, len(data) // 7))) + [len(data)]
    chunks = [data[a:b] for a, b in itertools.pairwise(cuts)] or [b""]
    seen: list[bytes] = []
    ex = run(MemGuardMiddleware(collecting_app(seen), decompress=True),
             headers=[(b"content-length", str(len(data)).encode()),
                      (b"content-encoding", b"gzip")], chunks=chunks)
    assert ex.status == 200 and b"".join(seen) == raw
