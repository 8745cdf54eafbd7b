"""A WSGI app whose every request holds ``TRANSIENT_MIB`` MiB (default 32) while it runs and
keeps none of it: what each thread of a gthread worker may need at once."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

TRANSIENT_BYTES = int(os.environ.get("TRANSIENT_MIB", "32")) * 1024 * 1024


def wsgi_app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
    # b"\x01" * n writes every page: an untouched allocation would not count in RSS.
    scratch = b"\x01" * TRANSIENT_BYTES
    body = b"%d\n" % scratch[len(scratch) // 2]
    del scratch
    start_response("200 OK", [("Content-Type", "text/plain"),
                              ("Content-Length", str(len(body)))])
    return [body]
