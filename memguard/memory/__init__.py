"""The memory layer the two middlewares call: admit, begin, end, body check.

- :mod:`~memguard.memory.layer`: :class:`MemoryLayer`, what the middlewares call;
- :mod:`~memguard.memory.admission`: the pressure level, shedding, the per-chunk body
  check, the after-response recycle check;
- :mod:`~memguard.memory.worker_limits`: the worker's soft and hard limits in bytes;
- :mod:`~memguard.memory.tracking`: sampled per-route accounting and leak suspicion,
  with :mod:`~memguard.memory.routes` (which route a request was) and
  :mod:`~memguard.memory.fit` (the per-window fit);
- :mod:`~memguard.memory.leaks`: leak reports on demand and their admin endpoint;
- :mod:`~memguard.memory.endpoints`: liveness and readiness;
- :mod:`~memguard.memory.metrics`: the Prometheus export.
"""

from __future__ import annotations

from memguard.memory.layer import MemoryLayer
from memguard.memory.leaks import LeakReporter
from memguard.memory.routes import (
    ROUTE_KEY,
    DjangoRouteMiddleware,
    install_flask_route_hook,
)

__all__ = [
    "ROUTE_KEY",
    "DjangoRouteMiddleware",
    "LeakReporter",
    "MemoryLayer",
    "install_flask_route_hook",
]
