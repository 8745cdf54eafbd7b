"""gunicorn integration: recycle workers on memory before the kernel's OOM killer does.

Two ways in::

    gunicorn -c python:memguard.gunicorn.conf -w 4 myapp:app      # MEMGUARD_* env

    # in your own gunicorn.conf.py, after your hooks:
    from memguard.gunicorn import install
    install(globals(), worker_memory_limit="80MiB")

:func:`install` adds gunicorn server hooks to a config namespace, calling any hook the
namespace already defines first. Who decides a recycle (DESIGN.md):

- the worker, after each request (``post_request`` for sync, gthread and the native
  ``asgi`` worker; a thin ASGI wrapper for ``uvicorn-worker``, which never calls it);
- the master, on a timer (:mod:`memguard.gunicorn.watchdog`): hard limit, idle growth,
  the pool's budget; and in ``child_exit``, why a worker died.
"""

from __future__ import annotations

import atexit
import gc
import importlib
import os
import signal
import sys
import time
from collections.abc import Callable, MutableMapping
from typing import Any

from memguard import counters, events, recycle, system
from memguard.gunicorn import slots as slot_states
from memguard.gunicorn.limits import Limits, derive_worker_limits, resolve_limits
from memguard.gunicorn.logs import forward_to
from memguard.gunicorn.slots import Doorbell, SlotTable
from memguard.gunicorn.watchdog import Watchdog
from memguard.gunicorn.worker import WorkerMonitor, exit_without_teardown

__all__ = ["HOOKS", "Guard", "install", "is_uvicorn_worker"]

HOOKS = ("on_starting", "when_ready", "pre_fork", "post_fork", "post_worker_init",
         "pre_request", "post_request", "worker_exit", "child_exit", "on_exit")


def is_uvicorn_worker(worker: Any) -> bool:
    return recycle.is_uvicorn_worker_class(type(worker))


# What a uvicorn-worker imports in each worker after the fork (its protocol, lifespan
# and event loop classes). Imported once in the master, every replacement of a recycled
# worker starts that much sooner (17 ms of CPU with h11, measured here).
_UVICORN_WORKER_MODULES = ("uvicorn.protocols.http.auto", "uvicorn.protocols.websockets.auto",
                           "uvicorn.lifespan.on", "uvicorn.loops.auto",
                           "uvicorn.loops.asyncio", "uvicorn.loops.uvloop")


def _import_worker_modules(worker_class: Any) -> None:
    if not isinstance(worker_class, type) or not recycle.is_uvicorn_worker_class(worker_class):
        return
    for name in _UVICORN_WORKER_MODULES:
        try:
            importlib.import_module(name)
        except Exception:  # uvloop absent, a uvicorn that moved them: the worker imports
            pass


class Guard:
    """The state behind the hooks: limits, the shared slot table, the watchdog (master)
    or this worker's monitor (worker)."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.slots = SlotTable()  # made in the master, before any fork: shared
        self.doorbell = Doorbell()
        self.watchdog: Watchdog | None = None
        self.monitor: WorkerMonitor | None = None
        self._froze = False

    # ---- master ----------------------------------------------------------------------

    def on_starting(self, server: Any) -> None:
        forward_to(server.log)
        # Zero configuration: the worker limits come from the budget and the worker
        # count, known now; the workers fork from here and inherit them.
        limits = self.limits = derive_worker_limits(
            self.limits, int(getattr(server, "num_workers", 0) or 0))
        recycle.set_server((limits.soft, limits.hard))
        server.log.info("memguard: %s", limits.describe())
        # Names with "worker" are drawn per worker by `memguard report`; the others
        # against the whole pool.
        events.emit("limit", role="master", worker_soft_limit=limits.soft,
                    worker_hard_limit=limits.hard, total_limit=limits.total,
                    container_limit=limits.container)
        cgroup = system.read_cgroup()
        if cgroup is not None and cgroup.oom_group:
            server.log.warning(
                "memguard: this cgroup has memory.oom.group=1: one worker's OOM kill ends the "
                "whole container, the master included; recycling before the limit is the "
                "only protection%s",
                "" if limits.soft is not None or limits.hard is not None else
                " (set MEMGUARD_WORKER_MEMORY_LIMIT)")
        if limits.gc_freeze and not server.cfg.preload_app:
            server.log.warning("memguard: MEMGUARD_GC_FREEZE only helps with --preload: "
                               "without it each worker imports the app itself")
        if limits.soft is None and limits.hard is None and limits.total is None:
            server.log.warning("memguard: no worker memory limit and no pool budget set: "
                               "workers are watched and reported, never recycled")
        self.watchdog = Watchdog(limits, self.slots, server.log, self.doorbell)
        _import_worker_modules(getattr(server, "worker_class", None))

    def when_ready(self, server: Any) -> None:
        if self.watchdog is None:
            self.on_starting(server)
        assert self.watchdog is not None
        self.watchdog.start(server)

    def pre_fork(self, server: Any, worker: Any) -> None:
        self.slots.reset(worker.age, 0, slot_states.BOOTING)
        if self.limits.gc_freeze and server.cfg.preload_app:
            if not self._froze:
                gc.collect()  # garbage frozen now would stay for good
                self._froze = True
            # Objects made since the last fork join the permanent generation too.
            gc.freeze()

    def child_exit(self, server: Any, worker: Any) -> None:
        if self.watchdog is not None:
            self.watchdog.child_exit(worker)

    def on_exit(self, server: Any) -> None:
        if self.watchdog is not None:
            self.watchdog.stop()

    # ---- worker ----------------------------------------------------------------------

    def post_fork(self, server: Any, worker: Any) -> None:
        forked_at = time.monotonic()
        if self.limits.gc_freeze_at_fork and not server.cfg.preload_app:
            # Everything alive now came from the master and stays for the worker's life:
            # its collections (ours at the limit included) skip it and leave its pages
            # shared. The app is imported after this, and collected as usual.
            gc.freeze()
        forward_to(worker.log)
        counters.reset()  # a worker counts its own recycles, not its master's
        self.watchdog = None
        self.slots.set_pid(worker.age, os.getpid())
        recycler = recycle.gunicorn_recycler(worker)
        recycle.set_recycler(recycler)
        # Without the watchdog's thread nobody would answer a request for a replacement.
        doorbell = self.doorbell if self.limits.interval > 0 else None
        self.monitor = WorkerMonitor(worker, self.limits, self.slots, recycler, doorbell)
        self.monitor.started_at = forked_at

    def post_worker_init(self, worker: Any) -> None:
        monitor = self.monitor
        if monitor is None:
            return
        if is_uvicorn_worker(worker):
            _adapt_uvicorn_worker(worker, monitor, self.slots)
        _listen_for_retire(worker, monitor)
        monitor.ready()

    def pre_request(self, worker: Any, req: Any) -> None:
        monitor = self.monitor
        if monitor is not None:
            monitor.before_request(getattr(req, "path", None))

    def post_request(self, worker: Any, req: Any, environ: Any, resp: Any) -> None:
        monitor = self.monitor
        if monitor is not None:
            monitor.after_request()

    def worker_exit(self, server: Any, worker: Any) -> None:
        # gunicorn also calls this in the master for a worker that vanished.
        if worker.pid == os.getpid():
            _, state, _, _ = self.slots.read(worker.age)
            if state != slot_states.RECYCLING:
                self.slots.set_state(worker.age, slot_states.EXITED)
            monitor = self.monitor
            recycled = state == slot_states.RECYCLING or (
                monitor is not None and monitor.recycler.started)
            if recycled and self.limits.fast_exit:
                # The last thing gunicorn does in a worker (this hook runs after any of
                # the user's): a recycled worker skips the interpreter's teardown.
                exit_without_teardown(0)


def _adapt_uvicorn_worker(worker: Any, monitor: WorkerMonitor, slots: SlotTable) -> None:
    """Make ``uvicorn-worker``'s worker recycle like the others.

    It never calls ``post_request`` and never reads ``alive``: its app is wrapped so the
    same check runs after each HTTP request, and the recycle is a SIGTERM to itself.
    Its drain gets gunicorn's ``graceful_timeout`` (uvicorn's own default is unlimited),
    and the master's timeout SIGABRT calls ``worker_abort`` and exits (code 1) instead of
    dumping core (its ``init_signals`` resets SIGABRT to the default action).
    """
    if getattr(worker.config, "timeout_graceful_shutdown", None) is None:
        worker.config.timeout_graceful_shutdown = worker.cfg.graceful_timeout

    inner = worker.wsgi

    async def checked_app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await inner(scope, receive, send)
            return
        monitor.before_request(scope.get("path"))
        try:
            await inner(scope, receive, send)
        finally:
            try:
                monitor.after_request()
            except Exception:  # a failing check must never fail a request
                worker.log.exception("memguard: worker memory check failed")

    worker.wsgi = checked_app

    def on_abort(sig: int, frame: Any) -> None:
        worker.alive = False
        try:
            worker.cfg.worker_abort(worker)
        finally:
            # Not sys.exit(1) as gunicorn's own workers do: raised inside the app that
            # blocked the loop, uvicorn would catch SystemExit as an app error, answer
            # 500, and serve on until the master's SIGKILL.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)

    signal.signal(signal.SIGABRT, on_abort)

    def on_term(sig: int, frame: Any) -> None:
        # uvicorn replaces this handler while it serves, and raises SIGTERM again with
        # it restored once its graceful shutdown is over (from inside its event loop):
        # run the atexit handlers a signal death skips (the metrics' last sync among
        # them), mark the clean exit for the master's forensics, then die of SIGTERM as
        # the worker would have. Not threading's shutdown: joining threads from inside
        # the loop can wait for ever (measured: recycled workers hung).
        _, state, _, _ = slots.read(worker.age)
        if state != slot_states.RECYCLING:
            slots.set_state(worker.age, slot_states.EXITED)
        try:
            atexit._run_exitfuncs()
        except Exception:  # an exit must not fail on a handler
            worker.log.exception("memguard: an atexit handler failed")
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_term)


def _listen_for_retire(worker: Any, monitor: WorkerMonitor) -> None:
    """SIGUSR2 from the master: this worker's replacement is ready (or there is no
    room to boot one first), so it recycles now, its own way (the worker's recycler
    stops accepting first where its server needs that). gunicorn's workers leave
    SIGUSR2 at its default action, which the master never sends them otherwise.
    """

    def on_retire(*_: Any) -> None:
        try:
            monitor.retire()
        except Exception:  # a failing recycle must never kill the worker
            worker.log.exception("memguard: recycle on the master's request failed")

    loop = getattr(worker, "loop", None)  # gunicorn's asgi worker: its loop's handlers
    if loop is not None and hasattr(loop, "add_signal_handler"):
        loop.add_signal_handler(signal.SIGUSR2, on_retire)
    else:
        signal.signal(signal.SIGUSR2, on_retire)
    if hasattr(signal, "siginterrupt"):
        signal.siginterrupt(signal.SIGUSR2, False)


_guard: Guard | None = None


def install(namespace: MutableMapping[str, Any], **options: Any) -> Guard:
    """Add memguard's hooks to a gunicorn config namespace (``globals()``).

    ``options`` are the ``gunicorn`` section's options, with or without their
    ``gunicorn_`` prefix (``worker_memory_limit="80MiB"``, ``worker_memory_hard_limit``,
    ``total_memory_limit``, ...); what is not given comes from ``MEMGUARD_*`` environment
    variables, then defaults. A hook the namespace already defines runs first, then
    memguard's. Call it after your own hooks are defined. Returns the :class:`Guard`.
    """
    global _guard
    limits = resolve_limits(options)
    # One guard per master: a config read again (gunicorn reload) keeps the slot table
    # its workers share, and takes the new limits.
    if _guard is None:
        _guard = Guard(limits)
    else:
        _guard.limits = limits
    guard = _guard
    # The middleware, in the master (--preload) and in each worker, leaves the
    # after-response check to this integration's worker monitor and takes its limits.
    recycle.set_server((limits.soft, limits.hard))
    for name in HOOKS:
        ours = getattr(guard, name)
        theirs = namespace.get(name)
        if getattr(theirs, "__memguard__", False):
            theirs = getattr(theirs, "__memguard_chained__", None)
        namespace[name] = _chain(name, theirs, ours)
    return guard


def _chain(name: str, theirs: Callable[..., Any] | None,
           ours: Callable[..., Any]) -> Callable[..., Any]:
    """A hook with the exact arity gunicorn checks, calling ``theirs`` then ``ours``.

    Ours never raises: a failing hook must never kill a worker or the master.
    """

    def call_ours(*args: Any) -> None:
        try:
            ours(*args)
        except Exception:
            log = getattr(args[0], "log", None)
            if log is not None:
                log.exception("memguard: %s hook failed", name)

    def run(*args: Any) -> None:
        try:
            if theirs is not None:
                theirs(*args)
        finally:
            call_ours(*args)

    def hook4(worker: Any, req: Any, environ: Any, resp: Any) -> None:
        run(worker, req, environ, resp)

    def hook2(server: Any, worker: Any) -> None:
        run(server, worker)

    def hook1(arg: Any) -> None:
        run(arg)

    hook: Any = hook4 if name == "post_request" else (
        hook2 if name in ("pre_fork", "post_fork", "worker_exit", "child_exit", "pre_request")
        else hook1)
    hook.__name__ = name
    hook.__memguard__ = True
    # Not __wrapped__: inspect.signature (gunicorn's arity check) would follow it.
    hook.__memguard_chained__ = theirs
    chained: Callable[..., Any] = hook
    return chained
