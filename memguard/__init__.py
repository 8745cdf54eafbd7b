"""memguard: keeps Python web apps behind gunicorn or uvicorn from dying of memory."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["MemGuardMiddleware", "MemGuardWSGIMiddleware", "__version__"]

from memguard.asgi import MemGuardMiddleware  # noqa: E402
from memguard.wsgi import MemGuardWSGIMiddleware  # noqa: E402
