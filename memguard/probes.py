"""What memguard reads about the machine and its processes.

Three speeds, cheapest first:

- :func:`current_rss` reads this process's resident set from a kept-open
  ``/proc/self/statm`` descriptor with one ``os.pread``: a few microseconds, fit for
  the request path when sampled.
- :class:`CgroupMemoryReader` keeps the cgroup's usage file open for cheap repeated
  reads (every N requests or T milliseconds).
- :func:`process_memory` reads ``/proc/PID/smaps_rollup`` for USS and PSS: a quarter of
  a millisecond for a small process, several milliseconds for a big one. It is for the
  master-side watchdog on a timer and for on-demand reports, never per request.

Container limits come from the process's own cgroup (v1 or v2), found through
``/proc/<pid>/cgroup`` and ``/proc/<pid>/mountinfo``. The host's RAM and
``os.cpu_count()`` are fallbacks only. Every function that reads the filesystem takes a
``root`` so that tests can point it at a fixture tree.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil

__all__ = [
    "CgroupInfo",
    "CgroupMemoryReader",
    "CpuInfo",
    "MemoryBudget",
    "Pressure",
    "ProcessMemory",
    "cpu_info",
    "current_rss",
    "find_cgroup",
    "host_memory",
    "memory_budget",
    "process_memory",
    "read_cgroup",
]

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

# cgroup v1 writes "no limit" as PAGE_COUNTER_MAX in bytes (9223372036854771712 on
# x86_64 with 4 KiB pages); anything this large is not a limit a machine can have.
_UNLIMITED_THRESHOLD = 1 << 60


# --------------------------------------------------------------------------------------
# This process's RSS, fast


class _StatmReader:
    """``/proc/self/statm`` through a descriptor kept open, reopened in forked children.

    A descriptor opened before ``fork()`` keeps describing the parent (``/proc/self`` is
    resolved at open time), so the child must reopen it. ``os.register_at_fork`` does
    that before any code in the child can read (``multiprocessing`` with ``fork`` calls
    ``os.fork`` too, so the hook runs). A read checks no process id: that would be a
    system call per read.
    """

    __slots__ = ("_fd",)

    def __init__(self) -> None:
        self._fd = -1
        self._open()

    def _open(self) -> None:
        try:
            self._fd = os.open("/proc/self/statm", os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            self._fd = -1

    def reopen_after_fork(self) -> None:
        old = self._fd
        self._open()
        if old >= 0 and old != self._fd:
            try:
                os.close(old)
            except OSError:
                pass

    def rss(self) -> int:
        fd = self._fd
        if fd < 0:
            return _psutil_rss()
        # "size resident shared text lib data dt", in pages. The second field is RSS.
        data = os.pread(fd, 128, 0)
        return int(data.split(None, 2)[1]) * PAGE_SIZE


def _psutil_rss() -> int:
    return int(psutil.Process().memory_info().rss)


_statm: _StatmReader | None = _StatmReader() if sys.platform.startswith("linux") else None

if _statm is not None and hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_statm.reopen_after_fork)


# This process's resident set size in bytes (Linux: one ``pread`` on a kept-open
# descriptor; elsewhere psutil).
current_rss: Callable[[], int] = _psutil_rss if _statm is None else _statm.rss


def current_peak_rss(root: str = "/") -> int | None:
    """This process's peak RSS (``VmHWM``) in bytes, or ``None`` where unknown."""
    return read_vm_hwm("self", root=root)


def read_vm_hwm(pid: int | str, root: str = "/") -> int | None:
    """Peak RSS (``VmHWM`` from ``/proc/PID/status``) in bytes, or ``None``."""
    try:
        text = _read_text(_join(root, f"/proc/{pid}/status"))
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return None


# --------------------------------------------------------------------------------------
# Any process's RSS, USS and PSS (the watchdog's view)


@dataclasses.dataclass(frozen=True)
class ProcessMemory:
    """Memory of one process, in bytes.

    ``uss`` (unique set) is what the kernel would free if the process exited; ``pss``
    shares each shared page among its users. After ``fork()`` a worker's RSS includes
    every page it still shares with the master, so recycling decisions use USS or PSS.
    """

    pid: int
    rss: int
    uss: int | None
    pss: int | None
    swap: int | None
    source: str  # "smaps_rollup" or "psutil"


def process_memory(pid: int, root: str = "/") -> ProcessMemory:
    """Read ``pid``'s RSS, USS, PSS and swap. Raises ``ProcessLookupError`` if it is gone."""
    try:
        text = _read_text(_join(root, f"/proc/{pid}/smaps_rollup"))
    except FileNotFoundError:
        if not os.path.exists(_join(root, f"/proc/{pid}")) and root == "/":
            raise ProcessLookupError(pid) from None
        return _psutil_process_memory(pid)
    except ProcessLookupError:
        raise
    except OSError:
        return _psutil_process_memory(pid)
    fields = _parse_kb_fields(text)
    rss = fields.get("Rss")
    if rss is None:
        return _psutil_process_memory(pid)
    private = fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0)
    return ProcessMemory(
        pid=pid,
        rss=rss,
        uss=private,
        pss=fields.get("Pss"),
        swap=fields.get("Swap"),
        source="smaps_rollup",
    )


def _psutil_process_memory(pid: int) -> ProcessMemory:
    try:
        proc = psutil.Process(pid)
        try:
            full = proc.memory_full_info()
            return ProcessMemory(
                pid=pid,
                rss=int(full.rss),
                uss=int(full.uss),
                pss=int(getattr(full, "pss", 0)) or None,
                swap=int(getattr(full, "swap", 0)) or None,
                source="psutil",
            )
        except psutil.AccessDenied:
            info = proc.memory_info()
            return ProcessMemory(pid, int(info.rss), None, None, None, "psutil")
    except psutil.NoSuchProcess:
        raise ProcessLookupError(pid) from None


def _parse_kb_fields(text: str) -> dict[str, int]:
    """``Key:   123 kB`` lines to ``{"Key": bytes}``."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, sep, rest = line.partition(":")
        if not sep:
            continue
        parts = rest.split()
        if len(parts) == 2 and parts[1] == "kB" and parts[0].isdigit():
            out[key] = int(parts[0]) * 1024
    return out


# --------------------------------------------------------------------------------------
# cgroups


@dataclasses.dataclass(frozen=True)
class Pressure:
    """Pressure stall information: share of time (percent) tasks waited on memory."""

    some_avg10: float
    some_avg60: float
    full_avg10: float | None
    full_avg60: float | None
    source: str


@dataclasses.dataclass(frozen=True)
class CgroupInfo:
    """Where this process's memory cgroup lives.

    ``directory`` is the cgroup's own directory on this machine (for v1, in the memory
    hierarchy), ``mount`` the hierarchy's mount point: walking from ``directory`` up to
    ``mount`` visits every ancestor, whose limits also apply.
    """

    version: int  # 1 or 2
    path: str  # as /proc/<pid>/cgroup names it, e.g. "/kubepods/pod1/abc"
    directory: Path
    mount: Path
    cpu_directory: Path | None
    cpu_mount: Path | None


@dataclasses.dataclass(frozen=True)
class CgroupMemory:
    """A snapshot of the memory cgroup's state, in bytes where a size."""

    info: CgroupInfo
    limit: int | None  # the tightest limit of the group and its ancestors; None: unlimited
    limit_source: str | None  # the file that set it
    usage: int | None
    peak: int | None
    oom_kills: int  # processes the kernel's OOM killer ended in this group
    oom_events: int  # times the group hit its limit and the OOM path ran
    oom_group: bool | None  # v2 memory.oom.group: one OOM kills the whole group
    swap_limit: int | None  # swap allowed on top of memory; None: unlimited or unknown
    swap_usage: int | None
    pressure: Pressure | None
    stat: dict[str, int]


def _join(root: str, path: str) -> str:
    if root in ("", "/"):
        return path
    return os.path.join(root, path.lstrip("/"))


def _read_text(path: str | Path) -> str:
    with open(path, encoding="ascii", errors="replace") as f:
        return f.read()


def _read_int(path: Path) -> int | None:
    """An integer file; ``max`` and v1's huge "no limit" value read as ``None``."""
    try:
        text = _read_text(path).strip()
    except OSError:
        return None
    if text == "max" or not text:
        return None
    try:
        value = int(text.split()[0])
    except ValueError:
        return None
    if value >= _UNLIMITED_THRESHOLD or value < 0:
        return None
    return value


def _read_flat_keyed(path: Path) -> dict[str, int]:
    """``key value`` lines (memory.stat, memory.events, memory.oom_control)."""
    out: dict[str, int] = {}
    try:
        text = _read_text(path)
    except OSError:
        return out
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2:
            try:
                out[parts[0]] = int(parts[1])
            except ValueError:
                continue
    return out


def _parse_psi(path: Path, source: str) -> Pressure | None:
    try:
        text = _read_text(path)
    except OSError:
        return None
    rows: dict[str, dict[str, float]] = {}
    for line in text.splitlines():
        kind, _, rest = line.partition(" ")
        values: dict[str, float] = {}
        for item in rest.split():
            key, _, val = item.partition("=")
            try:
                values[key] = float(val)
            except ValueError:
                continue
        rows[kind] = values
    some = rows.get("some")
    if some is None:
        return None
    full = rows.get("full")
    return Pressure(
        some_avg10=some.get("avg10", 0.0),
        some_avg60=some.get("avg60", 0.0),
        full_avg10=full.get("avg10") if full else None,
        full_avg60=full.get("avg60") if full else None,
        source=source,
    )


def _mounts(root: str, pid: int | str) -> Iterator[tuple[str, str, str, set[str]]]:
    """(root-in-hierarchy, mount point, fstype, super options) per cgroup mount."""
    try:
        text = _read_text(_join(root, f"/proc/{pid}/mountinfo"))
    except OSError:
        return
    for line in text.splitlines():
        # 36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        lfields = left.split()
        rfields = right.split()
        if len(lfields) < 5 or len(rfields) < 3:
            continue
        fstype = rfields[0]
        if fstype not in ("cgroup", "cgroup2"):
            continue
        options = set(rfields[2].split(","))
        yield _unescape(lfields[3]), _unescape(lfields[4]), fstype, options


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as octal (\040 ...)
    if "\\" not in field:
        return field
    return field.encode("ascii").decode("unicode_escape")


def _resolve(root: str, mount_root: str, mount_point: str, cg_path: str) -> Path:
    """The directory of ``cg_path`` under a hierarchy mounted at ``mount_point``.

    The mount's root is where in the hierarchy the mount starts: on a host it is "/";
    in a container with a cgroup namespace the container's own group is mounted as "/"
    and /proc/self/cgroup also says "/"; in a container without one, /proc/self/cgroup
    names the full host path (``/docker/abc``) while the mount starts at that group, so
    the path is made relative to the mount root.
    """
    rel = cg_path
    if mount_root not in ("", "/"):
        if rel == mount_root or rel.startswith(mount_root.rstrip("/") + "/"):
            rel = rel[len(mount_root.rstrip("/")) :]
    directory = Path(_join(root, mount_point)) / rel.lstrip("/")
    if not directory.is_dir():
        # The path from /proc/self/cgroup is not visible in this mount (a container
        # with the host's view of /proc/self/cgroup but its own group mounted): the
        # mount point itself is the best answer.
        directory = Path(_join(root, mount_point))
    return directory


def find_cgroup(pid: int | str = "self", root: str = "/") -> CgroupInfo | None:
    """Find ``pid``'s memory cgroup (v1 memory controller, or the v2 unified group)."""
    try:
        text = _read_text(_join(root, f"/proc/{pid}/cgroup"))
    except OSError:
        return None
    v1_memory: str | None = None
    v1_cpu: str | None = None
    v2_path: str | None = None
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy_id, controllers, path = parts
        if hierarchy_id == "0" and controllers == "":
            v2_path = path
            continue
        names = set(controllers.split(","))
        if "memory" in names:
            v1_memory = path
        if "cpu" in names:
            v1_cpu = path
    mounts = list(_mounts(root, pid))
    if v1_memory is not None:
        for mount_root, mount_point, fstype, options in mounts:
            if fstype == "cgroup" and "memory" in options:
                cpu_dir = cpu_mount = None
                if v1_cpu is not None:
                    for c_root, c_point, c_type, c_opts in mounts:
                        if c_type == "cgroup" and "cpu" in c_opts:
                            cpu_dir = _resolve(root, c_root, c_point, v1_cpu)
                            cpu_mount = Path(_join(root, c_point))
                            break
                return CgroupInfo(
                    version=1,
                    path=v1_memory,
                    directory=_resolve(root, mount_root, mount_point, v1_memory),
                    mount=Path(_join(root, mount_point)),
                    cpu_directory=cpu_dir,
                    cpu_mount=cpu_mount,
                )
    if v2_path is not None:
        for mount_root, mount_point, fstype, _options in mounts:
            if fstype == "cgroup2":
                directory = _resolve(root, mount_root, mount_point, v2_path)
                return CgroupInfo(
                    version=2,
                    path=v2_path,
                    directory=directory,
                    mount=Path(_join(root, mount_point)),
                    cpu_directory=directory,
                    cpu_mount=Path(_join(root, mount_point)),
                )
    return None


def _ancestors(directory: Path, mount: Path) -> Iterator[Path]:
    """``directory``, then each parent up to and including the mount point."""
    yield directory
    while directory != mount and mount in directory.parents:
        directory = directory.parent
        yield directory


def read_cgroup(info: CgroupInfo | None = None, root: str = "/") -> CgroupMemory | None:
    """Read the memory cgroup's limit, usage, peak, OOM kills, swap and pressure."""
    if info is None:
        info = find_cgroup(root=root)
        if info is None:
            return None
    return _read_v1(info, root) if info.version == 1 else _read_v2(info, root)


def _tightest(
    info: CgroupInfo, filename: str
) -> tuple[int | None, str | None]:
    best: int | None = None
    source: str | None = None
    for directory in _ancestors(info.directory, info.mount):
        value = _read_int(directory / filename)
        if value is not None and (best is None or value < best):
            best, source = value, str(directory / filename)
    return best, source


def _read_v1(info: CgroupInfo, root: str) -> CgroupMemory:
    d = info.directory
    stat = _read_flat_keyed(d / "memory.stat")
    # hierarchical_memory_limit already folds in every ancestor's limit (with
    # use_hierarchy=1, the default since 5.x); the walk covers older kernels.
    limit, source = _tightest(info, "memory.limit_in_bytes")
    hierarchical = stat.get("hierarchical_memory_limit")
    if hierarchical is not None and hierarchical < _UNLIMITED_THRESHOLD:
        if limit is None or hierarchical < limit:
            limit, source = hierarchical, str(d / "memory.stat") + " (hierarchical_memory_limit)"
    memsw, _ = _tightest(info, "memory.memsw.limit_in_bytes")
    swap_limit = None
    if memsw is not None:
        swap_limit = max(0, memsw - limit) if limit is not None else memsw
    usage = _read_int(d / "memory.usage_in_bytes")
    memsw_usage = _read_int(d / "memory.memsw.usage_in_bytes")
    oom = _read_flat_keyed(d / "memory.oom_control")
    pressure = _parse_psi(Path(_join(root, "/proc/pressure/memory")), "system (/proc/pressure)")
    return CgroupMemory(
        info=info,
        limit=limit,
        limit_source=source,
        usage=usage,
        peak=_read_int(d / "memory.max_usage_in_bytes"),
        oom_kills=oom.get("oom_kill", 0),
        oom_events=_read_int(d / "memory.failcnt") or 0,
        oom_group=None,
        swap_limit=swap_limit,
        swap_usage=(memsw_usage - usage) if memsw_usage is not None and usage else None,
        pressure=pressure,
        stat=stat,
    )


def _read_v2(info: CgroupInfo, root: str) -> CgroupMemory:
    d = info.directory
    limit, source = _tightest(info, "memory.max")
    high, high_source = _tightest(info, "memory.high")
    if high is not None and (limit is None or high < limit):
        # memory.high throttles and reclaims rather than kills, but a process held at
        # it is as stuck as one at the limit: treat it as the budget.
        limit, source = high, high_source
    swap_limit, _ = _tightest(info, "memory.swap.max")
    events = _read_flat_keyed(d / "memory.events")
    oom_group_value = _read_int(d / "memory.oom.group")
    pressure = _parse_psi(d / "memory.pressure", "cgroup (memory.pressure)")
    if pressure is None:
        pressure = _parse_psi(
            Path(_join(root, "/proc/pressure/memory")), "system (/proc/pressure)"
        )
    return CgroupMemory(
        info=info,
        limit=limit,
        limit_source=source,
        usage=_read_int(d / "memory.current"),
        peak=_read_int(d / "memory.peak"),
        oom_kills=events.get("oom_kill", 0),
        oom_events=events.get("oom", 0),
        oom_group=None if oom_group_value is None else oom_group_value == 1,
        swap_limit=swap_limit,
        swap_usage=_read_int(d / "memory.swap.current"),
        pressure=pressure,
        stat=_read_flat_keyed(d / "memory.stat"),
    )


class CgroupMemoryReader:
    """Cheap repeated reads of the group's usage through a kept-open descriptor.

    Reopened after fork for the same reason as the statm reader: it must keep working
    in each worker that inherits it. Reads ~2 us.
    """

    def __init__(self, info: CgroupInfo | None = None) -> None:
        self.info = info if info is not None else find_cgroup()
        self._fd = -1
        self._lock = threading.Lock()
        self._open()
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._open)

    def _open(self) -> None:
        self._fd = -1
        if self.info is None:
            return
        name = "memory.usage_in_bytes" if self.info.version == 1 else "memory.current"
        try:
            self._fd = os.open(self.info.directory / name, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            self._fd = -1

    def usage(self) -> int | None:
        if self._fd < 0:
            return None
        try:
            return int(os.pread(self._fd, 32, 0))
        except (OSError, ValueError):
            return None


# --------------------------------------------------------------------------------------
# CPU


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
    for directory in _ancestors(info.cpu_directory, mount):
        value: float | None = None
        if info.version == 2:
            where = directory / "cpu.max"
            try:
                fields = _read_text(where).split()
            except OSError:
                fields = []
            if len(fields) == 2 and fields[0] != "max":
                value = int(fields[0]) / int(fields[1])
        else:
            where = directory / "cpu.cfs_quota_us"
            quota = _read_int(where)
            period = _read_int(directory / "cpu.cfs_period_us")
            if quota is not None and period:
                value = quota / period
        if value is not None and (best is None or value < best):
            best, source = value, str(where)
    return best, source


# --------------------------------------------------------------------------------------
# The budget all later decisions use


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
