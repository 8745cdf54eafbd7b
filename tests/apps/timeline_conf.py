"""gunicorn config for :mod:`tests.apps.timeline_app`: limits, lifecycle events, a
sampler in every process, recycling by ``worker.alive = False``, and OOM-kill forensics.

Use: ``gunicorn -c python:tests.apps.timeline_conf tests.apps.timeline_app:app`` with
``MEMGUARD_EVENTS=/path/events.jsonl``.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from memguard import events, recycle, system
from tests.apps.timeline_app import SOFT_LIMIT

SAMPLE_EVERY = 0.25  # seconds between a process's samples of itself

_oom_kills = [0]


def _cgroup() -> system.CgroupMemory | None:
    return system.read_cgroup(system.find_cgroup())


def on_starting(server: Any) -> None:
    cgroup = _cgroup()
    _oom_kills[0] = cgroup.oom_kills if cgroup else 0
    limits: dict[str, int] = {"worker_memory_limit": SOFT_LIMIT}
    if cgroup is not None and cgroup.limit is not None:
        limits["cgroup_limit"] = cgroup.limit
    events.emit("limit", **limits)


def _sample_self(role: str) -> None:
    # Each process reads only its own smaps_rollup. A reader holds the memory of the
    # process it reads until the read ends: were the kernel to OOM-kill a worker during
    # the master's read of it, the master would free that memory after the worker had
    # left the cgroup, and the kernel, seeing a full group and no victim still dying,
    # would kill a second process.
    while True:
        mem = system.process_memory(os.getpid())
        events.emit("sample", role=role, rss=mem.rss, uss=mem.uss, pss=mem.pss)
        threading.Event().wait(SAMPLE_EVERY)


def _start_sampler(role: str) -> None:
    threading.Thread(target=_sample_self, args=(role,), name="timeline-sampler",
                     daemon=True).start()


def when_ready(server: Any) -> None:
    _start_sampler("master")


class AliveRecycler:
    """Recycle after the current response: gunicorn's sync loop stops when ``alive`` is
    false, the worker exits, and the master starts a replacement."""

    def __init__(self) -> None:
        self.requested = False

    def recycle(self, reason: str, figures: dict[str, Any]) -> bool:
        if self.requested:
            return False
        self.requested = True
        return True


def post_worker_init(worker: Any) -> None:
    recycle.set_recycler(AliveRecycler())
    events.emit("worker_start")
    _start_sampler("worker")


def post_request(worker: Any, req: Any, environ: Any, resp: Any) -> None:
    current = recycle.get_recycler()
    if isinstance(current, AliveRecycler) and current.requested:
        worker.log.info("recycling worker %s after its request", worker.pid)
        worker.alive = False


def worker_exit(server: Any, worker: Any) -> None:
    events.emit("worker_exit")


def child_exit(server: Any, worker: Any) -> None:
    # gunicorn does not pass the exit status; the cgroup's counter tells an OOM kill.
    cgroup = _cgroup()
    if cgroup is not None and cgroup.oom_kills > _oom_kills[0]:
        _oom_kills[0] = cgroup.oom_kills
        events.emit("oom_kill", worker_pid=worker.pid, oom_kills=cgroup.oom_kills)
