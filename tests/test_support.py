"""The test support (tests/support/) starts real servers and leave nothing behind."""

from __future__ import annotations

import psutil
import pytest

from tests.support.servers import http_request, serve

pytestmark = pytest.mark.server


def gone(pids: list[int]) -> bool:
    return all(not psutil.pid_exists(p) or psutil.Process(p).status() == "zombie" for p in pids)


def test_gunicorn_on_port_zero_and_stopped_with_its_workers(repo: object) -> None:
    with serve("gunicorn", "tests.apps.hello:wsgi_app", ["-w", "2"], cwd=str(repo)) as server:
        assert server.port > 0
        status, _, body = http_request(server.url)
        assert status == 200 and body.startswith(b"hello from ")
        workers = server.wait_for_workers(2)
        assert len(workers) == 2
        pids = [server.pid, *workers]
    assert gone(pids)


def test_uvicorn_on_port_zero(repo: object) -> None:
    with serve("uvicorn", "tests.apps.hello:asgi_app", cwd=str(repo)) as server:
        status, _, body = http_request(server.url)
        assert status == 200 and body == f"hello from {server.pid}\n".encode()
        pid = server.pid
    assert gone([pid])


def test_doctor_lists_gunicorn_workers(repo: object) -> None:
    from memguard.cli import doctor

    with serve("gunicorn", "tests.apps.hello:wsgi_app", ["-w", "2"], cwd=str(repo)) as server:
        server.wait_for_workers(2)
        report = doctor.collect(pid=server.pid)
        (entry,) = report["gunicorn"]
        roles = sorted(p["role"] for p in entry["processes"])
        assert roles == ["master", "worker", "worker"]
        for p in entry["processes"]:
            assert p["rss"] > 0 and p["uss"] is not None and p["uss"] <= p["rss"]
        text = doctor.render_text(report)
        assert f"gunicorn master {server.pid}" in text
        # Found without --pid as well.
        assert server.pid in doctor.find_gunicorn_masters()


def test_failing_server_reports_its_log(repo: object) -> None:
    with pytest.raises(RuntimeError, match="exited"):
        with serve("gunicorn", "tests.apps.nope:app", cwd=str(repo), timeout=20):
            pass
