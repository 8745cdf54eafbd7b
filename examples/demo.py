"""``make demo``: memguard keeping a FastAPI app alive inside a memory budget.

It starts ``examples/fastapi_app`` under a real gunicorn (2 uvicorn workers, memguard's
``gunicorn.conf.py``) inside a memory cgroup where the machine allows (otherwise the
worker limits alone are the budget), drives it for about a minute from several client
threads, and prints what memguard did:

- steady traffic on ``/`` and a leaking route (``/leak`` keeps 2 MiB per request): the
  workers are recycled gracefully before they can grow into an OOM kill;
- a 652 MB upload streamed to disk with ``memguard.uploads.save_body``: flat memory,
  byte-identical (SHA-256);
- a 652 MB body sent to the naive ``await request.body()`` route: refused before the
  worker passes its limit, the worker keeps serving;
- an upload declared bigger than its route's limit, and a few hostile requests
  (malformed Content-Length, Content-Length with Transfer-Encoding, a stalled body):
  each gets its precise 4xx;
- at the end, the readiness answer and each route's memory growth per request, scraped
  from the Prometheus endpoint (the leaking route stands out).

The event log and the memory timeline land in ``demo-output/``.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from memguard.cli import doctor, report
from memguard.sizes import format_size
from tests.support.cgroups import MemoryCgroup, cgroup_unavailable_reason
from tests.support.payloads import patterned_body, patterned_sha256
from tests.support.servers import Server, serve, stream_upload

REPO = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024


class Tally:
    """What the clients saw, by kind of traffic."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts: Counter[tuple[str, str]] = Counter()
        self.notes: list[str] = []

    def add(self, kind: str, outcome: str) -> None:
        with self.lock:
            self.counts[(kind, outcome)] += 1

    def note(self, text: str) -> None:
        with self.lock:
            self.notes.append(text)
        print(f"  * {text}", flush=True)

    def total(self, outcome_prefix: str, kinds: tuple[str, ...] = ("steady", "leak")) -> int:
        with self.lock:
            return sum(n for (k, o), n in self.counts.items()
                       if k in kinds and o.startswith(outcome_prefix))


def request(server: Server, method: str, path: str, body: Any = None,
            headers: dict[str, str] | None = None, timeout: float = 30) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(server.host, server.port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def raw(server: Server, data: bytes, wait: float = 10) -> bytes:
    """Send raw bytes and return the status line (for framing no client library sends)."""
    with socket.create_connection((server.host, server.port), timeout=wait) as sock:
        sock.sendall(data)
        answer = b""
        with contextlib.suppress(OSError):
            while b"\r\n" not in answer:
                more = sock.recv(4096)
                if not more:
                    break
                answer += more
    return answer.split(b"\r\n", 1)[0]


def client_loop(server: Server, tally: Tally, kind: str, path: str, pause: float,
                stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            status, _ = request(server, "GET", path)
            tally.add(kind, "ok" if status == 200 else f"failed {status}")
        except (OSError, http.client.HTTPException) as exc:
            tally.add(kind, f"failed {type(exc).__name__}")
        stop.wait(pause)


def scenario(server: Server, tally: Tally, upload_size: int, stop: threading.Event) -> None:
    """The uploads and hostile requests, one after another, while the load runs."""
    if stop.wait(4):
        return
    expected = patterned_sha256(upload_size)
    started = time.monotonic()
    status, body = request(server, "POST", "/upload", body=patterned_body(upload_size),
                           headers={"Content-Length": str(upload_size),
                                    "Content-Type": "application/octet-stream"}, timeout=300)
    seconds = time.monotonic() - started
    good = status == 200 and expected.encode() in body
    tally.add("upload", "ok" if good else f"failed {status}")
    tally.note(f"streamed upload of {format_size(upload_size)}: {status}, "
               f"{'sha256 matches' if good else body[:120]!r}, {seconds:.1f} s")

    if stop.wait(2):
        return
    # Read the answer while sending: a refusal comes before the body is all sent.
    status, answer, _ = stream_upload(server.port, "/naive", upload_size,
                                      host=server.host, chunk=1024 * 1024)
    outcome = (f"refused {status}" if status in (413, 503) else
               f"answered {status}" if status else "connection ended without an answer")
    answer = answer.partition(b"\r\n\r\n")[2]
    tally.add("naive", outcome)
    tally.note(f"naive request.body() with {format_size(upload_size)}: {outcome}, "
               f"{answer[:100]!r}")

    hostile = {
        "declared 2 GiB to /naive (limit 1 GiB)":
            b"POST /naive HTTP/1.1\r\nHost: demo\r\nContent-Length: 2147483648\r\n\r\n",
        "Content-Length: 12abc":
            b"POST /upload HTTP/1.1\r\nHost: demo\r\nContent-Length: 12abc\r\n\r\n",
        "Content-Length with Transfer-Encoding":
            b"POST /upload HTTP/1.1\r\nHost: demo\r\nContent-Length: 5\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        "a body that stalls after 10 bytes":
            b"POST /upload HTTP/1.1\r\nHost: demo\r\nContent-Length: 1000\r\n\r\n0123456789",
    }
    for label, data in hostile.items():
        if stop.is_set():
            return
        line = raw(server, data, wait=15).decode("latin-1")
        tally.add("hostile", line or "no answer")
        tally.note(f"{label}: {line or 'connection closed without an answer'}")
        stop.wait(1)


def run(seconds: float, upload_size: int, out: Path) -> int:
    out.mkdir(parents=True, exist_ok=True)
    events_path = out / "events.jsonl"
    events_path.unlink(missing_ok=True)
    uploads = Path(tempfile.mkdtemp(prefix="memguard-demo-uploads-"))
    metrics_dir = Path(tempfile.mkdtemp(prefix="memguard-demo-metrics-"))
    env = {
        # prometheus-client's multiprocess mode: every worker's counts in one scrape.
        "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
        "MEMGUARD_EVENTS": str(events_path),
        "UPLOAD_DIR": str(uploads),
        "LEAK_BYTES": str(2 * MiB),
        # A stalled body is answered after 2 s instead of the default 60 s.
        "MEMGUARD_BODY_IDLE_TIMEOUT": "2",
    }
    reason = cgroup_unavailable_reason()
    tally = Tally()
    stop = threading.Event()
    group: MemoryCgroup | None = None
    try:
        with contextlib.ExitStack() as stack:
            if reason is None:
                group = stack.enter_context(MemoryCgroup("1GiB"))
                print(f"memory cgroup {group.path.name}: limit 1 GiB (a container's limit)")
            else:
                print(f"no memory cgroup here ({reason}): the worker limits are the budget")
            suggest(group)
            server = stack.enter_context(serve(
                "gunicorn", "examples.fastapi_app.app:app",
                ["-c", "examples/fastapi_app/gunicorn.conf.py"],
                cwd=REPO, env=env, cgroup=group, timeout=60))
            server.wait_for_workers(2)
            print(f"gunicorn master {server.pid} on {server.url}: 2 uvicorn workers, "
                  "memguard recycles at 160 MiB, stops a worker at 320 MiB")
            print(f"driving it for {seconds:.0f} s: 3 steady clients, 1 client on the "
                  "leaking route (2 MiB kept per request), uploads and hostile requests\n")
            threads = [threading.Thread(target=client_loop, daemon=True,
                                        args=(server, tally, "steady", "/", 0.02, stop))
                       for _ in range(3)]
            threads.append(threading.Thread(target=client_loop, daemon=True,
                                            args=(server, tally, "leak", "/leak", 0.03, stop)))
            threads.append(threading.Thread(target=scenario, daemon=True,
                                            args=(server, tally, upload_size, stop)))
            for t in threads:
                t.start()
            started = time.monotonic()
            while (elapsed := time.monotonic() - started) < seconds:
                time.sleep(min(5.0, seconds - elapsed))
                recycles = _count_events(events_path, "recycle")
                usage = f", cgroup usage {format_size(group.usage)}" if group else ""
                print(f"[{time.monotonic() - started:5.1f}s] served {tally.total('ok')}, "
                      f"failed {tally.total('failed')}, recycles {recycles}{usage}",
                      flush=True)
            stop.set()
            for t in threads:
                t.join(timeout=130)
            routes, readiness = scrape(server)
            diagnosis = doctor.collect(pid=server.pid)
            print(f"\nmemguard doctor --pid {server.pid}: limit "
                  f"{format_size(diagnosis['memory_limit'])}, usage "
                  f"{_size(diagnosis['memory_usage'])}, peak {_size(diagnosis['memory_peak'])}, "
                  f"OOM kills {diagnosis['oom_kills']}, {diagnosis['cpus']:g} CPUs")
            oom_kills = group.oom_kills if group else 0
            peak = group.peak if group else None
        return summarize(tally, events_path, out, oom_kills, peak, routes, readiness)
    finally:
        shutil.rmtree(uploads, ignore_errors=True)
        shutil.rmtree(metrics_dir, ignore_errors=True)


def suggest(group: MemoryCgroup | None) -> None:
    """What ``memguard suggest`` advises for this app in this budget (run inside it)."""
    argv = [sys.executable, "-m", "memguard", "suggest", "--app", "examples.fastapi_app.app:app",
            "--worker-class", "uvicorn_worker.UvicornWorker", "--json"]
    print("memguard suggest --app examples.fastapi_app.app:app (measuring the app) ...",
          flush=True)
    try:
        if group is not None:
            done = group.run(argv, timeout=120, cwd=str(REPO))
        else:
            done = subprocess.run(argv, capture_output=True, timeout=120, cwd=REPO)
        advice = json.loads(done.stdout)
    except (OSError, subprocess.TimeoutExpired, ValueError) as exc:
        print(f"  suggest did not answer: {exc}")
        return
    classic = advice["classic"]
    print(f"  {advice['workers']} workers (decided by {advice['decided_by']}), soft limit "
          f"{format_size(advice['worker_memory_limit'])}, hard "
          f"{format_size(advice['worker_memory_hard_limit'])}; 2 x cores + 1 = "
          f"{classic['workers']} would need {format_size(classic['needed'])}"
          f"{'' if classic['fits'] else ' (does not fit)'}")


def scrape(server: Server) -> tuple[dict[str, tuple[float, float]], str]:
    """Per-route memory growth from the Prometheus endpoint, and the readiness answer."""
    routes: dict[str, tuple[float, float]] = {}
    try:
        status, body = request(server, "GET", "/readyz")
        readiness = f"{status} {json.loads(body).get('status', '')}"
        status, body = request(server, "GET", "/metrics")
    except (OSError, http.client.HTTPException, ValueError) as exc:
        return routes, f"unavailable ({exc})"
    pattern = re.compile(
        r'^memguard_route_memory_growth_bytes_(sum|count)\{route="([^"]*)"\} (\S+)')
    for line in body.decode().splitlines():
        match = pattern.match(line)
        if match:
            kind, route, value = match.groups()
            total, count = routes.get(route, (0.0, 0.0))
            routes[route] = (total + float(value), count) if kind == "sum" else (
                total, count + float(value))
    return routes, readiness


def _count_events(path: Path, kind: str) -> int:
    try:
        with path.open() as f:
            return sum(1 for line in f if f'"kind":"{kind}"' in line)
    except OSError:
        return 0


def summarize(tally: Tally, events_path: Path, out: Path, oom_kills: int,
              cgroup_peak: int | None, routes: dict[str, tuple[float, float]],
              readiness: str) -> int:
    timeline = report.load(events_path)
    summary = report.summarize(timeline)
    served, failed = tally.total("ok"), tally.total("failed")
    print("\n" + "=" * 78)
    print("what memguard did")
    print("=" * 78)
    rows = [
        ("requests served (steady + leaking route)", f"{served}"),
        ("requests failed", f"{failed}"),
        ("streamed 652 MB upload", _outcomes(tally, "upload")),
        ("naive request.body() upload", _outcomes(tally, "naive")),
        ("hostile requests", _outcomes(tally, "hostile")),
        ("worker recycles", f"{summary['recycles']}"
         + _by(summary["recycles_by_reason"])),
        ("refusals", f"{summary['refusals']}" + _by(summary["refusals_by_status_reason"])),
        ("worker processes over the run", f"{summary['workers']}"),
        ("kernel OOM kills", f"{oom_kills}"),
    ]
    if cgroup_peak is not None:
        rows.append(("cgroup peak usage (incl. page cache)", format_size(cgroup_peak)))
    rows.append(("readiness at the end (/readyz)", readiness))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"  {key.ljust(width)}  {value}")
    if routes:
        print("\n  memory growth per route, sampled requests (from /metrics):")
        for route, (total, count) in sorted(routes.items(), key=lambda r: -r[1][0]):
            mean = total / count if count else 0.0
            print(f"    {route:<14} {int(count):>6} samples, mean {_size(int(mean)):>10} "
                  "per request")
    print("\n  peak memory per worker process (USS = its own memory; RSS includes pages "
          "shared with the master):")
    for p in summary["processes"]:
        if p["role"] != "worker":
            continue
        end = p["end"] or "running at the end"
        if p["end_reason"]:
            end += f" ({p['end_reason']})"
        print(f"    pid {p['pid']:>7}  USS {_size(p['peak_uss']):>10}  "
              f"RSS {_size(p['peak_rss']):>10}  {end}")
    picture = out / "timeline.png"
    try:
        report.draw(timeline, picture, title="make demo: FastAPI under gunicorn + memguard")
        print(f"\nmemory timeline: {picture}   events: {events_path}")
    except report.ReportError as exc:
        print(f"\nno picture: {exc}")
    ok = failed == 0 and oom_kills == 0
    print("\nresult: " + ("0 failed requests, 0 OOM kills" if ok else
                          f"{failed} failed requests, {oom_kills} OOM kills"))
    return 0 if ok else 1


def _outcomes(tally: Tally, kind: str) -> str:
    with tally.lock:
        found = [f"{o} x{n}" if n > 1 else o for (k, o), n in tally.counts.items() if k == kind]
    return ", ".join(found) or "not run"


def _by(counts: dict[str, int]) -> str:
    return "  (" + ", ".join(f"{k}: {n}" for k, n in counts.items()) + ")" if counts else ""


def _size(value: int | None) -> str:
    return format_size(value) if value is not None else "-"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make demo", description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=float(os.environ.get(
        "DEMO_SECONDS", 60)), help="how long to drive the app (default 60)")
    parser.add_argument("--upload-mb", type=int, default=652,
                        help="size of the uploads in MB (default 652)")
    parser.add_argument("--out", type=Path, default=REPO / "demo-output")
    args = parser.parse_args(argv)
    return run(args.seconds, args.upload_mb * 1_000_000, args.out)


if __name__ == "__main__":
    sys.exit(main())
