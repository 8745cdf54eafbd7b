"""Run inside a memory cgroup: does a worker's pool check recycle it while the other
workers are already leaving? Prints one JSON line per step.

The process plays the last serving worker of a pool whose three others are recycling
(their figures in the shared slot table, as they publish them). It fills the group with
real, resident memory in 1 MiB steps up to a working set just past the pool's budget,
then just past its ceiling, and runs the worker's own pool check at each.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import types
from typing import Any

from memguard import recycle
from memguard.gunicorn import slots as slot_states
from memguard.gunicorn.limits import resolve_limits
from memguard.gunicorn.slots import SlotTable
from memguard.gunicorn.worker import WorkerMonitor

MIB = 1 << 20


class Recorder:
    def __init__(self) -> None:
        self.reasons: list[str] = []
        self.figures: list[dict[str, Any]] = []

    def recycle(self, reason: str, figures: dict[str, Any]) -> bool:
        self.reasons.append(reason)
        self.figures.append(figures)
        return True


def main() -> None:
    leaving_each = int(sys.argv[1]) * MIB
    limits = resolve_limits({}, environ={})  # the budget: 90% of this group's limit
    assert limits.total is not None and limits.ceiling is not None
    table = SlotTable()
    for age in (1, 2, 3):
        table.reset(age, 100_000 + age, slot_states.RECYCLING)
        table.set_figures(age, leaving_each, 30)
    recorder = Recorder()
    recycle.set_recycler(recorder)
    worker = types.SimpleNamespace(age=0, log=logging.getLogger("test"))
    monitor = WorkerMonitor(worker, limits, table, recorder)
    monitor.ready()
    assert monitor._pool is not None
    kept: list[bytes] = []
    for name, target in (("budget", limits.total), ("ceiling", limits.ceiling)):
        while True:
            working_set = monitor._pool.working_set() or 0
            if working_set + monitor.decision.baseline_uss >= target + MIB:
                break
            kept.append(os.urandom(16) * (MIB // 16))
        monitor._last_pool_check = 0.0
        monitor._pool_check()
        print(json.dumps({"step": name, "working_set": working_set,
                          "reserve": monitor.decision.baseline_uss, "budget": limits.total,
                          "ceiling": limits.ceiling, "container": limits.container,
                          "recycles": recorder.reasons, "figures": recorder.figures}),
              flush=True)


if __name__ == "__main__":
    main()
