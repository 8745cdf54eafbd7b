"""The master's watchdog: a thread in the gunicorn arbiter that watches every worker.

Every ``interval`` seconds (four times as often when something is near a limit) it reads
each worker's USS/PSS from ``/proc/PID/smaps_rollup`` and the cgroup's usage, then:

- stops a worker over the hard limit: SIGTERM, and SIGKILL if it is still there after
  the grace period, before the kernel's OOM killer picks a victim (maybe the master);
- recycles, gracefully (SIGTERM: every worker class's graceful stop), a worker over its
  soft limit: the safety net for workers whose per-request check never runs, and for
  growth outside requests (threads, copy-on-write);
- recycles the largest worker when the pool, plus room for one booting replacement,
  nears its budget;
- never has more than ``max_concurrent`` workers recycling (draining or booting) on its
  own initiative, so capacity never collapses.

It only reads ``/proc`` and cgroup files and sends signals: nothing that could leave a
lock held in a worker forked while it runs. It also keeps each worker's last known
memory for :meth:`Watchdog.child_exit`, which tells apart how a worker died.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
import time
from collections import Counter
from typing import Any

from memguard import counters, events, recycle, system
from memguard.gunicorn import slots as slot_states
from memguard.gunicorn.limits import Limits, overlap_room
from memguard.gunicorn.slots import Doorbell, SlotTable
from memguard.sizes import format_size
from memguard.system import read_oom_kills

__all__ = ["Watchdog", "WorkerRecord"]


@dataclasses.dataclass
class WorkerRecord:
    pid: int
    age: int
    first_seen: float
    first_uss: int | None = None
    last: system.ProcessMemory | None = None
    last_time: float = 0.0
    recycle_sent: float | None = None  # when the master sent a graceful SIGTERM
    recycle_reason: str | None = None
    hard_deadline: float | None = None  # SIGKILL after this, if still alive
    killed: bool = False  # the master sent SIGKILL


@dataclasses.dataclass
class Overlap:
    """One replacement booting beside the worker it replaces (at most one at a time)."""

    old_pid: int
    old_age: int
    reason: str
    started: float
    base: int  # the arbiter's worker count before this overlap
    newest_age: int  # the replacement is the first worker younger than this
    new_pid: int | None = None
    retired: float | None = None


# How long a worker waits for its replacement to boot, or for another worker's to, before
# it is told to go anyway.
REPLACEMENT_WAIT = 30.0


class Watchdog:
    def __init__(self, limits: Limits, slots: SlotTable, log: Any,
                 doorbell: Doorbell | None = None) -> None:
        self.limits = limits
        self.doorbell = doorbell
        self.overlap: Overlap | None = None
        # Workers seen ready, and those seen leaving; stops whose replacement is not
        # ready yet (when the pool started to run short, the worker that left, why).
        self._ready: set[int] = set()
        self._leaving: set[int] = set()
        self._short: list[tuple[float, int, str]] = []
        self._asked: dict[int, float] = {}
        self.slots = slots
        self.log = log
        self.arbiter: Any = None
        self.records: dict[int, WorkerRecord] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.cgroup = system.find_cgroup()
        self._usage = system.CgroupMemoryReader(self.cgroup) if self.cgroup else None
        oom = read_oom_kills(self.cgroup)
        self.oom_seen = oom[0] if oom else 0
        self.oom_source = oom[1] if oom else None
        # The master judges each worker's sample against the same limits the workers
        # hold (without their jitter: it is the safety net, not the first trigger).
        self.decision = recycle.RecycleDecision(limits.soft, limits.hard)
        self.master: system.ProcessMemory | None = None
        self.pool_reported = False
        self.ticks = 0

    # ---- thread ----------------------------------------------------------------------

    def start(self, arbiter: Any) -> None:
        self.arbiter = arbiter
        if self.limits.interval <= 0 or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="memguard-watchdog",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self.doorbell is not None:
            self.doorbell.ring()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)

    def _run(self) -> None:
        # Process-directed signals (SIGCHLD, SIGTERM, SIGHUP...) go to any thread that
        # does not block them. One delivered here would wait for the arbiter's main
        # thread to leave its one-second queue wait before its Python handler runs:
        # measured, that delayed every worker replacement and made a recycling pool
        # 50% slower. Blocking them here sends them all to the main thread.
        if hasattr(signal, "pthread_sigmask"):
            signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        next_tick = time.monotonic() + self.limits.interval
        while not self._stop.is_set():
            timeout = next_tick - time.monotonic()
            if self.doorbell is not None:
                self.doorbell.wait(timeout)
            elif timeout > 0:
                self._stop.wait(timeout)
            if self._stop.is_set():
                return
            if os.getpid() != getattr(self.arbiter, "pid", os.getpid()):
                return  # a forked child never runs this thread, but be sure
            try:
                self.replacements()  # a few slot reads: on every ring
                if time.monotonic() >= next_tick:
                    urgent = self.tick()
                    next_tick = time.monotonic() + (
                        self.limits.interval / 4 if urgent else self.limits.interval)
            except Exception:  # the safety net must survive its own bugs
                self.log.exception("memguard watchdog tick failed")
                next_tick = time.monotonic() + self.limits.interval

    # ---- one look at the pool ----------------------------------------------------------

    def _workers(self) -> list[tuple[int, Any]]:
        for _ in range(10):
            try:
                return list(self.arbiter.WORKERS.items())
            except RuntimeError:  # resized by the main thread while copying
                time.sleep(0.001)
        return []

    def tick(self) -> bool:
        """Sample and act once; True when the next look should come sooner."""
        now = time.monotonic()
        self.ticks += 1
        workers = self._workers()
        limits = self.limits
        urgent = False
        try:
            self.master = system.process_memory(os.getpid())
        except (ProcessLookupError, OSError):
            self.master = None
        usage = self._working_set()
        if self.master is not None:
            # The cgroup's working set rides on the master's sample: the timeline report
            # draws processes, and the pool's figure belongs to the master's line.
            events.emit("sample", role="master", rss=self.master.rss, uss=self.master.uss,
                        pss=self.master.pss, cgroup_working_set=usage)
        current: list[WorkerRecord] = []
        for pid, worker in workers:
            try:
                mem = system.process_memory(pid)
            except (ProcessLookupError, OSError):
                continue
            with self._lock:
                record = self.records.get(pid)
                if record is None:
                    record = WorkerRecord(pid=pid, age=worker.age, first_seen=now,
                                          first_uss=mem.uss)
                    self.records[pid] = record
                record.last, record.last_time = mem, now
            current.append(record)
            events.emit("sample", pid=pid, role="worker", rss=mem.rss, uss=mem.uss,
                        pss=mem.pss, swap=mem.swap)
        self._report_pool(current, workers)

        decision = self.decision
        for record in current:
            uss = _own(record)
            if record.hard_deadline is not None:
                urgent = True
                if now >= record.hard_deadline and not record.killed:
                    self._kill(record, uss)
                continue
            verdict = decision.judge_sample(uss)
            if verdict is not None and verdict.urgent:
                self._stop_hard(record, uss, now)
                urgent = True
                continue
            if limits.soft is not None and uss >= 0.9 * limits.soft:
                urgent = True

        busy = self._recycling(current, now)
        if limits.soft is not None:
            for record in sorted(current, key=_own, reverse=True):
                if busy >= limits.max_concurrent:
                    break
                uss = _own(record)
                verdict = decision.judge_sample(uss)
                if verdict is not None and self._eligible(record, now, born_over_too=False):
                    self._recycle(record, verdict.reason, uss=uss, limit=verdict.limit)
                    busy += 1
        if limits.total is not None and current:
            total = usage if usage is not None else self._pss_total(current)
            reserve = min((r.first_uss or _own(r)) for r in current)
            if total + reserve >= 0.9 * limits.total:
                urgent = True
            # The master counts workers already leaving as still there (leaving=0) and
            # caps how many it recycles at once instead; past the ceiling memory wins
            # over capacity: the cap would leave the kernel to pick a victim.
            go, past_ceiling = recycle.pool_over_budget(total, reserve, 0, limits.total,
                                                        limits.ceiling)
            if go and (busy < limits.max_concurrent or past_ceiling):
                for record in sorted(current, key=_own, reverse=True):
                    if self._eligible(record, now):
                        self._recycle(record, "pool_budget", uss=_own(record), usage=total,
                                      reserve=reserve, budget=limits.total)
                        break
        return urgent

    def _working_set(self) -> int | None:
        """The cgroup's usage without the inactive page cache the kernel can drop."""
        if self._usage is None:
            return None
        return self._usage.working_set()

    def _pss_total(self, current: list[WorkerRecord]) -> int:
        total = sum((r.last.pss or r.last.rss) for r in current if r.last is not None)
        if self.master is not None:
            total += self.master.pss or self.master.rss
        return total

    def _report_pool(self, current: list[WorkerRecord], workers: list[tuple[int, Any]]) -> None:
        """Once, when the pool is complete: master PSS, total PSS, each worker's USS."""
        if self.pool_reported or not current:
            return
        if len(current) < getattr(self.arbiter, "num_workers", len(current)):
            return
        self.pool_reported = True
        master_pss = (self.master.pss or 0) if self.master else 0
        total = master_pss + sum((r.last.pss or 0) for r in current if r.last is not None)
        self.log.info(
            "memguard: pool memory: master pss %s, total pss %s, workers uss %s%s",
            format_size(master_pss), format_size(total),
            ", ".join(format_size(_own(r)) for r in current),
            " (gc.freeze before fork)" if self.limits.gc_freeze else "",
        )

    def _recycling(self, current: list[WorkerRecord], now: float) -> int:
        """Workers not serving: draining after a recycle, or a replacement booting."""
        busy = 0
        for record in current:
            _, state, _, _ = self.slots.read(record.age)
            if (record.recycle_sent is not None or record.hard_deadline is not None
                    or state in (slot_states.BOOTING, slot_states.RECYCLING)):
                busy += 1
        return busy

    def _eligible(self, record: WorkerRecord, now: float, born_over_too: bool = True) -> bool:
        """May the master recycle this worker gracefully now?

        Not while it is already leaving or still booting; not when it was born over its
        soft limit (for that limit: a replacement would be as big); not when younger
        than the minimum lifetime.
        """
        if record.recycle_sent is not None or record.hard_deadline is not None:
            return False
        _, state, _, _ = self.slots.read(record.age)
        # A worker waiting for its replacement still serves: the pool's budget may
        # not wait for it.
        serving = slot_states.SERVING_STATES if born_over_too else (slot_states.SERVING,)
        if state not in serving:
            return False
        return now - record.first_seen >= self.limits.min_lifetime

    # ---- actions ---------------------------------------------------------------------

    def _signal(self, pid: int, sig: int) -> bool:
        try:
            os.kill(pid, sig)
            return True
        except ProcessLookupError:
            return False

    def _recycle(self, record: WorkerRecord, reason: str, **figures: Any) -> None:
        figures = {"rss": record.last.rss if record.last else None,
                   "pss": record.last.pss if record.last else None, **figures}
        self.log.warning("memguard: recycling worker %s (%s, by the master's watchdog): %s",
                         record.pid, reason, recycle.format_figures(figures))
        record.recycle_sent = time.monotonic()
        record.recycle_reason = reason
        self._stopped(record.pid, reason, record.recycle_sent)
        if self._signal(record.pid, signal.SIGTERM):
            counters.increment("recycle", reason)
            events.emit("recycle", pid=record.pid, reason=reason, by="master", **figures)

    def _stop_hard(self, record: WorkerRecord, uss: int, now: float) -> None:
        grace = self.limits.grace
        self.log.error(
            "memguard: recycling worker %s (hard_limit, by the master's watchdog): uss %s over "
            "the hard limit %s; SIGTERM now, SIGKILL in %.1fs if it is still running",
            record.pid, format_size(uss), format_size(self.limits.hard), grace)
        record.hard_deadline = now + grace
        record.recycle_reason = "hard_limit"
        self._stopped(record.pid, "hard_limit", now)
        if self._signal(record.pid, signal.SIGTERM):
            counters.increment("recycle", "hard_limit")
            events.emit("recycle", pid=record.pid, reason="hard_limit", by="master", uss=uss,
                        limit=self.limits.hard)

    def _kill(self, record: WorkerRecord, uss: int) -> None:
        record.killed = True
        if self._signal(record.pid, signal.SIGKILL):
            self.log.error("memguard: worker %s still running %.1fs after SIGTERM for its hard "
                           "limit (uss %s): SIGKILL", record.pid, self.limits.grace,
                           format_size(uss))
            counters.increment("recycle", "hard_limit_kill")

    # ---- replacements ------------------------------------------------------------------

    def replacements(self) -> None:
        """Answer workers asking for a replacement; retire a worker once its
        replacement is ready; time how long the pool ran a worker short.

        A replacement boots first (spawn before stop) when no other overlap is under
        way and the pool's budget has room for one more worker of the pool's measured
        footprint; the arbiter is asked for one more worker, and gives the number back
        when the old one has exited. Otherwise the worker is told to go now and its
        replacement boots after (stop then start). Only slot reads: run on every ring.
        """
        now = time.monotonic()
        workers = self._workers()
        states = {pid: (w, self.slots.read(w.age)[1]) for pid, w in workers}
        for pid, (worker, state) in states.items():
            if state in slot_states.SERVING_STATES and pid not in self._ready:
                self._ready.add(pid)
                self._replacement_ready(pid, worker, now)
            elif state == slot_states.RECYCLING and pid not in self._leaving:
                self._stopped(pid, "recycle", now)  # a worker that left on its own
        with self._lock:
            overlap = self.overlap
        if overlap is not None and overlap.retired is None:
            if overlap.new_pid is not None or now - overlap.started >= REPLACEMENT_WAIT:
                self._retire(overlap.old_pid, overlap.old_age, slot_states.SPAWN_FIRST, now)
                overlap.retired = now
        asking = [(pid, worker) for pid, (worker, state) in states.items()
                  if state == slot_states.REPLACE and pid not in self._leaving]
        for pid, _ in asking:
            self._asked.setdefault(pid, now)
        # In the order they asked: seen on the same ring, the one that expects the
        # least growth asked first (each counts a boot for every worker before it).
        asking.sort(key=lambda a: (self._asked[a[0]], self.slots.expected_growth(a[1].age)))
        for pid, worker in asking:
            asked = self._asked[pid]
            if overlap is not None:
                # One overlap at a time: the others keep serving meanwhile, each within
                # the growth it said it could afford (past it, it leaves on its own).
                if overlap.old_pid != pid and now - asked >= REPLACEMENT_WAIT:
                    self._retire(pid, worker.age, slot_states.STOP_THEN_START, now)
                continue
            room = self._room()
            if room is not None and self._begin_overlap(pid, worker, workers, now, room):
                overlap = self.overlap
                continue
            # No room: stop first, and boot the replacement after.
            self._retire(pid, worker.age, slot_states.STOP_THEN_START, now)

    def _room(self) -> int | None:
        """Bytes the budget has left for a replacement booting beside the worker it
        replaces (``None``: no room); without a budget there is nothing to hold it
        against."""
        total = self.limits.total
        if total is None:
            return 1 << 62
        usage = self._working_set()
        if usage is None:
            return None
        figures, committed = self.slots.commitments(self.limits.soft or 0)
        return overlap_room(total, usage, figures, committed, self._footprint())

    def _footprint(self) -> int:
        """A fresh worker's memory: the smallest first sample of the pool's workers (what
        a replacement costs while it boots beside the one it replaces)."""
        with self._lock:
            firsts = [r.first_uss for r in self.records.values() if r.first_uss]
        return min(firsts) if firsts else 0

    def _begin_overlap(self, pid: int, worker: Any, workers: list[tuple[int, Any]],
                       now: float, room: int) -> bool:
        arbiter = self.arbiter
        if arbiter is None or not hasattr(arbiter, "num_workers"):
            return False
        base = arbiter.num_workers
        overlap = Overlap(old_pid=pid, old_age=worker.age, reason="replace", started=now,
                          base=base, newest_age=max(w.age for _, w in workers))
        with self._lock:
            self.overlap = overlap
        self._leaving.discard(pid)
        self.log.info("memguard: worker %s asked for a replacement: booting it first "
                      "(%s of the budget left with it)", pid, format_size(room))
        # The arbiter's main loop spawns it (forks happen in its thread, never here).
        arbiter.num_workers = base + 1
        wakeup = getattr(arbiter, "wakeup", None)
        if wakeup is not None:
            wakeup()
        return True

    def _end_overlap(self, pid: int) -> None:
        """``pid`` exited (called under the lock): an overlap it was part of ends."""
        overlap = self.overlap
        if overlap is None or pid not in (overlap.old_pid, overlap.new_pid):
            return
        if pid == overlap.new_pid and overlap.retired is None:
            overlap.new_pid = None  # the replacement died: the next one will do
            return
        if pid != overlap.old_pid:
            return
        self.overlap = None
        arbiter = self.arbiter
        if arbiter is not None and arbiter.num_workers == overlap.base + 1:
            arbiter.num_workers = overlap.base  # main thread: child_exit

    def _retire(self, pid: int, age: int, way: int, now: float) -> None:
        """Tell the worker of ``pid`` to recycle now (SIGUSR2: its own way of leaving)."""
        self._leaving.add(pid)
        self.slots.set_way(age, way)
        if way == slot_states.STOP_THEN_START:
            self._short.append((now, pid, "stop_then_start"))
        with self._lock:
            record = self.records.get(pid)
            if record is not None:
                record.recycle_sent = now
        self._signal(pid, signal.SIGUSR2)

    def _stopped(self, pid: int, why: str, now: float) -> None:
        """``pid`` stopped serving and no replacement was booted for it first."""
        with self._lock:
            if pid in self._leaving:
                return
            self._leaving.add(pid)
            overlap = self.overlap
            if overlap is not None and pid == overlap.old_pid:
                return
            self._short.append((now, pid, why))

    def _replacement_ready(self, pid: int, worker: Any, now: float) -> None:
        with self._lock:
            overlap = self.overlap
            if (overlap is not None and overlap.new_pid is None
                    and worker.age > overlap.newest_age):
                overlap.new_pid = pid
                replaced, short, way, booted = overlap.old_pid, 0.0, "spawn_first", (
                    now - overlap.started)
            elif self._short:
                since, replaced, _ = self._short.pop(0)
                short = booted = now - since
                way = "stop_then_start"
            else:
                return  # the pool's first workers
        self.log.info("memguard: worker %s is ready, replacing worker %s (%s): the pool "
                      "ran short %.2fs (replacement ready %.2fs after the decision)",
                      pid, replaced, way, short, booted)
        events.emit("replacement", worker_pid=pid, replaced=replaced, way=way,
                    short_seconds=round(short, 3), seconds=round(booted, 3))

    # ---- forensics -------------------------------------------------------------------

    def child_exit(self, worker: Any) -> dict[str, Any]:
        """Why did ``worker`` die? Logged, emitted as events, and returned."""
        pid = worker.pid
        with self._lock:
            record = self.records.pop(pid, None)
            self._end_overlap(pid)
        self._stopped(pid, "exit", time.monotonic())
        with self._lock:
            self._ready.discard(pid)
            self._leaving.discard(pid)
            self._asked.pop(pid, None)
        slot_pid, state, figure, requests = self.slots.read(worker.age)
        paths, started = self.slots.recent_paths(worker.age)
        if slot_pid not in (pid, 0):  # the slot was reused: ignore what it says
            state, figure, requests, paths, started = slot_states.EMPTY, 0, 0, [], 0
        self.slots.reset(worker.age)
        oom = read_oom_kills(self.cgroup)
        oom_moved = oom is not None and oom[0] > self.oom_seen
        if oom_moved:
            assert oom is not None
            self.oom_seen += 1
        if getattr(worker, "aborted", False):
            cause = "timeout"
        elif record is not None and record.killed:
            cause = "hard_limit_kill"
        elif oom_moved:
            cause = "oom_kill"
        elif record is not None and record.hard_deadline is not None:
            cause = "hard_limit"
        elif state == slot_states.RECYCLING or (record and record.recycle_sent is not None):
            cause = "recycled"
        elif state == slot_states.EXITED:
            cause = "exit"
        elif not getattr(self.arbiter, "LISTENERS", True):
            cause = "shutdown"
        else:
            cause = "killed_or_crashed"
        info: dict[str, Any] = {"cause": cause, "requests": requests}
        extra_event = {"reason": cause}
        last = record.last if record else None
        if last is not None:
            assert record is not None
            info.update(rss=last.rss, uss=last.uss, pss=last.pss,
                        seconds_before_exit=round(time.monotonic() - record.last_time, 2))
        elif figure:
            # Dead before the watchdog's first look (a young worker, a busy machine):
            # the worker's own figure, published when it became ready and after each
            # request, is the last known memory.
            info.update(uss=figure, memory_source="worker")
        if figure:
            info["worker_estimate"] = figure
        if oom is not None:
            info["oom_kills"] = oom[0]
            info["oom_counter"] = oom[1]
        if cause in _DEATHS and paths:
            info.update(_path_forensics(paths, started, requests))
        text = recycle.format_figures(info)
        if cause == "oom_kill":
            # The event first: whoever reads the log and then the events (an operator's
            # script, the tests) finds the event of every kill the log reports.
            events.emit("oom_kill", pid=pid, **info)
            self.log.error(
                "memguard: worker %s was killed by the kernel's OOM killer (%s OOM-kill "
                "counter moved to %s); last known memory: %s", pid, oom[1] if oom else "?",
                oom[0] if oom else "?", text)
        elif cause in ("killed_or_crashed", "hard_limit_kill", "timeout"):
            self.log.error("memguard: worker %s died: %s", pid, text)
        else:
            self.log.info("memguard: worker %s exited: %s", pid, text)
        events.emit("worker_exit", pid=pid, **extra_event, **info)
        return info


# Causes a worker does not choose: their reports say what it was serving.
_DEATHS = frozenset({"oom_kill", "killed_or_crashed", "hard_limit_kill", "timeout"})


def _path_forensics(paths: list[str], started: int, finished: int) -> dict[str, Any]:
    """The busiest of a dead worker's last paths, and those it had not finished."""
    counts = Counter(paths)
    top = ", ".join(f"{path} ({n})" for path, n in counts.most_common(3))
    out: dict[str, Any] = {"top_paths": f"[{top}] of the last {len(paths)}"}
    unfinished = max(0, min(started - finished, len(paths)))
    if unfinished:
        out["in_flight"] = ", ".join(paths[-unfinished:])
    return out


def _own(record: WorkerRecord) -> int:
    last = record.last
    if last is None:
        return 0
    return last.uss if last.uss is not None else last.rss
