"""Every sampling option, through llama.cpp's real sampler chain on the tiny
model, from the API, from /set in the REPL and from a catalog entry."""

from __future__ import annotations

import io

import pytest

import edgeinfer
from edgeinfer import sampling
from edgeinfer.catalog import load_catalog
from edgeinfer.chat import ChatSession
from edgeinfer.cli.chat import Repl
from edgeinfer.engine import Engine
from edgeinfer.errors import CatalogError


@pytest.fixture(scope="module")
def engine(tiny_model):
    with Engine(tiny_model, threads=1, prompt_cache=False) as e:
        yield e


def tokens(engine, n=40, **opts) -> list[int]:
    return [t for ev in engine.stream("Once upon a time", max_tokens=n, **opts) for t in ev.tokens]


def most_repeats(toks: list[int], window: int = 16) -> int:
    """The most repeated tokens inside any window of ``window`` tokens."""
    return max(len(toks[i:i + window]) - len(set(toks[i:i + window]))
               for i in range(max(1, len(toks) - window + 1)))


def longest_repeat(toks: list[int]) -> int:
    """The length of the longest span that occurs twice."""
    best = 0
    for n in range(1, len(toks)):
        seen = {tuple(toks[i:i + n]) for i in range(len(toks) - n + 1)}
        if len(seen) == len(toks) - n + 1:
            break
        best = n
    return best


def test_the_tiny_model_loops_when_greedy(engine):
    # what the penalties below must break
    assert most_repeats(tokens(engine, temperature=0)) >= 8


@pytest.mark.parametrize("opts", [dict(repeat_penalty=1e6), dict(frequency_penalty=1e4),
                                  dict(presence_penalty=1e4)], ids=lambda o: next(iter(o)))
def test_penalties_stop_repeats_within_their_window(engine, opts):
    toks = tokens(engine, temperature=0, repeat_last_n=16, **opts)
    assert len(toks) == 40 and most_repeats(toks, 16) == 0


def test_repeat_last_n_zero_turns_the_penalties_off(engine):
    assert tokens(engine, temperature=0, repeat_penalty=1e6, repeat_last_n=0) == tokens(engine, temperature=0)


def test_dry_shortens_repeated_spans(engine):
    plain = tokens(engine, temperature=0)
    dry = tokens(engine, temperature=0, dry_multiplier=100.0, dry_allowed_length=1)
    assert longest_repeat(dry) < longest_repeat(plain)
    assert tokens(engine, temperature=0, dry_multiplier=0.0) == plain  # 0 is off


@pytest.mark.parametrize("opts", [dict(top_k=1), dict(top_p=1e-6), dict(min_p=0.99999)],
                         ids=lambda o: next(iter(o)))
def test_truncation_to_one_candidate_is_greedy(engine, opts):
    assert tokens(engine, temperature=1.0, seed=3, **opts) == tokens(engine, temperature=0)


def test_temperature_and_seed(engine):
    a = tokens(engine, temperature=1.5, seed=3)
    assert a == tokens(engine, temperature=1.5, seed=3)
    assert a != tokens(engine, temperature=1.5, seed=4)
    assert a != tokens(engine, temperature=0)


def test_bad_options_are_refused_before_generating(engine):
    with pytest.raises(TypeError, match="unknown sampling option"):
        list(engine.stream("x", top_q=3))
    with pytest.raises(ValueError, match="top_k must be an integer"):
        list(engine.stream("x", top_k=2.5))


SET_VALUES = {"temperature": "0.7", "top_k": "20", "top_p": "0.9", "min_p": "0.1", "repeat_penalty": "1.1",
              "repeat_last_n": "32", "frequency_penalty": "0.2", "presence_penalty": "0.3",
              "dry_multiplier": "0.8", "dry_base": "1.75", "dry_allowed_length": "3", "dry_last_n": "128",
              "infill": "0"}   # on, it may end the random tiny model at once: see test_infill.py


def test_every_option_is_settable_in_the_repl_and_then_used(engine):
    assert set(SET_VALUES) == set(sampling.OPTIONS)
    lines = [f"/set {k} {v}" for k, v in SET_VALUES.items()] + ["/set max_tokens 3", "hello", "/exit"]
    session = ChatSession(engine)
    out = io.StringIO()
    feed = iter(lines)
    Repl(session, lambda _p: next(feed), out, interactive=True).run()
    for k, v in SET_VALUES.items():
        assert f"{k} = {sampling.OPTIONS[k][0](v)}" in out.getvalue()
    assert session.last_stats is not None and session.last_stats.generated_tokens >= 1
    assert "Error" not in out.getvalue() and "Traceback" not in out.getvalue()


def test_every_option_works_from_a_catalog_entry(tiny_model, edgeinfer_home, tmp_path):
    from edgeinfer import paths

    user = paths.config_dir() / "models"
    user.mkdir(parents=True)
    values = "\n".join(f"{k} = {v}" for k, v in SET_VALUES.items())
    (user / "tiny.toml").write_text(f'''
name = "tiny-sampled"
tag = "f32"
description = "the tiny test model"
file = "tiny.gguf"
size = {tiny_model.stat().st_size}
sha256 = "{'0' * 64}"
license = "MIT"

[[sources]]
kind = "file"
path = "{tiny_model}"

[sampling]
{values}
''')
    entry = load_catalog()["tiny-sampled:f32"]
    assert entry.sampling == {k: sampling.OPTIONS[k][0](v) for k, v in SET_VALUES.items()}
    with edgeinfer.load(tiny_model, sampling=entry.sampling, threads=1, prompt_cache=False) as e:
        assert e.sampling["repeat_penalty"] == 1.1 and e.sampling["dry_multiplier"] == 0.8
        e.generate("Hello", max_tokens=4, seed=1)
        assert e.last_stats.generated_tokens > 0
    (user / "bad.toml").write_text((user / "tiny.toml").read_text().replace("tiny-sampled", "bad")
                                   .replace("top_k = 20", "top_k = 2.5"))
    with pytest.raises(CatalogError, match="top_k must be an integer"):
        load_catalog()


# -- a stream stuck in a loop ends as "repetition" --------------------------------------

def test_repeating_finds_loops_and_leaves_ordinary_text_alone():
    from edgeinfer.sampling import repeating

    assert repeating([5] * 33) == 1 and repeating([5] * 32) == 0
    phrase = list(range(100, 108))
    assert repeating([1, 2, 3] + phrase * 5) == 8 and repeating(phrase * 4) == 0
    assert repeating(list(range(1000))) == 0
    counting = [t for i in range(40) for t in (7, 1000 + i, 9)]  # "1. x\n2. y\n": the number differs
    assert repeating(counting) == 0


def test_a_looping_stream_ends_with_finish_reason_repetition(tiny_model):
    with Engine(tiny_model, threads=1, prompt_cache=False) as e:
        done = list(e.stream("Once upon a time", max_tokens=400, temperature=0))[-1]
        assert done.stats.finish_reason == "repetition" and done.stats.generated_tokens < 300
    with Engine(tiny_model, threads=1, prompt_cache=False, stop_on_repeat=False) as e:
        done = list(e.stream("Once upon a time", max_tokens=400, temperature=0))[-1]
        assert done.stats.finish_reason == "length" and done.stats.generated_tokens == 400


# -- the penalties, outside the chain ------------------------------------------------

def native_penalties(logits, history, last_n, repeat, frequency, presence):
    """llama.cpp's own penalties sampler over ``history`` applied to ``logits``."""
    import ctypes

    import llama_cpp as lc
    import numpy as np

    from edgeinfer.llama import TOKEN_DATA

    buf = np.zeros(len(logits), dtype=TOKEN_DATA)
    buf["id"] = np.arange(len(logits), dtype=np.int32)
    buf["logit"] = logits
    arr = lc.llama_token_data_array(buf.ctypes.data_as(ctypes.POINTER(lc.llama_token_data)), len(buf), -1, False)
    smpl = lc.llama_sampler_init_penalties(len(logits), last_n, repeat, frequency, presence)
    try:
        for t in history:
            lc.llama_sampler_accept(smpl, t)
        lc.llama_sampler_apply(smpl, ctypes.byref(arr))
    finally:
        lc.llama_sampler_free(smpl)
    out = np.empty(len(logits), dtype=np.float32)
    out[buf["id"]] = buf["logit"]
    return out


@pytest.mark.parametrize("repeat,frequency,presence", [(1.1, 0.0, 0.0), (1.3, 0.2, 0.0), (0.9, 0.0, 0.6),
                                                       (1.0, 1.5, -0.5), (1.1, 0.25, 0.3), (0.0, 0.0, 0.0)])
def test_penalties_equal_llama_cpps_sampler_bit_for_bit(repeat, frequency, presence):
    """The engine applies the penalties to the logits itself, touching only
    the tokens of the window, where llama.cpp's sampler looks up all of a
    vocabulary's candidates: the same numbers must come out."""
    import numpy as np

    rng = np.random.default_rng(7)
    n_vocab, last_n = 5000, 64
    history = [int(t) for t in rng.integers(0, 300, 500)]   # repeats, and more than the window
    for step in (1, 10, 64, 65, 200, 500):
        logits = (rng.standard_normal(n_vocab) * 8).astype(np.float32)
        logits[history[step - 1]] = 0.0                          # the <= 0 edge
        ours = logits.copy()
        p = sampling.Penalties(last_n, repeat, frequency, presence)
        for t in history[:step]:
            p.accept(t)
        p.apply(ours)
        theirs = native_penalties(logits, history[:step], last_n, repeat, frequency, presence)
        assert np.array_equal(ours, theirs), (step, np.abs(ours - theirs).max())


def test_penalised_generation_is_unchanged(engine):
    """The same tokens as with llama.cpp's penalties sampler in the chain
    (recorded before the penalties moved out of it, on the tiny model)."""
    for opts in (dict(repeat_penalty=1.3), dict(repeat_penalty=1.1, frequency_penalty=0.4, presence_penalty=0.2),
                 dict(repeat_penalty=1.2, repeat_last_n=8)):
        assert tokens(engine, n=60, temperature=0, **opts) == PENALISED[tuple(sorted(opts.items()))]


# Recorded with llama.cpp's penalties sampler in the chain (greedy, 60 tokens).
PENALISED = {
    (('repeat_penalty', 1.3),):
        [286, 303, 29, 286, 84, 286, 50, 89, 634, 620, 168, 176, 230, 495, 286, 131, 286, 54, 124,
         54, 406, 297, 325, 168, 516, 477, 93, 524, 286, 402, 361, 286, 168, 286, 168, 286, 168,
         286, 168, 286, 168, 286, 168, 286, 168, 286, 36, 177, 333, 509, 69, 268, 238, 54, 39, 297,
         377, 286, 168, 286],
    (('frequency_penalty', 0.4), ('presence_penalty', 0.2), ('repeat_penalty', 1.1)):
        [286, 303, 29, 387, 443, 176, 230, 634, 89, 84, 168, 130, 516, 64, 54, 93, 118, 331, 489,
         246, 325, 197, 515, 524, 278, 464, 183, 429, 388, 600, 131, 311, 194, 279, 447, 158, 470,
         6, 238, 479, 551, 342, 444, 150, 34, 389, 69, 477, 88, 509, 442, 190, 36, 217, 544, 16,
         488, 132, 124, 535],
    (('repeat_last_n', 8), ('repeat_penalty', 1.2)):
        [286, 303, 286, 84, 286, 520, 168, 176, 230, 634, 303, 286, 93, 89, 286, 168, 286, 131, 54,
         124, 54, 93, 524, 286, 168, 361, 286, 303, 600, 54, 93, 524, 286, 168, 361, 286, 303, 361,
         54, 93, 377, 297, 634, 361, 524, 286, 303, 361, 93, 377, 54, 333, 297, 634, 361, 524, 286,
         93, 377, 54],
}


@pytest.mark.parametrize("opts", [dict(), dict(repeat_penalty=1.2), dict(ignore_eos=True, n=120)],
                         ids=["plain", "penalties", "ignore_eos"])
def test_greedy_takes_the_same_tokens_without_the_chain(engine, monkeypatch, opts):
    """Greedy requests skip llama.cpp's chain and take numpy's argmax of
    the row (sampling.takes_largest); with ignore_eos the chain still
    draws where the largest logit is a banned token. The tokens must be
    the chain's."""
    from edgeinfer import scheduler

    fast = tokens(engine, temperature=0, **opts)
    monkeypatch.setattr(scheduler, "takes_largest", lambda *a, **k: False)
    assert tokens(engine, temperature=0, **opts) == fast


def test_greedy_with_banned_tokens_lets_the_chain_draw_where_one_is_largest(engine, monkeypatch):
    """ignore_eos bans the end-of-generation tokens. The tiny model never
    ranks its own first, so here the token it favours most (286) counts
    as one: argmax lands on it, the chain draws instead, and the tokens
    are the chain's all the way."""
    from edgeinfer import llama, scheduler

    vocab = engine.vocab
    monkeypatch.setattr(vocab, "eog_tokens", lambda: (286,))
    monkeypatch.setattr(vocab, "is_eog", lambda t: t == 286)
    draws = []
    sample = llama.Context.sample
    monkeypatch.setattr(llama.Context, "sample", lambda self, chain, row: draws.append(row) or sample(self, chain, row))
    fast = tokens(engine, n=60, temperature=0, ignore_eos=True)
    assert 0 < len(draws) < 60 and 286 not in fast
    monkeypatch.setattr(scheduler, "takes_largest", lambda *a, **k: False)
    assert tokens(engine, n=60, temperature=0, ignore_eos=True) == fast


def test_takes_largest_only_for_a_bare_greedy_chain():
    assert sampling.takes_largest(temperature=0)
    assert sampling.takes_largest(temperature=0, repeat_penalty=1.3, top_k=5)   # penalties are applied before
    assert not sampling.takes_largest(temperature=0.7)
    assert not sampling.takes_largest(temperature=0, dry_multiplier=0.8)
    assert not sampling.takes_largest({5: 2.0}, temperature=0)
