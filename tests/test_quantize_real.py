"""quantize, convert and compare on the catalog's default model, SmolLM2 135M
Instruct, which ships only as Q4_1: the issue's workflow, end to end.

    edgeinfer convert smollm2-135m-instruct --to f16
    edgeinfer quantize smollm2-135m-instruct:f16 --to q8_0
    edgeinfer quantize smollm2-135m-instruct:f16 --to q4_k_m

The F16 master is only as precise as the Q4_1 it came from, and SmolLM2's
576-wide rows are no multiple of 256, so Q4_K_M falls back to Q5_0 for most
tensors. Measured here (3 chunks, 765 tokens): perplexity F16 8.366, Q8_0
8.432 (+0.8 %), Q4_K_M 9.170 (+9.6 %); KL vs F16 0.0045 and 0.076; top-1
agreement 96.6 % and 88.4 %.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

import edgeinfer
from edgeinfer.cli import cli
from edgeinfer.gguf_file import read_gguf
from edgeinfer.quality import compare
from edgeinfer.store import ModelStore

pytestmark = pytest.mark.real_model

MODEL = "smollm2-135m-instruct"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def made(real_store, tmp_path_factory) -> ModelStore:
    """A store of its own holding the shipped Q4_1 and, made through the
    CLI, its F16 master and that master's Q8_0 and Q4_K_M.

    A copy, so the shared (maybe persistent, EDGEINFER_TEST_STORE) real
    store gets no extra models."""
    store = ModelStore(tmp_path_factory.mktemp("quant-real"))
    store.ensure_dirs()
    shipped = real_store.resolve(MODEL)
    shutil.copyfile(shipped.path, store.blob_path(shipped.sha256))
    store.put(dataclasses.replace(shipped, path=None))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDGEINFER_HOME", str(store.root))
        for args in (["convert", MODEL, "--to", "f16"],
                     ["quantize", f"{MODEL}:f16", "--to", "q8_0"],
                     ["quantize", f"{MODEL}:f16", "--to", "q4_k_m"]):
            result = CliRunner().invoke(cli, [*args, "-q"])
            assert result.exit_code == 0, (args, result.output)
    yield store
    shutil.rmtree(store.root, ignore_errors=True)


@pytest.fixture
def home(made, monkeypatch) -> ModelStore:
    monkeypatch.setenv("EDGEINFER_HOME", str(made.root))
    return made


def load(tag: str, **options):
    # One thread: faster than two on the shared test machine.
    return edgeinfer.load(f"{MODEL}:{tag}", threads=1, **options)


def answer(tag: str) -> str:
    with load(tag) as engine:
        return engine.chat(QUESTION, temperature=0)


@pytest.fixture(scope="module")
def reports(made):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDGEINFER_HOME", str(made.root))
        engines = [load(tag, n_ctx=1024, n_batch=512, prompt_cache=False) for tag in ("f16", "q8_0", "q4_k_m")]
        try:
            reports, _ = compare(engines, max_chunks=3, speed=False)
        finally:
            for e in engines:
                e.close()
    return {r.quant: r for r in reports}


def weight_types(path: Path) -> dict[str, int]:
    return dict(sorted(read_gguf(path).quant_types.items()))


def test_the_models_and_their_provenance(home):
    shipped, f16, q8, q4km = (home.get(f"{MODEL}:{t}") for t in ("q4_1", "f16", "q8_0", "q4_k_m"))
    assert f16.parent == shipped.sha256
    assert f16.options["precision_bound_by"] == "Q4_1" and f16.options["tool"] == "gguf-py"
    assert q8.parent == q4km.parent == f16.sha256
    assert (q8.options["type"], q4km.options["type"]) == ("Q8_0", "Q4_K_M")
    for m in (f16, q8, q4km):  # the catalog's system prompt travels with the model
        assert m.system == shipped.system == "You are a helpful assistant."

    assert weight_types(f16.path) == {"F16": 211, "F32": 61}
    assert weight_types(q8.path) == {"F32": 61, "Q8_0": 211}
    mix = weight_types(q4km.path)
    assert set(mix) == {"F32", "Q4_K", "Q5_0", "Q6_K", "Q8_0"}
    assert max(mix, key=mix.get) == "Q5_0"  # 576-wide rows cannot be K-quants
    assert q4km.size < q8.size < f16.size


@pytest.mark.parametrize("tag", ["f16", "q8_0"])
def test_the_master_and_its_q8_0_know_paris(home, tag):
    assert "Paris" in answer(tag)


def test_q4_k_m_loads_and_answers(home):
    text = answer("q4_k_m")
    assert text.strip()


def test_q4_k_m_knows_paris(home):
    # With the sampling it inherits from SmolLM2's catalog entry (repeat
    # penalty 1.1), greedy. Found earlier, with no penalty it answers
    # 'La femme de France, le Grand Croix, est le Grand Croix de la Cité, ...':
    # most of its tensors fall back to Q5_0 (576-wide rows) on top of the
    # Q4_1 loss, perplexity +9.6 % and KL 0.076 against the master.
    assert "Paris" in answer("q4_k_m")


def test_q8_0_perplexity_is_within_1_percent_of_the_master(reports):
    f16, q8, q4km = reports["F16"], reports["Q8_0"], reports["Q4_K_M"]
    assert f16.tokens_scored == q8.tokens_scored == 3 * 255
    assert 1 < f16.perplexity < 30  # real English for a real model, not a random one
    assert abs(q8.perplexity / f16.perplexity - 1) < 0.01
    assert 0 < q8.kl_divergence < 0.02 and q8.top1_agreement > 0.9
    assert q4km.kl_divergence > q8.kl_divergence and q4km.top1_agreement < q8.top1_agreement
    assert q4km.perplexity > q8.perplexity


def test_a_model_compared_with_itself(home):
    with load("q4_1", n_ctx=1024, n_batch=512, prompt_cache=False) as a, \
            load("q4_1", n_ctx=1024, n_batch=512, prompt_cache=False) as b:
        (ra, rb), _ = compare([a, b], max_chunks=1, speed=False)
    assert rb.kl_divergence == pytest.approx(0, abs=1e-9)
    assert rb.top1_agreement == 1.0
    assert rb.perplexity == ra.perplexity


def test_requantizing_the_shipped_q4_1_is_refused_in_one_line(real_model_home):
    def files():
        return sorted(p for p in real_model_home.rglob("*") if p.is_file() and p.parent.name != "locks")

    before = files()
    result = CliRunner().invoke(cli, ["quantize", MODEL, "--to", "q4_k_m"])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"Error: {MODEL}:q4_1 is already quantized (Q4_1)")
    assert "--allow-requantize" in lines[0] and f"edgeinfer convert {MODEL}:q4_1 --to f16" in lines[0]
    assert files() == before
