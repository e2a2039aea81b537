"""What this machine has: memory (within cgroup limits) and CPU cores
(within affinity and cgroup CPU quota), the board it is, and its heat.

Everything is read from files under one root, ``/`` unless
:func:`rooted` points it elsewhere: tests point it at recorded snapshots
of a Raspberry Pi 4, a Pi 5 and an RK3588 board (tests/fixtures/boards).
Under another root, nothing is asked of the running kernel (affinity,
psutil, vcgencmd): the snapshot says it all.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import psutil

_ROOT = Path("/")
_CGROUP = Path("/sys/fs/cgroup")


def _p(rel: str) -> Path:
    """A path under the root that detection reads."""
    return _ROOT / rel


def _live() -> bool:
    """True when reading this machine, not a snapshot."""
    return _ROOT == Path("/")


@contextlib.contextmanager
def rooted(root: str | os.PathLike):
    """Read the machine from the snapshot under ``root`` for a while."""
    global _ROOT, _CGROUP, _PROC_CGROUP
    saved = _ROOT, _CGROUP, _PROC_CGROUP
    _ROOT = Path(root)
    _CGROUP, _PROC_CGROUP = _p("sys/fs/cgroup"), _p("proc/self/cgroup")
    try:
        yield
    finally:
        _ROOT, _CGROUP, _PROC_CGROUP = saved


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


_PROC_CGROUP = Path("/proc/self/cgroup")


def own_cgroups() -> dict[str, str]:
    """This process's cgroup path per v1 controller ("memory", "cpu", ...)
    and, under "", its v2 path, from /proc/self/cgroup."""
    out: dict[str, str] = {}
    for line in (_read(_PROC_CGROUP) or "").splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        for c in controllers.split(",") if controllers else [""]:
            out[c] = path
    return out


def _levels(base: Path, path: str | None) -> list[Path]:
    """The process's own cgroup directory under ``base`` and its ancestors
    up to ``base``, deepest first. A path that is not under the mount (a
    container that sees only its own cgroup at the root) counts as the
    root."""
    out = []
    if path and path != "/":
        d = base / path.lstrip("/")
        while d != base and base in d.parents:
            if d.is_dir():
                out.append(d)
            d = d.parent
    out.append(base)
    return out


def _memory_levels() -> list[tuple[Path, str, str]]:
    """(directory, limit file, usage file) for every cgroup level that
    bounds this process's memory: v2 when the v2 hierarchy has the memory
    controller, else v1's memory hierarchy."""
    own = own_cgroups()
    v2 = [(d, "memory.max", "memory.current") for d in _levels(_CGROUP, own.get(""))]
    if any((d / "memory.max").exists() for d, _, _ in v2) or (_CGROUP / "memory.current").exists():
        return v2
    return [(d, "memory.limit_in_bytes", "memory.usage_in_bytes")
            for d in _levels(_CGROUP / "memory", own.get("memory"))]


def _number(path: Path) -> int | None:
    v = _read(path)
    # v1 writes "no limit" as a huge page-aligned number, v2 as "max"
    return int(v) if v and v.isdigit() and int(v) < (1 << 60) else None


def cgroup_memory_limit() -> int | None:
    """The tightest memory limit on this process: its own cgroup's (v2
    ``memory.max``, v1 ``memory.limit_in_bytes``) or an ancestor's."""
    limits = [n for d, lim, _ in _memory_levels() if (n := _number(d / lim)) is not None]
    return min(limits) if limits else None


def _reclaimable(d: Path) -> int:
    """Page cache charged to cgroup ``d`` that no process maps: files read
    and closed, or the weights of a model whose process has ended. The
    kernel drops it before it would kill anything, so it is room."""
    stat = {}
    for line in (_read(d / "memory.stat") or "").splitlines():
        k, _, v = line.partition(" ")
        if v.strip().isdigit():
            stat[k] = int(v)
    if "file" in stat:                                      # v2
        return max(stat["file"] - stat.get("file_mapped", 0) - stat.get("file_dirty", 0), 0)
    cache = stat.get("total_cache", stat.get("cache", 0))   # v1
    return max(cache - stat.get("total_mapped_file", stat.get("mapped_file", 0)), 0)


def cgroup_memory_headroom() -> int | None:
    """Bytes left under the tightest limit: min over limited levels of
    limit minus that level's usage, not counting page cache nobody maps."""
    rooms = []
    for d, lim, use in _memory_levels():
        n = _number(d / lim)
        if n is not None:
            rooms.append(max(n - max((_number(d / use) or 0) - _reclaimable(d), 0), 0))
    return min(rooms) if rooms else None


def cgroup_memory_usage() -> int | None:
    """Memory charged to this process's own cgroup."""
    for d, _, use in _memory_levels():
        v = _read(d / use)
        if v and v.isdigit():
            return int(v)
    return None


def _meminfo() -> tuple[int, int]:
    """(total, available) bytes from the snapshot's /proc/meminfo."""
    fields = {}
    for line in (_read(_p("proc/meminfo")) or "").splitlines():
        k, _, v = line.partition(":")
        if v.split() and v.split()[0].isdigit():
            fields[k] = int(v.split()[0]) * 1024
    total = fields.get("MemTotal", 0)
    return total, fields.get("MemAvailable", total)


def available_memory() -> int:
    """Bytes a new model could use now: the smaller of what the OS reports
    available and what is left under the tightest cgroup limit."""
    avail = psutil.virtual_memory().available if _live() else _meminfo()[1]
    room = cgroup_memory_headroom()
    return min(avail, room) if room is not None else avail


def total_memory() -> int:
    total = psutil.virtual_memory().total if _live() else _meminfo()[0]
    limit = cgroup_memory_limit()
    return min(total, limit) if limit else total


def _cpu_list(text: str | None) -> list[int]:
    """A kernel CPU list ("0-3,6") as numbers."""
    out: list[int] = []
    for part in (text or "").split(","):
        lo, _, hi = part.strip().partition("-")
        if lo.isdigit():
            out.extend(range(int(lo), int(hi if hi.isdigit() else lo) + 1))
    return out


def affinity_cpus() -> list[int]:
    if not _live():
        return _cpu_list(_read(_p("sys/devices/system/cpu/online"))) or [0]
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return list(range(os.cpu_count() or 1))


def cgroup_cpu_quota() -> float | None:
    """CPUs allowed by the tightest cgroup quota on this process (v2
    ``cpu.max``, v1 cfs), its own cgroup's or an ancestor's, if limited."""
    own = own_cgroups()
    quotas = []
    v2 = _levels(_CGROUP, own.get(""))
    if any((d / "cpu.max").exists() for d in v2):
        for d in v2:
            v = _read(d / "cpu.max")
            if v:
                quota, _, period = v.partition(" ")
                if quota != "max" and quota.isdigit() and period.isdigit() and int(period):
                    quotas.append(int(quota) / int(period))
        return min(quotas) if quotas else None
    for d in _levels(_CGROUP / "cpu", own.get("cpu")):
        q, p = _read(d / "cpu.cfs_quota_us"), _read(d / "cpu.cfs_period_us")
        if q and p and q.lstrip("-").isdigit() and p.isdigit() and int(q) > 0 and int(p):
            quotas.append(int(q) / int(p))
    return min(quotas) if quotas else None


def physical_cores() -> int:
    """Physical cores among the CPUs this process may run on.

    Counts distinct (package, core) pairs of the allowed CPUs from sysfs,
    so hyper-threads are not doubled and a taskset or container affinity is
    honoured; falls back to psutil's count scaled to the affinity.
    """
    cpus = affinity_cpus()
    cores = set()
    for cpu in cpus:
        base = _p(f"sys/devices/system/cpu/cpu{cpu}/topology")
        core, pkg = _read(base / "core_id"), _read(base / "physical_package_id")
        if core is None:
            cores = set()
            break
        cores.add((pkg, core))
    if cores or not _live():
        return len(cores) or len(cpus)
    logical = os.cpu_count() or 1
    phys = psutil.cpu_count(logical=False) or logical
    return max(1, round(len(cpus) * phys / logical))


# Arm's CPU part numbers (/proc/cpuinfo "CPU part", implementer 0x41)
# for the cores of the boards this runs on.
ARM_PARTS = {"0xd03": "Cortex-A53", "0xd04": "Cortex-A35", "0xd05": "Cortex-A55", "0xd07": "Cortex-A57",
             "0xd08": "Cortex-A72", "0xd09": "Cortex-A73", "0xd0a": "Cortex-A75", "0xd0b": "Cortex-A76",
             "0xd0d": "Cortex-A77", "0xd41": "Cortex-A78", "0xd44": "Cortex-X1", "0xd46": "Cortex-A510",
             "0xd47": "Cortex-A710", "0xd4d": "Cortex-A715", "0xd0c": "Neoverse-N1", "0xd40": "Neoverse-V1",
             "0xd49": "Neoverse-N2"}


def _cpuinfo_blocks() -> list[dict[str, str]]:
    blocks, cur = [], {}
    for line in (_read(_p("proc/cpuinfo")) or "").splitlines():
        if not line.strip():
            if cur:
                blocks.append(cur)
            cur = {}
            continue
        k, _, v = line.partition(":")
        cur[k.strip()] = v.strip()
    if cur:
        blocks.append(cur)
    return blocks


def arm_cores() -> list[str]:
    """The Arm core of each CPU ("Cortex-A76", ...), in CPU order; empty
    where /proc/cpuinfo names none (x86)."""
    return [ARM_PARTS.get(b["CPU part"].lower(), f"Arm part {b['CPU part']}")
            for b in _cpuinfo_blocks() if b.get("CPU implementer") == "0x41" and "CPU part" in b]


def board_model() -> str | None:
    """The board's name from the device tree ("Raspberry Pi 5 Model B
    Rev 1.0"), where there is one."""
    v = _read(_p("proc/device-tree/model"))
    return v.strip("\0").strip() if v else None


def cpu_model() -> str:
    """The CPU's name: x86 'model name' from /proc/cpuinfo; on Arm the
    cores it has ("4x Cortex-A76", "4x Cortex-A76 + 4x Cortex-A55"), with
    the board's name where the device tree gives one."""
    blocks = _cpuinfo_blocks()
    for key in ("model name", "cpu model"):
        for b in blocks:
            if b.get(key):
                return b[key]
    cores = arm_cores()
    if cores:
        counts: dict[str, int] = {}
        for c in cores:
            counts[c] = counts.get(c, 0) + 1
        desc = " + ".join(f"{n}x {c}" for c, n in counts.items())
        board = board_model()
        return f"{board} ({desc})" if board else desc
    for key in ("Model", "Hardware", "Processor"):
        for b in blocks:
            if b.get(key):
                return b[key]
    import platform

    return platform.processor() or platform.machine() or "unknown"


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags: x86 'flags', Arm 'Features' in /proc/cpuinfo."""
    text = _read(_p("proc/cpuinfo")) or ""
    for key in ("flags", "Features"):
        for line in text.splitlines():
            k, _, v = line.partition(":")
            if k.strip() == key:
                return frozenset(v.split())
    return frozenset()


def core_clusters() -> dict[int, list[int]]:
    """Allowed CPUs grouped by how fast each core is, fastest first: Arm's
    ``cpu_capacity`` where the kernel gives it (the scheduler's own
    measure), else the maximum frequency (kHz).

    More than one group means a big.LITTLE (or P-core/E-core) design; one
    group (or neither file, as in many VMs) means uniform cores.
    """
    cpus = affinity_cpus()

    def speeds(name: str) -> list[int]:
        out = []
        for cpu in cpus:
            v = _read(_p(f"sys/devices/system/cpu/cpu{cpu}/{name}"))
            out.append(int(v) if v and v.isdigit() else 0)
        return out

    capacity = speeds("cpu_capacity")
    key = capacity if any(capacity) else speeds("cpufreq/cpuinfo_max_freq")
    groups: dict[int, list[int]] = {}
    for cpu, k in zip(cpus, key):
        groups.setdefault(k, []).append(cpu)
    return dict(sorted(groups.items(), reverse=True))


def big_cores() -> list[int]:
    """The allowed CPUs of the fastest cluster."""
    return next(iter(core_clusters().values()), affinity_cpus())


def _physical_of(cpus: list[int]) -> int:
    cores = set()
    for cpu in cpus:
        base = _p(f"sys/devices/system/cpu/cpu{cpu}/topology")
        core, pkg = _read(base / "core_id"), _read(base / "physical_package_id")
        if core is None:
            return len(cpus)
        cores.add((pkg, core))
    return len(cores)


def cpu_temperature() -> float | None:
    """The hottest CPU-ish sensor in °C, where readable."""
    try:
        temps = psutil.sensors_temperatures() if _live() else {}
    except (AttributeError, OSError):
        temps = {}
    values = [t.current for name, items in (temps or {}).items()
              if any(k in name.lower() for k in ("cpu", "core", "k10temp", "soc", "thermal"))
              for t in items if t.current]
    if not values:
        for zone in _p("sys/class/thermal").glob("thermal_zone*/temp"):
            v = _read(zone)
            if v and v.lstrip("-").isdigit():
                values.append(int(v) / 1000)
    return max(values) if values else None


# vcgencmd get_throttled bits (Raspberry Pi firmware): now, and since boot.
_PI_THROTTLE_BITS = {0: "under-voltage", 1: "frequency capped", 2: "throttled", 3: "soft temperature limit"}


def throttling() -> dict | None:
    """What the machine says about throttling, where it says anything:
    ``{"now": [...], "since_boot": [...], "source": ...}``; None where
    nothing reports it (most VMs)."""
    import shutil
    import subprocess

    if _live() and shutil.which("vcgencmd"):
        try:
            out = subprocess.run(["vcgencmd", "get_throttled"], capture_output=True, text=True,
                                 timeout=2).stdout
            bits = int(out.strip().split("=", 1)[1], 16)
        except (OSError, ValueError, IndexError, subprocess.SubprocessError):
            bits = None
        if bits is not None:
            return {"now": [w for b, w in _PI_THROTTLE_BITS.items() if bits >> b & 1],
                    "since_boot": [w for b, w in _PI_THROTTLE_BITS.items() if bits >> (b + 16) & 1],
                    "source": "vcgencmd get_throttled"}
    # x86: the kernel counts thermal throttling events per core
    counts = [int(v) for cpu in affinity_cpus()
              if (v := _read(_p(f"sys/devices/system/cpu/cpu{cpu}/thermal_throttle/core_throttle_count")))
              and v.isdigit()]
    if counts:
        n = sum(counts)
        return {"now": [], "since_boot": [f"{n} thermal throttling events"] if n else [], "events": n,
                "source": "thermal_throttle/core_throttle_count"}
    return None


def usable_cores() -> int:
    """Physical cores we may use: affinity, then the cgroup CPU quota."""
    n = physical_cores()
    quota = cgroup_cpu_quota()
    if quota is not None:
        n = min(n, max(1, int(quota)))
    return max(1, n)


def fingerprint() -> str:
    """Identifies this machine's CPU setup for thread profiles: CPU model,
    core layout and the CPUs this process may use."""
    import hashlib

    parts = [cpu_model(), str(os.cpu_count()), str(physical_cores()), ",".join(map(str, affinity_cpus())),
             repr(sorted((f, len(c)) for f, c in core_clusters().items())), str(cgroup_cpu_quota())]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def describe() -> dict:
    """Everything `edgeinfer doctor` prints, as data."""
    clusters = core_clusters()
    return {
        "cpu_model": cpu_model(), "board": board_model(), "arm_cores": arm_cores(),
        "logical_cpus": os.cpu_count() if _live() else len(affinity_cpus()), "physical_cores": physical_cores(),
        "affinity": affinity_cpus(), "cgroup_cpu_quota": cgroup_cpu_quota(),
        "clusters": {str(k): v for k, v in clusters.items()}, "big_little": len(clusters) > 1,
        "total_memory": total_memory(), "available_memory": available_memory(),
        "cgroup_memory_limit": cgroup_memory_limit(), "cpu_temperature_c": cpu_temperature(),
        "throttling": throttling(),
        "default_threads": default_threads(), "fingerprint": fingerprint(),
    }


def runnable_tasks() -> int | None:
    """Tasks running or ready to run right now, this one included
    (/proc/loadavg's fourth field); None where the kernel does not say."""
    fields = (_read(_p("proc/loadavg")) or "").split()
    running = fields[3].split("/")[0] if len(fields) > 3 else ""
    return int(running) if running.isdigit() else None


def busy_cores(sample: float = 0.25) -> float:
    """How many of the allowed CPUs other work keeps busy now, in cores,
    from a short sample of per-CPU use (this process idles while loading,
    so what is seen is the rest of the box). Where nothing else is ready
    to run, the box is quiet and no sample is taken: a quiet load pays
    nothing for this."""
    if not _live() or (runnable_tasks() or 2) <= 1:
        return 0.0
    try:
        per_cpu = psutil.cpu_percent(interval=sample, percpu=True)
    except (OSError, RuntimeError):
        return 0.0
    allowed = [per_cpu[i] for i in affinity_cpus() if i < len(per_cpu)]
    return sum(allowed) / 100.0


def threads_for_load(threads: int, busy: float) -> int:
    """``threads`` capped so that they do not fight other work for cores:
    llama.cpp's threads meet at a barrier after every graph node, so one
    preempted thread stalls all of them. Measured on a 2-core Xeon with
    one core held by another process: 2 threads decoded 9.8 tok/s, 1
    thread 53 (docs/benchmarks.md)."""
    free = usable_cores() - int(busy + 0.5)
    return max(1, min(threads, free))


def default_threads() -> int:
    """The untuned default: physical cores within affinity (only the big
    cluster on big.LITTLE CPUs), capped by the cgroup CPU quota."""
    clusters = core_clusters()
    n = _physical_of(big_cores()) if len(clusters) > 1 else physical_cores()
    quota = cgroup_cpu_quota()
    if quota is not None:
        n = min(n, max(1, int(quota)))
    return max(1, n)
