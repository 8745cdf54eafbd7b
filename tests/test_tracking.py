"""Per-request accounting: sampling, overlap marking, route templates, leak suspicion."""

from __future__ import annotations

import asyncio
import http.client
import json
import random
import threading
import time
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route
from werkzeug.test import Client

from memguard import MemGuardMiddleware, MemGuardWSGIMiddleware
from memguard.memory.fit import nonnegative_least_squares
from memguard.memory.tracking import OTHER, RequestTracker
from tests.support.servers import http_request, serve

MS = 1_000_000


class FakeRss:
    def __init__(self, value: int = 100 << 20) -> None:
        self.value = value
        self.reads = 0

    def __call__(self) -> int:
        self.reads += 1
        return self.value


def test_sampling_reads_rss_only_for_sampled_requests() -> None:
    rss = FakeRss()
    tracker = RequestTracker(sample_interval=0.001, rss=rss, leak_window=3600)
    now = 10 * MS
    for i in range(100):  # 100 requests within 0.1 ms: one sample
        sample = tracker.begin(now + i * 1000)
        tracker.end(sample, "/a", "/a", now + i * 1000 + 500)
    stats = tracker.get("/a")
    assert stats is not None and stats.count == 100
    assert stats.samples == 1
    assert rss.reads == 2  # before and after the one sample
    later = now + 2 * MS
    tracker.end(tracker.begin(later), "/a", "/a", later + 1)
    assert stats.samples == 2


def test_sample_growth_exact_when_alone_marked_when_overlapped() -> None:
    rss = FakeRss()
    tracker = RequestTracker(sample_interval=0, rss=rss, leak_window=3600)
    a = tracker.begin(1)
    rss.value += 4096
    tracker.end(a, "/alone", "/alone", 2)
    stats = tracker.get("/alone")
    assert stats is not None
    assert (stats.samples, stats.exclusive, stats.exclusive_sum) == (1, 1, 4096)

    # b starts, c starts while b runs, b ends, c ends: both overlapped.
    b = tracker.begin(3)
    c = tracker.begin(4)
    rss.value += 8192
    tracker.end(b, "/b", "/b", 5)
    tracker.end(c, "/c", "/c", 6)
    for route in ("/b", "/c"):
        s = tracker.get(route)
        assert s is not None and s.samples == 1 and s.exclusive == 0
    b_stats = tracker.get("/b")
    assert b_stats is not None and b_stats.growth_max == 8192


def test_route_table_is_bounded() -> None:
    tracker = RequestTracker(sample_interval=3600, max_routes=10, max_raw_paths=3,
                             rss=FakeRss(), leak_window=3600)
    for i in range(50):
        tracker.end(tracker.begin(1), None, f"/raw/{i}", 2)  # no template: raw paths
    names = {s.route for s in tracker.routes()}
    assert names == {OTHER, "/raw/0", "/raw/1", "/raw/2"}
    other = tracker.get(OTHER)
    assert other is not None and other.count == 47
    for i in range(50):
        tracker.end(tracker.begin(1), f"/t/{i}", f"/t/{i}", 2)
    assert len(tracker.routes()) == 10  # max_routes, "other" included


def test_solver_separates_routes_and_keeps_estimates_non_negative() -> None:
    # Rows: counts of routes 0 (keeps 5 per request) and 1 (keeps nothing) per interval.
    xtx: dict[int, dict[int, float]] = {}
    xty: dict[int, float] = {}
    rng = random.Random(1)
    for _ in range(200):
        row = {0: rng.randint(0, 5), 1: rng.randint(0, 5)}
        y = 5.0 * row[0] + rng.uniform(-1, 1)
        for i, xi in row.items():
            xty[i] = xty.get(i, 0.0) + xi * y
            for j, xj in row.items():
                xtx.setdefault(i, {})[j] = xtx.get(i, {}).get(j, 0.0) + xi * xj
    beta = nonnegative_least_squares(xtx, xty)
    assert beta[0] == pytest.approx(5.0, abs=0.3)
    assert 0.0 <= beta[1] < 0.3
    # A route whose intervals show memory returned gets 0, never a negative "kept".
    only = nonnegative_least_squares({0: {0: 10.0}}, {0: -30.0})
    assert only == {0: 0.0}


# ---- route templates --------------------------------------------------------------------


async def _ok(request: Any) -> PlainTextResponse:
    return PlainTextResponse("ok")


def _call(app: Any, path: str, root_path: str = "") -> dict[str, Any]:
    scope: dict[str, Any] = {
        "type": "http", "http_version": "1.1", "method": "GET", "scheme": "http",
        "path": path, "raw_path": path.encode(), "root_path": root_path,
        "query_string": b"", "headers": [], "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }

    sent_body = []

    async def receive() -> dict[str, Any]:
        if not sent_body:
            sent_body.append(True)
            return {"type": "http.request", "body": b""}
        await asyncio.Event().wait()  # no disconnect until the response is over
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        pass

    asyncio.run(app(scope, receive, send))
    return scope


def _recorded(app: MemGuardMiddleware) -> set[str]:
    tracker = app.memory.tracker
    assert tracker is not None
    return {stats.route for stats in tracker.routes() if stats.count}


def test_starlette_route_templates_with_mounts() -> None:
    app = MemGuardMiddleware(Starlette(routes=[
        Route("/items/{item_id:int}", _ok),
        Mount("/api", routes=[Route("/users/{name}", _ok)]),
    ]))
    _call(app, "/items/42")
    assert _recorded(app) == {"/items/{item_id}"}
    _call(app, "/api/users/bob")
    assert _recorded(app) == {"/items/{item_id}", "/api/users/{name}"}
    _call(app, "/missing")  # no template: the raw path
    assert _recorded(app) == {"/items/{item_id}", "/api/users/{name}", "/missing"}


class _Route:
    def __init__(self, path_format: str | None) -> None:
        self.path_format = path_format


@pytest.mark.parametrize(("scope", "root", "template"), [
    ({}, "", None),
    ({"route": None, "memguard.route": "/named"}, "", "/named"),
    ({"memguard.route": 7}, "", "7"),
    ({"route": object(), "memguard.route": "/named"}, "", None),  # a route, no template
    ({"route": _Route(None)}, "", None),
    ({"route": _Route("/{id}")}, "/app", "/{id}"),                 # no root_path key
    ({"route": _Route("/{id}"), "root_path": "/app/api"}, "/app", "/api/{id}"),
    ({"route": _Route("/{id}"), "root_path": "/app"}, "/app", "/{id}"),
    ({"route": _Route("/{id}"), "root_path": "/other"}, "/app", "/{id}"),
])
def test_route_template_edge_cases(scope: dict[str, Any], root: str,
                                   template: str | None) -> None:
    """What the app's router (or the app) left in the scope names the request's route;
    without a template, its raw path does."""
    async def routed(inner: dict[str, Any], receive: Any, send: Any) -> None:
        inner.update(scope)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    app = MemGuardMiddleware(routed)
    _call(app, root + "/raw/7", root_path=root)
    assert _recorded(app) == {template if template is not None else root + "/raw/7"}


def test_middleware_counts_templates_not_paths() -> None:
    inner = Starlette(routes=[Route("/items/{item_id:int}", _ok)])
    app = MemGuardMiddleware(inner, memory_sample_interval=0)
    for i in range(20):
        _call(app, f"/items/{i}")
    tracker = app.memory.tracker
    assert tracker is not None
    stats = tracker.get("/items/{item_id}")
    assert stats is not None and stats.count == 20 and stats.samples == 20
    assert tracker.get("/items/3") is None


def test_flask_rule_is_recorded_by_the_wsgi_middleware() -> None:
    from flask import Flask

    flask_app = Flask(__name__)

    @flask_app.route("/items/<int:item_id>")
    def item(item_id: int) -> str:
        return f"item {item_id}"

    flask_app.wsgi_app = MemGuardWSGIMiddleware(flask_app.wsgi_app)  # type: ignore[method-assign]
    client = Client(flask_app)
    for i in range(5):
        assert client.get(f"/items/{i}").status_code == 200
    tracker = flask_app.wsgi_app.memory.tracker  # type: ignore[attr-defined]
    stats = tracker.get("/items/<int:item_id>")
    assert stats is not None and stats.count == 5


@pytest.mark.parametrize(("name", "route"), [
    ("/items/<id>", "/items/<id>"),   # the name a framework hook recorded
    (None, "/mount/items/7"),         # none: the raw path, SCRIPT_NAME included
    (7, "7"),                         # an app's own name that is not a str
])
def test_wsgi_requests_are_counted_under_their_name_or_raw_path(
        name: Any, route: str) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        if name is not None:
            environ["memguard.route"] = name
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    wsgi = MemGuardWSGIMiddleware(app)
    client = Client(wsgi)
    for _ in range(3):
        assert client.get("/items/7", environ_overrides={"SCRIPT_NAME": "/mount"}
                          ).status_code == 200
    tracker = wsgi.memory.tracker
    assert tracker is not None
    assert {(s.route, s.count) for s in tracker.routes() if s.count} == {(route, 3)}


@pytest.mark.parametrize("kind", ["wsgi", "asgi"])
def test_django_route_is_recorded(kind: str) -> None:
    from django.core.handlers.asgi import ASGIHandler
    from django.core.handlers.wsgi import WSGIHandler
    from django.test import override_settings

    import tests.apps.django_app  # noqa: F401  (configures Django once per process)

    with override_settings(ROOT_URLCONF="tests.apps.django_urls",
                           MIDDLEWARE=["memguard.memory.DjangoRouteMiddleware"]):
        if kind == "wsgi":
            wsgi = MemGuardWSGIMiddleware(WSGIHandler())
            client = Client(wsgi)
            for i in range(3):
                assert client.get(f"/articles/{i}/").status_code == 200
            tracker = wsgi.memory.tracker
        else:
            asgi = MemGuardMiddleware(ASGIHandler())
            for i in range(3):
                _call(asgi, f"/articles/{i}/")
            tracker = asgi.memory.tracker
    assert tracker is not None
    stats = tracker.get("/articles/<int:pk>/")
    assert stats is not None and stats.count == 3, [s.as_dict() for s in tracker.routes()]


# ---- leak suspicion -----------------------------------------------------------------------

_kept: list[Any] = []


def _garbage() -> None:
    """Reference cycles left for the collector, as frameworks leave them (both routes)."""
    nodes: list[dict[str, Any]] = [{} for _ in range(5)]
    for a, b in zip(nodes, nodes[1:] + nodes[:1], strict=True):
        a["next"] = b


async def _leaky(request: Any) -> PlainTextResponse:
    _garbage()
    _kept.append({"n": len(_kept), "tags": [str(i) for i in range(8)]})
    return PlainTextResponse("kept")


async def _clean(request: Any) -> PlainTextResponse:
    _garbage()
    scratch = {"n": 1, "tags": [str(i) for i in range(8)]}
    return PlainTextResponse(f"clean {len(scratch)}")


def test_leaking_route_flagged_in_process(caplog: pytest.LogCaptureFixture) -> None:
    inner = Starlette(routes=[Route("/leak", _leaky), Route("/clean/{n}", _clean)])
    app = MemGuardMiddleware(inner, memory_sample_interval=0, leak_window=0.5,
                             leak_windows=3, leak_min_growth=0)
    tracker = app.memory.tracker
    assert tracker is not None
    # Requests run one at a time here: every one may close an interval, however fast
    # this machine runs them (a time-based interval made the rows per window vary).
    tracker.anchor_interval_ns = 0
    rng = random.Random(7)
    caplog.set_level("WARNING", logger="memguard.tracking")
    for _window in range(8):
        for i in range(400):
            _call(app, "/leak" if rng.random() < 0.5 else f"/clean/{i}")
        tracker.close_window()
    leak, clean = tracker.get("/leak"), tracker.get("/clean/{n}")
    assert leak is not None and clean is not None
    assert leak.suspected, leak.as_dict()
    assert not clean.suspected, clean.as_dict()
    assert leak.objects >= 5  # a dict, a list and 8 strings per request, give or take
    assert clean.objects < 0.5
    messages = [r.getMessage() for r in caplog.records]
    assert sum("suspected memory leak in route /leak" in m for m in messages) == 1
    _kept.clear()


@pytest.mark.server
def test_leaking_route_flagged_under_concurrent_load(repo: Any) -> None:
    """uvicorn, 6 client threads, a route that keeps a record per request beside a
    clean one: the leaking route is flagged, the other is not."""
    env = {"MEMGUARD_LEAK_WINDOW": "0.5", "MEMGUARD_LEAK_WINDOWS": "5",
           "MEMGUARD_LEAK_MIN_GROWTH": "256KiB"}
    with serve("uvicorn", "tests.apps.memory_apps:app", ["--log-level", "warning"],
               env=env, cwd=repo) as server:
        deadline = time.monotonic() + 20
        flagged = threading.Event()
        errors: list[str] = []

        def client(seed: int) -> None:
            rng = random.Random(seed)
            while time.monotonic() < deadline and not flagged.is_set():
                draw = rng.random()
                path = ("/leak" if draw < 0.4 else
                        f"/items/{rng.randint(1, 10**6)}" if draw < 0.8 else "/")
                conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
                try:
                    conn.request("GET", path)
                    response = conn.getresponse()
                    response.read()
                    if response.status != 200:
                        errors.append(f"{path}: {response.status}")
                finally:
                    conn.close()

        def watcher() -> None:
            while time.monotonic() < deadline:
                time.sleep(0.5)
                if "suspected memory leak in route /leak" in server.log():
                    flagged.set()
                    return

        threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
        threads.append(threading.Thread(target=watcher))
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        status, _, body = http_request(server.url, path="/_stats")
        assert status == 200 and not errors, errors[:5]
        routes = {r["route"]: r for r in json.loads(body)["routes"]}
        assert routes["/leak"]["suspected_leak"], routes
        for clean in ("/items/{item_id}", "/"):
            assert not routes[clean]["suspected_leak"], routes
            assert routes[clean]["count"] > 200
        assert server.log().count("suspected memory leak") == 1


def test_a_sample_starting_when_admission_just_read_rss_reuses_that_reading() -> None:
    """The middleware's admission layer reads RSS at a request's start every few ms; a
    sample starting at that same instant takes its reading instead of a second read."""
    reads: list[int] = []

    def rss() -> int:
        reads.append(1)
        return 100 << 20

    class Shared:
        checked_ns = 5_000_000
        rss = 90 << 20

    tracker = RequestTracker(sample_interval=0, rss=rss, leak_window=3600)
    tracker.shared = Shared()
    sample = tracker.begin(5_000_000)
    assert sample is not None and sample.rss == 90 << 20 and reads == []
    tracker.end(sample, "/a", "/a", 5_000_001)
    assert len(reads) == 1  # the end is read, always
    sample = tracker.begin(6_000_000)  # admission read at another instant
    assert sample is not None and sample.rss == 100 << 20 and len(reads) == 2


def test_the_middleware_shares_admissions_reading_with_its_tracker() -> None:
    from memguard.memory import MemoryLayer

    layer = MemoryLayer(track_memory=True)
    assert layer.tracker is not None and layer.tracker.shared is layer.admission
