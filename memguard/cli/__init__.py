"""The ``memguard`` command: its parser and the dispatch to one module per subcommand.

``doctor`` (what the machine and its gunicorn masters look like), ``suggest`` (advice from
:mod:`~memguard.cli.footprint`, what the app costs, and :mod:`~memguard.cli.sizing`, the
decision), ``report`` (an event log's summary and timeline) and ``options``.
"""

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
    report = sub.add_parser(
        "report", help="summarize an event log (MEMGUARD_EVENTS) and draw its memory timeline"
    )
    report.add_argument("events", help="the JSON-lines event log")
    report.add_argument("--out", help="draw the timeline to this .png, .svg or .html file")
    report.add_argument("--metric", default="auto", choices=["auto", "uss", "pss", "rss"],
                        help="memory figure per process (default: the one most samples carry)")
    report.add_argument("--title", help="the picture's title (default: the summary counts)")
    report.add_argument("--json", action="store_true", help="print the summary as JSON")
    report.add_argument("--summary", action="store_true",
                        help="print the text summary (the default unless --json)")
    options = sub.add_parser("options", help="list every memguard option")
    options.add_argument("--markdown", action="store_true",
                         help="print the reference as Markdown (docs/options.md)")
    suggest = sub.add_parser(
        "suggest", help="advise workers, threads and memory limits from CPUs, memory and the"
        " app's measured footprint; print a gunicorn.conf.py",
    )
    suggest.add_argument("--app", required=True, help="the app to measure, module:attribute")
    suggest.add_argument("--worker-class", help="gunicorn worker class (default: gthread for"
                         " an app whose requests mostly wait, sync otherwise)")
    suggest.add_argument("--threads", type=int, help="threads per worker (default: chosen)")
    suggest.add_argument("--memory", help="memory budget (default: cgroup limit or host RAM)")
    suggest.add_argument("--headroom", default="10%", help="memory kept free (default: 10%%)")
    suggest.add_argument("--growth", default="25%", help="room each worker gets to grow past"
                         " its warmed footprint before a recycle (default: 25%%)")
    suggest.add_argument("--requests", type=int, default=20, help="warm-up requests")
    suggest.add_argument("--path", action="append", help="warm-up path (repeatable; /)")
    suggest.add_argument("--web-concurrency", type=int,
                         help="a worker count to check (default: $WEB_CONCURRENCY)")
    suggest.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "doctor":
        return _doctor(args)
    if args.command == "report":
        return _report(args)
    if args.command == "options":
        return _options(args)
    if args.command == "suggest":
        from memguard.cli import suggest

        return suggest.run(args)
    raise AssertionError(args.command)


def _doctor(args: argparse.Namespace) -> int:
    from memguard.cli import doctor

    report = doctor.collect(pid=args.pid)
    if args.json:
        json.dump(report, sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
    else:
        print(doctor.render_text(report))
    return 0


def _report(args: argparse.Namespace) -> int:
    from memguard.cli import report

    try:
        timeline = report.load(args.events)
        summary = report.summarize(timeline, args.metric)
        if args.out:
            report.draw(timeline, args.out, metric=args.metric, title=args.title)
    except report.ReportError as exc:
        print(f"memguard report: {exc}", file=sys.stderr)
        return 2
    if args.json:
        json.dump(summary, sys.stdout, indent=2)
        sys.stdout.write("\n")
    if args.summary or not args.json:
        print(report.render_summary(summary))
    if args.out:
        print(f"\nwrote {args.out}", file=sys.stderr)
    return 0


def _options(args: argparse.Namespace) -> int:
    from memguard import config

    if args.markdown:
        sys.stdout.write(config.reference_markdown())
        return 0
    for s in config.SETTINGS.values():
        default = "none" if s.default is None else repr(s.default)
        env = f"  ({s.env})" if s.env else ""
        print(f"{s.section}.{s.name} = {default}{env}\n    {s.doc}")
    if not config.SETTINGS:
        print("no options declared yet")
    return 0
