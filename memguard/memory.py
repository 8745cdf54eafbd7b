"""The memory side of the middlewares: one object per middleware, built from the
``memory`` options, that the ASGI and WSGI middlewares call at their phases.

- **admit** (:meth:`MemoryLayer.admit`): the cached pressure level; under critical
  pressure, the 503 to answer instead of calling the app;
- **begin** (:attr:`MemoryLayer.begin`): the request's accounting sample, when one is due;
- **body check**: :meth:`MemoryLayer.body_guard` for requests that have a body (the
  per-chunk "would buffering this push the worker past its hard limit" check);
- **end** (:meth:`MemoryLayer.end`): the request counted under the route template the
  framework recorded; then, when due, the soft-limit check that asks for a recycle and,
  about once a second, the slow work (metrics sync).

Paths the middleware answers itself (readiness, liveness, metrics, leak admin) are
looked up with :meth:`endpoint`, only when one is configured. Everything here is built
to cost a handful of attribute reads per request; see benchmarks/end_to_end.py.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

from memguard.admission import CRITICAL, BodyMemoryGuard, MemoryAdmission
from memguard.config import resolve
from memguard.errors import MemoryPressure
from memguard.leaks import LeakAdmin
from memguard.metrics import HealthEndpoint, MetricsExporter
from memguard.tracking import RequestTracker, Sample

__all__ = ["MemoryLayer"]

log = logging.getLogger("memguard.memory")

_SLOW_TICK_NS = 1_000_000_000


class MemoryLayer:
    """Admission, tracking, metrics, health and the leak admin, for one middleware."""

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
        # begin(now): a request starts; the sample to end with it, or None. Bound once.
        self.begin = self.tracker.begin if self.tracker is not None else self._no_sample
        self.completed = self.tracker.completed if self.tracker is not None else None
        # Whether anything can move the pressure level (a limit, a reading): without,
        # the middlewares skip admit().
        self.judges = self.admission.judges()
        # When after_response() is next due whatever the pressure level (the slow tick).
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

    def admit(self, method: str, path: str, now: int) -> MemoryPressure | None:
        """The refusal (503 + Retry-After) when the worker is shedding this request, else
        ``None``. The pressure level is cached: read again at most every
        ``memory_refresh_interval``."""
        admission = self.admission
        if admission.check(now) < CRITICAL:
            return None
        return admission.admit(method, path, now)

    def body_guard(self, content_length: int | None, now: int) -> BodyMemoryGuard | None:
        """The per-chunk memory check of a request with a body (``None`` without a hard
        limit)."""
        return self.admission.body_guard(content_length, now)

    @staticmethod
    def _no_sample(now: int) -> Sample | None:
        return None

    def end(self, sample: Sample | None, template: str | None, path: str, now: int) -> None:
        """The request is over: count it under its route (``template``, else ``path``),
        then, when due, :meth:`after_response`. Per request this is an append: the
        route table is updated on the clock (:meth:`memguard.tracking.RequestTracker.flush`)."""
        completed = self.completed
        if completed is not None:
            completed.append((template, path))
            if sample is not None:
                self.tracker.end_sample(sample, template, path, now)  # type: ignore[union-attr]
        if self.admission.level or now >= self.next_tick:
            self.after_response(now)

    def after_response(self, now: int) -> None:
        """Due when the pressure level is not OK (the soft-limit check that asks for a
        recycle) or once a second (:attr:`next_tick`: the slow work)."""
        if self.admission.level:
            self.admission.after_response(now)
        if now >= self.next_tick:
            self._slow_tick(now)

    def _slow_tick(self, now: int) -> None:
        self.next_tick = now + _SLOW_TICK_NS
        if self.tracker is not None:
            self.tracker.tick(now)
        if self.metrics is not None:
            try:
                self.metrics.sync()
            except Exception:  # metrics must never break a request
                log.exception("metrics sync failed")
