"""Worker-count advice from CPU, memory and a measured app footprint.

Pure decision logic: :func:`advise` takes figures (effective CPUs, the memory budget, what
the app really costs per worker, measured by :mod:`memguard.cli.footprint`) and returns an
:class:`Advice`: how many workers and threads, the per-worker soft and hard memory limits
that fit, which bound decided, and a ready ``gunicorn.conf.py`` snippet. Nothing here reads
the machine, so every rule can be tested with made-up figures.

The arithmetic, in bytes:

- ``pool`` = budget - headroom (the figure memguard's watchdog calls the total memory
  limit; 10% by default, the same margin ``MEMGUARD_TOTAL_MEMORY_LIMIT`` defaults to).
- A worker needs at least its warmed footprint plus a growth allowance (``growth``, 25%
  of it, and at least 4 MiB): a soft limit any lower would recycle it as soon as it grows
  at all. The 4 MiB also cover what the in-process warm-up cannot see: a worker under a
  real server touches more of the master's objects (its config, logging, arbiter) and so
  turns more of the master's pages private.
- ``reserve`` = the largest of that allowance, one request's step (16 MiB) and one
  booting worker: room for one worker between its soft and hard limits, or for a
  replacement that boots while the old worker drains (which must not be what tips the
  container over). It is kept once for the pool, not once per worker: it is what lets a
  small worker's pool be as large as the memory allows.
- The worker class, unless given: ``gthread`` when the app spends most of a request
  waiting (less than ``WAITING_SHARE`` of it computing, measured in the warm-up), ``sync``
  otherwise. Waits are served by threads sharing one process's memory, where sync needs a
  whole process per wait: in a memory-bound container the processes run out long before
  the CPUs are busy.
- ``room`` = pool - master - reserve; memory bound = room // the minimum worker; cpu bound
  from effective CPUs, the worker class and how much of a request's time the app spends
  computing (a sync worker that waits 20 ms for every 1 ms of work leaves its CPU idle,
  so more of them fit on one CPU; threaded workers: one per CPU); workers = min of the two
  (never less than 1; ``WEB_CONCURRENCY`` wins when it fits).
- gthread threads: enough requests in flight to keep the CPUs busy at the measured share
  (at most ``MAX_THREADS`` a worker), and no more than the soft limit holds when each
  thread's request needs its measured peak (``request_peak``) at once.
- soft limit = room // workers; hard limit = soft + reserve, so one worker at its hard
  limit beside the others at their soft limit still fits the pool.
- With preload measured too, preload is advised only when it fits more workers or saves
  at least 5% (and 16 MiB) of the pool's memory: it has costs of its own (no code reload
  per worker, connections opened at import are shared).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from memguard.sizes import format_size

__all__ = [
    "ASYNC_WORKER_CLASSES",
    "Advice",
    "Footprint",
    "SizingInput",
    "advise",
    "choose_worker_class",
    "classic_workers",
    "concurrency",
    "cpu_bound",
    "render_text",
]

MIB = 1024 * 1024
# The hard limit sits at least this far above the soft one: one request's growth.
MIN_STEP_BYTES = 16 * MIB
MIN_ALLOWANCE_BYTES = 4 * MIB
DEFAULT_GROWTH = 0.25
DEFAULT_HEADROOM = 0.10
# Threads per gthread worker at most: a process computes on one CPU at a time (the GIL),
# so past a few dozen threads more waits only queue there.
MAX_THREADS = 32
# Sync workers per CPU at most, however little of a request is computing: past that the
# server's own per-request work fills the CPU, and gthread serves waits for less memory.
MAX_SYNC_WORKERS_PER_CPU = 16
# Below this share of computing, a sync pool is mostly processes that wait: gthread is
# advised instead (unless a worker class is given).
WAITING_SHARE = 0.25

# Worker classes that serve many connections from one event loop: one process per CPU.
ASYNC_WORKER_CLASSES = frozenset({
    "uvicorn_worker.UvicornWorker", "uvicorn_worker.UvicornH11Worker",
    "uvicorn.workers.UvicornWorker", "uvicorn.workers.UvicornH11Worker",
    "asgi", "gevent", "eventlet", "tornado",
})


@dataclass(frozen=True)
class Footprint:
    """What the app costs, measured in one serving mode (bytes; USS unless noted)."""

    preload: bool  # True: the app was imported in the master before the fork
    master: int  # the master's own memory (with preload it holds the app)
    boot: int  # a worker right after it booted, before any request: the spare slot
    worker: int  # a worker after the warm-up requests: what each worker really costs
    worker_pss: int | None = None  # proportional share, for the record
    worker_rss: int | None = None  # RSS (counts pages shared with the master)
    request_seconds: float | None = None  # a warm-up request's wall time (median)
    request_cpu_seconds: float | None = None  # its CPU time; the rest it spent waiting
    # The most memory one request held at once above the worker's RSS before it (peak RSS
    # during the request minus RSS at its start): what each thread of a gthread worker
    # may need at the same time.
    request_peak: int | None = None

    @property
    def cpu_share(self) -> float | None:
        """The part of a request's time the worker computes (1.0: it never waits)."""
        if self.request_seconds is None or self.request_cpu_seconds is None:
            return None
        if self.request_seconds <= 0:
            return 1.0
        return min(1.0, max(0.0, self.request_cpu_seconds / self.request_seconds))


@dataclass(frozen=True)
class SizingInput:
    cpus: float  # effective CPUs (cgroup quota, affinity)
    host_cpus: int  # os.cpu_count(): what `2 x cores + 1` is usually computed from
    budget: int  # the container's memory limit, or the host's RAM
    budget_source: str
    footprints: Sequence[Footprint]  # one per measured mode (with/without preload)
    worker_class: str | None = None  # None: chosen here (gthread for an app that waits)
    threads: int | None = None  # None: chosen here (gthread), 1 otherwise
    headroom: int | None = None  # bytes kept free; None: DEFAULT_HEADROOM of the budget
    growth: float = DEFAULT_GROWTH
    web_concurrency: int | None = None  # the WEB_CONCURRENCY the deployment sets
    app: str = "myapp:app"
    cpu_source: str = ""


@dataclass(frozen=True)
class Advice:
    workers: int
    threads: int
    worker_class: str
    preload: bool
    worker_memory_limit: int  # soft: graceful recycle above it
    worker_memory_hard_limit: int  # hard: the worker is stopped even mid-request
    total_memory_limit: int  # the pool's budget (budget - headroom)
    decided_by: str  # "cpu", "memory", or "WEB_CONCURRENCY"
    cpu_bound: int
    memory_bound: int
    fits: bool  # False when not even the advised count fits the budget
    classic: dict[str, Any]  # the `2 x cores + 1` figure and what it would need
    web_concurrency: dict[str, Any] | None
    modes: list[dict[str, Any]]  # each measured mode and the count it would allow
    inputs: dict[str, Any]
    config: str  # a ready gunicorn.conf.py
    command: str  # the same with the ready-made config module and environment variables
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def classic_workers(host_cpus: int) -> int:
    """The figure people guess with: ``2 x cores + 1``, cores as ``os.cpu_count()`` says."""
    return 2 * max(1, host_cpus) + 1


def cpu_bound(cpus: float, worker_class: str, cpu_share: float | None = None) -> int:
    """How many worker processes the CPUs can keep busy, for this worker class.

    A sync worker blocks while its request waits. With the app's measured ``cpu_share``
    (CPU time over wall time of a request), ``cpus / cpu_share`` workers keep the CPUs
    busy, plus one for the server's own work (at most ``MAX_SYNC_WORKERS_PER_CPU`` per
    CPU); unmeasured, about two per CPU (``2 x effective CPUs + 1``, with the CPUs a quota
    really allows rather than the host's count). Threaded and event-loop workers overlap
    their own waits: one process per CPU is enough. At least two, so a recycle never takes
    the whole pool down.
    """
    cpus = max(cpus, 0.01)
    if worker_class == "sync":
        return max(2, concurrency(cpus, cpu_share))
    return max(2, math.ceil(cpus))


def choose_worker_class(given: str | None, cpu_share: float | None) -> str:
    """The worker class given, or: ``gthread`` for an app whose requests mostly wait
    (measured share of computing below ``WAITING_SHARE``), ``sync`` otherwise (and when
    unmeasured: sync workers need no thread-safe app)."""
    if given is not None:
        return given
    if cpu_share is not None and cpu_share < WAITING_SHARE:
        return "gthread"
    return "sync"


def concurrency(cpus: float, cpu_share: float | None) -> int:
    """Requests in flight that keep ``cpus`` busy when each computes ``cpu_share`` of its
    time (``2 x cpus + 1`` when that share is unknown)."""
    cpus = max(cpus, 0.01)
    if cpu_share is None:
        return math.floor(2 * cpus) + 1
    share = max(cpu_share, 1 / MAX_SYNC_WORKERS_PER_CPU)
    # Within a tenth of a worker counts as enough: the share is measured, not exact.
    return math.ceil(cpus / share - 0.1) + 1


def _allowance(footprint: Footprint, growth: float) -> int:
    return max(int(footprint.worker * growth), MIN_ALLOWANCE_BYTES)


def _min_worker(footprint: Footprint, growth: float) -> int:
    return footprint.worker + _allowance(footprint, growth)


def _reserve(footprint: Footprint, growth: float) -> int:
    return max(footprint.boot, MIN_STEP_BYTES, _allowance(footprint, growth))


def _pool(inp: SizingInput) -> int:
    headroom = inp.headroom if inp.headroom is not None else int(inp.budget * DEFAULT_HEADROOM)
    return max(0, inp.budget - headroom)


def _room(pool: int, fp: Footprint, growth: float) -> int:
    return pool - fp.master - _reserve(fp, growth)


def _memory_bound(pool: int, fp: Footprint, growth: float) -> int:
    return max(0, _room(pool, fp, growth) // _min_worker(fp, growth))


def _needed(count: int, fp: Footprint, growth: float) -> int:
    """The pool ``count`` workers need: master, reserve, each worker with its allowance."""
    return fp.master + _reserve(fp, growth) + count * _min_worker(fp, growth)


def _choose_mode(modes: list[dict[str, Any]], by_cpu: int, pool: int) -> int:
    """Index of the mode to advise: without preload unless preload is clearly better."""
    plain = [i for i, m in enumerate(modes) if not m["preload"]]
    if not plain:
        return 0
    best = plain[0]
    for i, mode in enumerate(modes):
        if not mode["preload"]:
            continue
        more = min(mode["memory_bound"], by_cpu) > min(modes[best]["memory_bound"], by_cpu)
        saved = modes[best]["total_at_cpu_bound"] - mode["total_at_cpu_bound"]
        same = min(mode["memory_bound"], by_cpu) == min(modes[best]["memory_bound"], by_cpu)
        if more or (same and saved >= max(MIN_STEP_BYTES, pool // 20)):
            best = i
    return best


def _threads(inp: SizingInput, worker_class: str, workers: int, spare: int,
             fp: Footprint) -> int:
    """Threads per worker; ``spare``: what each worker's soft limit leaves above its
    warmed footprint and growth allowance."""
    if inp.threads is not None:
        return max(1, inp.threads)
    if worker_class != "gthread":
        return 1
    share = _share(inp)
    if share is None:
        target = concurrency(inp.cpus, None)
    else:
        # A waiting thread costs a stack, not a process: no cap per CPU as for sync
        # workers, only MAX_THREADS per worker.
        target = math.ceil(max(inp.cpus, 0.01) / max(share, 0.001) - 0.1) + 1
    threads = min(MAX_THREADS, max(2, math.ceil(target / workers)))
    if fp.request_peak:
        # Every thread's request may hold its peak at once: the soft limit must hold them.
        threads = min(threads, 1 + max(0, spare) // fp.request_peak)
    return max(1, threads)


def _share(inp: SizingInput) -> float | None:
    """The measured CPU share of a request, from the first footprint that has one."""
    return next((fp.cpu_share for fp in inp.footprints if fp.cpu_share is not None), None)


def _floor_mib(n: int) -> int:
    return max(0, n) // MIB * MIB


def _size_text(n: int) -> str:
    """A size as memguard's parsers accept it, whole MiB."""
    return f"{n // MIB}MiB"


def advise(inp: SizingInput) -> Advice:
    if not inp.footprints:
        raise ValueError("advise() needs at least one measured footprint")
    if inp.web_concurrency is not None and inp.web_concurrency < 1:
        raise ValueError(f"WEB_CONCURRENCY must be a positive integer, got {inp.web_concurrency}")
    pool = _pool(inp)
    worker_class = choose_worker_class(inp.worker_class, _share(inp))
    by_cpu = cpu_bound(inp.cpus, worker_class, _share(inp))

    modes: list[dict[str, Any]] = []
    for fp in inp.footprints:
        bound = _memory_bound(pool, fp, inp.growth)
        modes.append({
            "preload": fp.preload,
            "master": fp.master,
            "boot": fp.boot,
            "worker": fp.worker,
            "worker_pss": fp.worker_pss,
            "worker_rss": fp.worker_rss,
            "request_seconds": fp.request_seconds,
            "request_cpu_seconds": fp.request_cpu_seconds,
            "request_peak": fp.request_peak,
            "min_worker": _min_worker(fp, inp.growth),
            "memory_bound": bound,
            "total_at_cpu_bound": fp.master + min(bound, by_cpu) * fp.worker,
        })
    best_index = _choose_mode(modes, by_cpu, pool)
    fp = inp.footprints[best_index]
    by_memory = _memory_bound(pool, fp, inp.growth)

    notes: list[str] = []
    computed = max(1, min(by_cpu, by_memory))
    decided_by = "cpu" if by_cpu <= by_memory else "memory"
    fits = by_memory >= 1
    if not fits:
        need, left = _min_worker(fp, inp.growth), max(0, _room(pool, fp, inp.growth))
        notes.append(
            f"not even one worker fits: a warmed worker needs {format_size(need)}"
            f" with its growth allowance, and only {format_size(left)}"
            " is left after the master, the reserve and the headroom; raise the memory limit"
            " or shrink the app's footprint"
        )

    web: dict[str, Any] | None = None
    workers = computed
    if inp.web_concurrency is not None:
        wc = inp.web_concurrency
        needed = _needed(wc, fp, inp.growth)
        web_fits = needed <= pool
        web = {"value": wc, "fits": web_fits, "needed": needed, "computed": computed}
        if web_fits:
            workers, decided_by = wc, "WEB_CONCURRENCY"
            if wc > by_cpu:
                notes.append(f"WEB_CONCURRENCY={wc} fits in memory but is more workers than"
                             f" the {inp.cpus:g} effective CPUs keep busy ({by_cpu})")
        else:
            notes.append(
                f"WEB_CONCURRENCY={wc} does not fit: {wc} workers need"
                f" {format_size(needed)} and the pool has {format_size(pool)};"
                f" advising {computed} (the config below sets workers explicitly, which"
                " takes precedence over WEB_CONCURRENCY)"
            )

    room = max(0, _room(pool, fp, inp.growth))
    soft = _floor_mib(room // workers)
    hard = _floor_mib(soft + _reserve(fp, inp.growth))
    if fits and soft < fp.worker:
        notes.append("the soft limit is below the warmed footprint: workers would recycle"
                     " after every request")
    if soft > 4 * _min_worker(fp, inp.growth):
        notes.append(
            f"memory is plentiful: the soft limit is each worker's fair share of the pool;"
            f" a lower one such as {_size_text(_floor_mib(2 * _min_worker(fp, inp.growth)))}"
            " recycles a leaking worker sooner"
        )
    threads = _threads(inp, worker_class, workers, soft - _min_worker(fp, inp.growth), fp)
    share = _share(inp)
    if inp.worker_class is None and worker_class == "gthread" and share is not None:
        notes.append(f"worker class gthread: requests spend {1 - share:.0%} of their time"
                     " waiting, and threads serve waits in one process's memory"
                     " (--worker-class sync if the app is not thread-safe)")
    if threads > 1:
        peak = f" ({format_size(fp.request_peak)} at most per request in the warm-up)" \
            if fp.request_peak is not None else ""
        notes.append(f"{threads} threads per worker: the footprint was measured with one"
                     f" request at a time{peak}; concurrent large requests add to it")

    if worker_class == "sync" and share is not None and share < WAITING_SHARE:
        notes.append(f"requests spend {1 - share:.0%} of their time waiting: with"
                     " --worker-class gthread, threads serve as many at once in fewer"
                     " processes, which share their memory")

    classic_n = classic_workers(inp.host_cpus)
    classic_needed = _needed(classic_n, fp, inp.growth)
    classic = {
        "workers": classic_n,
        "cpus": inp.host_cpus,
        # The bare figure: the master plus that many warmed workers, no growth, no spare.
        "memory": fp.master + classic_n * fp.worker,
        "needed": classic_needed,
        "fits": classic_needed <= pool,
    }
    if fp.preload:
        notes.append("preload_app = True: workers share the app's pages with the master;"
                     " MEMGUARD_GC_FREEZE=1 keeps the first gc.collect() from un-sharing them")

    config, command = _snippets(inp, worker_class, workers, threads, fp.preload, soft, hard,
                                pool)
    return Advice(
        workers=workers,
        threads=threads,
        worker_class=worker_class,
        preload=fp.preload,
        worker_memory_limit=soft,
        worker_memory_hard_limit=hard,
        total_memory_limit=_floor_mib(pool),
        decided_by=decided_by,
        cpu_bound=by_cpu,
        memory_bound=by_memory,
        fits=fits,
        classic=classic,
        web_concurrency=web,
        modes=modes,
        inputs={
            "cpus": inp.cpus,
            "cpu_source": inp.cpu_source,
            "cpu_share": _share(inp),
            "host_cpus": inp.host_cpus,
            "budget": inp.budget,
            "budget_source": inp.budget_source,
            "headroom": inp.budget - pool,
            "growth": inp.growth,
            "app": inp.app,
        },
        config=config,
        command=command,
        notes=notes,
    )


def _snippets(inp: SizingInput, worker_class: str, workers: int, threads: int, preload: bool,
              soft: int, hard: int, pool: int) -> tuple[str, str]:
    lines = [
        f"# gunicorn.conf.py, from `memguard suggest` ({format_size(inp.budget)} from"
        f" {inp.budget_source}, {inp.cpus:g} CPUs)",
        "from memguard.gunicorn import install",
        "",
        f"workers = {workers}",
        f"worker_class = {worker_class!r}",
    ]
    if threads > 1:
        lines.append(f"threads = {threads}")
    if preload:
        lines.append("preload_app = True")
    lines += [
        "install(",
        "    globals(),",
        f"    worker_memory_limit={_size_text(soft)!r},",
        f"    worker_memory_hard_limit={_size_text(hard)!r},",
        f"    total_memory_limit={_size_text(pool)!r},",
        ")",
    ]
    env = [
        f"MEMGUARD_WORKER_MEMORY_LIMIT={_size_text(soft)}",
        f"MEMGUARD_WORKER_MEMORY_HARD_LIMIT={_size_text(hard)}",
        f"MEMGUARD_TOTAL_MEMORY_LIMIT={_size_text(pool)}",
    ]
    args = ["gunicorn", "-c", "python:memguard.gunicorn.conf", "-w", str(workers),
            "-k", worker_class]
    if threads > 1:
        args += ["--threads", str(threads)]
    if preload:
        args.append("--preload")
    args.append(inp.app)
    return "\n".join(lines) + "\n", " \\\n  ".join([*env, " ".join(args)])


def _share_text(modes: list[dict[str, Any]], share: float) -> str:
    wall = next((m["request_seconds"] for m in modes if m["request_seconds"] is not None), 0.0)
    return (f"{wall * 1000:.1f} ms each in the warm-up, {share:.0%} of it computing"
            f" (the rest waiting)")


def render_text(advice: Advice) -> str:
    """The advice for people: the answer first, then why, then the config to paste."""
    i = advice.inputs
    out = [
        f"workers: {advice.workers}   threads: {advice.threads}   worker class:"
        f" {advice.worker_class}   preload: {'yes' if advice.preload else 'no'}",
        f"decided by: {advice.decided_by}  (cpu bound {advice.cpu_bound}, memory bound"
        f" {advice.memory_bound})",
        f"2 x cores + 1 = {advice.classic['workers']} (cores = {advice.classic['cpus']}):"
        f" {format_size(advice.classic['memory'])} for the master and warmed workers alone,"
        f" {format_size(advice.classic['needed'])} with room to grow:"
        f" {'fits' if advice.classic['fits'] else 'does NOT fit'}"
        f" in {format_size(advice.total_memory_limit)}",
        "",
        f"CPUs: {i['cpus']:g} effective{' (' + i['cpu_source'] + ')' if i['cpu_source'] else ''},"
        f" {i['host_cpus']} on the host",
        *([f"requests: {_share_text(advice.modes, i['cpu_share'])}"]
          if i["cpu_share"] is not None else []),
        f"memory: {format_size(i['budget'])} ({i['budget_source']}), minus"
        f" {format_size(i['headroom'])} headroom = {format_size(advice.total_memory_limit)}"
        " for the pool",
    ]
    for mode in advice.modes:
        out.append(
            f"  {'with' if mode['preload'] else 'without'} preload: master"
            f" {format_size(mode['master'])}, worker {format_size(mode['boot'])} at boot,"
            f" {format_size(mode['worker'])} warmed (USS; PSS {format_size(mode['worker_pss'])},"
            f" RSS {format_size(mode['worker_rss'])}) -> {mode['memory_bound']} workers fit"
        )
    out.append(
        f"limits per worker: soft {format_size(advice.worker_memory_limit)} (graceful recycle),"
        f" hard {format_size(advice.worker_memory_hard_limit)} (stopped mid-request)"
    )
    if advice.web_concurrency is not None:
        wc = advice.web_concurrency
        out.append(f"WEB_CONCURRENCY={wc['value']}: {'fits' if wc['fits'] else 'does NOT fit'}"
                   f" (needs {format_size(wc['needed'])})")
    for note in advice.notes:
        out.append(f"note: {note}")
    out += ["", advice.config, "or, with the ready-made config:", "", advice.command]
    return "\n".join(out)
