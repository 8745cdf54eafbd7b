"""The gunicorn integration's pieces, in-process: options, hook chaining, recyclers, the
shared slot table. The behaviour under real gunicorn is in test_gunicorn_recycle.py."""

from __future__ import annotations

import mmap
import os
import signal
from collections.abc import Iterator
from typing import Any

import pytest
from gunicorn.config import Config
from gunicorn.glogging import Logger
from gunicorn.workers.gasgi import ASGIWorker
from gunicorn.workers.gthread import ThreadWorker
from gunicorn.workers.sync import SyncWorker
from uvicorn_worker import UvicornWorker

import memguard.gunicorn
from memguard import recycle
from memguard.gunicorn import HOOKS, install, is_uvicorn_worker
from memguard.gunicorn import slots as slot_states
from memguard.gunicorn.limits import resolve_limits
from memguard.gunicorn.slots import SlotTable
from memguard.recycle import release_memory
from memguard.system import memory_budget

MIB = 1 << 20


# ---- options --------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _no_guard_left_behind(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """install() keeps its Guard in the module, and registers itself with
    memguard.recycle, as a worker forked from the master needs; in this test process it
    would make the middleware of later tests believe it runs under memguard's gunicorn
    integration."""
    monkeypatch.setattr(memguard.gunicorn, "_guard", None)
    previous = recycle.server_limits()
    yield
    recycle.set_server(previous)


def test_env_contract_names() -> None:
    env = {"MEMGUARD_WORKER_MEMORY_LIMIT": "80MiB",
           "MEMGUARD_WORKER_MEMORY_HARD_LIMIT": "120MiB",
           "MEMGUARD_TOTAL_MEMORY_LIMIT": "360MiB"}
    limits = resolve_limits({}, environ=env)
    assert (limits.soft, limits.hard, limits.total) == (80 * MIB, 120 * MIB, 360 * MIB)
    assert limits.total_source == "configured"


def test_keyword_beats_environment_and_accepts_short_names() -> None:
    limits = resolve_limits({"worker_memory_limit": "64MiB"},
                            environ={"MEMGUARD_WORKER_MEMORY_LIMIT": "80MiB"})
    assert limits.soft == 64 * MIB
    limits = resolve_limits({"gunicorn_worker_memory_limit": "32MiB"}, environ={})
    assert limits.soft == 32 * MIB


def test_percentages_are_of_the_container_limit() -> None:
    limits = resolve_limits({}, environ={"MEMGUARD_WORKER_MEMORY_LIMIT": "25%"})
    assert limits.soft == int(limits.container * 0.25)


def test_default_budget_is_ninety_percent_of_a_cgroup_limit() -> None:
    limits = resolve_limits({}, environ={})
    budget = memory_budget()
    if budget.constrained:
        assert limits.total == int(budget.limit * 0.9)
    else:
        assert limits.total is None and limits.total_source == "no cgroup limit"


def test_bad_options_are_precise_errors() -> None:
    with pytest.raises(TypeError, match="did you mean 'worker_memory_limit'"):
        resolve_limits({"worker_memory_limt": "1MiB"}, environ={})
    with pytest.raises(ValueError, match="must be above"):
        resolve_limits({"worker_memory_limit": "100MiB",
                        "worker_memory_hard_limit": "90MiB"}, environ={})
    with pytest.raises(ValueError, match="MEMGUARD_WORKER_MEMORY_LIMIT"):
        resolve_limits({}, environ={"MEMGUARD_WORKER_MEMORY_LIMIT": "eighty"})
    with pytest.raises(ValueError, match="at least 1"):
        resolve_limits({"max_concurrent_recycles": 0}, environ={})


# ---- install() and hook chaining --------------------------------------------------------


def test_install_defines_every_hook_with_the_arity_gunicorn_checks() -> None:
    namespace: dict[str, Any] = {}
    install(namespace, worker_memory_limit="80MiB")
    cfg = Config()
    for name in HOOKS:
        cfg.set(name, namespace[name])  # raises TypeError on a wrong arity
        assert cfg.settings[name].get() is namespace[name]


def test_install_calls_the_users_hook_first_and_survives_its_own_errors() -> None:
    calls: list[str] = []

    def post_request(worker: Any, req: Any, environ: Any, resp: Any) -> None:
        calls.append("user")

    namespace: dict[str, Any] = {"post_request": post_request}
    guard = install(namespace)
    guard.monitor = None  # the master: memguard's part does nothing
    namespace["post_request"](object(), None, None, None)
    assert calls == ["user"]

    class Broken:
        def after_request(self) -> None:
            calls.append("memguard")
            raise RuntimeError("boom")

    class Log:
        def exception(self, msg: str, *args: Any) -> None:
            calls.append("logged " + msg % args)

    class Worker:
        log = Log()

    guard.monitor = Broken()  # type: ignore[assignment]
    try:
        namespace["post_request"](Worker(), None, None, None)
    finally:
        guard.monitor = None
    assert calls == ["user", "user", "memguard", "logged memguard: post_request hook failed"]


def test_install_twice_does_not_chain_memguard_to_itself() -> None:
    calls: list[str] = []

    def on_exit(server: Any) -> None:
        calls.append("user")

    namespace: dict[str, Any] = {"on_exit": on_exit}
    install(namespace)
    install(namespace)
    namespace["on_exit"](object())
    assert calls == ["user"]


# ---- recyclers per worker class ---------------------------------------------------------


@pytest.fixture
def cfg() -> Config:
    return Config()


def make(cls: Any, cfg: Config) -> Any:
    worker = cls(1, os.getpid(), [], None, 30, cfg, Logger(cfg))
    return worker


@pytest.fixture
def workers(cfg: Config) -> Iterator[dict[str, Any]]:
    made = {"sync": make(SyncWorker, cfg), "gthread": make(ThreadWorker, cfg),
            "asgi": make(ASGIWorker, cfg), "uvicorn": make(UvicornWorker, cfg)}
    yield made
    for worker in made.values():
        worker.tmp.close()


def test_each_worker_class_gets_the_recycler_its_code_honours(workers: dict[str, Any]) -> None:
    assert type(recycle.gunicorn_recycler(workers["sync"])) is recycle.AliveFlagRecycler
    assert type(recycle.gunicorn_recycler(workers["gthread"])) is recycle.AliveFlagRecycler
    assert type(recycle.gunicorn_recycler(workers["asgi"])) is recycle.AsgiWorkerRecycler
    assert type(recycle.gunicorn_recycler(workers["uvicorn"])) is recycle.UvicornWorkerRecycler
    assert is_uvicorn_worker(workers["uvicorn"]) and not is_uvicorn_worker(workers["sync"])


def test_alive_flag_recycler_stops_the_worker_once(workers: dict[str, Any],
                                                   caplog: pytest.LogCaptureFixture) -> None:
    worker = workers["sync"]
    recycler = recycle.AliveFlagRecycler(worker)
    assert recycler.recycle("soft_limit", {"uss": 81 * MIB, "limit": 80 * MIB}) is True
    assert worker.alive is False
    assert recycler.recycle("soft_limit", {}) is False


def test_request_recycle_counts_and_never_raises(workers: dict[str, Any]) -> None:
    from memguard import counters

    worker = workers["sync"]
    previous = recycle.set_recycler(recycle.AliveFlagRecycler(worker))
    try:
        before = counters.get("recycle", "soft_limit")
        assert recycle.request_recycle("soft_limit", uss=1) is True
        assert counters.get("recycle", "soft_limit") == before + 1
        assert recycle.request_recycle("soft_limit", uss=1) is False

        class Failing:
            def recycle(self, reason: str, figures: dict[str, Any]) -> bool:
                raise RuntimeError("broken")

        recycle.set_recycler(Failing())
        assert recycle.request_recycle("soft_limit") is False
    finally:
        recycle.set_recycler(previous)


def test_signal_recycler_signals_itself_once() -> None:
    received: list[int] = []
    old = signal.signal(signal.SIGUSR2, lambda sig, frame: received.append(sig))
    try:
        recycler = recycle.SignalRecycler(signal.SIGUSR2)
        assert recycler.recycle("soft_limit", {"growth": 70 * MIB}) is True
        assert recycler.recycle("soft_limit", {}) is False
    finally:
        signal.signal(signal.SIGUSR2, old)
    assert received == [signal.SIGUSR2]


def test_figures_are_logged_with_sizes() -> None:
    text = recycle.format_figures({"uss": 85 * MIB, "limit": 80 * MIB, "requests": 37})
    assert text == "uss=85.0 MiB limit=80.0 MiB requests=37"


# ---- the shared slot table ------------------------------------------------------------


def test_slots_are_shared_with_a_forked_child() -> None:
    table = SlotTable()
    table.reset(7, 0, slot_states.BOOTING)
    pid = os.fork()
    if pid == 0:  # the child: a worker saying it is recycling
        table.set_pid(7, os.getpid())
        table.set_figures(7, 90 * MIB, 12)
        table.set_state(7, slot_states.RECYCLING)
        os._exit(0)
    os.waitpid(pid, 0)
    assert table.read(7) == (pid, slot_states.RECYCLING, 90 * MIB, 12)
    assert table.read(7 + table.slots) == table.read(7)  # ages wrap around
    assert table.pool_view(own_age=1) == (90 * MIB, 0)
    table.reset(8, 123, slot_states.SERVING)
    table.set_figures(8, 50 * MIB, 3)
    assert table.pool_view(own_age=1) == (90 * MIB, 50 * MIB)
    assert table.pool_view(own_age=8) == (90 * MIB, 0)
    assert table.claim_once(SlotTable.FLAG_BORN_OVER) is True
    assert table.claim_once(SlotTable.FLAG_BORN_OVER) is False


def test_release_memory_trims_on_glibc() -> None:
    import platform

    assert release_memory() is (platform.libc_ver()[0] == "glibc")


def test_the_default_budget_can_be_turned_off() -> None:
    limits = resolve_limits({}, environ={"MEMGUARD_TOTAL_MEMORY_LIMIT": "off"})
    assert limits.total is None and limits.total_source == "turned off"


class RecordingLog:
    def __init__(self) -> None:
        self.lines: list[tuple[str, str]] = []

    def _add(self, level: str, msg: str, *args: Any) -> None:
        self.lines.append((level, msg % args if args else msg))

    def info(self, msg: str, *args: Any) -> None:
        self._add("info", msg, *args)

    def warning(self, msg: str, *args: Any) -> None:
        self._add("warning", msg, *args)

    def error(self, msg: str, *args: Any) -> None:
        self._add("error", msg, *args)

    def exception(self, msg: str, *args: Any) -> None:
        self._add("exception", msg, *args)


def test_start_warns_when_one_oom_kill_ends_the_whole_container(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import dataclasses
    import types

    from memguard import gunicorn as integration
    from memguard import system

    real = system.read_cgroup()
    if real is None:
        pytest.skip("no memory cgroup to start from")
    monkeypatch.setattr(integration.system, "read_cgroup",
                        lambda *a, **k: dataclasses.replace(real, oom_group=True))
    guard = integration.Guard(resolve_limits({"worker_memory_limit": "80MiB"}, environ={}))
    log = RecordingLog()
    guard.on_starting(types.SimpleNamespace(log=log, cfg=types.SimpleNamespace(
        preload_app=False)))
    warnings = [text for level, text in log.lines if level == "warning"]
    assert any("memory.oom.group=1" in text and "the master included" in text
               for text in warnings), log.lines


def test_child_exit_tells_apart_timeout_recycle_exit_and_crash(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import types

    from memguard.gunicorn import watchdog as watchdog_module
    from memguard.gunicorn.watchdog import Watchdog

    # Outside a limited cgroup the counter is the system's, which other processes on
    # this machine move: hold it still (the real counter is tested under gunicorn).
    counter = [5]
    monkeypatch.setattr(watchdog_module, "read_oom_kills", lambda cgroup: (counter[0], "cgroup"))
    slots = SlotTable()
    log = RecordingLog()
    watchdog = Watchdog(resolve_limits({}, environ={}), slots, log)

    def died(age: int, state: int, aborted: bool = False) -> str:
        slots.reset(age, 1000 + age, state)
        worker = types.SimpleNamespace(pid=1000 + age, age=age, aborted=aborted)
        return str(watchdog.child_exit(worker)["cause"])

    assert died(1, slot_states.SERVING, aborted=True) == "timeout"
    assert died(2, slot_states.RECYCLING) == "recycled"
    assert died(3, slot_states.EXITED) == "exit"
    assert died(4, slot_states.SERVING) == "killed_or_crashed"
    assert slots.read(4) == (0, slot_states.EMPTY, 0, 0)  # the master frees the slot
    counter[0] = 6
    assert died(5, slot_states.SERVING) == "oom_kill"
    assert died(6, slot_states.SERVING) == "killed_or_crashed"  # one kill, one victim
    assert [level for level, _ in log.lines] == ["error", "info", "info", "error", "error",
                                                 "error"]
    assert "killed by the kernel's OOM killer" in log.lines[4][1]


def test_uvicorn_worker_gets_a_bounded_drain_and_a_checked_app(
    workers: dict[str, Any],
) -> None:
    import asyncio

    from memguard.gunicorn import _adapt_uvicorn_worker
    from memguard.gunicorn.worker import WorkerMonitor

    worker = workers["uvicorn"]
    assert worker.config.timeout_graceful_shutdown is None  # uvicorn's: wait forever
    calls: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        calls.append(scope["type"])

    worker.wsgi = app
    table = SlotTable()
    monitor = WorkerMonitor(worker, resolve_limits({}, environ={}), table,
                            recycle.gunicorn_recycler(worker))
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGABRT, signal.SIGTERM)}
    try:
        _adapt_uvicorn_worker(worker, monitor, table)
        assert signal.getsignal(signal.SIGABRT) not in (signal.SIG_DFL, saved[signal.SIGABRT])
        assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, saved[signal.SIGTERM])
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    assert worker.config.timeout_graceful_shutdown == worker.cfg.graceful_timeout
    asyncio.run(worker.wsgi({"type": "http"}, None, None))
    asyncio.run(worker.wsgi({"type": "lifespan"}, None, None))
    assert calls == ["http", "lifespan"]
    assert monitor.requests == 1 and monitor.in_flight == 0  # only HTTP is counted


def test_slot_table_keeps_each_workers_last_paths() -> None:
    from memguard.gunicorn.slots import PATH_BYTES, RECENT, SlotTable

    table = SlotTable(slots=4)
    for n in range(RECENT + 5):
        table.note_request(6, f"/items/{n}")
    table.note_request(6, "/" + "é" * 100)  # truncated to the slot's bytes, still text
    paths, started = table.recent_paths(6)
    assert started == RECENT + 6 and len(paths) == RECENT
    assert paths[0] == "/items/6" and paths[-2] == f"/items/{RECENT + 4}"
    assert paths[-1].startswith("/éé") and len(paths[-1].encode()) <= PATH_BYTES - 1
    assert table.recent_paths(7) == ([], 0)  # another worker's slot
    table.reset(6)
    assert table.recent_paths(6) == ([], 0)


# ---- the worker's own check -------------------------------------------------------------


class RecordingRecycler:
    def __init__(self) -> None:
        self.reasons: list[str] = []

    def recycle(self, reason: str, figures: dict[str, Any]) -> bool:
        self.reasons.append(reason)
        return True


def _one_request_growing(monitor: Any, grow: int, others: int = 0) -> mmap.mmap | None:
    """A request that keeps ``grow`` bytes, with ``others`` more in flight beside it.

    Fresh pages of their own (an anonymous map, each page written): a bytearray could
    reuse memory this long-lived test process freed, and RSS would not grow."""
    for _ in range(others + 1):
        monitor.before_request("/")
    kept = None
    if grow:
        kept = mmap.mmap(-1, grow)
        for offset in range(0, grow, mmap.PAGESIZE):
            kept[offset] = 1
    monitor.after_request()
    monitor.in_flight = 0
    return kept


@pytest.mark.parametrize("burst_seen", [False, True])
def test_a_worker_counts_the_pools_largest_burst_ahead(
    workers: dict[str, Any], burst_seen: bool
) -> None:
    """An event-loop worker accepts a burst of connections between two of its checks, and
    those requests keep their share whatever the check decides: a worker recycles that
    many requests' growth before its limit, even a fresh worker that has not seen the
    burst itself (the pool's largest burst is in the shared table)."""
    from memguard.gunicorn.worker import WorkerMonitor

    table = SlotTable()
    kept = []
    if burst_seen:
        # Another worker of the pool once had 8 requests in flight at once.
        first = workers["asgi"]
        first.age = 1
        other = WorkerMonitor(first, resolve_limits({}, environ={}), table,
                              recycle.AliveFlagRecycler(first))
        other.ready()
        kept.append(_one_request_growing(other, 0, others=8))
        assert other.burst == 8 and table.burst() == 8
    recorder = RecordingRecycler()
    previous = recycle.set_recycler(recorder)
    try:
        worker = workers["sync"]
        worker.age = 2
        uss = recycle.own_uss() or 0
        limits = resolve_limits({"worker_memory_limit": uss + 24 * MIB}, environ={})
        monitor = WorkerMonitor(worker, limits, table, recorder)
        monitor.ready()
        assert monitor.burst == (8 if burst_seen else 0)
        monitor.ready_at -= 60  # past the first seconds, when growth may be warming up
        # A first request (its growth would be caches), then two keeping 3 MiB each:
        # 6 MiB of growth, 18 MiB under the limit.
        kept.append(_one_request_growing(monitor, 0))
        kept.append(_one_request_growing(monitor, 3 * MIB))
        kept.append(_one_request_growing(monitor, 3 * MIB))
    finally:
        recycle.set_recycler(previous)
    for kept_map in kept:
        if kept_map is not None:
            kept_map.close()
    # 8 requests x 3 MiB ahead pass the limit; without a burst the worker serves on.
    assert recorder.reasons == (["soft_limit"] if burst_seen else [])


def test_room_for_an_overlap_counts_each_worker_at_what_it_may_reach() -> None:
    """Four workers near an 80 MiB soft limit in a 360 MiB budget leave no room for a
    replacement beside one of them; two workers of 24 MiB do."""
    from memguard.gunicorn.limits import overlap_room

    table = SlotTable(slots=8)
    for age in range(4):
        table.reset(age, 100 + age, slot_states.SERVING)
        table.set_figures(age, 70 * MIB, 20)
    figures, committed = table.commitments(80 * MIB, asking_age=0, asking_growth=6 * MIB)
    assert (figures, committed) == (280 * MIB, 326 * MIB)
    assert overlap_room(360 * MIB, 330 * MIB, figures, committed, 20 * MIB) is None
    small = SlotTable(slots=8)
    for age in range(2):
        small.reset(age, 100 + age, slot_states.SERVING)
        small.set_figures(age, 22 * MIB, 20)
    small.reset(2, 0, slot_states.BOOTING)  # a replacement booting: at the soft limit too
    figures, committed = small.commitments(24 * MIB, asking_age=1, asking_growth=2 * MIB)
    assert committed == 74 * MIB and small.asking(0) == 0
    room = overlap_room(360 * MIB, 90 * MIB, figures, committed, 20 * MIB)
    assert room is not None and room == 360 * MIB - 46 * MIB - 74 * MIB - 20 * MIB - int(
        360 * MIB * 0.15)
    small.set_state(1, slot_states.REPLACE)
    assert small.asking(0) == 1 and small.asking(1) == 0
