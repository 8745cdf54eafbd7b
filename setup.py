"""The optional C extension (everything else is in pyproject.toml).

``memguard._speedups`` is the per-chunk path of the ASGI body guard. ``optional=True``:
where it cannot be compiled (no compiler, another interpreter) the install goes on
without it and memguard uses the same logic in Python.
"""

import sys

from setuptools import Extension, setup

# -fno-plt: the calls into libpython go through the GOT, not through a PLT stub each.
# Per 64 KiB chunk the interpreter's own code already overflows the instruction cache,
# so every stub the C path touches is a miss (cachegrind: about 10 of its 45 a chunk).
# -O3 whatever the interpreter was built with (Debian's CFLAGS say -O2): built with -O2,
# the 64 MiB upload's overhead was 3.07 and 3.28 % against 2.88 and 2.74 % with -O3
# (benchmarks/body_guard.py's uploads, ten alternating processes each, twice).
flags = ["-fno-plt"] if sys.platform.startswith("linux") else []
if sys.platform != "win32":
    flags.append("-O3")
setup(ext_modules=[Extension("memguard._speedups", ["memguard/_speedups.c"],
                             extra_compile_args=flags, optional=True),
                   # The accounting's RSS read in one C call (memguard.probes).
                   Extension("memguard._rss", ["memguard/_rss.c"], optional=True)])
