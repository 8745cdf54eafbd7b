"""An ASGI app that asks for its worker's recycle when told to, under any server.

``GET /`` answers ``<pid> <module of the running event loop>``. ``GET /recycle`` asks for
the recycle, lets the loop turn once (the recycle stops accepting on the loop), then
answers the same. With ``RECYCLE_EVERY=N`` each worker also asks after its Nth response,
as the middleware does after a response over the limit.

The recycler is the one memguard's gunicorn hooks installed in the worker; where none
is (standalone uvicorn) it is :class:`~memguard.recycle.SignalRecycler`, as
docs/gunicorn.md tells an app to install it.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from memguard.recycle import (
    LogOnlyRecycler,
    SignalRecycler,
    get_recycler,
    request_recycle,
    set_recycler,
)
from tests.support.servers import run_lifespan

if isinstance(get_recycler(), LogOnlyRecycler):
    set_recycler(SignalRecycler())
EVERY = int(os.environ.get("RECYCLE_EVERY", "0"))
_served = [0]


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        await run_lifespan(receive, send)
        return
    if scope["path"] == "/recycle":
        request_recycle("requested", path="/recycle")
        await asyncio.sleep(0)
    loop = type(asyncio.get_running_loop()).__module__
    body = f"{os.getpid()} {loop}\n".encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
    _served[0] += 1
    if EVERY and _served[0] % EVERY == 0:
        request_recycle("every", requests=_served[0])
