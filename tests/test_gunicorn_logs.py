"""Inside gunicorn, memguard's worker-side records are lines of gunicorn's own log."""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator

import pytest

from memguard.gunicorn.logs import GunicornLogForwarder, forward_to
from tests.support.servers import http_request, serve


@pytest.mark.server
@pytest.mark.parametrize("worker_class", ["sync", "uvicorn_worker.UvicornWorker"])
def test_a_workers_refusal_is_logged_in_gunicorns_format(worker_class: str) -> None:
    app = ("tests.apps.body_apps:guarded_wsgi" if worker_class == "sync"
           else "tests.apps.body_apps:guarded_asgi")
    with serve("gunicorn", app, ["-c", "python:memguard.gunicorn.conf", "-w", "1",
                                 "-k", worker_class],
               env={"MEMGUARD_MAX_BODY_SIZE": "10"}) as server:
        status, _, _ = http_request(server.url, "POST", "/too-big", body=b"x" * 100)
        assert status == 413
        worker = server.wait_for_workers(1)[0]
        log = server.log()
    lines = [line for line in log.splitlines() if "/too-big" in line]
    assert lines, log
    # gunicorn's error-log format: time, the worker's pid, the level, then the area.
    pattern = re.compile(rf"^\[[^]]+\] \[{worker}\] \[WARNING\] memguard\.body: ")
    assert all(pattern.match(line) for line in lines), lines


@contextlib.contextmanager
def bare_logging() -> Iterator[logging.Logger]:
    """No handler on the root logger (pytest puts its own there during a test), as in
    a gunicorn worker whose app configured no logging; restored after."""
    logger = logging.getLogger("memguard")
    root = logging.getLogger()
    saved_handlers, saved_root = list(logger.handlers), list(root.handlers)
    root.handlers = []
    try:
        yield logger
    finally:
        logger.handlers = saved_handlers
        root.handlers = saved_root


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class _GLog:
    def __init__(self, level: int) -> None:
        self.error_log = logging.Logger("gunicorn.error.test", level)
        self.sink = _Collect()
        self.error_log.addHandler(self.sink)


def test_forwarding_keeps_one_line_per_event_and_gunicorns_level() -> None:
    glog = _GLog(logging.WARNING)
    with bare_logging() as memguard_logger:
        forward_to(glog)
        forward_to(glog)  # a worker replaces the master's forwarder: never two
        assert sum(isinstance(h, GunicornLogForwarder)
                   for h in memguard_logger.handlers) == 1
        log = logging.getLogger("memguard.uploads")
        log.warning("refused %s", "/a\nfake line")
        log.setLevel(logging.INFO)
        try:
            log.info("below gunicorn's level")
        finally:
            log.setLevel(logging.NOTSET)
    [record] = glog.sink.records
    assert record.getMessage() == "memguard.uploads: refused /a\\nfake line"
    assert record.levelno == logging.WARNING


def test_an_app_that_configured_logging_gets_the_records_not_gunicorn() -> None:
    glog = _GLog(logging.DEBUG)
    mine = _Collect()
    with bare_logging():
        forward_to(glog)
        logging.getLogger().addHandler(mine)
        logging.getLogger("memguard.body").warning("refused")
    assert glog.sink.records == [] and len(mine.records) == 1
