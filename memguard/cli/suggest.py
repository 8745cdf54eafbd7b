"""``memguard suggest``: this machine's CPUs and memory, the app's measured footprint, advice.

The glue between :mod:`memguard.system` (what the machine has),
:mod:`memguard.cli.footprint` (what the app costs) and :mod:`memguard.cli.sizing` (the
decision), for the command line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import psutil

from memguard import system
from memguard.cli.footprint import FootprintError, measure
from memguard.cli.sizing import Advice, SizingInput, advise, render_text
from memguard.sizes import parse_size

__all__ = ["run", "collect"]


def _fraction(value: str) -> float:
    text = value.strip()
    if text.endswith("%"):
        return float(text[:-1]) / 100
    return float(text)


def _web_concurrency(args: argparse.Namespace) -> int | None:
    if args.web_concurrency is not None:
        return int(args.web_concurrency)
    raw = os.environ.get("WEB_CONCURRENCY", "").strip()
    if not raw:
        return None
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"WEB_CONCURRENCY={raw!r} is not an integer") from None


def collect(args: argparse.Namespace) -> Advice:
    """Measure the machine and the app, and decide."""
    web_concurrency = _web_concurrency(args)  # a bad value fails before the slow part
    cpu = system.cpu_info()
    budget = system.memory_budget()
    limit, source = budget.limit, budget.source
    if not budget.constrained:
        # No container limit: what the host can give now, not what it has in total.
        limit, source = int(psutil.virtual_memory().available), "available RAM (no cgroup limit)"
    if args.memory:
        limit, source = parse_size(args.memory, total=budget.limit), "--memory"
    footprints, _report = measure(args.app, requests=args.requests,
                                  paths=args.path or ["/"], cwd=os.getcwd())
    cpu_source = cpu.quota_source or ("affinity" if cpu.affinity else "cpu_count")
    return advise(SizingInput(
        cpus=cpu.effective, host_cpus=cpu.host, budget=limit, budget_source=source,
        footprints=footprints, worker_class=args.worker_class, threads=args.threads,
        headroom=parse_size(args.headroom, total=limit), growth=_fraction(args.growth),
        web_concurrency=web_concurrency, app=args.app, cpu_source=cpu_source,
    ))


def run(args: argparse.Namespace) -> int:
    try:
        advice = collect(args)
    except (FootprintError, ValueError) as exc:
        print(f"memguard suggest: {exc}", file=sys.stderr)
        return 2
    if args.json:
        json.dump(advice.to_dict(), sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
    else:
        print(render_text(advice))
    return 0
