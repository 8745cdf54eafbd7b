"""An append-only JSON-lines event log, for the memory timeline (``memguard report``).

Off unless a path is configured (``MEMGUARD_EVENTS=/path/events.jsonl`` or
:func:`configure`). Each line is one JSON object with at least ``ts`` (Unix time),
``kind`` and ``pid``. Kinds used across memguard:

- ``sample``: a process's memory (``rss``, ``uss``, ``pss``, ``role``: master/worker)
- ``recycle``: a worker asked to be replaced (``reason``, figures)
- ``refusal``: a request refused (``status``, ``reason``, figures)
- ``oom_kill``: a worker killed by the kernel's OOM killer
- ``worker_exit``, ``worker_start``, ``limit``: lifecycle and configured limits

Lines are written with one ``os.write`` on an ``O_APPEND`` descriptor, so the master and
every worker can share one file without interleaving (writes under PIPE_BUF are atomic;
lines are kept short).
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any

__all__ = ["configure", "emit", "enabled", "ENV_VAR"]

ENV_VAR = "MEMGUARD_EVENTS"

_lock = threading.Lock()
_path: str | None = os.environ.get(ENV_VAR) or None
_fd = -1
_fd_pid = -1


def _reinit_after_fork() -> None:
    # A thread of the parent (the gunicorn master's watchdog) may have held the lock
    # at the instant of fork(); the child's copy would then stay locked forever.
    global _lock
    _lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reinit_after_fork)


def configure(path: str | None) -> None:
    """Write events to ``path`` (``None`` turns the log off)."""
    global _path, _fd, _fd_pid
    with _lock:
        if _fd >= 0 and _fd_pid == os.getpid():
            os.close(_fd)
        _path, _fd, _fd_pid = path, -1, -1


def enabled() -> bool:
    return _path is not None


def emit(kind: str, **fields: Any) -> None:
    """Append one event; never raises (an event log must not break a request)."""
    if _path is None:
        return
    global _fd, _fd_pid
    record = {"ts": round(time.time(), 4), "kind": kind, "pid": os.getpid(), **fields}
    line = (json.dumps(record, separators=(",", ":"), default=str) + "\n").encode()
    try:
        with _lock:
            if _fd < 0 or _fd_pid != os.getpid():
                # A descriptor inherited across fork is shared with the parent, which is
                # fine for O_APPEND; reopening keeps ownership simple for close().
                _fd = os.open(_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                              0o644)
                _fd_pid = os.getpid()
            os.write(_fd, line)
    except OSError:
        pass
