"""Prometheus export and health answers; multiprocess mode under gunicorn."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from memguard import counters
from memguard.memory.admission import MemoryAdmission
from memguard.memory.endpoints import HealthEndpoint
from memguard.memory.metrics import MetricsExporter, clear_multiprocess_dir
from memguard.memory.tracking import RequestTracker
from tests.support.servers import http_request, serve

MiB = 1 << 20


def test_health_answers() -> None:
    rss = [100 * MiB]
    admission = MemoryAdmission(rss=lambda: rss[0], hard_limit=200 * MiB)
    health = HealthEndpoint(admission, readiness_path="/readyz", liveness_path="/livez")
    assert health.answer("/readyz")[0] == 200
    rss[0] = 300 * MiB
    status, _, body = health.answer("/readyz")
    assert status == 503 and b"not_ready" in body
    assert health.answer("/livez")[0] == 200  # memory never fails liveness


def test_exporter_single_process() -> None:
    counters.reset()
    counters.increment("body", "content_length_over_limit", 3)
    counters.increment("recycle", "worker_memory_limit")
    tracker = RequestTracker(sample_interval=0, leak_window=3600)
    exporter = MetricsExporter(MemoryAdmission(hard_limit=1 << 40), tracker, cache=0)
    tracker.end(tracker.begin(1), "/items/{id}", "/items/1", 2)
    body, ctype = exporter.render()
    text = body.decode()
    assert ctype.startswith("text/plain")
    assert ('memguard_refusals_total{area="body",reason="content_length_over_limit"} 3.0'
            in text)
    assert 'memguard_recycles_total{reason="worker_memory_limit"} 1.0' in text
    assert 'memguard_route_memory_growth_bytes_count{route="/items/{id}"} 1.0' in text
    assert "memguard_memory_pressure_level 0.0" in text
    assert re.search(rf'memguard_worker_memory_bytes{{kind="uss",pid="{os.getpid()}"}} \d', text)
    counters.increment("body", "content_length_over_limit")
    assert ('memguard_refusals_total{area="body",reason="content_length_over_limit"} 4.0'
            in exporter.render()[0].decode())
    counters.reset()


@pytest.fixture
def multiproc_dir() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="memguard-prom-")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _scrape(url: str) -> str:
    status, _, body = http_request(url, path="/metrics")
    assert status == 200
    return body.decode()


def _samples(text: str, name: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


@pytest.mark.server
def test_gunicorn_two_workers_multiprocess(repo: Path, multiproc_dir: str) -> None:
    """Refusals counted in each worker add up in any worker's scrape; every worker's
    memory is there; a dead worker's live gauges go (child_exit -> mark_process_dead)."""
    env = {"PROMETHEUS_MULTIPROC_DIR": multiproc_dir, "MEMGUARD_METRICS_PATH": "/metrics",
           # Every worker is over this limit: each request is shed with 503, counted.
           "MEMGUARD_WORKER_MEMORY_HARD_LIMIT": "1MiB",
           "MEMGUARD_WORKER_MEMORY_LIMIT": "1MiB",
           # Each scrape is read anew: the test follows the gauges as workers come and go.
           "MEMGUARD_METRICS_CACHE": "0"}
    args = ["-w", "2", "-c", "python:tests.apps.memory_gunicorn_conf"]
    with serve("gunicorn", "tests.apps.memory_apps:wsgi_app", args, env=env, cwd=repo,
               ready_path="/metrics") as server:
        workers = server.wait_for_workers(2)
        assert len(workers) == 2
        shed = 0
        for _ in range(40):  # new connections: gunicorn's sync workers share them out
            status, headers, _ = http_request(server.url, path="/")
            assert status == 503 and headers["retry-after"] == "5"
            shed += 1
        text = _scrape(server.url)
        refusals = _samples(text, "memguard_refusals_total")
        key = 'memguard_refusals_total{area="memory",reason="shed_worker_over_hard_limit"}'
        deadline = time.monotonic() + 10
        # Each worker syncs its counters at most once a second, on its next request.
        while refusals.get(key, 0) < shed and time.monotonic() < deadline:
            for _ in range(4):
                http_request(server.url, path="/")
                shed += 1
            time.sleep(0.3)
            refusals = _samples(_scrape(server.url), "memguard_refusals_total")
        assert refusals.get(key, 0) >= 40, refusals
        text = _scrape(server.url)
        memory = _samples(text, "memguard_worker_memory_bytes")
        for pid in workers:
            for kind in ("rss", "uss", "pss"):
                assert memory[f'memguard_worker_memory_bytes{{kind="{kind}",pid="{pid}"}}'] > 0
        pressure = _samples(text, "memguard_memory_pressure_level")
        assert {k for k, v in pressure.items() if v == 2.0}, pressure

        # A worker dies; the master starts another, and its live gauges are dropped.
        victim = workers[0]
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            current = server.children()
            if victim not in current and len(current) == 2:
                break
            time.sleep(0.1)
        assert victim not in server.children()
        time.sleep(0.5)
        assert not any(f"_{victim}.db" in name and "live" in name
                       for name in os.listdir(multiproc_dir))
        text = _scrape(server.url)
        assert f'pid="{victim}"' not in "\n".join(
            line for line in text.splitlines()
            if line.startswith(("memguard_memory_pressure_level", "memguard_worker_memory")))


def test_clear_multiprocess_dir(multiproc_dir: str) -> None:
    Path(multiproc_dir, "counter_123.db").write_bytes(b"x")
    Path(multiproc_dir, "keep.txt").write_text("x")
    assert clear_multiprocess_dir(multiproc_dir) == 1
    assert os.listdir(multiproc_dir) == ["keep.txt"]


def test_a_worker_counts_since_its_last_sync_are_written_at_exit(multiproc_dir: str) -> None:
    """A recycled worker often lives seconds: what it counted after its last sync (about a
    second's worth) is written when it exits, not lost."""
    code = (
        "import os\n"
        "from memguard import counters\n"
        "from memguard.memory.metrics import MetricsExporter\n"
        "exporter = MetricsExporter()\n"
        "exporter.sync()\n"
        "counters.increment('body', 'body_over_limit')\n"  # after the last sync
        "raise SystemExit(0)\n"
    )
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": multiproc_dir}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=60)
    from prometheus_client import CollectorRegistry, generate_latest, multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=multiproc_dir)  # type: ignore[no-untyped-call]
    text = generate_latest(registry).decode()
    assert _samples(text, "memguard_refusals_total") == {
        'memguard_refusals_total{area="body",reason="body_over_limit"}': 1.0}


# ---- issue 16, defect 15: readiness says little; a scrape's cost is bounded ----------


def test_readiness_says_ready_or_not_and_details_only_when_asked() -> None:
    rss = [300 * MiB]
    admission = MemoryAdmission(rss=lambda: rss[0], hard_limit=200 * MiB)
    plain = HealthEndpoint(admission, readiness_path="/readyz")
    status, _, body = plain.answer("/readyz")
    assert status == 503 and json.loads(body) == {"status": "not_ready"}
    rss[0] = 100 * MiB
    assert json.loads(plain.answer("/readyz")[2]) == {"status": "ready"}
    detailed = HealthEndpoint(admission, readiness_path="/readyz", details=True)
    report = json.loads(detailed.answer("/readyz")[2])
    assert report["pid"] == os.getpid() and report["rss"] == 100 * MiB


def test_a_scrape_is_rebuilt_at_most_once_per_cache_interval(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from memguard.memory import metrics

    reads: list[int] = []
    real = metrics.system.process_memory

    def counting(pid: int) -> Any:
        reads.append(pid)
        return real(pid)

    monkeypatch.setattr(metrics.system, "process_memory", counting)
    exporter = MetricsExporter(cache=0.2)
    first, _ = exporter.render()
    per_scrape = len(reads)
    assert per_scrape >= 1
    for _ in range(50):
        assert exporter.render()[0] == first
    assert len(reads) == per_scrape  # fifty scrapes, one read of the workers
    time.sleep(0.25)
    exporter.render()
    assert len(reads) == 2 * per_scrape
    uncached = MetricsExporter(cache=0)
    uncached.render()
    uncached.render()
    assert len(reads) == 4 * per_scrape
