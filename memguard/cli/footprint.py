"""What an app really costs per worker: import it, fork, serve warm-up requests, measure.

:func:`measure` runs ``python -m memguard.cli.footprint`` in a fresh subprocess (so the app's
import never touches the caller) and returns one :class:`~memguard.cli.sizing.Footprint` per
serving mode:

- without preload: the process stands in for a gunicorn master that has not imported the
  app (gunicorn itself is imported when installed); a forked child imports the app, like a
  worker does, and serves the warm-up requests;
- with preload: the process imports the app first (``--preload``), then forks the worker.

The warm-up requests are served in-process: a WSGI app is called directly with a minimal
environ, an ASGI app through a minimal in-process server (lifespan startup first, then one
``http`` scope per request). Without preload the child first calls ``gc.freeze()``, as
memguard's gunicorn hooks do in every worker. After the requests the worker runs
``gc.collect()``, as every real worker eventually does (it is what turns a preloaded
master's shared pages private), and its USS, PSS and RSS are read from
``/proc/<pid>/smaps_rollup``. The master is measured before it forks, so master USS +
worker USS counts every page once. Each request's wall and CPU time are kept too: their
ratio says whether the app computes or waits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import importlib
import inspect
import io
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from memguard.cli.sizing import Footprint
from memguard.errors import MemGuardError
from memguard.system import ProcessMemory, current_peak_rss, current_rss, process_memory

__all__ = ["FootprintError", "load_app", "measure", "is_asgi"]

DEFAULT_REQUESTS = 20


class FootprintError(MemGuardError):
    """The app could not be imported or served for measuring; the message says why."""


def load_app(spec: str) -> Any:
    """Import ``module:attr`` (``attr`` may be dotted, or ``factory()``), as gunicorn does."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise FootprintError(f"app {spec!r} is not of the form module:attribute")
    module = importlib.import_module(module_name)
    call = attr.endswith("()")
    obj: Any = module
    for part in attr.removesuffix("()").split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise FootprintError(f"module {module_name!r} has no attribute {attr!r}") from None
    if call:
        obj = obj()
    if not callable(obj):
        raise FootprintError(f"{spec!r} is not callable: {type(obj).__name__}")
    return obj


def is_asgi(app: Any) -> bool:
    """True for an ASGI app: a coroutine function, or an object whose ``__call__`` is one."""
    if inspect.isfunction(app) or inspect.ismethod(app):
        return inspect.iscoroutinefunction(app)
    return inspect.iscoroutinefunction(type(app).__call__)


# --------------------------------------------------------------------------------------
# Warm-up requests, in-process


def _runqueue_seconds() -> float:
    """Time this thread has spent runnable, waiting for a CPU (0 where the kernel does
    not say: ``/proc/thread-self/schedstat``'s second field)."""
    try:
        with open("/proc/thread-self/schedstat") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


def _reset_peak_rss() -> int | None:
    """Set this process's peak RSS (``VmHWM``) back to its current RSS and return that;
    ``None`` where the kernel cannot (``clear_refs`` value 5: Linux 4.0 and later)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    return current_rss()


class RequestTimings:
    """Wall and CPU time of each warm-up request: how much of a request's time a worker
    spends computing rather than waiting (a database, an API), which decides how many
    sync workers keep the CPUs busy. Time spent runnable but waiting for a CPU (other
    processes on a busy machine) is not waiting for I/O: it is left out of the wall time,
    or a CPU-bound app measured on a loaded machine would look like it waits.

    Also each request's peak memory above the RSS it started at: the threads of a gthread
    worker may each hold that at the same time."""

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self.peaks: list[int] = []
        self._started = (0.0, 0.0, 0.0)
        self._rss: int | None = None

    def start(self) -> None:
        self._rss = _reset_peak_rss()
        self._started = (time.perf_counter(), time.process_time(), _runqueue_seconds())

    def stop(self) -> None:
        wall, cpu, queued = self._started
        queued = _runqueue_seconds() - queued
        self.wall.append(max(0.0, time.perf_counter() - wall - queued))
        self.cpu.append(time.process_time() - cpu)
        peak = current_peak_rss() if self._rss is not None else None
        if peak is not None and self._rss is not None:
            self.peaks.append(max(0, peak - self._rss))

    def peak(self) -> int | None:
        """The largest request's peak above its starting RSS, the first request left out
        when there are others (it builds what the app creates on first use); ``None``
        where the kernel does not say."""
        peaks = self.peaks[1:] if len(self.peaks) > 1 else self.peaks
        return max(peaks) if peaks else None

    def medians(self) -> tuple[float | None, float | None]:
        """(wall, cpu) seconds of a typical request; the first request is left out when
        there are others, since it builds what the app creates on first use."""
        wall, cpu = (self.wall[1:], self.cpu[1:]) if len(self.wall) > 1 else (self.wall, self.cpu)
        if not wall:
            return None, None
        return statistics.median(wall), statistics.median(cpu)


def _wsgi_environ(path: str) -> dict[str, Any]:
    path_info, _, query = path.partition("?")
    return {
        "REQUEST_METHOD": "GET", "SCRIPT_NAME": "", "PATH_INFO": path_info,
        "QUERY_STRING": query, "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "8000",
        "SERVER_PROTOCOL": "HTTP/1.1", "HTTP_HOST": "127.0.0.1", "REMOTE_ADDR": "127.0.0.1",
        "wsgi.version": (1, 0), "wsgi.url_scheme": "http", "wsgi.input": io.BytesIO(b""),
        "wsgi.errors": sys.stderr, "wsgi.multithread": False, "wsgi.multiprocess": True,
        "wsgi.run_once": False,
    }


def _serve_wsgi(app: Any, paths: Sequence[str], count: int,
                timings: RequestTimings) -> list[str]:
    statuses: list[str] = []
    status: list[str] = []

    def start_response(s: str, headers: Any, exc_info: Any = None) -> Callable[[bytes], None]:
        status.append(s.split(" ", 1)[0])
        return lambda data: None

    for i in range(count):
        status.clear()
        timings.start()
        try:
            result: Iterable[bytes] = app(_wsgi_environ(paths[i % len(paths)]), start_response)
            try:
                for _ in result:
                    pass
            finally:
                close = getattr(result, "close", None)
                if close is not None:
                    close()
            statuses.append(status[-1] if status else "none")
        except Exception as exc:
            statuses.append(f"error: {type(exc).__name__}: {exc}")
        timings.stop()
    return statuses


async def _asgi_lifespan(app: Any, state: dict[str, Any]) -> Callable[[], Any] | None:
    """Start the app's lifespan; returns the coroutine function that shuts it down."""
    inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    outbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"},
             "state": state}
    task = asyncio.ensure_future(app(scope, inbox.get, outbox.put))
    await inbox.put({"type": "lifespan.startup"})
    reply = asyncio.ensure_future(outbox.get())
    done, _ = await asyncio.wait({task, reply}, timeout=30,
                                 return_when=asyncio.FIRST_COMPLETED)
    if reply not in done:
        reply.cancel()
        if task in done:
            # An app that raises on lifespan does not support it: servers carry on.
            with contextlib.suppress(BaseException):
                task.result()
            return None
        task.cancel()
        raise FootprintError("the app did not finish its lifespan startup within 30 s")
    message = reply.result()
    if message["type"] == "lifespan.startup.failed":
        task.cancel()
        raise FootprintError(f"the app's lifespan startup failed: {message.get('message', '')}")

    async def shutdown() -> None:
        await inbox.put({"type": "lifespan.shutdown"})
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(task, timeout=5)

    return shutdown


async def _asgi_request(app: Any, path: str, state: dict[str, Any]) -> str:
    raw, _, query = path.partition("?")
    scope = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1", "method": "GET", "scheme": "http", "path": raw,
        "raw_path": raw.encode(), "query_string": query.encode(), "root_path": "",
        "headers": [(b"host", b"127.0.0.1")], "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000), "state": dict(state),
    }
    finished = asyncio.Event()
    sent_request = False
    status: list[str] = []

    async def receive() -> dict[str, Any]:
        nonlocal sent_request
        if not sent_request:
            sent_request = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await finished.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            status.append(str(message["status"]))
        elif message["type"] == "http.response.body" and not message.get("more_body", False):
            finished.set()

    try:
        await asyncio.wait_for(app(scope, receive, send), timeout=30)
    except Exception as exc:
        return f"error: {type(exc).__name__}: {exc}"
    finally:
        finished.set()
    return status[-1] if status else "none"


def _serve_asgi(app: Any, paths: Sequence[str], count: int,
                measure: Callable[[], ProcessMemory],
                timings: RequestTimings) -> tuple[list[str], ProcessMemory]:
    async def main() -> tuple[list[str], ProcessMemory]:
        state: dict[str, Any] = {}
        shutdown = await _asgi_lifespan(app, state)
        statuses = []
        for i in range(count):
            timings.start()
            statuses.append(await _asgi_request(app, paths[i % len(paths)], state))
            timings.stop()
        # Measured while the app is still up: shutdown handlers may free what a running
        # worker keeps.
        figures = measure()
        if shutdown is not None:
            await shutdown()
        return statuses, figures

    return asyncio.run(main())


# --------------------------------------------------------------------------------------
# The measuring process (python -m memguard.cli.footprint)


def _self_memory(collect: bool = True) -> ProcessMemory:
    if collect:
        gc.collect()
    return process_memory(os.getpid())


def _uss(m: ProcessMemory) -> int:
    return m.uss if m.uss is not None else m.rss


def _worker(spec: str | None, app: Any, paths: Sequence[str], count: int,
            interface: str) -> dict[str, Any]:
    """Runs in the forked child: import (without preload), warm up, measure."""
    if app is None:
        assert spec is not None
        # As memguard's gunicorn hooks do in each worker (MEMGUARD_GC_FREEZE_AT_FORK): what
        # the master holds leaves the collector, so collecting below turns none of it private.
        gc.freeze()
        app = load_app(spec)
    # No gc.collect() here: a freshly booted worker has not run one yet.
    boot = _self_memory(collect=False)
    asgi = is_asgi(app) if interface == "auto" else interface == "asgi"
    timings = RequestTimings()
    if asgi:
        statuses, warm = _serve_asgi(app, paths, count, _self_memory, timings)
    else:
        statuses = _serve_wsgi(app, paths, count, timings)
        warm = _self_memory()
    request_seconds, request_cpu_seconds = timings.medians()
    return {"interface": "asgi" if asgi else "wsgi", "boot": _uss(boot), "worker": _uss(warm),
            "worker_pss": warm.pss, "worker_rss": warm.rss, "statuses": statuses,
            "request_seconds": request_seconds, "request_cpu_seconds": request_cpu_seconds,
            "request_peak": timings.peak()}


def _fork_worker(spec: str | None, app: Any, paths: Sequence[str], count: int,
                 interface: str) -> dict[str, Any]:
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the worker
        os.close(read_fd)
        code = 0
        try:
            try:
                result = _worker(spec, app, paths, count, interface)
            except BaseException as exc:  # everything goes back to the parent as text
                result = {"error": f"{type(exc).__name__}: {exc}"}
                code = 1
            with os.fdopen(write_fd, "w") as out:
                json.dump(result, out)
        finally:
            os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd) as pipe:
        text = pipe.read()
    os.waitpid(pid, 0)
    try:
        data: dict[str, Any] = json.loads(text)
    except ValueError:
        raise FootprintError(f"the measuring worker died without a result: {text!r}") from None
    if "error" in data:
        raise FootprintError(f"serving {spec} failed: {data['error']}")
    return data


def _measure_here(spec: str, paths: Sequence[str], count: int, interface: str,
                  preload_modes: Sequence[bool]) -> dict[str, Any]:
    with contextlib.suppress(ImportError):
        # The master and its workers carry gunicorn: count it in the baseline like they do.
        import gunicorn.arbiter  # noqa: F401
        import gunicorn.workers.sync  # noqa: F401
    modes: list[dict[str, Any]] = []
    for preload in sorted(preload_modes):  # False first: the app is not imported yet
        app = load_app(spec) if preload else None
        master = _uss(_self_memory())
        data = _fork_worker(None if preload else spec, app, paths, count, interface)
        modes.append({"preload": preload, "master": master, **data})
    return {"app": spec, "requests": count, "paths": list(paths), "modes": modes}


def _main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m memguard.cli.footprint")
    parser.add_argument("app")
    parser.add_argument("--requests", type=int, default=DEFAULT_REQUESTS)
    parser.add_argument("--path", action="append", dest="paths")
    parser.add_argument("--interface", choices=("auto", "wsgi", "asgi"), default="auto")
    parser.add_argument("--mode", action="append", choices=("preload", "no-preload"))
    args = parser.parse_args(argv)
    # Results go to the original stdout; whatever the app prints goes to stderr.
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.path.insert(0, os.getcwd())
    modes = [m == "preload" for m in (args.mode or ["no-preload", "preload"])]
    try:
        result = _measure_here(args.app, args.paths or ["/"], args.requests, args.interface,
                               modes)
    except Exception as exc:
        print(f"memguard footprint: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    json.dump(result, out)
    out.close()
    return 0


# --------------------------------------------------------------------------------------
# The caller's side


def measure(
    app: str, *, requests: int = DEFAULT_REQUESTS, paths: Sequence[str] = ("/",),
    interface: str = "auto", preload: Sequence[bool] = (False, True),
    cwd: str | Path | None = None, timeout: float = 120,
) -> tuple[list[Footprint], dict[str, Any]]:
    """Measure ``app`` ("module:attr") in a subprocess: footprints plus the raw report."""
    argv = [sys.executable, "-m", "memguard.cli.footprint", app, "--requests", str(requests),
            "--interface", interface]
    for path in paths:
        argv += ["--path", path]
    for mode in preload:
        argv += ["--mode", "preload" if mode else "no-preload"]
    proc = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise FootprintError(f"measuring {app} took longer than {timeout:g} s") from None
    if proc.returncode != 0:
        tail = err.decode(errors="replace").strip().splitlines()[-15:]
        raise FootprintError(f"measuring {app} failed (exit {proc.returncode}):\n"
                             + "\n".join(tail))
    report: dict[str, Any] = json.loads(out)
    footprints = [
        Footprint(preload=m["preload"], master=m["master"], boot=m["boot"],
                  worker=m["worker"], worker_pss=m["worker_pss"], worker_rss=m["worker_rss"],
                  request_seconds=m.get("request_seconds"),
                  request_cpu_seconds=m.get("request_cpu_seconds"),
                  request_peak=m.get("request_peak"))
        for m in report["modes"]
    ]
    return footprints, report


if __name__ == "__main__":
    sys.exit(_main())
