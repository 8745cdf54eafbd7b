"""The worker's own check, after each request: it feeds this worker's
:class:`~memguard.recycle.RecycleDecision` and acts on its verdict.

The per-request path is one ``pread`` of ``/proc/self/statm`` and one comparison
against the RSS at which the decision wants a fresh USS sample. When the sample says a
limit is near, the worker collects garbage and returns free heap to the system
(``malloc_trim``), reads its USS again and asks the decision (hysteresis: it recycles
only if still over). Pages the master shares with it that turn private (copy-on-write)
do not show in RSS; the master's watchdog, which reads every worker's USS on a timer,
catches those.
"""

from __future__ import annotations

import atexit
import gc
import logging
import os
import sys
import threading
import time
from typing import Any

from memguard import events, recycle, system
from memguard.gunicorn import slots as slot_states
from memguard.gunicorn.limits import Limits, overlap_room
from memguard.gunicorn.slots import Doorbell, SlotTable
from memguard.sizes import format_size

__all__ = ["WorkerMonitor", "exit_without_teardown"]

# Growth allowed on top of the expected one while a replacement boots (the estimate's
# own error: a sample is one request behind).
_RECHECK_MARGIN = 2 << 20
# A fresh USS sample once RSS has moved this much since the last one.
_SAMPLE_STEP = 1 << 20
# An early ask is not retried closer to the limit than this.
_EARLY_MIN_LEAD = 2 << 20
# While the cgroup's usage is over the pool's budget, the working set is read at most
# this often.
_POOL_CHECK_SECONDS = 0.01


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
    """One per worker process, made in ``post_fork``: feeds this worker's recycle
    decision after each request and asks the server for the recycle it decides."""

    def __init__(self, worker: Any, limits: Limits, slots: SlotTable,
                 recycler: recycle.Recycler, doorbell: Doorbell | None = None) -> None:
        self.worker = worker
        # With the master's watchdog running, a soft-limit recycle asks it for a
        # replacement (booted first when the budget has room) instead of leaving now.
        self.doorbell = doorbell
        self.asked: recycle.Verdict | None = None
        # Share of a boot's growth to ask ahead by: cut each time an early ask finds no
        # room, so that the next is tried later (not at every sample, a USS read each).
        self.lead_share = 1.0
        self.asked_at = 0.0
        # From fork to ready: what a replacement will take to boot (post_fork sets it).
        self.started_at = time.monotonic()
        self.boot_seconds = 0.0
        self.limits = limits
        self.slots = slots
        self.recycler = recycler
        self.age: int = worker.age
        self.requests = 0
        self.in_flight = 0
        self.pending = 0
        self.burst = 0  # the most requests seen pending at once, in this pool
        # Bytes of RSS kept per request, on average, from the end of the first request
        # (which builds the caches a replacement builds again, not a leak).
        self.rate = 0.0
        self.first_rss = 0
        self.ready_at = time.monotonic()
        self.decision = recycle.RecycleDecision(limits.soft, limits.hard,
                                                jitter=recycle.LIMIT_JITTER)
        self.recycling = False
        self._last_pool_check = 0.0
        self._pool: system.CgroupMemoryReader | None = None
        self._pool_threshold = 1 << 62
        if limits.total is not None:
            reader = system.CgroupMemoryReader()
            if reader.usage() is not None:
                self._pool = reader
                self._pool_threshold = limits.total

    @property
    def soft(self) -> int | None:
        """This worker's soft limit (the configured one, lowered by its jitter)."""
        return self.decision.soft

    # ---- lifecycle ------------------------------------------------------------------

    def ready(self) -> None:
        """The worker has loaded the app: take the baseline.

        A collection first. Forked from a ``--preload`` master, the worker shares every
        object the app made at import; the first full collection writes to each one's GC
        header and turns those pages private (a preloaded FastAPI app's worker grows by
        MiBs of USS that RSS never shows). Left for later, that collection is the one
        the check runs at the soft limit, in every worker at about the same moment, and
        the pool passes its limit by that much times the workers. Taken now, the
        baseline holds it and the RSS-based estimate stays honest. Objects frozen
        before the fork (``MEMGUARD_GC_FREEZE``) are not visited: nothing turns private.

        Without ``--preload`` the worker imported the app itself and shares only the
        master's few MiB (gunicorn, memguard, the config): not worth a collection on
        every boot, which a recycling pool pays dozens of times a minute.
        """
        self.ready_at = time.monotonic()
        self.boot_seconds = self.ready_at - self.started_at
        if getattr(getattr(self.worker, "cfg", None), "preload_app", True):
            gc.collect()
        self.burst = self.slots.burst()
        uss, rss = self._uss(), system.current_rss()
        born_over = self.decision.start(uss, rss)
        self.slots.set_figures(self.age, uss, 0)
        self.slots.set_state(self.age, slot_states.SERVING)
        events.emit("worker_start", role="worker", rss=rss, uss=uss, soft_limit=self.soft,
                    hard_limit=self.limits.hard)
        if born_over:
            self._born_over(uss, "when it became ready")
        self._ring()  # a replacement the master waits for is ready

    def _ring(self) -> None:
        if self.doorbell is not None:
            self.doorbell.ring()

    def retire(self) -> None:
        """The master says go (its replacement is ready, or there is no room to boot
        one first): recycle now, for the reason this worker asked."""
        asked = self.asked
        if self.recycling or asked is None:
            return
        way = slot_states.WAY_NAMES.get(self.slots.way(self.age), "stop_then_start")
        rss = system.current_rss()
        # The figures now, not when it asked: it kept serving while it waited.
        figures = {**asked.figures, "uss": self.decision.estimate(rss), "rss": rss,
                   "requests": self.requests,
                   "waited_seconds": round(time.monotonic() - self.asked_at, 2)}
        self._recycle(asked.reason, limit=asked.limit, way=way, **figures)

    # ---- the per-request path --------------------------------------------------------

    def before_request(self, path: str | None = None) -> None:
        self.in_flight += 1
        if path is not None:
            # For the master's report should the kernel kill this worker.
            self.slots.note_request(self.age, path)

    def after_request(self) -> None:
        """Called after every request; microseconds unless a USS sample is due.

        With other requests still to run in this worker (gthread, asgi), each will
        likely keep what requests have kept on average so far, and a recycle lets them
        finish: the check counts that growth ahead (see :meth:`_ahead`), or the worker
        would pass its limit by ``pending x growth per request`` while it drains.
        Pending are the requests
        started and not finished, or, where the worker counts them (gthread's and the
        asgi worker's ``nr_conns``), the connections it has accepted, which include
        those queued for a thread.
        """
        self.in_flight = max(self.in_flight - 1, 0)
        self.requests += 1
        if self.recycling:
            return
        decision = self.decision
        rss = system.current_rss()
        due = decision.observe(rss)
        # The figure the other workers and the master read (largest worker, last known
        # memory): the estimate, about a third of a microsecond to publish.
        self.slots.set_figures(self.age, decision.estimate(rss), self.requests)
        # The connection of this request is still open and counted in nr_conns.
        self.pending = max(self.in_flight, getattr(self.worker, "nr_conns", 0) - 1)
        if self.pending > self.burst:
            self.burst = self.pending
            self.slots.raise_burst(self.pending)
        if self.requests == 1:
            self.first_rss = rss
        elif self.burst:
            # Pending requests have already kept part of their share: count them in.
            self.rate = max(rss - self.first_rss, 0) / (self.requests - 1 + self.in_flight)
            due = due or rss + self._ahead() >= decision.next_check_rss
        if due:
            self._checkpoint(rss)
        if self._pool is not None and not self.recycling:
            usage = self._pool.usage()
            if usage is not None and usage >= self._pool_threshold:
                self._pool_check()

    def _ahead(self) -> int:
        """Growth expected from the requests still to run in this worker: as many as the
        pool's largest burst, not only those pending now. An event-loop worker accepts
        a burst of connections in one go, between two checks; once accepted they run
        and keep their share whatever the check decides, so a worker that waited for
        the burst to show would pass its limit by that much."""
        return int(self.burst * self.rate)

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
        working_set = self._pool.working_set()
        reserve = self.decision.baseline_uss
        if working_set is None or working_set + reserve < self.limits.total:
            return  # page cache the kernel can drop: no smaps read for that
        uss = self._uss()
        self.decision.sample(uss, system.current_rss())
        self.slots.set_figures(self.age, uss, self.requests)
        leaving, largest = self.slots.pool_view(self.age)
        if uss < largest:
            return
        # This, not a count of concurrent recycles, keeps a pool under pressure from
        # recycling every worker at once, and never holds back the recycle that memory
        # needs.
        go, past_ceiling = recycle.pool_over_budget(
            working_set, reserve, leaving, self.limits.total, self.limits.ceiling)
        if not go:
            return
        figures: dict[str, Any] = {"uss": uss, "usage": working_set, "leaving": leaving,
                                   "reserve": reserve, "budget": self.limits.total,
                                   "requests": self.requests}
        if past_ceiling:
            figures["ceiling"] = self.limits.ceiling
        self._recycle("pool_budget", way="stop_then_start", **figures)

    def _checkpoint(self, rss: int) -> None:
        """A fresh USS sample; the full check only if the decision says a limit is near,
        and a replacement asked for early when one could boot first."""
        decision = self.decision
        if abs(rss - decision.sample_rss) >= _SAMPLE_STEP:
            uss = self._uss()
            decision.sample(uss, rss)
        else:
            # Near a limit, with requests in flight counted ahead, a check may be due at
            # every request: the estimate serves until RSS moves (a USS read costs
            # milliseconds in a big worker).
            uss = decision.estimate(rss)
        self.slots.set_figures(self.age, uss, self.requests)
        age = time.monotonic() - self.ready_at
        if self.doorbell is not None and self.boot_seconds > 0:
            # What it grows while a replacement boots: asked for that far ahead, the
            # replacement is ready when this worker reaches its limit.
            decision.lead = int(self._growth_per_second(rss) * self.boot_seconds
                                * self.lead_share)
        ahead = self._ahead()
        if decision.near(uss, ahead):
            self._check()
        elif self.asked is None and decision.due_early(uss, ahead, age):
            figures = {"uss": uss, "rss": rss, "growth": rss - decision.baseline_rss,
                       "baseline": decision.baseline_uss, "requests": self.requests,
                       "age_seconds": round(age, 2), "lead": decision.lead}
            assert decision.soft is not None
            self._ask_for_replacement(
                recycle.Verdict(decision.soft_reason, decision.soft, figures), early=True)
        else:
            decision.arm()

    def _check(self) -> None:
        """Collect, trim, read USS again, and act on the decision's verdict."""
        decision = self.decision
        recycle.release_memory()
        uss = self._uss()
        rss_after = system.current_rss()
        decision.sample(uss, rss_after)
        self.slots.set_figures(self.age, uss, self.requests)
        ahead = self._ahead()
        figures: dict[str, Any] = {
            "uss": uss, "rss": rss_after, "growth": rss_after - decision.baseline_rss,
            "baseline": decision.baseline_uss, "requests": self.requests,
            "age_seconds": round(time.monotonic() - self.ready_at, 2),
        }
        if ahead:
            figures.update(pending=self.pending, burst=self.burst, expected_growth=ahead)
        was_born_over = decision.born_over
        age = time.monotonic() - self.ready_at
        verdict = decision.judge(uss, ahead, figures, age=age)
        if verdict is None:
            if decision.born_over and not was_born_over:
                self._born_over(uss, f"{age:.1f}s after it started, after {self.requests} "
                                f"request(s) (it started at "
                                f"{format_size(decision.baseline_uss)})")
        elif verdict.urgent or self.doorbell is None:
            self._recycle(verdict.reason, limit=verdict.limit,
                          way="stop_then_start", **verdict.figures)
        elif self.asked is None:
            self._ask_for_replacement(verdict)

    def _ask_for_replacement(self, verdict: recycle.Verdict, early: bool = False) -> None:
        """Keep serving, and ask the master to replace this worker: it boots the
        replacement first when the pool's budget has room for it and for what this
        worker will grow meanwhile, then tells this one to go (:meth:`retire`). Only a
        hard limit, the pool's budget, or growing past what it said it would make it
        leave on its own meanwhile. A worker that would grow by more than its limit
        during a boot (a fast leak) leaves at once instead; asked ``early`` (before its
        limit), it serves on to its limit instead."""
        rss = system.current_rss()
        rate = self._growth_per_second(rss)
        # A boot like this worker's for each worker asking before it (one overlap at a
        # time), one for its own replacement, and one more for a busier machine.
        boots = self.slots.asking(self.age) + 2
        expected = int(rate * boots * self.boot_seconds) + self._ahead() + _RECHECK_MARGIN
        if expected > verdict.limit or not self._room_for_overlap(expected):
            if early:
                # Tried again halfway closer to the limit, and so on while that is more
                # than a sample's step: room may come as other overlaps end, but asking
                # at every sample would cost a USS read each.
                lead = self.decision.lead // 2
                self.lead_share = self.lead_share / 2 if lead >= _EARLY_MIN_LEAD else 0.0
                self.decision.lead = lead if self.lead_share else 0
                self.decision.arm()
                return
            self._recycle(verdict.reason, limit=verdict.limit, way="stop_then_start",
                          **verdict.figures)
            return
        self.asked = verdict
        self.asked_at = time.monotonic()
        uss = self.decision.estimate(rss)
        self.decision.answered(uss, expected)
        self.slots.set_expected_growth(self.age, expected)
        self.slots.set_state(self.age, slot_states.REPLACE)
        self.worker.log.info("memguard: worker %s asks for a replacement (%s): %s",
                             os.getpid(), verdict.reason,
                             recycle.format_figures({"limit": verdict.limit,
                                                     **verdict.figures,
                                                     "expected_growth": expected}))
        self._ring()

    def _growth_per_second(self, rss: int) -> float:
        """Bytes of RSS this worker has grown by per second since it became ready."""
        age = max(time.monotonic() - self.ready_at, 0.1)
        return max(rss - self.decision.baseline_rss, 0) / age

    def _room_for_overlap(self, expected: int) -> bool:
        """Whether the pool's budget could hold a replacement beside this worker and what
        it grows meanwhile, judged as the master will: when it cannot, asking would
        only keep this worker serving (and growing) until the answer, stop-then-start
        anyway."""
        total = self.limits.total
        if self._pool is None or total is None:
            return True
        working_set = self._pool.working_set()
        if working_set is None:
            return True
        figures, committed = self.slots.commitments(self.limits.soft or 0, self.age, expected)
        return overlap_room(total, working_set, figures, committed,
                            self.decision.baseline_uss) is not None

    def _recycle(self, reason: str, **figures: Any) -> None:
        self.recycling = True
        self.slots.set_state(self.age, slot_states.RECYCLING)
        self._ring()  # the master times how long the pool runs a worker short
        # False when someone else (the middleware, a signal) already started one.
        recycle.request_recycle(reason, **figures)

    def _born_over(self, uss: int, when: str) -> None:
        self.slots.set_state(self.age, slot_states.BORN_OVER)
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
        uss = recycle.own_uss()
        return uss if uss is not None else system.current_rss()
