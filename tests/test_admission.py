"""Memory admission: pressure levels, shedding, the body memory guard, recycling, limits;
and on real servers: the 652 MB naive upload, readiness under pressure."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from memguard import config, counters, recycle
from memguard.errors import BodyTooLarge, MemoryPressure
from memguard.memory.admission import CRITICAL, ELEVATED, OK, MemoryAdmission
from memguard.memory.worker_limits import derive_worker_limits, worker_count_from_environment
from memguard.recycle import set_recycler
from memguard.system import read_vm_hwm
from tests.support.servers import http_request, serve, stream_upload

MiB = 1 << 20
MS = 1_000_000


class Probe:
    """A value the admission reads, set by the test, counting its reads."""

    def __init__(self, value: int | None) -> None:
        self.value = value
        self.reads = 0

    def __call__(self) -> Any:
        self.reads += 1
        return self.value


def make(rss: int = 100 * MiB, usage: int | None = None, **kwargs: Any) -> MemoryAdmission:
    kwargs.setdefault("soft_limit", 300 * MiB)
    kwargs.setdefault("hard_limit", 400 * MiB)
    return MemoryAdmission(rss=Probe(rss), cgroup_usage=Probe(usage), **kwargs)


def test_levels_from_worker_and_container() -> None:
    a = make(container_limit=1000 * MiB, usage=100 * MiB)
    assert a.refresh(0) == OK and a.ready
    a._rss.value = 350 * MiB  # type: ignore[attr-defined]
    assert a.refresh(1) == ELEVATED and a.ready  # over soft: recycle later, keep serving
    a._rss.value = 450 * MiB  # type: ignore[attr-defined]
    assert a.refresh(2) == CRITICAL and not a.ready
    assert a.reason == "worker_over_hard_limit"
    a._rss.value = 100 * MiB  # type: ignore[attr-defined]
    a._cgroup_usage.value = 980 * MiB  # type: ignore[attr-defined]
    assert a.refresh(3) == CRITICAL and a.reason == "container_near_limit"
    a._cgroup_usage.value = 850 * MiB  # type: ignore[attr-defined]
    assert a.refresh(4) == OK


def test_container_page_cache_is_not_pressure() -> None:
    usage = Probe(990 * MiB)
    cache = Probe(300 * MiB)
    a = MemoryAdmission(rss=Probe(MiB), cgroup_usage=usage, reclaimable=cache,
                        container_limit=1000 * MiB)
    assert a.refresh(0) == OK and a.container_usage == 690 * MiB
    cache.value = 10 * MiB
    assert a.refresh(1) == CRITICAL
    usage.value = 500 * MiB
    reads = cache.reads
    assert a.refresh(2) == OK and cache.reads == reads  # under the threshold: not read


def test_psi_counts_only_over_its_threshold() -> None:
    psi = Probe(None)
    a = MemoryAdmission(rss=Probe(MiB), psi=psi, psi_threshold=10.0)
    psi.value = 4.0
    assert a.refresh(0) == OK
    psi.value = 25.0
    assert a.refresh(2_000_000_000) == CRITICAL and a.reason == "memory_pressure_stall"


def test_pressure_is_cached_between_refreshes() -> None:
    rss = Probe(100 * MiB)
    a = MemoryAdmission(rss=rss, refresh_interval=0.002, hard_limit=400 * MiB)
    for i in range(100):  # 100 checks within 1 ms: one read
        a.check(10 * MS + i * 10_000)
    assert rss.reads == 1
    a.check(13 * MS)
    assert rss.reads == 2


def test_with_nothing_to_judge_requests_read_nothing() -> None:
    """No worker limit, no container limit, no pressure stall reader: the level cannot
    leave OK, so no request pays a reading for it; figures are still read on demand."""
    rss = Probe(100 * MiB)
    a = MemoryAdmission(rss=rss, refresh_interval=0.002, psi=None)
    assert not a.judges()
    for i in range(100):
        assert a.check(i * 10 * MS) == OK
    assert rss.reads == 0
    a.refresh()
    assert rss.reads == 1 and a.rss == 100 * MiB
    cgroup = Probe(10 * MiB)
    for judged in (MemoryAdmission(rss=rss, soft_limit=200 * MiB),
                   MemoryAdmission(rss=rss, container_limit=400 * MiB, cgroup_usage=cgroup),
                   MemoryAdmission(rss=rss, psi=Probe(None))):
        assert judged.judges()
        before = rss.reads
        judged.check(10 * MS)
        judged.check(20 * MS)
        assert rss.reads == before + 2
    assert not MemoryAdmission(rss=rss, container_limit=400 * MiB).judges()  # no reader


def test_shed_all_heavy_and_off() -> None:
    a = make(rss=500 * MiB, retry_after=7)
    refusal = a.admit("GET", "/", 0)
    assert isinstance(refusal, MemoryPressure)
    assert refusal.status == 503 and refusal.headers == {"Retry-After": "7"}
    assert refusal.reason == "shed_worker_over_hard_limit"
    assert refusal.figures["rss"] == 500 * MiB and refusal.figures["hard_limit"] == 400 * MiB
    heavy = make(rss=500 * MiB, shed="heavy", heavy_paths=["/reports/"])
    assert heavy.admit("GET", "/", 0) is None
    assert heavy.admit("POST", "/", 0) is not None
    assert heavy.admit("GET", "/reports/big", 0) is not None
    assert make(rss=500 * MiB, shed="off").admit("POST", "/", 0) is None
    assert make(rss=100 * MiB).admit("POST", "/", 0) is None


def test_body_guard_stops_a_buffering_body_before_the_hard_limit() -> None:
    rss = Probe(100 * MiB)
    a = MemoryAdmission(rss=rss, hard_limit=400 * MiB, body_check_every=4 * MiB)
    guard = a.body_guard(None, 0)  # chunked: no length to project from
    assert guard is not None
    with pytest.raises(BodyTooLarge) as info:
        for _ in range(10_000):
            guard.chunk(MiB)
            rss.value += MiB  # the app keeps every byte
    exc = info.value
    assert exc.status == 413 and exc.reason == "body_exceeds_worker_memory"
    # Refused while the worker plus the final join still fit under the limit.
    assert exc.figures["rss"] + exc.figures["growth"] > 400 * MiB
    assert exc.figures["rss"] < 400 * MiB - 4 * MiB


def test_body_guard_projects_from_content_length_early() -> None:
    rss = Probe(60 * MiB)
    a = MemoryAdmission(rss=rss, hard_limit=400 * MiB, body_check_every=4 * MiB)
    guard = a.body_guard(652_000_000, 0)
    assert guard is not None
    received = 0
    with pytest.raises(BodyTooLarge) as info:
        while True:
            guard.chunk(256 * 1024)
            received += 256 * 1024
            rss.value += 256 * 1024
    # The projection waits for a sixteenth of the body (40.75 MB here), then refuses at
    # the next check: the worker has grown by about that much, far from its limit.
    assert received <= 652_000_000 // 16 + 4 * MiB
    assert info.value.figures["projected"] > 400 * MiB
    assert rss.value < 120 * MiB


def test_body_guard_does_not_blame_a_streamed_body_for_growth_elsewhere() -> None:
    """Seen in make demo: a streamed upload beside a leaking route was refused, because
    the worker grew by 5.6 MB (other requests' leaks) while its first 8.4 MB arrived."""
    rss = Probe(170 * MiB)
    a = MemoryAdmission(rss=rss, hard_limit=320 * MiB, body_check_every=4 * MiB)
    guard = a.body_guard(652_000_000, 0)
    assert guard is not None
    chunk = 256 * 1024
    for i in range(150 * 4):  # 150 MiB of a body the app streams to disk
        if i == 8:
            rss.value += 6 * MiB  # three 2 MiB leaks elsewhere land early
        rss.value += int(chunk * 0.3)  # and go on at 30% of the upload's rate
        guard.chunk(chunk)
    assert rss.value < 320 * MiB


def test_body_guard_leaves_streaming_bodies_alone() -> None:
    rss = Probe(100 * MiB)
    a = MemoryAdmission(rss=rss, hard_limit=400 * MiB, body_check_every=4 * MiB)
    guard = a.body_guard(2_000_000_000, 0)
    assert guard is not None
    for _ in range(2000):
        guard.chunk(MiB)  # 2 GB through, memory flat: the app streams it to disk
    assert rss.reads < 600  # one read per 4 MiB, never per chunk


def test_body_guard_503_when_already_over_and_none_without_limit() -> None:
    rss = Probe(100 * MiB)
    a = MemoryAdmission(rss=rss, hard_limit=400 * MiB, body_check_every=1 * MiB)
    guard = a.body_guard(None, 0)
    assert guard is not None
    rss.value = 450 * MiB  # another request grew the worker meanwhile
    with pytest.raises(MemoryPressure) as info:
        guard.chunk(2 * MiB)
    assert info.value.status == 503 and "Retry-After" in info.value.headers
    assert MemoryAdmission(rss=rss).body_guard(None, 0) is None


class RecordingRecycler:
    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def recycle(self, reason: str, figures: dict[str, Any]) -> bool:
        self.calls.append((reason, figures))
        return True


def test_after_response_recycles_on_uss_not_rss() -> None:
    recorder = RecordingRecycler()
    previous = set_recycler(recorder)
    counters.reset()
    try:
        uss = Probe(200 * MiB)
        a = MemoryAdmission(rss=Probe(350 * MiB), uss=uss, soft_limit=300 * MiB,
                            hard_limit=400 * MiB, uss_interval=1.0)
        assert a.after_response(0) is False  # RSS over, USS under: shared pages, healthy
        assert recorder.calls == []
        uss.value = 320 * MiB
        assert a.after_response(500 * MS) is False  # USS read at most once a second
        assert a.after_response(1100 * MS) is True
        reason, figures = recorder.calls[0]
        assert reason == "worker_memory_limit"
        assert figures["uss"] == 320 * MiB and figures["soft_limit"] == 300 * MiB
        assert counters.get("recycle", "worker_memory_limit") == 1
        under = MemoryAdmission(rss=Probe(100 * MiB), uss=uss, soft_limit=300 * MiB)
        assert under.after_response(0) is False and uss.reads == 2  # USS not even read
    finally:
        set_recycler(previous)


def test_worker_limits_derived_from_container_and_workers() -> None:
    env = {"WEB_CONCURRENCY": "3"}
    soft, hard = derive_worker_limits("auto", "auto", 2000 * MiB, environ=env, argv=[])
    assert soft == int(2000 * MiB * 0.85 / 4)
    assert hard == int(soft * 1.5)
    assert derive_worker_limits("auto", "auto", 2000 * MiB, environ={}, argv=[]) == (None, None)
    assert derive_worker_limits("auto", "auto", None, environ=env, argv=[]) == (None, None)
    assert derive_worker_limits("25%", "40%", 1000 * MiB) == (250 * MiB, 400 * MiB)
    assert derive_worker_limits("400MiB", "auto", None) == (400 * MiB, 600 * MiB)
    assert derive_worker_limits("400MiB", "auto", 500 * MiB)[1] == int(500 * MiB * 0.95)
    assert derive_worker_limits(None, None, 1000 * MiB) == (None, None)
    with pytest.raises(ValueError, match="below"):
        derive_worker_limits("400MiB", "300MiB", None)


@pytest.mark.parametrize("env,argv,expected", [
    ({"WEB_CONCURRENCY": "4"}, [], 4),
    ({"GUNICORN_CMD_ARGS": "--bind :80 -w 3"}, [], 3),
    ({}, ["gunicorn", "--workers=5", "app:app"], 5),
    ({}, ["gunicorn", "-w6", "app:app"], 6),
    ({}, ["uvicorn", "--workers", "2", "app:app"], 2),
    ({}, ["gunicorn", "app:app"], None),
])
def test_worker_count(env: dict[str, str], argv: list[str], expected: int | None) -> None:
    assert worker_count_from_environment(env, argv) == expected


def test_memory_options() -> None:
    values = config.resolve(["memory"], {"worker_memory_limit": "25%", "memory_shed": "Heavy"},
                            environ={"MEMGUARD_WORKER_MEMORY_HARD_LIMIT": "1GiB"})
    assert values["worker_memory_limit"] == "25%"
    assert values["worker_memory_hard_limit"] == 1 << 30
    assert values["memory_shed"] == "heavy"
    with pytest.raises(ValueError, match="memory_shed"):
        config.resolve(["memory"], {"memory_shed": "some"})
    with pytest.raises(ValueError, match="readiness_path"):
        config.resolve(["memory"], {"readiness_path": "readyz"})
    with pytest.raises(TypeError, match="worker_memory_limit"):
        config.resolve(["memory"], {"worker_memory_limt": "1GiB"})


# ---- real servers ---------------------------------------------------------------------------

UPLOAD = 652_000_000
LIMITS = {"MEMGUARD_WORKER_MEMORY_HARD_LIMIT": "400MiB",
          "MEMGUARD_WORKER_MEMORY_LIMIT": "300MiB"}


@pytest.mark.server
@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_naive_652mb_upload_refused_under_uvicorn(repo: Path, chunked: bool) -> None:
    """``await request.body()`` of 652 MB, 1 GiB body limit, 400 MiB worker limit: refused
    before the worker passes 400 MiB; the worker keeps serving."""
    with serve("uvicorn", "tests.apps.memory_apps:app", ["--log-level", "warning"],
               env=LIMITS, cwd=repo) as server:
        status, response, sent = stream_upload(server.port, "/upload", UPLOAD, chunked=chunked)
        assert status in (413, 503), response[:300]
        assert sent < UPLOAD
        peak = read_vm_hwm(server.pid)
        assert peak is not None and peak < 400 * MiB, peak
        print(f"naive 652 MB: {status}, {sent} bytes sent, worker VmHWM {peak / MiB:.1f} MiB")
        assert server.proc.poll() is None
        assert http_request(server.url, path="/")[0] == 200
        assert "body_exceeds_worker_memory" in server.log()


@pytest.mark.server
def test_streamed_652mb_upload_is_not_refused(repo: Path) -> None:
    with serve("uvicorn", "tests.apps.memory_apps:app", ["--log-level", "warning"],
               env=LIMITS, cwd=repo) as server:
        status, response, sent = stream_upload(server.port, "/stream", UPLOAD,
                                               chunk=1024 * 1024)
        assert status == 200, response[:300]
        assert response.endswith(f"streamed {UPLOAD}".encode())
        peak = read_vm_hwm(server.pid)
        assert peak is not None and peak < 200 * MiB


@pytest.mark.server
def test_naive_wsgi_upload_refused_under_gunicorn(repo: Path) -> None:
    with serve("gunicorn", "tests.apps.memory_apps:wsgi_app", ["-w", "1"],
               env=LIMITS, cwd=repo) as server:
        (worker,) = server.wait_for_workers(1)
        status, response, _ = stream_upload(server.port, "/upload", UPLOAD, chunked=False)
        assert status in (413, 503), response[:300]
        peak = read_vm_hwm(worker)
        assert peak is not None and peak < 400 * MiB, peak
        assert http_request(server.url, path="/")[0] == 200
        assert server.children() == [worker]  # the same worker, alive


@pytest.mark.server
def test_readiness_flips_under_pressure_and_back(repo: Path) -> None:
    env = {"MEMGUARD_WORKER_MEMORY_HARD_LIMIT": "200MiB",
           "MEMGUARD_WORKER_MEMORY_LIMIT": "150MiB",
           "MEMGUARD_READINESS_PATH": "/readyz", "MEMGUARD_LIVENESS_PATH": "/livez",
           "MEMGUARD_READINESS_DETAILS": "1",
           # Only /items is shed: /ballast must stay reachable to release the pressure.
           "MEMGUARD_MEMORY_SHED": "heavy", "MEMGUARD_HEAVY_METHODS": "",
           "MEMGUARD_HEAVY_PATHS": "/items"}
    with serve("uvicorn", "tests.apps.memory_apps:app", ["--log-level", "warning"],
               env=env, cwd=repo, ready_path="/livez") as server:
        status, _, body = http_request(server.url, path="/readyz")
        assert status == 200 and json.loads(body)["status"] == "ready"
        assert http_request(server.url, path="/items/1")[0] == 200

        assert http_request(server.url, "POST", "/ballast?mib=250")[0] == 200
        status, _, body = http_request(server.url, path="/readyz")
        report = json.loads(body)
        assert status == 503 and report["status"] == "not_ready"
        assert report["pressure_reason"] == "worker_over_hard_limit" and report["rss"] > 200 * MiB
        status, headers, _ = http_request(server.url, path="/items/2")
        assert status == 503 and headers["retry-after"] == "5"
        assert http_request(server.url, path="/livez")[0] == 200  # liveness never fails
        assert http_request(server.url, path="/")[0] == 200  # not heavy: still served

        assert http_request(server.url, "POST", "/ballast?mib=0")[0] == 200
        status, _, body = http_request(server.url, path="/readyz")
        assert status == 200, body  # glibc returns the ballast's 1 MiB blocks at once
        assert http_request(server.url, path="/items/3")[0] == 200
        log = server.log()
        assert "memory pressure ok -> critical" in log or "-> critical" in log
        assert "shed_worker_over_hard_limit" in log


def test_auto_limits_follow_the_gunicorn_integration() -> None:
    import memguard.gunicorn as integration

    previous = integration._guard
    previous_server = recycle.server_limits()
    try:
        namespace: dict[str, Any] = {}
        integration.install(namespace, worker_memory_limit="160MiB",
                            worker_memory_hard_limit="320MiB")
        assert derive_worker_limits("auto", "auto", None, environ={}, argv=[]) == (
            160 * MiB, 320 * MiB)
        # An explicit middleware option still wins.
        assert derive_worker_limits("100MiB", "auto", None, environ={}, argv=[]) == (
            100 * MiB, 320 * MiB)
        # No hard limit there: none here either (no shedding the integration did not ask).
        integration.install(namespace, worker_memory_limit="80MiB")
        assert derive_worker_limits("auto", "auto", None, environ={}, argv=[]) == (
            80 * MiB, None)
        # Recycling is the integration's (staggered): the middleware does not trigger it.
        from memguard.config import resolve
        admission = MemoryAdmission.from_options(resolve(["memory"], {}))
        assert admission.recycle_after_response is False
    finally:
        integration._guard = previous
        recycle.set_server(previous_server)
