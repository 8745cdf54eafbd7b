"""The display-name sanitiser: property tests over any input, and the known attacks."""

from __future__ import annotations

import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memguard.uploads.filenames import MAX_DISPLAY_NAME, display_name, is_safe_component

_BAD_CATEGORIES = {"Cc", "Cf", "Cn", "Cs", "Co", "Zl", "Zp"}

hostile_text = st.one_of(
    st.text(max_size=400),
    st.lists(st.sampled_from(list("./\\\x00\u202e\u200b\uff0f\uff0e\uff3c:CONaux \t\n")
                             + ["..", "../", "\u2024", "\ufe52"]), max_size=60).map("".join),
    st.binary(max_size=300),
)


def assert_safe(name: str, max_length: int = MAX_DISPLAY_NAME) -> None:
    assert "/" not in name and "\\" not in name and "\x00" not in name
    assert not any(unicodedata.category(c) in _BAD_CATEGORIES for c in name), repr(name)
    assert len(name) <= max_length and len(name.encode("utf-8")) <= max_length
    assert name not in (".", "..")
    assert not name.startswith(".") and not name.endswith((".", " "))
    # Stable: sanitising again changes nothing (what is shown is what was checked).
    assert display_name(name, max_length=max_length) == name


@settings(max_examples=400, deadline=None)
@given(hostile_text)
def test_any_input_gives_a_safe_display_name(raw: str | bytes) -> None:
    name = display_name(raw)
    assert_safe(name)
    if name:
        assert is_safe_component(name)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300), st.integers(min_value=1, max_value=80))
def test_length_cap_holds_for_any_cap(raw: str, cap: int) -> None:
    assert_safe(display_name(raw, max_length=cap), cap)


@pytest.mark.parametrize(("raw", "expected"), [
    ("../../etc/passwd", "passwd"),
    ("/etc/shadow", "shadow"),
    ("C:\\Users\\me\\report.pdf", "report.pdf"),
    ("..", ""),
    ("....", ""),
    ("evil\u202efdp.exe", "evilfdp.exe"),  # right-to-left override removed
    ("a\x00b.txt", "ab.txt"),
    ("\uff0e\uff0e\uff0fetc\uff0fpasswd", "passwd"),  # fullwidth dots and solidus
    ("CON", "_CON"),
    ("con.txt", "_con.txt"),
    ("LPT1.tar.gz", "_LPT1.tar.gz"),
    ("what?.txt", "what_.txt"),
    ("  spaced   name .txt  ", "spaced name .txt"),
    (".bashrc", "bashrc"),
    ("résumé.pdf", "résumé.pdf"),
    (b"caf\xc3\xa9.txt", "café.txt"),
    (b"\xff\xfe.txt", "\ufffd\ufffd.txt"),
    (None, ""),
])
def test_known_names(raw: str | bytes | None, expected: str) -> None:
    assert display_name(raw) == expected


def test_long_name_keeps_its_extension_within_the_cap() -> None:
    name = display_name("a" * 5000 + ".mp4")
    assert name.endswith(".mp4") and len(name) == MAX_DISPLAY_NAME
    wide = display_name("\u6f22" * 300 + ".txt")  # 3 UTF-8 bytes each
    assert wide.endswith(".txt") and len(wide.encode()) <= MAX_DISPLAY_NAME


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "a\\b", "a\x00b", "a\nb", "x" * 256])
def test_unsafe_components(name: str) -> None:
    assert not is_safe_component(name)


def test_safe_component() -> None:
    assert is_safe_component("video-1.mp4")


@settings(max_examples=150, deadline=None)
@given(st.one_of(st.binary(min_size=1, max_size=300),
                 st.text(min_size=1, max_size=200).map(lambda t: t.encode("utf-8"))))
def test_saving_never_escapes_the_directory(raw: bytes) -> None:
    """Any bytes as a multipart filename (headers are latin-1 text; quotes and line
    breaks are what HTTP cannot carry), stored under a name derived from it: the file
    lands in the directory, under a safe name, and nothing appears anywhere else."""
    import asyncio
    import tempfile
    from pathlib import Path

    from memguard.uploads import save_multipart

    filename = raw.replace(b'"', b"").replace(b"\r", b"").replace(b"\n", b"")
    body = (b'--b0\r\nContent-Disposition: form-data; name="f"; filename="' + filename
            + b'"\r\n\r\ndata\r\n--b0--\r\n')
    scope = {"type": "http", "headers": [(b"content-type", b"multipart/form-data; boundary=b0")]}

    async def receive() -> dict[str, object]:
        return {"type": "http.request", "body": body, "more_body": False}

    with tempfile.TemporaryDirectory() as root:
        target = Path(root) / "a" / "b"
        target.mkdir(parents=True)
        result = asyncio.run(save_multipart(
            scope, target, receive=receive, name=lambda _f, shown, _t: shown or "unnamed"))
        (saved,) = result.files
        assert saved.path.parent == target
        assert_safe(saved.filename)
        assert sorted(p for p in Path(root).rglob("*") if p.is_file()) == [saved.path]
        assert saved.path.read_bytes() == b"data"
