"""What this machine has: memory (within cgroup limits) and CPU cores
(within affinity and cgroup CPU quota)."""

from __future__ import annotations

import os
from pathlib import Path

import psutil

_CGROUP = Path("/sys/fs/cgroup")


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def cgroup_memory_limit() -> int | None:
    """The cgroup v2 ``memory.max`` or v1 ``memory.limit_in_bytes``, if any."""
    for f in (_CGROUP / "memory.max", _CGROUP / "memory" / "memory.limit_in_bytes"):
        v = _read(f)
        if v and v.isdigit() and int(v) < (1 << 60):
            return int(v)
    return None


def cgroup_memory_usage() -> int | None:
    for f in (_CGROUP / "memory.current", _CGROUP / "memory" / "memory.usage_in_bytes"):
        v = _read(f)
        if v and v.isdigit():
            return int(v)
    return None


def available_memory() -> int:
    """Bytes a new model could use now: the smaller of what the OS reports
    available and what is left under the cgroup limit."""
    avail = psutil.virtual_memory().available
    limit = cgroup_memory_limit()
    if limit is not None:
        used = cgroup_memory_usage() or 0
        avail = min(avail, max(limit - used, 0))
    return avail


def total_memory() -> int:
    total = psutil.virtual_memory().total
    limit = cgroup_memory_limit()
    return min(total, limit) if limit else total


def affinity_cpus() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return list(range(os.cpu_count() or 1))


def cgroup_cpu_quota() -> float | None:
    """CPUs allowed by the cgroup quota (v2 ``cpu.max``, v1 cfs), if limited."""
    v = _read(_CGROUP / "cpu.max")
    if v:
        quota, _, period = v.partition(" ")
        if quota != "max" and quota.isdigit() and period.isdigit() and int(period):
            return int(quota) / int(period)
        return None
    q, p = _read(_CGROUP / "cpu" / "cpu.cfs_quota_us"), _read(_CGROUP / "cpu" / "cpu.cfs_period_us")
    if q and p and q.lstrip("-").isdigit() and p.isdigit() and int(q) > 0 and int(p):
        return int(q) / int(p)
    return None


def physical_cores() -> int:
    """Physical cores among the CPUs this process may run on.

    Counts distinct (package, core) pairs of the allowed CPUs from sysfs,
    so hyper-threads are not doubled and a taskset or container affinity is
    honoured; falls back to psutil's count scaled to the affinity.
    """
    cpus = affinity_cpus()
    cores = set()
    for cpu in cpus:
        base = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        core, pkg = _read(base / "core_id"), _read(base / "physical_package_id")
        if core is None:
            cores = set()
            break
        cores.add((pkg, core))
    if cores:
        return len(cores)
    logical = os.cpu_count() or 1
    phys = psutil.cpu_count(logical=False) or logical
    return max(1, round(len(cpus) * phys / logical))


def default_threads() -> int:
    """Physical cores within affinity, capped by the cgroup CPU quota."""
    n = physical_cores()
    quota = cgroup_cpu_quota()
    if quota is not None:
        n = min(n, max(1, int(quota)))
    return max(1, n)
