"""``make demo``: a real gunicorn on loopback, inside a memory cgroup where the machine
allows, driven with requests, then diagnosed with ``memguard doctor``."""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path

from memguard import doctor
from memguard.testing import MemoryCgroup, cgroup_unavailable_reason, http_request, serve

REPO = Path(__file__).resolve().parent.parent


def main() -> int:
    reason = cgroup_unavailable_reason()
    with contextlib.ExitStack() as stack:
        group = None
        if reason is None:
            group = stack.enter_context(MemoryCgroup("512MiB"))
            print(f"memory cgroup {group.path} with a 512 MiB limit")
        else:
            print(f"no memory cgroup ({reason}); running without one")
        server = stack.enter_context(
            serve("gunicorn", "examples.hello_app:app", ["-w", "2"], cwd=REPO, cgroup=group)
        )
        server.wait_for_workers(2)
        print(f"gunicorn master {server.pid} on {server.url}, 2 sync workers")
        started = time.monotonic()
        ok = failed = 0
        for _ in range(200):
            try:
                status, _, _ = http_request(server.url)
                ok += status == 200
                failed += status != 200
            except OSError:
                failed += 1
        print(f"200 requests in {time.monotonic() - started:.2f}s: {ok} ok, {failed} failed\n")
        print(doctor.render_text(doctor.collect(pid=server.pid)))
        if group is not None:
            peak = group.peak / 2**20
            print(f"\ncgroup peak usage: {peak:.1f} MiB, OOM kills: {group.oom_kills}")
        return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
