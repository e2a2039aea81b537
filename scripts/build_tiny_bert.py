"""Build a tiny BERT folder, as sentence-transformers saves one, for the
converter's fast tests.

The weights are random, but the folder is laid out like the real
all-MiniLM-L6-v2: ``config.json`` (BertModel), ``tokenizer.json`` with a
small WordPiece vocabulary (special tokens, punctuation, letters, ``##``
continuations, words of the text below), ``model.safetensors`` in F32 (with
the pooler and the position-id buffer a real checkpoint carries, which the
converter must skip), ``modules.json`` and ``1_Pooling/config.json`` asking
for mean pooling. Widths are multiples of 32 so Q8_0 applies to every
matrix. The same seed gives byte-identical files.

    python scripts/build_tiny_bert.py DIR [--seed N]

Tests import ``build(folder, seed=...)`` directly.
"""

from __future__ import annotations

import argparse
import collections
import json
import pathlib
import re
import string

import numpy as np

N_EMBD = 64
N_HEAD = 4
N_FF = 128
N_LAYER = 2
N_CTX = 64
VOCAB_SIZE = 320   # a few ids past the last piece stay unassigned, as in some real vocabularies
SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
SUFFIXES = ("s", "ing", "ed", "er", "ly", "es", "tion")

# Words for the vocabulary; written for this project.
TEXT = """\
a small computer can find notes that mean the same thing as a question when
every sentence becomes a list of numbers and similar sentences point the
same way the runtime reads each word splits it into pieces looks up every
piece and mixes them through a few layers of attention before it averages
them into one vector the cat sat on the warm mat while the dog slept near
the door people search their documents for recipes travel plans and old
letters from friends
"""


def vocabulary() -> list[str]:
    """The pieces, in id order."""
    words = collections.Counter(TEXT.split())
    pieces = list(SPECIALS)
    pieces += list(string.punctuation) + list(string.digits) + list(string.ascii_lowercase)
    pieces += ["##" + c for c in string.ascii_lowercase] + ["##" + s for s in SUFFIXES]
    for w, _ in sorted(words.items(), key=lambda kv: (-kv[1], kv[0])):
        if w not in pieces:
            pieces.append(w)
    assert len(pieces) <= VOCAB_SIZE - 4, len(pieces)
    return pieces


def tokenizer_json(pieces: list[str]) -> dict:
    """A tokenizer.json in the shape HF's BertTokenizerFast writes."""
    ids = {p: i for i, p in enumerate(pieces)}
    cls, sep = ids["[CLS]"], ids["[SEP]"]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [{"id": ids[s], "content": s, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for s in SPECIALS],
        "normalizer": {"type": "BertNormalizer", "clean_text": True, "handle_chinese_chars": True,
                       "strip_accents": None, "lowercase": True},
        "pre_tokenizer": {"type": "BertPreTokenizer"},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                       {"SpecialToken": {"id": "[SEP]", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": "[SEP]", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}},
                     {"SpecialToken": {"id": "[SEP]", "type_id": 1}}],
            "special_tokens": {"[CLS]": {"id": "[CLS]", "ids": [cls], "tokens": ["[CLS]"]},
                               "[SEP]": {"id": "[SEP]", "ids": [sep], "tokens": ["[SEP]"]}},
        },
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": True},
        "model": {"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##",
                  "max_input_chars_per_word": 100, "vocab": ids},
    }


def config() -> dict:
    return {
        "architectures": ["BertModel"], "model_type": "bert", "hidden_act": "gelu",
        "hidden_size": N_EMBD, "num_attention_heads": N_HEAD, "num_hidden_layers": N_LAYER,
        "intermediate_size": N_FF, "max_position_embeddings": N_CTX, "vocab_size": VOCAB_SIZE,
        "type_vocab_size": 2, "layer_norm_eps": 1e-12, "position_embedding_type": "absolute",
        "pad_token_id": 0,
    }


def weights(seed: int) -> dict[str, np.ndarray]:
    """Random weights under BERT's checkpoint names. Matrices are scaled so
    attention is neither uniform nor one-hot and the residual stream keeps
    every layer's contribution visible."""
    rng = np.random.default_rng(seed)

    def mat(rows: int, cols: int, scale: float = 1.0) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) * scale / np.sqrt(cols)).astype(np.float32)

    def vec(n: int, scale: float = 0.05, base: float = 0.0) -> np.ndarray:
        return (base + rng.standard_normal(n) * scale).astype(np.float32)

    w = {
        "embeddings.word_embeddings.weight": mat(VOCAB_SIZE, N_EMBD, np.sqrt(N_EMBD)),
        "embeddings.position_embeddings.weight": mat(N_CTX, N_EMBD, 0.5 * np.sqrt(N_EMBD)),
        "embeddings.token_type_embeddings.weight": mat(2, N_EMBD, 0.2 * np.sqrt(N_EMBD)),
        "embeddings.LayerNorm.weight": vec(N_EMBD, 0.1, 1.0),
        "embeddings.LayerNorm.bias": vec(N_EMBD),
        "embeddings.position_ids": np.arange(N_CTX, dtype=np.int64)[None, :],
        "pooler.dense.weight": mat(N_EMBD, N_EMBD),
        "pooler.dense.bias": vec(N_EMBD),
    }
    for i in range(N_LAYER):
        p = f"encoder.layer.{i}."
        for part in ("query", "key", "value"):
            w[p + f"attention.self.{part}.weight"] = mat(N_EMBD, N_EMBD, 2.0 if part != "value" else 1.0)
            w[p + f"attention.self.{part}.bias"] = vec(N_EMBD)
        w[p + "attention.output.dense.weight"] = mat(N_EMBD, N_EMBD)
        w[p + "attention.output.dense.bias"] = vec(N_EMBD)
        w[p + "attention.output.LayerNorm.weight"] = vec(N_EMBD, 0.1, 1.0)
        w[p + "attention.output.LayerNorm.bias"] = vec(N_EMBD)
        w[p + "intermediate.dense.weight"] = mat(N_FF, N_EMBD)
        w[p + "intermediate.dense.bias"] = vec(N_FF)
        w[p + "output.dense.weight"] = mat(N_EMBD, N_FF)
        w[p + "output.dense.bias"] = vec(N_EMBD)
        w[p + "output.LayerNorm.weight"] = vec(N_EMBD, 0.1, 1.0)
        w[p + "output.LayerNorm.bias"] = vec(N_EMBD)
    return w


def write_safetensors(path: pathlib.Path, tensors: dict[str, np.ndarray]) -> None:
    """The safetensors layout: u64 header length, JSON header (padded with
    spaces to 8 bytes, as the reference writer does), data."""
    dtypes = {np.dtype(np.float32): "F32", np.dtype(np.int64): "I64"}
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name in sorted(tensors):
        a = tensors[name]
        header[name] = {"dtype": dtypes[a.dtype], "shape": list(a.shape),
                        "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name in sorted(tensors):
            f.write(np.ascontiguousarray(tensors[name]).astype(tensors[name].dtype.newbyteorder("<")).tobytes())


def build(folder: str | pathlib.Path, *, seed: int = 0) -> pathlib.Path:
    """Write the tiny BERT folder; returns it."""
    folder = pathlib.Path(folder)
    (folder / "1_Pooling").mkdir(parents=True, exist_ok=True)

    def dump(name: str, data) -> None:
        (folder / name).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    pieces = vocabulary()
    dump("config.json", config())
    dump("tokenizer.json", tokenizer_json(pieces))
    dump("tokenizer_config.json", {"do_lower_case": True, "unk_token": "[UNK]", "sep_token": "[SEP]",
                                   "pad_token": "[PAD]", "cls_token": "[CLS]", "mask_token": "[MASK]",
                                   "tokenizer_class": "BertTokenizer", "model_max_length": N_CTX})
    dump("modules.json", [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ])
    dump("1_Pooling/config.json", {"word_embedding_dimension": N_EMBD, "pooling_mode_cls_token": False,
                                   "pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": False,
                                   "pooling_mode_mean_sqrt_len_tokens": False})
    write_safetensors(folder / "model.safetensors", weights(seed))
    return folder


def sentences() -> list[str]:
    """Test sentences made of the vocabulary's words and pieces (several
    split into ``##`` pieces, one with a word the vocabulary lacks)."""
    lines = [ln.strip() for ln in re.split(r"(?<=[a-z])\n", TEXT) if ln.strip()]
    return [
        "The cat sat on the warm mat.",
        "Every sentence becomes a list of numbers!",
        "People search their documents for recipes, travel plans and old letters.",
        "Reading, mixing and averaging pieces: attention layers.",
        "A dog slept near the door (2026).",
        "Zxqv qwerty",
    ] + lines[:2]


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(build(args.folder, seed=args.seed))
