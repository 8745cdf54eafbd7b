"""A big upload through real uvicorn: five ways to receive it, side by side.

Variants (each endpoint in ``tests/apps/uploads_app.py``):

- ``stream_loop``: the hand-written baseline, ``async for chunk in request.stream():
  f.write(chunk)`` (synchronous writes on the event loop, no hash, no fsync);
- ``save_body``: ``memguard.uploads.save_body`` with its defaults (SHA-256 in a writer
  thread, atomic rename, no fsync: like the loop and every framework);
  ``save_body_fsync`` the same with ``fsync=True`` (durable: it also waits for the disk);
- ``starlette_uploadfile``: Starlette's multipart path, ``request.form()`` then
  ``UploadFile.read()`` copied to the destination;
- ``save_multipart``: ``memguard.uploads.save_multipart``, same multipart body;
- ``request_body``: the trap, ``await request.body()`` then one write.

Every variant runs on a fresh server: the figure is the growth of that server's peak
RSS (VmHWM) over its value after a 2 MiB warm-up upload to the same endpoint, and
seconds from the first byte sent to the response. Rounds are interleaved (each round
runs every variant once) and the medians reported. ``request_body`` runs once (it is
the slow, huge one). The client streams from a generator of random blocks.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from benchmarks.harness import Bound, Result, median
from memguard.system import read_vm_hwm
from tests.apps.upload_client import BOUNDARY, Payload, multipart_parts, post_stream
from tests.support.servers import serve

REPO = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024
FORM_HEADERS = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}

# name -> (path, multipart?)
VARIANTS: dict[str, tuple[str, bool]] = {
    "stream_loop": ("/loop?name=out.bin", False),
    "save_body": ("/body?name=out.bin", False),
    "save_body_fsync": ("/body?name=out.bin&opts=%7B%22fsync%22%3A%20true%7D", False),
    "starlette_uploadfile": ("/starlette-form", True),
    "save_multipart": ("/form", True),
    "request_body": ("/naive?name=out.bin", False),
}
ONCE = {"request_body"}


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _body(payload: Payload, multipart: bool) -> tuple[Callable[[], Iterator[bytes]], int,
                                                       dict[str, str]]:
    if not multipart:
        return payload.chunks, payload.size, {}
    head, tail, length = multipart_parts(payload)

    def chunks() -> Iterator[bytes]:
        yield head
        yield from payload.chunks()
        yield tail

    return chunks, length, FORM_HEADERS


def _sha256_seconds(payload: Payload) -> float:
    """CPU seconds to hash the body once in 1 MiB pieces (hashlib, median of 3)."""
    times = []
    for _ in range(3):
        digest = hashlib.sha256()
        started = time.process_time()
        for chunk in payload.chunks():
            digest.update(chunk)
        times.append(time.process_time() - started)
    return median(times)


def _clear(directory: Path) -> None:
    for p in directory.iterdir():
        p.unlink()


def measure(variant: str, payload: Payload, root: Path) -> dict[str, float]:
    path, multipart = VARIANTS[variant]
    updir = root / "uploads"
    env = {"UPLOAD_DIR": str(updir), "TMPDIR": str(root / "tmp")}
    with serve("uvicorn", "tests.apps.uploads_app:app", ["--log-level", "warning"], env=env,
               cwd=REPO) as server:
        warm = Payload(2 * MiB, seed_blocks=2)
        chunks, length, headers = _body(warm, multipart)
        status, body, _ = post_stream(server.url, path, chunks(), length, headers)
        if status != 200:
            raise RuntimeError(f"{variant}: warm-up answered {status}: {body!r}")
        _clear(updir)
        before = read_vm_hwm(server.pid) or 0
        cpu_before = _cpu_seconds(server.pid)
        chunks, length, headers = _body(payload, multipart)
        status, body, seconds = post_stream(server.url, path, chunks(), length, headers,
                                            timeout=600)
        after = read_vm_hwm(server.pid) or 0
        cpu = _cpu_seconds(server.pid) - cpu_before
        if status != 200:
            raise RuntimeError(f"{variant}: answered {status}: {body!r}")
        _clear(updir)
    return {"seconds": seconds, "growth_mib": (after - before) / MiB,
            "peak_mib": after / MiB, "server_cpu_seconds": cpu}


def run(quick: bool) -> Result:
    size = (64 if quick else 652) * MiB
    rounds = 3 if quick else 7
    payload = Payload(size)
    samples: dict[str, list[dict[str, float]]] = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="memguard-bench-uploads-") as tmp:
        root = Path(tmp)
        (root / "uploads").mkdir()
        (root / "tmp").mkdir()
        for round_no in range(rounds):
            # Every other round in reverse order, so that a drift in the machine's load
            # does not always favour the variants that run first.
            order = list(VARIANTS) if round_no % 2 == 0 else list(reversed(VARIANTS))
            for variant in order:
                if variant in ONCE and round_no > 0:
                    continue
                started = time.monotonic()
                figures = measure(variant, payload, root)
                samples[variant].append(figures)
                print(f"   round {round_no + 1}/{rounds} {variant:22s} "
                      f"{figures['seconds']:6.2f}s  +{figures['growth_mib']:7.1f} MiB  "
                      f"cpu {figures['server_cpu_seconds']:5.2f}s "
                      f"({time.monotonic() - started:.0f}s)", flush=True)

    def med(variant: str, key: str) -> float:
        return median([s[key] for s in samples[variant]])

    def paired(variant: str, baseline: str) -> float:
        """Median of per-round ratios: each round runs both within seconds of each
        other, so a change in the machine's load between rounds cancels out."""
        return median([a["seconds"] / b["seconds"]
                       for a, b in zip(samples[variant], samples[baseline], strict=False)])

    hash_seconds = _sha256_seconds(payload)
    figures: dict[str, Any] = {"body_bytes": size, "rounds": rounds, "variants": {},
                               "sha256_cpu_seconds": round(hash_seconds, 3)}
    table = []
    for variant in VARIANTS:
        row = {
            "variant": variant,
            "seconds": round(med(variant, "seconds"), 2),
            "vs_stream_loop": round(paired(variant, "stream_loop"), 3),
            "peak_rss_growth_mib": round(max(s["growth_mib"] for s in samples[variant]), 1),
            "server_cpu_seconds": round(med(variant, "server_cpu_seconds"), 2),
            "runs": len(samples[variant]),
        }
        figures["variants"][variant] = {"samples": samples[variant], **row}
        table.append(row)
    body_growth = max(s["growth_mib"] for s in samples["save_body"])
    form_growth = max(s["growth_mib"] for s in samples["save_multipart"])
    bounds = [
        Bound("save_body peak RSS growth", body_growth, 16, "MiB", hard=True),
        Bound("save_multipart peak RSS growth", form_growth, 16, "MiB", hard=True),
        Bound("save_body time / stream loop (paired)", paired("save_body", "stream_loop"),
              1.05, "x"),
        Bound("save_multipart time / Starlette UploadFile (paired)",
              paired("save_multipart", "starlette_uploadfile"), 1.0, "x"),
        # save_body must hash every byte (SavedFile.sha256): like for like, its CPU is the
        # loop's plus that hash's.
        Bound("save_body server CPU / (stream loop + SHA-256 of the body)",
              med("save_body", "server_cpu_seconds")
              / (med("stream_loop", "server_cpu_seconds") + hash_seconds), 1.05, "x"),
    ]
    notes = [
        f"{size // MiB} MiB body through uvicorn on loopback, client streaming 1 MiB blocks "
        f"from a generator; fresh server per variant and run; medians of {rounds} "
        f"interleaved rounds (request_body: one run). Ratios are medians of per-round "
        f"paired ratios (both variants within seconds of each other).",
        "Peak RSS growth: the server's VmHWM after the upload minus VmHWM after a 2 MiB "
        "warm-up upload to the same endpoint (the largest growth over the runs).",
        "save_body does more than the loop: SHA-256 of every byte (in a writer thread) and "
        "an atomic rename; save_body_fsync also fsyncs the file and its directory, and so "
        "waits for the disk, which the loop never does. sha256_cpu_seconds: hashing the "
        "same body in this process (median of 3).",
    ]
    return Result(name="uploads", figures=figures, bounds=bounds, notes=notes, table=table)
