"""The optional C extension (everything else is in pyproject.toml).

``memguard._speedups`` is the per-chunk path of the ASGI body guard. ``optional=True``:
where it cannot be compiled (no compiler, another interpreter) the install goes on
without it and memguard uses the same logic in Python.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("memguard._speedups", ["memguard/_speedups.c"], optional=True)])
