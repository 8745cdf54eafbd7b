"""A FastAPI app guarded by memguard: streamed uploads, a naive upload, a leaky route.

Run it: ``gunicorn -c examples/fastapi_app/gunicorn.conf.py examples.fastapi_app.app:app``
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request

from memguard import MemGuardMiddleware
from memguard.uploads import save_body, save_multipart

UPLOAD_DIR = Path(os.environ.get("UPLOAD_DIR", "/tmp/memguard-uploads"))
LEAK_BYTES = int(os.environ.get("LEAK_BYTES", 2 * 1024 * 1024))

# What the leaky route keeps forever (a cache without a bound, in real life).
_kept: list[bytearray] = []

api = FastAPI(title="memguard FastAPI example")


@api.get("/")
async def index() -> dict[str, Any]:
    return {"pid": os.getpid(), "kept_mib": len(_kept) * LEAK_BYTES // 2**20}


@api.post("/upload")
async def upload(request: Request) -> dict[str, Any]:
    """Stream a body of any size to disk: flat memory, SHA-256 on the way."""
    UPLOAD_DIR.mkdir(parents=True, exist_ok=True)
    # The server names the file; a client's name is never a path.
    saved = await save_body(request, UPLOAD_DIR / f"{uuid.uuid4().hex}.bin")
    return {"size": saved.size, "sha256": saved.sha256, "name": saved.path.name}


@api.post("/upload-form")
async def upload_form(request: Request) -> dict[str, Any]:
    """A multipart form: files go to disk under generated names."""
    UPLOAD_DIR.mkdir(parents=True, exist_ok=True)
    result = await save_multipart(request, UPLOAD_DIR)
    return {
        "fields": result.fields,
        "files": [{"filename": f.filename, "size": f.size, "sha256": f.sha256}
                  for f in result.files],
    }


@api.post("/naive")
async def naive(request: Request) -> dict[str, Any]:
    """The trap memguard guards: the whole body in memory (twice, in Starlette)."""
    body = await request.body()
    return {"size": len(body)}


@api.get("/leak")
def leak() -> dict[str, Any]:
    """A deliberately leaky endpoint: keeps LEAK_BYTES per request."""
    _kept.append(bytearray(LEAK_BYTES))
    return {"pid": os.getpid(), "kept_mib": len(_kept) * LEAK_BYTES // 2**20}


app = MemGuardMiddleware(
    api,
    max_body_size="16MiB",
    routes={"/upload": "8GiB", "/upload-form": "8GiB", "/naive": "1GiB"},
    # For a load balancer or Kubernetes: 503 under memory pressure, never over liveness.
    readiness_path="/readyz",
    liveness_path="/livez",
    # Prometheus (set PROMETHEUS_MULTIPROC_DIR under gunicorn): refusals, recycles,
    # per-route memory growth, per-worker memory.
    metrics_path="/metrics",
)
