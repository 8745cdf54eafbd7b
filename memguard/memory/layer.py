"""The memory side of the middlewares: one object per middleware, built from the
``memory`` options, that the ASGI and WSGI middlewares call at their phases.

- **start** (:meth:`MemoryLayer.start`, on the clock): the pressure level refreshed,
  the slow work (metrics sync, counting routes), a request's accounting sample;
- **admit** (:meth:`MemoryLayer.admit`): under critical pressure, the 503 to answer
  instead of calling the app;
- **body check**: :meth:`MemoryLayer.body_guard` for requests that have a body (the
  per-chunk "would buffering this push the worker past its hard limit" check);
- **end**: the request's route key queued for counting; for a sample or under pressure
  (:meth:`MemoryLayer.end`), its growth and the soft-limit check that asks for a
  recycle.

Paths the middleware answers itself (readiness, liveness, metrics, leak admin) are
looked up with :meth:`endpoint`, only when one is configured. Everything here is built
to cost a handful of attribute reads per request; see benchmarks/end_to_end.py.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from collections.abc import Mapping
from typing import Any

from memguard.config import resolve
from memguard.errors import MemoryPressure
from memguard.memory.admission import CRITICAL, OK, BodyMemoryGuard, MemoryAdmission
from memguard.memory.endpoints import HealthEndpoint
from memguard.memory.leaks import LeakAdmin
from memguard.memory.metrics import MetricsExporter
from memguard.memory.routes import RouteKey
from memguard.memory.tracking import RequestTracker, Sample

__all__ = ["MemoryLayer"]

log = logging.getLogger("memguard.memory")

_SLOW_TICK_NS = 1_000_000_000


class MemoryLayer:
    """Admission, tracking, metrics, health and the leak admin, for one middleware.

    The middlewares follow one protocol per request, kept to attribute reads and C
    calls, since on a server every Python call of ours runs with cold caches::

        seq = next(memory.starts)
        sample = memory.start(seq, now) if now >= memory.due else None
        if memory.shedding: refusal = memory.admit(method, path, now)
        ... the app ...
        memory.completed.append(key)        # a memguard.memory.routes.RouteKey
        if sample is not None or memory.pressed: memory.end(sample, key)

    Everything else (the pressure level, samples, counting routes, the slow work) runs
    in :meth:`start` and :meth:`end`, on the clock or when a limit is near.
    """

    def __init__(self, options: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        opts = dict(options) if options is not None else resolve(("memory",), kwargs)
        self.options = opts
        self.admission = MemoryAdmission.from_options(opts)
        self.tracker: RequestTracker | None = None
        if opts["track_memory"]:
            self.tracker = RequestTracker(
                sample_interval=opts["memory_sample_interval"],
                max_routes=opts["max_routes"],
                leak_window=opts["leak_window"],
                leak_windows=opts["leak_windows"],
                leak_min_growth=opts["leak_min_growth"],
                leak_min_objects=opts["leak_min_objects"],
            )
        if self.tracker is not None and self.tracker._rss is self.admission._rss:
            self.tracker.shared = self.admission  # both read the same RSS
        self.metrics: MetricsExporter | None = None
        endpoints: dict[str, Any] = {}
        if opts["readiness_path"] or opts["liveness_path"]:
            health = HealthEndpoint(self.admission, readiness_path=opts["readiness_path"],
                                    liveness_path=opts["liveness_path"],
                                    details=opts["readiness_details"])
            for path in health.paths:
                endpoints[path] = health
        if opts["metrics_path"]:
            self.metrics = MetricsExporter(self.admission, self.tracker,
                                           cache=opts["metrics_cache"])
            endpoints[opts["metrics_path"]] = self.metrics
        self.leak_admin: LeakAdmin | None = None
        if opts["leak_admin_path"]:
            if not opts["leak_admin_token"]:
                raise ValueError(
                    "memguard option 'leak_admin_path' needs 'leak_admin_token' "
                    "(MEMGUARD_LEAK_ADMIN_TOKEN): an admin endpoint without one is refused"
                )
            self.leak_admin = LeakAdmin(opts["leak_admin_path"], opts["leak_admin_token"])
        self.endpoints = endpoints
        # Read per request: a plain attribute, not a property (a Python call each time).
        self.has_endpoints = bool(endpoints) or self.leak_admin is not None
        # The per-request protocol (see the class docstring).
        tracker = self.tracker
        self.starts = tracker.starts if tracker is not None else itertools.count()
        # Without tracking, a deque that keeps nothing: the append stays, and costs
        # nothing to keep.
        self.completed = tracker.completed if tracker is not None else deque(maxlen=0)
        self.due = 0            # monotonic_ns when start() has work to do
        self.shedding = False   # critical pressure: admit() may refuse
        self.pressed = False    # over a limit: end() checks the soft limit
        # When the slow work (metrics sync, the tracker's batches) is next due.
        self.next_tick = time.monotonic_ns() + _SLOW_TICK_NS
        a = self.admission
        log.info("memory: soft limit %s, hard limit %s, container limit %s, tracking %s",
                 a.soft_limit, a.hard_limit, a.container_limit,
                 "on" if self.tracker is not None else "off")

    # ---- paths answered here ----------------------------------------------------------

    def endpoint(self, path: str) -> Any:
        """The handler (``.asgi``/``.wsgi``) answering ``path`` itself, or ``None``."""
        handler = self.endpoints.get(path)
        if handler is None and self.leak_admin is not None and self.leak_admin.matches(path):
            return self.leak_admin
        return handler

    # ---- the phases ---------------------------------------------------------------------

    def start(self, seq: int, now: int) -> Sample | None:
        """Request ``seq`` starts at ``now >= due``: the pressure level refreshed, the
        slow work done, and the request's sample when one is due."""
        admission = self.admission
        level = admission.check(now)
        self.shedding = level >= CRITICAL
        self.pressed = level > OK
        if now >= self.next_tick:
            self._slow_tick(now)
        sample = None
        due = min(self.next_tick, admission.checked_ns + admission.refresh_ns)
        tracker = self.tracker
        if tracker is not None:
            if now >= tracker.due_ns:
                sample = tracker.start(seq, now)
            due = min(due, tracker.due_ns)
        self.due = due
        return sample

    def admit(self, method: str, path: str, now: int) -> MemoryPressure | None:
        """Under critical pressure: the refusal (503 + Retry-After) when the worker sheds
        this request, else ``None``."""
        return self.admission.admit(method, path, now)

    def body_guard(self, content_length: int | None, now: int) -> BodyMemoryGuard | None:
        """The per-chunk memory check of a request with a body (``None`` without a hard
        limit)."""
        return self.admission.body_guard(content_length, now)

    def end(self, sample: Sample | None, key: RouteKey) -> None:
        """A sampled request, or one under pressure, has ended (its ``key`` appended to
        :attr:`completed`): its growth, and the soft-limit check that asks for a
        recycle."""
        now = time.monotonic_ns()
        if sample is not None and self.tracker is not None:
            self.tracker.end_sample(sample, key, now)
        if self.pressed:
            self.admission.after_response(now)


    def _slow_tick(self, now: int) -> None:
        self.next_tick = now + _SLOW_TICK_NS
        if self.tracker is not None:
            self.tracker.tick(now)
        if self.metrics is not None:
            try:
                self.metrics.sync()
            except Exception:  # metrics must never break a request
                log.exception("metrics sync failed")
