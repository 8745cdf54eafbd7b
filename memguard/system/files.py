"""Reading the machine's files, under a ``root`` that tests point at a fixture tree."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["join", "read_text"]


def join(root: str, path: str) -> str:
    """``path`` (absolute, as on the machine) under ``root``."""
    if root in ("", "/"):
        return path
    return os.path.join(root, path.lstrip("/"))


def read_text(path: str | Path) -> str:
    with open(path, encoding="ascii", errors="replace") as f:
        return f.read()
