"""A FastAPI app that fills a 64 MiB cache in its lifespan startup (per worker)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

CACHE_BYTES = 64 * 1024 * 1024


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, bytes]]:
    yield {"cache": b"\x02" * CACHE_BYTES}


app = FastAPI(lifespan=lifespan)


@app.get("/items/{item}")
async def item(item: int) -> dict[str, int]:
    return {"item": item}
