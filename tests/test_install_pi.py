"""scripts/install-pi.sh, in --dry-run: what it would do on each board,
and that it does nothing. The real install runs on a Pi."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "install-pi.sh"


def dry(tmp_path, board: str | None, *args, arch="aarch64"):
    model = tmp_path / "model"
    model.write_bytes((board or "Some ARM board").encode() + b"\0")
    env = {**os.environ, "EDGEINFER_INSTALL_ARCH": arch, "EDGEINFER_INSTALL_MODEL_FILE": str(model),
           "EDGEINFER_PREFIX": str(tmp_path / "opt")}
    return subprocess.run(["bash", str(SCRIPT), "--dry-run", *args], capture_output=True, text=True,
                          timeout=60, env=env)


@pytest.mark.parametrize("board, flags", [
    ("Raspberry Pi 4 Model B Rev 1.4", "GGML_CPU_ARM_ARCH=armv8-a"),
    ("Raspberry Pi 5 Model B Rev 1.0", "armv8.2-a+dotprod+fp16"),
    ("Radxa ROCK 5B (RK3588)", "armv8.2-a+dotprod+fp16"),
])
def test_dry_run_prints_every_step_for_the_board(tmp_path, board, flags):
    out = dry(tmp_path, board)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    for step in ("apt-get install", "python3 -m venv", f"CMAKE_ARGS=-DGGML_NATIVE=OFF -D{flags}"
                 if "GGML" in flags else flags, "doctor --selftest", "rpc-worker --build-only", " tune",
                 "--print-systemd-unit",
                 "systemctl enable --now edgeinfer.service"):
        assert step in text, (step, text)
    assert not (tmp_path / "opt").exists()  # nothing was done


def test_lan_install_makes_a_token_file_and_serves_on_the_lan(tmp_path):
    out = dry(tmp_path, "Raspberry Pi 5 Model B", "--lan")
    assert out.returncode == 0, out.stderr
    assert "--http 8080 --host 0.0.0.0 --token-file /etc/edgeinfer/token" in out.stdout
    assert "umask 077" in out.stdout


def test_it_refuses_other_architectures_but_a_dry_run_shows_the_plan(tmp_path):
    env = {**os.environ, "EDGEINFER_INSTALL_ARCH": "x86_64", "EDGEINFER_PREFIX": str(tmp_path / "opt")}
    out = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 1 and "64-bit ARM" in out.stderr
    out = dry(tmp_path, "Raspberry Pi 5 Model B Rev 1.0", arch="x86_64")
    assert out.returncode == 0 and "64-bit ARM" in out.stderr and "plan" in out.stdout
    assert "systemctl enable --now edgeinfer.service" in out.stdout
    assert not (tmp_path / "opt").exists()


def test_uninstall_keeps_models_unless_asked(tmp_path):
    keep = dry(tmp_path, None, "--uninstall")
    assert keep.returncode == 0 and "rm -rf " + str(tmp_path / "opt") in keep.stdout
    assert "Kept the models" in keep.stdout and "/var/lib/edgeinfer" not in keep.stdout.split("Kept")[0]
    purge = dry(tmp_path, None, "--uninstall", "--purge-models")
    assert "rm -rf /var/lib/edgeinfer" in purge.stdout
