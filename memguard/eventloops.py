"""Which async library runs the current task (asyncio or trio), and the one wait memguard
needs from trio: a ``concurrent.futures.Future`` finishing in a thread (asyncio has
``asyncio.wrap_future``).

trio is found through ``sniffio``, which trio itself depends on; asyncio by its running
loop, which is what every asyncio-only path already asks for.
"""

from __future__ import annotations

import asyncio
import contextlib
from concurrent.futures import Future
from typing import Any

__all__ = ["trio_wait_done", "under_asyncio", "under_trio"]


def under_asyncio() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def under_trio() -> bool:
    try:
        import sniffio
    except ImportError:  # trio needs sniffio: without it, trio is not running
        return False
    try:
        return bool(sniffio.current_async_library() == "trio")
    except sniffio.AsyncLibraryNotFoundError:
        return False


async def trio_wait_done(job: Future[Any]) -> None:
    """Under trio: until ``job`` is done (it may fail). Cancelling the caller never
    cancels ``job`` (a later job may be chained on it)."""
    import trio

    finished = trio.Event()
    token = trio.lowlevel.current_trio_token()

    def wake(_: Future[Any]) -> None:
        # Runs in the job's thread (or here, if it is already done by now).
        with contextlib.suppress(trio.RunFinishedError):
            token.run_sync_soon(finished.set)

    job.add_done_callback(wake)
    await finished.wait()
