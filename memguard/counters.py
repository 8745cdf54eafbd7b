"""Process-wide counts of what memguard decided, for logs, health and metrics.

Refusals, recycles and sheds are rare events, so a lock per increment costs nothing
that matters; the per-request path never touches this module unless it refuses.
:mod:`memguard.memory.metrics` reads :func:`snapshot` to export them.
"""

from __future__ import annotations

import os
import threading
from collections import Counter

__all__ = ["increment", "reset", "snapshot", "get"]

_lock = threading.Lock()
_counts: Counter[tuple[str, str]] = Counter()


def _reinit_after_fork() -> None:
    # Another thread of the parent (the gunicorn master's watchdog) may have held the
    # lock at the instant of fork(); the child's copy would then stay locked forever.
    global _lock
    _lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reinit_after_fork)


def increment(area: str, reason: str, amount: int = 1) -> None:
    """Count one ``reason`` in ``area`` (``"body"``, ``"admission"``, ``"recycle"``, ...)."""
    with _lock:
        _counts[(area, reason)] += amount


def get(area: str, reason: str) -> int:
    with _lock:
        return _counts[(area, reason)]


def snapshot() -> dict[tuple[str, str], int]:
    with _lock:
        return dict(_counts)


def reset() -> None:
    """Forget every count (tests; a forked worker starts from its master's counts)."""
    with _lock:
        _counts.clear()
