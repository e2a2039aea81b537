"""A model file llama.cpp cannot load is refused at the door, with
llama.cpp's own reason, and leaves nothing in the store."""

from __future__ import annotations

import pytest

import edgeinfer
from edgeinfer.engine import Engine
from edgeinfer.errors import EngineError, GGUFError


@pytest.fixture(scope="module")
def damaged(tiny_model, tmp_path_factory):
    """The tiny model with one tensor's name changed by a byte: the header
    is sound, the model is not."""
    data = bytearray(tiny_model.read_bytes())
    at = data.find(b"blk.0.attn_q.weight")
    assert at > 0
    data[at + 17] = ord("X")
    path = tmp_path_factory.mktemp("damaged") / "damaged.gguf"
    path.write_bytes(bytes(data))
    return path


def test_import_refuses_it_with_the_reason_and_stores_nothing(damaged):
    with pytest.raises(GGUFError, match="tensor 'blk.0.attn_q.weight' not found"):
        edgeinfer.import_file(damaged, "broken:f16")
    store = edgeinfer.ModelStore()
    assert store.list() == [] and not any(store.root.joinpath("blobs").glob("*"))


def test_loading_it_says_why(damaged):
    with pytest.raises(EngineError, match="tensor 'blk.0.attn_q.weight' not found"):
        Engine(damaged, n_ctx=256, threads=1, prompt_cache=False)
