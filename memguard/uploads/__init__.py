"""Streaming saves: a request body, or the files of a multipart form, straight to disk.

``await request.body()`` holds a whole upload in memory (twice, measured: 1.38 GB of RSS
for a 652 MB body). These calls hold about five write batches (1 MiB each by
default) of one upload at most::

    saved = await save_body(request, "/data/video.mp4")           # ASGI
    result = await save_multipart(request, "/data/uploads/")      # result.fields, .files
    saved = save_body_wsgi(request.environ, "/data/video.mp4")    # Flask, Django WSGI

Each file is written to a temporary file in its destination's directory, hashed with
SHA-256 on the way, fsynced if asked (``upload_fsync``, off by default) and given its name
atomically; on a client disconnect, a limit, an exception or a cancellation, nothing is
left behind (see :mod:`memguard.uploads.spool`). In ASGI apps the writes run in
writer threads, up to three batches in flight while the next is received, so the event
loop never waits for the disk (only a few metadata calls, ``stat`` and ``statvfs``, run
on it at the start).
Multipart bodies are read with python-multipart (``memguard-web[multipart]``) through
:mod:`memguard.uploads.formparts`, which applies the part caps.

A refusal is a :class:`~memguard.errors.RequestRejected` with its HTTP status (413 too
large, 400 malformed, 408 parse budget, 411 no length, 415 not multipart, 507 storage):
``MemGuardMiddleware`` turns it into the response; without the middleware, catch it.
Every refusal is logged on ``memguard.uploads`` with its reason code and figures and
counted (``counters.get("uploads", reason)``).

A client's file name is never used as a path: multipart files get generated names
(or names from the caller's ``name=`` function, which must be one plain component) and
the client's name is kept, sanitised, as :attr:`SavedFile.filename` for display.
"""

from memguard.uploads.saving import (
    MultipartResult,
    SavedFile,
    save_body,
    save_body_wsgi,
    save_multipart,
    save_multipart_wsgi,
)

__all__ = [
    "MultipartResult",
    "SavedFile",
    "save_body",
    "save_body_wsgi",
    "save_multipart",
    "save_multipart_wsgi",
]
