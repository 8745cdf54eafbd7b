"""The benchmark plumbing: every registered benchmark is a module with ``run(quick)``."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

from benchmarks.__main__ import BENCHMARKS


def test_registered_benchmarks_exist_and_are_documented(repo: Path) -> None:
    readme = (repo / "benchmarks" / "README.md").read_text()
    assert BENCHMARKS
    for name in BENCHMARKS:
        module = importlib.import_module(f"benchmarks.{name}")
        assert list(inspect.signature(module.run).parameters) == ["quick"]
        assert f"## {name}\n" in readme, f"benchmarks/README.md has no section for {name}"
