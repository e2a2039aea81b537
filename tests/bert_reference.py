"""A BERT sentence embedding computed in numpy, from the Hugging Face folder
itself: the reference the converted GGUF's embeddings are checked against.

Nothing here comes from edgeinfer.convert or llama.cpp: the safetensors
file is read by its own few lines, and the WordPiece tokenizer follows
BERT's (HF's BasicTokenizer + WordpieceTokenizer): clean the text, split
on whitespace and punctuation, lowercase and strip accents when the
tokenizer says so, then take the longest piece of the vocabulary at each
place, ``##`` marking a continuation, ``[UNK]`` for a word that does not
split. The forward pass is the textbook one: word + position + token type
0 embeddings, LayerNorm, then per layer self-attention over all tokens
(no mask: one sentence, no padding), residual + LayerNorm, a GELU (erf)
feed-forward, residual + LayerNorm; mean pooling over every token,
[CLS] and [SEP] included, as sentence-transformers does; L2 normalised.
"""

from __future__ import annotations

import json
import math
import unicodedata
from pathlib import Path

import numpy as np


def load_weights(path: Path) -> dict[str, np.ndarray]:
    raw = Path(path).read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    body = raw[8 + n:]
    kinds = {"F32": "<f4", "F16": "<f2"}
    out = {}
    for name, t in header.items():
        if name == "__metadata__" or t["dtype"] not in kinds:
            continue
        a, b = t["data_offsets"]
        arr = np.frombuffer(body[a:b], dtype=kinds[t["dtype"]]).reshape(t["shape"])
        out[name.removeprefix("bert.")] = arr.astype(np.float64)
    return out


def _is_punct(ch: str) -> bool:
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


class WordPiece:
    """BERT's tokenizer, for the ids the reference feeds its forward pass."""

    def __init__(self, folder: Path):
        tok = json.loads((Path(folder) / "tokenizer.json").read_text(encoding="utf-8"))
        self.vocab: dict[str, int] = tok["model"]["vocab"]
        self.unk = tok["model"].get("unk_token", "[UNK]")
        norm = tok.get("normalizer") or {}
        self.lowercase = bool(norm.get("lowercase", True))
        self.strip_accents = self.lowercase if norm.get("strip_accents") is None else bool(norm["strip_accents"])
        self.cls, self.sep = self.vocab["[CLS]"], self.vocab["[SEP]"]

    def _words(self, text: str) -> list[str]:
        clean = []
        for ch in text:
            cp = ord(ch)
            if cp == 0 or cp == 0xFFFD or (unicodedata.category(ch).startswith("C") and ch not in "\t\n\r"):
                continue
            if 0x4E00 <= cp <= 0x9FFF:  # each CJK ideograph is a word (enough for these tests)
                clean.append(f" {ch} ")
            else:
                clean.append(" " if ch.isspace() else ch)
        words = []
        for w in "".join(clean).split():
            if self.lowercase:
                w = w.lower()
            if self.strip_accents:
                w = "".join(c for c in unicodedata.normalize("NFD", w) if unicodedata.category(c) != "Mn")
            cur = ""
            for ch in w:
                if _is_punct(ch):
                    if cur:
                        words.append(cur)
                    words.append(ch)
                    cur = ""
                else:
                    cur += ch
            if cur:
                words.append(cur)
        return words

    def encode(self, text: str) -> list[int]:
        ids = [self.cls]
        for word in self._words(text):
            pieces, start = [], 0
            while start < len(word):
                end = len(word)
                while end > start:
                    piece = ("##" if start else "") + word[start:end]
                    if piece in self.vocab:
                        break
                    end -= 1
                if end == start:
                    pieces = [self.vocab[self.unk]]
                    break
                pieces.append(self.vocab[piece])
                start = end
            ids += pieces if len(word) <= 100 else [self.vocab[self.unk]]
        return ids + [self.sep]


def _layer_norm(x, g, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * g + b


_erf = np.vectorize(math.erf)


def _gelu(x):
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


class Bert:
    """The reference model: ``embed(text)`` -> unit vector (float64)."""

    def __init__(self, folder: Path):
        folder = Path(folder)
        self.cfg = json.loads((folder / "config.json").read_text())
        self.w = load_weights(folder / "model.safetensors")
        self.tokenizer = WordPiece(folder)

    def hidden(self, ids: list[int]) -> np.ndarray:
        w, c = self.w, self.cfg
        eps, heads = c["layer_norm_eps"], c["num_attention_heads"]
        x = (w["embeddings.word_embeddings.weight"][ids]
             + w["embeddings.position_embeddings.weight"][: len(ids)]
             + w["embeddings.token_type_embeddings.weight"][0])
        x = _layer_norm(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"], eps)
        n, d = x.shape
        hd = d // heads
        for i in range(c["num_hidden_layers"]):
            p = f"encoder.layer.{i}."

            def lin(name, h):
                return h @ w[p + name + ".weight"].T + w[p + name + ".bias"]

            q, k, v = (lin(f"attention.self.{s}", x).reshape(n, heads, hd).transpose(1, 0, 2)
                       for s in ("query", "key", "value"))
            scores = q @ k.transpose(0, 2, 1) / math.sqrt(hd)
            scores = np.exp(scores - scores.max(-1, keepdims=True))
            att = (scores / scores.sum(-1, keepdims=True)) @ v
            att = att.transpose(1, 0, 2).reshape(n, d)
            x = _layer_norm(x + lin("attention.output.dense", att),
                            w[p + "attention.output.LayerNorm.weight"], w[p + "attention.output.LayerNorm.bias"], eps)
            ff = lin("output.dense", _gelu(lin("intermediate.dense", x)))
            x = _layer_norm(x + ff, w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"], eps)
        return x

    def embed(self, text: str) -> np.ndarray:
        v = self.hidden(self.tokenizer.encode(text)).mean(0)
        return v / np.linalg.norm(v)


def cosine(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
