"""A user's own gunicorn.conf.py with hooks of its own, then memguard's install()."""

from __future__ import annotations

from typing import Any

from memguard.gunicorn import install

timeout = 2
graceful_timeout = 5


def post_request(worker: Any, req: Any, environ: Any, resp: Any) -> None:
    worker.log.info("user post_request hook ran in %s", worker.pid)


def worker_abort(worker: Any) -> None:
    worker.log.warning("user worker_abort hook ran in %s", worker.pid)


install(globals(), worker_memory_limit="80MiB")
