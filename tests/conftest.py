from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.cgroups import cgroup_unavailable_reason

REPO = Path(__file__).resolve().parent.parent

_cgroup_reason: list[str | None] = []


def _cgroup_skip_reason() -> str | None:
    if not _cgroup_reason:
        _cgroup_reason.append(cgroup_unavailable_reason())
    return _cgroup_reason[0]


@pytest.fixture
def needs_cgroup() -> Iterator[None]:
    """Skip, with the reason, where a cgroup v1 memory group cannot be created."""
    reason = _cgroup_skip_reason()
    if reason is not None:
        pytest.skip(f"needs a writable cgroup v1 memory hierarchy: {reason}")
    yield


@pytest.fixture
def repo() -> Path:
    return REPO
