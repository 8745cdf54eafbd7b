"""memguard.cli.sizing: the decision, with made-up machines and footprints."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memguard.cli.sizing import (
    MAX_THREADS,
    Footprint,
    SizingInput,
    advise,
    choose_worker_class,
    classic_workers,
    concurrency,
    cpu_bound,
    render_text,
)
from memguard.sizes import parse_size

MiB = 1024 * 1024
GiB = 1024 * MiB


def lazy(worker: int = 150 * MiB) -> list[Footprint]:
    """An app that fills a per-process cache at its first request: preload cannot share it."""
    return [
        Footprint(preload=False, master=20 * MiB, boot=3 * MiB, worker=worker),
        Footprint(preload=True, master=21 * MiB, boot=1 * MiB, worker=worker - MiB),
    ]


def at_import() -> list[Footprint]:
    """An app that loads 150 MiB at import: preload shares it."""
    return [
        Footprint(preload=False, master=20 * MiB, boot=152 * MiB, worker=158 * MiB),
        Footprint(preload=True, master=170 * MiB, boot=1 * MiB, worker=8 * MiB),
    ]


def check_fits(advice: object, inp: SizingInput) -> None:
    """The invariants every advice that fits must keep."""
    from memguard.cli.sizing import Advice

    assert isinstance(advice, Advice)
    mode = next(m for m in advice.modes if m["preload"] == advice.preload)
    pool = advice.total_memory_limit
    assert pool <= inp.budget
    # The master, all workers at their soft limit but one at its hard limit: inside the pool.
    assert mode["master"] + (advice.workers - 1) * advice.worker_memory_limit \
        + advice.worker_memory_hard_limit <= pool + MiB
    # Each worker can grow past its warmed footprint before it is recycled.
    assert advice.worker_memory_limit >= mode["worker"]
    assert advice.worker_memory_hard_limit > advice.worker_memory_limit


def test_half_a_cpu_quota_on_four_cpus() -> None:
    inp = SizingInput(cpus=0.5, host_cpus=4, budget=8 * GiB, budget_source="cgroup",
                      footprints=lazy(40 * MiB))
    advice = advise(inp)
    # 2 x 0.5 + 1 = 2 processes; never fewer than 2, so one recycle cannot empty the pool.
    assert advice.cpu_bound == 2
    assert advice.workers == 2
    assert advice.decided_by == "cpu"
    assert advice.classic["workers"] == 9  # 2 x 4 + 1: what os.cpu_count() would suggest
    assert advice.classic["fits"]
    check_fits(advice, inp)
    # Two workers share 7 GiB: the fair share is far above what they need, and it says so.
    assert advice.worker_memory_limit > 3 * GiB
    assert any("a lower one such as 100MiB" in note for note in advice.notes)


def test_memory_decides_and_the_classic_figure_does_not_fit() -> None:
    inp = SizingInput(cpus=4, host_cpus=4, budget=1 * GiB, budget_source="cgroup",
                      footprints=lazy())
    advice = advise(inp)
    assert advice.cpu_bound == 9
    assert advice.decided_by == "memory"
    # 1 GiB - 10% = 921 MiB; minus master 20 and reserve 37.5: room for 4 x (150 + 37.5).
    assert advice.workers == 4 == advice.memory_bound
    assert advice.total_memory_limit == 921 * MiB
    assert advice.classic["memory"] == 20 * MiB + 9 * 150 * MiB
    assert advice.classic["memory"] > inp.budget
    assert not advice.classic["fits"]
    assert not advice.preload  # same count, no real saving: no preload
    check_fits(advice, inp)
    # One more worker would not fit.
    mode = advice.modes[0]
    assert mode["master"] + 5 * mode["min_worker"] > advice.total_memory_limit


def test_cpu_bound_per_worker_class() -> None:
    assert cpu_bound(2, "sync") == 5
    assert cpu_bound(2, "gthread", cpu_share=0.01) == 2
    assert cpu_bound(0.25, "sync") == 2
    assert cpu_bound(3.5, "gthread") == 4
    assert cpu_bound(8, "uvicorn_worker.UvicornWorker") == 8
    assert cpu_bound(1, "uvicorn_worker.UvicornWorker") == 2
    assert classic_workers(16) == 33


def test_preload_advised_when_it_shares_the_app() -> None:
    inp = SizingInput(cpus=4, host_cpus=4, budget=1 * GiB, budget_source="cgroup",
                      footprints=at_import())
    advice = advise(inp)
    assert advice.preload
    assert advice.workers == 9 and advice.decided_by == "cpu"
    assert "preload_app = True" in advice.config
    assert "--preload" in advice.command
    assert any("MEMGUARD_GC_FREEZE" in note for note in advice.notes)
    without = next(m for m in advice.modes if not m["preload"])
    assert without["memory_bound"] < 9
    check_fits(advice, inp)


def test_gthread_threads_make_up_for_fewer_processes() -> None:
    inp = SizingInput(cpus=4, host_cpus=4, budget=640 * MiB, budget_source="cgroup",
                      footprints=lazy(), worker_class="gthread")
    advice = advise(inp)
    assert advice.workers == 2 and advice.decided_by == "memory"
    assert advice.threads == 5  # ceil((2 x 4 + 1) / 2)
    assert "threads = 5" in advice.config and "--threads 5" in advice.command
    explicit = advise(SizingInput(**{**inp.__dict__, "threads": 3}))
    assert explicit.threads == 3
    sync = advise(SizingInput(**{**inp.__dict__, "worker_class": "sync"}))
    assert sync.threads == 1 and "threads" not in sync.config


def test_web_concurrency_that_fits_is_kept() -> None:
    inp = SizingInput(cpus=4, host_cpus=4, budget=1 * GiB, budget_source="cgroup",
                      footprints=lazy(), web_concurrency=3)
    advice = advise(inp)
    assert advice.workers == 3 and advice.decided_by == "WEB_CONCURRENCY"
    assert advice.web_concurrency == {"value": 3, "fits": True, "computed": 4,
                                      "needed": advice.web_concurrency["needed"]}
    check_fits(advice, inp)


def test_web_concurrency_that_does_not_fit_is_reported_and_overridden() -> None:
    inp = SizingInput(cpus=4, host_cpus=4, budget=1 * GiB, budget_source="cgroup",
                      footprints=lazy(), web_concurrency=9)
    advice = advise(inp)
    assert advice.workers == 4 and advice.decided_by == "memory"
    assert advice.web_concurrency is not None and not advice.web_concurrency["fits"]
    assert any("WEB_CONCURRENCY=9 does not fit" in note for note in advice.notes)
    assert "workers = 4" in advice.config
    with pytest.raises(ValueError, match="WEB_CONCURRENCY"):
        advise(SizingInput(**{**inp.__dict__, "web_concurrency": 0}))


def test_nothing_fits() -> None:
    advice = advise(SizingInput(cpus=2, host_cpus=2, budget=128 * MiB,
                                budget_source="cgroup", footprints=lazy()))
    assert advice.workers == 1
    assert not advice.fits and advice.memory_bound == 0
    assert any("not even one worker fits" in note for note in advice.notes)


def test_headroom_and_growth_options() -> None:
    base = SizingInput(cpus=8, host_cpus=8, budget=2 * GiB, budget_source="--memory",
                       footprints=lazy(100 * MiB))
    assert advise(base).total_memory_limit == int(2 * GiB * 0.9) // MiB * MiB
    roomy = advise(SizingInput(**{**base.__dict__, "headroom": 0, "growth": 0.1}))
    tight = advise(SizingInput(**{**base.__dict__, "headroom": 512 * MiB, "growth": 1.0}))
    assert roomy.total_memory_limit == 2 * GiB
    assert tight.total_memory_limit == 1536 * MiB
    assert roomy.workers > advise(base).workers > tight.workers


def test_snippets_are_ready_to_use() -> None:
    advice = advise(SizingInput(cpus=2, host_cpus=2, budget=1 * GiB, budget_source="cgroup",
                                footprints=lazy(), app="shop.wsgi:application"))
    namespace: dict[str, object] = {}
    code = advice.config.replace("from memguard.gunicorn import install", "")
    exec(compile(code, "gunicorn.conf.py", "exec"),
         {"install": lambda ns, **kw: namespace.update(kw)}, namespace)
    assert namespace["workers"] == advice.workers
    assert namespace["worker_class"] == "sync"
    assert parse_size(str(namespace["worker_memory_limit"])) == advice.worker_memory_limit
    assert parse_size(str(namespace["worker_memory_hard_limit"])) \
        == advice.worker_memory_hard_limit
    assert parse_size(str(namespace["total_memory_limit"])) == advice.total_memory_limit
    env = dict(part.split("=", 1) for part in advice.command.split() if "=" in part)
    assert parse_size(env["MEMGUARD_WORKER_MEMORY_LIMIT"]) == advice.worker_memory_limit
    assert advice.command.rstrip().endswith(
        f"-w {advice.workers} -k sync shop.wsgi:application")
    text = render_text(advice)
    assert "decided by: memory" in text and "2 x cores + 1 = 5" in text
    assert advice.config in text


def waiting(worker: int, wall: float = 0.020, cpu: float = 0.0002,
            request_peak: int | None = None) -> list[Footprint]:
    """An app that mostly waits: a 20 ms database call, 0.2 ms of computing."""
    return [Footprint(preload=False, master=18 * MiB, boot=2 * MiB, worker=worker,
                      request_seconds=wall, request_cpu_seconds=cpu,
                      request_peak=request_peak)]


def test_cpu_bound_follows_the_measured_share_of_computing() -> None:
    # Computing all the time: one sync worker per CPU, plus one for the server's own work.
    assert cpu_bound(2, "sync", cpu_share=1.0) == 3
    assert cpu_bound(2, "sync", cpu_share=0.98) == 3  # within measuring noise of 1.0
    # Half waiting: two per CPU, the classic figure.
    assert cpu_bound(2, "sync", cpu_share=0.5) == 5
    # Nearly all waiting: as many as MAX_SYNC_WORKERS_PER_CPU (16) per CPU.
    assert cpu_bound(2, "sync", cpu_share=0.01) == 33
    assert cpu_bound(2, "sync", cpu_share=0.0) == 33
    assert cpu_bound(0.5, "sync", cpu_share=1.0) == 2  # never fewer than two
    assert concurrency(4, None) == 9


def test_footprint_cpu_share() -> None:
    assert Footprint(False, 1, 1, 1).cpu_share is None
    assert Footprint(False, 1, 1, 1, request_seconds=0.02,
                     request_cpu_seconds=0.005).cpu_share == pytest.approx(0.25)
    # Clock granularity can make CPU time exceed wall time by a little.
    assert Footprint(False, 1, 1, 1, request_seconds=0.001,
                     request_cpu_seconds=0.0011).cpu_share == 1.0
    assert Footprint(False, 1, 1, 1, request_seconds=0.0,
                     request_cpu_seconds=0.0).cpu_share == 1.0


def test_an_app_that_waits_gets_the_sync_workers_memory_allows() -> None:
    # A 3 MiB worker that waits 99% of the time in a 256 MiB container on 2 CPUs, with
    # sync workers asked for.
    inp = SizingInput(cpus=2, host_cpus=2, budget=256 * MiB, budget_source="cgroup",
                      footprints=waiting(3 * MiB), worker_class="sync")
    advice = advise(inp)
    assert advice.cpu_bound == 33
    # Pool 230 MiB (256 - 10%), minus the master (18) and one reserve for the pool
    # (16 MiB: one request's step), leaves 196; each worker needs 3 MiB + 4 MiB allowance.
    assert advice.modes[0]["min_worker"] == 7 * MiB
    assert advice.memory_bound == 28 == advice.workers
    assert advice.decided_by == "memory"
    assert advice.inputs["cpu_share"] == pytest.approx(0.01)
    check_fits(advice, inp)
    # The hard limit stays one request's step above the soft one.
    assert advice.worker_memory_hard_limit - advice.worker_memory_limit >= 16 * MiB
    assert "1% of it computing" in render_text(advice)
    assert any("99% of their time waiting" in note and "gthread" in note
               for note in advice.notes)
    assert advice.worker_class == "sync" and advice.threads == 1


def test_an_app_that_waits_gets_gthread_unless_told_otherwise() -> None:
    """28 sync processes that each wait 99% of the time fill 256 MiB; two gthread workers
    keep as many requests in flight (and more) in a fraction of the memory."""
    inp = SizingInput(cpus=2, host_cpus=2, budget=256 * MiB, budget_source="cgroup",
                      footprints=waiting(3 * MiB))
    advice = advise(inp)
    assert advice.worker_class == "gthread"
    assert advice.workers == 2 and advice.decided_by == "cpu"  # one process per CPU
    # 2 CPUs / 1% computing = 200 requests in flight would keep them busy: capped per worker.
    assert advice.threads == MAX_THREADS
    assert advice.workers * advice.threads > 28  # more than the sync pool that fits
    assert f"threads = {MAX_THREADS}" in advice.config
    assert f"-k gthread --threads {MAX_THREADS}" in advice.command
    assert any(note.startswith("worker class gthread: requests spend 99% of their time")
               and "--worker-class sync" in note for note in advice.notes)
    check_fits(advice, inp)


def test_the_worker_class_rule() -> None:
    assert choose_worker_class(None, 0.01) == "gthread"
    assert choose_worker_class(None, 0.24) == "gthread"
    assert choose_worker_class(None, 0.25) == "sync"  # computes a quarter: sync
    assert choose_worker_class(None, None) == "sync"  # unmeasured: no thread-safety assumed
    assert choose_worker_class("sync", 0.01) == "sync"  # given: kept
    assert choose_worker_class("uvicorn_worker.UvicornWorker", 1.0) \
        == "uvicorn_worker.UvicornWorker"


def test_threads_fit_what_each_request_holds_at_once() -> None:
    """Each thread may hold its request's peak at the same time: the soft limit must
    hold the warmed worker, its growth allowance and every thread's peak."""
    inp = SizingInput(cpus=2, host_cpus=2, budget=256 * MiB, budget_source="cgroup",
                      footprints=waiting(3 * MiB, request_peak=20 * MiB))
    advice = advise(inp)
    assert advice.worker_class == "gthread" and advice.workers == 2
    # Pool 230 MiB - master 18 - reserve 16 = 196, 98 MiB each; a worker needs 7 MiB with
    # its allowance, which leaves 91 MiB: four more requests of 20 MiB beside the first.
    assert advice.worker_memory_limit == 98 * MiB
    assert advice.threads == 5
    assert advice.modes[0]["request_peak"] == 20 * MiB
    # A request of 100 MiB: one thread.
    big = advise(SizingInput(**{**inp.__dict__,
                                "footprints": waiting(3 * MiB, request_peak=100 * MiB)}))
    assert big.threads == 1


def test_an_app_that_computes_gets_one_worker_per_cpu_and_one() -> None:
    inp = SizingInput(cpus=2, host_cpus=2, budget=1 * GiB, budget_source="cgroup",
                      footprints=waiting(30 * MiB, wall=0.004, cpu=0.004))
    advice = advise(inp)
    assert advice.worker_class == "sync" and advice.threads == 1
    assert advice.workers == 3 and advice.decided_by == "cpu"
    assert not any("waiting" in note for note in advice.notes)
    check_fits(advice, inp)


def test_gthread_threads_cover_what_the_app_waits() -> None:
    advice = advise(SizingInput(cpus=2, host_cpus=2, budget=1 * GiB, budget_source="cgroup",
                                footprints=waiting(30 * MiB), worker_class="gthread"))
    assert advice.workers == 2
    # 2 CPUs / 1% computing: 200 in flight keep them busy; at most MAX_THREADS a worker.
    assert advice.threads == MAX_THREADS
    # Computing 10%: 2 / 0.1 + 1 = 21 in flight, 11 threads in each of two workers.
    tenth = advise(SizingInput(cpus=2, host_cpus=2, budget=1 * GiB, budget_source="cgroup",
                               footprints=waiting(30 * MiB, wall=0.02, cpu=0.002),
                               worker_class="gthread"))
    assert tenth.threads == 11


@settings(max_examples=200, deadline=None)
@given(
    cpus=st.floats(0.1, 64),
    budget_mib=st.integers(256, 64 * 1024),
    worker_mib=st.integers(5, 2000),
    master_mib=st.integers(5, 300),
    worker_class=st.sampled_from([None, "sync", "gthread", "uvicorn_worker.UvicornWorker"]),
    cpu_share=st.one_of(st.none(), st.floats(0, 1)),
    peak_mib=st.one_of(st.none(), st.integers(0, 512)),
)
def test_advice_that_fits_always_fits(cpus: float, budget_mib: int, worker_mib: int,
                                      master_mib: int, worker_class: str | None,
                                      cpu_share: float | None, peak_mib: int | None) -> None:
    fps = [Footprint(preload=False, master=master_mib * MiB, boot=2 * MiB,
                     worker=worker_mib * MiB,
                     request_seconds=None if cpu_share is None else 0.02,
                     request_cpu_seconds=None if cpu_share is None else 0.02 * cpu_share,
                     request_peak=None if peak_mib is None else peak_mib * MiB)]
    inp = SizingInput(cpus=cpus, host_cpus=max(1, int(cpus)), budget=budget_mib * MiB,
                      budget_source="cgroup", footprints=fps, worker_class=worker_class)
    advice = advise(inp)
    assert 1 <= advice.workers <= advice.cpu_bound
    if advice.fits:
        check_fits(advice, inp)
        assert advice.workers == min(advice.cpu_bound, advice.memory_bound)
        # Every thread's request at its peak at once, beside the warmed worker and its
        # growth allowance: under the soft limit.
        if advice.threads > 1 and peak_mib:
            mode = advice.modes[0]
            assert mode["min_worker"] + (advice.threads - 1) * peak_mib * MiB \
                <= advice.worker_memory_limit
    else:
        assert advice.workers == 1 and advice.memory_bound == 0
    assert 1 <= advice.threads <= MAX_THREADS
    if worker_class is None:
        assert advice.worker_class == choose_worker_class(None, fps[0].cpu_share)
