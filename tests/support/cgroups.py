"""Real memory cgroups (cgroup v1) for memguard's tests, benchmarks and demo.

:class:`MemoryCgroup` creates a real memory group with a limit and always removes it
on exit, after killing every process it started there.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

from tests.support.servers import kill_group

CGROUP_V1_MEMORY = Path("/sys/fs/cgroup/memory")
_GROUP_PREFIX = "memguard-"


def cgroup_unavailable_reason(root: Path = CGROUP_V1_MEMORY) -> str | None:
    """``None`` when a memory cgroup can be created here, otherwise why not."""
    if not (root / "memory.limit_in_bytes").exists():
        return f"no cgroup v1 memory hierarchy at {root}"
    if os.geteuid() != 0:
        return "creating memory cgroups needs root"
    probe = root / f"{_GROUP_PREFIX}probe-{uuid.uuid4().hex[:8]}"
    try:
        probe.mkdir()
    except OSError as exc:
        return f"{root} is not writable: {exc}"
    try:
        probe.rmdir()
    except OSError:
        pass
    return None


class MemoryCgroup:
    """A fresh cgroup v1 memory group with a limit, removed on exit.

    ``with MemoryCgroup("400MiB") as group: proc = group.popen([...])`` runs a command
    inside it from its first instruction (a shell moves itself in, then ``exec``s the
    command), so no allocation escapes the limit. ``group.oom_kills`` counts the
    kernel's OOM kills in the group; ``group.peak`` is the group's peak usage.
    """

    def __init__(self, limit: int | str, *, name: str | None = None,
                 root: Path = CGROUP_V1_MEMORY) -> None:
        from memguard.sizes import parse_size

        self.limit = parse_size(limit)
        self.path = root / (name or f"{_GROUP_PREFIX}{uuid.uuid4().hex[:12]}")
        self._procs: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> MemoryCgroup:
        self.path.mkdir()
        try:
            self._write("memory.limit_in_bytes", str(self.limit))
            # No swap either, where the kernel accounts it: a limit that can spill to
            # swap is not the limit a container has.
            memsw = self.path / "memory.memsw.limit_in_bytes"
            if memsw.exists():
                with contextlib.suppress(OSError):
                    self._write("memory.memsw.limit_in_bytes", str(self.limit))
        except BaseException:
            self.path.rmdir()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _write(self, name: str, value: str) -> None:
        with open(self.path / name, "w") as f:
            f.write(value)

    def _read(self, name: str) -> str:
        with open(self.path / name) as f:
            return f.read()

    def wrap(self, argv: Sequence[str]) -> list[str]:
        """``argv`` prefixed so that it runs inside this group from its first instruction."""
        return ["/bin/sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"',
                str(self.path), *argv]

    def popen(self, argv: Sequence[str], **kwargs: object) -> subprocess.Popen[bytes]:
        kwargs.setdefault("start_new_session", True)
        proc: subprocess.Popen[bytes] = subprocess.Popen(self.wrap(argv), **kwargs)  # type: ignore[call-overload]
        self._procs.append(proc)
        return proc

    def run(self, argv: Sequence[str], timeout: float = 60,
            **kwargs: object) -> subprocess.CompletedProcess[bytes]:
        kwargs.setdefault("capture_output", True)
        proc = self.popen(argv, stdout=subprocess.PIPE if kwargs.pop("capture_output") else None,
                          stderr=subprocess.PIPE, **kwargs)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_group(proc)
            out, err = proc.communicate()
            raise
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    def pids(self) -> list[int]:
        try:
            return [int(p) for p in self._read("cgroup.procs").split()]
        except OSError:
            return []

    @property
    def oom_kills(self) -> int:
        for line in self._read("memory.oom_control").splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0

    @property
    def usage(self) -> int:
        return int(self._read("memory.usage_in_bytes"))

    @property
    def peak(self) -> int:
        return int(self._read("memory.max_usage_in_bytes"))

    def close(self) -> None:
        if not self.path.exists():
            return
        for proc in self._procs:
            kill_group(proc)
        deadline = time.monotonic() + 10
        while True:
            remaining = self.pids()
            if not remaining:
                break
            # Only processes this object started (or their descendants) can be here:
            # the group was created empty for it.
            for pid in remaining:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        for proc in self._procs:
            with contextlib.suppress(Exception):
                proc.wait(timeout=5)
        for _ in range(100):
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.05)
        self.path.rmdir()
