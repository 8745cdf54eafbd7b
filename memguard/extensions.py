"""memguard's optional C extensions: ``memguard._speedups`` (the ASGI body guard's
per-chunk path) and ``memguard._rss`` (the accounting's RSS read).

The install compiles them where it can (``setup.py`` marks them optional); without a
compiler, or on another interpreter, the same logic runs in Python. Setting
``MEMGUARD_PURE_PYTHON=1`` keeps the Python paths even where the extensions were built
(``make test`` runs the body tests both ways).
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

__all__ = ["load"]


def load(name: str) -> ModuleType | None:
    """The extension ``memguard.<name>``, or ``None`` when it was not built or
    ``MEMGUARD_PURE_PYTHON`` is set."""
    if os.environ.get("MEMGUARD_PURE_PYTHON"):
        return None
    try:
        return importlib.import_module(f"memguard.{name}")
    except ImportError:
        return None
