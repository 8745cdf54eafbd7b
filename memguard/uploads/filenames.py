"""A client's file name made fit for display, and checks for names the server picks.

A name sent in a multipart ``filename=`` parameter is attacker-controlled text. memguard
never uses it as a path (files are stored under generated names); it is kept only so
an application can show it, and :func:`display_name` makes that safe to do: no path
separators, no control or bidirectional-override characters (which can make
``evil\\u202Efdp.exe`` render as ``evilexe.pdf``), NFKC-normalised (so fullwidth
``\\uFF0F`` cannot pass for ``/``), no Windows device names, and a bounded length.
"""

from __future__ import annotations

import re
import unicodedata

__all__ = ["MAX_DISPLAY_NAME", "display_name", "is_safe_component"]

MAX_DISPLAY_NAME = 255
"""Longest display name returned, in characters (and at most this many UTF-8 bytes)."""

# Windows refuses these as file names with any extension ("CON.txt" opens the console).
_DEVICE_NAMES = frozenset(
    ["CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$"]
    + [f"COM{i}" for i in range(10)] + [f"LPT{i}" for i in range(10)]
    + ["COM\u00b9", "COM\u00b2", "COM\u00b3", "LPT\u00b9", "LPT\u00b2", "LPT\u00b3"]
)

# Characters Windows forbids in names; replaced so a name shown there can also be typed.
_WINDOWS_RESERVED = re.compile(r'[<>:"|?*]')


def _drop(char: str) -> bool:
    """Control (Cc), format (Cf: bidi overrides, zero-width), unassigned, surrogates,
    private use, line and paragraph separators."""
    return unicodedata.category(char) in ("Cc", "Cf", "Cn", "Cs", "Co", "Zl", "Zp")


def display_name(raw: str | bytes | None, *, max_length: int = MAX_DISPLAY_NAME) -> str:
    """The client's file name, sanitised for display only (never use it as a path).

    Bytes are decoded as UTF-8 (invalid sequences become U+FFFD). The result contains no
    ``/``, ``\\``, NUL, control or bidi characters, is not ``.`` or ``..``, does not start
    with a dot or end with a dot or space, is not a Windows device name, and has at most
    ``max_length`` characters and ``max_length`` UTF-8 bytes, the extension kept where
    it fits. It may be empty (the client sent no usable name).
    """
    if raw is None:
        return ""
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    # Normalising can expose what removing characters hid and the other way round
    # ("\uFF0E\u200b\uFF0E" -> ".."), so clean until nothing changes (two passes in
    # practice, bounded anyway).
    for _ in range(8):
        cleaned = _clean(text)
        if cleaned == text:
            break
        text = cleaned
    else:
        text = "".join(c for c in text if c.isalnum() or c in " -_.")[:max_length].strip(" .")
    stem = text.partition(".")[0]
    if stem.upper().rstrip(" ") in _DEVICE_NAMES:
        text = f"_{text}"
    return _truncate(text, max_length)


def _clean(text: str) -> str:
    # NFKC first: compatibility forms (fullwidth solidus, ligatures) fold into the plain
    # characters the checks below look for.
    text = unicodedata.normalize("NFKC", text)
    # Basename over both separators: browsers on Windows sent full paths (C:\\x\\y.txt).
    text = text.replace("\\", "/").rsplit("/", 1)[-1]
    text = "".join(" " if c in "\t\n\r" else c for c in text if c in "\t\n\r" or not _drop(c))
    text = _WINDOWS_RESERVED.sub("_", text)
    text = " ".join(text.split())  # collapse whitespace runs
    return text.strip(" .")


def _truncate(text: str, max_length: int) -> str:
    limit = max(1, max_length)

    def fits(s: str) -> bool:
        return len(s) <= limit and len(s.encode("utf-8")) <= limit

    if fits(text):
        return text
    stem, dot, ext = text.rpartition(".")
    if dot and stem and 0 < len(ext) <= 16 and fits("x." + ext):
        tail = "." + ext
    else:
        stem, tail = text, ""
    stem = stem[: max(0, limit - len(tail))]
    while stem and not fits(stem + tail):
        # Cut by characters, checking bytes (never splits a UTF-8 sequence): a character
        # is at most 4 bytes, so this removes what is needed and at most 3 bytes more.
        excess = len((stem + tail).encode("utf-8")) - limit
        stem = stem[: len(stem) - max(1, -(-excess // 4))]
    result = (stem.rstrip(" .") + tail) if stem else tail.lstrip(".")
    return result if fits(result) else result[:0]


def is_safe_component(name: str) -> bool:
    """True if ``name`` is one plain path component: not empty, not ``.``/``..``, no
    separator, NUL or control character, at most 255 UTF-8 bytes. Names returned by a
    caller's naming function must pass this before memguard creates anything."""
    if not name or name in (".", ".."):
        return False
    if "/" in name or "\\" in name or "\x00" in name:
        return False
    if any(unicodedata.category(c) == "Cc" for c in name):
        return False
    return len(name.encode("utf-8", "surrogatepass")) <= 255
