"""Recycling a worker on memory: the one decision (:mod:`.decision`) and how each
server is asked to replace a worker (:mod:`.servers`)."""

from memguard.recycle.decision import (
    LIMIT_JITTER,
    RecycleDecision,
    Verdict,
    format_figures,
    own_uss,
    pool_over_budget,
    release_memory,
)
from memguard.recycle.servers import (
    AliveFlagRecycler,
    AsgiWorkerRecycler,
    LogOnlyRecycler,
    Recycler,
    SignalRecycler,
    UvicornWorkerRecycler,
    get_recycler,
    gunicorn_recycler,
    is_uvicorn_worker_class,
    request_recycle,
    server_limits,
    server_observes_requests,
    set_recycler,
    set_server,
    stop_accepting,
)

__all__ = [
    "LIMIT_JITTER",
    "AliveFlagRecycler",
    "AsgiWorkerRecycler",
    "LogOnlyRecycler",
    "RecycleDecision",
    "Recycler",
    "SignalRecycler",
    "UvicornWorkerRecycler",
    "Verdict",
    "format_figures",
    "get_recycler",
    "gunicorn_recycler",
    "is_uvicorn_worker_class",
    "own_uss",
    "pool_over_budget",
    "release_memory",
    "request_recycle",
    "server_limits",
    "server_observes_requests",
    "set_recycler",
    "set_server",
    "stop_accepting",
]
