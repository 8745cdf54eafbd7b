"""How a worker asks its server to replace it.

The middleware (and gunicorn hooks) decide *that* a worker should be recycled; a
:class:`Recycler` knows *how* on the server it runs under. The default only logs, so a
library used outside any known server never kills its own process. Server integrations
install theirs with :func:`set_recycler` (gunicorn: ``worker.alive = False`` for sync and
gthread; a ``SIGTERM`` to itself for ``uvicorn-worker`` and standalone uvicorn, the
trigger every worker class honours as a graceful stop).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any, Protocol

from memguard import counters, events

__all__ = [
    "LogOnlyRecycler",
    "Recycler",
    "SignalRecycler",
    "get_recycler",
    "request_recycle",
    "set_recycler",
]

log = logging.getLogger("memguard.recycle")


class Recycler(Protocol):
    def recycle(self, reason: str, figures: dict[str, Any]) -> bool:
        """Start a graceful replacement of this worker; True if one was started."""
        ...


class LogOnlyRecycler:
    """The default: log that a recycle would help, do nothing else."""

    def __init__(self) -> None:
        self._logged: set[str] = set()

    def recycle(self, reason: str, figures: dict[str, Any]) -> bool:
        if reason not in self._logged:
            self._logged.add(reason)
            log.warning(
                "worker %s should be recycled (%s) but no server integration is installed: %s",
                os.getpid(), reason, figures,
            )
        return False


class SignalRecycler:
    """Send this process a signal its server treats as a graceful stop (default SIGTERM).

    Under gunicorn the master then starts a replacement; under ``uvicorn --workers N``
    (0.30+) the supervisor does. Sent once per process.
    """

    def __init__(self, sig: int = signal.SIGTERM) -> None:
        self.sig = sig
        self._sent = False
        self._lock = threading.Lock()

    def recycle(self, reason: str, figures: dict[str, Any]) -> bool:
        with self._lock:
            if self._sent:
                return False
            self._sent = True
        log.warning("recycling worker %s: %s %s", os.getpid(), reason, figures)
        os.kill(os.getpid(), self.sig)
        return True


_recycler: Recycler = LogOnlyRecycler()


def set_recycler(recycler: Recycler) -> Recycler:
    """Install ``recycler`` for this process; returns the previous one."""
    global _recycler
    previous, _recycler = _recycler, recycler
    return previous


def get_recycler() -> Recycler:
    return _recycler


def request_recycle(reason: str, **figures: Any) -> bool:
    """Ask the installed recycler to replace this worker. Never raises."""
    try:
        started = _recycler.recycle(reason, figures)
    except Exception:  # a failing recycler must never kill a request
        log.exception("recycler %r failed", _recycler)
        return False
    if started:
        counters.increment("recycle", reason)
        events.emit("recycle", reason=reason, **figures)
    return started
