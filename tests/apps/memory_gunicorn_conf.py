"""gunicorn settings for the metrics test: multiprocess cleanup hooks."""

from __future__ import annotations

from typing import Any

from memguard.memory import metrics


def on_starting(server: Any) -> None:
    metrics.clear_multiprocess_dir()


def child_exit(server: Any, worker: Any) -> None:
    metrics.child_exit(server, worker)
