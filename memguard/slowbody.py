"""Idle and minimum-rate timeouts for ASGI request bodies.

A timer per request costs a timer handle per request and a clock read per chunk.
Instead, a body being read registers with its event loop's :class:`Sweeper`, one
callback per loop that looks at the bodies in flight a few times a second, only while
there are any. A body's receive() marks when it starts and stops waiting (a counter
step, no clock read); a wait is timed from the first look that finds it, so an idle
timeout fires between ``body_idle_timeout`` and that plus two sweep periods (a quarter
of it at most, and at most one second), never early.

On a timeout the sweeper cancels the task that is waiting in receive() (the app may
read the body from a task of its own, e.g. through ``asyncio.wait_for``); that
receive() turns the cancellation into :class:`~memguard.errors.RequestTimeout`, which
the middleware answers with 408.

Under trio there is no loop to sweep: each wait gets trio's own cancel scope, with the
body's deadline (a clock read and a scope per chunk, on trio only). Under any other
library the timeouts are off, said once in the log; counting and limits still apply.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import math
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

from memguard.errors import RequestRejected, RequestTimeout
from memguard.eventloops import under_trio
from memguard.limits import BodyCounter, BodyPolicy
from memguard.types import Message

__all__ = ["BodyTimer", "Sweeper"]

log = logging.getLogger("memguard.body")

_monotonic = time.monotonic
_IDLE_PERIOD = 0.5
_warned_no_timers = False


class BodyTimer:
    """The slow-body state of one request body."""

    __slots__ = ("idle_timeout", "min_rate", "rate_grace", "period", "counter", "report",
                 "report_only", "sweeper", "start", "calls", "waiting", "seen_calls",
                 "t_enter", "task", "timeout", "trio", "__weakref__")

    def __init__(self, policy: BodyPolicy, counter: BodyCounter,
                 report: Callable[[RequestRejected], None]) -> None:
        self.idle_timeout = policy.idle_timeout
        self.min_rate = policy.min_rate
        self.rate_grace = policy.rate_grace
        self.period = policy.sweep_period
        self.counter = counter        # the body's bytes received so far
        self.report = report          # report-only: the refusal is only reported
        self.report_only = policy.report_only
        self.sweeper: Sweeper | None = None
        self.start = 0.0
        self.calls = 0                # receive() calls so far
        self.waiting = False          # a receive() is waiting for the server
        self.seen_calls = 0           # the call count the sweeper found the wait at
        self.t_enter = 0.0            # when the sweeper first found the current wait
        self.task: asyncio.Task[Any] | None = None  # the task waiting in receive()
        self.timeout: RequestTimeout | None = None  # set when the sweeper cancelled it
        self.trio: Any = None         # the trio module, when trio runs this body

    @property
    def trio_timed(self) -> bool:
        """No sweeper here: each wait goes through :meth:`trio_receive` instead."""
        return self.trio is not None

    def enter(self) -> bool:
        """A receive() is about to wait; False when no sweeper can time it (not asyncio:
        then :attr:`under_trio` says whether :meth:`trio_receive` can)."""
        if self.calls == 0 and not self._register():
            return False
        self.calls += 1
        self.waiting = True
        self.task = asyncio.current_task()
        return True

    def leave(self) -> None:
        self.waiting = False
        self.task = None

    def _register(self) -> bool:
        if self.trio is not None:
            return False
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            if under_trio():
                import trio

                self.trio = trio
                self.start = trio.current_time()
                return False
            global _warned_no_timers
            if not _warned_no_timers:
                _warned_no_timers = True
                log.warning("request body timeouts are off: they need asyncio or trio "
                            "(limits and counting still apply)")
            return False
        self.sweeper = Sweeper.of(loop)
        self.start = _monotonic()
        self.sweeper.add(self, loop, self.period)
        return True

    async def trio_receive(self, receive: Callable[[], Awaitable[Message]]) -> Message:
        """Under trio: the server's next message, awaited within this body's deadline;
        past it, :class:`RequestTimeout` is raised (reported only, in report-only mode)."""
        trio = self.trio
        idle_at = trio.current_time() + self.idle_timeout if self.idle_timeout else math.inf
        # No byte arrives during the wait: the minimum rate's deadline is fixed for it.
        rate_at = (self.start + self.rate_grace + self.counter.received / self.min_rate
                   if self.min_rate else math.inf)
        with trio.CancelScope(deadline=min(idle_at, rate_at)):
            return await receive()
        received = self.counter.received
        if idle_at <= rate_at:
            exc = RequestTimeout("no request body data arrived in time",
                                 reason="body_idle_timeout", idle_timeout=self.idle_timeout,
                                 received=received)
        else:
            exc = RequestTimeout(
                "request body is arriving too slowly", reason="body_too_slow",
                min_rate=self.min_rate, received=received,
                seconds=round(trio.current_time() - self.start, 2))
        if not self.report_only:
            raise exc
        self.report(exc)
        self.idle_timeout = self.min_rate = 0  # reported once; no more deadlines
        return await receive()

    def cancelled(self) -> RequestTimeout | None:
        """A receive() was cancelled: the timeout when it was ours (the cancellation is
        taken back), ``None`` when someone else cancelled it."""
        timeout = self.timeout
        if timeout is None:
            return None
        self.timeout = None
        task = asyncio.current_task()
        uncancel = getattr(task, "uncancel", None)  # 3.11+
        if uncancel is not None:
            uncancel()
        return timeout

    def check(self, now: float) -> bool:
        """The sweeper's look; False once the body needs no more looks."""
        received = self.counter.received
        if not self.waiting:
            return True
        if self.calls != self.seen_calls:
            # A wait no look has found yet: it began since the last one. Timed from now,
            # it can end a period late, never early (no clock read per chunk for it).
            self.seen_calls = self.calls
            self.t_enter = now
        exc: RequestTimeout | None = None
        if self.idle_timeout and now - self.t_enter >= self.idle_timeout:
            exc = RequestTimeout("no request body data arrived in time",
                                 reason="body_idle_timeout", idle_timeout=self.idle_timeout,
                                 received=received)
        elif (self.min_rate and now - self.start > self.rate_grace
              and now >= self.start + self.rate_grace + received / self.min_rate):
            # Judged only while the app waits on the client: a slow app is not the
            # client's fault (when it asks, the data is already there).
            exc = RequestTimeout(
                "request body is arriving too slowly", reason="body_too_slow",
                min_rate=self.min_rate, received=received,
                seconds=round(now - self.start, 2))
        if exc is None:
            return True
        if self.report_only:
            self.report(exc)
            return False  # reported once; stop watching this body
        if self.task is not None:
            self.timeout = exc
            self.task.cancel()
        return False

    def close(self) -> None:
        self.waiting = False
        self.task = None
        if self.sweeper is not None:
            self.sweeper.bodies.discard(self)
            self.sweeper = None


class Sweeper:
    """Looks at the bodies being read on one event loop every ``period`` seconds, only
    while there are any (no callback stays scheduled on an idle loop).

    The latest one is kept at hand, which makes one per loop where it matters (a server
    runs one loop per worker); a body read on another loop gets a new one. It holds its
    loop weakly, so a loop that read a body can still be freed.
    """

    _last: Sweeper | None = None

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        # Both weak: the scheduled callback refers to its loop, and the loop's timer
        # queue keeps the callback alive until it runs or is cancelled.
        self._loop = weakref.ref(loop)
        self._handle: weakref.ref[asyncio.TimerHandle] | None = None
        self.bodies: set[BodyTimer] = set()
        self.period = _IDLE_PERIOD
        # The sweeps run in a context of their own: scheduled from a request's task, the
        # callback would copy that request's context and keep its variables alive.
        self.context = contextvars.Context()

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> Sweeper:
        last = cls._last
        if last is not None and last._loop() is not loop:
            previous = last._loop()
            if (previous is None or previous.is_closed()) and not last.bodies:
                last._loop, last._handle, last.period = weakref.ref(loop), None, _IDLE_PERIOD
            else:
                last = None
        if last is None:
            last = cls._last = cls(loop)
        return last

    def _pending(self) -> asyncio.TimerHandle | None:
        handle = self._handle() if self._handle is not None else None
        return None if handle is None or handle.cancelled() else handle

    def scheduled(self) -> bool:
        """A sweep is due."""
        return self._pending() is not None

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        self._handle = weakref.ref(loop.call_at(loop.time() + self.period, self.sweep,
                                                context=self.context))

    def add(self, timer: BodyTimer, loop: asyncio.AbstractEventLoop, period: float) -> None:
        self.bodies.add(timer)
        if period < self.period:
            self.period = period
            handle = self._pending()
            if handle is not None:
                handle.cancel()
        if self._pending() is None:
            self._schedule(loop)

    def sweep(self) -> None:
        self._handle = None
        loop = self._loop()
        if not self.bodies or loop is None:
            self.period = _IDLE_PERIOD
            return
        now = _monotonic()
        for timer in list(self.bodies):
            if not timer.check(now):
                self.bodies.discard(timer)
        if self.bodies:
            self._schedule(loop)
        else:
            self.period = _IDLE_PERIOD
