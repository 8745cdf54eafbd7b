"""Per-request memory accounting: which route grows the worker, and which one leaks.

The budget is a few microseconds per request (DESIGN.md, "Measuring memory"), so the
tracker never reads the process's memory twice per request. It *samples*: a request that
begins once ``sample_interval`` has passed since the last sample reads RSS (one
``pread`` of ``/proc/self/statm``) at its start and at its end; every other request only
bumps two counters and its route's count.

A sampled request that ran alone (no other request was in flight at any moment of it)
measures its own growth exactly. One that overlapped others measures its own growth plus
theirs; those samples are kept apart (``overlapped``) and only enter a per-window least
squares estimate, in which each sample's growth is explained by its own route plus the
routes of the requests that completed while it ran (a small ring of recent completions
tells which). A route that leaks ``x`` bytes per request then gets ``x``, and a clean
route that merely ran beside it gets about zero, which a plain "growth per route" figure
cannot give under concurrency.

Every ``leak_window`` seconds the window's estimate becomes each route's *retained
growth* for that window (bytes per request times requests). A route whose retained
growth stays above ``leak_min_growth`` for ``leak_windows`` windows in a row, while the
worker itself grew, is a suspected leak: logged once on ``memguard.tracking`` with the
figures, counted, and kept in its :class:`RouteStats`.

Route templates (``/items/{id}``, never ``/items/42``) come from the framework after the
app ran: Starlette/FastAPI set ``scope["route"]``; Flask's rule and Django's resolver
match are recorded by small hooks (:func:`install_flask_route_hook`,
:class:`DjangoRouteMiddleware`) under the ``memguard.route`` key of the scope or WSGI
environ, which any app may also set itself. Otherwise the raw path is used, up to
``max_raw_paths`` distinct ones, then ``"other"``: the table stays bounded whatever the
clients send.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping, MutableMapping
from typing import Any

from memguard import counters, events, probes

__all__ = [
    "ROUTE_KEY",
    "DjangoRouteMiddleware",
    "RequestTracker",
    "RouteStats",
    "Sample",
    "asgi_route",
    "install_flask_route_hook",
    "wsgi_route",
]

log = logging.getLogger("memguard.tracking")

#: Scope / environ key under which an app or a framework hook names the route template.
ROUTE_KEY = "memguard.route"

OTHER = "other"

_RING_SIZE = 4096  # completions remembered for overlapped samples; a power of two
_RING_MASK = _RING_SIZE - 1
_MAX_ROW = 64  # routes credited in one overlapped sample; more means a busier window
_PENDING_SAMPLES = 512  # samples kept for the metrics export between two syncs


class RouteStats:
    """What the tracker knows about one route template. Preallocated, updated in place."""

    __slots__ = (
        "index", "route", "count", "samples", "exclusive", "growth_sum", "growth_max",
        "exclusive_sum", "window_start_count", "retained", "estimate", "history", "suspected",
        "streak",
    )

    def __init__(self, index: int, route: str, history: int) -> None:
        self.index = index
        self.route = route
        self.count = 0  # requests completed
        self.samples = 0  # sampled requests (RSS read before and after)
        self.exclusive = 0  # of which ran alone: their growth is exact
        self.growth_sum = 0  # growth of every sample, bytes (overlapped ones include others')
        self.growth_max = 0
        self.exclusive_sum = 0
        self.window_start_count = 0  # self.count when the current window began
        self.retained = 0.0  # estimated bytes this route kept, summed over closed windows
        self.estimate = 0.0  # bytes per request retained, last closed window
        self.history: deque[float] = deque(maxlen=history)  # retained bytes per window
        self.suspected = False
        self.streak = 0  # closed windows in a row above the leak threshold

    @property
    def mean_growth(self) -> float:
        """Mean growth of this route's sampled requests, bytes (0 without samples)."""
        return self.growth_sum / self.samples if self.samples else 0.0

    @property
    def exclusive_mean(self) -> float | None:
        """Mean growth of the samples that ran alone (exact), or ``None``."""
        return self.exclusive_sum / self.exclusive if self.exclusive else None

    def as_dict(self) -> dict[str, Any]:
        return {
            "route": self.route,
            "count": self.count,
            "samples": self.samples,
            "exclusive_samples": self.exclusive,
            "mean_growth": round(self.mean_growth, 1),
            "exclusive_mean_growth": (None if self.exclusive_mean is None
                                      else round(self.exclusive_mean, 1)),
            "max_growth": self.growth_max,
            "retained": round(self.retained),
            "retained_per_request": round(self.estimate, 1),
            "retained_history": [round(x) for x in self.history],
            "suspected_leak": self.suspected,
        }


class Sample:
    """The state of one sampled request between :meth:`RequestTracker.begin` and ``end``."""

    __slots__ = ("seq", "alone", "rss", "ring_start")

    def __init__(self, seq: int, alone: bool, rss: int, ring_start: int) -> None:
        self.seq = seq
        self.alone = alone
        self.rss = rss
        self.ring_start = ring_start


class RequestTracker:
    """Sampled per-request memory accounting, per route template, with leak suspicion.

    The middleware calls ``token = tracker.begin(now)`` when a request starts and
    ``tracker.end(token, route, now)`` when it ends (``now`` from
    ``time.monotonic_ns()``, shared with the admission check so the clock is read once).
    ``begin`` returns ``None`` for requests that are not sampled, which is nearly all of
    them under load: they cost two counter steps and a dictionary lookup.

    Under threads (gthread, WSGI) the counters are ``itertools.count`` objects, whose
    ``next()`` is atomic under the GIL, so no lock is taken; the "last seen" figures may
    lag by a request, which can only mark a request as overlapped that ran alone, never
    the reverse in a way that matters.
    """

    def __init__(
        self,
        *,
        sample_interval: float = 0.001,
        max_routes: int = 256,
        max_raw_paths: int = 64,
        leak_window: float = 30.0,
        leak_windows: int = 3,
        leak_min_growth: int = 1 << 20,
        min_window_samples: int = 5,
        rss: Callable[[], int] = probes.current_rss,
        on_leak: Callable[[RouteStats], None] | None = None,
    ) -> None:
        if max_routes < 2:
            raise ValueError("max_routes must be at least 2")
        self.sample_interval_ns = int(sample_interval * 1e9)
        self.max_routes = max_routes
        self.max_raw_paths = max_raw_paths
        self.leak_window_ns = int(leak_window * 1e9)
        self.leak_windows = max(1, leak_windows)
        self.leak_min_growth = leak_min_growth
        self.min_window_samples = min_window_samples
        self._rss = rss
        self._on_leak = on_leak
        self._starts = itertools.count()
        self._finishes = itertools.count()
        self._started_n = 0
        self._finished_n = 0
        self._next_sample_ns = 0
        self._ring = [0] * _RING_SIZE
        self._routes: dict[str, RouteStats] = {}
        self._by_index: list[RouteStats] = []
        self._raw_paths = 0
        self._other = self._route_stats(OTHER)
        # The window's least squares: A = X'X (sparse, by route index), b = X'y.
        self._xtx: dict[int, dict[int, float]] = {}
        self._xty: dict[int, float] = {}
        self._rows: dict[int, int] = {}  # samples per route in the window
        self._window_start_ns = time.monotonic_ns()
        self._window_rss = -1
        self.pending: deque[tuple[str, int]] = deque(maxlen=_PENDING_SAMPLES)
        self.windows_closed = 0

    # ---- the hot path ----------------------------------------------------------------

    def begin(self, now: int) -> Sample | None:
        seq = next(self._starts)
        self._started_n = seq + 1
        if now < self._next_sample_ns:
            return None
        self._next_sample_ns = now + self.sample_interval_ns
        return Sample(seq, self._finished_n == seq, self._rss(), self._finished_n)

    def end(self, sample: Sample | None, template: str | None, path: str, now: int) -> None:
        """Count a finished request under ``template`` (else its raw ``path``)."""
        fin = next(self._finishes)
        self._finished_n = fin + 1
        stats = self._routes.get(path if template is None else template)
        if stats is None:
            stats = self._new_route(template, path)
        stats.count += 1
        self._ring[fin & _RING_MASK] = stats.index
        if sample is not None:
            self._measured(sample, stats, fin)
        if now - self._window_start_ns >= self.leak_window_ns:
            self.close_window(now)

    # ---- sampled requests (at most one per sample_interval) -----------------------------

    def _measured(self, sample: Sample, stats: RouteStats, fin: int) -> None:
        growth = self._rss() - sample.rss
        alone = sample.alone and self._started_n == sample.seq + 1
        stats.samples += 1
        stats.growth_sum += growth
        if growth > stats.growth_max:
            stats.growth_max = growth
        self.pending.append((stats.route, growth))
        row: dict[int, int] = {stats.index: 1}
        if alone:
            stats.exclusive += 1
            stats.exclusive_sum += growth
        else:
            # Credit the requests that completed while this one ran (each may have kept
            # memory inside this sample's window). Older than the ring: not credited.
            first = max(sample.ring_start, fin - _RING_SIZE + 1)
            ring = self._ring
            for i in range(first, min(fin, first + _MAX_ROW)):
                index = ring[i & _RING_MASK]
                row[index] = row.get(index, 0) + 1
        xtx, xty, rows = self._xtx, self._xty, self._rows
        for i, xi in row.items():
            rows[i] = rows.get(i, 0) + 1
            xty[i] = xty.get(i, 0.0) + xi * growth
            line = xtx.get(i)
            if line is None:
                line = xtx[i] = {}
            for j, xj in row.items():
                line[j] = line.get(j, 0.0) + xi * xj

    # ---- windows and leak suspicion -----------------------------------------------------

    def close_window(self, now: int | None = None) -> None:
        """End the current window: estimate each route's retained growth, judge leaks."""
        now = time.monotonic_ns() if now is None else now
        rss = self._rss()
        worker_growth = rss - self._window_rss if self._window_rss >= 0 else 0
        self._window_rss = rss
        self._window_start_ns = now
        beta = _solve(self._xtx, self._xty)
        self.windows_closed += 1
        for stats in self._by_index:
            per_request = beta.get(stats.index, 0.0)
            enough = self._rows.get(stats.index, 0) >= self.min_window_samples
            retained = per_request * (stats.count - stats.window_start_count) if enough else 0.0
            stats.window_start_count = stats.count
            if not enough:
                continue
            stats.estimate = per_request
            stats.retained += retained
            stats.history.append(retained)
            if retained >= self.leak_min_growth and worker_growth > 0:
                stats.streak += 1
            else:
                stats.streak = 0
            if stats.streak >= self.leak_windows and not stats.suspected:
                stats.suspected = True
                self._report_leak(stats)
        self._xtx, self._xty, self._rows = {}, {}, {}

    def _report_leak(self, stats: RouteStats) -> None:
        figures = {
            "route": stats.route,
            "retained_per_window": [round(x) for x in stats.history],
            "retained_per_request": round(stats.estimate),
            "requests": stats.count,
            "samples": stats.samples,
            "exclusive_samples": stats.exclusive,
            "window_seconds": self.leak_window_ns / 1e9,
        }
        log.warning(
            "suspected memory leak in route %s: kept about %s bytes per request for %s "
            "windows of %ss in a row (%s)",
            stats.route, round(stats.estimate), stats.streak, self.leak_window_ns / 1e9,
            figures,
        )
        counters.increment("tracking", "suspected_leak")
        events.emit("leak_suspected", **figures)
        if self._on_leak is not None:
            try:
                self._on_leak(stats)
            except Exception:  # a callback must never break a request
                log.exception("on_leak callback failed for route %s", stats.route)

    # ---- the route table ----------------------------------------------------------------

    def _new_route(self, template: str | None, path: str) -> RouteStats:
        # Reached once per new name; later requests find it in self._routes. Raw paths
        # (no template known) have their own, smaller bound: any client can invent them.
        if template is None:
            if self._raw_paths >= self.max_raw_paths:
                return self._other
            self._raw_paths += 1
            return self._route_stats(path)
        return self._route_stats(template)

    def _route_stats(self, route: str) -> RouteStats:
        existing = self._routes.get(route)
        if existing is not None:
            return existing
        if len(self._by_index) >= self.max_routes:
            return self._other
        stats = RouteStats(len(self._by_index), route, history=max(8, self.leak_windows))
        self._by_index.append(stats)
        self._routes[route] = stats
        return stats

    # ---- reading --------------------------------------------------------------------------

    def routes(self) -> list[RouteStats]:
        return list(self._by_index)

    def get(self, route: str) -> RouteStats | None:
        return self._routes.get(route)

    def suspected(self) -> list[RouteStats]:
        return [s for s in self._by_index if s.suspected]

    def snapshot(self) -> dict[str, Any]:
        return {
            "requests": self._finished_n,
            "windows": self.windows_closed,
            "routes": [s.as_dict() for s in self._by_index if s.count],
        }


def _solve(
    xtx: Mapping[int, Mapping[int, float]], xty: Mapping[int, float], sweeps: int = 50,
) -> dict[int, float]:
    """Least squares ``(X'X) beta = X'y`` by Gauss-Seidel sweeps (X'X is diagonally
    dominant enough here: each row's own route has weight 1 in every row it appears).

    A small ridge term keeps routes that always ran together from trading huge opposite
    values; growth below zero (memory returned) is clipped to zero, since "retained"
    cannot be negative.
    """
    beta = {i: 0.0 for i in xty}
    if not beta:
        return beta
    for _ in range(sweeps):
        delta = 0.0
        for i, line in xtx.items():
            diag = line.get(i, 0.0)
            if diag <= 0:
                continue
            acc = xty.get(i, 0.0)
            for j, a in line.items():
                if j != i:
                    acc -= a * beta.get(j, 0.0)
            new = max(0.0, acc / (diag * 1.01))
            delta = max(delta, abs(new - beta[i]))
            beta[i] = new
        if delta < 1.0:  # bytes: finer than any page
            break
    return beta


# --------------------------------------------------------------------------------------
# Route templates


def asgi_route(scope: Mapping[str, Any], root_path: str = "") -> str | None:
    """The route template of an ASGI request, once the app has routed it.

    Starlette (and FastAPI) set ``scope["route"]`` to the matched route, whose
    ``path_format`` is the template without converters (``/items/{id}``). ``root_path``
    is the scope's ``root_path`` as the middleware saw it: a ``Mount`` extends it with
    the mount's matched prefix, which is put back in front of the inner template.
    Otherwise the ``memguard.route`` key a hook or the app set is used.
    """
    route = scope.get("route")
    if route is None:
        named = scope.get(ROUTE_KEY)
        return None if named is None else str(named)
    template = getattr(route, "path_format", None)
    if template is None:
        return None
    inner_root = scope.get("root_path", "")
    if inner_root != root_path and isinstance(inner_root, str):
        if inner_root.startswith(root_path):
            return inner_root[len(root_path):] + str(template)
    return str(template)


def wsgi_route(environ: Mapping[str, Any]) -> str | None:
    """The route template a framework hook recorded in the WSGI environ, if any."""
    named = environ.get(ROUTE_KEY)
    return None if named is None else str(named)


def install_flask_route_hook(app: Any) -> bool:
    """Record Flask's URL rule (``/items/<int:id>``) in the environ of each request.

    Flask clears ``environ["werkzeug.request"]`` before its WSGI call returns, so the
    rule is copied while the request is being handled, by a ``before_request`` hook.
    Returns False when ``app`` is not a Flask application.
    """
    flask_app = getattr(app, "__self__", app)  # app.wsgi_app (a bound method) works too
    if not (hasattr(flask_app, "before_request") and hasattr(flask_app, "url_map")):
        return False
    if getattr(flask_app, "_memguard_route_hook", False):
        return True
    from flask import request

    def _memguard_record_route() -> None:
        rule = request.url_rule
        if rule is not None:
            request.environ[ROUTE_KEY] = rule.rule

    flask_app.before_request(_memguard_record_route)
    flask_app._memguard_route_hook = True
    return True


class DjangoRouteMiddleware:
    """Django middleware recording ``request.resolver_match.route`` for memguard.

    Add ``"memguard.tracking.DjangoRouteMiddleware"`` to ``MIDDLEWARE``. Under WSGI,
    ``request.META`` is the environ the memguard middleware holds; under ASGI the
    request's ``scope`` is.
    """

    def __init__(self, get_response: Callable[[Any], Any]) -> None:
        self.get_response = get_response

    def __call__(self, request: Any) -> Any:
        return self.get_response(request)

    def process_view(self, request: Any, view_func: Any, view_args: Any,
                     view_kwargs: Any) -> None:
        match = getattr(request, "resolver_match", None)
        route = getattr(match, "route", None)
        if route:
            template = "/" + route.lstrip("^").rstrip("$").lstrip("/")
            scope: MutableMapping[str, Any] | None = getattr(request, "scope", None)
            target = scope if scope is not None else request.META
            target[ROUTE_KEY] = template
        return None
