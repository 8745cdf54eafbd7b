"""``memguard report``: the event log (:mod:`memguard.events`) as a memory timeline.

:func:`load` reads the JSON-lines log into a :class:`Timeline`; :func:`summarize` turns
it into counts and per-worker peaks (``render_summary`` prints them); :func:`draw`
writes a picture (``.png``, ``.svg``, or a self-contained ``.html`` with the picture
inline and the summary beside it). matplotlib is needed only for :func:`draw` and is
imported there (``pip install "memguard-web[plot]"``).

What the report reads from each kind (any other field is kept but not needed):

- ``sample``: ``pid``, ``role`` (``worker`` by default, ``master``), and one or more of
  ``rss``, ``uss``, ``pss`` in bytes.
- ``recycle``, ``oom_kill``, ``worker_exit``, ``worker_start``: the process concerned is
  ``worker_pid`` when present (the master reporting on a worker), else ``pid``;
  ``recycle`` has a ``reason``. A worker's line is drawn up to its ``worker_exit``:
  samples after it are of its shutdown (they still count in the total).
- ``refusal``: ``status`` and ``reason``.
- ``limit``: every numeric field is a configured limit in bytes named by its key
  (``worker_memory_limit=...``), or one limit as ``name=...`` and ``value=...``. Names
  containing ``worker`` are per-worker limits; the others (total budget, cgroup limit)
  apply to all processes together.

A line that is not a JSON object with ``ts`` and ``kind`` (a line cut short when a
process was killed mid-write, for instance) is counted as unreadable and skipped.
"""

from __future__ import annotations

import html
import io
import json
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memguard.sizes import format_size

__all__ = [
    "FORMATS",
    "METRICS",
    "Mark",
    "ReportError",
    "Timeline",
    "WorkerSeries",
    "draw",
    "load",
    "parse_events",
    "render_summary",
    "summarize",
]

METRICS = ("uss", "pss", "rss")
FORMATS = (".png", ".svg", ".html")
PLOT_EXTRA = 'pip install "memguard-web[plot]"'
MiB = 1024 * 1024


class ReportError(Exception):
    """The event log cannot be reported on (missing, empty, or matplotlib is absent)."""


@dataclass
class Mark:
    """One event on the time axis: ``t`` in seconds since the first event."""

    t: float
    pid: int
    kind: str
    reason: str = ""
    status: int | None = None
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass
class WorkerSeries:
    """Memory samples of one process, and how its life ended."""

    pid: int
    role: str
    times: list[float] = field(default_factory=list)
    values: dict[str, list[float | None]] = field(
        default_factory=lambda: {m: [] for m in METRICS})
    started: float | None = None  # worker_start event, if any
    end: str | None = None  # "recycled", "oom_killed", "exited", None: alive at the end
    end_reason: str = ""
    ended: float | None = None
    exited: float | None = None  # its worker_exit event: it was shutting down after this
    slot: int = 0  # processes that replaced one another share a slot (and a colour)

    @property
    def first(self) -> float:
        """Its start, else its first sample, else its end: a worker stopped while it
        booted is known only by its exit, and was alive then, not since the log began."""
        candidates = [t for t in (self.started, self.times[0] if self.times else None)
                      if t is not None] or [t for t in (self.ended, self.exited)
                                            if t is not None]
        return min(candidates) if candidates else 0.0

    @property
    def last(self) -> float:
        candidates = [t for t in (self.ended, self.times[-1] if self.times else None)
                      if t is not None]
        return max(candidates) if candidates else self.first

    def series(self, metric: str, drawn: bool = False) -> tuple[list[float], list[float]]:
        """(times, bytes) of the samples that carry ``metric``; with ``drawn``, only up to
        the process's ``worker_exit`` (later samples are of its interpreter shutting down:
        they count in the total, but the worker's own line ends where its work did)."""
        until = self.exited if drawn and self.exited is not None else math.inf
        pairs = [(t, v) for t, v in zip(self.times, self.values[metric], strict=True)
                 if v is not None and t <= until]
        return [t for t, _ in pairs], [v for _, v in pairs]

    def peak(self, metric: str) -> float | None:
        values = [v for v in self.values[metric] if v is not None]
        return max(values) if values else None

    def value_at(self, metric: str, t: float) -> float | None:
        """The last sample of ``metric`` at or before ``t`` (else the first after it)."""
        times, values = self.series(metric)
        if not values:
            return None
        best = values[0]
        for when, value in zip(times, values, strict=True):
            if when > t:
                break
            best = value
        return best


@dataclass
class Timeline:
    source: str
    start: float  # Unix time of the first event
    duration: float
    events: int
    unreadable: int
    kinds: Counter[str]
    processes: dict[int, WorkerSeries]
    recycles: list[Mark]
    refusals: list[Mark]
    oom_kills: list[Mark]
    limits: dict[str, float]

    @property
    def workers(self) -> list[WorkerSeries]:
        return sorted((p for p in self.processes.values() if p.role != "master"),
                      key=lambda p: (p.first, p.pid))

    @property
    def masters(self) -> list[WorkerSeries]:
        return [p for p in self.processes.values() if p.role == "master"]

    def metric(self, preferred: str = "auto") -> str:
        """The memory figure to draw per worker: ``preferred``, or under ``auto`` the one
        most samples carry, USS first (what recycling decisions use), then PSS, RSS."""
        if preferred != "auto":
            if preferred not in METRICS:
                raise ReportError(f"unknown metric {preferred!r}: expected one of "
                                  f"{', '.join(METRICS)} or auto")
            return preferred
        counts = {m: sum(v is not None for p in self.processes.values() for v in p.values[m])
                  for m in METRICS}
        best = max(counts.values(), default=0)
        return next((m for m in METRICS if counts[m] == best and best > 0), "rss")

    def total_metric(self) -> str:
        """The figure to add up across processes: PSS counts shared pages once, so the
        sum of PSS is what the container really holds; RSS over-counts them."""
        for metric in ("pss", "rss", "uss"):
            if any(v is not None for p in self.processes.values() for v in p.values[metric]):
                return metric
        return "rss"

    def worker_limits(self) -> dict[str, float]:
        return {k: v for k, v in self.limits.items() if "worker" in k}

    def total_limits(self) -> dict[str, float]:
        return {k: v for k, v in self.limits.items() if "worker" not in k}

    def total_series(self, metric: str) -> tuple[list[float], list[float]]:
        """The sum over live processes of their latest ``metric``, at each sample time."""
        points: list[tuple[float, int, float | None]] = []
        for p in self.processes.values():
            times, values = p.series(metric)
            points += [(t, p.pid, v) for t, v in zip(times, values, strict=True)]
            if p.end is not None:
                # Gone after its last sign of life (a recycle is decided before the
                # process drains and exits, so samples may follow it).
                points.append((p.last, p.pid, None))
        points.sort(key=lambda item: (item[0], item[2] is None))
        current: dict[int, float] = {}
        xs: list[float] = []
        ys: list[float] = []
        for t, pid, value in points:
            if value is None:
                current.pop(pid, None)
            else:
                current[pid] = value
            xs.append(t)
            ys.append(sum(current.values()))
        return xs, ys

    def max_concurrent_workers(self) -> int:
        edges: list[tuple[float, int]] = []
        for p in self.workers:
            edges += [(p.first, 1), (p.last, -1)]
        edges.sort(key=lambda e: (e[0], -e[1]))  # a process alive for an instant counts
        best = running = 0
        for _, delta in edges:
            running += delta
            best = max(best, running)
        return best


# --------------------------------------------------------------------------------------
# Reading


def _target(record: dict[str, Any]) -> int:
    for key in ("worker_pid", "worker"):
        value = record.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return int(record.get("pid", 0))


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def parse_events(lines: list[str], source: str = "<events>") -> Timeline:
    """Build a :class:`Timeline` from JSON lines (see the module docstring)."""
    records: list[dict[str, Any]] = []
    unreadable = 0
    for line in lines:
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            unreadable += 1
            continue
        if (not isinstance(record, dict) or _number(record.get("ts")) is None
                or not isinstance(record.get("kind"), str)):
            unreadable += 1
            continue
        records.append(record)
    if not records:
        raise ReportError(f"{source}: no events"
                          + (f" ({unreadable} unreadable lines)" if unreadable else ""))
    # Processes append concurrently; order by time (stable for equal stamps).
    records.sort(key=lambda r: float(r["ts"]))
    start = float(records[0]["ts"])
    timeline = Timeline(
        source=source, start=start, duration=float(records[-1]["ts"]) - start,
        events=len(records), unreadable=unreadable, kinds=Counter(), processes={},
        recycles=[], refusals=[], oom_kills=[], limits={},
    )

    def process(pid: int, role: str = "worker") -> WorkerSeries:
        series = timeline.processes.get(pid)
        if series is None:
            series = timeline.processes[pid] = WorkerSeries(pid=pid, role=role)
        return series

    for r in records:
        kind = r["kind"]
        t = float(r["ts"]) - start
        timeline.kinds[kind] += 1
        extra = {k: v for k, v in r.items() if k not in ("ts", "kind", "pid")}
        if kind == "sample":
            role = str(r.get("role") or "worker")
            series = process(_target(r), role)
            series.role = role
            values = {m: _number(r.get(m)) for m in METRICS}
            if all(v is None for v in values.values()):
                continue
            series.times.append(t)
            for m in METRICS:
                series.values[m].append(values[m])
        elif kind == "recycle":
            pid = _target(r)
            reason = str(r.get("reason") or "unknown")
            timeline.recycles.append(Mark(t, pid, kind, reason, fields=extra))
            series = process(pid)
            if series.end is None:
                series.end, series.end_reason, series.ended = "recycled", reason, t
        elif kind == "oom_kill":
            pid = _target(r)
            timeline.oom_kills.append(Mark(t, pid, kind, str(r.get("reason") or ""),
                                           fields=extra))
            series = process(pid)
            # An OOM kill ends the process whatever was planned for it.
            series.end, series.end_reason = "oom_killed", ""
            series.ended = t if series.ended is None else min(series.ended, t)
        elif kind == "refusal":
            status = _number(r.get("status"))
            timeline.refusals.append(Mark(
                t, _target(r), kind, str(r.get("reason") or "unknown"),
                status=int(status) if status is not None else None, fields=extra))
        elif kind == "worker_start":
            process(_target(r)).started = t
        elif kind == "worker_exit":
            series = process(_target(r))
            series.exited = t if series.exited is None else series.exited
            if series.end is None:
                series.end, series.end_reason = "exited", str(r.get("reason") or "")
            if series.ended is None or series.end == "exited":
                series.ended = t
        elif kind == "limit":
            if isinstance(r.get("name"), str) and _number(r.get("value")) is not None:
                timeline.limits[r["name"]] = float(r["value"])
            else:
                for key, value in extra.items():
                    number = _number(value)
                    if number is not None and number > 0 and key not in ("worker_pid",):
                        timeline.limits[key] = number
    _assign_slots(timeline)
    return timeline


def _assign_slots(timeline: Timeline) -> None:
    """Give a worker that replaced an ended one that one's slot, so that a sawtooth of
    successive workers reads as one line of one colour (as gunicorn's worker slots)."""
    slot_free_at: list[float] = []  # per slot: when its latest worker ended
    for p in timeline.workers:
        free = [i for i, ended in enumerate(slot_free_at) if ended <= p.first + 0.5]
        if free:
            slot = min(free, key=lambda i: slot_free_at[i])
        else:
            slot = len(slot_free_at)
            slot_free_at.append(0.0)
        p.slot = slot
        # A worker that never ended holds its slot to the end.
        slot_free_at[slot] = p.last if p.end is not None else math.inf


def load(path: str | Path) -> Timeline:
    """Read an event log written by :mod:`memguard.events`."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        raise ReportError(f"{path}: no such event log (set MEMGUARD_EVENTS to write one)")\
            from None
    except OSError as exc:
        raise ReportError(f"{path}: {exc.strerror or exc}") from None
    return parse_events(text.splitlines(), source=str(path))


# --------------------------------------------------------------------------------------
# Summary


def summarize(timeline: Timeline, metric: str = "auto") -> dict[str, Any]:
    """Counts and per-worker peaks, JSON-ready."""
    chosen = timeline.metric(metric)
    refusals: Counter[str] = Counter(
        f"{m.status if m.status is not None else '?'} {m.reason}" for m in timeline.refusals)
    processes = []
    for p in [*timeline.masters, *timeline.workers]:
        processes.append({
            "pid": p.pid, "role": p.role, "slot": p.slot + 1 if p.role != "master" else None,
            "first": round(p.first, 3), "last": round(p.last, 3), "samples": len(p.times),
            "peak_rss": p.peak("rss"), "peak_uss": p.peak("uss"), "peak_pss": p.peak("pss"),
            "end": p.end, "end_reason": p.end_reason,
        })
    return {
        "source": timeline.source,
        "start": timeline.start,
        "duration": round(timeline.duration, 3),
        "events": timeline.events,
        "unreadable_lines": timeline.unreadable,
        "metric": chosen,
        "samples": timeline.kinds["sample"],
        "workers": len(timeline.workers),
        "max_concurrent_workers": timeline.max_concurrent_workers(),
        "recycles": len(timeline.recycles),
        "recycles_by_reason": dict(Counter(m.reason for m in timeline.recycles).most_common()),
        "refusals": len(timeline.refusals),
        "refusals_by_status_reason": dict(refusals.most_common()),
        "oom_kills": len(timeline.oom_kills),
        "limits": dict(timeline.limits),
        "processes": processes,
    }


def _size(value: float | None) -> str:
    return format_size(value) if value is not None else "-"


def _by(counts: dict[str, int]) -> str:
    return "  (" + ", ".join(f"{k}: {n}" for k, n in counts.items()) + ")" if counts else ""


def render_summary(summary: dict[str, Any]) -> str:
    """The summary as text for a terminal."""
    start = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(summary["start"]))
    lines = [
        f"memguard report: {summary['source']}",
        "",
        f"  span        {summary['duration']:.1f} s from {start}, "
        f"{_plural(summary['events'], 'event')}"
        + (f", {_plural(summary['unreadable_lines'], 'unreadable line')} skipped"
           if summary["unreadable_lines"] else ""),
        f"  samples     {summary['samples']}",
        f"  workers     {_plural(summary['workers'], 'process', 'processes')}, at most "
        f"{summary['max_concurrent_workers']} at a time",
        f"  recycles    {summary['recycles']}{_by(summary['recycles_by_reason'])}",
        f"  refusals    {summary['refusals']}{_by(summary['refusals_by_status_reason'])}",
        f"  OOM kills   {summary['oom_kills']}",
    ]
    if summary["limits"]:
        lines.append("  limits      " + ", ".join(
            f"{k} {format_size(v)}" for k, v in summary["limits"].items()))
    lines += ["", "  peak memory per process:",
              f"  {'pid':>8}  {'role':<6} {'slot':>4} {'from':>7} {'to':>7} {'samples':>7}"
              f" {'peak RSS':>11} {'peak USS':>11} {'peak PSS':>11}  end"]
    for p in summary["processes"]:
        end = p["end"] or "running at the end"
        if p["end_reason"]:
            end += f" ({p['end_reason']})"
        lines.append(
            f"  {p['pid']:>8}  {p['role']:<6} {p['slot'] or '':>4} {p['first']:>6.1f}s "
            f"{p['last']:>6.1f}s {p['samples']:>7} {_size(p['peak_rss']):>11} "
            f"{_size(p['peak_uss']):>11} {_size(p['peak_pss']):>11}  {end}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# Drawing

_STATUS_COLOURS = {400: "#7f7f7f", 408: "#8c564b", 411: "#bcbd22", 413: "#ff7f0e",
                   415: "#e377c2", 503: "#9467bd", 507: "#17becf"}
_LIMIT_STYLES = {
    "hard": ("#d62728", (0, (6, 3))),
    "soft": ("#ff7f0e", (0, (6, 3))),
    "cgroup": ("#d62728", "solid"),
    "total": ("black", (0, (6, 2, 1, 2))),
}
# Worker colours leave out orange and red, which mark limits, and grey (the master).
_WORKER_COLOURS = ["#1f77b4", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf",
                   "#bcbd22", "#393b79"]


def _limit_style(name: str) -> tuple[str, Any]:
    lowered = name.lower()
    if "cgroup" in lowered or "container" in lowered:
        return _LIMIT_STYLES["cgroup"]
    if "hard" in lowered:
        return _LIMIT_STYLES["hard"]
    if "worker" in lowered:
        return _LIMIT_STYLES["soft"]
    return _LIMIT_STYLES["total"]


def _limit_label(name: str, value: float) -> str:
    words = name.replace("_", " ")
    if words.startswith("worker memory "):
        words = "worker " + words[len("worker memory "):]
    return f"{words}: {value / MiB:.0f} MiB"


def _plural(n: int, word: str, plural: str | None = None) -> str:
    return f"{n} {word if n == 1 else plural or word + 's'}"


def _headline(timeline: Timeline) -> str:
    return (f"{_plural(len(timeline.workers), 'worker process', 'worker processes')}, "
            f"{_plural(len(timeline.recycles), 'recycle')}, "
            f"{_plural(len(timeline.refusals), 'refusal')}, "
            f"{_plural(len(timeline.oom_kills), 'OOM kill')} "
            f"in {timeline.duration:.0f} s")


def _import_matplotlib() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise ReportError(f"drawing the timeline needs matplotlib: {PLOT_EXTRA}") from None
    return matplotlib


def _event_rows(timeline: Timeline) -> list[tuple[str, list[Mark]]]:
    """The events lane, top to bottom: recycles, refusals (a row per status), OOM kills;
    returned bottom first, as matplotlib counts rows."""
    rows: list[tuple[str, list[Mark]]] = [("recycles", timeline.recycles)]
    by_status: dict[int | None, list[Mark]] = {}
    for m in timeline.refusals:
        by_status.setdefault(m.status, []).append(m)
    for status, marks in sorted(by_status.items(), key=lambda kv: kv[0] or 0):
        reasons = ", ".join(Counter(m.reason for m in marks))
        rows.append((f"{status or '?'} {reasons}", marks))
    if not by_status:
        rows.append(("refusals", []))
    rows.append(("OOM kills", timeline.oom_kills))
    return rows[::-1]


def figure(timeline: Timeline, metric: str = "auto", title: str | None = None) -> Any:
    """A matplotlib ``Figure`` of the timeline (no pyplot, no GUI: the Agg canvas)."""
    _import_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    chosen = timeline.metric(metric)
    workers = timeline.workers
    show_total = bool(timeline.total_limits()) or timeline.max_concurrent_workers() > 1
    rows = _event_rows(timeline)
    lane = 0.3 + 0.28 * len(rows)
    ratios = [5.0, 2.6, lane] if show_total else [5.0, lane]
    fig = Figure(figsize=(12, sum(ratios) * 0.95 + 0.9), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(ratios), 1, sharex=True, height_ratios=ratios)
    ax_mem, ax_events = axes[0], axes[-1]
    ax_total = axes[1] if show_total else None
    colours = _WORKER_COLOURS
    end_x = max(timeline.duration, 1.0)

    # -- per-worker memory, one line per process, one colour per slot -------------------
    slots: dict[int, list[WorkerSeries]] = {}
    for p in workers:
        slots.setdefault(p.slot, []).append(p)
    handles: list[Any] = []
    for slot, members in sorted(slots.items()):
        colour = colours[slot % len(colours)]
        for p in members:
            xs, ys = p.series(chosen, drawn=True)
            if not xs:
                continue
            ax_mem.plot(xs, [y / MiB for y in ys], color=colour, linewidth=1.6,
                        solid_capstyle="butt")
        pids = [p.pid for p in members]
        who = (f"pid {pids[0]}" if len(pids) == 1
               else f"{len(pids)} processes in turn" if len(pids) > 3
               else "pids " + ", ".join(map(str, pids)))
        handles.append(Line2D([], [], color=colour, linewidth=2,
                              label=f"worker {slot + 1} ({who})"))
    for master in timeline.masters:
        xs, ys = master.series(chosen)
        if xs:
            ax_mem.plot(xs, [y / MiB for y in ys], color="0.55", linewidth=1.2,
                        linestyle=(0, (1, 1)))
            handles.append(Line2D([], [], color="0.55", linestyle=(0, (1, 1)),
                                  label=f"master (pid {master.pid})"))

    def at(mark: Mark) -> float | None:
        p = timeline.processes.get(mark.pid)
        value = p.value_at(chosen, mark.t) if p is not None else None
        return value / MiB if value is not None else None

    recycle_points = [(m.t, y) for m in timeline.recycles if (y := at(m)) is not None]
    if recycle_points:
        ax_mem.scatter(*zip(*recycle_points, strict=True), marker="v", s=70, zorder=5,
                       facecolor="white", edgecolor="black", linewidth=1.4)
        handles.append(Line2D([], [], marker="v", linestyle="none", markersize=8,
                              markerfacecolor="white", markeredgecolor="black",
                              label="recycled (graceful)"))
    oom_points = [(m.t, y) for m in timeline.oom_kills if (y := at(m)) is not None]
    if oom_points:
        ax_mem.scatter(*zip(*oom_points, strict=True), marker="X", s=140, zorder=6,
                       color="#d62728", edgecolor="black", linewidth=0.8)
        handles.append(Line2D([], [], marker="X", linestyle="none", markersize=10,
                              markerfacecolor="#d62728", markeredgecolor="black",
                              label="OOM-killed by the kernel\n(at its last sample)"))

    def draw_limits(ax: Any, limits: dict[str, float]) -> list[Any]:
        # Named in the legend, not on the plot, where a label would hide the data.
        drawn = []
        for name, value in sorted(limits.items(), key=lambda kv: -kv[1]):
            colour, style = _limit_style(name)
            drawn.append(ax.axhline(value / MiB, color=colour, linestyle=style,
                                    linewidth=1.4, zorder=1, label=_limit_label(name, value)))
        return drawn

    handles += draw_limits(ax_mem, timeline.worker_limits())
    if not timeline.kinds["sample"]:
        ax_mem.text(0.5, 0.5, "no memory samples in this log", transform=ax_mem.transAxes,
                    ha="center", va="center", fontsize=12, color="0.4")
    label = {"uss": "USS (memory unique to the process)",
             "pss": "PSS (shared pages split among users)",
             "rss": "RSS (resident, shared pages counted in full)"}[chosen]
    ax_mem.set_ylabel(f"per process, MiB\n{chosen.upper()}")
    ax_mem.set_ylim(bottom=0)
    _headroom(ax_mem, timeline.worker_limits())
    ax_mem.grid(True, color="0.9")
    ax_mem.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.005, 1.0),
                  fontsize=9, frameon=False)
    ax_mem.set_title(f"memory per process: {label}", fontsize=10, loc="left")

    # -- all processes together, against the pool's budget ------------------------------
    if ax_total is not None:
        total_metric = timeline.total_metric()
        xs, ys = timeline.total_series(total_metric)
        (total_line,) = ax_total.step(xs, [y / MiB for y in ys], where="post", color="black",
                                      linewidth=1.4, label=f"sum of {total_metric.upper()}")
        total_handles = [total_line, *draw_limits(ax_total, timeline.total_limits())]
        ax_total.legend(handles=total_handles, loc="upper left", bbox_to_anchor=(1.005, 1.0),
                        fontsize=9, frameon=False)
        ax_total.set_ylim(bottom=0)
        _headroom(ax_total, timeline.total_limits())
        ax_total.set_ylabel(f"all processes, MiB\nsum of {total_metric.upper()}")
        ax_total.grid(True, color="0.9")
        ax_total.set_title(f"all processes together (sum of {total_metric.upper()}), "
                           "against the pool's limits", fontsize=10, loc="left")

    # -- events lane ----------------------------------------------------------------
    for y, (name, marks) in enumerate(rows):
        xs = [m.t for m in marks]
        if not xs:
            continue
        if name == "OOM kills":
            ax_events.scatter(xs, [y] * len(xs), marker="X", s=90, color="#d62728",
                              edgecolor="black", linewidth=0.6)
        elif name == "recycles":
            ax_events.scatter(xs, [y] * len(xs), marker="v", s=50, facecolor="white",
                              edgecolor="black", linewidth=1.2)
        else:
            ax_events.scatter(xs, [y] * len(xs), marker="|", s=200, linewidth=2,
                              color=_STATUS_COLOURS.get(marks[0].status or 0, "0.3"))
    ax_events.set_yticks(range(len(rows)), [f"{name} ({len(marks)})" for name, marks in rows])
    ax_events.set_ylim(-0.7, len(rows) - 0.3)
    ax_events.grid(True, axis="x", color="0.9")
    ax_events.set_title("events: recycles, refused requests (status and reason), OOM kills",
                        fontsize=10, loc="left")
    start = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(timeline.start))
    ax_events.set_xlabel(f"seconds since the first event ({start})")
    ax_events.set_xlim(-0.01 * end_x, end_x * 1.01)

    fig.suptitle(title or f"memguard timeline: {_headline(timeline)}", fontsize=13,
                 fontweight="bold")
    return fig


def _headroom(ax: Any, limits: dict[str, float]) -> None:
    """Keep every limit line (and its label) inside the axes."""
    top = max([ax.get_ylim()[1], *[v / MiB * 1.12 for v in limits.values()]])
    ax.set_ylim(0, top)


def draw(timeline: Timeline, out: str | Path, metric: str = "auto",
         title: str | None = None) -> Path:
    """Write the timeline to ``out`` (``.png``, ``.svg`` or ``.html``)."""
    out = Path(out)
    suffix = out.suffix.lower()
    if suffix not in FORMATS:
        raise ReportError(f"{out}: unknown picture format {suffix or '(none)'!r}: "
                          f"expected one of {', '.join(FORMATS)}")
    fig = figure(timeline, metric=metric, title=title)
    if suffix == ".html":
        buffer = io.StringIO()
        fig.savefig(buffer, format="svg")
        out.write_text(_html(timeline, buffer.getvalue(), metric, title), encoding="utf-8")
    else:
        kwargs = {"pil_kwargs": {"optimize": True}} if suffix == ".png" else {}
        fig.savefig(out, format=suffix[1:], dpi=100, **kwargs)
    return out


def _html(timeline: Timeline, svg: str, metric: str, title: str | None) -> str:
    # The SVG starts with an XML prolog and a DOCTYPE that do not belong inside HTML.
    svg = svg[svg.index("<svg"):]
    summary = html.escape(render_summary(summarize(timeline, metric)))
    title = html.escape(title or f"memguard timeline: {_headline(timeline)}")
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<title>{title}</title>\n"
        "<style>body{font-family:sans-serif;margin:1.5em;max-width:1250px}"
        "svg{max-width:100%;height:auto}pre{background:#f6f6f6;padding:1em;"
        "overflow-x:auto}</style>\n</head>\n<body>\n"
        f"<h1>{title}</h1>\n{svg}\n<h2>Summary</h2>\n<pre>{summary}</pre>\n"
        "</body>\n</html>\n"
    )
