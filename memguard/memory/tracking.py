"""Per-request memory accounting: which route grows the worker, and which one leaks.

Per request the tracker costs a number taken and an append to a queue; it never reads
the process's memory per request. It *samples*, on a clock:

- **Per-request samples.** A request that begins once ``sample_interval`` has passed
  reads RSS (one ``pread`` of ``/proc/self/statm``) at its start and at its end: the
  route's mean and max growth. A sample that ran alone (no other request in flight at
  any moment of it) is exact and counted apart (``exclusive``); one that overlapped
  others includes their growth and is marked so.
- **Quiet points, for what a route keeps.** A request that *begins* with no other
  request in flight is a quiet point: everything that ran since the previous one has
  finished. Every ``leak_window / 30`` a quiet point closes an interval, after a
  young-generation collection (with nothing in flight it frees the cyclic
  garbage the finished requests left and promotes nothing a request still uses). The
  change of the worker's Python blocks (``sys.getallocatedblocks()``) and RSS over the
  interval is what the requests completed in it kept. The routes of the requests
  completed in it (counted in batches, from the queue each request's end appends to)
  say which routes those were, and a per-window non-negative least squares fit (older
  windows at half weight each) turns the intervals into "blocks and bytes kept per
  request" for each route, taken relative to the route that keeps least (what every
  route seems to keep is the server's: per-connection objects waiting for an older
  generation's collection). Under concurrency the figure is statistical; it still
  separates a leaking route from a clean one that merely ran beside it.

Why blocks for the leak decision and not RSS: the heap's fragmentation decides which
request pays for RSS growth (a clean request often extends the heap a leaking one just
filled), while a kept Python object is a kept block wherever it lands. RSS is the gate:
a route is a suspected leak when it kept at least ``leak_min_objects`` blocks per
request in ``leak_windows`` windows of ``leak_window`` seconds in a row (after its first
two, the warm-up) while the worker's RSS grew by at least ``leak_min_growth`` in each.
It is then logged once on ``memguard.tracking`` with the figures, counted, and kept in
its :class:`RouteStats`.
A leak that grows one existing object (a ``bytearray`` extended in place) keeps no new
blocks and is not attributed; the worker's growth still shows in the metrics.

Which route a request was is read from its key (:mod:`memguard.memory.routes`); without
a template, the raw path is counted, up to ``max_raw_paths`` distinct ones, then
``"other"``: the table stays bounded whatever the clients send. The per-window fit is
:mod:`memguard.memory.fit`.
"""

from __future__ import annotations

import gc
import itertools
import logging
import sys
import time
from collections import Counter, deque
from collections.abc import Callable
from typing import Any, NamedTuple

from memguard import counters, events, system
from memguard.config import default
from memguard.memory.fit import nonnegative_least_squares, standard_errors
from memguard.memory.routes import RouteKey, hashable_key, route_key, route_template

__all__ = [
    "OTHER",
    "RequestTracker",
    "RouteStats",
    "Sample",
]

log = logging.getLogger("memguard.tracking")

OTHER = "other"

_WARMUP_WINDOWS = 2  # a route's first windows with evidence never count toward a leak
_MS = 1_000_000
# How soon a due sample or quiet point looks again for a request that starts alone: on
# a worker that is never idle, each look is a call of start() that finds none.
_RETRY_NS = 10 * _MS
_PENDING_SAMPLES = 512  # samples kept for the metrics export between two syncs

_blocks = sys.getallocatedblocks

class RouteStats:
    """What the tracker knows about one route template. Preallocated, updated in place."""

    __slots__ = (
        "index", "route", "count", "samples", "exclusive", "growth_sum", "growth_max",
        "exclusive_sum", "window_start_count", "retained",
        "estimate", "objects", "history", "objects_history", "suspected", "streak",
        "windows",
    )

    def __init__(self, index: int, route: str, history: int) -> None:
        self.index = index
        self.route = route
        self.count = 0  # requests completed
        self.samples = 0  # sampled requests (RSS read before and after)
        self.exclusive = 0  # of which ran alone: their growth is exact
        self.growth_sum = 0  # RSS growth of every sample (overlapped ones include others')
        self.growth_max = 0
        self.exclusive_sum = 0  # RSS growth of the samples that ran alone
        self.window_start_count = 0  # self.count when the current window began
        self.retained = 0.0  # estimated bytes kept, summed over closed windows
        self.estimate = 0.0  # estimated bytes kept per request, last closed window
        self.objects = 0.0  # estimated Python blocks kept per request, last closed window
        self.history: deque[float] = deque(maxlen=history)  # bytes kept per window
        self.objects_history: deque[float] = deque(maxlen=history)  # blocks per request
        self.suspected = False
        self.streak = 0  # closed windows in a row that looked like a leak
        self.windows = 0  # closed windows with enough evidence about this route

    @property
    def mean_growth(self) -> float:
        """Mean RSS growth of this route's sampled requests, bytes (0 without samples)."""
        return self.growth_sum / self.samples if self.samples else 0.0

    @property
    def exclusive_mean(self) -> float | None:
        """Mean RSS growth of the samples that ran alone (exact), or ``None``."""
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
            "objects_per_request": round(self.objects, 2),
            "retained_history": [round(x) for x in self.history],
            "objects_history": [round(x, 2) for x in self.objects_history],
            "suspected_leak": self.suspected,
        }


class Sample(NamedTuple):
    """The state of one sampled request between :meth:`RequestTracker.begin` and ``end``.

    A tuple, built with ``tuple.__new__`` (a C call): a class with an ``__init__`` is
    a Python call more (see :meth:`RequestTracker.begin`)."""

    seq: int
    alone: bool
    rss: int


_new_tuple = tuple.__new__


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
        sample_interval: float = default("memory_sample_interval"),
        max_routes: int = default("max_routes"),
        max_raw_paths: int = 64,
        leak_window: float = default("leak_window"),
        leak_windows: int = default("leak_windows"),
        leak_min_growth: int = default("leak_min_growth"),
        leak_min_objects: float = default("leak_min_objects"),
        min_window_samples: int = 5,
        rss: Callable[[], int] = system.current_rss,
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
        self.leak_min_objects = leak_min_objects
        self.min_window_samples = min_window_samples
        self._rss = rss
        # An RSS reading taken at a request's start by someone else (the middleware's
        # admission layer: ``checked_ns`` and ``rss``), reused by a sample starting at
        # that same instant instead of a second read (see :meth:`begin`).
        self.shared: Any = None
        self._on_leak = on_leak
        # Per request: next(starts) at its start, its route key appended to completed at
        # its end (both atomic under the GIL: no lock under gthread).
        self.starts = itertools.count()
        self._finished_n = 0
        self.next_sample_ns = 0
        self._next_anchor_ns = 0
        # When start() next has work: a sample or a quiet point due.
        self.due_ns = 0
        # A due sample waits this long for a request that starts alone (a quiet point).
        self._patience_ns = 10 * self.sample_interval_ns
        self._anchored = False  # a quiet point has been seen: intervals can be closed
        # Requests per route index finished since the last quiet point (flush()).
        self._interval: dict[int, int] = {}
        self._anchor_rss = 0
        self._anchor_blocks = 0
        # Intervals per window: about thirty, each closed by a young-generation
        # collection, which on a busy server takes a fraction of a millisecond.
        self.anchor_interval_ns = min(max(self.leak_window_ns // 30, 5 * _MS), 2000 * _MS)
        # Finished requests' route keys, counted on the clock (flush()).
        self.completed: deque[RouteKey] = deque()
        self._routes: dict[str, RouteStats] = {}
        self._by_index: list[RouteStats] = []
        self._raw_paths = 0
        self._other = self._route_stats(OTHER)
        # The window's least squares: A = X'X (sparse, by route index), b = X'y.
        self._xtx: dict[int, dict[int, float]] = {}
        self._y_bytes: dict[int, float] = {}
        self._y_blocks: dict[int, float] = {}
        self._rows: dict[int, int] = {}  # intervals per route in the window
        self._yy_blocks = 0.0  # sum of squared block growths (residual variance)
        self._n_rows = 0.0
        self._window_start_ns = time.monotonic_ns()
        self._window_rss = -1
        # Samples kept for the metrics export, only once an exporter asked for them.
        self.pending: deque[tuple[str, int]] | None = None
        self.windows_closed = 0
        self.baseline_objects = 0.0  # blocks per request every route kept, last window

    # ---- the hot path ----------------------------------------------------------------

    # On a real server a request's code and data are cold between requests: each Python
    # call and each object the accounting touches costs cache misses. So per request the
    # middleware only takes a number from ``starts`` and appends the request's route key
    # to ``completed``; samples start on the clock, and the route table is updated in
    # batches (flush()).

    def begin(self, now: int) -> Sample | None:
        """A request starts (for callers without the middleware's protocol: tests)."""
        seq = next(self.starts)
        return self.start(seq, now) if now >= self.due_ns else None

    def end(self, sample: Sample | None, template: str | None, path: str, now: int) -> None:
        """A request ends (for callers without the middleware's protocol: tests)."""
        key = route_key(template, path)
        self.completed.append(key)
        if sample is not None:
            self.end_sample(sample, key, now)
        elif now - self._window_start_ns >= self.leak_window_ns:
            self.close_window(now)

    def start(self, seq: int, now: int) -> Sample | None:
        """Request ``seq`` starts at ``now >= due_ns``: a quiet point when one is due and
        the request starts alone; its sample when one is due (a busy worker waits a
        little for a request that starts alone). Sets the next :attr:`due_ns`."""
        alone = self._finished_n + len(self.completed) == seq
        rss = -1
        if now >= self._next_anchor_ns:
            if alone:
                rss = self._read_rss(now)
                self.flush()
                self._quiet_point(now, rss)
                self._next_anchor_ns = now + self.anchor_interval_ns
            else:  # busy: look again soon, not at every request
                self._next_anchor_ns = now + _RETRY_NS
        sample = None
        if now >= self.next_sample_ns:
            if alone or now >= self.next_sample_ns + self._patience_ns:
                if rss < 0:
                    rss = self._read_rss(now)
                self.next_sample_ns = now + self.sample_interval_ns
                sample = _new_tuple(Sample, (seq, alone, rss))
        self.due_ns = min(self._next_anchor_ns, self.next_sample_ns if sample is not None
                          or now < self.next_sample_ns else now + _RETRY_NS)
        return sample

    def _read_rss(self, now: int) -> int:
        # The shared reading when it was taken at this same instant (one /proc read
        # fewer), else a read of its own.
        shared = self.shared
        if shared is not None and shared.checked_ns == now:
            return int(shared.rss)
        return self._rss()

    def end_sample(self, sample: Sample, key: RouteKey, now: int) -> None:
        """A sampled request has ended (its ``key`` is in :attr:`completed`): its growth."""
        rss = self._rss()
        self.flush()
        stats = self._stats_for(key)
        seq, alone, start_rss = sample
        growth = rss - start_rss
        stats.samples += 1
        stats.growth_sum += growth
        if growth > stats.growth_max:
            stats.growth_max = growth
        # Exclusive: alone at its start, and no request started after it.
        if alone and _count_value(self.starts) == seq + 1:
            stats.exclusive += 1
            stats.exclusive_sum += growth
        if self.pending is not None:
            self.pending.append((stats.route, growth))
        if now - self._window_start_ns >= self.leak_window_ns:
            self.close_window(now)

    def tick(self, now: int) -> None:
        """The once-a-second look (:class:`memguard.memory.MemoryLayer`): the finished
        requests counted, the leak window closed when due."""
        self.flush()
        if now - self._window_start_ns >= self.leak_window_ns:
            self.close_window(now)

    def flush(self) -> None:
        """Count the finished requests waiting in :attr:`completed` under their routes
        (and in the interval the next quiet point closes). Identical keys are counted
        together, in C: the route table is touched once per route, not per request."""
        completed = self.completed
        popleft = completed.popleft
        # popleft, not a copy and clear(): under threads a request may end meanwhile.
        keys = [popleft() for _ in range(len(completed))]
        try:
            batch = Counter(keys)
        except TypeError:  # something unhashable in a key (an app's own route name)
            batch = Counter(hashable_key(key) for key in keys)
        interval = self._interval
        for key, n in batch.items():
            stats = self._stats_for(key)
            stats.count += n
            interval[stats.index] = interval.get(stats.index, 0) + n
            self._finished_n += n

    def _stats_for(self, key: RouteKey) -> RouteStats:
        if isinstance(key, str):
            template: str | None = key
            path = key
        else:
            template = route_template(key)
            path = key[4]
        stats = self._routes.get(path if template is None else template)
        if stats is None:
            stats = self._new_route(template, path)
        return stats

    # ---- quiet points (at most one per anchor_interval) ---------------------------------

    def _quiet_point(self, now: int, rss: int) -> None:
        """No request in flight, and the interval is due (``start`` checks both; ``rss``
        is the worker's now). The point closes the interval since the previous one,
        after a young-generation collection: with nothing in flight, it
        frees the cyclic garbage the finished requests left (often more blocks than a
        leak keeps) and promotes nothing that a request still uses, so both ends of
        every interval hold no garbage."""
        if gc.isenabled():
            gc.collect(0)
        blocks = _blocks()
        row, self._interval = self._interval, {}
        if self._anchored and row:
            self._add_row(row, rss - self._anchor_rss, blocks - self._anchor_blocks)
        self._anchored, self._anchor_rss, self._anchor_blocks = True, rss, blocks

    def _add_row(self, row: dict[int, int], rss_growth: int, block_growth: int) -> None:
        self._yy_blocks += float(block_growth) * block_growth
        self._n_rows += 1.0
        xtx, y_bytes, y_blocks, rows = self._xtx, self._y_bytes, self._y_blocks, self._rows
        for i, xi in row.items():
            rows[i] = rows.get(i, 0) + 1
            y_bytes[i] = y_bytes.get(i, 0.0) + xi * rss_growth
            y_blocks[i] = y_blocks.get(i, 0.0) + xi * block_growth
            line = xtx.get(i)
            if line is None:
                line = xtx[i] = {}
            for j, xj in row.items():
                line[j] = line.get(j, 0.0) + xi * xj

    # ---- windows and leak suspicion -----------------------------------------------------

    def close_window(self, now: int | None = None) -> None:
        """End the current window: estimate what each route kept, judge leaks."""
        now = time.monotonic_ns() if now is None else now
        self.flush()
        rss = self._rss()
        worker_growth = rss - self._window_rss if self._window_rss >= 0 else 0
        self._window_rss = rss
        self._window_start_ns = now
        beta_bytes = nonnegative_least_squares(self._xtx, self._y_bytes)
        beta_blocks = nonnegative_least_squares(self._xtx, self._y_blocks)
        errors = standard_errors(self._xtx, self._y_blocks, self._yy_blocks, self._n_rows,
                                  beta_blocks)
        self.windows_closed += 1
        evidenced = [stats for stats in self._by_index
                     if self._rows.get(stats.index, 0) >= self.min_window_samples]
        # What every route seems to keep is the server's, not a route's: objects per
        # connection that outlive a young-generation collection and wait for an older
        # one. A leak is what a route keeps beyond the route that keeps least.
        baseline = 0.0
        if len(evidenced) >= 2:
            baseline = min(beta_blocks.get(stats.index, 0.0) for stats in evidenced)
        self.baseline_objects = baseline
        for stats in self._by_index:
            requests = stats.count - stats.window_start_count
            stats.window_start_count = stats.count
            if stats not in evidenced:
                continue  # too little evidence either way: the streak neither grows nor ends
            stats.estimate = beta_bytes.get(stats.index, 0.0)
            stats.objects = beta_blocks.get(stats.index, 0.0) - baseline
            # Two standard errors above the baseline: the intervals' noise (objects that
            # outlive an interval, older generations collected in bursts) is not a leak.
            significant = stats.objects > 2 * errors.get(stats.index, 0.0)
            retained = stats.estimate * requests
            stats.retained += retained
            stats.history.append(retained)
            stats.objects_history.append(stats.objects)
            stats.windows += 1
            if stats.windows <= _WARMUP_WINDOWS:
                continue  # first requests fill caches, pools, interned strings: not leaks
            if (stats.objects >= self.leak_min_objects and significant
                    and worker_growth >= self.leak_min_growth):
                stats.streak += 1
            else:
                stats.streak = 0
            if stats.streak >= self.leak_windows and not stats.suspected:
                stats.suspected = True
                self._report_leak(stats, worker_growth)
        # Older windows still count, at half weight per window: one window alone is
        # noisy (objects that outlive an interval, cyclic garbage freed in bursts).
        for line in self._xtx.values():
            for j in line:
                line[j] *= 0.5
        for y in (self._y_bytes, self._y_blocks):
            for i in y:
                y[i] *= 0.5
        self._yy_blocks *= 0.5
        self._n_rows *= 0.5
        self._rows = {}

    def _report_leak(self, stats: RouteStats, worker_growth: int) -> None:
        figures = {
            "route": stats.route,
            "objects_per_request": round(stats.objects, 2),
            "worker_growth_last_window": worker_growth,
            "retained_per_window": [round(x) for x in stats.history],
            "retained_per_request": round(stats.estimate),
            "requests": stats.count,
            "samples": stats.samples,
            "exclusive_samples": stats.exclusive,
            "window_seconds": self.leak_window_ns / 1e9,
        }
        log.warning(
            "suspected memory leak in route %s: kept about %s objects per request for %s "
            "windows of %ss in a row while the worker grew (%s)",
            stats.route, round(stats.objects, 2), stats.streak, self.leak_window_ns / 1e9,
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

    def keep_samples(self) -> deque[tuple[str, int]]:
        """Start keeping (route, growth) of each sample for an exporter; bounded."""
        if self.pending is None:
            self.pending = deque(maxlen=_PENDING_SAMPLES)
        return self.pending

    def routes(self) -> list[RouteStats]:
        self.flush()
        return list(self._by_index)

    def get(self, route: str) -> RouteStats | None:
        self.flush()
        return self._routes.get(route)

    def suspected(self) -> list[RouteStats]:
        return [s for s in self._by_index if s.suspected]

    def snapshot(self) -> dict[str, Any]:
        self.flush()
        return {
            "requests": self._finished_n,
            "windows": self.windows_closed,
            "baseline_objects_per_request": round(self.baseline_objects, 2),
            "routes": [s.as_dict() for s in self._by_index if s.count],
        }


def _count_value(counter: itertools.count[int]) -> int:
    """The next number ``counter`` will give, without taking it (its repr is
    ``count(N)``)."""
    return int(repr(counter)[6:-1])
