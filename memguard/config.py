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
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from memguard.sizes import parse_size

__all__ = [
    "SETTINGS",
    "Setting",
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


SETTINGS: dict[str, Setting] = {}


def _register(setting: Setting) -> Setting:
    if setting.name in SETTINGS:
        raise RuntimeError(f"option {setting.name!r} declared twice")
    SETTINGS[setting.name] = setting
    return setting


def setting(
    name: str, section: str, default: Any, parse: Callable[[Any], Any], doc: str, *,
    env: str | None = None, type_doc: str = "",
) -> Setting:
    return _register(Setting(name, section, default, parse, doc, env, type_doc))


# ---- parsers ------------------------------------------------------------------------


def parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off", ""):
            return False
    raise ValueError(f"invalid boolean {value!r}: expected true/false, 1/0, yes/no, on/off")


def parse_optional_size(value: Any) -> int | str | None:
    """A size, ``None``/"off"/"none" for no limit. Percentages are kept as strings
    (``"25%"``): only the component knows the total they are a fraction of."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        if text.lower() in ("", "none", "off", "unlimited"):
            return None
        if text.endswith("%"):
            parse_size(text, total=100)  # validates the number
            return text
    return parse_size(value)


def parse_size_value(value: Any) -> int:
    return parse_size(value)


def parse_positive_float(value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"invalid number {value!r}") from None
    if number < 0:
        raise ValueError(f"invalid number {value!r}: must not be negative")
    return number


def parse_int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError(f"invalid integer {value!r}")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"invalid integer {value!r}") from None


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
            values[name] = s.parse(raw)
        except ValueError as exc:
            raise ValueError(f"memguard option {name!r} (from {origin}): {exc}") from None
    return values


def reference_markdown(sections: Iterable[str] | None = None) -> str:
    """The options reference, generated from :data:`SETTINGS` (docs/options.md)."""
    order: list[str] = []
    for s in SETTINGS.values():
        if s.section not in order and (sections is None or s.section in sections):
            order.append(s.section)
    out = ["# memguard options", "",
           "Generated from `memguard/config.py` by `memguard options --markdown`; "
           "do not edit by hand.", ""]
    for section in order:
        out += [f"## {section}", "", "| option | environment | default | description |",
                "|---|---|---|---|"]
        for s in SETTINGS.values():
            if s.section != section:
                continue
            env = f"`{s.env}`" if s.env else ""
            default = "none" if s.default is None else f"`{s.default!r}`"
            doc = s.doc.replace("|", "\\|").replace("\n", " ")
            out.append(f"| `{s.name}` | {env} | {default} | {doc} |")
        out.append("")
    return "\n".join(out)


# =====================================================================================
# body: request-body policy (memguard/body.py, asgi.py, wsgi.py)
# =====================================================================================


# =====================================================================================
# memory: per-request accounting, admission, worker limits (tracking.py, admission.py)
# =====================================================================================


# =====================================================================================
# gunicorn: worker recycling, the master's watchdog (memguard/gunicorn/)
# =====================================================================================


# =====================================================================================
# uploads: streaming saves to disk (memguard/uploads.py)
# =====================================================================================
