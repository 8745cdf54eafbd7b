"""How a worker asks its server to replace it.

:class:`~memguard.recycle.decision.RecycleDecision` says *that* a worker should be
recycled; a :class:`Recycler` knows *how* on the server it runs under. The default only logs, so a
library used outside any known server never kills its own process. Server integrations
install theirs with :func:`set_recycler` (gunicorn: ``worker.alive = False`` for sync and
gthread; a ``SIGTERM`` to itself for ``uvicorn-worker`` and standalone uvicorn, the
trigger every worker class honours as a graceful stop).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import threading
from collections.abc import Iterable
from typing import Any, Protocol

from memguard import counters, events
from memguard.recycle.decision import format_figures

__all__ = [
    "AliveFlagRecycler",
    "AsgiWorkerRecycler",
    "LogOnlyRecycler",
    "Recycler",
    "SignalRecycler",
    "UvicornWorkerRecycler",
    "get_recycler",
    "gunicorn_recycler",
    "is_uvicorn_worker_class",
    "request_recycle",
    "server_limits",
    "server_observes_requests",
    "set_recycler",
    "set_server",
    "stop_accepting",
]

log = logging.getLogger("memguard.recycle")


class Recycler(Protocol):
    def recycle(self, reason: str, figures: dict[str, Any]) -> bool:
        """Start a graceful replacement of this worker; True if one was started."""
        ...

    @property
    def started(self) -> bool:
        """True once this recycler has started a recycle."""
        ...


class LogOnlyRecycler:
    """The default: log that a recycle would help, do nothing else."""

    started = False  # it never starts one

    def __init__(self) -> None:
        self._logged: set[str] = set()

    def recycle(self, reason: str, figures: dict[str, Any]) -> bool:
        if reason not in self._logged:
            self._logged.add(reason)
            log.warning(
                "worker %s should be recycled (%s) but no server integration is installed: %s",
                os.getpid(), reason, figures,
            )
        return False


class _OnceRecycler:
    """A recycle happens once per process: the first caller claims it, atomically
    across threads (gthread's workers, the event loop and a signal may all ask)."""

    def __init__(self) -> None:
        self._sent = False
        self._lock = threading.Lock()

    @property
    def started(self) -> bool:
        """True once this recycler has started a recycle."""
        return self._sent

    def _claim(self) -> bool:
        with self._lock:
            if self._sent:
                return False
            self._sent = True
            return True


class SignalRecycler(_OnceRecycler):
    """Send this process a signal its server treats as a graceful stop (default SIGTERM).

    Under gunicorn the master then starts a replacement; under ``uvicorn --workers N``
    (0.30+) the supervisor does. Sent once per process.
    """

    # uvicorn's graceful shutdown closes every connection that has not started a
    # request yet, and it only stops accepting on its next tick (0.1 s): a connection
    # accepted in between would be closed unanswered. Inside an event loop the worker
    # stops accepting first; the signal follows this much later, and then only once no
    # connection it accepted still waits for its first request (a client slowed down
    # between its connect and its request), for at most uvicorn's keep-alive timeout.
    SIGNAL_DELAY = 0.1
    SIGNAL_POLL = 0.01

    def __init__(self, sig: int = signal.SIGTERM, logger: Any = None) -> None:
        super().__init__()
        self.sig = sig
        self.logger = logger if logger is not None else log

    def recycle(self, reason: str, figures: dict[str, Any]) -> bool:
        if not self._claim():
            return False
        self._stop_accepting()
        self.logger.warning("recycling worker %s (%s): %s", os.getpid(), reason,
                            format_figures(figures))
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            os.kill(os.getpid(), self.sig)
        else:
            # Called from a signal handler (the master's SIGUSR2), a call_later could
            # change asyncio's timer heap while the loop pops from it.
            loop.call_soon_threadsafe(self._signal_later, loop)
        return True

    def _signal_later(self, loop: Any) -> None:
        server = _uvicorn_server()
        wait = getattr(getattr(server, "config", None), "timeout_keep_alive", 0)
        deadline = loop.time() + self.SIGNAL_DELAY + wait
        loop.call_later(self.SIGNAL_DELAY, self._signal_once_requests_started, loop, server,
                        deadline)

    def _signal_once_requests_started(self, loop: Any, server: Any, deadline: float,
                                      passes: int = 0) -> None:
        # Empty twice more, each time behind all the loop has queued: a connection
        # accepted before the stop reaches uvicorn (connection_made) through up to two
        # queued callbacks (asyncio: the accepting task, then connection_made).
        if loop.time() < deadline:
            if _awaiting_first_request(server):
                loop.call_later(self.SIGNAL_POLL, self._signal_once_requests_started, loop,
                                server, deadline)
                return
            if passes < 2:
                loop.call_soon(self._signal_once_requests_started, loop, server, deadline,
                               passes + 1)
                return
        os.kill(os.getpid(), self.sig)

    def _stop_accepting(self) -> None:
        """Stop accepting connections in this process (best effort).

        Standalone uvicorn does not hand its sockets to the app. Under uvloop its servers
        are closed; an asyncio selector loop knows the listening sockets as the readers
        whose callback accepts connections, and they leave it.
        """
        if _close_uvloop_servers(getattr(_uvicorn_server(), "servers", ())):
            return
        try:
            loop = asyncio.get_running_loop()
            selector = getattr(loop, "_selector", None)
            if selector is None:
                return
            for key in list(selector.get_map().values()):
                handle = key.data[0] if isinstance(key.data, tuple) else None
                callback = getattr(handle, "_callback", None)
                if getattr(callback, "__name__", "") == "_accept_connection":
                    loop.remove_reader(key.fd)
        except Exception:  # no loop, another implementation: signal only
            return


class AliveFlagRecycler(_OnceRecycler):
    """gunicorn's own way: ``worker.alive = False`` (sync, gthread, gevent, eventlet).

    The worker finishes the connections it has, stops accepting, and exits; the master
    starts a replacement. gthread's main loop sleeps in its poller for up to a second,
    so it is woken through the worker's method queue, as its SIGTERM handler does.
    Logs once through ``worker.log`` (gunicorn's error log).
    """

    def __init__(self, worker: Any) -> None:
        super().__init__()
        self.worker = worker

    def recycle(self, reason: str, figures: dict[str, Any]) -> bool:
        # A worker already leaving (gunicorn's max_requests, a SIGTERM) needs no recycle.
        if not self.worker.alive or not self._claim():
            return False
        self.worker.log.warning("recycling worker %s (%s): %s", os.getpid(), reason,
                                format_figures(figures))
        self.worker.alive = False
        self._wake()
        return True

    def _wake(self) -> None:
        queue = getattr(self.worker, "method_queue", None)
        if queue is not None:  # gthread: wake the poller now, not in a second
            try:
                queue.defer(_nothing)
            except Exception:  # a closed queue means the loop is already leaving
                pass


def _nothing() -> None:
    return None


class AsgiWorkerRecycler(AliveFlagRecycler):
    """gunicorn's native ``asgi`` worker.

    Its main loop reads ``alive`` once a second and its connections read it after each
    request. Until that loop leaves, the worker would keep accepting connections, so
    the listening sockets are also taken off its event loop at once. Not with
    ``Server.close()``: a connection accepted just before it, whose transport is made
    just after, trips asyncio's ``Server._attach`` assertion and is dropped (measured:
    3 resets in 2,000 requests). The other workers keep the listening socket. The
    worker's shutdown then waits for in-flight connections up to ``graceful_timeout``.
    Called on the worker's event loop (from ``post_request``). Under uvloop its servers
    are closed instead (:func:`stop_accepting`).
    """

    def _wake(self) -> None:
        stop_accepting(self.worker)


class UvicornWorkerRecycler(SignalRecycler):
    """``uvicorn-worker``'s worker: stop accepting now, then SIGTERM to itself.

    uvicorn notices the signal on its next tick (every 0.1 s) and only then stops
    accepting; at a leak's pace that tenth of a second of new requests is what tips a
    container over, so the listening sockets leave the event loop first (see
    :class:`AsgiWorkerRecycler` for why not ``Server.close()``).
    """

    def __init__(self, worker: Any) -> None:
        super().__init__(signal.SIGTERM, logger=worker.log)
        self.worker = worker

    def _stop_accepting(self) -> None:
        stop_accepting(self.worker)


def stop_accepting(worker: Any) -> None:
    """Stop a gunicorn worker's event loop accepting connections; those it accepted are
    served. The other workers keep the listening sockets.

    Under uvloop the worker's servers (gunicorn's ``asgi`` worker's own, or uvicorn's)
    are closed. On asyncio's selector loop the listening sockets are taken off the loop
    instead (see :class:`AsgiWorkerRecycler` for why not ``Server.close()`` there).
    """
    servers = getattr(worker, "servers", None)  # gunicorn's asgi worker
    if servers is None and is_uvicorn_worker_class(type(worker)):
        servers = getattr(_uvicorn_server(), "servers", None)
    if _close_uvloop_servers(servers or (), getattr(worker, "sockets", ())):
        return
    loop: Any
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        loop = getattr(worker, "loop", None)
    if loop is None:
        return
    for sock in getattr(worker, "sockets", ()):
        try:
            loop.remove_reader(sock.fileno())
        except Exception:
            pass


def _uvicorn_server() -> Any:
    """The uvicorn ``Server`` running in this process, or ``None``.

    While it serves, uvicorn (0.29 and later) handles SIGTERM with its ``handle_exit``
    method, installed with ``signal.signal``: the one public way back to it.
    """
    server = getattr(signal.getsignal(signal.SIGTERM), "__self__", None)
    return server if type(server).__module__ == "uvicorn.server" else None


def _awaiting_first_request(server: Any) -> bool:
    """Whether one of uvicorn's connections has not received its first request yet (its
    HTTP protocols have no ``cycle`` until then)."""
    state = getattr(server, "server_state", None)
    connections = getattr(state, "connections", ())
    return any(getattr(c, "cycle", False) is None for c in list(connections))


def _close_uvloop_servers(servers: Iterable[Any], listeners: Iterable[Any] = ()) -> bool:
    """Close ``servers`` if they are uvloop's; False (nothing done) otherwise.

    uvloop accepts a connection and attaches its transport in one callback, so a close
    cannot strand one as asyncio's can; connections still in the kernel's queue stay
    there for the other processes holding the socket. The close is a loop callback of
    its own: run from a signal handler that interrupted the accept callback between the
    protocol and its transport, it would drop that connection. ``listeners`` (gunicorn's
    socket wrappers) let go of their descriptors first: libuv closes them, and a wrapper
    closing the same number again could close a file another thread just opened.
    """
    servers = [s for s in servers if type(s).__module__.partition(".")[0] == "uvloop"]
    if not servers:
        return False

    def close() -> None:
        for listener in listeners:
            inner = getattr(listener, "sock", None)
            if isinstance(inner, socket.socket):
                inner.detach()
        for server in servers:
            server.close()

    servers[0].get_loop().call_soon_threadsafe(close)
    return True


def is_uvicorn_worker_class(cls: type) -> bool:
    """``uvicorn-worker``'s worker (or uvicorn's old ``uvicorn.workers``), or a subclass."""
    return any(k.__module__.startswith(("uvicorn_worker", "uvicorn.workers"))
               for k in cls.__mro__)


def gunicorn_recycler(worker: Any) -> Recycler:
    """The recycler that works for this gunicorn ``worker``'s class.

    ``uvicorn-worker`` runs uvicorn's own loop, which never reads ``alive``: a SIGTERM
    to itself is its graceful stop. gunicorn's native ``asgi`` worker and the others
    honour ``alive``.
    """
    if is_uvicorn_worker_class(type(worker)):
        return UvicornWorkerRecycler(worker)
    names = {f"{k.__module__}.{k.__qualname__}" for k in type(worker).__mro__}
    if "gunicorn.workers.gasgi.ASGIWorker" in names:
        return AsgiWorkerRecycler(worker)
    return AliveFlagRecycler(worker)


_recycler: Recycler = LogOnlyRecycler()


def set_recycler(recycler: Recycler) -> Recycler:
    """Install ``recycler`` for this process; returns the previous one."""
    global _recycler
    previous, _recycler = _recycler, recycler
    return previous


def get_recycler() -> Recycler:
    return _recycler


def request_recycle(reason: str, **figures: Any) -> bool:
    """Ask the installed recycler to replace this worker. Never raises."""
    try:
        started = _recycler.recycle(reason, figures)
    except Exception:  # a failing recycler must never kill a request
        log.exception("recycler %r failed", _recycler)
        return False
    if started:
        counters.increment("recycle", reason)
        events.emit("recycle", reason=reason, **figures)
    return started


# A server integration (memguard.gunicorn) that observes every request itself: the
# middleware then leaves the after-response check to it, and takes its limits for
# "auto". Set when its config is loaded, so a --preload master's app sees it too.
_server_limits: tuple[int | None, int | None] | None = None


def set_server(limits: tuple[int | None, int | None] | None) -> None:
    """Say that a server integration with these (soft, hard) worker limits decides
    recycles in this process and the workers it forks (``None``: no longer)."""
    global _server_limits
    _server_limits = limits


def server_limits() -> tuple[int | None, int | None] | None:
    """(soft, hard) of the server integration in this process, or ``None``."""
    return _server_limits


def server_observes_requests() -> bool:
    """True when a server integration runs the per-request recycle check itself."""
    return _server_limits is not None
