"""The gunicorn integration's options, turned into byte figures for this container."""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Mapping
from typing import Any

from memguard import config, system
from memguard.sizes import format_size, parse_size

__all__ = ["OPTION_ALIASES", "OVERLAP_RESERVE", "Limits", "derive_worker_limits",
           "overlap_room", "resolve_limits"]

# The worker limits are the memory section's settings (one MEMGUARD_* variable, one
# setting): the master and the middleware in its workers read the same values.
WORKER_LIMITS = ("worker_memory_limit", "worker_memory_hard_limit")

# install(globals(), max_concurrent_recycles=2) reads better than the registry's prefixed
# names; the worker limits' former gunicorn_ names are still accepted.
OPTION_ALIASES = {
    **{name.removeprefix("gunicorn_"): name
       for name, s in config.SETTINGS.items() if s.section == "gunicorn"},
    **{f"gunicorn_{name}": name for name in WORKER_LIMITS},
}
_KNOWN = frozenset(OPTION_ALIASES) | frozenset(OPTION_ALIASES.values())

# The pool's default budget: this share of the cgroup's limit, leaving the rest to the
# page cache the kernel needs and to what the master and the kernel account late.
DEFAULT_TOTAL_SHARE = 0.9


@dataclasses.dataclass(frozen=True)
class Limits:
    soft: int | None  # a worker's USS over which it is recycled gracefully
    hard: int | None  # a worker's USS over which the master stops it
    total: int | None  # the pool's budget
    total_source: str
    container: int  # the container's limit (or the host's RAM) percentages refer to
    container_source: str
    grace: float
    interval: float
    max_concurrent: int
    min_lifetime: float
    gc_freeze: bool
    fast_exit: bool = True
    gc_freeze_at_fork: bool = True
    # Neither worker limit was given (not even "off"): they are derived from the pool's
    # budget once the worker count is known (derive_worker_limits).
    derive: bool = False
    worker_source: str = "configured"

    @property
    def ceiling(self) -> int | None:
        """The pool's working set past which its largest serving worker leaves even while
        others are already leaving: halfway from the budget to the container's limit.

        Under the budget, workers already recycling count as gone (one leaves at a time);
        but they drain, their last requests still growing, and under CPU starvation that
        takes tenths of a second while the serving workers grow: the kernel counts what
        is resident, not what is about to be freed.
        """
        if self.total is None:
            return None
        return self.total + max(self.container - self.total, 0) // 2

    def describe(self) -> str:
        def size(value: int | None) -> str:
            return "none" if value is None else format_size(value)

        derived = "" if self.worker_source in ("configured", "not set") else (
            f"; worker limits {self.worker_source}")
        return (f"worker soft limit {size(self.soft)}, hard limit {size(self.hard)}, "
                f"pool budget {size(self.total)} "
                f"({self.total_source}); container limit {format_size(self.container)} "
                f"({self.container_source}){derived}")


def normalize_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """Accept ``max_concurrent_recycles`` as well as ``gunicorn_max_concurrent_recycles``
    (and the worker limits' former ``gunicorn_`` names)."""
    return {OPTION_ALIASES.get(k, k): v for k, v in options.items()}


def resolve_limits(
    options: Mapping[str, Any],
    environ: Mapping[str, str] | None = None,
    cgroup: system.CgroupMemory | None = None,
) -> Limits:
    """Read the options (keyword > ``MEMGUARD_*`` environment > default) into bytes.

    Raises ``TypeError`` for an unknown option and ``ValueError`` for a bad value or a
    hard limit that is not above the soft one.
    """
    for key in options:
        if key not in _KNOWN:
            close = difflib.get_close_matches(key, _KNOWN, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise TypeError(f"unknown memguard gunicorn option {key!r}{hint}")
    normalized = normalize_options(options)
    # The memory section too: its worker limits, and its rules (checked here, in the
    # master, before any worker starts).
    values = config.resolve(["gunicorn", "memory"], normalized, environ)
    memory = config.MemoryOptions.from_values(values)
    opts = config.GunicornOptions.from_values(values)
    env = os.environ if environ is None else environ
    # "off" turns the default budget off; only an option never given gets the default.
    total_given = ("gunicorn_total_memory_limit" in normalized
                   or "MEMGUARD_TOTAL_MEMORY_LIMIT" in env)
    if cgroup is None:
        cgroup = system.read_cgroup()
    budget = system.memory_budget(cgroup)
    container = budget.limit

    def size(raw: int | str | None) -> int | None:
        if raw is None or raw == "auto":  # the master derives no limit of its own
            return None
        # A percentage of the container's limit, or of the host's RAM without one: the
        # total the middleware uses too (admission.derive_worker_limits).
        return parse_size(raw, total=container)

    soft = size(memory.worker_memory_limit)
    hard = size(memory.worker_memory_hard_limit)
    total = size(opts.total_memory_limit)
    total_source = "configured"
    if total is None and total_given:
        total_source = "turned off"
    elif total is None and budget.constrained:
        total = int(container * DEFAULT_TOTAL_SHARE)
        total_source = f"{int(DEFAULT_TOTAL_SHARE * 100)}% of the cgroup limit"
    elif total is None:
        total_source = "no cgroup limit"
    # Zero configuration: both worker limits left at "auto" under a budget are derived
    # once the worker count is known (derive_worker_limits, in the master's on_starting).
    derive = (memory.worker_memory_limit == "auto" and memory.worker_memory_hard_limit == "auto"
              and total is not None)
    if soft is not None and hard is not None and hard <= soft:
        # A size against a percentage: the registry's rule could not compare them.
        raise ValueError(
            f"memguard option {config.describe('worker_memory_hard_limit')} "
            f"({format_size(hard)}) must be above {config.describe('worker_memory_limit')} "
            f"({format_size(soft)})"
        )
    return Limits(
        soft=soft, hard=hard, total=total, total_source=total_source,
        container=container, container_source=budget.source,
        grace=opts.hard_limit_grace, interval=opts.watchdog_interval,
        max_concurrent=opts.max_concurrent_recycles, min_lifetime=opts.min_worker_lifetime,
        gc_freeze=opts.gc_freeze, fast_exit=opts.fast_exit,
        gc_freeze_at_fork=opts.gc_freeze_at_fork,
        derive=derive, worker_source="configured" if not derive else "not set",
    )


# Derived limits: the pool's budget is shared by the workers and one replacement that
# boots beside a worker it replaces; the hard limit is this much above the soft one.
DERIVED_HARD_SHARE = 1.25


def derive_worker_limits(limits: Limits, workers: int) -> Limits:
    """Worker limits from the pool's budget, for a pool given none (zero configuration).

    Each of ``workers`` and one replacement gets an equal share of the budget: the soft
    limit. The hard limit is a quarter above it; with a worker's largest step so far
    kept below it (the decision recycles a worker one such step ahead), the pool stays
    under its budget even when every worker is at its soft limit and one replacement
    boots. Explicit settings are never touched.
    """
    if not limits.derive or limits.total is None or workers < 1:
        return limits
    soft = limits.total // (workers + 1)
    hard = int(soft * DERIVED_HARD_SHARE)
    return dataclasses.replace(
        limits, soft=soft, hard=hard,
        worker_source=(f"derived: the pool budget {format_size(limits.total)} shared by "
                       f"{workers} workers and one replacement; set "
                       "MEMGUARD_WORKER_MEMORY_LIMIT to choose"))


# Share of the pool's budget an overlap (a replacement booting beside the worker it
# replaces) must leave free: serving workers pass their soft limit by up to a request's
# growth before they notice, and more of them do while an overlap lasts under load.
OVERLAP_RESERVE = 0.15


def overlap_room(total: int, working_set: int, figures: int, committed: int,
                 footprint: int) -> int | None:
    """Bytes the pool's budget ``total`` has left for one more worker of ``footprint``
    (``None``: no room), with every worker at what it may reach (``committed``, see
    :meth:`~memguard.gunicorn.slots.SlotTable.commitments`). What the cgroup holds beyond
    the workers' own ``figures`` (the master, page cache the kernel keeps) stays. The
    worker asking and the master answering both judge by this, so a worker never waits
    for an answer that is bound to be no."""
    left = (total - max(working_set - figures, 0) - committed - footprint
            - int(total * OVERLAP_RESERVE))
    return left if left >= 0 else None
