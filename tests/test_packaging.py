"""The catalog ships inside the package: found from a built wheel and from
this editable install alike."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = sorted(p.name for p in (ROOT / "models").glob("*.toml"))

PROBE = ("import json, edgeinfer, edgeinfer.catalog as c; "
         "print(json.dumps({'file': edgeinfer.__file__, 'refs': sorted(c.load_catalog()), "
         "'default': c.default_entry().ref}))")


def _probe(env: dict | None = None, cwd: Path | None = None) -> dict:
    import json

    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True,
                         env=env, cwd=cwd)
    return json.loads(out.stdout)


def test_editable_install_finds_the_catalog():
    got = _probe(cwd=Path("/"))
    assert Path(got["file"]).resolve().is_relative_to(ROOT)
    assert got["default"] == "smollm2-135m-instruct:q4_1"
    assert {"smollm2-135m-instruct:q4_1", "gemma-3-270m:q4_k_m"} <= set(got["refs"])


@pytest.mark.slow
def test_a_built_wheel_carries_the_catalog(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q",
                    "-w", str(wheels), str(ROOT)], check=True, capture_output=True)
    (wheel,) = wheels.glob("edgeinfer-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    shipped = (n.rsplit("/", 1)[1] for n in names if n.startswith("edgeinfer/models/") and n.endswith(".toml"))
    assert sorted(shipped) == SHIPPED

    # Installed on its own (dependencies come from this environment), away
    # from the source tree: the catalog must come from inside the wheel.
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                    str(wheel)], check=True, capture_output=True)
    env = {**os.environ, "PYTHONPATH": str(target), "PYTHONNOUSERSITE": "1"}
    got = _probe(env=env, cwd=tmp_path)
    assert Path(got["file"]).resolve().is_relative_to(target)
    assert got["default"] == "smollm2-135m-instruct:q4_1"
    assert {"smollm2-135m-instruct:q4_1", "gemma-3-270m:q4_k_m"} <= set(got["refs"])
