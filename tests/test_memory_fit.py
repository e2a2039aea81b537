"""Memory fit: a pull refuses before downloading a model that will not fit
(and warns and pulls with --force), and a load refuses before llama.cpp
allocates anything; each refusal names a context or a model that fits."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import edgeinfer
from edgeinfer import hardware
from edgeinfer.cli import cli
from edgeinfer.engine import Engine
from edgeinfer.gguf_file import read_gguf


def _catalog_entry(config: Path, model: Path) -> None:
    data = model.read_bytes()
    (config / "models").mkdir(parents=True, exist_ok=True)
    (config / "models" / "tiny.toml").write_text(
        f'name = "tiny"\ntag = "f16"\ndefault_tag = true\nfile = "{model.name}"\nsize = {len(data)}\n'
        f'sha256 = "{hashlib.sha256(data).hexdigest()}"\nlicense = "MIT"\n\n'
        f'[[sources]]\nkind = "file"\npath = "{model}"\n', encoding="utf-8")


def test_estimate_grows_with_the_context(tiny_model):
    info = read_gguf(tiny_model)
    assert info.memory_estimate(512) < info.memory_estimate(4096) < info.memory_estimate(8192)
    grown = info.memory_estimate(4096) - info.memory_estimate(512)
    assert grown >= info.kv_cache_bytes(4096) - info.kv_cache_bytes(512)


def test_pull_refuses_before_downloading_and_force_pulls_anyway(tiny_model, monkeypatch, tmp_path):
    _catalog_entry(Path(os.environ["EDGEINFER_CONFIG"]), tiny_model)
    monkeypatch.setattr(hardware, "available_memory", lambda: 1_000_000)
    copied = []
    pull_mod = sys.modules["edgeinfer.pull"]   # the package's `pull` is the function
    real_copy = pull_mod.copy_file
    monkeypatch.setattr(pull_mod, "copy_file", lambda *a, **k: copied.append(1) or real_copy(*a, **k))

    result = CliRunner().invoke(cli, ["pull", "tiny"])
    assert result.exit_code == 1 and not copied          # not a byte moved
    assert "was not downloaded" in result.output and "--force" in result.output
    assert edgeinfer.ModelStore().get("tiny:f16") is None
    assert not list(edgeinfer.ModelStore().blobs.glob("*"))   # nothing half-written

    result = CliRunner().invoke(cli, ["pull", "tiny", "--force"])
    assert result.exit_code == 0, result.output
    assert any(line.startswith("warning:") and "anyway" in line for line in result.stderr.splitlines())
    assert edgeinfer.ModelStore().get("tiny:f16") is not None


def test_pull_names_a_context_or_models_that_fit(monkeypatch):
    from edgeinfer import catalog
    from edgeinfer.fit import entry_refusal

    big = catalog.lookup(edgeinfer.names.parse_ref("qwen2.5-coder-1.5b-instruct"))
    small = catalog.lookup(edgeinfer.names.parse_ref("smollm2-135m-instruct"))
    # Room for the weights and a short context: the hint names the context.
    monkeypatch.setattr(hardware, "available_memory", lambda: big.size + (big.memory - big.size) // 4 + 1)
    err = entry_refusal(big, 4096)
    assert err is not None and "--n-ctx 1024" in err.hint
    # Room for the small model only: the hint names it, with its size.
    monkeypatch.setattr(hardware, "available_memory", lambda: small.memory + 1)
    err = entry_refusal(big, 4096)
    assert "does not fit at any context" in err.hint and small.ref in err.hint
    assert entry_refusal(small) is None


def test_pull_is_quiet_about_memory_when_it_fits(tiny_model):
    _catalog_entry(Path(os.environ["EDGEINFER_CONFIG"]), tiny_model)
    result = CliRunner().invoke(cli, ["pull", "tiny"])
    assert result.exit_code == 0
    assert "warning:" not in result.stderr


def test_load_refuses_before_llama_cpp_when_it_will_not_fit(tiny_model, monkeypatch):
    need = read_gguf(tiny_model).memory_estimate(4096)
    monkeypatch.setattr(hardware, "available_memory", lambda: need - 1)
    monkeypatch.setattr("llama_cpp.llama_model_load_from_file",
                        lambda *a: pytest.fail("llama.cpp was asked to load a model that does not fit"))

    with pytest.raises(edgeinfer.MemoryFitError) as err:
        Engine(tiny_model, n_ctx=4096)
    assert "--n-ctx 2048" in err.value.hint


def test_a_smaller_context_fits_where_a_larger_one_does_not(tiny_model, monkeypatch):
    info = read_gguf(tiny_model)
    monkeypatch.setattr(hardware, "available_memory", lambda: info.memory_estimate(1024))
    with pytest.raises(edgeinfer.MemoryFitError):
        Engine(tiny_model, n_ctx=8192, threads=1)
    with Engine(tiny_model, n_ctx=1024, threads=1, prompt_cache=False) as engine:
        assert engine.n_ctx == 1024
        assert engine.last_stats is None and engine.generate("hello", max_tokens=2, temperature=0) == \
            engine.generate("hello", max_tokens=2, temperature=0)


def test_cli_run_says_what_to_do_when_it_will_not_fit(tiny_model, monkeypatch):
    monkeypatch.setattr(hardware, "available_memory", lambda: 1_000)
    result = CliRunner().invoke(cli, ["run", str(tiny_model), "hi"])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:") and "does not fit at any context" in lines[0]
