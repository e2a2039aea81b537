"""Speculative decoding on real models, pulled through the model manager:
SmolLM2 with prompt lookup, and the Qwen2.5-Coder pair (0.5B drafting for
1.5B) where the machine has room for them.

Token-for-token equality with the plain answer cannot be asked of these
models: llama.cpp rounds a step of several tokens differently from a step
of one, and SmolLM2 is sensitive enough that the shape alone changes the
answer. Measured on a 2-core AMD EPYC: the same greedy decode with
the prompt prefilled in one batch or one token at a time parts after 5
tokens, and a plain greedy answer of 120 tokens has 31 tokens that are not
the best in a reference pass over it, up to 2.9 logits below it. So each
speculative answer is held to what the plain answer achieves: no token
further than REFERENCE_NOISE below the reference's best, no more tokens
off the best than the plain answer has (with a little room), and the same
content. A wrong draft kept, a stale KV cell or a crossed sequence lands
far outside that."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import edgeinfer

# Plain and speculative greedy tokens were seen up to 2.9 and 4.3 logits
# below the reference's best (at digits SmolLM2 is unsure of); on the same
# answers the median runner-up is 7.4 below and a random token 27, so a
# token chosen from a corrupted state would seldom pass.
REFERENCE_NOISE = 6.0

pytestmark = [pytest.mark.real_model, pytest.mark.timeout(900)]

CODE = "\n".join(f"def scale_{i}(values, factor):\n    return [v * factor + {i} for v in values]\n"
                 for i in range(6))
EDIT = [{"role": "user", "content": "Rename `factor` to `k` in this code; reply with the code only.\n\n" + CODE}]
CHATS = [EDIT,
         [{"role": "user", "content": "What is the capital of France?"}],
         [{"role": "user", "content": "Write a short story about a robot who learns to paint."}],
         [{"role": "user", "content": "Summarise this code in two sentences, then repeat it:\n\n" + CODE}]]


def greedy(e, prompt, n, **opts):
    events = list(e.stream_tokens(prompt, max_tokens=n, temperature=0, **opts))
    return [t for ev in events for t in ev.tokens], events[-1].stats


def gaps(e, prompt, tokens) -> np.ndarray:
    """How far below the best each token is, in one reference pass."""
    logits = e.eval_logits(prompt + tokens[:-1])[len(prompt) - 1:]
    return np.array([float(row.max() - row[t]) for row, t in zip(logits, tokens)])


def assert_as_greedy_as_plain(e, prompt, plain, spec) -> None:
    p, s = gaps(e, prompt, plain), gaps(e, prompt, spec)
    worst = int(s.argmax())
    assert s[worst] <= REFERENCE_NOISE, f"token {worst} ({spec[worst]}) is {s[worst]:.2f} below the best"
    assert (s > 0).sum() <= (p > 0).sum() + max(3, 0.05 * len(spec)), (list(s.round(2)), list(p.round(2)))
    if len(spec) < len(plain):
        # A near-tie taken the other way can lead to an answer that ends
        # sooner; its end must then be a greedy choice too, not a stream cut short.
        row = e.eval_logits(prompt + spec)[-1]
        end = max(float(row[t]) for t in e.vocab.eog_tokens())
        assert row.max() - end <= REFERENCE_NOISE, (len(spec), len(plain), float(row.max() - end))


def test_lookup_gives_the_plain_answers(real_model_home):
    with edgeinfer.load("smollm2-135m-instruct", n_ctx=4096, threads=2, n_seq_max=2, prompt_cache=False) as e:
        for messages in CHATS:
            prompt = e.chat_tokens(messages)
            plain, _ = greedy(e, prompt, 120, speculative="off")
            spec, stats = greedy(e, prompt, 120, speculative="lookup")
            assert stats.drafted_tokens > 0
            assert_as_greedy_as_plain(e, prompt, plain, spec)

        # the editing answer, drafted while a plain stream shares its steps
        prompt = e.chat_tokens(EDIT)
        plain, _ = greedy(e, prompt, 120, speculative="off")
        other = e.chat_tokens(CHATS[2])
        beside = {}
        t = threading.Thread(target=lambda: beside.update(out=greedy(e, other, 120, speculative="off")))
        t.start()
        spec, stats = greedy(e, prompt, 120, speculative="lookup")
        t.join()
        assert beside["out"][1].generated_tokens > 0
        assert stats.accepted_tokens > 20
        assert_as_greedy_as_plain(e, prompt, plain, spec)
        assert "def scale_2(values, " in e.detokenize(spec)   # copied (SmolLM2 seldom renames)
        assert e.status()["max_sequences_in_step"] == 2
        answer = e.chat(CHATS[1], temperature=0, max_tokens=40, speculative="lookup")
        assert "Paris" in answer


def test_a_draft_model_from_the_same_family(qwen_store, real_model_home):
    with edgeinfer.load("qwen2.5-coder-1.5b-instruct", n_ctx=2048, threads=2, prompt_cache=False,
                        draft="qwen2.5-coder-0.5b-instruct") as e:
        assert e.speculative.mode == "draft" and e.draft.name.startswith("qwen2.5-coder-0.5b")
        prompt = e.chat_tokens(EDIT)
        plain, _ = greedy(e, prompt, 80, speculative="off")
        spec, stats = greedy(e, prompt, 80)
        assert stats.drafted_tokens > 0 and stats.acceptance_rate > 0.5
        assert_as_greedy_as_plain(e, prompt, plain, spec)
        assert "def scale_0(values, k)" in e.detokenize(spec)


def test_a_draft_model_with_another_vocabulary_is_refused(qwen_store, real_model_home):
    with pytest.raises(edgeinfer.VocabularyMismatchError, match="vocabulary"):
        edgeinfer.load("smollm2-135m-instruct", n_ctx=1024, threads=1, draft="qwen2.5-coder-0.5b-instruct")
