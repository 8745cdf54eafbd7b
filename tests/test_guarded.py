"""memguard._speedups.guard: the middleware's call of the app without a coroutine frame.
Its contract, driven directly: the app is called when first driven, ``after`` runs once
with how the app's part ended, and what ``after`` returns or raises decides the end."""

from __future__ import annotations

import asyncio
import gc
import sys
from typing import Any

import pytest

from memguard import body

pytestmark = pytest.mark.skipif(not body.SPEEDUPS, reason="the C extension is not built "
                                "(or MEMGUARD_PURE_PYTHON is set): no Guarded to test")


def _guard(*args: Any) -> Any:
    from memguard._speedups import guard
    return guard(*args)


class Recorder:
    def __init__(self, answer: Any = None) -> None:
        self.calls: list[tuple[Any, tuple[Any, ...]]] = []
        self.answer = answer

    def __call__(self, exc: BaseException | None, *args: Any) -> Any:
        self.calls.append((exc, args))
        if callable(self.answer):
            return self.answer(exc)
        if exc is not None:
            raise exc
        return self.answer


def _app(result: list[str], fail: BaseException | None = None, sleeps: int = 1) -> Any:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        result.append(f"called {scope}")
        for _ in range(sleeps):
            await asyncio.sleep(0)
        if fail is not None:
            raise fail
        result.append("done")
    return app


def test_the_app_is_called_when_first_driven_and_after_runs_once() -> None:
    seen: list[str] = []
    after = Recorder()
    awaitable = _guard(_app(seen), "s", "r", "w", after, 1, "two", None)
    assert seen == []  # nothing runs before it is awaited, as with a coroutine
    asyncio.run(awaitable)
    assert seen == ["called s", "done"]
    assert after.calls == [(None, (1, "two", None))]


def test_what_the_app_raises_reaches_after_and_its_raise_ends_it() -> None:
    after = Recorder()
    with pytest.raises(KeyError, match="boom"):
        asyncio.run(_guard(_app([], KeyError("boom")), 0, 0, 0, after))
    exc, _ = after.calls[0]
    assert isinstance(exc, KeyError) and exc.__traceback__ is not None


def test_an_awaitable_after_returns_is_awaited_before_the_end() -> None:
    steps: list[str] = []

    async def tail() -> None:
        await asyncio.sleep(0)
        steps.append("tail")

    after = Recorder(answer=lambda exc: tail())
    asyncio.run(_guard(_app([], ValueError("x")), 0, 0, 0, after))
    assert steps == ["tail"] and isinstance(after.calls[0][0], ValueError)


def test_an_app_raising_at_the_call_and_a_non_awaitable_reach_after() -> None:
    def sync_raises(scope: Any, receive: Any, send: Any) -> Any:
        raise OSError("at the call")

    def not_awaitable(scope: Any, receive: Any, send: Any) -> Any:
        return 42

    for app, kind in ((sync_raises, OSError), (not_awaitable, TypeError)):
        after = Recorder(answer=lambda exc: None)  # swallowed: the end is normal
        asyncio.run(_guard(app, 0, 0, 0, after))
        assert isinstance(after.calls[0][0], kind)


def test_cancellation_goes_through_and_reaches_after() -> None:
    after = Recorder()

    async def main() -> None:
        task = asyncio.get_running_loop().create_task(
            _guard(_app([], sleeps=10**6), 0, 0, 0, after))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert isinstance(after.calls[0][0], asyncio.CancelledError)


def test_throw_before_the_start_close_and_reuse() -> None:
    after = Recorder()
    awaitable = _guard(_app([]), 0, 0, 0, after)
    with pytest.raises(ValueError, match="early"):
        awaitable.throw(ValueError("early"))
    assert isinstance(after.calls[0][0], ValueError)
    with pytest.raises(RuntimeError, match="cannot reuse"):
        awaitable.send(None)

    after = Recorder()
    awaitable = _guard(_app([], sleeps=5), 0, 0, 0, after)
    awaitable.send(None)  # the app waits at its first sleep
    assert awaitable.close() is None
    assert isinstance(after.calls[0][0], GeneratorExit)
    assert awaitable.close() is None  # closing twice is harmless
    assert len(after.calls) == 1


def test_no_reference_is_leaked() -> None:
    marker = object()
    after = Recorder(answer=lambda exc: None)
    before = sys.getrefcount(marker)
    for _ in range(200):
        asyncio.run(_guard(_app([]), marker, marker, marker, after, marker, marker))
        asyncio.run(_guard(_app([], RuntimeError("x")), marker, 0, 0, after, marker))
    after.calls.clear()
    gc.collect()
    assert sys.getrefcount(marker) == before
