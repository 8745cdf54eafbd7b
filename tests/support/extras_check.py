"""``python -m tests.support.extras_check EXTRA``, run by tests/test_extras.py inside a
fresh venv holding memguard-web with that one extra ("none": the bare package): what
the install covers works, and each feature whose extra is missing fails with a message
naming the extra to install. Prints one JSON object of what it found."""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from memguard.types import Message, Receive, Scope, Send


def asgi_request(app: Any, body: bytes) -> int:
    """One request through ``app`` on asyncio: the status answered."""
    statuses: list[int] = []
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> Message:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/", "raw_path": b"/",
             "query_string": b"", "root_path": "", "client": ("127.0.0.1", 1),
             "server": ("127.0.0.1", 80),
             "headers": [(b"content-length", str(len(body)).encode())]}
    asyncio.run(app(scope, receive, send))
    return statuses[0]


def guarded_middlewares() -> dict[str, int]:
    from memguard import MemGuardMiddleware, MemGuardWSGIMiddleware

    async def echo(scope: Scope, receive: Receive, send: Send) -> None:
        more = True
        while more:
            message = await receive()
            more = message.get("more_body", False)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    def wsgi_echo(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        environ["wsgi.input"].read()
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    asgi = MemGuardMiddleware(echo, max_body_size=10)
    wsgi = MemGuardWSGIMiddleware(wsgi_echo, max_body_size=10)
    found = {"asgi_small": asgi_request(asgi, b"x" * 5), "asgi_big": asgi_request(asgi, b"x" * 50)}
    for name, body in (("wsgi_small", b"x" * 5), ("wsgi_big", b"x" * 50)):
        statuses: list[str] = []
        environ = {"REQUEST_METHOD": "POST", "PATH_INFO": "/", "CONTENT_LENGTH": str(len(body)),
                   "wsgi.input": io.BytesIO(body)}
        b"".join(wsgi(environ, lambda status, headers, exc_info=None, seen=statuses:
                      seen.append(status)))
        found[name] = int(statuses[0].split()[0])
    return found


def failure(call: Any) -> str | None:
    """None when ``call()`` works, else the message of the RuntimeError it raised."""
    try:
        call()
    except RuntimeError as exc:
        return str(exc)
    return None


def metrics() -> None:
    from memguard.memory.metrics import MetricsExporter

    MetricsExporter()


def multipart() -> None:
    from memguard.uploads import save_multipart_wsgi

    body = (b"--b\r\nContent-Disposition: form-data; name=\"f\"; filename=\"a.txt\"\r\n\r\n"
            b"hello\r\n--b--\r\n")
    environ = {"REQUEST_METHOD": "POST", "CONTENT_TYPE": "multipart/form-data; boundary=b",
               "CONTENT_LENGTH": str(len(body)), "wsgi.input": io.BytesIO(body)}
    with tempfile.TemporaryDirectory() as directory:
        result = save_multipart_wsgi(environ, Path(directory))
        (saved,) = result.files
        assert saved.path.read_bytes() == b"hello"


def plot() -> str:
    """What ``memguard report --out`` says (the [plot] extra is in none of these)."""
    with tempfile.TemporaryDirectory() as directory:
        events = Path(directory) / "events.jsonl"
        events.write_text("".join(
            json.dumps({"ts": ts, "kind": "sample", "pid": 1, "role": "worker", "rss": rss}) + "\n"
            for ts, rss in ((0, 10 << 20), (1, 12 << 20))))
        done = subprocess.run([sys.executable, "-m", "memguard", "report", str(events),
                               "--out", str(Path(directory) / "t.png")],
                              capture_output=True, text=True, timeout=60)
        return f"{done.returncode} {done.stdout} {done.stderr}"


def main() -> None:
    print(json.dumps({"middlewares": guarded_middlewares(), "metrics": failure(metrics),
                      "multipart": failure(multipart), "plot": plot()}))


if __name__ == "__main__":
    main()
