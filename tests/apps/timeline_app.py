"""A WSGI app that leaks, refuses and recycles itself, writing memguard events.

It stands in for what the middleware and the gunicorn integration will do, so that
``memguard report`` is tested on a log written by a real gunicorn: every ``/leak``
request keeps some MiB for good and samples the worker's memory; past its soft limit
(on USS, as memguard decides) the worker asks :func:`memguard.recycle.request_recycle`
for a graceful recycle, which :mod:`tests.apps.timeline_conf` carries out. ``/upload``
refuses bodies over a limit (413) and bodies that are not octet-streams (415) without
reading them. ``/bloat`` allocates a lot at once (an OOM kill inside a memory cgroup).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any
from urllib.parse import parse_qs

from memguard import events, system
from memguard.recycle import request_recycle
from memguard.sizes import parse_size

MiB = 1024 * 1024
SOFT_LIMIT = parse_size(os.environ.get("TIMELINE_SOFT_LIMIT", "64MiB"))
UPLOAD_LIMIT = parse_size(os.environ.get("TIMELINE_UPLOAD_LIMIT", "1MiB"))

_kept: list[bytes] = []


def _respond(start_response: Any, status: str, text: str) -> list[bytes]:
    body = f"{text} pid={os.getpid()}\n".encode()
    start_response(status, [("Content-Type", "text/plain"),
                            ("Content-Length", str(len(body)))])
    return [body]


def sample() -> system.ProcessMemory:
    mem = system.process_memory(os.getpid())
    events.emit("sample", role="worker", rss=mem.rss, uss=mem.uss, pss=mem.pss)
    return mem


def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
    path = environ.get("PATH_INFO", "/")
    query = parse_qs(environ.get("QUERY_STRING", ""))
    if path == "/leak":
        mib = float(query.get("mib", ["4"])[0])
        # Written, not calloc'ed: untouched zero pages would not be resident.
        _kept.append(b"\x01" * int(mib * MiB))
        mem = sample()
        uss = mem.uss if mem.uss is not None else mem.rss
        if uss > SOFT_LIMIT:
            request_recycle("worker_memory_limit", uss=uss, limit=SOFT_LIMIT)
        return _respond(start_response, "200 OK", f"kept {len(_kept)} blocks")
    if path == "/bloat":
        mib = int(query.get("mib", ["512"])[0])
        # In steps, sampled, as a request that reads a big body into memory grows.
        for _ in range(0, mib, 32):
            _kept.append(b"\x01" * (32 * MiB))
            sample()
        return _respond(start_response, "200 OK", "survived")
    if path == "/upload":
        length = int(environ.get("CONTENT_LENGTH") or 0)
        ctype = environ.get("CONTENT_TYPE", "")
        if ctype != "application/octet-stream":
            events.emit("refusal", status=415, reason="unsupported_media_type",
                        content_type=ctype)
            return _respond(start_response, "415 Unsupported Media Type", "refused")
        if length > UPLOAD_LIMIT:
            events.emit("refusal", status=413, reason="body_too_large",
                        content_length=length, limit=UPLOAD_LIMIT)
            return _respond(start_response, "413 Content Too Large", "refused")
        environ["wsgi.input"].read(length)
        return _respond(start_response, "200 OK", f"read {length}")
    return _respond(start_response, "200 OK", "hello")
