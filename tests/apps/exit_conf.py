"""A user's gunicorn.conf.py with exit-time work of its own, then memguard's install():
an atexit handler, a worker_exit hook that starts a non-daemon thread, and an object
whose ``__del__`` only the interpreter's teardown runs."""

from __future__ import annotations

import atexit
import json
import os
import threading
import time
from typing import Any

from memguard.gunicorn import install


class _FreedAtTeardown:
    def __del__(self) -> None:
        os.write(2, f"teardown ran in {os.getpid()}\n".encode())


def post_fork(server: Any, worker: Any) -> None:
    pid = os.getpid()
    # Held by a module in sys.modules: only the interpreter's teardown frees it (this
    # config module itself may not be in sys.modules).
    json._memguard_test_sentinel = _FreedAtTeardown()  # type: ignore[attr-defined]
    atexit.register(lambda: worker.log.info("atexit handler ran in %s", pid))


def worker_exit(server: Any, worker: Any) -> None:
    pid = os.getpid()
    if worker.pid != pid:
        return  # gunicorn calls it in the master too, for a worker that vanished

    def finish_late() -> None:
        time.sleep(0.2)
        os.write(2, f"non-daemon thread finished in {pid}\n".encode())

    threading.Thread(target=finish_late).start()
    worker.log.info("user worker_exit hook ran in %s", pid)


install(globals(), worker_memory_limit="80MiB")
