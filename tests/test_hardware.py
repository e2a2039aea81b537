"""What edgeinfer sees of the machine: cgroup CPU quota and memory limit,
physical cores within the affinity mask, big.LITTLE clusters, the default
thread count and the fingerprint that thread profiles are keyed by.

The cgroup files live under ``hardware._CGROUP``, pointed at a tmp dir
here; the per-CPU sysfs files (/sys/devices/system/cpu/cpuN/...) are read
from a fake tree by redirecting ``hardware._read``; the affinity mask is
``os.sched_getaffinity``, replaced per test.
"""

from __future__ import annotations

import os
from pathlib import Path

import psutil
import pytest

from edgeinfer import hardware

SYS_CPU = "/sys/devices/system/cpu"


class FakeMachine:
    """A fake sysfs CPU tree, cgroup dir and affinity mask."""

    def __init__(self, root: Path, monkeypatch):
        self.sys = root / "sys"
        self.cgroup = root / "cgroup"
        self.cgroup.mkdir(parents=True)
        self.affinity: set[int] = {0}
        self._mp = monkeypatch
        real_read = hardware._read

        def read(path: Path):
            text = str(path)
            if text.startswith(SYS_CPU):
                return real_read(self.sys / text[len(SYS_CPU) + 1:])
            return real_read(path)

        monkeypatch.setattr(hardware, "_read", read)
        monkeypatch.setattr(hardware, "_CGROUP", self.cgroup)
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(self.affinity))

    def cpu(self, n: int, core: int | None = None, package: int = 0, max_freq: int | None = None) -> None:
        base = self.sys / f"cpu{n}"
        if core is not None:
            (base / "topology").mkdir(parents=True, exist_ok=True)
            (base / "topology" / "core_id").write_text(f"{core}\n")
            (base / "topology" / "physical_package_id").write_text(f"{package}\n")
        if max_freq is not None:
            (base / "cpufreq").mkdir(parents=True, exist_ok=True)
            (base / "cpufreq" / "cpuinfo_max_freq").write_text(f"{max_freq}\n")
        self.affinity.add(n)

    def write(self, rel: str, text: str) -> None:
        path = self.cgroup / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")


@pytest.fixture
def machine(tmp_path, monkeypatch) -> FakeMachine:
    return FakeMachine(tmp_path / "machine", monkeypatch)


def big_little(m: FakeMachine) -> None:
    """Four 1.8 GHz cores (cpu0-3) and four 2.4 GHz cores (cpu4-7)."""
    for n in range(8):
        m.cpu(n, core=n, max_freq=2_400_000 if n >= 4 else 1_800_000)


# -- cgroup CPU quota ------------------------------------------------------------

@pytest.mark.parametrize("cpu_max, quota", [
    ("150000 100000", 1.5),
    ("200000 100000", 2.0),
    ("50000 100000", 0.5),
    ("max 100000", None),
    ("max", None),
    ("150000 0", None),
    ("garbage", None),
])
def test_cgroup_v2_quota(machine, cpu_max, quota):
    machine.write("cpu.max", cpu_max)
    assert hardware.cgroup_cpu_quota() == quota


@pytest.mark.parametrize("cfs_quota, cfs_period, quota", [
    ("300000", "100000", 3.0),
    ("25000", "50000", 0.5),
    ("-1", "100000", None),       # v1's "no limit"
    ("100000", "0", None),
    ("", "100000", None),
])
def test_cgroup_v1_quota(machine, cfs_quota, cfs_period, quota):
    machine.write("cpu/cpu.cfs_quota_us", cfs_quota)
    machine.write("cpu/cpu.cfs_period_us", cfs_period)
    assert hardware.cgroup_cpu_quota() == quota


def test_no_cgroup_files_means_no_quota(machine):
    assert hardware.cgroup_cpu_quota() is None


def test_cgroup_v2_wins_over_v1(machine):
    machine.write("cpu.max", "max 100000")
    machine.write("cpu/cpu.cfs_quota_us", "100000")
    machine.write("cpu/cpu.cfs_period_us", "100000")
    assert hardware.cgroup_cpu_quota() is None


# -- memory limit ------------------------------------------------------------------

@pytest.mark.parametrize("rel, value, limit", [
    ("memory.max", "1073741824", 1 << 30),
    ("memory.max", "max", None),
    ("memory/memory.limit_in_bytes", "536870912", 512 << 20),
    ("memory/memory.limit_in_bytes", "9223372036854771712", None),   # v1's "no limit"
])
def test_cgroup_memory_limit(machine, rel, value, limit):
    machine.write(rel, value)
    assert hardware.cgroup_memory_limit() == limit


def own_cgroup(machine, monkeypatch, text: str) -> None:
    path = machine.cgroup.parent / "proc-self-cgroup"
    path.write_text(text)
    monkeypatch.setattr(hardware, "_PROC_CGROUP", path)


def test_v1_reads_the_process_own_memory_cgroup_and_its_ancestors(machine, monkeypatch):
    # as seen on a real box: the memory controller puts the process deep
    # below the mount; the files at the mount's root say "no limit"
    own_cgroup(machine, monkeypatch, "4:memory:/jobs/edgeinfer\n3:cpu:/\n0::/\n")
    machine.write("memory/memory.limit_in_bytes", "9223372036854771712")
    machine.write("memory/jobs/memory.limit_in_bytes", str(300 << 20))
    machine.write("memory/jobs/memory.usage_in_bytes", str(100 << 20))
    machine.write("memory/jobs/edgeinfer/memory.limit_in_bytes", "9223372036854771712")
    machine.write("memory/jobs/edgeinfer/memory.usage_in_bytes", str(40 << 20))
    assert hardware.cgroup_memory_limit() == 300 << 20
    assert hardware.cgroup_memory_usage() == 40 << 20      # its own
    assert hardware.available_memory() == 200 << 20        # the parent's headroom binds
    machine.write("memory/jobs/edgeinfer/memory.limit_in_bytes", str(120 << 20))
    assert hardware.cgroup_memory_limit() == 120 << 20
    assert hardware.available_memory() == 80 << 20


def test_v2_reads_a_systemd_units_memory_max(machine, monkeypatch):
    own_cgroup(machine, monkeypatch, "0::/system.slice/edgeinfer.service\n")
    machine.write("cgroup.controllers", "cpu memory")
    machine.write("system.slice/memory.max", "max")
    machine.write("system.slice/edgeinfer.service/memory.max", str(768 << 20))
    machine.write("system.slice/edgeinfer.service/memory.current", str(68 << 20))
    machine.write("system.slice/edgeinfer.service/cpu.max", "200000 100000")
    machine.write("system.slice/cpu.max", "max 100000")
    assert hardware.cgroup_memory_limit() == 768 << 20
    assert hardware.available_memory() == min(psutil.virtual_memory().available, 700 << 20)
    assert hardware.cgroup_cpu_quota() == 2.0


def test_a_cgroup_path_missing_under_the_mount_reads_the_root(machine, monkeypatch):
    # a container with its own cgroup namespace sees its cgroup as the root
    own_cgroup(machine, monkeypatch, "0::/kubepods/pod1/abc\n")
    machine.write("memory.max", str(1 << 30))
    assert hardware.cgroup_memory_limit() == 1 << 30


def test_v1_cpu_quota_of_the_process_own_cgroup(machine, monkeypatch):
    own_cgroup(machine, monkeypatch, "3:cpu,cpuacct:/batch\n")
    machine.write("cpu/batch/cpu.cfs_quota_us", "50000")
    machine.write("cpu/batch/cpu.cfs_period_us", "100000")
    assert hardware.cgroup_cpu_quota() == 0.5


def test_memory_figures_stay_under_the_cgroup_limit(machine):
    assert hardware.cgroup_memory_limit() is None
    assert hardware.total_memory() == psutil.virtual_memory().total

    machine.write("memory.max", str(1 << 30))
    machine.write("memory.current", str(256 << 20))
    assert hardware.total_memory() == min(psutil.virtual_memory().total, 1 << 30)
    assert 0 < hardware.available_memory() <= (1 << 30) - (256 << 20)

    machine.write("memory.current", str(2 << 30))   # over the limit: nothing left
    assert hardware.available_memory() == 0


@pytest.mark.parametrize("stat, room", [
    # v2: 300 MB of page cache, 100 MB of it mapped by a running model, 20 MB dirty
    (f"anon {500 << 20}\nfile {300 << 20}\nfile_mapped {100 << 20}\nfile_dirty {20 << 20}", 180 << 20),
    # v1: the same counted its own way
    (f"total_rss {500 << 20}\ntotal_cache {300 << 20}\ntotal_mapped_file {100 << 20}", 200 << 20),
])
def test_page_cache_nobody_maps_is_room(machine, stat, room):
    """The weights of a model whose process ended stay in the page cache,
    charged to the cgroup, until the kernel needs the room: they count as
    free, or a server that unloads one model to load another would find
    no room for it."""
    machine.write("memory.max", str(1 << 30))
    machine.write("memory.current", str((1 << 30) - (10 << 20)))   # 10 MB left by the usage alone
    machine.write("memory.stat", stat)
    assert hardware.cgroup_memory_headroom() == (10 << 20) + room


# -- cores and affinity -------------------------------------------------------------

def test_hyperthreads_count_once_within_the_affinity(machine):
    for n in range(4):                # cpu0/cpu1 share core 0, cpu2/cpu3 share core 1
        machine.cpu(n, core=n // 2)
    for affinity, cores in (({0, 1, 2, 3}, 2), ({0, 1}, 1), ({1, 2}, 2), ({3}, 1)):
        machine.affinity = affinity
        assert hardware.physical_cores() == cores, affinity
        assert hardware.affinity_cpus() == sorted(affinity)


def test_cores_of_two_packages_are_distinct(machine):
    machine.cpu(0, core=0, package=0)
    machine.cpu(1, core=0, package=1)
    assert hardware.physical_cores() == 2


def test_without_topology_the_count_scales_with_the_affinity(machine, monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    monkeypatch.setattr(psutil, "cpu_count", lambda logical=True: 8 if logical else 4)
    machine.affinity = {0, 1, 2, 3}
    assert hardware.physical_cores() == 2
    machine.affinity = {5}
    assert hardware.physical_cores() == 1


def test_an_affinity_of_one_cpu_gives_one_thread_on_this_machine(monkeypatch, tmp_path):
    """The real sysfs topology of this machine, one allowed CPU."""
    monkeypatch.setattr(hardware, "_CGROUP", tmp_path)   # no quota
    cpu = min(os.sched_getaffinity(0))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {cpu})
    assert hardware.affinity_cpus() == [cpu]
    assert hardware.physical_cores() == 1
    assert hardware.usable_cores() == 1
    assert hardware.default_threads() == 1


# -- clusters and the default thread count --------------------------------------

def test_core_clusters_group_by_max_frequency_fastest_first(machine):
    big_little(machine)
    clusters = hardware.core_clusters()
    assert clusters == {2_400_000: [4, 5, 6, 7], 1_800_000: [0, 1, 2, 3]}
    assert list(clusters) == [2_400_000, 1_800_000]
    assert hardware.big_cores() == [4, 5, 6, 7]
    assert hardware.physical_cores() == 8
    assert hardware.default_threads() == 4        # the big cores only
    assert hardware.usable_cores() == 8

    machine.affinity = {0, 1, 4}                  # one big core allowed
    assert hardware.core_clusters() == {2_400_000: [4], 1_800_000: [0, 1]}
    assert hardware.default_threads() == 1


def test_uniform_cores_are_one_cluster(machine):
    for n in range(4):
        machine.cpu(n, core=n, max_freq=3_000_000)
    assert hardware.core_clusters() == {3_000_000: [0, 1, 2, 3]}
    assert hardware.default_threads() == 4


def test_no_cpufreq_is_one_cluster_of_unknown_speed(machine):
    for n in range(3):
        machine.cpu(n, core=n)
    assert hardware.core_clusters() == {0: [0, 1, 2]}
    assert hardware.default_threads() == 3


@pytest.mark.parametrize("cpu_max, threads", [
    (None, 4), ("150000 100000", 1), ("250000 100000", 2), ("50000 100000", 1), ("800000 100000", 4),
])
def test_default_threads_are_capped_by_the_quota(machine, cpu_max, threads):
    for n in range(4):
        machine.cpu(n, core=n)
    if cpu_max:
        machine.write("cpu.max", cpu_max)
    assert hardware.default_threads() == threads
    assert hardware.usable_cores() == threads


def test_quota_caps_the_big_cluster_too(machine):
    big_little(machine)
    machine.write("cpu.max", "200000 100000")
    assert hardware.default_threads() == 2


# -- fingerprint and describe ------------------------------------------------------

def test_fingerprint_changes_with_affinity_and_quota(machine):
    for n in range(4):
        machine.cpu(n, core=n)
    all_four = hardware.fingerprint()
    assert hardware.fingerprint() == all_four               # stable
    machine.affinity = {0, 1}
    two = hardware.fingerprint()
    assert two != all_four
    machine.write("cpu.max", "100000 100000")
    assert hardware.fingerprint() not in (two, all_four)
    machine.affinity = {0, 1, 2, 3}
    (machine.cgroup / "cpu.max").unlink()
    assert hardware.fingerprint() == all_four


def test_fingerprint_of_this_machine_changes_with_affinity(monkeypatch):
    cpus = os.sched_getaffinity(0)
    here = hardware.fingerprint()
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {min(cpus)})
    assert (hardware.fingerprint() != here) == (len(cpus) > 1)


def test_describe(machine):
    big_little(machine)
    machine.write("cpu.max", "300000 100000")
    machine.write("memory.max", str(4 << 30))
    d = hardware.describe()
    assert d["physical_cores"] == 8 and d["affinity"] == list(range(8))
    assert d["cgroup_cpu_quota"] == 3.0 and d["cgroup_memory_limit"] == 4 << 30
    assert d["clusters"] == {"2400000": [4, 5, 6, 7], "1800000": [0, 1, 2, 3]}
    assert d["big_little"] is True
    assert d["default_threads"] == 3
    assert d["fingerprint"] == hardware.fingerprint()
    assert d["total_memory"] <= 4 << 30
    assert isinstance(d["cpu_model"], str) and d["cpu_model"]


# -- a busy box ---------------------------------------------------------------------

@pytest.mark.parametrize("per_cpu, busy", [([100.0, 3.0], 1.03), ([10.0, 12.0], 0.22), ([0.0, 0.0], 0.0),
                                             ([0.0, 100.0, 100.0], 1.0)])
def test_busy_cores_sums_the_allowed_cpus(monkeypatch, per_cpu, busy):
    from conftest import real_busy_cores

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})   # cpu2 is not ours
    monkeypatch.setattr(psutil, "cpu_percent", lambda interval, percpu: per_cpu)
    monkeypatch.setattr(hardware, "runnable_tasks", lambda: 3)
    assert real_busy_cores() == pytest.approx(busy)


def test_a_quiet_box_takes_no_sample(monkeypatch):
    from conftest import real_busy_cores

    def no_sample(*a, **k):
        raise AssertionError("sampled although nothing else was ready to run")

    monkeypatch.setattr(psutil, "cpu_percent", no_sample)
    monkeypatch.setattr(hardware, "runnable_tasks", lambda: 1)   # only this process
    assert real_busy_cores() == 0.0


def test_runnable_tasks_reads_proc_loadavg(monkeypatch, tmp_path):
    real_read = hardware._read
    monkeypatch.setattr(hardware, "_read", lambda p: "0.35 0.57 0.78 3/79 32148" if str(p) == "/proc/loadavg"
                        else real_read(p))
    assert hardware.runnable_tasks() == 3


@pytest.mark.parametrize("usable, busy, threads, expected", [
    (2, 1.03, 2, 1),     # one core held by other work: one thread
    (2, 0.22, 2, 2),     # background noise: keep both
    (2, 2.0, 2, 1),      # all busy: never fewer than one
    (4, 1.6, 4, 2),
    (4, 0.0, 3, 3),      # never more than asked
])
def test_threads_for_load(monkeypatch, usable, busy, threads, expected):
    monkeypatch.setattr(hardware, "usable_cores", lambda: usable)
    assert hardware.threads_for_load(threads, busy) == expected


# -- heat and throttling ----------------------------------------------------------------

def fake_vcgencmd(tmp_path, monkeypatch, answer: str) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    tool = bin_dir / "vcgencmd"
    tool.write_text(f"#!/bin/sh\necho '{answer}'\n")
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")


@pytest.mark.parametrize("answer, now, since", [
    ("throttled=0x0", [], []),
    ("throttled=0x50005", ["under-voltage", "throttled"], ["under-voltage", "throttled"]),
    ("throttled=0x80000", [], ["soft temperature limit"]),   # was hot, is fine now
])
def test_a_pi_reports_throttling_through_vcgencmd(tmp_path, monkeypatch, answer, now, since):
    fake_vcgencmd(tmp_path, monkeypatch, answer)
    t = hardware.throttling()
    assert (t["now"], t["since_boot"], t["source"]) == (now, since, "vcgencmd get_throttled")


def test_x86_counts_thermal_throttle_events(machine, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")  # no vcgencmd
    for n, count in ((0, 3), (1, 2)):
        machine.cpu(n, core=n)
        d = machine.sys / f"cpu{n}" / "thermal_throttle"
        d.mkdir(parents=True)
        (d / "core_throttle_count").write_text(f"{count}\n")
    t = hardware.throttling()
    assert t["since_boot"] == ["5 thermal throttling events"] and t["now"] == []


def test_no_report_is_none_and_doctor_says_so(machine, monkeypatch):
    from click.testing import CliRunner

    from edgeinfer.cli import cli

    monkeypatch.setenv("PATH", "/nonexistent")
    machine.cpu(0, core=0)
    assert hardware.throttling() is None
    monkeypatch.setattr(hardware, "throttling", lambda: {"now": ["throttled"], "since_boot": [],
                                                           "source": "vcgencmd get_throttled"})
    out = CliRunner().invoke(cli, ["doctor"]).output
    assert "throttling       throttled (vcgencmd get_throttled)" in out


def test_stats_carry_the_cpu_temperature_and_throttling(tiny_model, monkeypatch):
    import time

    from edgeinfer import heat
    from edgeinfer.engine import Engine

    monkeypatch.setattr(hardware, "cpu_temperature", lambda: 71.5)
    monkeypatch.setattr(hardware, "throttling", lambda: {"now": ["throttled"], "since_boot": [], "source": "x"})
    monkeypatch.setattr(heat, "latest", heat._Latest())
    deadline = time.monotonic() + 10
    while heat.latest.get() != (71.5, ["throttled"]):   # read in a thread of its own
        assert time.monotonic() < deadline
        time.sleep(0.01)
    with Engine(tiny_model, threads=1, prompt_cache=False) as e:
        done = list(e.stream("Hello", max_tokens=2))[-1]
    assert done.stats.cpu_temperature_c == 71.5 and done.stats.throttled == ["throttled"]
