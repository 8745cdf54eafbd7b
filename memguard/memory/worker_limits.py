"""The worker's soft and hard memory limits, in bytes, from what the options say.

Percentages are of the container's limit; ``"auto"`` takes memguard's gunicorn
integration's limits, or derives them from the container's limit and the worker count.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping

from memguard import recycle, system
from memguard.sizes import format_size, parse_size

__all__ = ["derive_worker_limits", "worker_count_from_environment"]


def derive_worker_limits(
    soft: int | str | None, hard: int | str | None, container_limit: int | None,
    environ: Mapping[str, str] | None = None, argv: list[str] | None = None,
) -> tuple[int | None, int | None]:
    """Resolve the worker's soft and hard limits to bytes (``None``: off).

    ``"25%"`` is a share of the container's limit (of the host's RAM without one, as
    the gunicorn integration reads it). ``"auto"`` (the default) takes the
    limits of memguard's gunicorn integration when the worker runs under it (so the
    middleware refuses a body before the master's watchdog would stop the worker);
    otherwise it derives the soft limit from the container's limit and the worker count
    when both are known:
    85% of the limit shared by the workers plus one (the budget keeps room for a
    replacement that boots while an old worker drains). The hard limit defaults to 1.5x
    the soft limit, capped at 95% of the container's limit.
    """
    soft_bytes = _resolve_limit(soft, container_limit)
    server = _gunicorn_integration_limits()
    if soft == "auto" and server is not None:
        soft_bytes = server[0]
    elif soft == "auto":
        workers = worker_count_from_environment(environ, argv)
        if container_limit is not None and workers is not None:
            soft_bytes = int(container_limit * 0.85 / (workers + 1))
    hard_bytes = _resolve_limit(hard, container_limit)
    if hard == "auto" and server is not None:
        hard_bytes = server[1]
    elif hard == "auto" and soft_bytes is not None:
        hard_bytes = int(soft_bytes * 1.5)
        if container_limit is not None:
            hard_bytes = min(hard_bytes, int(container_limit * 0.95))
        hard_bytes = max(hard_bytes, soft_bytes)
    if soft_bytes is not None and hard_bytes is not None and hard_bytes < soft_bytes:
        raise ValueError(
            f"worker_memory_hard_limit ({format_size(hard_bytes)}) is below "
            f"worker_memory_limit ({format_size(soft_bytes)})"
        )
    return soft_bytes, hard_bytes


def _gunicorn_integration_limits() -> tuple[int | None, int | None] | None:
    """(soft, hard) of ``memguard.gunicorn.install`` in this process (a gunicorn worker
    forked from a master that ran it), or ``None``."""
    return recycle.server_limits()


def _resolve_limit(value: int | str | None, container_limit: int | None) -> int | None:
    if value is None or value == "auto":
        return None
    if isinstance(value, str) and value.strip().endswith("%"):
        # The total the gunicorn integration uses too (system.memory_budget): the
        # container's limit, or the host's RAM where there is none or it is larger, so
        # that the master and the middleware read "25%" as the same bytes.
        host = system.host_memory()
        total = host if container_limit is None else min(container_limit, host)
        return parse_size(value, total=total)
    return parse_size(value)


_WORKERS_ARG = re.compile(r"^(?:-w|--workers)(?:=?)(\d+)$")


def worker_count_from_environment(
    environ: Mapping[str, str] | None = None, argv: list[str] | None = None,
) -> int | None:
    """How many workers share the container: ``WEB_CONCURRENCY`` (which gunicorn and
    uvicorn both read), ``-w N``/``--workers N`` in ``GUNICORN_CMD_ARGS`` or in the
    server's command line. ``None`` when none says."""
    env = os.environ if environ is None else environ
    value = env.get("WEB_CONCURRENCY", "").strip()
    if value.isdigit() and int(value) > 0:
        return int(value)
    for args in (env.get("GUNICORN_CMD_ARGS", "").split(), sys.argv if argv is None else argv):
        for i, arg in enumerate(args):
            match = _WORKERS_ARG.match(arg)
            if match:
                return int(match.group(1)) or None
            if arg in ("-w", "--workers") and i + 1 < len(args) and args[i + 1].isdigit():
                return int(args[i + 1]) or None
    return None
