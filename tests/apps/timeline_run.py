"""Drive :mod:`tests.apps.timeline_app` under a real gunicorn and keep its event log.

``python -m tests.apps.timeline_run EVENTS.jsonl [--seconds 40] [--cgroup 320MiB]``
writes a real event log (and, with ``--out``, draws it); the tests call :func:`run`.
With a cgroup, one ``/bloat`` request is OOM-killed by the kernel midway.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import socket
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.cgroups import MemoryCgroup
from tests.support.servers import http_request, serve

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Observed:
    """What the clients saw."""

    statuses: Counter[int] = field(default_factory=Counter)
    failures: int = 0
    pids: set[int] = field(default_factory=set)  # workers that answered
    cgroup_oom_kills: int | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, status: int | None, body: bytes = b"") -> None:
        with self.lock:
            if status is None:
                self.failures += 1
            else:
                self.statuses[status] += 1
            _, _, pid = body.rpartition(b"pid=")
            if pid.strip().isdigit():
                self.pids.add(int(pid))


def declared_upload(url: str, length: int) -> int:
    """POST declaring ``length`` bytes and sending none: the app must refuse first."""
    host, port = url.split("://", 1)[1].split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(f"POST /upload HTTP/1.1\r\nHost: {host}\r\n"
                     f"Content-Type: application/octet-stream\r\n"
                     f"Content-Length: {length}\r\n\r\n".encode())
        head = sock.recv(4096).split(b"\r\n", 1)[0]
    return int(head.split()[1])


def _get(url: str, path: str, observed: Observed, **kwargs: object) -> None:
    try:
        status, _, body = http_request(url, path=path, **kwargs)  # type: ignore[arg-type]
    except (OSError, http.client.HTTPException):
        observed.add(None)
    else:
        observed.add(status, body)


def run(events: Path, *, seconds: float = 10.0, clients: int = 3, workers: int = 3,
        interval: float = 0.03, leak_mib: float = 4.0, soft_limit: str = "64MiB",
        cgroup: str | None = None, bloat_mib: int = 600, refusals: int = 4) -> Observed:
    """Serve the app with ``workers`` sync workers for about ``seconds``, from
    ``clients`` threads: leaking requests, ``refusals`` refused uploads of each kind
    (413 and 415) spread over the run, and one ``/bloat`` if in a ``cgroup``."""
    observed = Observed()
    env = {"MEMGUARD_EVENTS": str(events), "TIMELINE_SOFT_LIMIT": soft_limit}
    args = ["-c", "python:tests.apps.timeline_conf", "-w", str(workers),
            "--graceful-timeout", "5"]
    with contextlib.ExitStack() as stack:
        group = stack.enter_context(MemoryCgroup(cgroup)) if cgroup else None
        server = stack.enter_context(serve("gunicorn", "tests.apps.timeline_app:app", args,
                                           env=env, cwd=REPO, cgroup=group))
        server.wait_for_workers(workers)
        started = time.monotonic()
        stop = started + seconds

        def client(n: int) -> None:
            # Staggered so that the workers do not all recycle in step.
            time.sleep(n * seconds / (clients * 8))
            while time.monotonic() < stop:
                _get(server.url, f"/leak?mib={leak_mib}", observed)
                time.sleep(interval * (n + 1))

        def refuser() -> None:
            for i in range(refusals):
                time.sleep(seconds / (refusals + 1))
                try:
                    observed.add(declared_upload(server.url, 2**30 + i))
                except (OSError, ValueError, IndexError):
                    observed.add(None)
                _get(server.url, "/upload", observed, method="POST", body=b"{}",
                     headers={"Content-Type": "application/json"})
            if group is not None:
                time.sleep(max(0.0, started + seconds * 0.55 - time.monotonic()))
                _get(server.url, f"/bloat?mib={bloat_mib}", observed, timeout=30)

        threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
        threads.append(threading.Thread(target=refuser))
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        # Let the master take its last samples, and see the last exit.
        time.sleep(0.6)
        if group is not None:
            observed.cgroup_oom_kills = group.oom_kills
    return observed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.apps.timeline_run")
    parser.add_argument("events", type=Path)
    parser.add_argument("--seconds", type=float, default=40)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--interval", type=float, default=0.03,
                        help="client n pauses interval * (n + 1) between requests")
    parser.add_argument("--cgroup", help="run inside a memory cgroup with this limit")
    parser.add_argument("--out", help="draw the timeline there (.png, .svg, .html)")
    args = parser.parse_args(argv)
    args.events.unlink(missing_ok=True)
    observed = run(args.events, seconds=args.seconds, workers=args.workers,
                   interval=args.interval, cgroup=args.cgroup)
    print(f"clients saw: {dict(observed.statuses)}, {observed.failures} failed")
    if args.out:
        from memguard.cli import report

        timeline = report.load(args.events)
        report.draw(timeline, args.out)
        print(report.render_summary(report.summarize(timeline)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
