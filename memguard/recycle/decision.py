"""The one recycle decision: is this worker over its memory limits?

A :class:`RecycleDecision` holds a worker's limits, its USS estimate, the largest step
seen from one request to the next, and the hysteresis that keeps a worker hovering at
its limit from recycling on garbage it can free. Three observers feed it and act on its
answer: the worker after each request (:mod:`memguard.gunicorn.worker`, or the
middleware where no server integration observes requests), and the master's watchdog,
which samples every worker on a timer (:mod:`memguard.gunicorn.watchdog`).

The figure is USS, not RSS: after a fork RSS counts every page still shared with the
master, and recycling on it would replace healthy workers. USS costs a
``smaps_rollup`` read (milliseconds for a big process), so between samples the decision
extrapolates::

    estimate = USS at the last sample + (RSS now - RSS at the last sample)

and asks for a fresh sample only when the estimate nears a limit.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import gc
import os
import platform
import random
from typing import Any

from memguard import system
from memguard.sizes import format_size

__all__ = ["LIMIT_JITTER", "RecycleDecision", "Verdict", "format_figures", "own_uss",
           "pool_over_budget", "release_memory"]

# Each worker's soft limit is lowered by up to this share, drawn once per worker (as
# gunicorn's max_requests_jitter), so workers started together with the same leak do
# not all cross their limit, and restart, in the same instant.
LIMIT_JITTER = 0.05

# The smallest RSS growth between two USS samples.
_RECHECK_MIN_STEP = 1 << 20

@dataclasses.dataclass(frozen=True)
class Verdict:
    """Recycle, for ``reason``, against ``limit``; ``figures`` say why. An urgent
    verdict (a hard limit, the pool's budget, a wait for a replacement that went on too
    long) stops the worker now; a soft one may wait for a replacement to boot first."""

    reason: str
    limit: int
    figures: dict[str, Any]
    urgent: bool = False


# A worker over its soft limit this soon after its start may be warming up, not leaking.
STORM_SECONDS = 5.0
STORM_REQUESTS = 10

class RecycleDecision:
    """One worker's recycle decision (made in the worker, or in the master per worker).

    ``soft``: over it (by USS), the worker is replaced gracefully; ``hard``: over it,
    it is stopped, and a worker recycles early when one more request like its largest
    so far would pass it. ``jitter`` lowers the soft limit by a random share up to it.
    ``soft_reason`` names a soft-limit verdict (the middleware's after-response check
    calls it after its option, ``worker_memory_limit``).
    """

    def __init__(self, soft: int | None, hard: int | None, *, jitter: float = 0.0,
                 soft_reason: str = "soft_limit") -> None:
        self.configured_soft = soft
        self.soft = soft
        if soft is not None and jitter:
            self.soft = int(soft * (1 - random.uniform(0, jitter)))
        self.hard = hard
        self.soft_reason = soft_reason
        self.baseline_uss = 0
        self.baseline_rss = 0
        self.sample_uss = 0
        self.sample_rss = 0
        self.largest_step = 0
        self.born_over = False
        # A soft-limit verdict was given and is being acted on (a replacement boots):
        # from now on only the hard limits are watched.
        self.soft_answered = False
        self.wait_until: int | None = None
        self.observed = 0  # requests observed
        # Growth expected while a replacement boots: a worker whose replacement can boot
        # first asks for it this far ahead of its soft limit (:meth:`due_early`).
        self.lead = 0
        self._last_rss: int | None = None
        self.next_check_rss = 0  # sample at the first observation

    # ---- what the observers feed it ---------------------------------------------------

    def start(self, uss: int, rss: int) -> bool:
        """The worker is ready: its baseline. True when it starts over its soft limit
        (then never recycled for that limit: a replacement would start as big)."""
        self.baseline_uss = self.sample_uss = uss
        self.baseline_rss = self.sample_rss = rss
        self._last_rss = rss
        self.arm()
        self.next_check_rss = 0  # a real sample after the first request too
        if self.soft is not None and uss >= self.soft:
            self.born_over = True
        return self.born_over

    def observe(self, rss: int) -> bool:
        """A request ended with the worker at ``rss``; True when a USS sample is due."""
        self.observed += 1
        last = self._last_rss
        # From the second request on: the first builds caches a replacement would build
        # again.
        if last is not None and self.observed > 1 and rss - last > self.largest_step:
            self.largest_step = rss - last
            self.arm()  # the hard limit's margin moved
        self._last_rss = rss
        return rss >= self.next_check_rss

    def sample(self, uss: int, rss: int) -> None:
        """A fresh USS reading, taken at ``rss``."""
        self.sample_uss, self.sample_rss = uss, rss

    def estimate(self, rss: int) -> int:
        """This worker's USS now, extrapolated from the last sample by RSS."""
        return self.sample_uss + rss - self.sample_rss

    # ---- its answers --------------------------------------------------------------------

    def nearest_limit(self) -> int | None:
        """The soft limit, the hard limit, or the point from which one more request like
        the largest so far would pass the hard limit, whichever comes first."""
        hard = self.hard
        ahead_of_hard = hard - self.largest_step if hard is not None and self.largest_step else None
        soft = None if self.born_over else self.soft
        if self.soft_answered:
            soft = self.wait_limit()
        candidates = [x for x in (soft, hard, ahead_of_hard) if x is not None]
        return min(candidates) if candidates else None

    def near(self, uss: int, ahead: int = 0) -> bool:
        """Close enough to a limit for the full check (collect, trim, read again)."""
        limit = self.nearest_limit()
        return limit is not None and uss + ahead >= limit

    def arm(self) -> None:
        """The RSS at which to sample USS again: halfway to the nearest limit.

        Halving the distance each time costs a handful of smaps reads per worker
        lifetime and keeps the estimate honest while pages shared with the master turn
        private (which USS sees and RSS does not).
        """
        limit = self.nearest_limit()
        soft = self.soft
        if self.lead and soft is not None and self._soft_open():
            limit = min(limit if limit is not None else soft, soft - self.lead)
        if limit is None:
            self.next_check_rss = 1 << 62
            return
        remaining = max(limit - self.sample_uss, 0)
        if remaining > 2 * _RECHECK_MIN_STEP:
            remaining //= 2
        # A worker hovering just under its limit looks again after each MiB, not after
        # each request.
        self.next_check_rss = self.sample_rss + max(remaining, _RECHECK_MIN_STEP)

    def judge(self, uss: int, ahead: int = 0, figures: dict[str, Any] | None = None,
              age: float | None = None) -> Verdict | None:
        """The verdict on a USS read after freeing what can be freed (the hysteresis:
        a worker back under its limits after a collection keeps serving).

        ``ahead`` is the growth still expected from requests in flight; ``age`` the
        seconds since the worker became ready. A worker over its soft limit after its
        first request, or soon after its start by little (:meth:`warmed_over`), is
        marked born over (a lazily built cache, not a leak: its replacement would do
        the same).
        """
        hard, soft = self.hard, self.soft
        figures = {"uss": uss} if figures is None else figures
        if hard is not None and uss + ahead >= hard:
            return Verdict("hard_limit", hard, figures, urgent=True)
        if hard is not None and self.observed > 1 and uss + ahead + self.largest_step >= hard:
            # One more request like the largest so far would take it past the hard
            # limit, where the master stops it mid-request: with steps larger than the
            # gap between the limits every worker would otherwise live to just over it.
            return Verdict("hard_limit_ahead", hard,
                           {"largest_request_growth": self.largest_step, **figures}, urgent=True)
        wait_limit = self.wait_limit()
        if self.soft_answered and wait_limit is not None and uss + ahead >= wait_limit:
            # Its replacement is slow to come: leave now, the pool short one worker.
            return Verdict(self.soft_reason, wait_limit, figures, urgent=True)
        if soft is not None and self._soft_open() and uss + ahead >= soft:
            if self.observed != 1 and not self.warmed_over(uss, age):
                return Verdict(self.soft_reason, soft, figures)
            if uss >= soft:
                self.born_over = True
        self.arm()
        return None

    def due_early(self, uss: int, ahead: int = 0, age: float | None = None) -> bool:
        """Within :attr:`lead` of the soft limit: time to ask for a replacement booted
        first, so that it is ready when this worker reaches its limit, not a boot
        later. Not a verdict: without room for the replacement the worker serves on
        to its limit."""
        soft = self.soft
        return (soft is not None and self.lead > 0 and self._soft_open()
                and self.observed > 1 and uss + ahead + self.lead >= soft
                and not self.warmed_over(uss, age))

    def _soft_open(self) -> bool:
        """The soft limit still applies (set, not born over it, not answered yet)."""
        return self.soft is not None and not self.born_over and not self.soft_answered

    def warmed_over(self, uss: int, age: float | None) -> bool:
        """Over the soft limit within seconds of starting and a few requests, having
        grown by less than half of what it started with: caches a replacement would
        build again, not a leak. Recycling it would only restart the pool over and over
        (a restart storm), so it is treated as born over its limit."""
        return (age is not None and age < STORM_SECONDS and self.observed <= STORM_REQUESTS
                and self.baseline_uss > 0
                and uss - self.baseline_uss < self.baseline_uss // 2)

    def wait_limit(self) -> int | None:
        """Where a worker waiting for its replacement stops waiting."""
        return self.wait_until if self.soft_answered else None

    def answered(self, uss: int, allowance: int) -> None:
        """The soft-limit verdict is being acted on by booting a replacement first: the
        worker may grow by ``allowance`` from ``uss`` while it waits; past that (and
        past the hard limits) it leaves at once."""
        self.soft_answered = True
        self.wait_until = uss + allowance
        self.arm()

    def judge_sample(self, uss: int) -> Verdict | None:
        """The master's look at a worker's sampled USS (no hysteresis: the worker's own
        check has collected already, and the master cannot)."""
        if self.hard is not None and uss >= self.hard:
            return Verdict("hard_limit", self.hard, {"uss": uss}, urgent=True)
        if self.soft is not None and uss >= self.soft:
            return Verdict(self.soft_reason, self.soft, {"uss": uss})
        return None


def pool_over_budget(working_set: int, reserve: int, leaving: int, budget: int,
                     ceiling: int | None) -> tuple[bool, bool]:
    """(should the largest serving worker leave, is the pool past its ceiling).

    Workers already leaving will give their memory back: only if the pool is over its
    budget without them does another go. Past the ceiling their memory is still
    resident, and the largest serving worker leaves whoever else is leaving.
    ``reserve`` is room kept for one booting replacement.
    """
    past_ceiling = ceiling is not None and working_set + reserve >= ceiling
    return past_ceiling or working_set - leaving + reserve >= budget, past_ceiling


_malloc_trim: Any = None
_malloc_trim_loaded = False


def release_memory() -> bool:
    """``gc.collect()``, then glibc's ``malloc_trim(0)``; True if the trim ran."""
    global _malloc_trim, _malloc_trim_loaded
    gc.collect()
    if not _malloc_trim_loaded:
        _malloc_trim_loaded = True
        if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                _malloc_trim = libc.malloc_trim
                _malloc_trim.argtypes = [ctypes.c_size_t]
                _malloc_trim.restype = ctypes.c_int
            except (OSError, AttributeError):
                _malloc_trim = None
    if _malloc_trim is None:
        return False
    _malloc_trim(0)
    return True


def own_uss() -> int | None:
    """This process's USS (``None`` where it cannot be read)."""
    try:
        return system.process_memory(os.getpid()).uss
    except (ProcessLookupError, OSError):
        return None


_SIZE_KEYS = frozenset({"rss", "uss", "pss", "growth", "limit", "hard_limit", "baseline",
                        "figure", "usage", "budget", "swap", "expected_growth", "reserve",
                        "leaving", "ceiling", "largest_request_growth", "worker_estimate",
                        "footprint", "room", "lead"})


def format_figures(figures: dict[str, Any]) -> str:
    """``uss=81.2MiB limit=80.0MiB requests=37``: sizes in bytes are formatted."""
    parts = []
    for key, value in figures.items():
        if isinstance(value, int) and not isinstance(value, bool) and (
            key in _SIZE_KEYS or key.endswith(("_bytes", "_limit"))
        ):
            parts.append(f"{key}={format_size(value)}")
        else:
            parts.append(f"{key}={value}")
    return " ".join(parts) or "-"
