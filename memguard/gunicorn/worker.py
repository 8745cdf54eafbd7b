"""The worker's own check, after each request: is this worker over its memory limit?

The figure is the worker's own memory (USS), not its RSS: after a fork RSS counts every
page still shared with the master. USS costs a ``smaps_rollup`` read (milliseconds for a
big process), so it is sampled once when the worker is ready and again only when the
cheap figure says the limit may be near:

    estimate = USS at the last sample + (RSS now - RSS at the last sample)

RSS comes from one ``pread`` of ``/proc/self/statm`` (about 2 us), and the per-request
path is that read and one comparison against a precomputed RSS threshold. When the
threshold is crossed, the worker collects garbage and returns free heap to the system
(``malloc_trim``), then reads its real USS: it recycles only if it is still over
(hysteresis). Pages the master shares with it that become private (copy-on-write) do
not show in RSS; the master's watchdog, which reads every worker's USS each second,
catches those.
"""

from __future__ import annotations

import atexit
import ctypes
import ctypes.util
import gc
import logging
import os
import platform
import random
import sys
import threading
import time
from typing import Any

from memguard import events, probes, recycle
from memguard.gunicorn import slots as slot_states
from memguard.gunicorn.limits import Limits
from memguard.gunicorn.slots import SlotTable
from memguard.sizes import format_size

__all__ = ["WorkerMonitor", "exit_without_teardown", "release_memory"]

# Each worker's soft limit is lowered by up to this share, drawn once per worker (as
# gunicorn's max_requests_jitter), so workers started together with the same leak do
# not all cross their limit, and restart, in the same instant.
LIMIT_JITTER = 0.05

# The smallest RSS growth between two USS samples.
_RECHECK_MIN_STEP = 1 << 20
# While the cgroup's usage is over the pool's budget, the working set is read at most
# this often.
_POOL_CHECK_SECONDS = 0.01


def working_set_bytes(reader: probes.CgroupMemoryReader) -> int | None:
    """The cgroup's usage minus the inactive page cache the kernel can drop."""
    usage = reader.usage()
    info = reader.info
    if usage is None or info is None:
        return usage
    name = "total_inactive_file" if info.version == 1 else "inactive_file"
    try:
        with open(info.directory / "memory.stat", "rb") as f:
            for line in f:
                if line.startswith(name.encode() + b" "):
                    return max(usage - int(line.split()[1]), 0)
    except (OSError, ValueError):
        pass
    return usage

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


def exit_without_teardown(code: int = 0) -> None:
    """End this process the way multiprocessing ends its children: atexit handlers, then
    non-daemon threads joined, logs and standard streams flushed, then ``os._exit``.

    What is skipped is the interpreter's teardown, which clears every module and frees
    every object: in a forked worker each refcount it writes turns a page shared with
    the master private, 45 ms of CPU per exit measured here, paid on every recycle.
    """
    try:
        atexit._run_exitfuncs()
        # Joins non-daemon threads and runs concurrent.futures' exit hook, as the
        # interpreter would; private, but what multiprocessing calls too.
        shutdown = getattr(threading, "_shutdown", None)
        if shutdown is not None:
            shutdown()
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (AttributeError, OSError, ValueError):
                pass
    finally:
        os._exit(code)


class WorkerMonitor:
    """One per worker process, made in ``post_fork``."""

    def __init__(self, worker: Any, limits: Limits, slots: SlotTable,
                 recycler: recycle.Recycler) -> None:
        self.worker = worker
        self.limits = limits
        self.slots = slots
        self.recycler = recycler
        self.age: int = worker.age
        self.requests = 0
        self.in_flight = 0
        self.pending = 0
        self.rate = 0.0  # bytes of RSS kept per request, on average, since ready
        # The largest RSS growth from one request to the next (from the second request
        # on: the first builds caches a replacement would build again).
        self.largest_step = 0
        self._last_rss = 0
        self.ready_at = time.monotonic()
        self.baseline_uss = 0
        self.baseline_rss = 0
        self.sample_uss = 0
        self.sample_rss = 0
        self.soft = limits.soft
        if self.soft is not None:
            self.soft = int(self.soft * (1 - random.uniform(0, LIMIT_JITTER)))
        self.born_over = False
        self.recycling = False
        self._next_check_rss = 1 << 62
        self._last_pool_check = 0.0
        self._pool: probes.CgroupMemoryReader | None = None
        self._pool_threshold = 1 << 62
        if limits.total is not None:
            reader = probes.CgroupMemoryReader()
            if reader.usage() is not None:
                self._pool = reader
                self._pool_threshold = limits.total

    # ---- lifecycle ------------------------------------------------------------------

    def ready(self) -> None:
        """The worker has loaded the app: take the baseline.

        A collection first. Forked from a ``--preload`` master, the worker shares every
        object the app made at import; the first full collection writes to each one's GC
        header and turns those pages private (measured: a preloaded FastAPI app's worker
        grew by 10 MiB of USS that RSS never showed). Left for later, that collection is
        the one :meth:`_check` runs at the soft limit, in every worker at about the same
        moment, and the pool passes its limit by that much times the workers. Taken now,
        the baseline holds it and the RSS-based estimate stays honest. Objects frozen
        before the fork (``MEMGUARD_GC_FREEZE``) are not visited: nothing turns private.

        Without ``--preload`` the worker imported the app itself and shares only the
        master's few MiB (gunicorn, memguard, the config): not worth 13 ms of CPU on
        every boot (measured), which a recycling pool pays dozens of times a minute.
        """
        self.ready_at = time.monotonic()
        if getattr(getattr(self.worker, "cfg", None), "preload_app", True):
            gc.collect()
        uss, rss = self._uss(), probes.current_rss()
        self.baseline_uss = self.sample_uss = uss
        self.baseline_rss = self.sample_rss = self._last_rss = rss
        self.slots.set_figures(self.age, uss, 0)
        self.slots.set_state(self.age, slot_states.SERVING)
        events.emit("worker_start", role="worker", rss=rss, uss=uss, soft_limit=self.soft,
                    hard_limit=self.limits.hard)
        if self.soft is not None and uss >= self.soft:
            self._born_over(uss, "when it became ready")
        self._arm()
        self._next_check_rss = 0  # sample again after the first request

    def _arm(self) -> None:
        """The RSS at which to look at USS again: halfway to the nearest limit.

        Halving the distance each time costs a handful of smaps reads per worker
        lifetime and keeps the estimate honest while pages shared with the master turn
        private (which USS sees and RSS does not).
        """
        limit = self._nearest_limit()
        if limit is None:
            self._next_check_rss = 1 << 62
            return
        remaining = max(limit - self.sample_uss, 0)
        if remaining > 2 * _RECHECK_MIN_STEP:
            remaining //= 2
        # A worker hovering just under its limit looks again after each MiB, not after
        # each request.
        remaining = max(remaining, _RECHECK_MIN_STEP)
        self._next_check_rss = self.sample_rss + remaining

    def _nearest_limit(self) -> int | None:
        """The soft limit, the hard limit, or the point from which one more request like
        the largest so far would pass the hard limit, whichever comes first."""
        hard = self.limits.hard
        ahead_of_hard = hard - self.largest_step if hard is not None and self.largest_step else None
        candidates = [x for x in (None if self.born_over else self.soft, hard, ahead_of_hard)
                      if x is not None]
        return min(candidates) if candidates else None

    # ---- the per-request path --------------------------------------------------------

    def before_request(self, path: str | None = None) -> None:
        self.in_flight += 1
        if path is not None:
            # For the master's report should the kernel kill this worker.
            self.slots.note_request(self.age, path)

    def after_request(self) -> None:
        """Called after every request; microseconds unless the threshold is crossed.

        With other requests still to run in this worker (gthread, asgi), each will
        likely keep what requests have kept on average so far, and a recycle lets them
        finish: the check counts that growth ahead, or the worker would pass its limit
        by ``pending x growth per request`` while it drains. Pending are the requests
        started and not finished, or, where the worker counts them (gthread's and the
        asgi worker's ``nr_conns``), the connections it has accepted, which include
        those queued for a thread.
        """
        self.in_flight = max(self.in_flight - 1, 0)
        self.requests += 1
        if self.recycling:
            return
        rss = probes.current_rss()
        if self.requests > 1 and rss - self._last_rss > self.largest_step:
            self.largest_step = rss - self._last_rss
            self._arm()  # the hard limit's margin moved (rare: a new largest step)
        self._last_rss = rss
        # The figure the other workers and the master read (largest worker, last known
        # memory): the estimate, about a third of a microsecond to publish.
        self.slots.set_figures(self.age, self.sample_uss + rss - self.sample_rss, self.requests)
        # The connection of this request is still open and counted in nr_conns.
        self.pending = max(self.in_flight, getattr(self.worker, "nr_conns", 0) - 1)
        if self.pending > 0:
            # Pending requests have already kept part of their share: count them in.
            self.rate = max(rss - self.baseline_rss, 0) / (self.requests + self.in_flight)
            rss += int(self.pending * self.rate)
        if rss >= self._next_check_rss:
            self._checkpoint(probes.current_rss())
        if self._pool is not None and not self.recycling:
            usage = self._pool.usage()
            if usage is not None and usage >= self._pool_threshold:
                self._pool_check()

    def _ahead(self) -> int:
        """Growth expected from the requests still to run in this worker."""
        return int(self.pending * self.rate)

    def _pool_check(self) -> None:
        """The cgroup's usage passed the pool's budget: is this worker the one to go?

        Usage counts page cache the kernel can drop, so the decision uses the working
        set (usage minus inactive file pages, as the kubelet does), read at most every
        ten milliseconds. The largest serving worker, by the figures every worker
        publishes in the shared table, recycles; room is kept for its replacement.
        """
        now = time.monotonic()
        if now - self._last_pool_check < _POOL_CHECK_SECONDS:
            return
        self._last_pool_check = now
        assert self.limits.total is not None and self._pool is not None
        working_set = working_set_bytes(self._pool)
        reserve = self.baseline_uss
        if working_set is None or working_set + reserve < self.limits.total:
            return  # page cache the kernel can drop: no smaps read for that
        uss = self._uss()
        self.sample_uss, self.sample_rss = uss, probes.current_rss()
        self.slots.set_figures(self.age, uss, self.requests)
        leaving, largest = self.slots.pool_view(self.age)
        if uss < largest:
            return
        # Workers already recycling will give their memory back: only if the pool is
        # over its budget without them does another one go. This, not a count of
        # concurrent recycles, keeps a pool under pressure from recycling every worker
        # at once, and never holds back the recycle that memory needs. Until the
        # ceiling: their memory is resident until they exit, and past it the largest
        # serving worker stops taking requests whoever else is leaving.
        ceiling = self.limits.ceiling
        past_ceiling = ceiling is not None and working_set + reserve >= ceiling
        if working_set - leaving + reserve < self.limits.total and not past_ceiling:
            return
        figures: dict[str, Any] = {"uss": uss, "usage": working_set, "leaving": leaving,
                                   "reserve": reserve, "budget": self.limits.total,
                                   "requests": self.requests}
        if past_ceiling:
            figures["ceiling"] = ceiling
        self._recycle("pool_budget", **figures)

    def _checkpoint(self, rss: int) -> None:
        """A fresh USS sample; the full check only if it says the limit is reached."""
        uss = self._uss()
        self.sample_uss, self.sample_rss = uss, rss
        self.slots.set_figures(self.age, uss, self.requests)
        limit = self._nearest_limit()
        if limit is not None and uss + self._ahead() >= limit:
            self._check(rss)
        else:
            self._arm()

    def _check(self, rss: int) -> None:
        now = time.monotonic()
        hard = self.limits.hard
        release_memory()
        uss = self._uss()
        rss_after = probes.current_rss()
        self.sample_uss, self.sample_rss = uss, rss_after
        self.slots.set_figures(self.age, uss, self.requests)
        ahead = self._ahead()
        figures: dict[str, Any] = {
            "uss": uss, "rss": rss_after, "growth": rss_after - self.baseline_rss,
            "baseline": self.baseline_uss, "requests": self.requests,
            "age_seconds": round(now - self.ready_at, 2),
        }
        if ahead:
            figures.update(pending=self.pending, expected_growth=ahead)
        if hard is not None and uss + ahead >= hard:
            self._recycle("hard_limit", limit=hard, **figures)
            return
        if hard is not None and self.requests > 1 and uss + ahead + self.largest_step >= hard:
            # One more request like the largest so far would take it past the hard
            # limit, where the master stops it mid-request: with steps larger than the
            # gap between the limits, every worker would otherwise live to just over the
            # hard limit, all of them together past the pool's budget (measured: an OOM
            # kill in 3,000 requests keeping 24 MiB every 25th, limits 81/97 MiB).
            self._recycle("hard_limit_ahead", limit=hard, largest_request_growth=self.largest_step,
                          **figures)
            return
        if self.soft is not None and not self.born_over and uss + ahead >= self.soft:
            if self.requests > 1:
                self._recycle("soft_limit", limit=self.soft, **figures)
                return
            if uss >= self.soft:
                # Over the limit after its first request: a lazily built cache, not a
                # leak. A replacement would do the same, so recycling would loop.
                self._born_over(uss, "after its first request")
        # Under the limit after collecting and trimming: keep serving (hysteresis).
        self._arm()

    def _recycle(self, reason: str, **figures: Any) -> None:
        self.recycling = True
        self.slots.set_state(self.age, slot_states.RECYCLING)
        # False when someone else (the middleware, a signal) already started one.
        recycle.request_recycle(reason, **figures)

    def _born_over(self, uss: int, when: str) -> None:
        self.born_over = True
        self.slots.set_state(self.age, slot_states.BORN_OVER)
        assert self.soft is not None
        limit = format_size(self.limits.soft)
        first = self.slots.claim_once(SlotTable.FLAG_BORN_OVER)
        say = self.worker.log.warning if first else self.worker.log.debug
        hard = self.limits.hard
        say("memguard: worker %s is over its memory limit %s %s (uss %s); not recycling "
            "it for that limit, since a replacement would start as big: raise "
            "MEMGUARD_WORKER_MEMORY_LIMIT or lower the app's footprint%s",
            os.getpid(), limit, when, format_size(uss),
            "" if hard is None else f" (the hard limit {format_size(hard)} still applies)")

    def _uss(self) -> int:
        try:
            mem = probes.process_memory(os.getpid())
        except (ProcessLookupError, OSError):
            return probes.current_rss()
        return mem.uss if mem.uss is not None else mem.rss
