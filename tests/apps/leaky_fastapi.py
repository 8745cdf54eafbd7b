"""The leaky app (:mod:`tests.apps.leaky`) as a FastAPI app, for ASGI workers."""

from __future__ import annotations

import asyncio
import os
import time

from fastapi import FastAPI
from fastapi.responses import PlainTextResponse

from tests.apps import leaky

app = FastAPI()


@app.get("/", response_class=PlainTextResponse)
def leak() -> str:
    return leaky._route("/", {}).decode()


@app.get("/ping", response_class=PlainTextResponse)
def ping() -> str:
    return f"ok {os.getpid()}\n"


@app.get("/grow", response_class=PlainTextResponse)
def grow(mib: int = 1) -> str:
    return leaky._route("/grow", {"mib": str(mib)}).decode()


@app.get("/slow-leak", response_class=PlainTextResponse)
async def slow_leak(mib: int = 100, seconds: float = 5) -> str:
    for _ in range(mib):
        leaky._keep(leaky.MIB)
        await asyncio.sleep(seconds / max(mib, 1))
    return f"ok {os.getpid()}\n"


@app.get("/block", response_class=PlainTextResponse)
async def block(seconds: float = 6) -> str:
    time.sleep(seconds)  # blocks the event loop: the master's timeout must fire
    return "done\n"
