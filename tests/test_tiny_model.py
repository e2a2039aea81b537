"""The tiny test model: built deterministically, and llama.cpp accepts it.

Every fast test in the suite runs on this model, so these tests check the
things the others take for granted: it loads, tokenizes like a real BPE
model, has ChatML control tokens, prefills thousands of tokens, generates,
and quantizes to real K-quants and legacy quants.
"""

from __future__ import annotations

import importlib.util
import itertools
import pathlib

import gguf
import llama_cpp
import pytest

_BUILDER = pathlib.Path(__file__).resolve().parent.parent / "scripts" / "build_tiny_model.py"


def _load_builder():
    spec = importlib.util.spec_from_file_location("build_tiny_model", _BUILDER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


builder = _load_builder()

TEXT = (
    "The engine reads the prompt, writes new tokens one at a time, and stops "
    "when it is done. Numbers like 3.14 and 2026, punctuation (yes!), "
    "an apostrophe's use, café, naïve, and 🙂 all survive.\n  Indented line."
)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> pathlib.Path:
    return builder.build(tmp_path_factory.mktemp("tiny") / "tiny.gguf")


def open_llama(path: pathlib.Path, home: pathlib.Path | None = None, **kwargs) -> llama_cpp.Llama:
    """llama-cpp-python's own Llama, with the native setting the engine's
    self-test chose for this file (on a machine whose AMX matmul crashes,
    a plain Llama dies on its first decode). ``home`` is the store the
    self-test records in, for callers outside a test's own home."""
    from edgeinfer import native, read_gguf, selftest

    with pytest.MonkeyPatch.context() as mp:
        if home is not None:
            mp.setenv("EDGEINFER_HOME", str(home))
        verdict = selftest.ensure(path, threads=1)
    with native.llama_defaults(verdict.setting, read_gguf(path)):
        return llama_cpp.Llama(model_path=str(path), verbose=False, **kwargs)


@pytest.fixture(scope="module")
def llm(model_path, tmp_path_factory) -> llama_cpp.Llama:
    # Module-scoped, so it is built before the per-test home exists.
    model = open_llama(model_path, home=tmp_path_factory.mktemp("llm-home"), n_ctx=8192, seed=0)
    yield model
    model.close()


def _tensor_types(path: pathlib.Path) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


def test_build_is_deterministic_and_leaves_no_temp_file(tmp_path):
    first = builder.build(tmp_path / "a.gguf", seed=0)
    second = builder.build(tmp_path / "b.gguf", seed=0)
    other = builder.build(tmp_path / "c.gguf", seed=1)

    assert first == tmp_path / "a.gguf"
    assert first.read_bytes() == second.read_bytes()
    assert first.read_bytes() != other.read_bytes()
    # no temporary file is left beside the outputs
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "home") == ["a.gguf", "b.gguf", "c.gguf"]


def test_cli_writes_the_same_file(tmp_path, model_path, capsys):
    builder.main([str(tmp_path / "cli.gguf")])
    assert (tmp_path / "cli.gguf").read_bytes() == model_path.read_bytes()
    assert "cli.gguf" in capsys.readouterr().out


def test_llama_cpp_reads_the_metadata(llm):
    assert llm.n_ctx() == 8192
    assert llm.n_vocab() == builder.VOCAB_SIZE
    assert llama_cpp.llama_model_n_ctx_train(llm.model) == 8192
    assert llm.metadata["general.name"] == "edgeinfer-tiny"
    assert llm.metadata["tokenizer.ggml.pre"] == "gpt-2"
    assert "<|im_start|>" in llm.metadata["tokenizer.chat_template"]


def test_tokenizer_round_trips_text(llm):
    data = TEXT.encode("utf-8")
    tokens = llm.tokenize(data, add_bos=False, special=False)

    assert llm.detokenize(tokens) == data
    # The learned merges are in use: common words are single tokens, so the
    # text takes far fewer tokens than it has bytes.
    assert len(tokens) < 0.6 * len(data)
    assert len(llm.tokenize(b" the", add_bos=False)) == 1


@pytest.mark.parametrize("special", ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
def test_special_tokens_are_control_tokens_only_when_parsed(llm, special):
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    text = f"{special}user\nhello".encode()

    parsed = llm.tokenize(text, add_bos=False, special=True)
    special_id = parsed[0]
    assert llm.detokenize([special_id], special=True) == special.encode()
    assert llama_cpp.llama_vocab_is_control(vocab, special_id)
    assert llm.detokenize(parsed[1:]) == b"user\nhello"

    literal = llm.tokenize(text, add_bos=False, special=False)
    assert special_id not in literal
    assert not any(llama_cpp.llama_vocab_is_control(vocab, t) for t in literal)
    assert llm.detokenize(literal) == text


def test_special_token_ids(llm):
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    ids = {t: llm.tokenize(t.encode(), add_bos=False, special=True) for t in builder.SPECIAL_TOKENS}

    assert ids["<|endoftext|>"] == [llama_cpp.llama_vocab_bos(vocab)]
    assert ids["<|im_end|>"] == [llama_cpp.llama_vocab_eos(vocab)]
    assert ids["<|im_end|>"] == [llama_cpp.llama_vocab_eot(vocab)]
    assert llama_cpp.llama_vocab_is_eog(vocab, ids["<|im_end|>"][0])
    assert not llama_cpp.llama_vocab_is_eog(vocab, ids["<|im_start|>"][0])
    assert not llama_cpp.llama_vocab_get_add_bos(vocab)


def test_generates_tokens_greedily_and_repeatably(llm):
    prompt = llm.tokenize(b"The weather was", add_bos=False)
    runs = []
    for _ in range(2):
        llm.reset()
        runs.append(list(itertools.islice(llm.generate(prompt, temp=0.0), 8)))

    assert len(runs[0]) == 8
    assert runs[0] == runs[1]
    assert all(0 <= t < builder.VOCAB_SIZE for t in runs[0])

    # The weights are random, so the text is noise and can hold stray
    # UTF-8 continuation bytes; the high-level API still finishes cleanly.
    result = llm.create_completion("The weather was", max_tokens=8, temperature=0.0)
    assert result["choices"][0]["finish_reason"] == "length"
    assert result["choices"][0]["text"]


def test_chat_template_drives_chat_completion(llm):
    reply = llm.create_chat_completion(
        messages=[{"role": "user", "content": "Hello there"}], max_tokens=4, temperature=0.0
    )
    assert reply["choices"][0]["message"]["role"] == "assistant"
    # user turn + assistant header, rendered with the ChatML control tokens
    assert reply["usage"]["prompt_tokens"] == len(
        llm.tokenize(
            b"<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\n",
            add_bos=False,
            special=True,
        )
    )


def test_prefills_three_thousand_tokens(llm):
    corpus = llm.tokenize(builder.CORPUS.encode(), add_bos=False)
    prompt = (corpus * (3000 // len(corpus) + 1))[:3000]

    result = llm.create_completion(prompt, max_tokens=2, temperature=0.0)

    assert result["usage"]["prompt_tokens"] == 3000
    assert result["usage"]["completion_tokens"] >= 1


@pytest.mark.parametrize(
    ("ftype", "matrix_types", "max_ratio"),
    [
        (llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, {"Q8_0"}, 0.6),
        (llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0, {"Q4_0", "Q6_K"}, 0.35),  # output.weight gets Q6_K
        (llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M, {"Q4_K", "Q6_K"}, 0.4),
    ],
    ids=["Q8_0", "Q4_0", "Q4_K_M"],
)
def test_quantizes_and_the_result_loads(model_path, tmp_path, ftype, matrix_types, max_ratio):
    out = tmp_path / "quantized.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype

    rc = llama_cpp.llama_model_quantize(str(model_path).encode(), str(out).encode(), params)

    assert rc == 0
    assert out.stat().st_size < max_ratio * model_path.stat().st_size
    # Every matrix was quantized; none kept as F16 because its rows did not
    # fit the quantizer's block size. Norms stay F32.
    types = _tensor_types(out)
    assert {t for name, t in types.items() if not name.endswith("norm.weight")} <= matrix_types
    assert {t for name, t in types.items() if name.endswith("norm.weight")} == {"F32"}

    quantized = open_llama(out, n_ctx=512)
    try:
        prompt = quantized.tokenize(b"The weather was", add_bos=False)
        assert len(list(itertools.islice(quantized.generate(prompt, temp=0.0), 4))) == 4
    finally:
        quantized.close()
