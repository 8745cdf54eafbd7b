"""The body guard's cost in instructions (callgrind), where CPU time is too noisy.

On this shared 2-core machine the same in-process loop moves by 20-50% between runs,
more than the 3% the body-guard target allows. Instructions executed do not move: each
workload of ``benchmarks/body_guard.py`` runs under valgrind's callgrind twice, with a
small and a large count, and the difference divided by the extra requests (or chunks)
is what one costs, interpreter start-up and imports cancelled out. Variants: bare
Starlette, ``MemGuardMiddleware`` with every default on the C path, and the same with
``MEMGUARD_PURE_PYTHON=1``. Skipped without valgrind (``apt-get install valgrind``).
Quick mode (CI): the upload only, bare and C path, smaller counts.

Instructions are not time (a cache miss costs more than an add), so this is beside the
timed benchmark, not instead of it.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from benchmarks.harness import Bound, Result

REPO = Path(__file__).resolve().parent.parent
# workload -> (small count, large count, units per count)
WORKLOADS: dict[str, tuple[int, int, int]] = {
    "hello": (100, 600, 1),        # GET / without a body: per request
    "small_post": (100, 600, 1),   # 100-byte POST: per request
    "upload_chunk": (2, 6, 1024),  # 64 MiB in 64 KiB chunks: per chunk
}
QUICK_UPLOAD = (1, 3, 1024)
VARIANTS = ("bare", "guarded", "guarded_pure_python")


def _child(variant: str, workload: str, count: int) -> None:
    """Run inside callgrind: ``count`` requests (or uploads) of ``workload``."""
    from benchmarks import body_guard as bg
    from memguard import MemGuardMiddleware

    app: Any = bg.starlette_app()
    if variant != "bare":
        app = MemGuardMiddleware(app, max_body_size="128MiB")

    async def main() -> None:
        if workload == "hello":
            await bg._requests(app, count)
        elif workload == "small_post":
            await bg._requests(app, count, "POST", "/upload", b"x" * 100)
        else:
            for _ in range(count):
                await bg._upload(app)

    asyncio.run(main())


def _instructions(variant: str, workload: str, count: int) -> int:
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    env.pop("MEMGUARD_PURE_PYTHON", None)
    if variant == "guarded_pure_python":
        env["MEMGUARD_PURE_PYTHON"] = "1"
    out = subprocess.run(
        ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
         sys.executable, "-m", "benchmarks.instructions", variant, workload, str(count)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900, check=True)
    found = re.search(r"Collected : (\d+)", out.stderr)
    if found is None:
        raise RuntimeError(f"no instruction count from callgrind:\n{out.stderr[-2000:]}")
    return int(found.group(1))


def run(quick: bool) -> Result:
    if shutil.which("valgrind") is None:
        reason = "valgrind is not installed (apt-get install valgrind)"
        return Result("instructions", {"skipped": reason}, notes=[f"skipped: {reason}"])
    workloads = ["upload_chunk"] if quick else list(WORKLOADS)
    per: dict[str, dict[str, float]] = {}
    for workload in workloads:
        small, large, units = QUICK_UPLOAD if quick else WORKLOADS[workload]
        per[workload] = {}
        for variant in VARIANTS[:2] if quick else VARIANTS:
            delta = _instructions(variant, workload, large) - _instructions(
                variant, workload, small)
            per[workload][variant] = delta / ((large - small) * units)
            print(f"   {workload:13s} {variant:20s} {per[workload][variant]:10.0f} "
                  f"instructions each", flush=True)
    figures: dict[str, Any] = {"instructions_each": per, "workloads": {
        k: {"small": v[0], "large": v[1], "units_per_count": v[2]} for k, v in WORKLOADS.items()}}
    bounds: list[Bound] = []
    table = []
    for workload, row in per.items():
        bare = row["bare"]
        for variant in ("guarded", "guarded_pure_python"):
            if variant not in row:
                continue
            pct = (row[variant] / bare - 1) * 100
            figures[f"{workload}_{variant}_added_pct"] = round(pct, 2)
            table.append({"workload": workload, "variant": variant,
                          "bare": round(bare), "wrapped": round(row[variant]),
                          "added_pct": round(pct, 2)})
    if "upload_chunk" in per:
        row = per["upload_chunk"]
        bounds.append(Bound("64 MiB streamed upload, instructions added per chunk (C path)",
                            (row["guarded"] / row["bare"] - 1) * 100, 3.0, "%"))
    return Result("instructions", figures, bounds=bounds, table=table, notes=[
        "callgrind instruction counts; per unit = (count(large) - count(small)) / units; "
        "PYTHONHASHSEED=0. Workloads from benchmarks/body_guard.py (the same fake "
        "in-process server and Starlette app)."])


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2], int(sys.argv[3]))
