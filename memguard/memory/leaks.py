"""Leak reports, on demand: what grew between two points, and where it was allocated.

Never on by default: tracemalloc slows every allocation while it traces (see
docs/memory.md for the measured cost), so a report is started, read, and stopped, either
programmatically::

    reporter = LeakReporter()
    reporter.start()
    ...                          # traffic
    print(reporter.report().to_text())
    reporter.stop()

or through the admin endpoint (:class:`LeakAdmin`), off unless a path *and* a token are
configured; the token is compared with :func:`hmac.compare_digest`. A report holds the
top allocation sites by growth (with tracebacks) from a tracemalloc snapshot diff, and
the object types whose counts grew (objgraph's type statistics, when objgraph is
installed: ``pip install "memguard-web[leaks]"``). Under gunicorn, each worker traces
only itself: a report describes the worker that answered the admin request (its pid is
in the report).
"""

from __future__ import annotations

import gc
import hmac
import json
import logging
import os
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from memguard import system
from memguard.memory.endpoints import respond_wsgi, send_asgi
from memguard.sizes import format_size

__all__ = [
    "AllocationSite",
    "LeakAdmin",
    "LeakReport",
    "LeakReporter",
    "TypeGrowth",
    "type_counts",
]

log = logging.getLogger("memguard.leaks")


@dataclass(frozen=True)
class AllocationSite:
    """One place in the code whose live allocations grew between the two snapshots."""

    file: str
    line: int
    size_diff: int  # bytes
    count_diff: int  # blocks
    size: int  # live bytes allocated here at the second snapshot
    traceback: list[str]  # "file:line" frames, most recent call last


@dataclass(frozen=True)
class TypeGrowth:
    type: str
    before: int
    after: int

    @property
    def growth(self) -> int:
        return self.after - self.before


@dataclass
class LeakReport:
    pid: int
    seconds: float  # between the two points
    rss_before: int
    rss_after: int
    traced_before: int  # bytes tracemalloc saw live at the first point
    traced_after: int
    sites: list[AllocationSite] = field(default_factory=list)
    types: list[TypeGrowth] = field(default_factory=list)
    objgraph: bool = False  # whether type counts came from objgraph (else gc)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for row, item in zip(data["types"], self.types, strict=True):
            row["growth"] = item.growth
        return data

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2)

    def to_text(self) -> str:
        out = [
            f"memguard leak report: pid {self.pid}, {self.seconds:.1f}s",
            f"RSS {format_size(self.rss_before)} -> {format_size(self.rss_after)} "
            f"({_signed(self.rss_after - self.rss_before)}); traced Python memory "
            f"{format_size(self.traced_before)} -> {format_size(self.traced_after)} "
            f"({_signed(self.traced_after - self.traced_before)})",
            "",
            "Top allocation sites by growth:",
        ]
        if not self.sites:
            out.append("  (none grew)")
        for n, site in enumerate(self.sites, 1):
            out.append(f"  #{n} {site.file}:{site.line}: {_signed(site.size_diff)} "
                       f"in {site.count_diff:+d} blocks (now {format_size(site.size)})")
            for frame in site.traceback[-6:]:
                out.append(f"      {frame}")
        out += ["", f"Object types that grew ({'objgraph' if self.objgraph else 'gc'}):"]
        if not self.types:
            out.append("  (none grew)")
        for t in self.types:
            out.append(f"  {t.type:<40} {t.before:>9} -> {t.after:>9} ({t.growth:+d})")
        return "\n".join(out) + "\n"


def _signed(n: int) -> str:
    return ("+" if n >= 0 else "-") + format_size(abs(n))


def type_counts() -> tuple[dict[str, int], bool]:
    """Live object counts per type name: objgraph's ``typestats`` when installed (it
    walks ``gc.get_objects()`` the same way), else a plain walk. The bool says which."""
    try:
        import objgraph
    except ImportError:
        counts: dict[str, int] = {}
        for obj in gc.get_objects():
            name = type(obj).__name__
            counts[name] = counts.get(name, 0) + 1
        return counts, False
    return dict(objgraph.typestats()), True


class LeakReporter:
    """Two points in time, and what grew between them.

    :meth:`start` starts tracemalloc (if it was not tracing) with ``frames`` frames per
    allocation and takes the first snapshot and type counts; :meth:`report` compares the
    present with them (tracing goes on); :meth:`stop` reports and stops tracing if this
    reporter started it. Thread-safe: the admin endpoint may be hit from several threads.
    """

    def __init__(self, *, frames: int = 10, top: int = 15,
                 ignore: Iterable[str] = (tracemalloc.__file__, __file__)) -> None:
        self.frames = frames
        self.top = top
        self._filters = [tracemalloc.Filter(False, pattern) for pattern in ignore]
        self._filters.append(tracemalloc.Filter(False, "<frozen importlib._bootstrap*>"))
        self._lock = threading.Lock()
        self._snapshot: tracemalloc.Snapshot | None = None
        self._types: dict[str, int] = {}
        self._started_at = 0.0
        self._rss = 0
        self._we_started = False

    @property
    def active(self) -> bool:
        return self._snapshot is not None

    def start(self) -> None:
        with self._lock:
            if not tracemalloc.is_tracing():
                tracemalloc.start(self.frames)
                self._we_started = True
            gc.collect()
            self._types, _ = type_counts()
            self._snapshot = tracemalloc.take_snapshot().filter_traces(self._filters)
            self._started_at = time.monotonic()
            self._rss = system.current_rss()
        log.info("leak report started in pid %s (tracemalloc, %s frames)", os.getpid(),
                 self.frames)

    def report(self) -> LeakReport:
        with self._lock:
            return self._report()

    def stop(self) -> LeakReport:
        with self._lock:
            report = self._report()
            self._snapshot = None
            self._types = {}
            if self._we_started:
                tracemalloc.stop()
                self._we_started = False
        log.info("leak report stopped in pid %s", os.getpid())
        return report

    def _report(self) -> LeakReport:
        first = self._snapshot
        if first is None:
            raise RuntimeError("no leak report running: call start() first")
        gc.collect()
        second = tracemalloc.take_snapshot().filter_traces(self._filters)
        types_after, from_objgraph = type_counts()
        stats = second.compare_to(first, "traceback")
        grown = [s for s in stats if s.size_diff > 0]
        grown.sort(key=lambda s: s.size_diff, reverse=True)
        sites = []
        for stat in grown[: self.top]:
            frame = stat.traceback[-1] if len(stat.traceback) else None
            sites.append(AllocationSite(
                file=frame.filename if frame else "?", line=frame.lineno if frame else 0,
                size_diff=stat.size_diff, count_diff=stat.count_diff, size=stat.size,
                traceback=[f"{f.filename}:{f.lineno}" for f in stat.traceback],
            ))
        types = [TypeGrowth(name, self._types.get(name, 0), after)
                 for name, after in types_after.items()
                 if after > self._types.get(name, 0)]
        types.sort(key=lambda t: t.growth, reverse=True)
        return LeakReport(
            pid=os.getpid(), seconds=time.monotonic() - self._started_at,
            rss_before=self._rss, rss_after=system.current_rss(),
            traced_before=sum(t.size for t in first.traces),
            traced_after=sum(t.size for t in second.traces),
            sites=sites, types=types[: self.top], objgraph=from_objgraph,
        )


class LeakAdmin:
    """The leak-report admin endpoint, for the ASGI and WSGI middlewares.

    Under ``path`` (chosen by the app, e.g. ``/_memguard/leaks``): ``POST path/start``
    (``?frames=N``: traceback depth, 10 by default; 1 is several times cheaper),
    ``GET path/report`` (JSON; ``?format=text`` for text), ``POST path/stop`` (the
    report, then tracing stops). Every call needs ``Authorization: Bearer <token>``:
    missing is 401, wrong is 403; the comparison is constant-time. A path with no token
    configured is refused at construction: an open admin endpoint is not an option.
    """

    def __init__(self, path: str, token: str, reporter: LeakReporter | None = None) -> None:
        if not token:
            raise ValueError("the leak admin endpoint needs a token (leak_admin_token)")
        self.path = path.rstrip("/")
        self._token = token.encode()
        self.reporter = reporter or LeakReporter()

    def matches(self, path: str) -> bool:
        return path == self.path or path.startswith(self.path + "/")

    def handle(self, method: str, path: str, authorization: str | None,
               query: str = "") -> tuple[int, str, bytes]:
        """(status, content type, body) for one admin request."""
        if authorization is None:
            return _answer(401, {"error": "missing token"})
        scheme, _, given = authorization.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(),
                                                                 self._token):
            # repr: the path is the client's, and a newline in it must not forge a line.
            log.warning("leak admin: wrong token for %r %r", method, path)
            return _answer(403, {"error": "wrong token"})
        action = path[len(self.path):].strip("/")
        text = "format=text" in query
        try:
            if action == "start" and method == "POST":
                frames = _query_int(query, "frames")
                if frames is not None:
                    # Fewer frames, cheaper tracing: 1 frame names the line only.
                    self.reporter.frames = max(1, min(frames, 50))
                self.reporter.start()
                return _answer(200, {"status": "started", "pid": os.getpid()})
            if action == "report" and method == "GET":
                return _report_answer(self.reporter.report(), text)
            if action == "stop" and method == "POST":
                return _report_answer(self.reporter.stop(), text)
        except RuntimeError as exc:
            return _answer(409, {"error": str(exc)})
        if action in ("start", "stop", "report"):
            return _answer(405, {"error": f"method {method} not allowed for {action}"})
        return _answer(404, {"error": "unknown action; use start, report or stop"})

    async def asgi(self, scope: dict[str, Any], receive: Callable[..., Any],
                   send: Callable[..., Any]) -> None:
        headers = dict(scope.get("headers") or ())
        auth = headers.get(b"authorization")
        status, ctype, body = self.handle(
            scope["method"], scope["path"], None if auth is None else auth.decode("latin-1"),
            (scope.get("query_string") or b"").decode("latin-1"),
        )
        await send_asgi(send, status, ctype, body)

    def wsgi(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        status, ctype, body = self.handle(
            environ["REQUEST_METHOD"], environ.get("PATH_INFO", ""),
            environ.get("HTTP_AUTHORIZATION"), environ.get("QUERY_STRING", ""),
        )
        return respond_wsgi(start_response, status, ctype, body)


def _query_int(query: str, name: str) -> int | None:
    for item in query.split("&"):
        key, _, value = item.partition("=")
        if key == name and value.isascii() and value.isdigit():
            return int(value)
    return None


def _answer(status: int, data: dict[str, Any]) -> tuple[int, str, bytes]:
    return status, "application/json", (json.dumps(data) + "\n").encode()


def _report_answer(report: LeakReport, text: bool) -> tuple[int, str, bytes]:
    if text:
        return 200, "text/plain; charset=utf-8", report.to_text().encode()
    return 200, "application/json", report.to_json().encode()
