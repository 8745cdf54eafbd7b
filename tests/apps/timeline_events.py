"""A realistic event log without a server, for fast tests of ``memguard report``.

:func:`synthetic_events` writes what a gunicorn master and its workers write over a run
(the same kinds and fields as :mod:`tests.apps.timeline_conf` and the app): configured
limits; a master sampling itself and every worker; workers that leak at their own rate,
recycle past the soft limit and are replaced in their slot; refusals; and one worker
killed by the kernel, reported by the master with ``worker_pid``. It also returns what it
wrote as plain facts (:class:`Truth`), so tests compare the report with them.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MiB = 1024 * 1024


@dataclass
class Truth:
    recycles: Counter[str] = field(default_factory=Counter)
    refusals: Counter[tuple[int, str]] = field(default_factory=Counter)
    oom_killed: list[int] = field(default_factory=list)
    peaks: dict[int, int] = field(default_factory=dict)  # pid -> peak USS
    slots: dict[int, int] = field(default_factory=dict)  # pid -> slot (0-based)
    master: int = 0
    samples: int = 0


def synthetic_events(*, workers: int = 3, seconds: float = 60.0, soft_limit: int = 96 * MiB,
                     cgroup_limit: int = 512 * MiB, oom_at: float | None = 40.0,
                     seed: int = 7, start: float = 1_790_000_000.0) -> tuple[list[dict[str, Any]],
                                                                            Truth]:
    rng = random.Random(seed)
    truth = Truth(master=1000)
    out: list[dict[str, Any]] = []
    next_pid = [1001]

    def emit(t: float, kind: str, pid: int, **fields: Any) -> None:
        out.append({"ts": round(start + t, 4), "kind": kind, "pid": pid, **fields})

    emit(0.0, "limit", truth.master, worker_memory_limit=soft_limit, cgroup_limit=cgroup_limit)
    # Per slot: the current worker, its USS, its leak rate (bytes/s).
    current: list[dict[str, Any]] = []

    def spawn(slot: int, t: float) -> None:
        pid = next_pid[0]
        next_pid[0] += 1
        current[slot:slot + 1] = [{"pid": pid, "uss": 18 * MiB + rng.randrange(2 * MiB),
                                   "rate": rng.uniform(1.0, 4.0) * MiB}]
        truth.slots[pid] = slot
        truth.peaks[pid] = current[slot]["uss"]
        emit(t + 0.05, "worker_start", pid)

    for slot in range(workers):
        current.append({})
        spawn(slot, 0.1 * slot)
    t = 0.5
    oom_done = oom_at is None
    while t < seconds:
        emit(t, "sample", truth.master, worker_pid=truth.master, role="master",
             rss=40 * MiB, uss=12 * MiB, pss=25 * MiB)
        truth.samples += 1
        for slot, w in enumerate(current):
            w["uss"] += int(w["rate"] * 0.5 * rng.uniform(0.5, 1.5))
            truth.peaks[w["pid"]] = max(truth.peaks[w["pid"]], w["uss"])
            emit(t + 0.001 * slot, "sample", truth.master, worker_pid=w["pid"], role="worker",
                 rss=w["uss"] + 30 * MiB, uss=w["uss"], pss=w["uss"] + 8 * MiB)
            truth.samples += 1
            if not oom_done and t >= oom_at and slot == 0:
                oom_done = True
                truth.oom_killed.append(w["pid"])
                emit(t + 0.2, "oom_kill", truth.master, worker_pid=w["pid"], oom_kills=1)
                spawn(slot, t + 0.3)
            elif w["uss"] > soft_limit:
                truth.recycles["worker_memory_limit"] += 1
                emit(t + 0.01, "recycle", w["pid"], reason="worker_memory_limit",
                     uss=w["uss"], limit=soft_limit)
                emit(t + 0.15, "worker_exit", w["pid"])
                spawn(slot, t + 0.2)
        if rng.random() < 0.08:
            status, reason = rng.choice([(413, "body_too_large"), (503, "memory_pressure"),
                                         (400, "malformed_content_length")])
            truth.refusals[(status, reason)] += 1
            emit(t + 0.3, "refusal", current[0]["pid"], status=status, reason=reason)
        t += 0.5
    return out, truth


def write_events(path: Path, events: list[dict[str, Any]], *, shuffle_seed: int | None = 3,
                 tail: str = "") -> Path:
    """Write ``events`` as JSON lines; processes append concurrently, so lines are a
    little out of order (shuffled within small windows); ``tail`` is appended raw (a
    line cut short, for instance)."""
    lines = [json.dumps(e, separators=(",", ":")) for e in events]
    if shuffle_seed is not None:
        rng = random.Random(shuffle_seed)
        for i in range(0, len(lines), 5):
            window = lines[i:i + 5]
            rng.shuffle(window)
            lines[i:i + 5] = window
    path.write_text("\n".join(lines) + "\n" + tail)
    return path
