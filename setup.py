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
flags = ["-fno-plt"] if sys.platform.startswith("linux") else []
setup(ext_modules=[Extension("memguard._speedups", ["memguard/_speedups.c"],
                             extra_compile_args=flags, optional=True),
                   # The accounting's RSS read in one C call (memguard.probes).
                   Extension("memguard._rss", ["memguard/_rss.c"], optional=True)])
