"""``memguard report`` on event logs written by a real gunicorn (tests/apps/timeline_*)."""

from __future__ import annotations

from pathlib import Path

import pytest

from memguard import cli
from memguard.cli import report
from tests.apps.timeline_run import run

pytestmark = pytest.mark.server

MiB = 1024 * 1024


def test_report_of_a_real_gunicorn_run(tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    events = tmp_path / "events.jsonl"
    observed = run(events, seconds=5, workers=2, clients=2, soft_limit="48MiB", refusals=2)
    assert observed.failures == 0
    timeline = report.load(events)
    summary = report.summarize(timeline)
    assert summary["unreadable_lines"] == 0  # concurrent appends from every process
    # The workers recycled themselves on their limit, and the report saw each one.
    assert summary["recycles"] >= 2
    assert set(summary["recycles_by_reason"]) == {"worker_memory_limit"}
    recycled = {p.pid for p in timeline.workers if p.end == "recycled"}
    assert len(recycled) == summary["recycles"]
    for pid in recycled:
        assert timeline.processes[pid].peak("uss") > 48 * MiB  # type: ignore[operator]
    # Refusals counted as the clients saw them.
    assert summary["refusals_by_status_reason"] == {
        "413 body_too_large": observed.statuses[413],
        "415 unsupported_media_type": observed.statuses[415]}
    assert observed.statuses[413] == observed.statuses[415] == 2
    # Every worker that answered is in the timeline, sampled; slots stay at two.
    assert observed.pids <= {p.pid for p in timeline.workers}
    assert all(timeline.processes[pid].times for pid in observed.pids)
    assert timeline.max_concurrent_workers() <= 3  # a replacement may boot as one drains
    assert {p.slot for p in timeline.workers} == {0, 1}
    assert len(timeline.masters) == 1 and summary["oom_kills"] == 0
    assert summary["limits"]["worker_memory_limit"] == 48 * MiB
    out = tmp_path / "timeline.png"
    assert cli.main(["report", str(events), "--out", str(out)]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert f"recycles    {summary['recycles']}" in capsys.readouterr().out


def test_report_shows_a_real_oom_kill(tmp_path: Path, needs_cgroup: None) -> None:
    events = tmp_path / "events.jsonl"
    observed = run(events, seconds=5, workers=2, clients=2, soft_limit="48MiB",
                   cgroup="256MiB", bloat_mib=400, refusals=1)
    assert observed.cgroup_oom_kills == 1
    assert observed.failures == 1  # the /bloat request, whose worker the kernel killed
    timeline = report.load(events)
    (kill,) = timeline.oom_kills
    assert timeline.processes[kill.pid].end == "oom_killed"
    assert timeline.processes[kill.pid].role == "worker"
    assert timeline.limits["cgroup_limit"] == 256 * MiB
    fig = report.figure(timeline)
    labels = [t.get_text() for t in fig.axes[-1].get_yticklabels()]
    assert "OOM kills (1)" in labels
