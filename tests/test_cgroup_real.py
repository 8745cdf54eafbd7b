"""memguard's system reads and doctor inside real memory cgroups on this machine."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.support.cgroups import MemoryCgroup

pytestmark = [pytest.mark.cgroup, pytest.mark.usefixtures("needs_cgroup")]

LIMIT_512M = 536870912
HOG = "b = bytearray(0)\nwhile True:\n    b += bytearray(16 * 1024 * 1024)\n"


def doctor_json(group: MemoryCgroup) -> dict[str, object]:
    done = group.run([sys.executable, "-m", "memguard", "doctor", "--json"], timeout=60)
    assert done.returncode == 0, done.stderr.decode()
    result: dict[str, object] = json.loads(done.stdout)
    return result


def test_doctor_reports_the_limit_and_counts_oom_kills() -> None:
    with MemoryCgroup("512MiB") as group:
        before = doctor_json(group)
        assert before["memory_limit"] == LIMIT_512M
        assert before["oom_kills"] == 0
        assert str(before["memory_limit_source"]).startswith(str(group.path))
        assert isinstance(before["cpus"], float)
        assert "memory_usage" in before and "swap_limit" in before

        hog = group.run([sys.executable, "-c", HOG], timeout=60)
        assert hog.returncode == -9, "the hog should have been OOM-killed by the kernel"

        after = doctor_json(group)
        assert isinstance(after["oom_kills"], int) and after["oom_kills"] >= 1
        assert group.oom_kills >= 1
        assert after["memory_budget"] == LIMIT_512M
        assert any("OOM" in w for w in after["warnings"])  # type: ignore[union-attr]
    assert not group.path.exists()


def test_child_in_group_finds_its_group_and_peak() -> None:
    code = (
        "import json; from memguard import system\n"
        "b = bytearray(64 * 1024 * 1024)\n"
        "m = system.read_cgroup()\n"
        "print(json.dumps([m.info.path, m.limit, m.usage, m.peak]))\n"
    )
    with MemoryCgroup("256MiB") as group:
        done = group.run([sys.executable, "-c", code])
        assert done.returncode == 0, done.stderr.decode()
        path, limit, usage, peak = json.loads(done.stdout)
        assert path == "/" + group.path.name
        assert limit == 256 * 1024**2
        assert usage > 64 * 1024**2 and peak >= usage
        assert group.peak >= 64 * 1024**2


def test_nested_group_gets_the_parents_tighter_limit() -> None:
    code = "import json; from memguard import system; print(json.dumps(system.read_cgroup().limit))"
    with MemoryCgroup("200MiB") as parent:
        child = MemoryCgroup("1GiB", root=parent.path, name="inner")
        with child:
            done = child.run([sys.executable, "-c", code])
            assert done.returncode == 0, done.stderr.decode()
            assert json.loads(done.stdout) == 200 * 1024**2
        assert not Path(child.path).exists()


def test_doctor_pid_reports_the_masters_cgroup_and_workers(repo: Path) -> None:
    from memguard.cli import doctor
    from tests.support.servers import serve

    with MemoryCgroup("300MiB") as group:
        with serve("gunicorn", "tests.apps.hello:wsgi_app", ["-w", "2"], cwd=repo,
                   cgroup=group) as server:
            server.wait_for_workers(2)
            report = doctor.collect(pid=server.pid)
            assert report["memory_limit"] == 300 * 1024**2
            assert report["cgroup"]["path"] == "/" + group.path.name
            assert len(report["gunicorn"][0]["processes"]) == 3
