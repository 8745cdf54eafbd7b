"""The option registry: each setting declared once, typed section objects built from it."""

from __future__ import annotations

import dataclasses

import pytest

from memguard import config
from memguard.config import UploadOptions


def test_upload_options_are_the_uploads_section_without_the_prefix() -> None:
    declared = {name.removeprefix("upload_") for name, s in config.SETTINGS.items()
                if s.section == "uploads"}
    assert {f.name for f in dataclasses.fields(UploadOptions)} == declared
    defaults = UploadOptions.resolve({}, environ={})
    for name, s in config.SETTINGS.items():
        if s.section == "uploads":
            expected = s.parse(s.default) if s.default is not None else None
            assert getattr(defaults, name.removeprefix("upload_")) == expected


def test_upload_options_take_keywords_then_the_environment() -> None:
    opts = UploadOptions.resolve({"max_files": 3},
                                 environ={"MEMGUARD_UPLOAD_MAX_FILES": "7",
                                          "MEMGUARD_UPLOAD_MAX_PARTS": "9"})
    assert opts.max_files == 3 and opts.max_parts == 9
    with pytest.raises(TypeError, match="upload_max_file"):
        UploadOptions.resolve({"max_file": 1}, environ={})
