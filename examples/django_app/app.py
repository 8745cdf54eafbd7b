"""A one-file Django project guarded by memguard (WSGI and ASGI application objects).

Run it: ``gunicorn -c examples/django_app/gunicorn.conf.py examples.django_app.app:application``
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import django
from django.conf import settings

UPLOAD_DIR = Path(os.environ.get("UPLOAD_DIR", "/tmp/memguard-uploads"))
LEAK_BYTES = int(os.environ.get("LEAK_BYTES", 2 * 1024 * 1024))

if not settings.configured:
    settings.configure(
        DEBUG=False,
        SECRET_KEY=os.environ.get("DJANGO_SECRET_KEY", "example-only-not-secret"),
        ALLOWED_HOSTS=["127.0.0.1", "localhost"],
        ROOT_URLCONF=__name__,
        MIDDLEWARE=[],
        INSTALLED_APPS=[],
        # Django refuses bigger non-file bodies itself; memguard's limits apply first.
        DATA_UPLOAD_MAX_MEMORY_SIZE=16 * 1024 * 1024,
    )
    django.setup()

from django.http import HttpRequest, JsonResponse  # noqa: E402
from django.urls import path  # noqa: E402
from django.views.decorators.csrf import csrf_exempt  # noqa: E402

from memguard import MemGuardWSGIMiddleware  # noqa: E402
from memguard.uploads import save_body_wsgi  # noqa: E402

_kept: list[bytearray] = []


def index(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"pid": os.getpid(), "kept_mib": len(_kept) * LEAK_BYTES // 2**20})


@csrf_exempt
def upload(request: HttpRequest) -> JsonResponse:
    """Stream the body to disk before Django reads it (request.environ is untouched)."""
    UPLOAD_DIR.mkdir(parents=True, exist_ok=True)
    saved = save_body_wsgi(request.environ, UPLOAD_DIR / f"{uuid.uuid4().hex}.bin")
    return JsonResponse({"size": saved.size, "sha256": saved.sha256,
                         "name": saved.path.name})


@csrf_exempt
def naive(request: HttpRequest) -> JsonResponse:
    """The trap: the whole body in memory."""
    return JsonResponse({"size": len(request.body)})


def leak(request: HttpRequest) -> JsonResponse:
    """A deliberately leaky endpoint: keeps LEAK_BYTES per request."""
    _kept.append(bytearray(LEAK_BYTES))
    return JsonResponse({"pid": os.getpid(), "kept_mib": len(_kept) * LEAK_BYTES // 2**20})


urlpatterns = [
    path("", index),
    path("upload", upload),
    path("naive", naive),
    path("leak", leak),
]

from django.core.wsgi import get_wsgi_application  # noqa: E402

application = MemGuardWSGIMiddleware(
    get_wsgi_application(),
    max_body_size="16MiB",
    routes={"/upload": "8GiB", "/naive": "1GiB"},
)
