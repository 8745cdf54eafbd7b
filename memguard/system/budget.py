"""The memory budget every later decision uses: the cgroup's limit, else the host's RAM."""

from __future__ import annotations

import dataclasses

import psutil

from memguard.system.cgroups import CgroupMemory, read_cgroup

__all__ = ["MemoryBudget", "host_memory", "memory_budget"]



def host_memory() -> int:
    """The host's total RAM in bytes (a fallback, not a budget inside a container)."""
    return int(psutil.virtual_memory().total)


@dataclasses.dataclass(frozen=True)
class MemoryBudget:
    """The memory this process's container may use, and where that figure came from."""

    limit: int
    source: str  # the cgroup file, or "host RAM"
    constrained: bool  # True when a cgroup limit (not the host's RAM) decided it


def memory_budget(cgroup: CgroupMemory | None = None, root: str = "/") -> MemoryBudget:
    host = host_memory()
    if cgroup is None:
        cgroup = read_cgroup(root=root)
    if cgroup is not None and cgroup.limit is not None and cgroup.limit < host:
        return MemoryBudget(cgroup.limit, cgroup.limit_source or "cgroup", True)
    return MemoryBudget(host, "host RAM", False)

