"""Every memguard option, declared once: name, default, parser, environment variable, doc.

gunicorn's ``config.py`` is the model: one declarative place per option, from which
validation, ``MEMGUARD_*`` environment loading and the options reference
(``memguard options --markdown``, docs/options.md) are all derived. A component (the
middleware, the gunicorn integration) asks :func:`resolve` for the values of its
sections; unknown keywords are an error naming the closest known option.

Sections: ``body`` (request-body policy), ``memory`` (accounting, admission, limits),
``gunicorn`` (worker recycling and the watchdog). Add options to the section they
belong to, in this file only.
"""

from __future__ import annotations

import difflib
import math
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from memguard.sizes import parse_size

__all__ = [
    "SETTINGS",
    "BodyOptions",
    "GunicornOptions",
    "MemoryOptions",
    "SectionOptions",
    "Setting",
    "UploadOptions",
    "parse_bool",
    "parse_optional_size",
    "reference_markdown",
    "resolve",
]


@dataclass(frozen=True)
class Setting:
    """One option. ``parse`` turns a user value (or an environment string) into the
    value components use, raising ``ValueError`` with the offending text."""

    name: str
    section: str
    default: Any
    parse: Callable[[Any], Any]
    doc: str
    env: str | None = None
    type_doc: str = ""
    empty_ok: bool = False
    """An empty value means something (an empty list); otherwise an empty string (an
    unset ``${VAR}`` in a compose file) is refused rather than read as "off"."""

    @property
    def refused(self) -> str:
        """What values the parser refuses, for the options reference."""
        what = getattr(self.parse, "refuses", "")
        return what if self.empty_ok else ", ".join(filter(None, ("empty", what)))


SETTINGS: dict[str, Setting] = {}


def _register(setting: Setting) -> Setting:
    if setting.name in SETTINGS:
        raise RuntimeError(f"option {setting.name!r} declared twice")
    SETTINGS[setting.name] = setting
    return setting


def setting(
    name: str, section: str, default: Any, parse: Callable[[Any], Any], doc: str, *,
    env: str | None = None, type_doc: str = "", empty_ok: bool = False,
) -> Setting:
    return _register(Setting(name, section, default, parse, doc, env, type_doc, empty_ok))


Check = Callable[[dict[str, Any]], None]
CHECKS: dict[str, list[Check]] = {}


def check(section: str) -> Callable[[Check], Check]:
    """Declare a rule across several options of ``section`` (raise ``ValueError``);
    :func:`resolve` runs it on the section's values."""

    def add(func: Check) -> Check:
        CHECKS.setdefault(section, []).append(func)
        return func

    return add


_Parser = TypeVar("_Parser", bound=Callable[..., Any])


def refuses(what: str) -> Callable[[_Parser], _Parser]:
    """Record, for the options reference, which values a parser refuses."""

    def mark(func: _Parser) -> _Parser:
        func.refuses = what  # type: ignore[attr-defined]
        return func

    return mark


# ---- parsers ------------------------------------------------------------------------


@refuses("anything but true/false, 1/0, yes/no, on/off")
def parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
    raise ValueError(f"invalid boolean {value!r}: expected true/false, 1/0, yes/no, on/off")


_OFF = ("none", "off", "unlimited")


@refuses("negative")
def parse_optional_size(value: Any) -> int | str | None:
    """A size, ``None``/"off"/"none" for no limit. Percentages are kept as strings
    (``"25%"``): only the component knows the total they are a fraction of."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        if text.lower() in _OFF:
            return None
        if text.endswith("%"):
            parse_size(text, total=100)  # validates the number
            return text
    return parse_size(value)


@refuses("negative")
def parse_size_value(value: Any) -> int:
    return parse_size(value)


def _number(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError(f"invalid number {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"invalid number {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"invalid number {value!r}: must be finite")
    return number


@refuses("nan, inf, negative")
def parse_positive_float(value: Any) -> float:
    number = _number(value)
    if number < 0:
        raise ValueError(f"invalid number {value!r}: must not be negative")
    return number


# Longer than any sane timeout or interval; still a finite wait for every timer API
# (an infinite or huge one raises OverflowError in the thread that waits).
MAX_SECONDS = 1_000_000.0


@refuses(f"nan, inf, negative, over {MAX_SECONDS:,.0f}")
def parse_seconds(value: Any) -> float:
    number = parse_positive_float(value)
    if number > MAX_SECONDS:
        raise ValueError(f"invalid duration {value!r}: at most {MAX_SECONDS:,.0f} seconds")
    return number


@refuses("nan, inf, negative, over 100")
def parse_percent(value: Any) -> float:
    number = parse_positive_float(value)
    if number > 100:
        raise ValueError(f"invalid percentage {value!r}: at most 100")
    return number


@refuses("negative, not a whole number")
def parse_count(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError(f"invalid integer {value!r}")
    try:
        number = int(value)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"invalid integer {value!r}") from None
    if number < 0:
        raise ValueError(f"invalid integer {value!r}: must not be negative")
    return number


@refuses("0, negative, not a whole number")
def parse_at_least_one(value: Any) -> int:
    number = parse_count(value)
    if number < 1:
        raise ValueError(f"invalid integer {value!r}: must be at least 1")
    return number


def parse_optional_str(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"invalid text {value!r}")
    return value or None


# ---- resolution ---------------------------------------------------------------------


def resolve(
    sections: Iterable[str],
    kwargs: Mapping[str, Any],
    environ: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Values for every option of ``sections``: keyword > environment > default.

    Raises ``TypeError`` for an unknown keyword (with the closest known name) and
    ``ValueError`` for a bad value (naming the option).
    """
    wanted = set(sections)
    known = {name: s for name, s in SETTINGS.items() if s.section in wanted}
    for key in kwargs:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise TypeError(f"unknown memguard option {key!r}{hint}")
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for name, s in known.items():
        if name in kwargs:
            raw, origin = kwargs[name], "keyword"
        elif s.env is not None and s.env in env:
            raw, origin = env[s.env], f"environment variable {s.env}"
        else:
            values[name] = s.parse(s.default) if s.default is not None else None
            continue
        try:
            if isinstance(raw, str) and not raw.strip() and not s.empty_ok:
                # An unset ${VAR} in a compose file: reading it as "off" would turn a
                # protection off without a word.
                raise ValueError("empty value: unset it for the default, or give a value "
                                 "(\"off\" where the option can be off)")
            values[name] = s.parse(raw)
        except ValueError as exc:
            raise ValueError(f"memguard option {name!r} (from {origin}): {exc}") from None
    for section in sections:
        for rule in CHECKS.get(section, ()):
            rule(values)
    return values


def default(name: str) -> Any:
    """The parsed default of option ``name``: what a component's constructor defaults to,
    so that built by hand or from :func:`resolve`, it behaves the same."""
    s = SETTINGS[name]
    return None if s.default is None else s.parse(s.default)


def describe(name: str) -> str:
    """``'name' (MEMGUARD_NAME)``: how an error message names an option."""
    env = SETTINGS[name].env
    return f"{name!r} ({env})" if env else repr(name)


def reference_markdown(sections: Iterable[str] | None = None) -> str:
    """The options reference, generated from :data:`SETTINGS` (docs/options.md)."""
    order: list[str] = []
    for s in SETTINGS.values():
        if s.section not in order and (sections is None or s.section in sections):
            order.append(s.section)
    out = ["# memguard options", "",
           "Generated from `memguard/config.py` by `memguard options --markdown`; "
           "do not edit by hand.", "",
           "A value in the *refused* column stops the app at startup with a message naming "
           "the option and its environment variable, rather than being read as \"off\" or "
           "as a limit nobody meant. `empty` is an empty string, as an unset `${VAR}` in a "
           "compose file gives; write `off` where an option can be off.", ""]
    for section in order:
        out += [f"## {section}", "",
                "| option | environment | default | description | refused |",
                "|---|---|---|---|---|"]
        for s in SETTINGS.values():
            if s.section != section:
                continue
            env = f"`{s.env}`" if s.env else ""
            default = "none" if s.default is None else f"`{s.default!r}`"
            doc = s.doc.replace("|", "\\|").replace("\n", " ")
            refused = s.refused.replace("|", "\\|")
            out.append(f"| `{s.name}` | {env} | {default} | {doc} | {refused} |")
        out.append("")
    return "\n".join(out)


# =====================================================================================
# body: request-body policy (memguard/body.py, asgi.py, wsgi.py)
# =====================================================================================


@refuses("negative, a percentage")
def parse_body_limit(value: Any) -> int | None:
    """A body size limit: bytes or a size string; ``None``/"off"/"unlimited" for none.
    Percentages make no sense for a body and are refused."""
    limit = parse_optional_size(value)
    if isinstance(limit, str):
        raise ValueError(f"invalid body size {value!r}: a percentage is not a body size")
    return limit


def _pairs(value: Any, what: str) -> list[tuple[str, Any]]:
    """``{"a": 1}`` or the environment's ``"a=1,b=2"`` as a list of pairs."""
    if isinstance(value, str):
        pairs: list[tuple[str, Any]] = []
        for item in value.split(","):
            if not item.strip():
                continue
            key, sep, size = item.partition("=")
            if not sep:
                raise ValueError(f"invalid {what} entry {item.strip()!r}: expected PATTERN=SIZE")
            pairs.append((key.strip(), size.strip()))
        return pairs
    if isinstance(value, Mapping):
        return [(str(k), v) for k, v in value.items()]
    raise ValueError(f"invalid {what} {value!r}: expected a mapping of pattern to size")


@refuses("an entry without '=', a pattern not starting with '/', a '*' before the end, a bad size")
def parse_route_limits(value: Any) -> dict[str, int | None | dict[str, int | None]]:
    """``{"/upload/*": "5GiB", "/api/*": "1MiB"}``; a value may also be a mapping of
    content types to sizes (``{"*": "64MiB", "application/json": "64MiB"}``) that
    replaces the content-type limits for that route."""
    routes: dict[str, int | None | dict[str, int | None]] = {}
    for pattern, limit in _pairs(value, "routes"):
        if not pattern.startswith("/") and pattern != "*":
            raise ValueError(f"invalid route pattern {pattern!r}: must start with '/' or be '*'")
        if "*" in pattern[:-1]:
            raise ValueError(f"invalid route pattern {pattern!r}: '*' is allowed only at the end")
        if isinstance(limit, Mapping):
            routes[pattern] = {str(k).strip().lower(): parse_body_limit(v)
                               for k, v in limit.items()}
        else:
            routes[pattern] = parse_body_limit(limit)
    return routes


DEFAULT_CONTENT_TYPE_LIMITS: dict[str, str | None] = {
    "application/json": "1MiB",
    "application/*+json": "1MiB",
    "application/x-www-form-urlencoded": "1MiB",
}


@refuses("an entry without '=', a pattern that is not type/subtype, a bad size")
def parse_content_type_limits(value: Any) -> dict[str, int | None]:
    """Content-type caps, merged over :data:`DEFAULT_CONTENT_TYPE_LIMITS` (a value of
    ``None`` removes a default cap)."""
    limits = {k: parse_body_limit(v) for k, v in DEFAULT_CONTENT_TYPE_LIMITS.items()}
    if value is DEFAULT_CONTENT_TYPE_LIMITS:
        return limits
    for pattern, limit in _pairs(value, "content_types"):
        pattern = pattern.strip().lower()
        if "/" not in pattern or (pattern.count("*") > 1 and pattern != "*/*"):
            raise ValueError(f"invalid media type pattern {pattern!r}: expected type/subtype "
                             "with at most one '*' (or '*/*')")
        limits[pattern] = parse_body_limit(limit)
    return limits


setting(
    "max_body_size", "body", "16MiB", parse_body_limit,
    "The largest request body accepted, in bytes or a size string, for any route without "
    "its own limit; `None` turns the limit off. Defaults to 16 MiB.",
    env="MEMGUARD_MAX_BODY_SIZE",
)
setting(
    "routes", "body", {}, parse_route_limits,
    "Per-route body limits: `{\"/upload/*\": \"5GiB\", \"/api/*\": \"1MiB\"}`. A "
    "pattern is an exact path or a prefix ending in `*`; the longest matching pattern wins "
    "and may raise or lower `max_body_size`. Environment form: `/upload/*=5GiB,/api/*=1MiB`.",
    env="MEMGUARD_BODY_ROUTES",
)
setting(
    "content_types", "body", DEFAULT_CONTENT_TYPE_LIMITS, parse_content_type_limits,
    "Caps per media type (`type/subtype`, `type/*`, `application/*+json`), merged over the "
    "defaults; the effective limit is the smaller of the route limit and this cap. "
    "Defaults to 1 MiB for JSON and url-encoded forms, no cap for other types.",
    env="MEMGUARD_BODY_CONTENT_TYPES",
)
setting(
    "body_idle_timeout", "body", 60.0, parse_seconds,
    "Seconds the app may wait for the next chunk of a request body before the request "
    "is answered with 408; 0 turns it off. Defaults to 60.",
    env="MEMGUARD_BODY_IDLE_TIMEOUT",
)
setting(
    "body_min_rate", "body", 500, parse_size_value,
    "Bytes per second a request body must average once `body_rate_grace` has passed "
    "(Apache's RequestReadTimeout MinRate), else 408; 0 turns it off. Defaults to 500.",
    env="MEMGUARD_BODY_MIN_RATE",
)
setting(
    "body_rate_grace", "body", 20.0, parse_seconds,
    "Seconds from the first read of a body before `body_min_rate` applies; each further "
    "`body_min_rate` bytes received buys one more second. Defaults to 20.",
    env="MEMGUARD_BODY_RATE_GRACE",
)
setting(
    "decompress", "body", False, parse_bool,
    "Decode `Content-Encoding: gzip` and `deflate` request bodies as a stream, applying "
    "the limits to the decoded bytes; other encodings then get 415. Defaults to false "
    "(encoded bodies are passed through and counted as sent).",
    env="MEMGUARD_BODY_DECOMPRESS",
)
setting(
    "max_decoded_size", "body", None, parse_body_limit,
    "With `decompress`, the largest decoded body; none means the request's own body "
    "limit. Defaults to none.",
    env="MEMGUARD_MAX_DECODED_SIZE",
)
setting(
    "max_decompression_ratio", "body", 100.0, parse_positive_float,
    "With `decompress`, the largest decoded/encoded size ratio once more than 1 MiB has "
    "been decoded (zip bombs get 413); 0 turns it off. Defaults to 100.",
    env="MEMGUARD_MAX_DECOMPRESSION_RATIO",
)
setting(
    "report_only", "body", False, parse_bool,
    "Log and count what would be refused, but let every request through (for rolling "
    "memguard out on an existing service). Defaults to false.",
    env="MEMGUARD_REPORT_ONLY",
)


# =====================================================================================
# memory: per-request accounting, admission, worker limits (memguard/memory/)
# =====================================================================================


@refuses("0, 0%, negative")
def parse_memory_limit(value: Any) -> int | str | None:
    """A memory limit: a size, a percentage of the container's limit ("25%"), or off.

    0 is refused: as bytes it would refuse every request and recycle every worker, and
    "off" already says no limit (one meaning everywhere)."""
    limit = parse_optional_size(value)
    if limit == 0 or (isinstance(limit, str) and parse_size(limit, total=100) == 0):
        raise ValueError(f"invalid memory limit {value!r}: 0 would refuse every request; "
                         "write \"off\" for no limit")
    return limit


@refuses("0, 0%, negative")
def parse_worker_limit(value: Any) -> int | str | None:
    """A worker memory limit: :func:`parse_memory_limit`, or ``"auto"`` (derived from
    the container's limit and the worker count)."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    return parse_memory_limit(value)


@refuses("nan, inf, 0, over 1")
def parse_fraction(value: Any) -> float:
    number = parse_positive_float(value)
    if not 0 < number <= 1:
        raise ValueError(f"invalid fraction {value!r}: expected a number in (0, 1]")
    return number


def parse_choice(*choices: str) -> Callable[[Any], str]:
    @refuses(f"anything but {', '.join(choices)}")
    def parse(value: Any) -> str:
        text = str(value).strip().lower()
        if text not in choices:
            raise ValueError(f"invalid choice {value!r}: expected one of {', '.join(choices)}")
        return text

    return parse


@refuses(f"nan, inf, negative, between 0 and 0.05, over {MAX_SECONDS:,.0f}")
def parse_watchdog_interval(value: Any) -> float:
    """0 (off), or seconds long enough that the master is not busy reading /proc."""
    number = parse_seconds(value)
    if 0 < number < 0.05:
        raise ValueError(f"invalid interval {value!r}: 0 (off) or at least 0.05 seconds")
    return number


@refuses("'/', a path not starting with '/', one with spaces or control characters")
def parse_path(value: Any) -> str | None:
    """A URL path the middleware answers itself ("/readyz"), or off."""
    text = parse_optional_str(value)
    if text is None or text.lower() in ("off", "none"):
        return None
    if not text.startswith("/"):
        raise ValueError(f"invalid path {value!r}: must start with '/'")
    if not text.strip("/"):
        # The leak admin path is a prefix: "/" would answer every request (401).
        raise ValueError(f"invalid path {value!r}: it would shadow the app's root; "
                         "give a path of its own, like '/readyz'")
    if any(c.isspace() or not c.isprintable() for c in text):
        raise ValueError(f"invalid path {value!r}: no spaces or control characters")
    return text


MEMORY = "memory"

setting("worker_memory_limit", MEMORY, "auto", parse_worker_limit,
        "A worker's soft memory limit (\"400MiB\", or \"25%\" of the container's "
        "limit, of the host's RAM where there is none): over it (by USS), the worker is "
        "recycled gracefully after its response (by itself, or by the gunicorn "
        "integration's master). Defaults to `auto`: under the gunicorn integration in a "
        "memory-limited container, its pool budget shared by the workers and one "
        "replacement (without a budget, none); elsewhere 85% of the container's limit shared by "
        "the workers plus one, when the limit and the worker count (WEB_CONCURRENCY, "
        "-w/--workers) are known; otherwise off.",
        env="MEMGUARD_WORKER_MEMORY_LIMIT")
setting("worker_memory_hard_limit", MEMORY, "auto", parse_worker_limit,
        "A worker's hard memory limit: over it (RSS), the middleware sheds new requests "
        "with 503 and refuses a body whose buffering would pass it with 413; the gunicorn "
        "integration's master stops a worker over it (USS) even mid-request (SIGTERM, then "
        "SIGKILL after the grace period). Defaults to `auto`: under the gunicorn "
        "integration, 1.25x its derived soft limit (none without one); elsewhere 1.5x the "
        "soft limit, at most 95% of the container's limit.",
        env="MEMGUARD_WORKER_MEMORY_HARD_LIMIT")
setting("container_memory_threshold", MEMORY, 0.95, parse_fraction,
        "Share of the container's memory limit, counted as its working set (usage minus "
        "inactive page cache), above which the worker sheds new requests and reports not "
        "ready: a last resort above the gunicorn watchdog's budget (0.9), which recycles "
        "first. Defaults to 0.95.",
        env="MEMGUARD_CONTAINER_MEMORY_THRESHOLD")
setting("memory_psi_threshold", MEMORY, 10.0, parse_percent,
        "Percent of time (PSI full avg10 of the container's own cgroup v2 group) stalled "
        "on memory above which the worker sheds and reports not ready; 0 turns it off. "
        "Defaults to 10.",
        env="MEMGUARD_MEMORY_PSI_THRESHOLD")
setting("memory_refresh_interval", MEMORY, 0.005, parse_seconds,
        "Seconds a pressure reading (RSS, container usage) is reused before it is read "
        "again. Defaults to 0.005.",
        env="MEMGUARD_MEMORY_REFRESH_INTERVAL")
setting("memory_shed", MEMORY, "all", parse_choice("all", "heavy", "off"),
        "Which new requests get 503 under memory pressure: `all`, `heavy` (methods in "
        "heavy_methods or paths under heavy_paths) or `off`. Defaults to `all`.",
        env="MEMGUARD_MEMORY_SHED")
setting("heavy_methods", MEMORY, "POST,PUT,PATCH", str,
        "Comma-separated methods shed under pressure when memory_shed is `heavy`. "
        "Defaults to `POST,PUT,PATCH`.",
        env="MEMGUARD_HEAVY_METHODS", empty_ok=True)
setting("heavy_paths", MEMORY, "", str,
        "Comma-separated path prefixes shed under pressure when memory_shed is `heavy`. "
        "Defaults to none.",
        env="MEMGUARD_HEAVY_PATHS", empty_ok=True)
setting("memory_retry_after", MEMORY, 5, parse_count,
        "Seconds sent in Retry-After with a 503 for memory pressure. Defaults to 5.",
        env="MEMGUARD_MEMORY_RETRY_AFTER")
setting("body_memory_check_every", MEMORY, "4MiB", parse_size_value,
        "Bytes of request body received between two checks of the worker's memory "
        "against its hard limit. Defaults to 4MiB.",
        env="MEMGUARD_BODY_MEMORY_CHECK_EVERY")
setting("track_memory", MEMORY, True, parse_bool,
        "Sampled per-request memory accounting per route template, with leak suspicion. "
        "Defaults to true.",
        env="MEMGUARD_TRACK_MEMORY")
setting("memory_sample_interval", MEMORY, 0.05, parse_seconds,
        "Seconds between two sampled requests (RSS read before and after). A sample "
        "costs two /proc reads and the accounting's batch: more often gives per-route "
        "growth sooner, at a cost per second that weighs most on a lightly loaded "
        "worker. Defaults to 0.05.",
        env="MEMGUARD_MEMORY_SAMPLE_INTERVAL")
setting("max_routes", MEMORY, 256, parse_count,
        "Route templates tracked before the rest are counted as `other`. Defaults to 256.",
        env="MEMGUARD_MAX_ROUTES")
setting("leak_window", MEMORY, 30.0, parse_seconds,
        "Seconds of one leak-estimation window. Defaults to 30.",
        env="MEMGUARD_LEAK_WINDOW")
setting("leak_windows", MEMORY, 3, parse_count,
        "Windows in a row a route must keep memory to be reported as a suspected leak. "
        "Defaults to 3.",
        env="MEMGUARD_LEAK_WINDOWS")
setting("leak_min_growth", MEMORY, "1MiB", parse_size_value,
        "Memory a route must keep in a window to count toward a leak. Defaults to 1MiB.",
        env="MEMGUARD_LEAK_MIN_GROWTH")
setting("leak_min_objects", MEMORY, 1.0, parse_positive_float,
        "Python objects a route must keep per request, beyond the route that keeps least "
        "and beyond two standard errors of its estimate, to count toward a leak. "
        "Defaults to 1.",
        env="MEMGUARD_LEAK_MIN_OBJECTS")
setting("readiness_path", MEMORY, None, parse_path,
        "Path answered by the middleware with readiness: 200, or 503 under memory "
        "pressure. Defaults to off.",
        env="MEMGUARD_READINESS_PATH")
setting("readiness_details", MEMORY, False, parse_bool,
        "Readiness answers with the worker's pid, memory figures and limits besides "
        "ready/not ready. Off, anyone who can reach the path learns only whether the worker "
        "is ready; turn it on where the path is not public. Defaults to false.",
        env="MEMGUARD_READINESS_DETAILS")
setting("liveness_path", MEMORY, None, parse_path,
        "Path answered by the middleware with liveness: always 200 while the worker "
        "serves, whatever its memory. Defaults to off.",
        env="MEMGUARD_LIVENESS_PATH")
setting("metrics_path", MEMORY, None, parse_path,
        "Path answered by the middleware with Prometheus metrics (needs prometheus-client; "
        "multiprocess mode when PROMETHEUS_MULTIPROC_DIR is set). Defaults to off.",
        env="MEMGUARD_METRICS_PATH")
setting("metrics_cache", MEMORY, 1.0, parse_seconds,
        "Seconds a rendered metrics scrape is served again before it is rebuilt. A scrape "
        "reads every worker's `smaps_rollup` (a cost that grows with the workers' size and "
        "number) and syncs the counters; the cache bounds that work to once per interval "
        "however often, or by how many, the path is fetched. 0 rebuilds every scrape. "
        "Defaults to 1.",
        env="MEMGUARD_METRICS_CACHE")
setting("leak_admin_path", MEMORY, None, parse_path,
        "Path prefix of the leak-report admin endpoint (`/start`, `/report`, `/stop`); "
        "needs leak_admin_token. Defaults to off.",
        env="MEMGUARD_LEAK_ADMIN_PATH")
setting("leak_admin_token", MEMORY, None, parse_optional_str,
        "Token the leak-report admin endpoint requires (Authorization: Bearer), compared "
        "in constant time. Defaults to none.",
        env="MEMGUARD_LEAK_ADMIN_TOKEN")




def _in_order(soft: Any, hard: Any, strict: bool) -> bool | None:
    """Whether the hard limit is above the soft one (or equal, unless ``strict``), when
    both are known here (two sizes, or two percentages of the same total); ``None``
    when only the component can tell (``auto``, a size against a percentage)."""
    if isinstance(soft, str) and isinstance(hard, str) and "auto" not in (soft, hard):
        soft, hard = parse_size(soft, total=10**12), parse_size(hard, total=10**12)
    if isinstance(soft, int) and isinstance(hard, int):
        return hard > soft or (hard == soft and not strict)
    return None


def _check_hard_above_soft(values: dict[str, Any], soft: str, hard: str,
                           strict: bool) -> None:
    if _in_order(values[soft], values[hard], strict) is False:
        relation = "above" if strict else "at least"
        raise ValueError(f"memguard option {describe(hard)} ({values[hard]}) must be "
                         f"{relation} {describe(soft)} ({values[soft]})")


@check(MEMORY)
def _worker_limits_in_order(values: dict[str, Any]) -> None:
    # Not strict: the soft limit is compared with USS, the hard one with RSS.
    _check_hard_above_soft(values, "worker_memory_limit", "worker_memory_hard_limit",
                           strict=False)


@check(MEMORY)
def _endpoints_apart(values: dict[str, Any]) -> None:
    """Each path the middleware answers itself is its own, and the leak admin, which
    answers a whole prefix, shadows none of the others."""
    names = ("readiness_path", "liveness_path", "metrics_path", "leak_admin_path")
    seen: dict[str, str] = {}
    for name in names:
        path = values[name]
        if path is None:
            continue
        if path in seen:
            raise ValueError(f"memguard options {describe(seen[path])} and {describe(name)} "
                             f"are both {path!r}: each endpoint needs a path of its own")
        seen[path] = name
    admin = values["leak_admin_path"]
    if admin is None:
        return
    for name in names[:-1]:
        path = values[name]
        if path is not None and path.startswith(admin.rstrip("/") + "/"):
            raise ValueError(f"memguard option {describe(name)} ({path!r}) is under "
                             f"{describe('leak_admin_path')} ({admin!r}), which would "
                             "answer it")
    if not values["leak_admin_token"]:
        raise ValueError(f"memguard option {describe('leak_admin_path')} needs "
                         f"{describe('leak_admin_token')}: an admin endpoint without one "
                         "is refused")


# =====================================================================================
# gunicorn: worker recycling, the master's watchdog (memguard/gunicorn/)
# =====================================================================================

# The environment names are the contract of ``gunicorn -c python:memguard.gunicorn.conf``.
# The worker limits are the ``memory`` section's ``worker_memory_limit`` and
# ``worker_memory_hard_limit``: one variable, one setting, read by the middleware and the
# master alike. The options here carry a ``gunicorn_`` prefix; ``install()`` also accepts
# them without it.

setting(
    "gunicorn_total_memory_limit", "gunicorn", None, parse_memory_limit,
    "The whole pool's memory budget (master, workers, one booting replacement); near it "
    "the master recycles the largest worker; \"off\" turns it off. Defaults to 90% of the "
    "cgroup's limit when there is one, otherwise none.",
    env="MEMGUARD_TOTAL_MEMORY_LIMIT",
)
setting(
    "gunicorn_hard_limit_grace", "gunicorn", 1.0, parse_seconds,
    "Seconds a worker stopped for its hard limit has between SIGTERM and SIGKILL. "
    "Defaults to 1.0.",
    env="MEMGUARD_HARD_LIMIT_GRACE",
)
setting(
    "gunicorn_watchdog_interval", "gunicorn", 1.0, parse_watchdog_interval,
    "Seconds between the master watchdog's reads of every worker's USS/PSS and the "
    "cgroup's usage (four times as often while a worker is over its soft limit or the "
    "pool is near its budget); 0 turns the watchdog off. Defaults to 1.0.",
    env="MEMGUARD_WATCHDOG_INTERVAL",
)
setting(
    "gunicorn_max_concurrent_recycles", "gunicorn", 1, parse_at_least_one,
    "How many workers the master may have recycling (draining or booting) at once when "
    "it recycles on its own initiative, so capacity never collapses. Defaults to 1.",
    env="MEMGUARD_MAX_CONCURRENT_RECYCLES",
)
setting(
    "gunicorn_min_worker_lifetime", "gunicorn", 1.0, parse_seconds,
    "Seconds a worker lives before the master's watchdog may recycle it for its soft "
    "limit or the pool budget (the hard limit always applies). Defaults to 1.0.",
    env="MEMGUARD_MIN_WORKER_LIFETIME",
)
setting(
    "gunicorn_gc_freeze", "gunicorn", False, parse_bool,
    "With --preload, call gc.freeze() in the master before each fork so a worker's "
    "garbage collections do not turn pages shared with the master private. "
    "Defaults to false.",
    env="MEMGUARD_GC_FREEZE",
)
setting(
    "gunicorn_gc_freeze_at_fork", "gunicorn", True, parse_bool,
    "Without --preload, each worker calls gc.freeze() as it starts, so its garbage "
    "collections never walk the objects it inherited from the master (gunicorn's, "
    "memguard's, the config's: they live as long as the worker anyway). A full "
    "collection in a worker then takes 0.3 ms instead of 11-18 ms and leaves about "
    "9 MiB of pages shared with the master (measured). The app's own objects are never "
    "frozen (with --preload, see MEMGUARD_GC_FREEZE). Defaults to true.",
    env="MEMGUARD_GC_FREEZE_AT_FORK",
)
setting(
    "gunicorn_fast_exit", "gunicorn", True, parse_bool,
    "A worker memguard recycled runs its atexit handlers, joins its threads and flushes "
    "its logs, then exits without the interpreter's teardown (as multiprocessing's "
    "children do): that teardown touches every object and turns the pages the worker "
    "shares with the master private, about 45 ms of CPU per recycle here. Defaults to "
    "true.",
    env="MEMGUARD_FAST_EXIT",
)


@check("gunicorn")
def _gunicorn_limits_in_order(values: dict[str, Any]) -> None:
    # The master compares both limits with USS: equal limits would make the soft one
    # useless. (Resolved with the memory section, whose values these are.)
    if "worker_memory_limit" in values:
        _check_hard_above_soft(values, "worker_memory_limit", "worker_memory_hard_limit",
                               strict=True)


# =====================================================================================
# uploads: streaming saves to disk (memguard/uploads/)
# =====================================================================================


@refuses("negative")
def parse_storage_floor(value: Any) -> int | str:
    """A size, or a percentage of the target filesystem's size ("5%"); 0 turns it off."""
    parsed = parse_optional_size(value)
    return 0 if parsed is None else parsed


@refuses("negative, a percentage")
def parse_optional_bytes(value: Any) -> int | None:
    """A size in bytes or ``None``/"off"; percentages make no sense here."""
    parsed = parse_optional_size(value)
    if isinstance(parsed, str):
        raise ValueError(f"invalid size {value!r}: a percentage is not allowed here")
    return parsed


setting(
    "upload_max_size", "uploads", "1GiB", parse_size_value,
    "Largest body `save_body`/`save_multipart` accept when neither a `max_size=` argument "
    "nor the body-guard middleware's route limit applies (413 above it). Defaults to 1 GiB.",
    env="MEMGUARD_UPLOAD_MAX_SIZE", type_doc="size",
)
setting(
    "upload_fsync", "uploads", False, parse_bool,
    "fsync each saved file before it gets its name, and its directory after, so a saved "
    "upload survives a power cut. Off, a saved file is still whole or absent while the "
    "machine runs (atomic rename), as with Starlette, Django and Werkzeug, which never "
    "fsync; on, the call also waits for the disk (1.2x the time of a hand-written loop "
    "for 652 MB here). Defaults to off.",
    env="MEMGUARD_UPLOAD_FSYNC", type_doc="bool",
)
setting(
    "upload_min_free", "uploads", "256MiB", parse_storage_floor,
    "Free space to keep on the target filesystem: an upload that would leave less is "
    "refused with 507 (before reading when Content-Length is known). A size or a "
    "percentage of the filesystem (\"5%\"); 0 turns it off. Defaults to 256 MiB.",
    env="MEMGUARD_UPLOAD_MIN_FREE", type_doc="size or %",
)
setting(
    "upload_request_quota", "uploads", None, parse_optional_bytes,
    "Most bytes one call may write to disk, all files together (507 above it). Defaults "
    "to no quota beyond the body limit.",
    env="MEMGUARD_UPLOAD_REQUEST_QUOTA", type_doc="size",
)
setting(
    "upload_process_quota", "uploads", None, parse_optional_bytes,
    "Most bytes this worker process may hold in unfinished upload files at once, across "
    "concurrent requests (507 above it). Defaults to no quota.",
    env="MEMGUARD_UPLOAD_PROCESS_QUOTA", type_doc="size",
)
setting(
    "upload_batch_size", "uploads", "1MiB", parse_size_value,
    "Bytes gathered before one write to disk in a writer thread; the memory one upload "
    "holds is at most about five times this (three batches in flight). Defaults to 1 MiB.",
    env="MEMGUARD_UPLOAD_BATCH_SIZE", type_doc="size",
)
setting(
    "upload_max_parts", "uploads", 1000, parse_count,
    "Most parts (fields and files) in one multipart body; counting stops the parse at the "
    "first part over it (413). Defaults to 1000.",
    env="MEMGUARD_UPLOAD_MAX_PARTS", type_doc="int",
)
setting(
    "upload_max_fields", "uploads", 1000, parse_count,
    "Most non-file fields in one multipart body (413). Defaults to 1000.",
    env="MEMGUARD_UPLOAD_MAX_FIELDS", type_doc="int",
)
setting(
    "upload_max_files", "uploads", 100, parse_count,
    "Most files in one multipart body (413). Defaults to 100.",
    env="MEMGUARD_UPLOAD_MAX_FILES", type_doc="int",
)
setting(
    "upload_max_field_size", "uploads", "1MiB", parse_size_value,
    "Largest value of one non-file field, which is held in memory (413). Defaults to 1 MiB.",
    env="MEMGUARD_UPLOAD_MAX_FIELD_SIZE", type_doc="size",
)
setting(
    "upload_max_fields_memory", "uploads", "4MiB", parse_size_value,
    "Most memory the non-file fields of one multipart body may hold together, counted as "
    "the strings they become (a field with one character beyond Latin-1 takes up to four "
    "bytes per character), like Django's DATA_UPLOAD_MAX_MEMORY_SIZE (413 "
    "`fields_over_memory_limit` above it). Defaults to 4 MiB.",
    env="MEMGUARD_UPLOAD_MAX_FIELDS_MEMORY", type_doc="size",
)
setting(
    "upload_max_file_size", "uploads", None, parse_optional_bytes,
    "Largest single file in a multipart body (413). Defaults to the body limit.",
    env="MEMGUARD_UPLOAD_MAX_FILE_SIZE", type_doc="size",
)
setting(
    "upload_max_part_header_size", "uploads", "4KiB", parse_size_value,
    "Longest header line of one multipart part (400 above it). Defaults to 4 KiB.",
    env="MEMGUARD_UPLOAD_MAX_PART_HEADER_SIZE", type_doc="size",
)
setting(
    "upload_max_part_headers", "uploads", 8, parse_count,
    "Most header lines in one multipart part (400 above it). Defaults to 8.",
    env="MEMGUARD_UPLOAD_MAX_PART_HEADERS", type_doc="int",
)
setting(
    "upload_parse_budget", "uploads", 5.0, parse_seconds,
    "Seconds of parser time one multipart body may use; a backstop behind the part caps "
    "against bodies built to be slow to parse (408 above it). Defaults to 5.",
    env="MEMGUARD_UPLOAD_PARSE_BUDGET", type_doc="seconds",
)
setting(
    "upload_tmpfile", "uploads", True, parse_bool,
    "Write uploads to a nameless O_TMPFILE file (Linux) that gets its name only when "
    "complete, so not even a killed worker leaves a partial file; off, or where the "
    "filesystem lacks it, a hidden `.memguard-*.part` file next to the destination is "
    "used and removed on failure. Defaults to on.",
    env="MEMGUARD_UPLOAD_TMPFILE", type_doc="bool",
)


# =====================================================================================
# Typed sections: what components are built from, each field one option of a section
# =====================================================================================

_Typed = TypeVar("_Typed", bound="SectionOptions")


@dataclass(frozen=True)
class SectionOptions:
    """A section's values as a typed object: one field per option, named as the option
    without the section's ``PREFIX``. Built only from the registry, never by hand."""

    SECTION: ClassVar[str]
    PREFIX: ClassVar[str] = ""

    @classmethod
    def resolve(cls: type[_Typed], options: Mapping[str, Any],
                environ: Mapping[str, str] | None = None) -> _Typed:
        """From keywords (without the prefix), then ``MEMGUARD_*`` variables, then
        defaults; refused values raise ``ValueError`` naming the option."""
        given = {f"{cls.PREFIX}{k}": v for k, v in options.items()}
        return cls.from_values(resolve([cls.SECTION], given, environ))

    @classmethod
    def from_values(cls: type[_Typed], values: Mapping[str, Any]) -> _Typed:
        """From :func:`resolve`'s dict (which may hold other sections too)."""
        return cls(**{name.removeprefix(cls.PREFIX): value for name, value in values.items()
                      if SETTINGS[name].section == cls.SECTION})


@dataclass(frozen=True)
class BodyOptions(SectionOptions):
    """The ``body`` section."""

    SECTION: ClassVar[str] = "body"

    max_body_size: int | None
    routes: dict[str, int | None | dict[str, int | None]]
    content_types: dict[str, int | None]
    body_idle_timeout: float
    body_min_rate: int
    body_rate_grace: float
    decompress: bool
    max_decoded_size: int | None
    max_decompression_ratio: float
    report_only: bool


@dataclass(frozen=True)
class MemoryOptions(SectionOptions):
    """The ``memory`` section."""

    SECTION: ClassVar[str] = "memory"

    worker_memory_limit: int | str | None
    worker_memory_hard_limit: int | str | None
    container_memory_threshold: float
    memory_psi_threshold: float
    memory_refresh_interval: float
    memory_shed: str
    heavy_methods: str
    heavy_paths: str
    memory_retry_after: int
    body_memory_check_every: int
    track_memory: bool
    memory_sample_interval: float
    max_routes: int
    leak_window: float
    leak_windows: int
    leak_min_growth: int
    leak_min_objects: float
    readiness_path: str | None
    readiness_details: bool
    liveness_path: str | None
    metrics_path: str | None
    metrics_cache: float
    leak_admin_path: str | None
    leak_admin_token: str | None


@dataclass(frozen=True)
class GunicornOptions(SectionOptions):
    """The ``gunicorn`` section (the worker limits are :class:`MemoryOptions`')."""

    SECTION: ClassVar[str] = "gunicorn"
    PREFIX: ClassVar[str] = "gunicorn_"

    total_memory_limit: int | str | None
    hard_limit_grace: float
    watchdog_interval: float
    max_concurrent_recycles: int
    min_worker_lifetime: float
    gc_freeze: bool
    gc_freeze_at_fork: bool
    fast_exit: bool


@dataclass(frozen=True)
class UploadOptions(SectionOptions):
    """The ``uploads`` section: each field is the option without its ``upload_`` prefix
    (``max_size`` is ``upload_max_size``); per-call options to ``save_*`` use the same
    short names."""

    SECTION: ClassVar[str] = "uploads"
    PREFIX: ClassVar[str] = "upload_"

    max_size: int
    fsync: bool
    min_free: int | str
    request_quota: int | None
    process_quota: int | None
    batch_size: int
    max_parts: int
    max_fields: int
    max_files: int
    max_field_size: int
    max_fields_memory: int
    max_file_size: int | None
    max_part_header_size: int
    max_part_headers: int
    parse_budget: float
    tmpfile: bool
