"""The paths the middlewares answer themselves: liveness and readiness, and the small
complete responses every such endpoint (health, metrics, leak admin) sends.

Health needs nothing: :class:`HealthEndpoint` answers a liveness path (always 200 while
the worker can answer: memory never fails liveness, or Kubernetes would restart a worker
that only needs a rest) and a readiness path (503 while the worker's memory pressure is
critical, so load balancers send traffic elsewhere).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from memguard import config

if TYPE_CHECKING:
    from memguard.memory.admission import MemoryAdmission

__all__ = ["HealthEndpoint", "respond_wsgi", "send_asgi"]


class HealthEndpoint:
    """Liveness and readiness answers for the middlewares (or mounted on their own)."""

    def __init__(self, admission: MemoryAdmission | None, *, readiness_path: str | None = None,
                 liveness_path: str | None = None,
                 details: bool = config.default("readiness_details")) -> None:
        self.admission = admission
        self.readiness_path = readiness_path
        self.liveness_path = liveness_path
        self.details = details
        self.paths = frozenset(p for p in (readiness_path, liveness_path) if p)

    def answer(self, path: str) -> tuple[int, str, bytes]:
        if path == self.liveness_path:
            return 200, "application/json", b'{"status":"alive"}\n'
        admission = self.admission
        if admission is None:
            return 200, "application/json", b'{"status":"ready"}\n'
        # A readiness probe must see the present, not a reading from a quiet minute ago.
        admission.refresh()
        ready = admission.ready
        body: dict[str, Any] = {"status": "ready" if ready else "not_ready"}
        if self.details:  # the pid, memory and limits are for operators, not for anyone
            body.update(pid=os.getpid(), **admission.figures())
        return (200 if ready else 503), "application/json", (json.dumps(body) + "\n").encode()

    async def asgi(self, scope: dict[str, Any], receive: Callable[..., Any],
                   send: Callable[..., Any]) -> None:
        status, ctype, body = self.answer(scope["path"])
        await send_asgi(send, status, ctype, body)

    def wsgi(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        status, ctype, body = self.answer(environ.get("PATH_INFO", ""))
        return respond_wsgi(start_response, status, ctype, body)


_REASONS = {200: "OK", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
            405: "Method Not Allowed", 409: "Conflict", 503: "Service Unavailable"}


async def send_asgi(send: Callable[..., Any], status: int, ctype: str, body: bytes,
                    extra: list[tuple[bytes, bytes]] | None = None) -> None:
    """Send a complete small response."""
    headers = [(b"content-type", ctype.encode()), (b"content-length", str(len(body)).encode()),
               (b"cache-control", b"no-store"), *(extra or ())]
    if status in (401,):
        headers.append((b"www-authenticate", b'Bearer realm="memguard"'))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def respond_wsgi(start_response: Callable[..., Any], status: int, ctype: str, body: bytes,
                 extra: list[tuple[str, str]] | None = None) -> list[bytes]:
    headers = [("Content-Type", ctype), ("Content-Length", str(len(body))),
               ("Cache-Control", "no-store"), *(extra or ())]
    if status in (401,):
        headers.append(("WWW-Authenticate", 'Bearer realm="memguard"'))
    start_response(f"{status} {_REASONS.get(status, 'Unknown')}", headers)
    return [body]
