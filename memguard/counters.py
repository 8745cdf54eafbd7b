"""Process-wide counts of what memguard decided, for logs, health and metrics.

Refusals, recycles and sheds are rare events, so a lock per increment costs nothing
that matters; the per-request path never touches this module unless it refuses.
:mod:`memguard.metrics` reads :func:`snapshot` to export them.
"""

from __future__ import annotations

import threading
from collections import Counter

__all__ = ["increment", "reset", "snapshot", "get"]

_lock = threading.Lock()
_counts: Counter[tuple[str, str]] = Counter()


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
