"""Regression tests for issue 16's upload defects: the fields' memory budget, overwrite
that never loses the old file, storage refusals without asyncio error records."""

from __future__ import annotations

import pytest

from memguard.errors import BodyTooLarge
from memguard.uploads import save_multipart, save_multipart_wsgi
from tests import test_uploads
from tests.test_uploads import CT, Feed, environ_for, form_body, listing, run, split

updir = test_uploads.updir  # the fixtures, shared
temp_mode = test_uploads.temp_mode

KIB = 1024
MIB = 1024 * KIB

# ---- defect 2: the non-file fields of one form have a memory budget --------------------


def wide_field(size: int) -> bytes:
    """``size`` bytes of UTF-8 whose one character beyond Latin-1 makes CPython store the
    whole string at four bytes per character."""
    return b"a" * (size - 4) + "\U0001f600".encode()


def multipart(form: bytes, directory: object, wsgi: bool, **options: object) -> object:
    if wsgi:
        return save_multipart_wsgi(environ_for(form, ctype=CT), directory,  # type: ignore[arg-type]
                                   **options)
    return run(save_multipart({"type": "http", "headers": [(b"content-type", CT.encode())]},
                              directory, receive=Feed(split(form)),  # type: ignore[arg-type]
                              **options))


@pytest.mark.parametrize("wsgi", [False, True], ids=["asgi", "wsgi"])
def test_fields_are_counted_at_the_memory_their_strings_take(updir: object, wsgi: bool) -> None:
    # Fields of 1 MiB, each with one emoji: 4 MiB of strings each (the issue: 64 of them
    # held 256 MiB from a 64 MiB body).
    form = form_body(*[(f"f{i}", None, wide_field(MIB)) for i in range(8)])
    with pytest.raises(BodyTooLarge) as info:
        multipart(form, updir, wsgi)
    assert info.value.status == 413 and info.value.reason == "fields_over_memory_limit"
    assert info.value.figures["limit"] == 4 * MIB
    assert info.value.figures["fields"] == 1  # the first field already takes 4 MiB
    assert listing(updir) == []  # type: ignore[arg-type]


@pytest.mark.parametrize("wsgi", [False, True], ids=["asgi", "wsgi"])
def test_the_budget_is_a_total_over_every_field(updir: object, wsgi: bool) -> None:
    ascii_fields = [(f"f{i}", None, b"a" * 900 * KIB) for i in range(4)]
    result = multipart(form_body(*ascii_fields), updir, wsgi)  # 3.5 MiB: under 4 MiB
    assert len(result.fields) == 4  # type: ignore[attr-defined]
    with pytest.raises(BodyTooLarge) as info:
        multipart(form_body(*ascii_fields, ("last", None, b"a" * 900 * KIB)), updir, wsgi)
    assert info.value.reason == "fields_over_memory_limit"
    # Refused while the fifth field arrives, before its bytes are all held.
    assert info.value.figures["fields"] == 5
    result = multipart(form_body(*ascii_fields, ("last", None, b"a" * 900 * KIB)), updir,
                       wsgi, max_fields_memory="5MiB")
    assert len(result.fields) == 5  # type: ignore[attr-defined]
