"""The ``memguard`` command."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="memguard",
        description="Keep Python web apps behind gunicorn or uvicorn from dying of memory.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    doctor = sub.add_parser(
        "doctor", help="show memory limits, usage, OOM kills, swap, PSI, CPUs and workers"
    )
    doctor.add_argument("--pid", type=int, help="a gunicorn master pid (default: find them)")
    doctor.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "doctor":
        return _doctor(args)
    raise AssertionError(args.command)


def _doctor(args: argparse.Namespace) -> int:
    from memguard import doctor

    report = doctor.collect(pid=args.pid)
    if args.json:
        json.dump(report, sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
    else:
        print(doctor.render_text(report))
    return 0
