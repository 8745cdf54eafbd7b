"""This process's and other processes' memory, from ``/proc``.

:func:`current_rss` is cheap enough for the request path when sampled (one ``pread`` of
a kept-open descriptor); :func:`process_memory` reads ``smaps_rollup`` and is for
timers and reports, never per request.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable

import psutil

from memguard.system.files import join, read_text

__all__ = [
    "PAGE_SIZE",
    "ProcessMemory",
    "current_peak_rss",
    "current_rss",
    "process_memory",
    "read_vm_hwm",
]

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


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
        text = read_text(join(root, f"/proc/{pid}/status"))
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
        text = read_text(join(root, f"/proc/{pid}/smaps_rollup"))
    except FileNotFoundError:
        if not os.path.exists(join(root, f"/proc/{pid}")) and root == "/":
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

