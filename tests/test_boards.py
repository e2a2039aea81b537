"""Detection on three boards, from the snapshots in tests/fixtures/boards:
what edgeinfer sees of each, the defaults it picks, and the llama.cpp
build flags install-pi.sh picks for it."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from edgeinfer import hardware
from edgeinfer.fit import box_profile

BOARDS = Path(__file__).resolve().parent / "fixtures" / "boards"
SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "install-pi.sh"

EXPECTED = {
    # board: (model, cpu, cores, clusters, default threads, box profile, K cache, context, hottest °C)
    "pi4": ("Raspberry Pi 4 Model B Rev 1.5", "Raspberry Pi 4 Model B Rev 1.5 (4x Cortex-A72)", 4, [4], 4,
            "small", "q8_0", 1024, 52.6),
    "pi5": ("Raspberry Pi 5 Model B Rev 1.0", "Raspberry Pi 5 Model B Rev 1.0 (4x Cortex-A76)", 4, [4], 4,
            "standard", "f16", 4096, 61.4),
    "rk3588": ("Radxa ROCK 5B", "Radxa ROCK 5B (4x Cortex-A55 + 4x Cortex-A76)", 8, [4, 4], 4,
               "standard", "f16", 4096, 45.3),
}


@pytest.mark.parametrize("board", sorted(EXPECTED))
def test_what_detection_sees_on_each_board(board):
    model, cpu, cores, clusters, threads, profile, kv, n_ctx, hottest = EXPECTED[board]
    with hardware.rooted(BOARDS / board):
        assert hardware.board_model() == model
        assert hardware.cpu_model() == cpu
        assert hardware.physical_cores() == cores
        assert [len(c) for c in hardware.core_clusters().values()] == clusters
        assert hardware.default_threads() == threads
        assert hardware.cpu_temperature() == pytest.approx(hottest, abs=0.05)
        assert hardware.throttling() is None       # no vcgencmd is asked of a snapshot
        box = box_profile()
        assert (box.name, box.kv_type, box.n_ctx) == (profile, kv, n_ctx)
        d = hardware.describe()
        assert d["board"] == model and d["total_memory"] > 0


def test_rk3588_threads_stay_on_the_big_cores():
    # llama.cpp's own default is every core (8): the little A55s then hold
    # back the A76s at each barrier, about 2x slower than -t 4.
    with hardware.rooted(BOARDS / "rk3588"):
        big = hardware.big_cores()
        assert big == [4, 5, 6, 7]
        assert set(hardware.arm_cores()[i] for i in big) == {"Cortex-A76"}
        assert hardware.default_threads() == 4


def test_a_1gb_pi_gets_the_small_box_defaults():
    with hardware.rooted(BOARDS / "pi4"):
        box = box_profile()
        assert box.max_parallel == 1 and "0.9 GiB" in box.describe()
        assert hardware.total_memory() == 924724 * 1024


def test_a_cgroup_limit_makes_a_big_board_small(tmp_path):
    # The same Pi 5, as a service held to 1.5 GB by MemoryMax=.
    import shutil

    root = tmp_path / "pi5"
    shutil.copytree(BOARDS / "pi5", root)
    (root / "proc/self").mkdir(parents=True)
    (root / "proc/self/cgroup").write_text("0::/system.slice/edgeinfer.service\n")
    unit = root / "sys/fs/cgroup/system.slice/edgeinfer.service"
    unit.mkdir(parents=True)
    (unit / "memory.max").write_text(str(1536 << 20) + "\n")
    (unit / "memory.current").write_text(str(200 << 20) + "\n")
    with hardware.rooted(root):
        assert hardware.total_memory() == 1536 << 20
        assert hardware.available_memory() == (1536 - 200) << 20
        assert box_profile().name == "small"


def dry_run(board: str, prefix: Path) -> str:
    root = BOARDS / board
    env = {**os.environ, "EDGEINFER_INSTALL_ARCH": "aarch64",
           "EDGEINFER_INSTALL_MODEL_FILE": str(root / "proc/device-tree/model"),
           "EDGEINFER_INSTALL_COMPATIBLE_FILE": str(root / "proc/device-tree/compatible"),
           "EDGEINFER_PREFIX": str(prefix / "opt")}
    out = subprocess.run(["bash", str(SCRIPT), "--dry-run"], capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.mark.parametrize("board, kind, flags", [
    ("pi4", "pi4", "-DGGML_NATIVE=OFF -DGGML_CPU_ARM_ARCH=armv8-a"),
    ("pi5", "pi5", "-DGGML_NATIVE=OFF -DGGML_CPU_ARM_ARCH=armv8.2-a+dotprod+fp16"),
    ("rk3588", "rk3588", "-DGGML_NATIVE=OFF -DGGML_CPU_ARM_ARCH=armv8.2-a+dotprod+fp16"),
])
def test_install_pi_picks_the_build_flags_from_the_board(board, kind, flags, tmp_path):
    out = dry_run(board, tmp_path)
    assert f"Board: {kind}; llama.cpp flags: {flags}" in out
    assert f"CMAKE_ARGS={flags}" in out
