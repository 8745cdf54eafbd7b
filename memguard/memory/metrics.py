"""Prometheus metrics of memguard's state, for the metrics path.

Metrics need ``prometheus-client`` (``pip install "memguard-web[prometheus]"``).
:class:`MetricsExporter` exports:

- ``memguard_refusals_total{area,reason}``: every refusal memguard answered (body
  limits, memory admission, ...), from :func:`memguard.counters.snapshot`;
- ``memguard_recycles_total{reason}``: recycles a worker asked for;
- ``memguard_route_memory_growth_bytes{route}``: histogram of sampled requests' growth;
- ``memguard_memory_pressure_level`` (0 ok, 1 elevated, 2 critical) per worker;
- ``memguard_suspected_leak_routes``: routes suspected of leaking, per worker;
- ``memguard_worker_memory_bytes{pid,kind}``: each worker's RSS, USS and PSS, read at
  scrape time from ``/proc`` by the worker that answers the scrape.

Under gunicorn with ``PROMETHEUS_MULTIPROC_DIR`` set, prometheus-client's multiprocess
mode keeps each worker's counters in files that any worker's scrape merges; its process
collector (and any custom collector living in another worker) does not work there, which
is why worker memory is read at scrape time for every sibling worker instead. Dead
workers' live gauges are removed by :func:`child_exit` (a gunicorn ``child_exit`` hook
calling ``mark_process_dead``); :func:`clear_multiprocess_dir` empties the directory when
the master starts.
"""

from __future__ import annotations

import atexit
import glob
import logging
import os
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from memguard import config, counters, system
from memguard.memory.endpoints import respond_wsgi, send_asgi

if TYPE_CHECKING:
    from memguard.memory.admission import MemoryAdmission
    from memguard.memory.tracking import RequestTracker

__all__ = [
    "GROWTH_BUCKETS",
    "MetricsExporter",
    "child_exit",
    "clear_multiprocess_dir",
    "worker_pids",
]

log = logging.getLogger("memguard.metrics")

GROWTH_BUCKETS = (0.0, 4096.0, 65536.0, 262144.0, 1048576.0, 4194304.0, 16777216.0,
                  67108864.0, 268435456.0, float("inf"))

_MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


class MetricsExporter:
    """Keeps prometheus-client metrics in step with memguard's state and renders them.

    :meth:`sync` copies what changed since the last call (counters, sampled growths,
    pressure, leak suspicions) into the metrics; the middleware calls it about once a
    second from each worker, and :meth:`render` calls it before answering a scrape.
    """

    def __init__(self, admission: MemoryAdmission | None = None,
                 tracker: RequestTracker | None = None,
                 multiprocess_dir: str | None = None,
                 cache: float = config.default("metrics_cache")) -> None:
        try:
            import prometheus_client as prom
        except ImportError:
            raise RuntimeError(
                "metrics need prometheus-client: pip install 'memguard-web[prometheus]'"
            ) from None
        self._prom = prom
        self.admission = admission
        self.tracker = tracker
        self.multiprocess_dir = multiprocess_dir or os.environ.get(_MULTIPROC_ENV) or None
        # Metrics are not registered in the global registry: several exporters may
        # exist (tests, apps with two middlewares) and each renders its own registry.
        self.refusals = prom.Counter(
            "memguard_refusals", "Requests memguard refused, by area and reason.",
            ["area", "reason"], registry=None)
        self.recycles = prom.Counter(
            "memguard_recycles", "Graceful recycles a worker asked for, by reason.",
            ["reason"], registry=None)
        self.decisions = prom.Counter(
            "memguard_decisions", "Other memguard decisions (leak suspicions, ...).",
            ["area", "reason"], registry=None)
        self.growth = prom.Histogram(
            "memguard_route_memory_growth_bytes",
            "Process memory growth across sampled requests, by route template.",
            ["route"], buckets=GROWTH_BUCKETS, registry=None)
        self.pressure = prom.Gauge(
            "memguard_memory_pressure_level",
            "Memory pressure of the worker: 0 ok, 1 elevated, 2 critical.",
            registry=None, multiprocess_mode="liveall")
        self.leaks = prom.Gauge(
            "memguard_suspected_leak_routes", "Routes suspected of leaking in the worker.",
            registry=None, multiprocess_mode="liveall")
        if tracker is not None:
            tracker.keep_samples()
        self._seen: dict[tuple[str, str], int] = {}
        self._seen_pid = os.getpid()
        self.cache_ns = int(cache * 1e9)
        # content type asked for -> (monotonic ns when rendered, body, content type)
        self._rendered: dict[str, tuple[int, bytes, str]] = {}
        if self.multiprocess_dir:
            # What a worker counted since its last sync (about a second's worth) would be
            # lost at every recycle: recycled workers often live only seconds. atexit
            # runs in each worker (a recycled one too: memguard's fast exit runs it).
            atexit.register(self._sync_at_exit)

    def _sync_at_exit(self) -> None:
        try:
            self.sync()
        except Exception:  # an exit must not fail on metrics
            log.exception("metrics sync at exit failed")

    def sync(self) -> None:
        if self._seen_pid != os.getpid():
            # A forked worker inherits its parent's counts; only its own are new.
            self._seen, self._seen_pid = counters.snapshot(), os.getpid()
        for key, value in counters.snapshot().items():
            added = value - self._seen.get(key, 0)
            if added <= 0:
                continue
            self._seen[key] = value
            area, reason = key
            if area == "recycle":
                self.recycles.labels(reason).inc(added)
            elif area in ("tracking", "metrics", "leaks"):
                self.decisions.labels(area, reason).inc(added)
            else:
                self.refusals.labels(area, reason).inc(added)
        tracker = self.tracker
        if tracker is not None:
            pending = tracker.keep_samples()
            while pending:
                route, growth = pending.popleft()
                self.growth.labels(route).observe(max(0, growth))
            self.leaks.set(len(tracker.suspected()))
        if self.admission is not None:
            self.pressure.set(self.admission.level)

    def registry(self) -> Any:
        prom = self._prom
        registry = prom.CollectorRegistry(auto_describe=True)
        if self.multiprocess_dir:
            from prometheus_client import multiprocess

            multiprocess.MultiProcessCollector(  # type: ignore[no-untyped-call]
                registry, path=self.multiprocess_dir)
        else:
            for metric in (self.refusals, self.recycles, self.decisions, self.growth,
                           self.pressure, self.leaks):
                registry.register(metric)
        registry.register(WorkerMemoryCollector())
        return registry

    def render(self, accept: str = "") -> tuple[bytes, str]:
        """The scrape's body and content type, rebuilt at most once per ``cache``
        seconds: reading every worker's ``smaps_rollup`` is the costly part, and a
        scraper (or anyone) fetching the path in a loop must not multiply it."""
        from prometheus_client import exposition

        encoder, content_type = exposition.choose_encoder(accept)
        now = time.monotonic_ns()
        cached = self._rendered.get(content_type)
        if cached is not None and now - cached[0] < self.cache_ns:
            return cached[1], content_type
        self.sync()
        body = encoder(self.registry())
        if self.cache_ns:
            self._rendered[content_type] = (now, body, content_type)
        return body, content_type

    async def asgi(self, scope: dict[str, Any], receive: Callable[..., Any],
                   send: Callable[..., Any]) -> None:
        accept = dict(scope.get("headers") or ()).get(b"accept", b"").decode("latin-1")
        body, ctype = self.render(accept)
        await send_asgi(send, 200, ctype, body)

    def wsgi(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        body, ctype = self.render(environ.get("HTTP_ACCEPT", ""))
        return respond_wsgi(start_response, 200, ctype, body)


class WorkerMemoryCollector:
    """Every worker's RSS, USS and PSS, read from ``/proc`` at scrape time.

    Works in prometheus-client's multiprocess mode, where gauges from other processes'
    collectors are lost: the scraping worker reads its siblings itself (``smaps_rollup``,
    0.25 to 8 ms each, only per scrape).
    """

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        family = GaugeMetricFamily(
            "memguard_worker_memory_bytes",
            "Memory of each worker process (rss, uss, pss), read at scrape time.",
            labels=["pid", "kind"])
        for pid in worker_pids():
            try:
                mem = system.process_memory(pid)
            except (ProcessLookupError, OSError):
                continue
            for kind, value in (("rss", mem.rss), ("uss", mem.uss), ("pss", mem.pss)):
                if value is not None:
                    family.add_metric([str(pid), kind], float(value))
        yield family

    def describe(self) -> list[Any]:
        return []


def worker_pids() -> list[int]:
    """This worker and its siblings when the parent is a gunicorn master (or uvicorn's
    multi-worker supervisor); else this process alone."""
    own = os.getpid()
    try:
        import psutil

        parent = psutil.Process(own).parent()
        if parent is None:
            return [own]
        cmdline = " ".join(parent.cmdline())
        if "gunicorn" not in cmdline and "uvicorn" not in cmdline:
            return [own]
        pids = sorted(child.pid for child in parent.children())
        return pids if own in pids else [own, *pids]
    except Exception:  # psutil races with exiting processes; a scrape must still answer
        return [own]


def child_exit(server: Any, worker: Any) -> None:
    """gunicorn ``child_exit`` hook: drop a dead worker's live gauges (multiprocess)."""
    path = os.environ.get(_MULTIPROC_ENV)
    if not path:
        return
    try:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid, path)  # type: ignore[no-untyped-call]
    except Exception:  # a failing hook must never take the master down
        log.exception("mark_process_dead(%s) failed", getattr(worker, "pid", "?"))


def clear_multiprocess_dir(path: str | None = None) -> int:
    """Remove a previous run's metric files (call in the master before workers start).

    Returns the number of files removed.
    """
    path = path or os.environ.get(_MULTIPROC_ENV)
    if not path or not os.path.isdir(path):
        return 0
    removed = 0
    for name in glob.glob(os.path.join(path, "*.db")):
        try:
            os.unlink(name)
            removed += 1
        except OSError:
            pass
    return removed
