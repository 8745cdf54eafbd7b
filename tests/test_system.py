"""memguard.system on fixture trees (v1, v2, nested, max, missing files) and on this machine."""

from __future__ import annotations

import mmap
import os
import signal
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from memguard import system
from memguard.system import process

V1_UNLIMITED = "9223372036854771712"


def write(root: Path, rel: str, text: str) -> None:
    path = root / rel.lstrip("/")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


MOUNTINFO_V1 = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
"""

MOUNTINFO_V2 = """\
25 30 0:23 / /sys rw,nosuid - sysfs sysfs rw
28 25 0:26 / /sys/fs/cgroup rw,nosuid,nodev - cgroup2 cgroup2 rw,nsdelegate
"""


def v1_tree(root: Path, *, group: str = "/kubepods/pod1/abc", limit: str = "536870912",
            parent_limit: str = V1_UNLIMITED) -> None:
    write(root, "/proc/self/cgroup", f"8:pids:/\n4:memory:{group}\n1:cpu:{group}\n0::/\n")
    write(root, "/proc/self/mountinfo", MOUNTINFO_V1)
    mem = f"/sys/fs/cgroup/memory{group}"
    write(root, f"{mem}/memory.limit_in_bytes", limit + "\n")
    write(root, f"{mem}/memory.usage_in_bytes", "104857600\n")
    write(root, f"{mem}/memory.max_usage_in_bytes", "209715200\n")
    write(root, f"{mem}/memory.failcnt", "7\n")
    write(root, f"{mem}/memory.oom_control", "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n")
    write(root, f"{mem}/memory.stat", "cache 0\nrss 100\n")
    parent = "/sys/fs/cgroup/memory" + group.rsplit("/", 1)[0]
    write(root, f"{parent}/memory.limit_in_bytes", parent_limit + "\n")
    write(root, "/sys/fs/cgroup/memory/memory.limit_in_bytes", V1_UNLIMITED + "\n")
    cpu = f"/sys/fs/cgroup/cpu{group}"
    write(root, f"{cpu}/cpu.cfs_quota_us", "150000\n")
    write(root, f"{cpu}/cpu.cfs_period_us", "100000\n")
    write(root, "/proc/pressure/memory",
          "some avg10=1.50 avg60=0.50 avg300=0.10 total=100\n"
          "full avg10=0.25 avg60=0.00 avg300=0.00 total=10\n")


def v2_tree(root: Path, *, group: str = "/system.slice/app.service", mem_max: str = "max",
            parent_max: str = "268435456", cpu_max: str = "50000 100000") -> None:
    write(root, "/proc/self/cgroup", f"0::{group}\n")
    write(root, "/proc/self/mountinfo", MOUNTINFO_V2)
    d = f"/sys/fs/cgroup{group}"
    write(root, f"{d}/memory.max", mem_max + "\n")
    write(root, f"{d}/memory.high", "max\n")
    write(root, f"{d}/memory.current", "52428800\n")
    write(root, f"{d}/memory.peak", "62914560\n")
    write(root, f"{d}/memory.swap.max", "0\n")
    write(root, f"{d}/memory.swap.current", "0\n")
    write(root, f"{d}/memory.oom.group", "1\n")
    write(root, f"{d}/memory.events",
          "low 0\nhigh 0\nmax 12\noom 2\noom_kill 2\noom_group_kill 0\n")
    write(root, f"{d}/memory.pressure",
          "some avg10=12.00 avg60=3.00 avg300=1.00 total=5\nfull avg10=4.00 avg60=1.00 "
          "avg300=0.00 total=2\n")
    write(root, f"{d}/cpu.max", cpu_max + "\n")
    parent = "/sys/fs/cgroup" + group.rsplit("/", 1)[0]
    write(root, f"{parent}/memory.max", parent_max + "\n")
    write(root, f"{parent}/cpu.max", "max 100000\n")


def test_v1_limit_usage_peak_oom(tmp_path: Path) -> None:
    v1_tree(tmp_path)
    info = system.find_cgroup(root=str(tmp_path))
    assert info is not None and info.version == 1
    assert info.path == "/kubepods/pod1/abc"
    mem = system.read_cgroup(info, root=str(tmp_path))
    assert mem is not None
    assert mem.limit == 512 * 1024**2
    assert mem.limit_source is not None and mem.limit_source.endswith(
        "kubepods/pod1/abc/memory.limit_in_bytes")
    assert mem.usage == 100 * 1024**2
    assert mem.peak == 200 * 1024**2
    assert mem.oom_kills == 3
    assert mem.swap_limit is None
    assert mem.pressure is not None and mem.pressure.some_avg10 == 1.5
    cpu = system.cpu_info(info, root=str(tmp_path))
    assert cpu.quota == 1.5
    assert cpu.effective == min(1.5, float(os.cpu_count() or 1))


def test_v1_ancestor_limit_is_tighter(tmp_path: Path) -> None:
    v1_tree(tmp_path, limit=V1_UNLIMITED, parent_limit="268435456")
    mem = system.read_cgroup(system.find_cgroup(root=str(tmp_path)), root=str(tmp_path))
    assert mem is not None
    assert mem.limit == 256 * 1024**2
    assert mem.limit_source is not None and mem.limit_source.endswith(
        "kubepods/pod1/memory.limit_in_bytes")


def test_v1_hierarchical_limit_from_memory_stat(tmp_path: Path) -> None:
    v1_tree(tmp_path, limit=V1_UNLIMITED)
    write(tmp_path, "/sys/fs/cgroup/memory/kubepods/pod1/abc/memory.stat",
          "cache 0\nhierarchical_memory_limit 134217728\n")
    mem = system.read_cgroup(root=str(tmp_path))
    assert mem is not None and mem.limit == 128 * 1024**2
    assert "hierarchical_memory_limit" in (mem.limit_source or "")


def test_v1_unlimited_everywhere(tmp_path: Path) -> None:
    v1_tree(tmp_path, limit=V1_UNLIMITED)
    mem = system.read_cgroup(root=str(tmp_path))
    assert mem is not None and mem.limit is None
    budget = system.memory_budget(mem)
    assert not budget.constrained and budget.source == "host RAM"


def test_v2_nested_max_and_parent(tmp_path: Path) -> None:
    v2_tree(tmp_path)
    info = system.find_cgroup(root=str(tmp_path))
    assert info is not None and info.version == 2
    mem = system.read_cgroup(info, root=str(tmp_path))
    assert mem is not None
    assert mem.limit == 256 * 1024**2  # "max" in the group, 256 MiB in its parent
    assert mem.usage == 50 * 1024**2
    assert mem.peak == 60 * 1024**2
    assert mem.oom_kills == 2
    assert mem.oom_group is True
    assert mem.swap_limit == 0
    assert mem.pressure is not None and mem.pressure.source.startswith("cgroup")
    assert mem.pressure.some_avg10 == 12.0
    cpu = system.cpu_info(info, root=str(tmp_path))
    assert cpu.quota == 0.5 and cpu.effective == 0.5


def test_v2_memory_high_counts_as_budget(tmp_path: Path) -> None:
    v2_tree(tmp_path, mem_max="1073741824", parent_max="max")
    write(tmp_path, "/sys/fs/cgroup/system.slice/app.service/memory.high", "805306368\n")
    mem = system.read_cgroup(root=str(tmp_path))
    assert mem is not None and mem.limit == 768 * 1024**2


def test_v2_everything_max(tmp_path: Path) -> None:
    v2_tree(tmp_path, parent_max="max", cpu_max="max 100000")
    mem = system.read_cgroup(root=str(tmp_path))
    assert mem is not None and mem.limit is None
    assert system.cpu_info(mem.info, root=str(tmp_path)).quota is None


def test_v2_container_namespace_root(tmp_path: Path) -> None:
    # Inside a container with a cgroup namespace, /proc/self/cgroup says "0::/".
    v2_tree(tmp_path, group="/", mem_max="402653184")
    write(tmp_path, "/sys/fs/cgroup/memory.max", "402653184\n")
    mem = system.read_cgroup(root=str(tmp_path))
    assert mem is not None and mem.limit == 384 * 1024**2


def test_path_not_visible_in_mount_falls_back_to_mount_point(tmp_path: Path) -> None:
    write(tmp_path, "/proc/self/cgroup", "0::/docker/0123abcd\n")
    write(tmp_path, "/proc/self/mountinfo", MOUNTINFO_V2)
    write(tmp_path, "/sys/fs/cgroup/memory.max", "104857600\n")
    mem = system.read_cgroup(root=str(tmp_path))
    assert mem is not None and mem.limit == 100 * 1024**2


def test_missing_files_give_unknowns_not_errors(tmp_path: Path) -> None:
    write(tmp_path, "/proc/self/cgroup", "4:memory:/lonely\n")
    write(tmp_path, "/proc/self/mountinfo", MOUNTINFO_V1)
    (tmp_path / "sys/fs/cgroup/memory/lonely").mkdir(parents=True)
    mem = system.read_cgroup(root=str(tmp_path))
    assert mem is not None
    assert (mem.limit, mem.usage, mem.peak, mem.oom_kills) == (None, None, None, 0)


def test_no_cgroup_files_at_all(tmp_path: Path) -> None:
    assert system.find_cgroup(root=str(tmp_path)) is None
    assert system.read_cgroup(root=str(tmp_path)) is None


def test_reader_working_set_leaves_out_inactive_page_cache(tmp_path: Path) -> None:
    v1_tree(tmp_path)
    v1 = "/sys/fs/cgroup/memory/kubepods/pod1/abc/memory.stat"
    write(tmp_path, v1, "inactive_file 999\ntotal_inactive_file 41943040\n")
    reader = system.CgroupMemoryReader(system.find_cgroup(root=str(tmp_path)))
    # v1 counts the whole hierarchy's page cache under the total_ key.
    assert reader.usage() == 100 * 1024**2 and reader.inactive_file() == 40 * 1024**2
    assert reader.working_set() == 60 * 1024**2
    write(tmp_path, v1, "total_inactive_file 209715200\n")  # more cache than usage
    assert reader.working_set() == 0
    assert reader.memory_stall() is None  # v1 groups have no PSI of their own

    v2_tree(tmp_path / "v2")
    v2 = system.CgroupMemoryReader(system.find_cgroup(root=str(tmp_path / "v2")))
    assert v2.inactive_file() == 0 and v2.working_set() == 50 * 1024**2  # no memory.stat
    write(tmp_path / "v2", "/sys/fs/cgroup/system.slice/app.service/memory.stat",
          "anon 1\ntotal_inactive_file 1\ninactive_file 20971520\n")
    assert v2.working_set() == 30 * 1024**2
    assert v2.memory_stall() == 4.0  # the group's own "full avg10"


def test_smaps_rollup_fixture(tmp_path: Path) -> None:
    write(tmp_path, "/proc/4242/smaps_rollup",
          "00400000-7fff [rollup]\nRss:  10240 kB\nPss:  6144 kB\nShared_Clean: 4096 kB\n"
          "Private_Clean: 1024 kB\nPrivate_Dirty: 3072 kB\nSwap: 0 kB\n")
    mem = system.process_memory(4242, root=str(tmp_path))
    assert (mem.rss, mem.pss, mem.uss) == (10 * 1024**2, 6 * 1024**2, 4 * 1024**2)
    assert mem.source == "smaps_rollup"


# ---- this machine --------------------------------------------------------------------


def test_current_rss_matches_psutil() -> None:
    ours = system.current_rss()
    theirs = psutil.Process().memory_info().rss
    assert abs(ours - theirs) < 8 * 1024**2


def test_current_rss_sees_growth() -> None:
    before = system.current_rss()
    block = bytearray(64 * 1024**2)  # zero-filled: touches every page
    after = system.current_rss()
    del block
    assert after - before > 60 * 1024**2


def _python_statm_read() -> int:
    assert process._statm is not None
    return process._statm.rss()


@pytest.mark.parametrize("read", [system.current_rss, _python_statm_read],
                         ids=["current_rss", "python_reader"])
def test_forked_child_reads_its_own_statm(read: Callable[[], int]) -> None:
    """A descriptor opened before fork keeps describing the parent; ours is reopened,
    for the kept-open reader (current_rss) and a fresh read alike."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        try:
            before = read()
            # Fresh pages of the child's own, each written: resident whatever the
            # parent's heap had (after fork the child's RSS counts the pages it shares
            # with the parent too, so it is compared with itself, not with the parent).
            block = mmap.mmap(-1, 96 * 1024**2)
            for offset in range(0, len(block), mmap.PAGESIZE):
                block[offset] = 1
            child_rss = read()
            mine = psutil.Process().memory_info().rss
            os.write(write_fd, f"{before} {child_rss} {mine}".encode())
        finally:
            os._exit(0)
    os.close(write_fd)
    data = os.read(read_fd, 100).decode().split()
    os.close(read_fd)
    os.waitpid(pid, 0)
    before, child_rss, child_psutil = (int(x) for x in data)
    assert abs(child_rss - child_psutil) < 8 * 1024**2
    assert child_rss - before > 64 * 1024**2  # the parent's figure would not have moved


def test_process_memory_of_a_forked_child_shows_shared_pages() -> None:
    """USS excludes pages shared with the parent; RSS does not."""
    block = bytearray(128 * 1024**2)
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        os.write(write_fd, b"x")
        signal.pause()
        os._exit(0)
    try:
        os.close(write_fd)
        os.read(read_fd, 1)
        mem = system.process_memory(pid)
        assert mem.source == "smaps_rollup"
        assert mem.rss > 100 * 1024**2
        assert mem.uss is not None and mem.uss < 32 * 1024**2
        assert mem.pss is not None and mem.uss <= mem.pss <= mem.rss
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(read_fd)
        del block


def test_process_memory_of_a_gone_process() -> None:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    with pytest.raises(ProcessLookupError):
        system.process_memory(pid)


def test_this_machine_cgroup_is_found() -> None:
    info = system.find_cgroup()
    if info is None:
        pytest.skip("this machine has no cgroup filesystem")
    mem = system.read_cgroup(info)
    assert mem is not None
    assert mem.usage is None or mem.usage > 0
    cpu = system.cpu_info(info)
    assert 0 < cpu.effective <= (os.cpu_count() or 1)


def test_cgroup_usage_reader_is_cheap_and_right() -> None:
    reader = system.CgroupMemoryReader()
    if reader.info is None:
        pytest.skip("no cgroup here")
    mem = system.read_cgroup(reader.info)
    usage = reader.usage()
    assert usage is not None and mem is not None and mem.usage is not None
    assert abs(usage - mem.usage) < 256 * 1024**2
