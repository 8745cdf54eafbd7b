"""The CPUs this process can really use: its affinity and the cgroup's CPU quota."""

from __future__ import annotations

import dataclasses
import os

from memguard.system.cgroups import CgroupInfo, ancestors, find_cgroup, read_int
from memguard.system.files import read_text

__all__ = ["CpuInfo", "cpu_info"]



@dataclasses.dataclass(frozen=True)
class CpuInfo:
    """CPUs this process can really use."""

    effective: float  # min(affinity, quota); what worker counts should use
    affinity: int | None  # CPUs in this process's affinity mask
    quota: float | None  # CPUs' worth of time the cgroup allows; None: unlimited
    quota_source: str | None
    host: int  # os.cpu_count(): the fallback, it ignores quotas and affinity


def cpu_info(info: CgroupInfo | None = None, root: str = "/") -> CpuInfo:
    if info is None:
        info = find_cgroup(root=root)
    host = os.cpu_count() or 1
    affinity: int | None = None
    if hasattr(os, "sched_getaffinity") and root in ("", "/"):
        try:
            affinity = len(os.sched_getaffinity(0))
        except OSError:
            affinity = None
    quota: float | None = None
    quota_source: str | None = None
    if info is not None and info.cpu_directory is not None:
        quota, quota_source = _cpu_quota(info)
    candidates: list[float] = [float(host)]
    if affinity:
        candidates.append(float(affinity))
    if quota is not None:
        candidates.append(quota)
    return CpuInfo(
        effective=min(candidates),
        affinity=affinity,
        quota=quota,
        quota_source=quota_source,
        host=host,
    )


def _cpu_quota(info: CgroupInfo) -> tuple[float | None, str | None]:
    """The tightest CPU quota of the group and its ancestors, in CPUs."""
    assert info.cpu_directory is not None
    mount = info.cpu_mount or info.cpu_directory
    best: float | None = None
    source: str | None = None
    for directory in ancestors(info.cpu_directory, mount):
        value: float | None = None
        if info.version == 2:
            where = directory / "cpu.max"
            try:
                fields = read_text(where).split()
            except OSError:
                fields = []
            if len(fields) == 2 and fields[0] != "max":
                value = int(fields[0]) / int(fields[1])
        else:
            where = directory / "cpu.cfs_quota_us"
            quota = read_int(where)
            period = read_int(directory / "cpu.cfs_period_us")
            if quota is not None and period:
                value = quota / period
        if value is not None and (best is None or value < best):
            best, source = value, str(where)
    return best, source

