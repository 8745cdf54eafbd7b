"""A Django ASGI app whose upload route gets flat memory and no double write.

Django's ``ASGIHandler`` reads every request body into a ``SpooledTemporaryFile``
before any view runs: a 2 GB upload is written to a temporary file, then copied again
by the view. Wrapping the ASGI application routes uploads around that spool:
``save_body`` streams the body straight to its destination, then Django runs the view
with an empty body and the saved file in ``request.scope["memguard.saved"]`` (a scope
key: no client can forge it). Every other request goes to Django untouched.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import django
from django.conf import settings

if not settings.configured:
    settings.configure(
        DEBUG=False, SECRET_KEY="memguard-tests", ALLOWED_HOSTS=["*"],
        ROOT_URLCONF=__name__, MIDDLEWARE=[], INSTALLED_APPS=[],
    )
    django.setup()

from django.core.asgi import get_asgi_application  # noqa: E402
from django.core.wsgi import get_wsgi_application  # noqa: E402
from django.http import HttpRequest, HttpResponse, JsonResponse  # noqa: E402
from django.urls import path  # noqa: E402

from memguard.errors import RequestRejected  # noqa: E402
from memguard.uploads import SavedFile, save_body, save_body_wsgi  # noqa: E402

UPLOAD_DIR = Path(os.environ.get("UPLOAD_DIR", "/nonexistent"))
UPLOAD_PATHS = {"/upload"}


def index(request: HttpRequest) -> HttpResponse:
    return HttpResponse(f"ok {os.getpid()}\n")


def upload_done(request: HttpRequest) -> HttpResponse:
    # An ordinary Django view: auth, models, ... The body is empty; the file is on disk.
    saved: SavedFile | None = getattr(request, "scope", {}).get("memguard.saved")
    if saved is None:
        return JsonResponse({"error": "not routed through save_body"}, status=400)
    return JsonResponse({"path": str(saved.path), "size": saved.size, "sha256": saved.sha256,
                         "django_body_bytes": len(request.body)})


def wsgi_upload(request: HttpRequest) -> HttpResponse:
    # Django under WSGI: the body is still unread when the view runs (nothing here
    # touches request.POST or request.body), so save_body_wsgi streams it.
    try:
        saved = save_body_wsgi(request.environ, UPLOAD_DIR / os.urandom(8).hex())
    except RequestRejected as exc:
        return JsonResponse({"reason": exc.reason}, status=exc.status)
    return JsonResponse({"path": str(saved.path), "size": saved.size, "sha256": saved.sha256})


urlpatterns = [path("", index), path("upload", upload_done),
               path("wsgi-upload", wsgi_upload)]

django_application = get_asgi_application()
wsgi_application = get_wsgi_application()


async def application(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http" or scope["path"] not in UPLOAD_PATHS \
            or scope["method"] not in ("POST", "PUT"):
        await django_application(scope, receive, send)
        return
    name = os.urandom(8).hex()
    try:
        saved = await save_body(scope, UPLOAD_DIR / name, receive=receive)
    except RequestRejected as exc:
        body = json.dumps({"reason": exc.reason}).encode()
        await send({"type": "http.response.start", "status": exc.status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})
        return
    sent_empty = False

    async def empty_body() -> dict[str, Any]:
        nonlocal sent_empty
        if not sent_empty:
            sent_empty = True
            return {"type": "http.request", "body": b"", "more_body": False}
        return await receive()  # later calls: the real disconnect

    headers = [(k, v) for k, v in scope["headers"]
               if k.lower() not in (b"content-length", b"transfer-encoding")]
    inner = dict(scope, headers=[*headers, (b"content-length", b"0")])
    inner["memguard.saved"] = saved
    await django_application(inner, empty_body, send)
