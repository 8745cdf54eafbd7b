"""Upload apps for the upload tests and benchmark: Starlette (ASGI) and Flask (WSGI).

``UPLOAD_DIR`` (environment) is where they save. Query parameters: ``name`` (the raw
body's file name), ``opts`` (JSON: keyword arguments for the save call). A
``RequestRejected`` is answered with its status and reason here, as the body-guard
middleware will do once it is in place.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from flask import Flask
from flask import request as flask_request
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from memguard.errors import RequestRejected
from memguard.uploads import (
    MultipartResult,
    SavedFile,
    save_body,
    save_body_wsgi,
    save_multipart,
    save_multipart_wsgi,
)

UPLOAD_DIR = Path(os.environ.get("UPLOAD_DIR", "/nonexistent"))


def saved_json(saved: SavedFile) -> dict[str, Any]:
    return {"path": str(saved.path), "size": saved.size, "sha256": saved.sha256,
            "filename": saved.filename, "content_type": saved.content_type,
            "field_name": saved.field_name}


def result_json(result: MultipartResult) -> dict[str, Any]:
    return {"fields": result.fields, "files": [saved_json(f) for f in result.files]}


def rejected_json(exc: RequestRejected) -> dict[str, Any]:
    return {"status": exc.status, "reason": exc.reason, "detail": exc.detail}


def _opts(raw: str | None) -> dict[str, Any]:
    return json.loads(raw) if raw else {}


# ---- ASGI (Starlette) ----------------------------------------------------------------


async def index(request: Request) -> Response:
    return Response(f"ok {os.getpid()}\n")


async def body(request: Request) -> Response:
    name = request.query_params.get("name", "body.bin")
    try:
        saved = await save_body(request, UPLOAD_DIR / name,
                                **_opts(request.query_params.get("opts")))
    except RequestRejected as exc:
        return JSONResponse(rejected_json(exc), status_code=exc.status,
                            headers={"connection": "close"})
    except FileExistsError:
        return JSONResponse({"reason": "exists"}, status_code=409)
    return JSONResponse(saved_json(saved))


async def form(request: Request) -> Response:
    try:
        result = await save_multipart(request, UPLOAD_DIR,
                                      **_opts(request.query_params.get("opts")))
    except RequestRejected as exc:
        return JSONResponse(rejected_json(exc), status_code=exc.status,
                            headers={"connection": "close"})
    return JSONResponse(result_json(result))


async def stream_loop(request: Request) -> Response:
    """The hand-written baseline: ``request.stream()`` written synchronously."""
    size = 0
    with open(UPLOAD_DIR / request.query_params.get("name", "loop.bin"), "wb") as f:
        async for chunk in request.stream():
            f.write(chunk)
            size += len(chunk)
    return JSONResponse({"size": size})


async def naive_body(request: Request) -> Response:
    data = await request.body()
    with open(UPLOAD_DIR / request.query_params.get("name", "naive.bin"), "wb") as f:
        f.write(data)
    return JSONResponse({"size": len(data)})


async def starlette_form(request: Request) -> Response:
    """Starlette's own multipart path: UploadFile (spooled to a temp file), then copied."""
    sizes = []
    async with request.form(max_part_size=1024 * 1024) as data:
        for value in data.values():
            if hasattr(value, "read"):
                size = 0
                with open(UPLOAD_DIR / f"starlette-{len(sizes)}.bin", "wb") as f:
                    while chunk := await value.read(1024 * 1024):
                        f.write(chunk)
                        size += len(chunk)
                sizes.append(size)
    return JSONResponse({"sizes": sizes})


app = Starlette(routes=[
    Route("/", index),
    Route("/body", body, methods=["POST", "PUT"]),
    Route("/form", form, methods=["POST"]),
    Route("/loop", stream_loop, methods=["POST"]),
    Route("/naive", naive_body, methods=["POST"]),
    Route("/starlette-form", starlette_form, methods=["POST"]),
])


# ---- WSGI (Flask) --------------------------------------------------------------------

flask_app = Flask(__name__)


@flask_app.get("/")
def flask_index() -> str:
    return f"ok {os.getpid()}\n"


@flask_app.route("/body", methods=["POST", "PUT"])
def flask_body() -> Any:
    name = flask_request.args.get("name", "body.bin")
    try:
        saved = save_body_wsgi(flask_request.environ, UPLOAD_DIR / name,
                               **_opts(flask_request.args.get("opts")))
    except RequestRejected as exc:
        return rejected_json(exc), exc.status, {"Connection": "close"}
    except FileExistsError:
        return {"reason": "exists"}, 409
    return saved_json(saved)


@flask_app.post("/form")
def flask_form() -> Any:
    try:
        result = save_multipart_wsgi(flask_request.environ, UPLOAD_DIR,
                                     **_opts(flask_request.args.get("opts")))
    except RequestRejected as exc:
        return rejected_json(exc), exc.status, {"Connection": "close"}
    return result_json(result)


# ---- under the body guard: no try/except, the middleware answers refusals -------------

GUARD_ROUTES = {"/g/body": "300MiB", "/g/form": "300MiB", "/g/drain": "300MiB",
                "/g/small": "2MiB"}


async def guarded_body(request: Request) -> Response:
    saved = await save_body(request, UPLOAD_DIR / request.query_params.get("name", "g.bin"),
                            **_opts(request.query_params.get("opts")))
    return JSONResponse(saved_json(saved))


async def guarded_form(request: Request) -> Response:
    result = await save_multipart(request, UPLOAD_DIR, **_opts(request.query_params.get("opts")))
    return JSONResponse(result_json(result))


async def guarded_drain(request: Request) -> Response:
    """Reads the body and keeps none of it: what a server costs by itself for a body."""
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
    return JSONResponse({"size": size})


def _guarded_asgi() -> Any:
    from memguard import MemGuardMiddleware

    inner = Starlette(routes=[
        Route("/", index),
        Route("/g/body", guarded_body, methods=["POST"]),
        Route("/g/small", guarded_body, methods=["POST"]),
        Route("/g/form", guarded_form, methods=["POST"]),
        Route("/g/drain", guarded_drain, methods=["POST"]),
    ])
    return MemGuardMiddleware(inner, max_body_size="1MiB", routes=GUARD_ROUTES)


guarded_app = _guarded_asgi()

guarded_flask = Flask("guarded")


@guarded_flask.get("/")
def guarded_flask_index() -> str:
    return f"ok {os.getpid()}\n"


@guarded_flask.post("/g/body")
@guarded_flask.post("/g/small")
def guarded_flask_body() -> Any:
    saved = save_body_wsgi(flask_request.environ,
                           UPLOAD_DIR / flask_request.args.get("name", "g.bin"),
                           **_opts(flask_request.args.get("opts")))
    return saved_json(saved)


@guarded_flask.post("/g/form")
def guarded_flask_form() -> Any:
    result = save_multipart_wsgi(flask_request.environ, UPLOAD_DIR,
                                 **_opts(flask_request.args.get("opts")))
    return result_json(result)


def _guarded_wsgi() -> Any:
    from memguard import MemGuardWSGIMiddleware

    return MemGuardWSGIMiddleware(guarded_flask.wsgi_app, max_body_size="1MiB",
                                  routes=GUARD_ROUTES)


guarded_wsgi = _guarded_wsgi()
