"""Route keys: which route template a finished request belongs to.

Route templates (``/items/{id}``, never ``/items/42``) come from the framework after the
app ran: Starlette/FastAPI set ``scope["route"]``; Flask's rule and Django's resolver
match are recorded by small hooks (:func:`install_flask_route_hook`,
:class:`DjangoRouteMiddleware`) under the ``memguard.route`` key of the scope or WSGI
environ, which any app may also set itself. Otherwise the raw path is used.
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping
from typing import Any

__all__ = [
    "ROUTE_KEY",
    "DjangoRouteMiddleware",
    "RouteKey",
    "hashable_key",
    "install_flask_route_hook",
    "route_key",
    "route_template",
]

#: Scope / environ key under which an app or a framework hook names the route template.
ROUTE_KEY = "memguard.route"


#: What a request's end records, resolved to a route template later (flush()): the
#: template itself when the middleware knows it (a str), else
#: ``(route_format, named, inner_root, root, path)``: the ``path_format`` of the
#: framework's route (``scope["route"]``; ``None`` without a route, False for a route
#: without one), the name under :data:`ROUTE_KEY`, the scope's ``root_path`` after the
#: app ran, the one the middleware saw, and the request's path. Hashable: identical
#: keys are counted together.
RouteKey = str | tuple[Any, Any, Any, Any, str]


def route_key(template: str | None, path: str) -> RouteKey:
    """The key of a request whose template is known already (or ``None``: raw path)."""
    return template if template is not None else (None, None, None, None, path)


def route_template(key: tuple[Any, Any, Any, Any, str]) -> str | None:
    """The route template a key names, once the app has routed the request.

    Starlette (and FastAPI) set ``scope["route"]`` to the matched route, whose
    ``path_format`` is the template without converters (``/items/{id}``). A ``Mount``
    extends the scope's ``root_path`` with the mount's matched prefix, which is put back
    in front of the inner template. Otherwise the :data:`ROUTE_KEY` name a hook or the
    app set is used.
    """
    template, named, inner_root, root, _ = key
    if template is None:
        return None if named is None else str(named)
    if not isinstance(template, str):
        return None  # a route object without a template
    if (isinstance(inner_root, str) and isinstance(root, str) and inner_root != root
            and inner_root.startswith(root)):
        return inner_root[len(root):] + template
    return template


def hashable_key(key: RouteKey) -> RouteKey:
    """``key`` with anything unhashable in it (an app's own route name) as its ``str``."""
    if isinstance(key, str):
        return key
    template, named, inner_root, root, path = (
        x if isinstance(x, (str, int, type(None))) else str(x) for x in key)
    return (template, named, inner_root, root, str(path))


def install_flask_route_hook(app: Any) -> bool:
    """Record Flask's URL rule (``/items/<int:id>``) in the environ of each request.

    Flask clears ``environ["werkzeug.request"]`` before its WSGI call returns, so the
    rule is copied while the request is being handled, by a ``before_request`` hook.
    Returns False when ``app`` is not a Flask application.
    """
    flask_app = getattr(app, "__self__", app)  # app.wsgi_app (a bound method) works too
    if not (hasattr(flask_app, "before_request") and hasattr(flask_app, "url_map")):
        return False
    if getattr(flask_app, "_memguard_route_hook", False):
        return True
    from flask import request

    def _memguard_record_route() -> None:
        rule = request.url_rule
        if rule is not None:
            request.environ[ROUTE_KEY] = rule.rule

    flask_app.before_request(_memguard_record_route)
    flask_app._memguard_route_hook = True
    return True


class DjangoRouteMiddleware:
    """Django middleware recording ``request.resolver_match.route`` for memguard.

    Add ``"memguard.memory.DjangoRouteMiddleware"`` to ``MIDDLEWARE``. Under WSGI,
    ``request.META`` is the environ the memguard middleware holds; under ASGI the
    request's ``scope`` is.
    """

    def __init__(self, get_response: Callable[[Any], Any]) -> None:
        self.get_response = get_response

    def __call__(self, request: Any) -> Any:
        return self.get_response(request)

    def process_view(self, request: Any, view_func: Any, view_args: Any,
                     view_kwargs: Any) -> None:
        match = getattr(request, "resolver_match", None)
        route = getattr(match, "route", None)
        if route:
            template = "/" + route.lstrip("^").rstrip("$").lstrip("/")
            scope: MutableMapping[str, Any] | None = getattr(request, "scope", None)
            target = scope if scope is not None else request.META
            target[ROUTE_KEY] = template
        return None
