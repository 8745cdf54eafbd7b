"""Large request bodies generated block by block, and their digests."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator


def patterned_body(size: int, block: int = 1024 * 1024) -> Iterator[bytes]:
    """``size`` bytes of a repeating pattern, generated block by block, so a test or a
    demo can send a multi-GB upload without ever holding it."""
    chunk = bytes(range(256)) * (block // 256)
    sent = 0
    while sent < size:
        piece = chunk[: min(block, size - sent)]
        sent += len(piece)
        yield piece


def patterned_sha256(size: int) -> str:
    """The SHA-256 of ``patterned_body(size)``."""
    digest = hashlib.sha256()
    for piece in patterned_body(size):
        digest.update(piece)
    return digest.hexdigest()
