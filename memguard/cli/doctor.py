"""``memguard doctor``: what a person debugging 502s needs to know about memory.

It diagnoses; it never fails: every probe that cannot answer shows as unknown, and the
command exits 0 however bad things look.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import psutil

from memguard import system
from memguard.sizes import format_size

__all__ = ["collect", "render_text", "find_gunicorn_masters"]


def find_gunicorn_masters() -> list[int]:
    """Pids of gunicorn masters on this machine: gunicorn processes whose parent is not."""
    masters: list[int] = []
    for proc in psutil.process_iter(["pid", "ppid", "cmdline"]):
        try:
            if not _is_gunicorn(proc.info["cmdline"]):
                continue
            parent = psutil.Process(proc.info["ppid"])
            if not _is_gunicorn(parent.cmdline()):
                masters.append(proc.info["pid"])
        except (psutil.Error, OSError):
            continue
    return sorted(masters)


def _is_gunicorn(cmdline: list[str] | None) -> bool:
    if not cmdline:
        return False
    return any("gunicorn" in os.path.basename(part) for part in cmdline[:3])


def _worker_rows(master: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    try:
        children = psutil.Process(master).children()
    except psutil.Error:
        return rows
    for pid in [master] + [c.pid for c in children]:
        try:
            mem = system.process_memory(pid)
        except ProcessLookupError:
            continue
        row = dataclasses.asdict(mem)
        row["role"] = "master" if pid == master else "worker"
        rows.append(row)
    return rows


def collect(pid: int | None = None, root: str = "/") -> dict[str, Any]:
    """Everything doctor reports, as one JSON-ready dict.

    With ``pid`` (a gunicorn master), the cgroup reported is that process's, which is
    the one whose limit its workers hit; otherwise it is doctor's own.
    """
    info = system.find_cgroup(pid if pid is not None else "self", root=root)
    cgroup = system.read_cgroup(info, root=root) if info is not None else None
    budget = system.memory_budget(cgroup, root=root)
    cpu = system.cpu_info(cgroup.info if cgroup else None, root=root)
    vm = psutil.virtual_memory()
    swap = psutil.swap_memory()
    masters = [pid] if pid is not None else find_gunicorn_masters()
    report: dict[str, Any] = {
        "memory_limit": cgroup.limit if cgroup else None,
        "memory_limit_source": (cgroup.limit_source if cgroup and cgroup.limit else None),
        "memory_usage": cgroup.usage if cgroup else None,
        "memory_peak": cgroup.peak if cgroup else None,
        "memory_budget": budget.limit,
        "memory_budget_source": budget.source,
        "oom_kills": cgroup.oom_kills if cgroup else 0,
        "oom_events": cgroup.oom_events if cgroup else 0,
        "oom_group": cgroup.oom_group if cgroup else None,
        "swap_limit": cgroup.swap_limit if cgroup else None,
        "swap_usage": cgroup.swap_usage if cgroup else None,
        "host_memory": int(vm.total),
        "host_available": int(vm.available),
        "host_swap": int(swap.total),
        "pressure": dataclasses.asdict(cgroup.pressure) if cgroup and cgroup.pressure else None,
        "cpus": cpu.effective,
        "cpu_quota": cpu.quota,
        "cpu_quota_source": cpu.quota_source,
        "cpu_affinity": cpu.affinity,
        "cpu_host": cpu.host,
        "cgroup": (
            {"version": cgroup.info.version, "path": cgroup.info.path,
             "directory": str(cgroup.info.directory)}
            if cgroup else None
        ),
        "gunicorn": [{"master": m, "processes": _worker_rows(m)} for m in masters],
        "warnings": [],
    }
    report["warnings"] = _warnings(report)
    return report


def _warnings(r: dict[str, Any]) -> list[str]:
    out: list[str] = []
    if r["oom_kills"]:
        out.append(
            f"the kernel's OOM killer ended {r['oom_kills']} process(es) in this cgroup: "
            "clients of those workers saw 502/504; set a worker memory limit so memguard "
            "recycles workers first"
        )
    if r["oom_group"]:
        out.append(
            "memory.oom.group=1: one OOM kill ends the whole container, master included; "
            "only recycling before the limit protects it"
        )
    limit, usage = r["memory_limit"], r["memory_usage"]
    if limit and usage and usage > 0.9 * limit:
        out.append(f"usage is {usage / limit:.0%} of the memory limit")
    if limit is None:
        out.append(
            "no cgroup memory limit applies: the budget falls back to the host's RAM, "
            "and the kernel's OOM killer acts machine-wide"
        )
    pressure = r["pressure"]
    if pressure and pressure["some_avg10"] > 10:
        out.append(f"memory pressure: tasks stalled {pressure['some_avg10']:.1f}% of the last 10 s")
    return out


def render_text(r: dict[str, Any]) -> str:
    def size(key: str) -> str:
        return format_size(r[key]) if r[key] is not None else "unknown"

    lines = ["memguard doctor", ""]
    cg = r["cgroup"]
    where = f"cgroup v{cg['version']} {cg['path']}" if cg else "no cgroup found"
    rows = [
        ("cgroup", where),
        ("memory limit", f"{format_size(r['memory_limit'])}"
         + (f"  (from {r['memory_limit_source']})" if r["memory_limit_source"] else "")),
        ("memory budget", f"{size('memory_budget')}  ({r['memory_budget_source']})"),
        ("usage", size("memory_usage")),
        ("peak", size("memory_peak")),
        ("OOM kills", str(r["oom_kills"])),
        ("swap limit", format_size(r["swap_limit"])),
        ("swap usage", size("swap_usage")),
        ("host RAM", f"{size('host_memory')} ({size('host_available')} available)"),
    ]
    if r["pressure"]:
        p = r["pressure"]
        rows.append(("memory pressure",
                     f"some avg10={p['some_avg10']:.2f}% avg60={p['some_avg60']:.2f}%"
                     f"  ({p['source']})"))
    quota = f"{r['cpu_quota']:.2f}" if r["cpu_quota"] is not None else "none"
    rows.append(("CPUs", f"{r['cpus']:g} effective  (quota {quota}, affinity "
                         f"{r['cpu_affinity']}, host {r['cpu_host']})"))
    width = max(len(k) for k, _ in rows)
    lines += [f"  {k.ljust(width)}  {v}" for k, v in rows]
    for g in r["gunicorn"]:
        lines += ["", f"gunicorn master {g['master']}:",
                  f"  {'pid':>8} {'role':<7} {'RSS':>11} {'USS':>11} {'PSS':>11}"]
        for p in g["processes"]:
            lines.append(
                f"  {p['pid']:>8} {p['role']:<7} {format_size(p['rss']):>11} "
                f"{_opt(p['uss']):>11} {_opt(p['pss']):>11}"
            )
    if not r["gunicorn"]:
        lines += ["", "no gunicorn master found (pass --pid to name one)"]
    if r["warnings"]:
        lines += ["", "warnings:"] + [f"  - {w}" for w in r["warnings"]]
    return "\n".join(lines)


def _opt(value: int | None) -> str:
    return format_size(value) if value is not None else "?"
