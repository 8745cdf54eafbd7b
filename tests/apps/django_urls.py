"""URLs for the Django route-template test."""

from __future__ import annotations

from typing import Any

from django.http import HttpResponse
from django.urls import path


def article(request: Any, pk: int) -> HttpResponse:
    return HttpResponse(f"article {pk}")


urlpatterns = [path("articles/<int:pk>/", article)]
