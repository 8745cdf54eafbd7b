"""Generated docs are never hand-edited: they must match what the code generates."""

from __future__ import annotations

from pathlib import Path

import pytest

from memguard import cli, config


def test_options_reference_is_current(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["options", "--markdown"]) == 0
    generated = capsys.readouterr().out
    assert generated == config.reference_markdown()
    committed = (repo / "docs" / "options.md").read_text()
    assert committed == generated, (
        "docs/options.md is stale: it is generated from memguard/config.py. "
        "Regenerate it with `make docs` and commit the result; never edit it by hand."
    )


def test_options_listing(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["options"]) == 0
    out = capsys.readouterr().out
    for s in config.SETTINGS.values():
        assert f"{s.section}.{s.name} = " in out and s.doc in out
    if not config.SETTINGS:
        assert out == "no options declared yet\n"
