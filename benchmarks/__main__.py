"""``make bench``: run every benchmark (``--quick`` for CI).

Each module listed in ``BENCHMARKS`` has ``run(quick: bool) -> Result``. Results go to
``benchmarks/results/<name>[.quick].json``. The exit status is 1 only when a hard
(memory) bound failed; speed figures are reported, not asserted.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time

from benchmarks.harness import write_result

# Add new benchmarks here (module names under benchmarks/).
BENCHMARKS: list[str] = ["probes", "body_guard", "end_to_end", "uploads", "recycle",
                         "overhead", "sizing"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks")
    parser.add_argument("--quick", action="store_true", help="CI mode: minutes, not tens")
    parser.add_argument("names", nargs="*", help=f"which to run (default: all of {BENCHMARKS})")
    args = parser.parse_args(argv)
    names = args.names or BENCHMARKS
    failed: list[str] = []
    for name in names:
        module = importlib.import_module(f"benchmarks.{name}")
        started = time.monotonic()
        print(f"== {name} ({'quick' if args.quick else 'full'})", flush=True)
        result = module.run(quick=args.quick)
        path = write_result(result, quick=args.quick)
        for bound in result.bounds:
            mark = "ok " if bound.ok else ("FAIL" if bound.hard else "miss")
            cmp = ">=" if bound.at_least else "<="
            print(f"   [{mark}] {bound.name}: {bound.value:.4g} {bound.unit} "
                  f"({cmp} {bound.limit:g}{' hard' if bound.hard else ''})")
            if bound.hard and not bound.ok:
                failed.append(f"{name}: {bound.name}")
        print(f"   wrote {path} in {time.monotonic() - started:.1f}s", flush=True)
    if not names:
        print("no benchmarks registered yet")
    if failed:
        print("hard bounds failed:\n  " + "\n  ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
