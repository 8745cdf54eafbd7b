"""Memory admission: admit or shed a request, stop a body that would sink the worker,
ask for a recycle after a response.

One :class:`MemoryAdmission` per worker holds a *pressure level* computed from the
worker's RSS against its limits and from the container's usage against its limit (and
the container's own PSI where the kernel gives it). The level is cached and refreshed at
most every ``refresh_interval`` (5 ms by default): the per-request cost is one integer
comparison against ``time.monotonic_ns()``.

The ladder of reads, cheapest first:

- RSS from ``/proc/self/statm`` and the cgroup's usage through a kept-open descriptor,
  on each refresh (about 4 us every few milliseconds);
- PSI (``memory.pressure``), at most once a second;
- USS from ``smaps_rollup`` (0.25 to 8 ms), only when RSS has passed the soft limit,
  at most once per ``uss_interval``: USS <= RSS, so an RSS under the limit proves USS is.

Levels: ``OK``; ``ELEVATED`` (the worker is over its soft limit: it asks to be recycled
after its response, and keeps serving); ``CRITICAL`` (the worker is over its hard limit,
or the container's usage is over ``container_threshold`` of its limit, or the
container's memory PSI is over ``psi_threshold``): new requests are shed with 503 and
``Retry-After``, and readiness says not ready, so a load balancer sends traffic
elsewhere. Liveness never depends on memory.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from memguard import events, recycle, system
from memguard.config import default
from memguard.errors import BodyTooLarge, MemoryPressure
from memguard.memory.worker_limits import derive_worker_limits
from memguard.sizes import format_size

__all__ = [
    "CRITICAL",
    "ELEVATED",
    "LEVEL_NAMES",
    "OK",
    "BodyMemoryGuard",
    "MemoryAdmission",
]

log = logging.getLogger("memguard.admission")

OK, ELEVATED, CRITICAL = 0, 1, 2
LEVEL_NAMES = ("ok", "elevated", "critical")

_PSI_INTERVAL_NS = 1_000_000_000


class MemoryAdmission:
    """The worker's memory pressure and the decisions that follow from it.

    ``soft_limit`` and ``hard_limit`` are bytes of this worker's memory (``None``: no
    worker limit). ``shed`` is ``"all"`` (shed every new request under pressure),
    ``"heavy"`` (only methods in ``heavy_methods`` or paths under ``heavy_paths``) or
    ``"off"``. ``rss``, ``cgroup_usage``, ``psi`` and ``uss`` are the probes, replaceable
    for tests that must control what the worker "sees".
    """

    def __init__(
        self,
        *,
        soft_limit: int | None = None,
        hard_limit: int | None = None,
        container_limit: int | None = None,
        container_threshold: float = default("container_memory_threshold"),
        psi_threshold: float | None = default("memory_psi_threshold"),
        refresh_interval: float = default("memory_refresh_interval"),
        uss_interval: float = 1.0,
        shed: str = default("memory_shed"),
        heavy_methods: Iterable[str] = ("POST", "PUT", "PATCH"),
        heavy_paths: Iterable[str] = (),
        retry_after: int = default("memory_retry_after"),
        body_check_every: int = default("body_memory_check_every"),
        rss: Callable[[], int] = system.current_rss,
        cgroup_usage: Callable[[], int | None] | None = None,
        psi: Callable[[], float | None] | None = None,
        uss: Callable[[], int | None] | None = None,
        reclaimable: Callable[[], int] | None = None,
        recycle_after_response: bool = True,
    ) -> None:
        if shed not in ("all", "heavy", "off"):
            raise ValueError(f"shed must be 'all', 'heavy' or 'off', not {shed!r}")
        if soft_limit is not None and hard_limit is not None and hard_limit < soft_limit:
            raise ValueError(
                f"worker hard limit {format_size(hard_limit)} is below its soft limit "
                f"{format_size(soft_limit)}"
            )
        self.soft_limit = soft_limit
        self.hard_limit = hard_limit
        self.container_limit = container_limit
        self.container_threshold = container_threshold
        self.psi_threshold = psi_threshold
        self.refresh_ns = int(refresh_interval * 1e9)
        self.uss_interval_ns = int(uss_interval * 1e9)
        self.shed = shed
        self.heavy_methods = frozenset(m.upper() for m in heavy_methods)
        self.heavy_paths = tuple(heavy_paths)
        self.retry_after = retry_after
        self.body_check_every = max(64 << 10, body_check_every)
        self._rss = rss
        self._cgroup_usage = cgroup_usage
        self._psi = psi
        self._uss = uss if uss is not None else recycle.own_uss
        # The container's page cache the kernel drops before any OOM kill (inactive
        # file pages): read only when usage looks high, to judge the working set.
        self._reclaimable = reclaimable
        # The after-response recycle check, on this worker's soft limit; not used where
        # a server integration observes every request itself (recycle_after_response).
        self._recycle_after_response = recycle_after_response
        self.recycle_decision = recycle.RecycleDecision(
            soft_limit, hard_limit, soft_reason="worker_memory_limit")
        self._retry_headers = {"Retry-After": str(retry_after)}
        # Cached figures, refreshed by refresh().
        self.level = OK
        self.reason = ""
        self.rss = 0
        self.container_usage: int | None = None
        self.pressure_stall: float | None = None
        self.uss: int | None = None
        self.checked_ns = -(1 << 62)
        if not self.judges():
            # Nothing to hold the worker's memory against: the level stays OK, and no
            # request reads anything for it (readers of the figures refresh on demand).
            self.refresh_ns = 1 << 63
        self._psi_checked_ns = -(1 << 62)
        self._uss_checked_ns = -(1 << 62)
        self._last_logged_level = OK

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> MemoryAdmission:
        """Build one from resolved ``memory`` options (see :mod:`memguard.config`)."""
        cgroup = system.read_cgroup()
        container_limit = cgroup.limit if cgroup is not None else None
        soft, hard = derive_worker_limits(
            options["worker_memory_limit"], options["worker_memory_hard_limit"],
            container_limit,
        )
        reader = system.CgroupMemoryReader(cgroup.info) if cgroup is not None else None
        psi: Callable[[], float | None] | None = None
        if (reader is not None and cgroup is not None and cgroup.info.version == 2
                and cgroup.pressure is not None):
            psi = reader.memory_stall
        heavy_methods = [m.strip() for m in options["heavy_methods"].split(",") if m.strip()]
        heavy_paths = [p.strip() for p in options["heavy_paths"].split(",") if p.strip()]
        return cls(
            soft_limit=soft, hard_limit=hard, container_limit=container_limit,
            container_threshold=options["container_memory_threshold"],
            psi_threshold=options["memory_psi_threshold"] or None,
            refresh_interval=options["memory_refresh_interval"],
            shed=options["memory_shed"], heavy_methods=heavy_methods, heavy_paths=heavy_paths,
            retry_after=options["memory_retry_after"],
            body_check_every=options["body_memory_check_every"],
            cgroup_usage=reader.usage if reader is not None and reader.info else None,
            psi=psi,
            reclaimable=reader.inactive_file if reader is not None else None,
        )

    # ---- the pressure level -------------------------------------------------------------

    def judges(self) -> bool:
        """A limit or a pressure reading can move the level from OK: a worker limit, a
        container limit with its usage reader, or a pressure stall reader."""
        return (self.soft_limit is not None or self.hard_limit is not None
                or (self.container_limit is not None and self._cgroup_usage is not None)
                or (self._psi is not None and self.psi_threshold is not None))

    def check(self, now: int) -> int:
        """The pressure level, refreshed when older than ``refresh_interval``."""
        if now - self.checked_ns >= self.refresh_ns:
            self.refresh(now)
        return self.level

    def refresh(self, now: int | None = None) -> int:
        now = time.monotonic_ns() if now is None else now
        self.checked_ns = now
        rss = self.rss = self._rss()
        level, reason = OK, ""
        soft, hard = self.soft_limit, self.hard_limit
        if soft is not None and rss > soft:
            level, reason = ELEVATED, "worker_over_soft_limit"
        if hard is not None and rss > hard:
            level, reason = CRITICAL, "worker_over_hard_limit"
        if self._cgroup_usage is not None and self.container_limit:
            usage = self.container_usage = self._cgroup_usage()
            threshold = self.container_threshold * self.container_limit
            if usage is not None and usage > threshold and self._reclaimable is not None:
                # Usage counts page cache; the working set (usage - inactive file, as
                # Kubernetes counts it) is what an OOM kill would be about.
                usage = self.container_usage = usage - self._reclaimable()
            if usage is not None and usage > threshold:
                level, reason = CRITICAL, "container_near_limit"
        if self._psi is not None and self.psi_threshold is not None:
            if now - self._psi_checked_ns >= _PSI_INTERVAL_NS:
                self._psi_checked_ns = now
                self.pressure_stall = self._psi()
            stall = self.pressure_stall
            if stall is not None and stall >= self.psi_threshold:
                level, reason = CRITICAL, "memory_pressure_stall"
        self.level, self.reason = level, reason
        if level != self._last_logged_level:
            self._level_changed(level)
        return level

    def _level_changed(self, level: int) -> None:
        previous, self._last_logged_level = self._last_logged_level, level
        figures = self.figures()
        log_fn = log.warning if level > previous else log.info
        log_fn("memory pressure %s -> %s (%s): %s", LEVEL_NAMES[previous], LEVEL_NAMES[level],
               self.reason or "back under every limit", figures)
        events.emit("pressure", previous=LEVEL_NAMES[previous], **figures)

    def figures(self) -> dict[str, Any]:
        return {
            "level": LEVEL_NAMES[self.level],
            "pressure_reason": self.reason or None,
            "rss": self.rss,
            "uss": self.uss,
            "soft_limit": self.soft_limit,
            "hard_limit": self.hard_limit,
            "container_usage": self.container_usage,
            "container_limit": self.container_limit,
            "container_threshold": self.container_threshold,
            "pressure_stall": self.pressure_stall,
        }

    @property
    def ready(self) -> bool:
        """Readiness: False under critical pressure (liveness never looks at memory)."""
        return self.level < CRITICAL

    # ---- decisions ----------------------------------------------------------------------

    def admit(self, method: str, path: str, now: int) -> MemoryPressure | None:
        """``None`` to admit; the refusal (503 + Retry-After) when shedding this request.

        The caller answers, logs and counts it like any :class:`RequestRejected`.
        """
        if now - self.checked_ns >= self.refresh_ns:
            self.refresh(now)
        if self.level < CRITICAL or self.shed == "off":
            return None
        if self.shed == "heavy" and not self.is_heavy(method, path):
            return None
        refusal = MemoryPressure(
            "This server is short of memory right now; retry shortly or elsewhere.",
            reason=f"shed_{self.reason}", headers=self._retry_headers,
            **self.figures(),
        )
        return refusal

    def is_heavy(self, method: str, path: str) -> bool:
        return method in self.heavy_methods or (
            bool(self.heavy_paths) and path.startswith(self.heavy_paths)
        )

    def body_guard(self, content_length: int | None, now: int) -> BodyMemoryGuard | None:
        """A per-request guard for the body wrapper, or ``None`` without a hard limit."""
        if self.hard_limit is None:
            return None
        if now - self.checked_ns >= self.refresh_ns:
            self.refresh(now)
        return BodyMemoryGuard(self, content_length, self.rss)

    @property
    def recycle_after_response(self) -> bool:
        """False under memguard's gunicorn integration: its worker monitor and the
        master's watchdog feed the recycle decision, staggered so that replacements
        never all boot at once; a second, uncoordinated trigger here would defeat that."""
        return self._recycle_after_response and not recycle.server_observes_requests()

    def after_response(self, now: int) -> bool:
        """Feed the recycle decision after a response; recycle on its verdict.

        RSS counts pages still shared with the master after fork, so the decision uses
        USS, read only when RSS (an upper bound of USS) is over the soft limit, and at
        most once per ``uss_interval``. Returns True when a recycle was started.
        """
        soft = self.soft_limit
        if soft is None or not self.recycle_after_response:
            return False
        if now - self.checked_ns >= self.refresh_ns:
            self.refresh(now)
        if self.rss <= soft or now - self._uss_checked_ns < self.uss_interval_ns:
            return False
        self._uss_checked_ns = now
        uss = self.uss = self._uss()
        if uss is None:
            uss = self.rss
        decision = self.recycle_decision
        decision.sample(uss, self.rss)
        verdict = decision.judge(uss, figures={"rss": self.rss, "uss": uss, "soft_limit": soft,
                                               "hard_limit": self.hard_limit})
        if verdict is None:
            return False
        return recycle.request_recycle(verdict.reason, **verdict.figures)


class BodyMemoryGuard:
    """Checks, while a body arrives, that buffering it will not push the worker past
    its hard limit.

    The body wrapper calls :meth:`chunk` with each chunk's size; RSS is read once every
    ``body_check_every`` bytes (4 MiB by default), never per chunk. An app that streams
    the body to disk does not grow, so it is never stopped; an app that buffers it
    (``await request.body()``) grows by about the bytes received and will need as much
    again to join the chunks at the end, so the request is refused (413) as soon as the
    worker's RSS plus the growth seen so far would pass the hard limit, or, with a
    Content-Length, as soon as the growth rate projects past it. A worker already over
    its hard limit refuses with 503.
    """

    __slots__ = ("admission", "content_length", "received", "next_check", "baseline",
                 "last_rss", "last_received", "project_after")

    def __init__(self, admission: MemoryAdmission, content_length: int | None,
                 baseline: int) -> None:
        self.admission = admission
        self.content_length = content_length
        self.received = 0
        self.next_check = admission.body_check_every
        self.baseline = baseline
        self.last_rss = baseline
        self.last_received = 0
        # The worker's RSS also moves with every other request it serves: a projection
        # from the first few MiB would blame a concurrent request's growth on this body
        # (seen: a streamed upload refused beside a leaking route). So project only after
        # a sixteenth of the body (at most 64 MiB, at least two checks) has arrived.
        every = admission.body_check_every
        self.project_after = 2 * every
        if content_length is not None:
            self.project_after = max(2 * every, min(content_length // 16, 64 << 20))

    def chunk(self, size: int) -> None:
        """Count ``size`` bytes received; raises :class:`RequestRejected` to stop."""
        self.received += size
        if self.received >= self.next_check:
            self.reached(self.received)

    def reached(self, received: int, buffered: bool | None = None) -> int:
        """``received`` bytes in all have arrived and :attr:`next_check` was passed: check
        now; returns the next byte count to check at. For a wrapper that counts bytes
        itself and only calls here when a check is due.

        ``buffered`` is what the wrapper saw of the app: ``False`` when the app let go of
        the chunks it was handed (it streams: the worker's growth is someone else's, and
        the body is never refused as buffering), ``True`` when it holds them, ``None``
        when the wrapper cannot tell (judged on growth alone)."""
        self.received = received
        self.next_check = received + self.admission.body_check_every
        self._check(buffered)
        return self.next_check

    def _check(self, buffered: bool | None = None) -> None:
        admission = self.admission
        hard = admission.hard_limit
        if hard is None:
            return
        rss = admission._rss()
        growth = rss - self.baseline
        received = self.received
        figures: dict[str, Any] = {"rss": rss, "growth": growth, "received": received,
                   "content_length": self.content_length, "hard_limit": hard}
        if rss > hard:
            raise MemoryPressure(
                "This worker is over its memory limit; retry shortly.",
                reason="worker_over_hard_limit", headers=admission._retry_headers, **figures,
            )
        if buffered is False:
            return
        projected = rss + max(growth, 0)
        length = self.content_length
        # Growth since the previous check, against the bytes received since then: a
        # buffering app keeps growing with its body; growth from elsewhere does not
        # follow it from interval to interval.
        recent_growth = rss - self.last_rss
        recent_received = received - self.last_received
        self.last_rss, self.last_received = rss, received
        if (length is not None and received >= self.project_after
                and growth > received // 2 and recent_growth > recent_received // 2):
            # Buffering: the rest of the body costs the same rate, the final join its size.
            rate = growth / received
            projected = max(projected, int(self.baseline + rate * length + length))
        if projected > hard:
            refusal = BodyTooLarge(
                "Request body too large to buffer in this worker's memory; "
                "the endpoint should stream it.",
                reason="body_exceeds_worker_memory", projected=projected, **figures,
            )
            refusal.area = "memory"
            raise refusal
