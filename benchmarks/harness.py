"""What every benchmark shares: machine details, result files, bounds, medians.

A benchmark is a module ``benchmarks/<name>.py`` with ``run(quick: bool) -> Result``.
``python -m benchmarks [--quick] [NAME ...]`` runs them, writes
``benchmarks/results/<name>.json`` (figures plus the machine they were measured on) and
exits non-zero only when a *memory* bound marked ``hard`` failed: speed ratios on a shared
2-core machine are reported, never asserted.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"

PACKAGES = ("memguard-web", "gunicorn", "uvicorn", "uvicorn-worker", "starlette", "fastapi",
            "flask", "django", "python-multipart", "psutil", "httpx")


@dataclass
class Bound:
    """A target: ``value`` must be <= ``limit`` (or >= with ``at_least``)."""

    name: str
    value: float
    limit: float
    unit: str = ""
    hard: bool = False  # True: a memory bound that fails CI; False: reported only
    at_least: bool = False

    @property
    def ok(self) -> bool:
        return self.value >= self.limit if self.at_least else self.value <= self.limit


@dataclass
class Result:
    name: str
    figures: dict[str, Any]
    bounds: list[Bound] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    table: list[dict[str, Any]] = field(default_factory=list)  # rows for the README table


def median(values: list[float]) -> float:
    return statistics.median(values)


def machine_info() -> dict[str, Any]:
    cpu_model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, cwd=RESULTS.parent, timeout=5).stdout.strip()
    except OSError:
        commit = ""
    return {
        "cpu": cpu_model or platform.processor(),
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        "packages": versions,
        "commit": commit,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def write_result(result: Result, quick: bool) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{result.name}{'.quick' if quick else ''}.json"
    data = {
        "name": result.name,
        "mode": "quick" if quick else "full",
        "machine": machine_info(),
        "figures": result.figures,
        "bounds": [{**asdict(b), "ok": b.ok} for b in result.bounds],
        "notes": result.notes,
        "table": result.table,
    }
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    return path
