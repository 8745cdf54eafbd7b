"""Worker recycling on real gunicorn (and uvicorn) in real memory cgroups.

The reproduction from issue 6: 4 workers, a 400 MiB group, an app that keeps 2 MiB per
request, 2,000 requests from 8 client threads. Plain gunicorn is OOM-killed and fails
requests (asserted, so the test can fail); with ``-c python:memguard.gunicorn.conf``
and ``MEMGUARD_WORKER_MEMORY_LIMIT=80MiB``: no OOM kill, no failed request, for every
worker class.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from memguard.cli import report
from tests.support.cgroups import MemoryCgroup
from tests.support.servers import Server, http_request, serve

pytestmark = [pytest.mark.server, pytest.mark.cgroup]

CONF = ["-c", "python:memguard.gunicorn.conf"]
REQUESTS = 2000
CLIENTS = 8


def load(url: str, count: int = REQUESTS, clients: int = CLIENTS,
         path: str = "/") -> tuple[int, int, list[str]]:
    """``count`` GETs from ``clients`` threads, one connection each: (ok, failed, errors)."""
    lock = threading.Lock()
    state = {"next": 0, "ok": 0, "failed": 0}
    errors: list[str] = []

    def client() -> None:
        while True:
            with lock:
                if state["next"] >= count:
                    return
                state["next"] += 1
            try:
                status, _, _ = http_request(url, path=path, timeout=60)
                error = None if status == 200 else f"status {status}"
            except Exception as exc:  # a reset, a refused connection: a failed request
                error = repr(exc)
            with lock:
                if error is None:
                    state["ok"] += 1
                else:
                    state["failed"] += 1
                    errors.append(error)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return state["ok"], state["failed"], errors


def events(path: Path) -> list[dict[str, object]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def wait_for(predicate: object, timeout: float = 15) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.1)
    return False


@pytest.fixture
def group(needs_cgroup: None) -> Iterator[MemoryCgroup]:
    """A fresh 400 MiB memory cgroup (tests using it skip where cgroups are not writable)."""
    with MemoryCgroup("400MiB") as g:
        yield g


def test_plain_gunicorn_is_oom_killed(group: MemoryCgroup, repo: Path) -> None:
    """The baseline: without memguard the same load ends in OOM kills and failures."""
    with serve("gunicorn", "tests.apps.leaky:wsgi_app", ["-w", "4"], cwd=repo,
               cgroup=group, ready_path="/ping") as server:
        ok, failed, _ = load(server.url)
    assert group.oom_kills > 0
    assert failed > 0
    assert ok + failed == REQUESTS


WORKER_CLASSES = {
    "sync": (["-w", "4"], "tests.apps.leaky:wsgi_app"),
    "gthread": (["-w", "4", "-k", "gthread", "--threads", "4"], "tests.apps.leaky:wsgi_app"),
    "asgi": (["-w", "4", "-k", "asgi", "--preload"], "tests.apps.leaky_fastapi:app"),
    "uvicorn_worker": (["-w", "4", "-k", "uvicorn_worker.UvicornWorker", "--preload"],
                       "tests.apps.leaky_fastapi:app"),
}


@pytest.mark.parametrize("kind", list(WORKER_CLASSES))
def test_memguard_recycles_leaking_workers_without_oom_or_failures(
    kind: str, group: MemoryCgroup, repo: Path, tmp_path: Path
) -> None:
    args, app = WORKER_CLASSES[kind]
    event_log = tmp_path / "events.jsonl"
    env = {"MEMGUARD_WORKER_MEMORY_LIMIT": "80MiB", "MEMGUARD_EVENTS": str(event_log)}
    with serve("gunicorn", app, [*CONF, *args], env=env, cwd=repo, cgroup=group,
               ready_path="/ping") as server:
        ok, failed, errors = load(server.url)
        log = server.log()
    assert group.oom_kills == 0, log[-3000:]
    assert failed == 0, errors[:5]
    assert ok == REQUESTS
    # 2,000 x 2 MiB = 4,000 MiB leaked through 80 MiB workers: dozens of recycles.
    lines = [line for line in log.splitlines() if "recycl" in line]
    assert len(lines) >= 20, log[-3000:]
    line = next(line for line in lines if "soft_limit" in line)
    pid = re.search(r"recycling worker (\d+)", line)
    assert pid is not None and f"[{pid.group(1)}]" in line  # logged by the worker itself
    assert "uss=" in line and "limit=" in line and "requests=" in line
    assert "OOM" not in log
    kinds = [e["kind"] for e in events(event_log)]
    assert kinds.count("recycle") >= 20
    assert "limit" in kinds and "worker_exit" in kinds
    assert group.peak <= group.limit
    # The timeline report reads them: recycles, one master, the workers' lines.
    timeline = report.load(event_log)
    assert len(timeline.recycles) >= 20 and not timeline.oom_kills
    assert len(timeline.masters) == 1 and len(timeline.workers) >= 20
    assert timeline.limits.get("worker_soft_limit") == 80 * 2**20
    assert "worker_soft_limit" in timeline.worker_limits()


def _master_log_lines(server: Server, needle: str) -> list[str]:
    return [line for line in server.log().splitlines() if needle in line]


def test_leak_inside_one_long_request_is_stopped_by_the_master(
    group: MemoryCgroup, repo: Path
) -> None:
    env = {"MEMGUARD_WORKER_MEMORY_LIMIT": "80MiB",
           "MEMGUARD_WORKER_MEMORY_HARD_LIMIT": "120MiB"}
    with serve("gunicorn", "tests.apps.leaky:wsgi_app", [*CONF, "-w", "2"], env=env,
               cwd=repo, cgroup=group, ready_path="/ping") as server:
        started = time.monotonic()
        # 600 MiB over 6 s inside one request: the worker's own check never runs.
        try:
            status, _, _ = http_request(server.url, path="/slow-leak?mib=600&seconds=6",
                                        timeout=30)
        except Exception:
            status = 0
        elapsed = time.monotonic() - started
        assert status != 200
        assert elapsed < 6
        assert wait_for(lambda: _master_log_lines(server, "cause=hard_limit"))
        # The pool serves on.
        assert http_request(server.url, path="/ping")[0] == 200
        log = server.log()
    assert group.oom_kills == 0, log[-3000:]
    stop = next(line for line in log.splitlines() if "(hard_limit, by the master" in line)
    assert "recycling worker" in stop and "over the hard limit 120.0 MiB" in stop


def test_idle_worker_that_grew_is_recycled_by_the_watchdog(
    group: MemoryCgroup, repo: Path
) -> None:
    env = {"MEMGUARD_WORKER_MEMORY_LIMIT": "80MiB"}
    with serve("gunicorn", "tests.apps.leaky:wsgi_app", [*CONF, "-w", "2"], env=env,
               cwd=repo, cgroup=group, ready_path="/ping") as server:
        before = set(server.wait_for_workers(2))
        _, _, body = http_request(server.url, path="/grow-later?mib=120&delay=0.3")
        grown = int(body.split()[1])
        assert grown in before
        assert wait_for(lambda: _master_log_lines(server, "(soft_limit, by the master"))
        assert wait_for(lambda: grown not in server.children()
                        and len(server.children()) == 2)
        assert wait_for(lambda: _master_log_lines(server, f"worker {grown} exited"))
        log = server.log()
    line = next(line for line in log.splitlines() if "by the master's watchdog" in line)
    assert f"recycling worker {grown} " in line and "uss=" in line
    assert f"worker {grown} exited: cause=recycled" in log
    assert group.oom_kills == 0


def test_worker_born_over_its_limit_is_reported_once_not_recycled(
    group: MemoryCgroup, repo: Path
) -> None:
    env = {"MEMGUARD_WORKER_MEMORY_LIMIT": "60MiB", "LEAKY_BORN_MIB": "80"}
    with serve("gunicorn", "tests.apps.leaky:wsgi_app", [*CONF, "-w", "2"], env=env,
               cwd=repo, cgroup=group, ready_path="/ping") as server:
        ok, failed, _ = load(server.url, count=100, clients=4, path="/ping")
        time.sleep(2.5)  # the watchdog had time to look (and must not act)
        log = server.log()
        assert len(server.children()) == 2
    assert (ok, failed) == (100, 0)
    assert log.count("Booting worker") == 2, log
    assert "recycling worker" not in log
    reports = [line for line in log.splitlines() if "is over its memory limit" in line]
    assert len(reports) == 1, reports
    assert "60.0 MiB when it became ready" in reports[0]


def test_gc_freeze_keeps_preloaded_pages_shared(repo: Path) -> None:
    """A worker's gc.collect() turns the master's objects private, unless frozen."""
    uss: dict[str, int] = {}
    for freeze in ("0", "1"):
        env = {"MEMGUARD_GC_FREEZE": freeze, "LEAKY_OBJECTS": "400000",
               "MEMGUARD_WATCHDOG_INTERVAL": "0.2"}
        with serve("gunicorn", "tests.apps.leaky:wsgi_app",
                   [*CONF, "-w", "1", "--preload"], env=env, cwd=repo,
                   ready_path="/ping") as server:
            http_request(server.url, path="/collect")
            (worker,) = server.wait_for_workers(1)
            from memguard.system import process_memory

            mem = process_memory(worker)
            assert mem.uss is not None
            uss[freeze] = mem.uss
            assert wait_for(lambda: _master_log_lines(server, "pool memory: master pss"))
    # 400,000 tuples and strings are tens of MiB; frozen, the collect leaves them shared.
    print("worker uss after gc.collect():", uss)
    assert uss["0"] - uss["1"] > 20 << 20, uss


def test_standalone_uvicorn_replaces_a_worker_that_asked_to_recycle(
    repo: Path,
) -> None:
    with serve("uvicorn", "tests.apps.uvicorn_recycle:app", ["--workers", "2"],
               cwd=repo) as server:
        pids = {int(http_request(server.url)[2]) for _ in range(20)}
        assert wait_for(lambda: len(server.children()) >= 2)
        first = set(server.children())
        # Each /leak keeps 10 MiB; past 60 MiB the worker sends itself SIGTERM after
        # its response, uvicorn drains it, and the supervisor starts another.
        errors: list[str] = []
        for _ in range(30):
            try:
                status, _, _ = http_request(server.url, path="/leak")
                if status != 200:
                    errors.append(f"status {status}")
            except Exception as exc:
                errors.append(repr(exc))
        assert wait_for(lambda: len(server.children()) >= 2
                        and set(server.children()) - first, timeout=20)
        log = server.log()
    assert errors == []
    assert pids
    assert "recycling worker" in log and "soft_limit" in log
    assert "died" in log  # uvicorn's supervisor: "Child process [pid] died"


def test_install_in_a_users_config_keeps_their_hooks(repo: Path, group: MemoryCgroup) -> None:
    with serve("gunicorn", "tests.apps.leaky:wsgi_app",
               ["-c", "python:tests.apps.gunicorn_user_conf", "-w", "2"], cwd=repo,
               cgroup=group, ready_path="/ping") as server:
        ok, failed, _ = load(server.url, count=200, clients=4)
        # post_request runs after the response is sent: the client may have its answer
        # before the hook's line is written.
        wait_for(lambda: server.log().count("user post_request hook ran") >= 200)
        log = server.log()
    assert (ok, failed) == (200, 0)
    assert log.count("user post_request hook ran") >= 200
    assert "recycling worker" in log and "soft_limit" in log  # 200 x 2 MiB > 2 x 80 MiB
    assert group.oom_kills == 0


def test_uvicorn_worker_timeout_calls_worker_abort_instead_of_dumping_core(
    repo: Path, group: MemoryCgroup
) -> None:
    with serve("gunicorn", "tests.apps.leaky_fastapi:app",
               ["-c", "python:tests.apps.gunicorn_user_conf", "-w", "1",
                "-k", "uvicorn_worker.UvicornWorker"], cwd=repo, cgroup=group,
               ready_path="/ping") as server:
        (worker,) = server.wait_for_workers(1)
        try:
            http_request(server.url, path="/block?seconds=8", timeout=15)
        except Exception:
            pass  # the worker is stopped under this request
        assert wait_for(lambda: _master_log_lines(server, f"worker {worker} died"))
        log = server.log()
    assert "WORKER TIMEOUT" in log
    assert f"user worker_abort hook ran in {worker}" in log
    assert "was sent SIGABRT" not in log  # the default action: a core dump
    assert f"worker {worker} died: cause=timeout" in log


def test_oom_kills_are_told_apart_in_child_exit(
    group: MemoryCgroup, repo: Path, tmp_path: Path
) -> None:
    """Without limits memguard only watches: the OOM kills happen, and are reported."""
    event_log = tmp_path / "events.jsonl"
    env = {"MEMGUARD_TOTAL_MEMORY_LIMIT": "off", "MEMGUARD_EVENTS": str(event_log)}
    with serve("gunicorn", "tests.apps.leaky:wsgi_app", [*CONF, "-w", "4"], env=env,
               cwd=repo, cgroup=group, ready_path="/ping") as server:
        load(server.url, count=1000)
        assert wait_for(lambda: _master_log_lines(server, "cause=oom_kill"))
        log = server.log()
        oom_events = [e for e in events(event_log) if e["kind"] == "oom_kill"]
    kills = group.oom_kills
    assert kills > 0
    reports = [line for line in log.splitlines() if "killed by the kernel's OOM killer" in line]
    assert 0 < len(reports) <= kills
    assert "last known memory" in reports[0] and "uss=" in "\n".join(reports)
    # What the dead worker was serving: every request of the load is to /.
    assert "top_paths=[/ (" in reports[0], reports[0]
    assert any("in_flight=/" in line for line in reports), reports
    assert "never recycled" in log  # the start-up warning: no limit set
    # The log was read first, and each kill's event is written before its log line.
    assert len(oom_events) >= len(reports)


def test_preloaded_worker_recycles_at_its_limit_not_past_it(
    group: MemoryCgroup, repo: Path, tmp_path: Path
) -> None:
    """A preloaded app's pages turn private at a worker's first full collection.

    memguard's own check collects garbage at the soft limit: if that were the first
    collection, every worker would jump past its limit by the app's shared heap at the
    moment memory is tightest (4 workers x 10 MiB for the FastAPI app tipped the 400 MiB
    group over under CPU load). The worker takes that collection when it becomes ready,
    so the figure it extrapolates from per request is honest and it leaves at its limit.
    """
    event_log = tmp_path / "events.jsonl"
    # 400,000 small lists in the master: about 50 MiB of pages a collection unshares.
    env = {"MEMGUARD_WORKER_MEMORY_LIMIT": "100MiB", "LEAKY_OBJECTS": "400000",
           "MEMGUARD_EVENTS": str(event_log), "MEMGUARD_WATCHDOG_INTERVAL": "0"}
    with serve("gunicorn", "tests.apps.leaky_fastapi:app",
               [*CONF, "-w", "1", "-k", "uvicorn_worker.UvicornWorker", "--preload"],
               env=env, cwd=repo, cgroup=group, ready_path="/ping") as server:
        ok, failed, errors = load(server.url, count=60, clients=1)
        log = server.log()
    assert (ok, failed) == (60, 0), errors[:5]
    recycles = [e for e in events(event_log)
                if e["kind"] == "recycle" and e.get("reason") == "soft_limit"]
    assert recycles, log[-3000:]
    for e in recycles:
        # One request (2 MiB) past the limit at most, and what collecting returned.
        over = int(e["uss"]) - int(e["limit"])  # type: ignore[call-overload]
        assert over <= 4 << 20, (e, log[-3000:])
    assert group.oom_kills == 0


def test_pool_check_sheds_the_last_serving_worker_past_the_ceiling(repo: Path,
                                                                    needs_cgroup: None) -> None:
    """Workers already recycling count as gone under the budget, not past its ceiling.

    Three workers of 60 MiB are draining in a 300 MiB group (budget 270 MiB, ceiling
    285 MiB). Just past the budget the last serving worker keeps serving: the leavers'
    180 MiB will come back. Past the ceiling it leaves too: they are still resident, and
    under CPU starvation their drain took long enough for the pool to pass 400 MiB.
    """
    import sys

    with MemoryCgroup("300MiB") as group:
        done = group.run([sys.executable, "-m", "tests.apps.pool_ceiling", "60"], cwd=repo)
        assert done.returncode == 0, done.stderr.decode()[-3000:]
        assert group.oom_kills == 0
    budget, ceiling = (json.loads(line) for line in done.stdout.decode().splitlines())
    assert budget["working_set"] + budget["reserve"] < budget["ceiling"]
    assert budget["recycles"] == []
    assert ceiling["working_set"] + ceiling["reserve"] >= ceiling["ceiling"]
    assert ceiling["recycles"] == ["pool_budget"]
    assert ceiling["figures"][0]["ceiling"] == ceiling["ceiling"] == 285 << 20


@pytest.mark.parametrize("fast_exit", ["1", "0"])
def test_recycled_worker_runs_exit_handlers_and_skips_only_the_teardown(
    repo: Path, group: MemoryCgroup, fast_exit: str
) -> None:
    """A recycled worker exits without the interpreter's teardown (MEMGUARD_FAST_EXIT,
    on by default), but after everything a user relies on at exit: their worker_exit
    hook, atexit handlers, non-daemon threads."""
    with serve("gunicorn", "tests.apps.leaky:wsgi_app",
               ["-c", "python:tests.apps.exit_conf", "-w", "2"], cwd=repo, cgroup=group,
               env={"MEMGUARD_FAST_EXIT": fast_exit}, ready_path="/ping") as server:
        ok, failed, _ = load(server.url, count=200, clients=4)
        recycled = {int(p) for p in re.findall(r"recycling worker (\d+)", server.log())}
        assert recycled  # 200 x 2 MiB > 2 x 80 MiB
        assert wait_for(lambda: all(f"worker {pid} exited" in server.log()
                                    for pid in recycled))
        log = server.log()
    assert (ok, failed) == (200, 0)
    for pid in recycled:
        assert f"worker {pid} exited: cause=recycled" in log
        assert f"user worker_exit hook ran in {pid}" in log
        assert f"atexit handler ran in {pid}" in log
        assert f"non-daemon thread finished in {pid}" in log
        assert (f"teardown ran in {pid}" in log) == (fast_exit == "0")
    assert group.oom_kills == 0


def test_worker_recycles_before_a_request_like_its_largest_would_pass_the_hard_limit(
    repo: Path, group: MemoryCgroup
) -> None:
    """Steps larger than the gap between the limits: after 2 x 30 MiB the worker is
    under its 80 MiB soft limit, but one more such request would pass the 90 MiB hard
    one, where the master stops it mid-request. It recycles now, gracefully."""
    env = {"MEMGUARD_WORKER_MEMORY_LIMIT": "80MiB",
           "MEMGUARD_WORKER_MEMORY_HARD_LIMIT": "90MiB"}
    with serve("gunicorn", "tests.apps.leaky:wsgi_app", [*CONF, "-w", "1"], env=env,
               cwd=repo, cgroup=group, ready_path="/ping") as server:
        (pid,) = server.wait_for_workers(1)
        assert http_request(server.url, path="/ping")[0] == 200
        for _ in range(2):
            assert http_request(server.url, path="/grow?mib=30")[0] == 200
        assert wait_for(lambda: f"worker {pid} exited" in server.log())
        log = server.log()
    line = next(line for line in log.splitlines() if f"recycling worker {pid} " in line)
    assert "(hard_limit_ahead)" in line and "limit=90.0 MiB" in line, line
    growth = re.search(r"largest_request_growth=([\d.]+) MiB", line)
    assert growth is not None and 28 <= float(growth.group(1)) <= 34, line
    uss = re.search(r" uss=([\d.]+) MiB", line)
    assert uss is not None and float(uss.group(1)) < 80, line  # before the soft limit
    assert "by the master's watchdog" not in log
    assert group.oom_kills == 0


@pytest.mark.parametrize(("args", "env", "frozen"), [
    ([], {}, True),
    ([], {"MEMGUARD_GC_FREEZE_AT_FORK": "0"}, False),
    (["--preload"], {}, False),  # the app's objects: only MEMGUARD_GC_FREEZE freezes them
])
def test_worker_freezes_what_it_inherited_from_the_master_not_the_app(
    repo: Path, args: list[str], env: dict[str, str], frozen: bool
) -> None:
    with serve("gunicorn", "tests.apps.leaky:wsgi_app", [*CONF, "-w", "1", *args], env=env,
               cwd=repo, ready_path="/ping") as server:
        status, _, body = http_request(server.url, path="/gc-state")
    assert status == 200
    _, count, _, app_collectable = body.split()
    assert (int(count) > 1000) == frozen, body
    assert app_collectable == b"True", body


def test_two_workers_oom_killed_at_once_are_both_reported_with_their_memory(
    repo: Path, needs_cgroup: None, tmp_path: Path
) -> None:
    """Both workers grow past the group's limit together, before the watchdog ever
    samples them (its timer is off): each kill is reported, each with the last memory
    the worker itself published."""
    event_log = tmp_path / "events.jsonl"
    env = {"MEMGUARD_TOTAL_MEMORY_LIMIT": "off", "MEMGUARD_WATCHDOG_INTERVAL": "0",
           "MEMGUARD_EVENTS": str(event_log)}
    with MemoryCgroup("256MiB") as group, serve(
            "gunicorn", "tests.apps.leaky:wsgi_app", [*CONF, "-w", "2"], env=env,
            cwd=repo, cgroup=group, ready_path="/ping") as server:
        workers = set(server.wait_for_workers(2))
        for _ in range(4):  # each worker publishes a figure after a request
            http_request(server.url, path="/ping")
        statuses: list[int] = []

        def grow() -> None:
            try:
                statuses.append(http_request(server.url, path="/slow-leak?mib=400&seconds=2",
                                             timeout=30)[0])
            except Exception:
                statuses.append(0)

        threads = [threading.Thread(target=grow) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert wait_for(lambda: all(f"worker {pid} was killed by the kernel's OOM killer"
                                    in server.log() for pid in workers))
        log = server.log()
        kills = group.oom_kills
        oom_events = [e for e in events(event_log) if e["kind"] == "oom_kill"]
    assert statuses == [0, 0]
    assert kills == 2, log[-3000:]
    reports = [line for line in log.splitlines() if "killed by the kernel's OOM killer" in line]
    assert len(reports) == 2, reports
    for line in reports:
        uss = re.search(r" uss=([\d.]+) MiB", line)
        assert uss is not None and float(uss.group(1)) > 1, line
        assert "in_flight=/slow-leak" in line, line
    assert {e["pid"] for e in oom_events} == workers
    assert all(e.get("uss") for e in oom_events), oom_events


@pytest.mark.parametrize("kind", ["sync", "uvicorn_worker"])
def test_replacement_boots_before_the_worker_it_replaces_stops(
    kind: str, group: MemoryCgroup, repo: Path, tmp_path: Path
) -> None:
    """With room in the budget, a worker over its soft limit keeps serving while its
    replacement boots (0.3 s of import here), then leaves: the pool never runs a worker
    short, and the report's timeline shows the two lines overlap. Requests wait 50 ms
    and keep 128 KiB: a worker grows less while it waits than the margin it has."""
    event_log = tmp_path / "events.jsonl"
    args, app, limit = {
        "sync": (["-w", "2"], "tests.apps.leaky:wsgi_app", "24MiB"),
        "uvicorn_worker": (["-w", "2", "-k", "uvicorn_worker.UvicornWorker"],
                           "tests.apps.leaky_fastapi:app", "40MiB")}[kind]
    env = {"MEMGUARD_WORKER_MEMORY_LIMIT": limit, "MEMGUARD_EVENTS": str(event_log),
           "LEAKY_BOOT_SECONDS": "0.3", "LEAKY_BYTES": str(128 << 10),
           "LEAKY_REQUEST_SECONDS": "0.05"}
    with serve("gunicorn", app, [*CONF, *args], env=env, cwd=repo, cgroup=group,
               ready_path="/ping", timeout=60) as server:
        ok, failed, errors = load(server.url, count=400, clients=2)
        assert wait_for(lambda: "(spawn_first): the pool ran short" in server.log())
        log = server.log()
    assert (ok, failed) == (400, 0), errors[:5]
    assert group.oom_kills == 0
    assert "booting it first" in log, log[-3000:]
    ready = [line for line in log.splitlines() if "(spawn_first): the pool ran short 0.00s"
             in line]
    assert ready, log[-3000:]
    recorded = events(event_log)
    replacements = [e for e in recorded if e["kind"] == "replacement"
                    and e["way"] == "spawn_first"]
    assert replacements and all(e["short_seconds"] == 0 for e in replacements)
    recycles = [e for e in recorded if e["kind"] == "recycle" and e.get("way") == "spawn_first"]
    assert recycles and all(e["reason"] == "soft_limit" for e in recycles)
    timeline = report.load(event_log)
    first = replacements[0]
    new, old = (timeline.processes[int(first[k])] for k in ("worker_pid", "replaced"))  # type: ignore[call-overload]
    assert new.started is not None and old.ended is not None
    assert new.started < old.ended  # the replacement's line starts before the old ends
    assert timeline.max_concurrent_workers() == 3


@pytest.mark.parametrize("kind", ["sync", "uvicorn_worker"])
def test_zero_configuration_keeps_a_bursty_pool_alive(
    kind: str, group: MemoryCgroup, repo: Path
) -> None:
    """Only the ready config, no MEMGUARD_* variable, in a 400 MiB group: every 25th
    request keeps 24 MiB. The worker limits are derived from the pool's budget and the
    worker count, said at startup, and no request fails nor any worker is OOM-killed."""
    args, app = WORKER_CLASSES[kind]
    env = {"LEAKY_BYTES": str(24 << 20), "LEAKY_EVERY": "25"}
    with serve("gunicorn", app, [*CONF, *args], env=env, cwd=repo, cgroup=group,
               ready_path="/ping") as server:
        ok, failed, errors = load(server.url, count=1500)
        log = server.log()
    assert group.oom_kills == 0, log[-3000:]
    assert (ok, failed) == (1500, 0), errors[:5]
    start = next(line for line in log.splitlines() if "memguard: worker soft limit" in line)
    # 90% of 400 MiB shared by 4 workers and one replacement.
    assert "soft limit 72.0 MiB, hard limit 90.0 MiB, pool budget 360.0 MiB" in start, start
    assert "worker limits derived: the pool budget 360.0 MiB shared by 4 workers and one " \
        "replacement" in start, start
    assert "recycling worker" in log


def test_a_limit_below_the_warmed_footprint_does_not_restart_the_pool(
    group: MemoryCgroup, repo: Path
) -> None:
    """Workers start at about 24 MiB and their first three requests warm a 6 MiB cache,
    then stay flat, over a 28 MiB soft limit. Recycling them would restart the pool
    after every few requests: they keep serving, and it is said once, with figures."""
    env = {"MEMGUARD_WORKER_MEMORY_LIMIT": "28MiB", "LEAKY_BORN_MIB": "20",
           "LEAKY_WARMUP": "3"}
    with serve("gunicorn", "tests.apps.leaky:wsgi_app", [*CONF, "-w", "2"], env=env,
               cwd=repo, cgroup=group, ready_path="/ping") as server:
        ok, failed, _ = load(server.url, count=300, clients=4)
        time.sleep(2.5)  # the watchdog had time to look (and must not act)
        log = server.log()
        assert len(server.children()) == 2
    assert (ok, failed) == (300, 0)
    assert log.count("Booting worker") == 2, log[-3000:]
    assert "recycling worker" not in log, log[-3000:]
    reports = [line for line in log.splitlines() if "is over its memory limit" in line]
    assert len(reports) == 1, reports
    assert "after 3 request(s)" in reports[0] or "request(s) (it started at" in reports[0]
