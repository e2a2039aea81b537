"""Speculative decoding with prompt-lookup drafts, on the tiny model.

The tiny model's greedy text soon falls into loops, and a loop is what
n-gram lookup drafts well, so drafts get accepted here without a real
model. What must hold: the answer with speculation is the answer without
it (greedy, and seeded sampling too, since each kept token is the one the
target drew), alone and beside other streams, with stop strings,
max_tokens, schemas and cancellation, and the KV cache holds no rejected
draft afterwards."""

from __future__ import annotations

import json
import threading

import pytest

import edgeinfer
from edgeinfer.engine import DoneEvent, Engine
from edgeinfer.speculative import PROBE_EVERY, PROBE_GROWTH, PROBE_MOST, Estimate, NgramIndex, SpecConfig, best_draft

GREEDY = dict(temperature=0)
PROMPTS = ["The weather was", "We walked to the market and", "def add(a, b):\n    return a + b\n\ndef",
           "one two three one two three one two"]


@pytest.fixture(scope="module")
def engine(tiny_model):
    with Engine(tiny_model, n_ctx=4096, threads=1, n_seq_max=4, stop_on_repeat=False,
                prompt_cache=False) as e:
        yield e


def collect(e: Engine, prompt, **kw) -> tuple[list[int], str, edgeinfer.Stats]:
    tokens = e.tokenize(prompt) if isinstance(prompt, str) else prompt
    events = list(e.stream_tokens(tokens, **kw))
    done = events[-1]
    assert isinstance(done, DoneEvent)
    return [t for ev in events for t in ev.tokens], "".join(ev.text for ev in events), done.stats


# -- the n-gram index -------------------------------------------------------
def test_a_draft_is_what_followed_the_last_occurrence():
    idx = NgramIndex([1, 2, 3, 4, 5, 9, 1, 2, 3], ngram=3, min_ngram=2)
    assert idx.draft(4) == [4, 5, 9, 1]
    idx.extend([7])                              # "2 3 7" and "3 7" were never seen
    assert idx.draft(4) == []
    idx.extend([1, 2])                           # "7 1 2" unseen, "1 2" seen last at 6..8
    assert idx.draft(3) == [3, 7, 1]
    assert idx.draft(6) == [3, 7, 1, 2, 3, 7]    # and round again: period 4
    assert NgramIndex([5, 6], 3, 2).draft(4) == []


def test_the_longest_suffix_wins_and_a_loop_is_drafted_round():
    idx = NgramIndex([8, 2, 3, 50, 1, 2, 3, 60, 1, 2, 3], ngram=3, min_ngram=1)
    assert idx.draft(2) == [60, 1]               # "1 2 3" last at 4..7, not "2 3" at 1..3
    idx = NgramIndex([1, 2, 1, 2], ngram=2, min_ngram=2)
    assert idx.draft(5) == [1, 2, 1, 2, 1]       # the continuation runs into the present: period 2
    assert NgramIndex([7, 7, 7], ngram=2, min_ngram=2).draft(3) == [7, 7, 7]


def test_auto_drafts_only_as_far_as_it_pays():
    flat = {w: 1.0 + 0.05 * (w - 1) for w in range(1, 10)}      # a wide step costs little
    steep = {w: 1.0 + 0.5 * (w - 1) for w in range(1, 10)}      # a wide step costs a lot
    assert best_draft(flat, 0.9, 8) == 8
    assert best_draft(steep, 0.9, 8) in (2, 3, 4)
    assert best_draft(steep, 0.2, 8) == 0                       # drafts are rarely kept: none
    assert best_draft(flat, 0.9, 3) == 3                        # never past what is available
    # beside other streams a draft is worth less: the step is wide already
    assert best_draft(steep, 0.7, 8, others=3) <= best_draft(steep, 0.7, 8)


def test_an_estimate_follows_what_is_kept():
    est = Estimate()
    for _ in range(10):
        est.record(4, 0)
    assert est.accept < 0.05
    assert est.wait == PROBE_MOST            # probes grew rare while nothing was kept
    for _ in range(10):
        est.record(4, 4)
    assert est.accept > 0.95
    assert est.wait == PROBE_EVERY
    est.record(2, 1, extra=1.2)              # kept less than the wider step cost
    assert est.wait == PROBE_GROWTH * PROBE_EVERY


# Step costs measured on a 2-core AMD EPYC for Qwen2.5-Coder 1.5B (docs/benchmarks.md): a step
# of w tokens costs nearly w one-token steps.
QWEN_2_CORES = {1: 1.0, 2: 1.87, 3: 2.51, 4: 3.12, 5: 3.72, 6: 4.55, 7: 5.38, 8: 6.21, 9: 7.05}


def test_auto_does_not_probe_where_no_draft_could_pay():
    """Four streams in a step of four rows: a two-token draft widens it to
    six, and even kept whole, six tokens in 4.55 one-token steps is slower
    than four in 3.12. Alone, the same draft could pay, so auto probes."""
    from edgeinfer.speculative import could_pay, next_draft

    assert not could_pay(QWEN_2_CORES, 2, 2, others=3)
    assert could_pay(QWEN_2_CORES, 2, 8, others=0)
    spec = SpecConfig()
    looping = [1, 2, 3] * 20                        # every suffix has a continuation to draft
    for n_decoding, probes in ((4, False), (1, True)):
        est, index = Estimate(), NgramIndex(looping, spec.ngram, spec.min_ngram)
        est.accept = 0.0                             # nothing kept so far: only a probe would draft
        drafts = [next_draft(spec, est, index, room=1000, left=1000, n_decoding=n_decoding, costs=QWEN_2_CORES)
                  for _ in range(2 * PROBE_EVERY)]
        assert any(drafts) == probes, n_decoding


def test_a_probe_beside_other_streams_pays_only_if_the_step_made_more_tokens_per_second():
    est = Estimate()
    extra = 4 * (QWEN_2_CORES[6] / QWEN_2_CORES[4] - 1)    # what the scheduler passes: 1.83 tokens
    est.record(2, 1, extra=extra)                   # one kept: the step was slower than a plain one
    assert est.wait == PROBE_GROWTH * PROBE_EVERY
    est.record(2, 2, extra=1.5)
    assert est.wait == PROBE_EVERY


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="speculative"):
        SpecConfig(mode="sometimes")
    with pytest.raises(ValueError):
        SpecConfig(max_draft=0)


# -- the same answers ----------------------------------------------------------
@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_answers_are_the_same_with_lookup(engine, prompt):
    plain = collect(engine, prompt, max_tokens=120, ignore_eos=True, speculative="off", **GREEDY)
    spec = collect(engine, prompt, max_tokens=120, ignore_eos=True, speculative="lookup", **GREEDY)
    assert spec[0] == plain[0] and spec[1] == plain[1]
    assert plain[2].drafted_tokens == 0
    assert spec[2].generated_tokens == 120 and spec[2].accepted_tokens <= spec[2].drafted_tokens


def test_drafts_are_accepted_on_a_looping_answer(engine):
    _, _, stats = collect(engine, PROMPTS[3], max_tokens=200, ignore_eos=True, speculative="lookup", **GREEDY)
    assert stats.accepted_tokens > 50 and 0 < stats.acceptance_rate <= 1
    assert engine.status()["accepted_tokens"] >= stats.accepted_tokens


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_seeded_sampling_is_the_same_with_lookup(engine, seed):
    # Each kept token is the one the target drew, with the one draw per
    # token it makes without speculation: the same seed, the same answer.
    opts = dict(max_tokens=120, ignore_eos=True, seed=seed, temperature=0.7, top_k=8)
    plain = collect(engine, PROMPTS[3], speculative="off", **opts)
    spec = collect(engine, PROMPTS[3], speculative="lookup", **opts)
    assert spec[0] == plain[0]


def test_auto_keeps_the_answer_too(engine):
    for prompt in PROMPTS:
        a = collect(engine, prompt, max_tokens=100, ignore_eos=True, speculative="off", **GREEDY)[0]
        b = collect(engine, prompt, max_tokens=100, ignore_eos=True, speculative="auto", **GREEDY)[0]
        assert a == b


def test_speculating_streams_share_steps_with_plain_ones(engine):
    alone = {p: collect(engine, p, max_tokens=80, ignore_eos=True, speculative="off", **GREEDY)[0]
             for p in PROMPTS}
    out: dict = {}
    barrier = threading.Barrier(len(PROMPTS))

    def work(i, p):
        barrier.wait()
        out[p] = collect(engine, p, max_tokens=80, ignore_eos=True,
                         speculative="lookup" if i % 2 else "off", **GREEDY)

    threads = [threading.Thread(target=work, args=(i, p)) for i, p in enumerate(PROMPTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert {p: out[p][0] for p in PROMPTS} == alone
    assert sum(out[p][2].drafted_tokens for p in PROMPTS) > 0
    assert engine.status()["max_sequences_in_step"] >= 2


# -- everything else keeps working ----------------------------------------------
def test_max_tokens_and_stop_strings(engine):
    for n in (1, 2, 7, 33):
        tokens, _, stats = collect(engine, PROMPTS[3], max_tokens=n, ignore_eos=True, speculative="lookup",
                                   **GREEDY)
        assert len(tokens) == stats.generated_tokens == n and stats.finish_reason == "length"
    full = collect(engine, PROMPTS[3], max_tokens=100, ignore_eos=True, speculative="off", **GREEDY)[1]
    stop = full[40:44]
    cut = collect(engine, PROMPTS[3], max_tokens=100, ignore_eos=True, speculative="lookup", stop=[stop],
                  **GREEDY)
    assert cut[1] == full[:full.index(stop)] and cut[2].stop_sequence == stop


def test_no_rejected_draft_is_left_in_the_kv_cache(tiny_model):
    """A follow-up that reuses the first answer's KV (the chat's next
    turn) says what a cold engine says: the cells of drafts the target
    turned down were removed."""
    with Engine(tiny_model, n_ctx=2048, threads=1, stop_on_repeat=False, prompt_cache=False) as cold:
        first = collect(cold, PROMPTS[3], max_tokens=60, ignore_eos=True, speculative="off", **GREEDY)[0]
        prompt2 = cold.tokenize(PROMPTS[3]) + first + cold.tokenize(" and then", add_bos=False)
        want = collect(cold, prompt2, max_tokens=60, ignore_eos=True, speculative="off", **GREEDY)[0]
    with Engine(tiny_model, n_ctx=2048, threads=1, stop_on_repeat=False) as e:
        got1, _, s1 = collect(e, PROMPTS[3], max_tokens=60, ignore_eos=True, speculative="lookup", **GREEDY)
        assert s1.drafted_tokens > s1.accepted_tokens   # some drafts were turned down
        got2, _, s2 = collect(e, prompt2, max_tokens=60, ignore_eos=True, speculative="lookup", **GREEDY)
        assert s2.cached_tokens > len(e.tokenize(PROMPTS[3]))   # it reused the first answer's KV
        assert e.kv_tokens(0)[:len(prompt2)] == prompt2 or e.kv_tokens()[:len(prompt2)] == prompt2
    assert got1 == first and got2 == want


def test_a_schema_still_holds(engine):
    schema = {"type": "object", "properties": {"a": {"type": "array", "items": {"enum": ["x", "y"]}}},
              "required": ["a"]}
    plain = collect(engine, PROMPTS[3], max_tokens=300, json_schema=schema, speculative="off", **GREEDY)
    spec = collect(engine, PROMPTS[3], max_tokens=300, json_schema=schema, speculative="lookup", **GREEDY)
    assert spec[1] == plain[1]
    if spec[2].finish_reason == "stop":
        assert isinstance(json.loads(spec[1])["a"], list)


def test_leaving_a_speculating_stream_early_leaves_the_engine_sound(engine):
    for i, ev in enumerate(engine.stream_tokens(engine.tokenize(PROMPTS[3]), max_tokens=500, ignore_eos=True,
                                                speculative="lookup", **GREEDY)):
        if i == 10:
            break
    assert engine.status()["active_sequences"] == 0
    a = collect(engine, PROMPTS[0], max_tokens=40, ignore_eos=True, speculative="lookup", **GREEDY)[0]
    b = collect(engine, PROMPTS[0], max_tokens=40, ignore_eos=True, speculative="off", **GREEDY)[0]
    assert a == b


def test_the_engine_default_and_the_request_option(tiny_model):
    with Engine(tiny_model, n_ctx=1024, threads=1, stop_on_repeat=False, prompt_cache=False,
                speculative="off") as e:
        assert collect(e, PROMPTS[3], max_tokens=80, ignore_eos=True, **GREEDY)[2].drafted_tokens == 0
        assert collect(e, PROMPTS[3], max_tokens=80, ignore_eos=True, speculative="lookup",
                       **GREEDY)[2].drafted_tokens > 0
    with pytest.raises(ValueError):
        Engine(tiny_model, speculative="always")


# -- a draft model ---------------------------------------------------------------
@pytest.fixture(scope="module")
def other_tiny(tmp_path_factory):
    """A second tiny model: the same vocabulary, other weights."""
    from conftest import load_script

    return load_script("build_tiny_model").build(tmp_path_factory.mktemp("tiny2") / "tiny-seed1.gguf", seed=1)


@pytest.mark.parametrize("which", ["itself", "another"])
def test_a_draft_model_keeps_the_answer(tiny_model, other_tiny, which):
    draft = tiny_model if which == "itself" else other_tiny
    with Engine(tiny_model, n_ctx=2048, threads=1, stop_on_repeat=False, prompt_cache=False,
                draft=draft) as e:
        assert e.speculative.mode == "draft" and e.draft is not None
        for prompt in PROMPTS[:3]:
            plain = collect(e, prompt, max_tokens=60, ignore_eos=True, speculative="off", **GREEDY)[0]
            tokens, _, stats = collect(e, prompt, max_tokens=60, ignore_eos=True, **GREEDY)
            assert tokens == plain
            assert stats.drafted_tokens > 0
            if which == "itself":   # a model drafting for itself is right every time
                assert stats.acceptance_rate > 0.9
        # with sampling too: the same seed, the same answer
        opts = dict(max_tokens=60, ignore_eos=True, seed=4, temperature=0.8)
        assert collect(e, PROMPTS[0], speculative="off", **opts)[0] == collect(e, PROMPTS[0], **opts)[0]


def test_a_draft_model_with_another_vocabulary_is_refused(tiny_model, other_tiny, monkeypatch):
    from edgeinfer import VocabularyMismatchError, llama

    real_load, real_bytes = llama.Model.__init__, llama.Vocab.token_bytes

    def load(self, path, params):   # mark the draft's vocabulary
        real_load(self, path, params)
        self.vocab.forged = self.path.name == other_tiny.name

    def forged(self, t, special=False):   # the draft's token 300 spells something else
        out = real_bytes(self, t, special)
        return b"<other>" if getattr(self, "forged", False) and t == 300 else out

    monkeypatch.setattr(llama.Model, "__init__", load)
    monkeypatch.setattr(llama.Vocab, "token_bytes", forged)
    with pytest.raises(VocabularyMismatchError, match="token 300"):
        Engine(tiny_model, n_ctx=512, threads=1, draft=other_tiny)
    with pytest.raises(ValueError, match="draft model"):
        Engine(tiny_model, n_ctx=512, threads=1, speculative="draft")


def test_step_times_take_over_from_the_measured_costs_where_known():
    from edgeinfer.speculative import StepTimes

    measured = {1: 1.0, 2: 1.1, 3: 1.2, 4: 1.3, 5: 1.4}
    times = StepTimes()
    assert times.blend(measured) == measured and times.blend(None) is None
    for _ in range(StepTimes.ENOUGH):
        times.record(4, 0.010)     # four streams, no drafts: 10 ms
        times.record(6, 0.016)     # four streams and two draft tokens: far dearer than measured
    times.record(1, 0.001)         # seen once: not trusted yet
    costs = times.blend(measured)
    assert costs[6] / costs[4] == pytest.approx(1.6)      # what the steps cost, not 1.5 / 1.3
    assert costs[5] / costs[4] == pytest.approx(1.3)      # between two seen widths: a straight line
    assert costs[2] / costs[4] == pytest.approx(1.1 / 1.3)   # beyond them: the measured shape
    assert set(costs) == set(range(1, 7))
