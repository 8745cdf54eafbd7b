"""A minimal Django project in one module, for the body-guard tests (ASGI and WSGI)."""

from __future__ import annotations

import hashlib

from django.conf import settings

if not settings.configured:
    settings.configure(
        DEBUG=False,
        SECRET_KEY="memguard-tests",
        ROOT_URLCONF=__name__,
        ALLOWED_HOSTS=["*"],
        MIDDLEWARE=[],
        INSTALLED_APPS=[],
        # Django's own cap (2.5 MB) off, so that memguard's limit is the one tested.
        DATA_UPLOAD_MAX_MEMORY_SIZE=None,
        USE_TZ=True,
    )

import django  # noqa: E402

django.setup()

from django.core.asgi import get_asgi_application  # noqa: E402
from django.core.wsgi import get_wsgi_application  # noqa: E402
from django.http import HttpRequest, HttpResponse  # noqa: E402
from django.urls import path  # noqa: E402
from django.views.decorators.csrf import csrf_exempt  # noqa: E402


@csrf_exempt
def echo(request: HttpRequest) -> HttpResponse:
    body = request.body
    return HttpResponse(f"{len(body)} {hashlib.sha256(body).hexdigest()}\n",
                        content_type="text/plain")


urlpatterns = [path("echo", echo)]

asgi_application = get_asgi_application()
wsgi_application = get_wsgi_application()
