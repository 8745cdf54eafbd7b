"""A Flask app guarded by memguard: a streamed upload, a naive upload, a leaky route.

Run it: ``gunicorn -c examples/flask_app/gunicorn.conf.py examples.flask_app.app:app``
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

from flask import Flask, request

from memguard import MemGuardWSGIMiddleware
from memguard.uploads import save_body_wsgi, save_multipart_wsgi

UPLOAD_DIR = Path(os.environ.get("UPLOAD_DIR", "/tmp/memguard-uploads"))
LEAK_BYTES = int(os.environ.get("LEAK_BYTES", 2 * 1024 * 1024))

_kept: list[bytearray] = []

flask_app = Flask(__name__)


@flask_app.get("/")
def index() -> dict[str, Any]:
    return {"pid": os.getpid(), "kept_mib": len(_kept) * LEAK_BYTES // 2**20}


@flask_app.post("/upload")
def upload() -> dict[str, Any]:
    """Stream a body of any size to disk, before Flask reads it."""
    UPLOAD_DIR.mkdir(parents=True, exist_ok=True)
    saved = save_body_wsgi(request.environ, UPLOAD_DIR / f"{uuid.uuid4().hex}.bin")
    return {"size": saved.size, "sha256": saved.sha256, "name": saved.path.name}


@flask_app.post("/upload-form")
def upload_form() -> dict[str, Any]:
    UPLOAD_DIR.mkdir(parents=True, exist_ok=True)
    result = save_multipart_wsgi(request.environ, UPLOAD_DIR)
    return {
        "fields": result.fields,
        "files": [{"filename": f.filename, "size": f.size, "sha256": f.sha256}
                  for f in result.files],
    }


@flask_app.post("/naive")
def naive() -> dict[str, Any]:
    """The trap: the whole body in memory."""
    return {"size": len(request.get_data())}


@flask_app.get("/leak")
def leak() -> dict[str, Any]:
    """A deliberately leaky endpoint: keeps LEAK_BYTES per request."""
    _kept.append(bytearray(LEAK_BYTES))
    return {"pid": os.getpid(), "kept_mib": len(_kept) * LEAK_BYTES // 2**20}


app = MemGuardWSGIMiddleware(
    flask_app,
    max_body_size="16MiB",
    routes={"/upload": "8GiB", "/upload-form": "8GiB", "/naive": "1GiB"},
)
