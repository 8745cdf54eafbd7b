"""``memguard report``: the event log read back, summarized and drawn."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from memguard import cli
from memguard.cli import report
from tests.apps.timeline_events import MiB, Truth, synthetic_events, write_events


@pytest.fixture
def synthetic(tmp_path: Path) -> tuple[Path, Truth]:
    events, truth = synthetic_events()
    return write_events(tmp_path / "events.jsonl", events, tail='{"ts": 17900'), truth


def test_counts_peaks_and_ends_match_what_was_written(synthetic: tuple[Path, Truth]) -> None:
    path, truth = synthetic
    timeline = report.load(path)
    summary = report.summarize(timeline)
    assert summary["unreadable_lines"] == 1  # the line cut short at the end
    assert summary["metric"] == "uss"
    assert summary["recycles_by_reason"] == dict(truth.recycles)
    assert summary["refusals_by_status_reason"] == {
        f"{s} {r}": n for (s, r), n in truth.refusals.items()}
    assert summary["oom_kills"] == 1
    assert summary["samples"] == truth.samples
    assert summary["limits"] == {"worker_memory_limit": 96 * MiB, "cgroup_limit": 512 * MiB}
    rows = {p["pid"]: p for p in summary["processes"]}
    assert rows[truth.master]["role"] == "master"
    workers = {pid: row for pid, row in rows.items() if row["role"] == "worker"}
    assert {pid: row["peak_uss"] for pid, row in workers.items()} == truth.peaks
    # The kill is charged to the worker the master named, not to the master.
    (killed,) = truth.oom_killed
    assert rows[killed]["end"] == "oom_killed"
    assert sum(row["end"] == "recycled" for row in workers.values()) == sum(
        truth.recycles.values())
    # A replacement takes the slot of the worker it replaced.
    assert {pid: row["slot"] - 1 for pid, row in workers.items()} == truth.slots
    assert summary["max_concurrent_workers"] == 3


def test_summary_text_names_every_count(synthetic: tuple[Path, Truth]) -> None:
    path, truth = synthetic
    text = report.render_summary(report.summarize(report.load(path)))
    assert "1 unreadable line skipped" in text
    assert f"recycles    {sum(truth.recycles.values())}" in text
    assert "413 body_too_large: " in text and "OOM kills   1" in text
    assert "worker_memory_limit 96.0 MiB" in text
    assert re.search(r"^\s+1005\s+worker\s+1 .* oom_killed$", text, re.M)


def test_total_drops_when_a_worker_is_gone() -> None:
    # Samples may follow a recycle decision while the worker drains: it still leaves
    # the sum once it is gone.
    lines = [json.dumps(e) for e in [
        {"ts": 0, "kind": "sample", "pid": 1, "role": "worker", "pss": 10 * MiB},
        {"ts": 0, "kind": "sample", "pid": 2, "role": "worker", "pss": 20 * MiB},
        {"ts": 1, "kind": "recycle", "pid": 1, "reason": "worker_memory_limit"},
        {"ts": 1.5, "kind": "sample", "pid": 1, "role": "worker", "pss": 12 * MiB},
        {"ts": 2, "kind": "sample", "pid": 3, "role": "worker", "pss": 5 * MiB},
        {"ts": 3, "kind": "sample", "pid": 2, "role": "worker", "pss": 21 * MiB},
    ]]
    timeline = report.parse_events(lines)
    xs, ys = timeline.total_series("pss")
    assert xs == [0, 0, 1.5, 1.5, 2, 3]
    assert ys == [n * MiB for n in (10, 30, 32, 20, 25, 26)]
    assert timeline.processes[1].end == "recycled" and timeline.processes[1].last == 1.5
    assert timeline.processes[3].slot == timeline.processes[1].slot


def test_a_worker_known_only_by_its_exit_lived_an_instant() -> None:
    """A replacement stopped while it booted (the pool shutting down) has no start and no
    sample: it counts as alive at its exit, not from the log's first line."""
    lines = [json.dumps(e) for e in [
        {"ts": 0, "kind": "worker_start", "pid": 1, "role": "worker"},
        {"ts": 0, "kind": "worker_start", "pid": 2, "role": "worker"},
        {"ts": 1, "kind": "worker_start", "pid": 3, "role": "worker"},
        {"ts": 2, "kind": "worker_exit", "pid": 1, "reason": "recycled"},
        {"ts": 3, "kind": "worker_exit", "pid": 4, "reason": "shutdown"},
        {"ts": 4, "kind": "worker_exit", "pid": 2, "reason": "shutdown"},
        {"ts": 4, "kind": "worker_exit", "pid": 3, "reason": "shutdown"},
    ]]
    timeline = report.parse_events(lines)
    assert timeline.processes[4].first == timeline.processes[4].last == 3
    assert timeline.max_concurrent_workers() == 3


def test_metric_choice_and_limit_forms() -> None:
    lines = [json.dumps(e) for e in [
        {"ts": 5, "kind": "sample", "pid": 1, "rss": 30 * MiB},
        {"ts": 6, "kind": "sample", "pid": 1, "rss": 31 * MiB},
        {"ts": 6, "kind": "limit", "pid": 9, "name": "total_memory_limit", "value": 400 * MiB},
        {"ts": 6, "kind": "limit", "pid": 9, "worker_memory_hard_limit": 100 * MiB,
         "note": "text is not a limit"},
        {"ts": 7, "kind": "refusal", "pid": 1, "status": 503, "reason": "memory_pressure"},
        {"ts": 8, "kind": "something_new", "pid": 1},
    ]]
    timeline = report.parse_events(lines)
    assert timeline.metric() == "rss"  # only RSS was sampled
    assert timeline.metric("pss") == "pss"
    with pytest.raises(report.ReportError, match="unknown metric 'vms'"):
        timeline.metric("vms")
    assert timeline.limits == {"total_memory_limit": 400 * MiB,
                               "worker_memory_hard_limit": 100 * MiB}
    assert timeline.worker_limits() == {"worker_memory_hard_limit": 100 * MiB}
    assert timeline.duration == 3 and timeline.kinds["something_new"] == 1
    assert report.summarize(timeline)["refusals_by_status_reason"] == {
        "503 memory_pressure": 1}


def test_bad_logs_get_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(report.ReportError, match="no such event log.*MEMGUARD_EVENTS"):
        report.load(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('not json\n[1, 2]\n{"kind": "sample"}\n\n')
    with pytest.raises(report.ReportError, match=r"no events \(3 unreadable lines\)"):
        report.load(bad)


def test_png_svg_and_self_contained_html(synthetic: tuple[Path, Truth],
                                         tmp_path: Path) -> None:
    path, _ = synthetic
    timeline = report.load(path)
    png = report.draw(timeline, tmp_path / "t.png")
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width == 1200 and 600 <= height <= 1100
    assert len(data) < 200_000
    svg = report.draw(timeline, tmp_path / "t.svg").read_text()
    assert svg.lstrip().startswith("<?xml") and "<svg" in svg
    page = report.draw(timeline, tmp_path / "t.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "<svg" in page
    assert "recycles    6" in page  # the summary travels with the picture
    # Nothing fetched from anywhere: no scripts, no external sources or links.
    assert "<script" not in page
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    with pytest.raises(report.ReportError, match="unknown picture format '.jpg'"):
        report.draw(timeline, tmp_path / "t.jpg")


def test_figure_draws_each_process_and_each_event(synthetic: tuple[Path, Truth]) -> None:
    path, truth = synthetic
    timeline = report.load(path)
    fig = report.figure(timeline)
    ax_mem, ax_total, ax_events = fig.axes
    # One line per worker process plus the master, plus one per limit.
    limit_lines = [ln for ln in ax_mem.get_lines() if "limit" in ln.get_label()]
    assert len(limit_lines) == 1
    assert len(ax_mem.get_lines()) == len(truth.peaks) + 1 + 1
    markers = sum(len(c.get_offsets()) for c in ax_mem.collections)
    assert markers == sum(truth.recycles.values()) + 1  # recycles + the OOM kill
    lane = sum(len(c.get_offsets()) for c in ax_events.collections)
    assert lane == len(timeline.recycles) + len(timeline.refusals) + 1
    labels = [t.get_text() for t in ax_events.get_yticklabels()]
    assert "OOM kills (1)" in labels and any(lb.startswith("413 body_too_large") for lb in labels)
    assert "cgroup limit: 512 MiB" in [ln.get_label() for ln in ax_total.get_lines()]
    assert "10 worker processes, 6 recycles" in fig.get_suptitle()


def test_missing_matplotlib_names_the_extra(synthetic: tuple[Path, Truth], tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    path, _ = synthetic
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(report.ReportError, match=r'pip install "memguard-web\[plot\]"'):
        report.draw(report.load(path), tmp_path / "t.png")
    assert cli.main(["report", str(path), "--out", str(tmp_path / "t.png")]) == 2
    assert 'pip install "memguard-web[plot]"' in capsys.readouterr().err
    assert not (tmp_path / "t.png").exists()
    # The summary needs no matplotlib.
    assert cli.main(["report", str(path)]) == 0
    assert "OOM kills   1" in capsys.readouterr().out


def test_cli_report(synthetic: tuple[Path, Truth], tmp_path: Path,
                    capsys: pytest.CaptureFixture[str]) -> None:
    path, _ = synthetic
    assert cli.main(["report", str(path), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["oom_kills"] == 1 and summary["workers"] == 10
    out = tmp_path / "timeline.html"
    assert cli.main(["report", str(path), "--out", str(out), "--metric", "pss",
                     "--title", "staging, Tuesday"]) == 0
    captured = capsys.readouterr()
    assert "peak memory per process" in captured.out and f"wrote {out}" in captured.err
    assert "staging, Tuesday" in out.read_text()
    assert cli.main(["report", str(tmp_path / "nope.jsonl")]) == 2
    assert "no such event log" in capsys.readouterr().err


def test_a_worker_line_ends_at_its_exit_but_the_total_keeps_its_shutdown() -> None:
    lines = [json.dumps(e) for e in [
        {"ts": 0, "kind": "sample", "pid": 1, "role": "worker", "uss": 60 * MiB},
        {"ts": 1, "kind": "recycle", "pid": 1, "reason": "worker_memory_limit"},
        {"ts": 1.1, "kind": "worker_exit", "pid": 1},
        {"ts": 1.2, "kind": "sample", "pid": 9, "worker_pid": 1, "role": "worker",
         "uss": 70 * MiB},
    ]]
    timeline = report.parse_events(lines)
    worker = timeline.processes[1]
    assert worker.series("uss", drawn=True) == ([0.0], [60 * MiB])
    assert worker.series("uss") == ([0.0, 1.2], [60 * MiB, 70 * MiB])
    assert worker.peak("uss") == 70 * MiB and worker.end == "recycled" and worker.ended == 1
    assert timeline.total_series("uss")[1][-2:] == [70 * MiB, 0]
