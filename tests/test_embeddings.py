"""Embeddings from a tiny BERT the tests build and convert: Engine.embed,
and /v1/embeddings and the JSON-lines embed op on a real server beside a
chat model, through the official openai client."""

from __future__ import annotations

import base64
import threading

import numpy as np
import openai
import pytest
from conftest import import_into
from served import start, start_http

import edgeinfer
from edgeinfer.errors import ContextOverflowError, RequestError

pytestmark = pytest.mark.timeout(240)

# Unit vectors agree to this wherever an input sits in a batch: a batch's
# size changes the order of llama.cpp's sums, and with it the last bits.
SAME = 2e-4

SENTENCES = ["the cat sat on the mat", "a dog ran in the park", "rain fell on the town",
             "the cat lay on the rug", "music played all night"]


@pytest.fixture(scope="module")
def engine(tiny_bert):
    e = edgeinfer.load(tiny_bert, threads=1)
    yield e
    e.close()


def test_vectors_are_unit_length_and_batching_changes_nothing(engine):
    v = engine.embed(SENTENCES)
    assert v.shape == (len(SENTENCES), engine.n_embd) and v.dtype == np.float32
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    one_by_one = np.stack([engine.embed(s)[0] for s in SENTENCES])
    assert np.abs(v - one_by_one).max() < SAME
    raw = engine.embed(SENTENCES, normalize=False)
    assert np.allclose(raw / np.linalg.norm(raw, axis=1, keepdims=True), v, atol=1e-5)
    # Many inputs spread over several batches (the context holds 64 tokens).
    many = engine.embed(SENTENCES * 30)
    assert np.abs(many - np.tile(v, (30, 1))).max() < SAME


def test_callers_on_several_threads_share_batches(engine):
    want = engine.embed(SENTENCES)
    got: dict[int, np.ndarray] = {}

    def call(i):
        got[i] = engine.embed(SENTENCES[i:] + SENTENCES[:i])

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(SENTENCES))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, v in got.items():
        assert np.abs(v - np.roll(want, -i, axis=0)).max() < SAME


def test_long_inputs_are_cut_or_refused(engine):
    long = " ".join(["the cat sat on the mat"] * 40)
    out = engine.embed_tokens([engine.tokenize(long, add_bos=True), engine.tokenize("the cat", add_bos=True)])
    assert out.truncated == [True, False] and out.n_tokens[0] == engine.n_ctx
    with pytest.raises(ContextOverflowError, match=r"input\[0\]"):
        engine.embed(long, truncate=False)
    with pytest.raises(RequestError, match="does not generate"):
        engine.generate("hello")


def test_the_context_never_passes_the_trained_positions(tiny_bert):
    """A server's --n-ctx meant for its chat model reaches the embedding
    model too: past its position table llama.cpp would abort."""
    with edgeinfer.load(tiny_bert, threads=1, n_ctx=4096) as e:
        assert e.n_ctx == 64
        assert e.embed(" ".join(["word"] * 300)).shape == (1, e.n_embd)


def test_a_chat_model_does_not_embed(tiny_model):
    with edgeinfer.load(tiny_model, threads=1, n_ctx=256) as chat:
        with pytest.raises(RequestError, match="does not embed"):
            chat.embed("hello")


@pytest.fixture(scope="module")
def home(tiny_bert, tiny_model, tmp_path_factory):
    return import_into(tmp_path_factory.mktemp("embed-home"), {"tiny-bert:f16": tiny_bert, "tiny-chat:f16": tiny_model})


def test_openai_embeddings_beside_a_chat_model(home, engine):
    want = engine.embed(SENTENCES)
    s = start_http(None, env={"EDGEINFER_HOME": str(home), "EDGEINFER_TOKEN": ""})
    try:
        client = s.openai()
        r = client.embeddings.create(model="tiny-bert", input=SENTENCES)   # the client asks for base64
        got = np.array([d.embedding for d in r.data])
        assert [d.index for d in r.data] == list(range(len(SENTENCES))) and r.model == "tiny-bert:f16"
        assert np.abs(got - want).max() < SAME and r.usage.prompt_tokens == r.usage.total_tokens > 0
        r = client.embeddings.create(model="tiny-bert", input="the cat sat on the mat", encoding_format="float")
        assert np.abs(np.array(r.data[0].embedding) - want[0]).max() < SAME
        # Token ids, as LangChain may send them.
        ids = engine.tokenize(SENTENCES[1], add_bos=True)
        r = client.embeddings.create(model="tiny-bert", input=[ids])
        assert np.abs(np.array(r.data[0].embedding) - want[1]).max() < SAME
        status, body = s.json("POST", "/v1/embeddings", {"model": "tiny-bert", "input": "hi",
                                                          "encoding_format": "base64"})
        raw = np.frombuffer(base64.b64decode(body["data"][0]["embedding"]), dtype="<f4")
        assert status == 200 and raw.shape == (engine.n_embd,)
        # The chat model still chats, and neither does the other's job.
        assert client.chat.completions.create(model="tiny-chat", max_tokens=3,
                                              messages=[{"role": "user", "content": "hi"}]).choices
        with pytest.raises(openai.BadRequestError, match="does not embed"):
            client.embeddings.create(model="tiny-chat", input="hi")
        with pytest.raises(openai.BadRequestError, match="does not generate"):
            client.chat.completions.create(model="tiny-bert", messages=[{"role": "user", "content": "hi"}])
        with pytest.raises(openai.BadRequestError, match="dimensions"):
            client.embeddings.create(model="tiny-bert", input="hi", dimensions=8)
        with pytest.raises(openai.BadRequestError, match="input"):
            client.embeddings.create(model="tiny-bert", input=[])
    finally:
        assert s.stop() == 0


def test_json_lines_embed(home, engine):
    want = engine.embed(SENTENCES[:2])
    s = start(None, env={"EDGEINFER_HOME": str(home)})
    try:
        raw = s.raw()
        raw.send({"id": 1, "op": "embed", "model": "tiny-bert", "input": SENTENCES[:2]})
        reply = raw.reply()
        assert reply["event"] == "result" and reply["model"] == "tiny-bert:f16", reply
        assert np.abs(np.array(reply["embeddings"]) - want).max() < SAME
        assert reply["truncated"] == [False, False] and all(n > 2 for n in reply["n_tokens"])
        raw.send({"id": 2, "op": "embed", "model": "tiny-bert", "input": "x", "dimensions": 3})
        reply = raw.reply()
        assert reply["event"] == "error" and "dimensions" in reply["message"]
        raw.close()
    finally:
        assert s.stop() == 0
