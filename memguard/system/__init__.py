"""What memguard reads about the machine and its processes.

Three speeds, cheapest first:

- :func:`current_rss` reads this process's resident set from a kept-open
  ``/proc/self/statm`` descriptor with one ``os.pread``: fit for the request path when
  sampled.
- :class:`CgroupMemoryReader` keeps the cgroup's usage file open for cheap repeated
  reads (every N requests or T milliseconds).
- :func:`process_memory` reads ``/proc/PID/smaps_rollup`` for USS and PSS: a quarter of
  a millisecond for a small process, several milliseconds for a big one. It is for the
  master-side watchdog on a timer and for on-demand reports, never per request.

Container limits come from the process's own cgroup (v1 or v2), found through
``/proc/<pid>/cgroup`` and ``/proc/<pid>/mountinfo``; :mod:`memguard.system.cgroups` is
the only module of memguard that opens cgroup files (``memory.stat`` and PSI included).
The host's RAM and ``os.cpu_count()`` are fallbacks only. Every function that reads the
filesystem takes a ``root`` so that tests can point it at a fixture tree.

- :mod:`~memguard.system.process`: this process's and other processes' memory;
- :mod:`~memguard.system.cgroups`: the memory cgroup, its limits, usage and counters;
- :mod:`~memguard.system.cpu`: the CPUs this process can use;
- :mod:`~memguard.system.budget`: the memory budget (the cgroup's limit or the host's RAM).
"""

from __future__ import annotations

from memguard.system.budget import MemoryBudget, host_memory, memory_budget
from memguard.system.cgroups import (
    CgroupInfo,
    CgroupMemory,
    CgroupMemoryReader,
    Pressure,
    find_cgroup,
    read_cgroup,
    read_oom_kills,
)
from memguard.system.cpu import CpuInfo, cpu_info
from memguard.system.process import (
    ProcessMemory,
    current_peak_rss,
    current_rss,
    process_memory,
    read_vm_hwm,
)

__all__ = [
    "CgroupInfo",
    "CgroupMemory",
    "CgroupMemoryReader",
    "CpuInfo",
    "MemoryBudget",
    "Pressure",
    "ProcessMemory",
    "cpu_info",
    "current_peak_rss",
    "current_rss",
    "find_cgroup",
    "host_memory",
    "memory_budget",
    "process_memory",
    "read_cgroup",
    "read_oom_kills",
    "read_vm_hwm",
]
