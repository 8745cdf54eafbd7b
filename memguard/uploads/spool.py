"""A file that appears at its destination whole or not at all.

:class:`Spool` writes batches of bytes to a temporary file in the destination's own
directory (so the final step is a rename or link on one filesystem, never a copy),
hashes them with SHA-256 on the way, and checks storage as it goes: a per-request byte
budget, a process-wide budget for bytes sitting in temporary files, and a free-space
floor on the target filesystem. :meth:`Spool.commit` fsyncs (when asked) and gives the
file its name atomically, keeping a file it replaces aside until :meth:`Spool.confirm`;
:meth:`Spool.abandon` removes every trace and puts a replaced file back.

On Linux the temporary file is created with ``O_TMPFILE``: it has no name until commit,
so even a worker killed by SIGKILL (an OOM kill) leaves nothing behind. Elsewhere, or on
filesystems without ``O_TMPFILE``, it is a hidden ``.memguard-*.part`` file next to the
destination, removed on every failure path this process survives.

Every :class:`Spool` method blocks. :class:`AsyncSpool` is how asynchronous code uses
one: it runs them in :func:`executor` threads (``os.writev``, ``fsync`` and ``hashlib``
on large buffers all release the GIL), in order, a few batches in flight, so that the
event loop never waits for the disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import os
import secrets
import stat
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from memguard.errors import InsufficientStorage
from memguard.eventloops import trio_wait_done, under_asyncio

__all__ = ["AsyncSpool", "ProcessQuota", "RequestBudget", "Spool", "executor", "free_bytes"]

TEMP_PREFIX = ".memguard-"
TEMP_SUFFIX = ".part"
_IOV_MAX = 512  # well under every platform's IOV_MAX (1024 on Linux)
# With fsync on, start the kernel's writeback every this many bytes (see Spool.write).
_WRITEBACK_EVERY = 8 * 1024 * 1024
_FADV_DONTNEED = getattr(os, "POSIX_FADV_DONTNEED", None)
_HAVE_TMPFILE = hasattr(os, "O_TMPFILE") and os.path.isdir("/proc/self/fd")


# --------------------------------------------------------------------------------------
# The writer threads


_executor: ThreadPoolExecutor | None = None
_executor_lock = threading.Lock()


def executor() -> ThreadPoolExecutor:
    """The process's upload writer threads (created on first use, again after fork:
    threads do not survive ``fork()``, so a pool made in a preloading master would be
    dead in every worker)."""
    global _executor
    if _executor is None:
        with _executor_lock:
            if _executor is None:
                _executor = ThreadPoolExecutor(max_workers=8,
                                               thread_name_prefix="memguard-upload")
    return _executor


def _forget_executor_after_fork() -> None:
    global _executor, _executor_lock
    _executor = None
    _executor_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_executor_after_fork)


# --------------------------------------------------------------------------------------
# Storage budgets


class ProcessQuota:
    """Bytes in this process's unfinished temporary files, against a limit.

    Reserved before each batch is written, released when the file is committed or
    discarded. A lock per batch (about a MiB) costs nothing measurable.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.in_use = 0

    def reserve(self, amount: int, limit: int | None) -> None:
        with self._lock:
            if limit is not None and self.in_use + amount > limit:
                in_use = self.in_use
                raise InsufficientStorage(
                    "The server's temporary upload space is full.",
                    reason="process_temp_quota", limit=limit, in_use=in_use, wanted=amount)
            self.in_use += amount

    def release(self, amount: int) -> None:
        with self._lock:
            self.in_use = max(0, self.in_use - amount)


PROCESS_QUOTA = ProcessQuota()


class RequestBudget:
    """What one call may put on disk: a byte quota and a free-space floor.

    Shared by every file of one multipart request, so the quota counts them together.
    """

    def __init__(self, *, quota: int | None, process_limit: int | None, min_free: int,
                 process_quota: ProcessQuota = PROCESS_QUOTA) -> None:
        self.quota = quota
        self.process_limit = process_limit
        self.min_free = min_free
        self.process_quota = process_quota
        self.used = 0

    def take(self, amount: int, directory: Path) -> None:
        if self.quota is not None and self.used + amount > self.quota:
            raise InsufficientStorage(
                "This upload needs more temporary disk space than one request may use.",
                reason="request_temp_quota", limit=self.quota, used=self.used, wanted=amount)
        if self.min_free:
            free = free_bytes(directory)
            if free - amount < self.min_free:
                raise InsufficientStorage(
                    "The server does not have enough free disk space for this upload.",
                    reason="free_space_floor", free=free, floor=self.min_free, wanted=amount,
                    directory=str(directory))
        self.process_quota.reserve(amount, self.process_limit)
        self.used += amount


def free_bytes(directory: Path | str) -> int:
    """Bytes an unprivileged process may still write on ``directory``'s filesystem."""
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize


# --------------------------------------------------------------------------------------
# The file


class Spool:
    """One temporary file under ``directory``, written in batches, committed by name.

    Not thread-safe by itself: its owner runs at most one method at a time (the
    asynchronous callers keep one batch in flight per file).
    """

    def __init__(self, directory: Path, budget: RequestBudget, *, fsync: bool = True,
                 use_tmpfile: bool | None = None) -> None:
        self.directory = directory
        self.budget = budget
        self.fsync = fsync
        # Asked for and available (looked up at call time so tests can turn it off).
        self.use_tmpfile = _HAVE_TMPFILE and use_tmpfile is not False
        self.size = 0
        self.reserved = 0
        self.temp_path: Path | None = None  # the named fallback's temporary name
        self.path: Path | None = None  # set by commit; abandon() undoes it until confirm()
        self.kept: Path | None = None  # the file commit replaced, kept until confirm()
        self._hash = hashlib.sha256()
        self._written_back = 0  # bytes handed to the kernel's writeback so far
        self._fd = -1
        self._closed = False

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()

    # ---- blocking operations (run in a writer thread by async callers) ----------------

    def open(self) -> None:
        if self._fd >= 0 or self._closed:
            return
        flags = os.O_WRONLY | getattr(os, "O_CLOEXEC", 0)
        if self.use_tmpfile:
            try:
                with _disk_full():
                    self._fd = os.open(self.directory, flags | os.O_TMPFILE, 0o666)
                return
            except OSError as exc:
                # Filesystems without O_TMPFILE answer EOPNOTSUPP, EISDIR or EINVAL.
                if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                    raise
                self.use_tmpfile = False
        flags |= os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
        for _ in range(16):
            candidate = _hidden_name(self.directory)
            try:
                with _disk_full():
                    self._fd = os.open(candidate, flags, 0o666)
            except FileExistsError:
                continue
            self.temp_path = candidate
            return
        raise FileExistsError(errno.EEXIST, "could not create a unique temporary file",
                              str(self.directory))

    def write(self, chunks: Sequence[bytes | bytearray | memoryview]) -> None:
        """Write ``chunks`` (in order), hash them, count them against the budget."""
        total = 0
        for chunk in chunks:
            total += len(chunk)
        if total == 0:
            self.open()
            return
        self.budget.take(total, self.directory)
        self.reserved += total
        self.open()
        fd = self._fd
        update = self._hash.update
        for start in range(0, len(chunks), _IOV_MAX):
            group = list(chunks[start:start + _IOV_MAX])
            for chunk in group:
                update(chunk)
            while group:
                with _disk_full():
                    written = os.writev(fd, group)
                # A regular file takes everything unless the disk filled up mid-call;
                # then go round again and let the next writev raise ENOSPC.
                while written and group:
                    head = group[0]
                    if written >= len(head):
                        written -= len(head)
                        group.pop(0)
                    else:
                        group[0] = memoryview(head)[written:]
                        written = 0
        self.size += total
        if self.fsync and _FADV_DONTNEED is not None \
                and self.size - self._written_back >= _WRITEBACK_EVERY:
            # The kernel would start writing these dirty pages back only at its
            # dirty_background threshold (10% of RAM: gigabytes), leaving the whole upload
            # for the final fsync (0.5 s for 652 MB here). POSIX_FADV_DONTNEED on pages
            # still dirty starts their writeback without waiting (and keeps them cached),
            # so the fsync at commit has only the last few MiB left.
            try:
                os.posix_fadvise(fd, self._written_back, self.size - self._written_back,
                                 _FADV_DONTNEED)
            except OSError:
                pass
            self._written_back = self.size

    def commit(self, destination: Path, *, overwrite: bool) -> Path:
        """fsync (when configured), then give the file the name ``destination``.

        Without ``overwrite`` an existing ``destination`` is never replaced:
        ``FileExistsError`` is raised and the temporary file is removed. With it, the
        old file is replaced atomically (readers see the old or the new, never a mix)
        and kept aside under a hidden name until :meth:`confirm`, so that
        :meth:`abandon` can put it back: a request refused or cancelled after this
        commit (a later part of its form, a cancellation during the commit) never
        loses the file it would have replaced.
        """
        self.open()
        try:
            if self.fsync:
                os.fsync(self._fd)
            if self.temp_path is None:
                self._link_tmpfile(destination, overwrite)
            else:
                self._rename_named(self.temp_path, destination, overwrite)
                self.temp_path = None
            self.path = destination
            if self.fsync:
                _fsync_directory(destination.parent)
        except BaseException:
            self.abandon()
            raise
        self._close()
        return destination

    def confirm(self) -> None:
        """The caller has the saved file: drop the replaced one kept aside (if any);
        :meth:`abandon` no longer touches the file."""
        kept, self.kept = self.kept, None
        self.path = None
        if kept is not None:
            _unlink_quietly(kept)

    def discard(self) -> None:
        """Remove the temporary file (idempotent, never raises)."""
        if self.temp_path is not None:
            _unlink_quietly(self.temp_path)
            self.temp_path = None
        self._close()

    def abandon(self) -> None:
        """Discard, and undo a commit the caller never learnt of (a cancellation that
        arrived while the commit ran, or a later part of the same form that failed):
        the file it replaced is put back, or the new name removed."""
        self.discard()
        path, kept = self.path, self.kept
        self.path = self.kept = None
        if path is None:
            return
        if kept is not None:
            try:
                os.replace(kept, path)
                return
            except OSError:
                _unlink_quietly(kept)
        else:
            _unlink_quietly(path)

    # ---- helpers ----------------------------------------------------------------------

    def _close(self) -> None:
        if self._fd >= 0:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = -1
        self._closed = True
        if self.reserved:
            self.budget.process_quota.release(self.reserved)
            self.reserved = 0

    def _link_tmpfile(self, destination: Path, overwrite: bool) -> None:
        if not overwrite:
            # linkat() fails with EEXIST if anything (even a dangling symlink) has the
            # name: no check-then-act race.
            self._link_fd(destination)
            return
        for _ in range(16):
            temp = _hidden_name(destination.parent)
            try:
                self._link_fd(temp)
            except FileExistsError:
                continue
            try:
                self._replace(temp, destination)
            except BaseException:
                _unlink_quietly(temp)
                raise
            return
        raise FileExistsError(errno.EEXIST, "could not create a unique temporary name",
                              str(destination.parent))

    def _replace(self, source: Path, destination: Path) -> None:
        """``os.replace``, keeping the file it replaces aside (see :meth:`commit`)."""
        kept = _keep_aside(destination)
        if kept is not None:
            # From here abandon() puts the old file back, whatever happens next.
            self.kept, self.path = kept, destination
        os.replace(source, destination)

    def _link_fd(self, destination: Path) -> None:
        """Give the nameless O_TMPFILE file a name: linkat(AT_SYMLINK_FOLLOW) through
        /proc/self/fd. Python's os.link only passes that flag when a dir_fd is given
        (plain link() would try to link the /proc symlink itself: EXDEV)."""
        dir_fd = os.open(destination.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            with _disk_full():
                os.link(f"/proc/self/fd/{self._fd}", destination.name, dst_dir_fd=dir_fd,
                        follow_symlinks=True)
        finally:
            os.close(dir_fd)

    def _rename_named(self, temp: Path, destination: Path, overwrite: bool) -> None:
        if overwrite:
            self._replace(temp, destination)
            return
        try:
            with _disk_full():
                os.link(temp, destination)
        except FileExistsError:
            raise
        except OSError as exc:
            # No hard links here (some FUSE and FAT filesystems): check, then rename.
            # A racing writer could still slip in between; documented.
            if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS):
                raise
            if os.path.lexists(destination):
                raise FileExistsError(errno.EEXIST, "destination exists",
                                      str(destination)) from None
            os.rename(temp, destination)
            return
        os.unlink(temp)


def _hidden_name(directory: Path) -> Path:
    return directory / f"{TEMP_PREFIX}{secrets.token_hex(8)}{TEMP_SUFFIX}"


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _keep_aside(destination: Path) -> Path | None:
    """A second, hidden name for the file at ``destination`` (``None`` if there is none),
    so that it survives being replaced: a hard link (the file never leaves its name),
    or where there are none, a rename (the name is missing until the replace)."""
    try:
        mode = os.lstat(destination).st_mode
    except FileNotFoundError:
        return None
    if stat.S_ISDIR(mode):
        return None  # os.replace refuses it: nothing will be replaced
    for _ in range(16):
        kept = _hidden_name(destination.parent)
        try:
            os.link(destination, kept, follow_symlinks=False)
            return kept
        except FileExistsError:
            continue
        except FileNotFoundError:
            return None  # gone meanwhile: nothing to keep
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS):
                raise
            if os.path.lexists(kept):
                continue
            os.rename(destination, kept)
            return kept
    raise FileExistsError(errno.EEXIST, "could not create a unique temporary name",
                          str(destination.parent))


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return  # platforms where directories cannot be opened (Windows)
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def _disk_full() -> Iterator[None]:
    """A full disk or an exhausted disk quota becomes a 507."""
    try:
        yield
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise InsufficientStorage(
                "The server ran out of disk space while storing this upload.",
                reason="disk_full", errno=exc.errno) from exc
        raise


# --------------------------------------------------------------------------------------
# Asynchronous writing: a few batches in flight per file, in order

# Batches one upload may have queued for its writer while the next is received. Waiting
# for every batch before reading on stalls the client (uvicorn stops reading the socket
# once it holds 64 KiB); three keep the loop reading while the disk and SHA-256 work,
# for at most (3 + 1) x batch_size of memory.
_DEPTH = 3


def _joined(chunks: list[bytes | memoryview]) -> list[bytes | memoryview]:
    """One buffer per batch. The writer thread then drops and retakes the GIL twice per
    batch (one hash update, one write) instead of twice per received chunk; each
    handover costs the event loop thread a context switch (measured through uvicorn,
    652 MB: 1.35-1.8 s of server CPU joined against 1.75-3.1 s unjoined). The copy is
    one memcpy of a batch."""
    return [b"".join(chunks)] if len(chunks) > 1 else chunks


def _chained(prev: Future[Any] | None, func: Callable[..., Any], *args: Any) -> Any:
    """Run ``func`` after ``prev`` (a batch never overtakes the one before it); if
    ``prev`` failed, fail the same way without writing."""
    if prev is not None:
        prev.result()
    return func(*args)


def _after_quietly(prev: Future[Any] | None, func: Callable[..., Any], *args: Any) -> Any:
    if prev is not None:
        try:
            prev.result()
        except BaseException:
            pass
    return func(*args)


async def _result(job: Future[Any]) -> Any:
    if job.done():
        return job.result()
    if not under_asyncio():
        await trio_wait_done(job)  # the same guarantee as the shield below
        return job.result()
    # Shielded: cancelling the caller must never cancel a queued job, or a later job
    # (chained on it) could run while an earlier one still writes.
    return await asyncio.shield(asyncio.wrap_future(job))


def _retrieve(waiter: asyncio.Future[Any]) -> None:
    # A failed job behind a refusal fails the same way; the caller reports the
    # refusal once, and asyncio must not log this copy as "never retrieved".
    if not waiter.cancelled():
        waiter.exception()


class AsyncSpool:
    """Gathers chunks for one :class:`Spool` and writes them, in order, in writer
    threads, with up to ``_DEPTH`` batches in flight while more is received."""

    __slots__ = ("spool", "pending", "pending_size", "tail", "inflight")

    def __init__(self, spool: Spool) -> None:
        self.spool = spool
        self.pending: list[bytes | memoryview] = []
        self.pending_size = 0
        self.tail: Future[Any] | None = None  # the last job submitted
        self.inflight: deque[Future[Any]] = deque()

    def add(self, chunk: bytes | memoryview) -> None:
        self.pending.append(chunk)
        self.pending_size += len(chunk)

    def _submit(self, func: Callable[..., Any], *args: Any) -> Future[Any]:
        self.tail = executor().submit(_chained, self.tail, func, *args)
        return self.tail

    async def flush(self) -> None:
        chunks, self.pending, self.pending_size = _joined(self.pending), [], 0
        inflight = self.inflight
        inflight.append(self._submit(self.spool.write, chunks))
        # Collect finished jobs (a refusal such as a full quota surfaces here, early)
        # and wait only when too many are queued.
        while inflight and (inflight[0].done() or len(inflight) > _DEPTH):
            await _result(inflight.popleft())

    async def finish(self, destination: Path, overwrite: bool) -> None:
        chunks, self.pending, self.pending_size = _joined(self.pending), [], 0
        spool = self.spool

        def write_and_commit() -> Path:
            spool.write(chunks)
            return spool.commit(destination, overwrite=overwrite)

        self.inflight.clear()
        await _result(self._submit(write_and_commit))

    async def drain(self) -> None:
        """Write what is gathered and wait until every batch is on the file (a form's
        finished part: its name comes only once the whole form has succeeded)."""
        if self.pending:
            chunks, self.pending, self.pending_size = _joined(self.pending), [], 0
            self._submit(self.spool.write, chunks)
        self.inflight.clear()
        if self.tail is not None:
            await _result(self.tail)

    async def discard(self) -> None:
        """Remove the file, waiting for the jobs in flight first, so that the file is
        gone when the caller sees the exception (if this wait is itself cancelled, the
        removal still happens, after the last job)."""
        tail = self.tail
        try:
            if tail is not None and not tail.done():
                if not under_asyncio():
                    await trio_wait_done(tail)
                    return
                waiter = asyncio.wrap_future(tail)
                waiter.add_done_callback(_retrieve)
                await asyncio.wait([waiter])
        finally:
            self.abandon()

    def abandon(self) -> None:
        """Remove the file once no thread touches it: now, or as a job queued after the
        last one (closing a descriptor another thread writes to could hit a reused one)."""
        self.pending = []
        self.inflight.clear()
        tail, self.tail = self.tail, None
        if tail is None or tail.done():
            self.spool.abandon()
            return
        try:
            executor().submit(_after_quietly, tail, self.spool.abandon)
        except RuntimeError:  # interpreter shutting down: no new jobs
            tail.add_done_callback(lambda _: self.spool.abandon())
