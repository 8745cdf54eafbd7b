"""Leak reports: tracemalloc diff and type growth, the admin endpoint and its token."""

from __future__ import annotations

import json
import logging
import tracemalloc
from pathlib import Path

import pytest

from memguard import MemGuardMiddleware
from memguard.memory.leaks import LeakAdmin, LeakReporter
from tests.support.servers import http_request, serve


class Hoarded:
    """A type only this test creates, so its growth is unmistakable."""

    def __init__(self, n: int) -> None:
        self.payload = bytes(1000) + n.to_bytes(4, "big")


def test_report_names_the_allocation_site_and_the_type() -> None:
    assert not tracemalloc.is_tracing()
    reporter = LeakReporter(frames=5)
    reporter.start()
    try:
        hoard = [Hoarded(i) for i in range(2000)]  # the line the report must name
        report = reporter.report()
    finally:
        final = reporter.stop()
    assert not tracemalloc.is_tracing()  # stopped: it was not tracing before
    top = report.sites[0]
    assert top.file == __file__ and top.size_diff > 2000 * 1000
    assert any("test_leaks.py" in frame for frame in top.traceback)
    growth = {t.type: t.growth for t in report.types}
    assert growth["Hoarded"] == 2000
    assert report.objgraph  # installed in the dev group
    assert report.traced_after - report.traced_before > 2000 * 1000
    text = report.to_text()
    assert "Top allocation sites by growth" in text and "Hoarded" in text
    data = json.loads(report.to_json())
    assert data["types"][0]["growth"] >= 2000 and data["pid"] > 0
    assert final.sites and len(hoard) == 2000


def test_report_without_start_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="start"):
        LeakReporter().report()


def test_admin_token_checks() -> None:
    admin = LeakAdmin("/_memguard/leaks", "s3cret")
    assert admin.handle("POST", "/_memguard/leaks/start", None)[0] == 401
    assert admin.handle("POST", "/_memguard/leaks/start", "Bearer wrong")[0] == 403
    assert admin.handle("POST", "/_memguard/leaks/start", "Basic s3cret")[0] == 403
    assert admin.handle("GET", "/_memguard/leaks/report", "Bearer s3cret")[0] == 409
    assert admin.handle("GET", "/_memguard/leaks/start", "Bearer s3cret")[0] == 405
    assert admin.handle("GET", "/_memguard/leaks/nope", "Bearer s3cret")[0] == 404
    with pytest.raises(ValueError, match="token"):
        LeakAdmin("/x", "")


def test_admin_path_without_token_is_refused() -> None:
    async def app(scope: object, receive: object, send: object) -> None:
        raise AssertionError

    with pytest.raises(ValueError, match="leak_admin_token"):
        MemGuardMiddleware(app, leak_admin_path="/_memguard/leaks")


@pytest.mark.server
def test_admin_endpoint_on_a_real_server(repo: Path) -> None:
    # Disabled (the default): the path is the app's, which has no such route.
    with serve("uvicorn", "tests.apps.memory_apps:app", ["--log-level", "warning"],
               cwd=repo) as server:
        assert http_request(server.url, "POST", "/_memguard/leaks/start")[0] == 404

    env = {"MEMGUARD_LEAK_ADMIN_PATH": "/_memguard/leaks",
           "MEMGUARD_LEAK_ADMIN_TOKEN": "correct horse"}
    with serve("uvicorn", "tests.apps.memory_apps:app", ["--log-level", "warning"],
               env=env, cwd=repo) as server:
        url = server.url
        assert http_request(url, "POST", "/_memguard/leaks/start")[0] == 401
        wrong = {"Authorization": "Bearer battery staple"}
        assert http_request(url, "POST", "/_memguard/leaks/start", headers=wrong)[0] == 403
        good = {"Authorization": "Bearer correct horse"}
        status, _, body = http_request(url, "POST", "/_memguard/leaks/start?frames=3",
                                       headers=good)
        assert status == 200 and json.loads(body)["status"] == "started"
        for _ in range(30):
            assert http_request(url, path="/leak")[0] == 200
        status, headers, body = http_request(url, "POST", "/_memguard/leaks/stop?format=text",
                                             headers=good)
        assert status == 200 and headers["content-type"].startswith("text/plain")
        text = body.decode()
        assert "memory_apps.py" in text  # the leaking line is among the top sites
        assert "dict" in text


def test_a_wrong_token_log_line_cannot_be_forged_through_the_path(
        caplog: pytest.LogCaptureFixture) -> None:
    admin = LeakAdmin("/_memguard/leaks", "s3cret")
    path = "/_memguard/leaks/x\n2026-01-01 [CRITICAL] fake line"
    with caplog.at_level(logging.WARNING, logger="memguard.leaks"):
        assert admin.handle("POST", path, "Bearer wrong")[0] == 403
    (record,) = [r for r in caplog.records if r.name == "memguard.leaks"]
    message = record.getMessage()
    assert "\n" not in message and "x\\n2026" in message


def test_frames_accept_ascii_digits_only() -> None:
    admin = LeakAdmin("/_memguard/leaks", "s3cret")
    try:
        status, _, _ = admin.handle("POST", "/_memguard/leaks/start", "Bearer s3cret",
                                    "frames=\u00b2")
        assert status == 200  # superscript two is not a number: the default depth
        assert admin.reporter.frames == 10
    finally:
        if admin.reporter.active:
            admin.reporter.stop()
