"""The ASGI middleware under trio, driven directly: slow-body timeouts through trio's own
cancel scopes, and the upload writer's waits. Through a real server (Hypercorn's trio
worker) in test_body_hostile.py and test_servers.py."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from typing import Any

import pytest

trio = pytest.importorskip("trio")

from memguard import MemGuardMiddleware, counters  # noqa: E402
from memguard.eventloops import trio_wait_done, under_asyncio, under_trio  # noqa: E402
from memguard.types import Message  # noqa: E402
from tests.apps.body_apps import asgi_echo  # noqa: E402
from tests.body_helpers import Exchange, exchange  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_counts() -> None:
    counters.reset()


def cl(n: int) -> tuple[bytes, bytes]:
    return (b"content-length", str(n).encode())


def dripping(chunks: list[bytes], delay: float = 0.0, stall_after: int | None = None) -> Any:
    """A trio server's receive: ``chunks`` ``delay`` apart, silence after ``stall_after``."""
    pending = list(chunks)
    sent = 0

    async def receive() -> Message:
        nonlocal sent
        if not pending or (stall_after is not None and sent >= stall_after):
            await trio.sleep_forever()
        if delay and sent:
            await trio.sleep(delay)
        sent += 1
        chunk = pending.pop(0)
        return {"type": "http.request", "body": chunk, "more_body": bool(pending)}

    return receive


def run_trio(app: Any, length: int, receive: Any) -> Exchange:
    async def main() -> Exchange:
        with trio.fail_after(10):  # a body nobody times out would hang here
            return await exchange(app, headers=[cl(length)], receive=receive)

    result: Exchange = trio.run(main)
    return result


def test_detection() -> None:
    assert not under_trio() and not under_asyncio()

    async def main() -> tuple[bool, bool]:
        return under_trio(), under_asyncio()

    assert trio.run(main) == (True, False)


def test_idle_timeout_under_trio() -> None:
    app = MemGuardMiddleware(asgi_echo, body_idle_timeout=0.2)
    started = time.monotonic()
    ex = run_trio(app, 100, dripping([b"x" * 10, b"y" * 90], stall_after=1))
    assert ex.status == 408 and b"no request body data arrived" in ex.body
    assert 0.2 <= time.monotonic() - started < 5
    assert counters.get("body", "body_idle_timeout") == 1


def test_min_rate_under_trio() -> None:
    app = MemGuardMiddleware(asgi_echo, body_min_rate=1000, body_rate_grace=0.2,
                             body_idle_timeout=5)
    ex = run_trio(app, 100, dripping([b"x"] * 100, delay=0.05))
    assert ex.status == 408 and b"too slowly" in ex.body
    assert counters.get("body", "body_too_slow") == 1


def test_a_body_in_time_is_untouched_under_trio() -> None:
    app = MemGuardMiddleware(asgi_echo, body_idle_timeout=0.5, body_min_rate=10,
                             body_rate_grace=1)
    ex = run_trio(app, 100, dripping([b"x" * 50, b"y" * 50], delay=0.05))
    assert ex.status == 200 and ex.body.startswith(b"100 ")
    assert counters.get("body", "body_idle_timeout") == 0


def test_report_only_under_trio_reports_once_and_reads_on() -> None:
    app = MemGuardMiddleware(asgi_echo, body_idle_timeout=0.1, report_only=True)
    ex = run_trio(app, 20, dripping([b"x" * 10, b"y" * 10], delay=0.3))
    assert ex.status == 200 and ex.body.startswith(b"20 ")
    assert counters.get("body", "report_only:body_idle_timeout") == 1
    assert counters.get("body", "body_idle_timeout") == 0


def test_a_writer_job_outlives_a_cancelled_wait_under_trio() -> None:
    job: Future[str] = Future()
    release = threading.Event()

    def finish_later() -> None:
        release.wait(5)
        job.set_result("written")

    thread = threading.Thread(target=finish_later)
    thread.start()

    async def main() -> str:
        with trio.move_on_after(0.1):
            await trio_wait_done(job)
        assert not job.done() and not job.cancelled()  # the wait ended, not the job
        release.set()
        await trio_wait_done(job)
        return job.result()

    try:
        assert trio.run(main) == "written"
    finally:
        release.set()
        thread.join()
