"""memguard.cli.footprint and `memguard suggest`: real imports, real forks, a real cgroup."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from memguard.cli.footprint import FootprintError, is_asgi, load_app, measure
from memguard.sizes import format_size
from memguard.system import process_memory
from tests.support.cgroups import MemoryCgroup
from tests.support.servers import http_request, serve

MiB = 1024 * 1024
HOG = 150 * MiB


def test_load_app_forms(repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(repo))
    assert callable(load_app("tests.apps.hello:wsgi_app"))
    assert is_asgi(load_app("tests.apps.hello:asgi_app"))
    assert not is_asgi(load_app("tests.apps.hello:wsgi_app"))
    with pytest.raises(FootprintError, match="module:attribute"):
        load_app("tests.apps.hello")
    with pytest.raises(FootprintError, match="no attribute 'nope'"):
        load_app("tests.apps.hello:nope")
    with pytest.raises(FootprintError, match="not callable"):
        load_app("tests.apps.hog:HOG_BYTES")


@pytest.mark.parametrize("attr", ["wsgi_app", "asgi_app"])
def test_measure_counts_what_each_worker_fills(repo: Path, attr: str) -> None:
    footprints, report = measure(f"tests.apps.hog:{attr}", requests=3, cwd=repo)
    assert [fp.preload for fp in footprints] == [False, True]
    for mode, fp in zip(report["modes"], footprints, strict=True):
        assert mode["interface"] == attr[:4]
        assert mode["statuses"] == ["200"] * 3
        # The cache is filled at the first request, in the worker: preload cannot share it.
        assert fp.boot < 40 * MiB
        assert HOG <= fp.worker < HOG + 40 * MiB
        assert fp.master < 60 * MiB


def test_measure_with_preload_shares_what_the_import_loads(
        repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOG_AT", "import")
    plain, preload = measure("tests.apps.hog:wsgi_app", requests=3, cwd=repo)[0]
    assert plain.boot >= HOG and plain.worker >= HOG  # each worker imports its own copy
    assert preload.master >= HOG  # the master holds it ...
    assert preload.worker < 40 * MiB  # ... and the worker only what it made private
    assert preload.worker_rss is not None and preload.worker_rss >= HOG  # RSS lies


def test_measure_reports_an_app_that_cannot_import(repo: Path) -> None:
    with pytest.raises(FootprintError, match="database URL is not configured"):
        measure("tests.apps.broken:app", requests=1, cwd=repo)
    proc = subprocess.run([sys.executable, "-m", "memguard", "suggest", "--app",
                           "tests.apps.hello:missing"], cwd=repo, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert "has no attribute 'missing'" in proc.stderr
    assert proc.stdout == ""


def test_suggest_text_and_web_concurrency(repo: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "memguard", "suggest", "--app", "tests.apps.hello:wsgi_app",
         "--memory", "1GiB", "--requests", "2", "--worker-class", "gthread"],
        cwd=repo, capture_output=True, text=True, timeout=120,
        env={**_env(), "WEB_CONCURRENCY": "3"},
    )
    assert proc.returncode == 0, proc.stderr
    assert "decided by: WEB_CONCURRENCY" in proc.stdout
    assert "WEB_CONCURRENCY=3: fits" in proc.stdout
    assert "2 x cores + 1 = " in proc.stdout
    assert "install(\n    globals()," in proc.stdout
    assert "gunicorn -c python:memguard.gunicorn.conf -w 3 -k gthread" in proc.stdout


def test_suggest_refuses_a_web_concurrency_that_is_not_a_number(repo: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "memguard", "suggest", "--app", "tests.apps.hello:wsgi_app"],
        cwd=repo, capture_output=True, text=True, timeout=60,
        env={**_env(), "WEB_CONCURRENCY": "four"},
    )
    assert proc.returncode == 2
    assert "WEB_CONCURRENCY='four' is not an integer" in proc.stderr


def _env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k != "WEB_CONCURRENCY"}


@pytest.mark.cgroup
@pytest.mark.server
def test_suggest_in_a_512_mib_group_fits_and_2n_plus_1_would_not(
        needs_cgroup: None, repo: Path, tmp_path: Path) -> None:
    app = "tests.apps.hog:wsgi_app"
    with MemoryCgroup("512MiB") as group:
        proc = group.run([sys.executable, "-m", "memguard", "suggest", "--app", app,
                          "--requests", "3", "--json"], cwd=repo, env=_env(), timeout=120)
        assert proc.returncode == 0, proc.stderr.decode()
        advice = json.loads(proc.stdout)
        assert group.oom_kills == 0

        assert advice["inputs"]["budget"] == 512 * MiB
        assert advice["decided_by"] == "memory"
        assert isinstance(advice["workers"], int) and advice["workers"] >= 1
        assert isinstance(advice["threads"], int)
        assert advice["workers"] * HOG <= 512 * MiB
        assert advice["worker_memory_limit"] >= HOG
        assert advice["worker_memory_hard_limit"] > advice["worker_memory_limit"]
        # The `2 x cores + 1` figure, reported beside it, would not fit.
        assert advice["classic"]["workers"] > advice["workers"]
        assert advice["classic"]["memory"] > 512 * MiB
        assert not advice["classic"]["fits"]

        # The advice holds: gunicorn run with the printed gunicorn.conf.py (memguard's hooks
        # and limits in it), each worker filling its 150 MiB, in the same group.
        conf = tmp_path / "gunicorn.conf.py"
        conf.write_text(advice["config"])
        with serve("gunicorn", app, ["-c", str(conf)], cgroup=group, cwd=repo,
                   env=_env()) as server:
            workers = server.wait_for_workers(advice["workers"])
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                assert http_request(server.url)[0] == 200
                full = [p for p in workers if process_memory(p).rss >= HOG]
                if len(full) == len(workers):
                    break
            assert len(full) == advice["workers"]
            # Nothing recycled, nothing killed: the limits fit the footprint they came from.
            assert sorted(server.children()) == sorted(workers)
            assert group.oom_kills == 0
            log = server.log()
            assert "recycl" not in log.lower()
            soft = format_size(advice["worker_memory_limit"])
            assert f"memguard: worker soft limit {soft}" in log

    # And the `2 x cores + 1` figure really does not: the kernel starts killing workers.
    with MemoryCgroup("512MiB") as group, serve(
            "gunicorn", app, ["-w", str(advice["classic"]["workers"]), "-k", "sync"],
            cgroup=group, cwd=repo, env=_env()) as server:
        server.wait_for_workers(advice["classic"]["workers"])
        deadline = time.monotonic() + 60
        while group.oom_kills == 0 and time.monotonic() < deadline:
            with contextlib.suppress(OSError, http.client.HTTPException):
                http_request(server.url)
        assert group.oom_kills > 0


def test_measure_runs_a_fastapi_lifespan_and_routes(repo: Path) -> None:
    footprints, report = measure("tests.apps.lifespan_cache:app", requests=4, cwd=repo,
                                 paths=["/items/1", "/missing"], preload=[False])
    assert report["modes"][0]["interface"] == "asgi"
    assert report["modes"][0]["statuses"] == ["200", "404", "200", "404"]
    assert footprints[0].worker >= 64 * MiB  # the lifespan's cache is the worker's


def test_measure_tells_an_app_that_waits_from_one_that_computes(repo: Path) -> None:
    (waits,), _ = measure("benchmarks.apps.shapes:io_app", requests=5, cwd=repo,
                          preload=[False])
    (computes,), _ = measure("benchmarks.apps.shapes:cpu_app", requests=5, cwd=repo,
                             preload=[False])
    assert waits.request_seconds is not None and waits.request_seconds >= 0.019
    assert waits.cpu_share is not None and waits.cpu_share < 0.2
    assert computes.cpu_share is not None and computes.cpu_share > 0.7


def test_measure_sees_what_a_request_holds_while_it_runs(repo: Path) -> None:
    """Each request of tests.apps.transient holds 32 MiB and keeps none: the request's
    peak says so (the warmed worker does not); an app that holds nothing has a peak of a
    few pages."""
    (holds,), _ = measure("tests.apps.transient:wsgi_app", requests=4, cwd=repo,
                          preload=[False])
    (light,), _ = measure("tests.apps.hello:wsgi_app", requests=4, cwd=repo,
                          preload=[False])
    assert holds.request_peak is not None and holds.request_peak >= 30 * MiB
    assert holds.worker < 30 * MiB
    assert light.request_peak is not None and light.request_peak < 4 * MiB


@pytest.mark.cgroup
@pytest.mark.server
def test_suggest_gives_an_app_that_waits_threads_that_overlap_its_waits(
        needs_cgroup: None, repo: Path, tmp_path: Path) -> None:
    """An app that waits 0.5 s per request: suggest, run in a 192 MiB group, picks gthread,
    and its printed config serves 16 requests at once in about one wait, where as many
    sync processes as it has workers would take eight."""
    app = "benchmarks.apps.shapes:io_app"
    env = {**_env(), "SHAPE_IO_WAIT": "0.5"}
    with MemoryCgroup("192MiB") as group:
        proc = group.run([sys.executable, "-m", "memguard", "suggest", "--app", app,
                          "--requests", "3", "--json"], cwd=repo, env=env, timeout=120)
        assert proc.returncode == 0, proc.stderr.decode()
        advice = json.loads(proc.stdout)
        assert advice["worker_class"] == "gthread"
        assert advice["workers"] * advice["threads"] >= 16
        conf = tmp_path / "gunicorn.conf.py"
        conf.write_text(advice["config"])
        with serve("gunicorn", app, ["-c", str(conf)], cgroup=group, cwd=repo,
                   env=env) as server:
            server.wait_for_workers(advice["workers"])
            assert http_request(server.url)[0] == 200
            started = time.monotonic()
            with ThreadPoolExecutor(16) as pool:
                statuses = list(pool.map(lambda _: http_request(server.url)[0], range(16)))
            elapsed = time.monotonic() - started
            assert statuses == [200] * 16
            # Sync: 16 x 0.5 s over two processes, 4 s at least.
            assert elapsed < 2.0, elapsed
            assert group.oom_kills == 0


def test_measure_on_a_busy_cpu_still_sees_an_app_that_computes(repo: Path) -> None:
    """Time spent waiting for a CPU that another process holds is not the app waiting:
    a CPU-bound app measured beside a busy loop on its only CPU must not look I/O-bound
    (and be given more sync workers than the CPUs can run)."""
    before = os.sched_getaffinity(0)
    cpu = min(before)
    os.sched_setaffinity(0, {cpu})  # the measuring subprocess inherits it
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"],
                            start_new_session=True)
    try:
        (fp,), _ = measure("benchmarks.apps.shapes:cpu_app", requests=8, cwd=repo,
                           preload=[False])
    finally:
        os.sched_setaffinity(0, before)
        busy.kill()
        busy.wait()
    assert fp.cpu_share is not None and fp.cpu_share > 0.7


def test_measure_freezes_what_the_worker_inherits(repo: Path) -> None:
    """Without preload the measuring worker calls gc.freeze() as memguard's workers do:
    its collection after the warm-up must not copy the master's objects into it: the
    worker grows by a fraction of a MiB from boot to warm, not by the 5 to 7 MiB that
    copying adds (more on newer Pythons, whose interpreter is bigger)."""
    (fp,), _ = measure("tests.apps.hello:wsgi_app", requests=3, cwd=repo, preload=[False])
    assert fp.worker - fp.boot < 2 * MiB, fp
