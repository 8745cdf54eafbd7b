"""Byte sizes as people write them ("512MiB", "1.5GB", "64k", "80%") and back.

Units, case-insensitive:

- IEC units are powers of 1024: ``KiB``, ``MiB``, ``GiB``, ``TiB``.
- SI units with a ``B`` are powers of 1000: ``kB``/``KB``, ``MB``, ``GB``, ``TB``.
- A bare letter (``k``, ``m``, ``g``, ``t``), as nginx, Docker and Kubernetes'
  ``Mi``/``Gi`` spell them, is a power of 1024: ``64k`` is 65536 bytes. ``Ki``/``Mi``/
  ``Gi``/``Ti`` are accepted as well.
- A plain number, or a number followed by ``B``, is bytes. Fractions are allowed
  (``1.5GB``) and rounded down to whole bytes.
- A percentage (``80%``) is a fraction of a total the caller supplies, for example
  the container's memory limit.
"""

from __future__ import annotations

import re

__all__ = ["parse_size", "format_size", "SizeLike"]

SizeLike = int | str

_KI = 1024
_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "k": _KI,
    "ki": _KI,
    "kib": _KI,
    "kb": 1000,
    "m": _KI**2,
    "mi": _KI**2,
    "mib": _KI**2,
    "mb": 1000**2,
    "g": _KI**3,
    "gi": _KI**3,
    "gib": _KI**3,
    "gb": 1000**3,
    "t": _KI**4,
    "ti": _KI**4,
    "tib": _KI**4,
    "tb": 1000**4,
}

_SIZE_RE = re.compile(r"^\s*(?P<num>\d+(?:\.\d+)?|\.\d+)\s*(?P<unit>[a-zA-Z]*)\s*$")
_PERCENT_RE = re.compile(r"^\s*(?P<num>\d+(?:\.\d+)?)\s*%\s*$")


def parse_size(value: SizeLike, total: int | None = None) -> int:
    """Return ``value`` in bytes.

    ``total`` is what a percentage is a fraction of; a percentage without one is an
    error, since guessing a total (the host's RAM, say) is how containers get killed.
    """
    if isinstance(value, bool):  # bool is an int subclass; True bytes is a bug upstream
        raise ValueError(f"invalid size {value!r}: expected bytes or a string like '512MiB'")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"invalid size {value!r}: sizes cannot be negative")
        return value
    if not isinstance(value, str):
        raise ValueError(f"invalid size {value!r}: expected bytes or a string like '512MiB'")
    percent = _PERCENT_RE.match(value)
    if percent is not None:
        if total is None:
            raise ValueError(
                f"invalid size {value!r}: a percentage needs a known total "
                "(no container memory limit was found)"
            )
        fraction = float(percent.group("num")) / 100.0
        if fraction > 1.0:
            raise ValueError(f"invalid size {value!r}: a percentage cannot exceed 100%")
        return int(total * fraction)
    match = _SIZE_RE.match(value)
    if match is None:
        raise ValueError(
            f"invalid size {value!r}: expected a number with an optional unit, "
            "like '512MiB', '1.5GB', '64k' or '80%'"
        )
    unit = match.group("unit").lower()
    multiplier = _UNITS.get(unit)
    if multiplier is None:
        raise ValueError(
            f"invalid size {value!r}: unknown unit {match.group('unit')!r} "
            "(use B, KiB, MiB, GiB, TiB, kB, MB, GB, TB, or k, m, g, t)"
        )
    return int(float(match.group("num")) * multiplier)


def format_size(num_bytes: int | float | None) -> str:
    """Format a byte count for people and logs: ``format_size(536870912) == '512.0 MiB'``.

    ``None`` means "no limit" throughout memguard and is shown as ``unlimited``.
    """
    if num_bytes is None:
        return "unlimited"
    sign = "-" if num_bytes < 0 else ""
    amount = float(abs(num_bytes))
    if amount < _KI:
        return f"{sign}{int(amount)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        amount /= _KI
        if amount < _KI or unit == "TiB":
            return f"{sign}{amount:.1f} {unit}"
    raise AssertionError("unreachable")
