"""A ready gunicorn config: ``gunicorn -c python:memguard.gunicorn.conf -w 4 myapp:app``.

Limits come from the environment::

    MEMGUARD_WORKER_MEMORY_LIMIT=80MiB       # or "25%" of the container's limit: soft,
                                             # the worker finishes its requests and is replaced
    MEMGUARD_WORKER_MEMORY_HARD_LIMIT=120MiB # the master stops the worker, even mid-request
    MEMGUARD_TOTAL_MEMORY_LIMIT=360MiB       # the pool's budget (default: 90% of the cgroup limit)

With none of them set inside a memory-limited container, the worker limits are derived
from the pool's budget and the worker count, and the first log line says what was chosen.

Every other gunicorn setting stays on the command line (``-w``, ``-k``, ``--preload``...).
"""

from memguard.gunicorn import install

install(globals())
