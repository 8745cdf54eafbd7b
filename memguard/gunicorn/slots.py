"""A table the master and its workers share: each worker's state and its own figures.

An anonymous shared ``mmap`` made in the master before the first fork is the same
memory in every worker, so a worker can say "I am recycling" or "I left through my
exit path" and the master reads it without a pipe, a lock or a syscall. Slot ``i``
belongs to the worker whose ``age`` (gunicorn's spawn counter) is ``i`` modulo the slot
count; the master clears a slot when it forks into it and when it reaps its worker.
Each field is one aligned 8-byte word written with ``struct.pack_into``, so a reader
never sees half a value; a reader may see a slightly stale one, which is fine for state
and figures.

A second area holds, per slot, the paths of the worker's last ``RECENT`` requests and a
count of requests started: what the master reports about a worker the kernel killed
(its busiest paths, and the one it was serving). A path is at most ``PATH_BYTES - 1``
bytes; a torn read of one (the worker writing while the master reads a dead worker's
slot cannot happen, a live one's can) only garbles that line of a report.
"""

from __future__ import annotations

import mmap
import os
import select
import struct

__all__ = ["SlotTable", "Doorbell", "EMPTY", "BOOTING", "SERVING", "BORN_OVER", "RECYCLING",
           "EXITED", "REPLACE", "SERVING_STATES", "RECENT", "PATH_BYTES",
           "SPAWN_FIRST", "STOP_THEN_START", "WAY_NAMES"]

# BORN_OVER: serving, but over its soft limit from the start, so never recycled for it.
# REPLACE: serving, and asking the master for a replacement (it recycles once told).
EMPTY, BOOTING, SERVING, RECYCLING, EXITED, BORN_OVER, REPLACE = 0, 1, 2, 3, 4, 5, 6
STATE_NAMES = {EMPTY: "empty", BOOTING: "booting", SERVING: "serving",
               RECYCLING: "recycling", EXITED: "exited", BORN_OVER: "born over its limit",
               REPLACE: "asking for a replacement"}
SERVING_STATES = (SERVING, BORN_OVER, REPLACE)

# How the master had a worker replaced (the slot's ``way`` word, read by the worker
# when it is told to go).
SPAWN_FIRST, STOP_THEN_START = 1, 2
WAY_NAMES = {SPAWN_FIRST: "spawn_first", STOP_THEN_START: "stop_then_start"}

# pid, state, figure (bytes: the worker's own estimate of its USS), requests served,
# the way the master replaces it, what the worker expects to grow while a replacement
# boots
_SLOT = struct.Struct("=qqqqqq")
_SLOTS = 256
RECENT = 32  # paths kept per worker
PATH_BYTES = 64  # per path: a length byte, then up to 63 bytes of UTF-8
_RECENT_SLOT = 8 + RECENT * PATH_BYTES  # requests started, then the ring
_STARTED = struct.Struct("=q")


class SlotTable:
    # Bits of the header word: things said once per pool, not once per worker.
    FLAG_BORN_OVER = 1

    def __init__(self, slots: int = _SLOTS) -> None:
        self.slots = slots
        # One header slot, then the workers' slots.
        self._map = mmap.mmap(-1, (slots + 1) * _SLOT.size)
        self._recent = mmap.mmap(-1, slots * _RECENT_SLOT)

    def _offset(self, age: int) -> int:
        return (age % self.slots + 1) * _SLOT.size

    def claim_once(self, flag: int) -> bool:
        """True for the first process to claim ``flag`` (a rare race may say it twice)."""
        (flags,) = struct.unpack_from("=q", self._map, 0)
        if flags & flag:
            return False
        struct.pack_into("=q", self._map, 0, flags | flag)
        return True

    def raise_burst(self, requests: int) -> None:
        """A worker had ``requests`` other requests in flight at once: the pool's largest
        burst so far becomes at least that (a rare race may keep the smaller of two)."""
        if requests > self.burst():
            struct.pack_into("=q", self._map, 8, requests)

    def burst(self) -> int:
        """The most requests any worker of the pool has had in flight beside the one
        it finished (header word 1): what a new worker expects before it has seen any."""
        (requests,) = struct.unpack_from("=q", self._map, 8)
        return int(requests)

    def reset(self, age: int, pid: int = 0, state: int = EMPTY) -> None:
        _SLOT.pack_into(self._map, self._offset(age), pid, state, 0, 0, 0, 0)
        _STARTED.pack_into(self._recent, (age % self.slots) * _RECENT_SLOT, 0)

    def note_request(self, age: int, path: str) -> None:
        """A request for ``path`` starts in the worker of slot ``age`` (a microsecond)."""
        base = (age % self.slots) * _RECENT_SLOT
        (started,) = _STARTED.unpack_from(self._recent, base)
        data = path.encode("utf-8", "replace")[:PATH_BYTES - 1]
        at = base + 8 + (started % RECENT) * PATH_BYTES
        self._recent[at] = len(data)
        self._recent[at + 1:at + 1 + len(data)] = data
        _STARTED.pack_into(self._recent, base, started + 1)

    def recent_paths(self, age: int) -> tuple[list[str], int]:
        """(the last paths of slot ``age``, oldest first; requests started in all)."""
        base = (age % self.slots) * _RECENT_SLOT
        (started,) = _STARTED.unpack_from(self._recent, base)
        paths = []
        for n in range(max(0, started - RECENT), started):
            at = base + 8 + (n % RECENT) * PATH_BYTES
            size = min(self._recent[at], PATH_BYTES - 1)
            paths.append(self._recent[at + 1:at + 1 + size].decode("utf-8", "replace"))
        return paths, int(started)

    def set_state(self, age: int, state: int) -> None:
        struct.pack_into("=q", self._map, self._offset(age) + 8, state)

    def set_pid(self, age: int, pid: int) -> None:
        struct.pack_into("=q", self._map, self._offset(age), pid)

    def set_figures(self, age: int, figure: int, requests: int) -> None:
        struct.pack_into("=qq", self._map, self._offset(age) + 16, figure, requests)

    def read(self, age: int) -> tuple[int, int, int, int]:
        """(pid, state, figure, requests) of slot ``age``."""
        pid, state, figure, requests, _, _ = _SLOT.unpack_from(self._map, self._offset(age))
        return int(pid), int(state), int(figure), int(requests)

    def set_way(self, age: int, way: int) -> None:
        struct.pack_into("=q", self._map, self._offset(age) + 32, way)

    def set_expected_growth(self, age: int, growth: int) -> None:
        struct.pack_into("=q", self._map, self._offset(age) + 40, growth)

    def expected_growth(self, age: int) -> int:
        (growth,) = struct.unpack_from("=q", self._map, self._offset(age) + 40)
        return int(growth)

    def way(self, age: int) -> int:
        (way,) = struct.unpack_from("=q", self._map, self._offset(age) + 32)
        return int(way)

    def commitments(self, soft: int, asking_age: int | None = None,
                    asking_growth: int = 0) -> tuple[int, int]:
        """(the live workers' own figures, summed; what they may reach, summed).

        A worker may reach the larger of its figure and the soft limit ``soft`` (a
        booting one too: a fast leak takes a fresh worker to its limit within a boot or
        two); one asking for a replacement (in this table, or the worker of
        ``asking_age`` about to ask) that plus the growth it expects meanwhile.
        """
        figures = committed = 0
        asking = None if asking_age is None else asking_age % self.slots
        for i in range(self.slots):
            _, state, figure, _, _, growth = _SLOT.unpack_from(self._map, (i + 1) * _SLOT.size)
            if state == EMPTY:
                continue
            if i == asking:
                state, growth = REPLACE, asking_growth
            ceiling = soft + growth if state == REPLACE else soft
            figures += figure
            committed += max(figure, ceiling)
        return figures, committed

    def asking(self, own_age: int) -> int:
        """Workers other than ``own_age``'s asking for a replacement: those served
        before it, one overlap at a time."""
        own = own_age % self.slots
        return sum(1 for i in range(self.slots) if i != own and _SLOT.unpack_from(
            self._map, (i + 1) * _SLOT.size)[1] == REPLACE)

    def pool_view(self, own_age: int) -> tuple[int, int]:
        """(memory of the workers already recycling, by their own figures; the largest
        figure among the other serving workers)."""
        leaving = largest = 0
        own = own_age % self.slots
        for i in range(self.slots):
            pid, state, figure, _, _, _ = _SLOT.unpack_from(self._map, (i + 1) * _SLOT.size)
            if state == RECYCLING:
                leaving += figure
            elif state in SERVING_STATES and i != own and figure > largest:
                largest = figure
        return leaving, largest


class Doorbell:
    """A pipe made in the master before the first fork: a worker rings it when its
    state changes (ready, asking for a replacement, recycling), and the master's
    watchdog, waiting on it between its samples, acts within a millisecond instead of
    at its next tick."""

    def __init__(self) -> None:
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)

    def ring(self) -> None:
        try:
            os.write(self._write, b"\0")
        except (BlockingIOError, OSError):  # full: the master will look anyway
            pass

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds; True if rung (every ring is consumed)."""
        try:
            ready, _, _ = select.select([self._read], [], [], max(timeout, 0.0))
        except (OSError, ValueError):
            return False
        if not ready:
            return False
        try:
            while os.read(self._read, 4096):
                pass
        except (BlockingIOError, OSError):
            pass
        return True
