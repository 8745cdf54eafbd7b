"""The memory cgroup (v1 or v2): where it is, its limits and usage, ``memory.stat``,
pressure stall information and OOM counters.

This is the one module of memguard that opens cgroup files. :func:`find_cgroup` finds
the process's group through ``/proc/<pid>/cgroup`` and ``/proc/<pid>/mountinfo``;
:func:`read_cgroup` takes a full snapshot (for startup and reports);
:class:`CgroupMemoryReader` keeps the usage file open for cheap repeated reads.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Iterator
from pathlib import Path

from memguard.system.files import join, read_text

__all__ = [
    "CgroupInfo",
    "CgroupMemory",
    "CgroupMemoryReader",
    "Pressure",
    "ancestors",
    "find_cgroup",
    "read_cgroup",
    "read_int",
    "read_oom_kills",
]

# cgroup v1 writes "no limit" as PAGE_COUNTER_MAX in bytes (9223372036854771712 on
# x86_64 with 4 KiB pages); anything this large is not a limit a machine can have.
_UNLIMITED_THRESHOLD = 1 << 60


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



def read_int(path: Path) -> int | None:
    """An integer file; ``max`` and v1's huge "no limit" value read as ``None``."""
    try:
        text = read_text(path).strip()
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
        text = read_text(path)
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
        text = read_text(path)
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
        text = read_text(join(root, f"/proc/{pid}/mountinfo"))
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
    directory = Path(join(root, mount_point)) / rel.lstrip("/")
    if not directory.is_dir():
        # The path from /proc/self/cgroup is not visible in this mount (a container
        # with the host's view of /proc/self/cgroup but its own group mounted): the
        # mount point itself is the best answer.
        directory = Path(join(root, mount_point))
    return directory


def find_cgroup(pid: int | str = "self", root: str = "/") -> CgroupInfo | None:
    """Find ``pid``'s memory cgroup (v1 memory controller, or the v2 unified group)."""
    try:
        text = read_text(join(root, f"/proc/{pid}/cgroup"))
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
                            cpu_mount = Path(join(root, c_point))
                            break
                return CgroupInfo(
                    version=1,
                    path=v1_memory,
                    directory=_resolve(root, mount_root, mount_point, v1_memory),
                    mount=Path(join(root, mount_point)),
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
                    mount=Path(join(root, mount_point)),
                    cpu_directory=directory,
                    cpu_mount=Path(join(root, mount_point)),
                )
    return None


def ancestors(directory: Path, mount: Path) -> Iterator[Path]:
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
    for directory in ancestors(info.directory, info.mount):
        value = read_int(directory / filename)
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
    usage = read_int(d / "memory.usage_in_bytes")
    memsw_usage = read_int(d / "memory.memsw.usage_in_bytes")
    oom = _read_flat_keyed(d / "memory.oom_control")
    pressure = _parse_psi(Path(join(root, "/proc/pressure/memory")), "system (/proc/pressure)")
    return CgroupMemory(
        info=info,
        limit=limit,
        limit_source=source,
        usage=usage,
        peak=read_int(d / "memory.max_usage_in_bytes"),
        oom_kills=oom.get("oom_kill", 0),
        oom_events=read_int(d / "memory.failcnt") or 0,
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
    oom_group_value = read_int(d / "memory.oom.group")
    pressure = _parse_psi(d / "memory.pressure", "cgroup (memory.pressure)")
    if pressure is None:
        pressure = _parse_psi(
            Path(join(root, "/proc/pressure/memory")), "system (/proc/pressure)"
        )
    return CgroupMemory(
        info=info,
        limit=limit,
        limit_source=source,
        usage=read_int(d / "memory.current"),
        peak=read_int(d / "memory.peak"),
        oom_kills=events.get("oom_kill", 0),
        oom_events=events.get("oom", 0),
        oom_group=None if oom_group_value is None else oom_group_value == 1,
        swap_limit=swap_limit,
        swap_usage=read_int(d / "memory.swap.current"),
        pressure=pressure,
        stat=_read_flat_keyed(d / "memory.stat"),
    )


class CgroupMemoryReader:
    """Cheap repeated reads of the group's usage through a kept-open descriptor.

    Reopened after fork, like :func:`memguard.system.process.current_rss`'s descriptor:
    it must keep working in each worker that inherits it. Reads ~2 us.
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

    def inactive_file(self) -> int:
        """The group's inactive page cache (from ``memory.stat``), which the kernel drops
        before any OOM kill; 0 where unknown. A file read: not for every request."""
        info = self.info
        if info is None:
            return 0
        key = "total_inactive_file" if info.version == 1 else "inactive_file"
        return _read_flat_keyed(info.directory / "memory.stat").get(key, 0)

    def working_set(self) -> int | None:
        """The group's usage minus the inactive page cache: what an OOM kill would be
        about (the working set, as Kubernetes counts it)."""
        usage = self.usage()
        if usage is None:
            return None
        return max(usage - self.inactive_file(), 0)

    def memory_stall(self) -> float | None:
        """PSI ``full avg10`` of the group's own ``memory.pressure`` (cgroup v2): the
        percent of the last 10 s in which every task of the group waited on memory."""
        info = self.info
        if info is None or info.version != 2:
            return None
        pressure = _parse_psi(info.directory / "memory.pressure", "cgroup (memory.pressure)")
        return pressure.full_avg10 if pressure is not None else None


def read_oom_kills(cgroup: CgroupInfo | None) -> tuple[int, str] | None:
    """The OOM-kill counter that covers the group: the cgroup's when it has a limit,
    else the system's (``/proc/vmstat``); with where it came from."""
    if cgroup is not None:
        info = read_cgroup(cgroup)
        if info is not None and info.limit is not None:
            return info.oom_kills, "cgroup"
    try:
        with open("/proc/vmstat") as f:
            for line in f:
                if line.startswith("oom_kill "):
                    return int(line.split()[1]), "system"
    except OSError:
        pass
    return None
