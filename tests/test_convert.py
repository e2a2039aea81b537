"""The BERT converter on a tiny random BERT the suite builds
(scripts/build_tiny_bert.py): llama.cpp loads what it writes, and its
embeddings agree with a numpy forward pass of the original safetensors
(tests/bert_reference.py, which shares no code with the converter and
tokenizes with its own WordPiece); the bytes are the same on every run;
other architectures and damaged files are refused; ``edgeinfer import
DIR`` and a catalog entry with ``[convert]`` go through the store.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import zipfile
from pathlib import Path

import gguf
import llama_cpp
import numpy as np
import pytest
from bert_reference import Bert, cosine
from click.testing import CliRunner
from conftest import load_script

from edgeinfer import catalog, model_choice, native
from edgeinfer.cli import cli
from edgeinfer.convert import TYPES, convert_folder, convert_zip
from edgeinfer.errors import (
    AllSourcesFailedError,
    CatalogError,
    ChecksumError,
    ConvertError,
    QuantizeError,
)
from edgeinfer.pull import pull
from edgeinfer.store import ModelStore

builder = load_script("build_tiny_bert")
MIN_COSINE = {"f16": 0.99, "q8_0": 0.98}


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return builder.build(tmp_path_factory.mktemp("tiny-bert") / "tiny-bert")


@pytest.fixture(scope="module")
def converted(folder, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("converted")
    return {t: convert_folder(folder, out / f"tiny-bert.{t}.gguf", to=t).path for t in TYPES}


def open_embedder(path: Path) -> llama_cpp.Llama:
    # "plain": llama.cpp's plain CPU kernels, which run on every machine
    # (the self-test's choice is for generation models).
    with native.llama_defaults("plain"):
        return llama_cpp.Llama(str(path), embedding=True, n_ctx=builder.N_CTX, verbose=False)


@pytest.mark.parametrize("to", TYPES)
def test_embeddings_match_a_numpy_forward_pass(converted, folder, to):
    ref = Bert(folder)
    llm = open_embedder(converted[to])
    try:
        texts = builder.sentences()
        got = [np.asarray(llm.embed(t)) for t in texts]
        # The converted vocabulary tokenizes as BERT's WordPiece does,
        # pieces, [UNK] and punctuation included.
        assert [llm.tokenize(t.encode()) for t in texts] == [ref.tokenizer.encode(t) for t in texts]
    finally:
        llm.close()
    want = [ref.embed(t) for t in texts]
    cos = np.array([[cosine(g, w) for w in want] for g in got])
    assert cos.diagonal().min() >= MIN_COSINE[to], cos.diagonal()
    # The bound discriminates: another sentence's reference is far off.
    assert (cos - np.eye(len(texts)) * 2).max() < 0.9


def test_the_gguf_is_what_llama_cpp_expects_of_a_bert(converted):
    r = gguf.GGUFReader(converted["q8_0"])
    f = {k: v.contents() for k, v in r.fields.items() if not k.startswith("GGUF.")}
    assert f["general.architecture"] == "bert"
    assert f["bert.pooling_type"] == gguf.PoolingType.MEAN
    assert f["bert.attention.causal"] is False
    assert f["bert.context_length"] == builder.N_CTX
    assert f["tokenizer.ggml.token_type_count"] == 2
    assert f["tokenizer.ggml.model"] == "bert"
    tokens, types = f["tokenizer.ggml.tokens"], f["tokenizer.ggml.token_type"]
    assert len(tokens) == builder.VOCAB_SIZE
    # Phantom space: word starts get U+2581, ## continuations lose ##.
    assert "\u2581cat" in tokens and "ing" in tokens and "##ing" not in tokens
    assert types[tokens.index("[CLS]")] == gguf.TokenType.CONTROL
    assert f["tokenizer.ggml.bos_token_id"] == tokens.index("[CLS]")
    assert f["tokenizer.ggml.seperator_token_id"] == tokens.index("[SEP]")
    kinds = {t.name: t.tensor_type.name for t in r.tensors}
    assert "pooler.dense.weight" not in kinds and len(kinds) == 5 + 16 * builder.N_LAYER
    for name, kind in kinds.items():
        small = name.endswith(".bias") or "norm" in name or name.startswith(("position_embd", "token_types"))
        assert kind == ("F32" if small else "Q8_0"), name


def test_conversion_is_deterministic(folder, tmp_path):
    """Two builds in two places, converted twice: one sha256, so the catalog
    can pin what every machine converts."""
    other = builder.build(tmp_path / "elsewhere" / "model")
    for to in TYPES:
        a = convert_folder(folder, tmp_path / "a" / f"m.{to}.gguf", to=to, name="tiny-bert")
        b = convert_folder(other, tmp_path / "b" / f"m.{to}.gguf", to=to, name="tiny-bert")
        assert a.sha256 == b.sha256 == sha256(a.path) == sha256(b.path)
        assert a.size == a.path.stat().st_size
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["m.f16.gguf", "m.q8_0.gguf"]  # no temp file left


def _copy(folder: Path, dest: Path) -> Path:
    shutil.copytree(folder, dest)
    return dest


def test_other_architectures_are_refused(folder, tmp_path):
    llama = _copy(folder, tmp_path / "llama")
    cfg = json.loads((llama / "config.json").read_text())
    cfg.update(architectures=["LlamaForCausalLM"], model_type="llama")
    (llama / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConvertError) as e:
        convert_folder(llama, tmp_path / "out.gguf")
    assert "'LlamaForCausalLM' is not one the converter knows" in str(e.value)
    assert "BertModel" in str(e.value) and "convert_hf_to_gguf.py" in e.value.hint
    assert isinstance(e.value, QuantizeError) and isinstance(e.value, ValueError)
    assert list(tmp_path.glob("out*")) == []


@pytest.mark.parametrize("damage, says", [
    ("header", "not a safetensors file"),
    ("offsets", "lies outside the file"),
    ("missing", "no tensor for blk.1.ffn_up.weight"),
])
def test_damaged_weights_are_refused(folder, tmp_path, damage, says):
    bad = _copy(folder, tmp_path / "bad")
    st = bad / "model.safetensors"
    raw = st.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    if damage == "header":
        st.write_bytes((10**12).to_bytes(8, "little") + raw[8:])
    else:
        if damage == "offsets":
            header["embeddings.LayerNorm.bias"]["data_offsets"][1] += 10**9
        else:
            del header["encoder.layer.1.intermediate.dense.weight"]
        text = json.dumps(header).encode()
        st.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n:])
    with pytest.raises(ConvertError, match=says):
        convert_folder(bad, tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists()


def _zip(folder: Path, archive: Path, extra: dict[str, bytes] | None = None) -> Path:
    with zipfile.ZipFile(archive, "w") as zf:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                zf.write(p, f"model/{p.relative_to(folder)}")
        for name, data in (extra or {}).items():
            zf.writestr(name, data)
    return archive


def test_a_zipped_folder_converts_to_the_same_bytes(folder, tmp_path):
    archive = _zip(folder, tmp_path / "m.zip", {"../escape.txt": b"x", "model/notes/readme.md": b"x"})
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    z = convert_zip(archive, tmp_path / "z.gguf", to="q8_0", name="tiny-bert", scratch=scratch)
    f = convert_folder(folder, tmp_path / "f.gguf", to="q8_0", name="tiny-bert")
    assert z.sha256 == f.sha256
    assert list(scratch.iterdir()) == [] and not (tmp_path / "escape.txt").exists()


def run(*args):
    return CliRunner().invoke(cli, list(args))


def test_import_converts_a_folder(folder, tmp_path):
    r = run("import", str(folder), "--name", "tiny-bert")
    assert r.exit_code == 0, r.output
    assert r.output.startswith("converted tiny-bert:f16 (")
    r = run("import", str(folder), "--name", "tiny-bert", "--to", "q8_0")
    assert r.exit_code == 0, r.output
    store = ModelStore()
    m = store.resolve("tiny-bert:q8_0")
    assert m.facts["architecture"] == "bert" and m.facts["quant"] == "Q8_0"
    assert m.sha256 == sha256(m.path) and m.options == {"convert": "q8_0"}
    assert store.resolve("tiny-bert:f16").facts["quant"] == "F16"


def test_import_refuses_an_unknown_architecture_in_one_line(folder, tmp_path):
    odd = _copy(folder, tmp_path / "t5")
    (odd / "config.json").write_text(json.dumps({"architectures": ["T5EncoderModel"], "model_type": "t5"}))
    r = run("import", str(odd), "--name", "t5")
    assert r.exit_code == 1
    assert r.output.count("\n") == 1 and "'T5EncoderModel' is not one the converter knows" in r.output
    assert ModelStore().list() == []


def _user_entry(tag: str, archive: Path, out_sha: str, out_size: int) -> None:
    d = catalog.user_catalog_dir()
    d.mkdir(parents=True, exist_ok=True)
    (d / f"tiny-bert-{tag}.toml").write_text(f'''
name = "tiny-bert"
tag = "{tag}"
embedding = true
file = "tiny-bert.{tag}.gguf"
size = {out_size}
sha256 = "{out_sha}"

[convert]
type = "f16"
name = "tiny-bert"
size = {archive.stat().st_size}
sha256 = "{sha256(archive)}"

[[sources]]
kind = "file"
path = "{archive}"
''')


def test_pull_converts_a_catalog_entry_and_checks_the_pin(folder, tmp_path):
    archive = _zip(folder, tmp_path / "tiny.zip")
    want = convert_zip(archive, tmp_path / "want.gguf", to="f16", name="tiny-bert", scratch=tmp_path)
    _user_entry("f16", archive, want.sha256, want.size)
    _user_entry("pinned-wrong", archive, "0" * 64, want.size)
    store = ModelStore()
    r = pull("tiny-bert:f16", store=store, quiet=True)
    assert r.manifest.sha256 == want.sha256 == sha256(r.manifest.path)
    with pytest.raises(AllSourcesFailedError) as e:
        pull("tiny-bert:pinned-wrong", store=store, quiet=True)
    assert isinstance(e.value.errors[0], ChecksumError)
    assert f"gave {want.size:,} bytes, sha256 {want.sha256}" in str(e.value.errors[0])
    assert store.get("tiny-bert:pinned-wrong") is None
    assert sorted(p.name for p in store.blobs.iterdir()) == [f"sha256-{want.sha256}"]  # no partial left
    assert list(store.scratch.iterdir()) == []


def test_the_catalog_embedding_model_is_never_a_chat_default(monkeypatch):
    entries = catalog.load_catalog()
    mini = [e for e in entries.values() if e.name == "all-minilm-l6-v2"]
    assert sorted(e.tag for e in mini) == ["f16", "q8_0"]
    assert all(e.embedding and e.convert and e.convert.type == e.tag for e in mini)
    assert catalog.default_entry(entries).ref == "smollm2-135m-instruct:q4_1"
    # However much memory and speed: only chat models are candidates.
    choice = model_choice.choose(available=10**13, bandwidth=10**13)
    assert not choice.entry.embedding
    assert all(not entries[ref].embedding for ref, _ in choice.passed_over)
    monkeypatch.setenv(model_choice.ENV, "all-minilm-l6-v2")
    with pytest.raises(CatalogError, match="is an embedding model"):
        model_choice.choose()
