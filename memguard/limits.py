"""The body policy: which limit applies to a request, and the counter that enforces it.

Matching rules
--------------
- A **route pattern** is an exact path (``"/health"``) or a prefix ending in ``*``
  (``"/upload/*"`` matches ``/upload/``, ``/upload/a/b`` and ``/upload`` itself);
  ``"*"`` matches every path. The path is the app's own: percent-decoded, without the
  query string and without the prefix the app is mounted at (ASGI ``root_path``, WSGI
  ``SCRIPT_NAME``), the way the app's router sees it.
- The **longest** matching pattern wins, so an exact pattern beats every prefix
  pattern. A route's limit replaces ``max_body_size``, so it may raise or lower it.
- A **content-type cap** matches the media type (lower-cased, parameters dropped):
  ``"application/json"`` exactly, ``"text/*"`` any subtype, ``"application/*+json"`` any
  subtype with that suffix, ``"*/*"`` any type. An exact name wins, then the longest
  matching pattern. A body without a Content-Type is capped as ``application/json``
  (FastAPI parses such a body as JSON) except on a route given its own limit: there it
  gets the route's limit (clients such as httpx and requests send raw uploads untyped).
- The **effective limit** of a request is the smaller of its route limit (or
  ``max_body_size``) and its content-type cap. Content-type caps only ever lower a limit:
  JSON and url-encoded bodies are parsed in memory, so a route raised for uploads does
  not raise them. A route may lift them for itself by giving a mapping instead of a size:
  ``{"/import": {"*": "64MiB", "application/json": "64MiB"}}`` (``"*"`` is the route's
  limit; the other keys replace the content-type caps on that route).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from memguard.decoding import Decoder
from memguard.errors import BodyTooLarge, UnsupportedMediaType

__all__ = ["BodyCounter", "BodyPolicy", "declared_over_limit", "over_limit"]

_CACHE_SIZE = 256
_MISSING = object()
# The media type a body without a Content-Type is capped as.
_UNTYPED = "application/json"


def _smaller(a: int | None, b: int | None) -> int | None:
    if a is None:
        return b
    if b is None:
        return a
    return a if a <= b else b


def over_limit(limit: int, received: int) -> BodyTooLarge:
    return BodyTooLarge(f"request body is over the limit of {limit} bytes",
                        reason="body_over_limit", limit=limit, received=received)


class BodyCounter:
    """Counts a body's bytes as they are read and refuses the first byte over ``limit``
    (``None``: count only). Every reader of a body uses one: the middlewares' wrappers
    and the uploads."""

    __slots__ = ("limit", "received")

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.received = 0

    def add(self, size: int) -> None:
        """Count ``size`` more bytes; raises :class:`BodyTooLarge` past the limit."""
        self.received += size
        if self.limit is not None and self.received > self.limit:
            raise over_limit(self.limit, self.received)


class _TypeCaps:
    """Content-type caps, compiled: exact names, then patterns longest first."""

    def __init__(self, caps: Mapping[str, int | None]) -> None:
        self.exact: dict[str, int | None] = {}
        self.patterns: list[tuple[str, str, int | None]] = []  # (prefix, suffix, cap)
        for pattern, cap in caps.items():
            if pattern == "*/*":
                self.patterns.append(("", "", cap))
            elif "*" in pattern:
                prefix, _, suffix = pattern.partition("*")
                self.patterns.append((prefix, suffix, cap))
            else:
                self.exact[pattern] = cap
        self.patterns.sort(key=lambda p: len(p[0]) + len(p[1]), reverse=True)
        self._cache: dict[str, int | None] = {}

    def cap(self, media_type: str) -> int | None:
        try:
            return self._cache[media_type]
        except KeyError:
            pass
        cap: int | None = None
        if media_type in self.exact:
            cap = self.exact[media_type]
        else:
            for prefix, suffix, pattern_cap in self.patterns:
                if (media_type.startswith(prefix) and media_type.endswith(suffix)
                        and len(media_type) >= len(prefix) + len(suffix)):
                    cap = pattern_cap
                    break
        if len(self._cache) < _CACHE_SIZE:  # media types with junk in them stay uncached
            self._cache[media_type] = cap
        return cap


class BodyPolicy:
    """The resolved ``body`` options, compiled once per middleware (read-only after)."""

    def __init__(self, options: Mapping[str, Any]) -> None:
        self.max_body_size: int | None = options["max_body_size"]
        self.idle_timeout: float = options["body_idle_timeout"]
        self.min_rate: int = options["body_min_rate"]
        self.rate_grace: float = options["body_rate_grace"]
        self.decompress: bool = options["decompress"]
        self.max_decoded_size: int | None = options["max_decoded_size"]
        self.max_ratio: float = options["max_decompression_ratio"]
        self.report_only: bool = options["report_only"]
        self.timed = bool(self.idle_timeout or self.min_rate)
        # How often the slow-body sweeper looks: an eighth of the idle timeout, within
        # 20-500 ms. A wait is timed from the first look that finds it, so a timeout
        # comes two periods late at most: a quarter of the idle timeout (and one second).
        self.sweep_period = min(0.5, max(0.02, (self.idle_timeout or 4.0) / 8))
        self.type_caps = _TypeCaps(options["content_types"])
        self._exact: dict[str, tuple[int | None, _TypeCaps]] = {}
        self._prefixes: list[tuple[str, int | None, _TypeCaps]] = []
        for pattern, value in options["routes"].items():
            if isinstance(value, Mapping):
                route_limit = value.get("*", self.max_body_size)
                caps = _TypeCaps({**options["content_types"],
                                  **{k: v for k, v in value.items() if k != "*"}})
            else:
                route_limit, caps = value, self.type_caps
            if pattern.endswith("*"):
                self._prefixes.append((pattern[:-1], route_limit, caps))
            else:
                self._exact[pattern] = (route_limit, caps)
        self._prefixes.sort(key=lambda p: len(p[0]), reverse=True)
        self._routed = bool(self._exact or self._prefixes)
        # Without routes the limit depends on the Content-Type value only: cached by its
        # raw value (bounded: multipart boundaries make every value new).
        self._by_raw_type: dict[bytes | str | None, int | None] = {}

    def limit_for(self, path: str, content_type: bytes | str | None) -> int | None:
        """The effective limit for a request to ``path`` (the app's own path) with this
        Content-Type."""
        if self._routed:
            return self._limit_for(path, content_type)
        hit = self._by_raw_type.get(content_type, _MISSING)
        if hit is not _MISSING:
            return hit  # type: ignore[return-value]
        limit = self._limit_for(path, content_type)
        if len(self._by_raw_type) < _CACHE_SIZE:
            self._by_raw_type[content_type] = limit
        return limit

    def _limit_for(self, path: str, content_type: bytes | str | None) -> int | None:
        route_limit, caps = self.max_body_size, self.type_caps
        routed = True
        hit = self._exact.get(path)
        if hit is not None:
            route_limit, caps = hit  # an exact pattern matches all of the path: longest
        else:
            for prefix, limit, prefix_caps in self._prefixes:
                if path.startswith(prefix) or path == prefix.rstrip("/"):
                    route_limit, caps = limit, prefix_caps
                    break
            else:
                routed = False
        if isinstance(content_type, bytes):
            content_type = content_type.decode("latin-1")
        media_type = (content_type or "").partition(";")[0].strip().lower()
        if not media_type:
            if routed:
                return route_limit
            media_type = _UNTYPED
        return _smaller(route_limit, caps.cap(media_type))

    def decoder_for(self, encoding: bytes | None, limit: int | None) -> Decoder | None:
        """A decoder for this Content-Encoding when ``decompress`` is on, else ``None``."""
        if not self.decompress or encoding is None:
            return None
        name = encoding.strip().lower()
        if name in (b"", b"identity"):
            return None
        if name not in (b"gzip", b"x-gzip", b"deflate"):
            raise UnsupportedMediaType(
                "unsupported Content-Encoding", reason="content_encoding_unsupported",
                content_encoding=encoding.decode("latin-1")[:40])
        decoded_limit = (_smaller(limit, self.max_decoded_size)
                         if self.max_decoded_size is not None else limit)
        return Decoder(name, decoded_limit, self.max_ratio)


def declared_over_limit(declared: int, limit: int) -> BodyTooLarge:
    return BodyTooLarge(
        f"request body of {declared} bytes is over the limit of {limit} bytes",
        reason="content_length_over_limit", limit=limit, declared=declared)
