"""The prompt cache on the catalog's default model (SmolLM2 135M Instruct,
Q4_1), pulled through the real model manager.

A chat with a long system prompt (about 700 tokens, written below) and
short questions: every cache hit (in memory, from disk in a fresh process,
a partial prefix) must give exactly the greedy answer of an engine loaded
with ``prompt_cache=False``, which prefills every prompt from scratch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import edgeinfer
from edgeinfer import paths
from edgeinfer.prompt_cache import _read_header, common_prefix

pytestmark = pytest.mark.real_model

MODEL = "smollm2-135m-instruct"
N_CTX = 2048
MAX_TOKENS = 40
SUBPROCESS_TIMEOUT = 300

FRANCE, GERMANY, ITALY = ("What is the capital of France?", "What is the capital of Germany?",
                          "What is the capital of Italy?")

_TOPICS = ["opening hours", "returns", "delivery times", "gift cards", "warranty claims",
           "store locations", "payment methods", "loyalty points", "price matching",
           "repairs", "student discounts", "online orders", "accessibility", "privacy"]


def system_prompt(tag: str) -> str:
    """About 700 tokens of instructions; ``tag`` gives each test its own
    prefix, so no test is served by another test's cache files."""
    rules = [f"Rule {i} ({topic}): when a customer asks about {topic}, give the policy in one "
             f"or two plain sentences, point to the help page on {topic} for details, never "
             f"invent figures, and offer to connect them with a person if they are unhappy."
             for i, topic in enumerate(_TOPICS, 1)]
    return (f"You are the help desk assistant of the {tag} bookshop chain. " + " ".join(rules)
            + " For any general knowledge question, answer briefly and correctly.")


def chat(tag: str, question: str) -> list[dict]:
    return [{"role": "system", "content": system_prompt(tag)}, {"role": "user", "content": question}]


def load(**options):
    return edgeinfer.load(MODEL, n_ctx=N_CTX, threads=2, **options)


def ask(engine, messages: list[dict]) -> tuple[str, int]:
    """Greedy answer and cached_tokens."""
    answer = engine.chat(messages, max_tokens=MAX_TOKENS, temperature=0)
    return answer, engine.last_stats.cached_tokens


@pytest.fixture
def plain(real_model_home):
    """No KV reuse at all: the answers a cache hit must reproduce."""
    with load(prompt_cache=False) as e:
        yield e


@pytest.fixture
def no_stale_entries(plain):
    """Delete cache files of this module's system prompts left in the store
    by an earlier run (EDGEINFER_TEST_STORE keeps a store between runs), so
    every hit below comes from this test."""
    def clean(tag: str) -> None:
        prefix = plain.chat_tokens(chat(tag, ""))[:500]
        for p in (paths.cache_dir() / "prompt").glob("*/*.kv"):
            head = _read_header(p)
            if head is not None and head["tokens"][:500] == prefix:
                p.unlink(missing_ok=True)
    return clean


def expected(plain, messages: list[dict]) -> str:
    answer, cached_tokens = ask(plain, messages)
    assert cached_tokens == 0
    return answer


def test_the_system_prompt_is_long(plain):
    tokens = plain.chat_tokens(chat("Northwind", FRANCE))
    assert len(tokens) > 500
    assert common_prefix(tokens, plain.chat_tokens(chat("Northwind", GERMANY))) > 500


def test_in_memory_hit_matches_no_cache(plain, no_stale_entries):
    """France, Germany, France: the second France is served by the cache,
    since the live KV state then holds the Germany prompt."""
    no_stale_entries("Northwind")
    france, germany = chat("Northwind", FRANCE), chat("Northwind", GERMANY)
    tokens = plain.chat_tokens(france)
    shared = common_prefix(tokens, plain.chat_tokens(germany))
    with load() as engine:
        first, c1 = ask(engine, france)
        second, c2 = ask(engine, germany)
        again, c3 = ask(engine, france)

    assert c1 < 20            # at most the template's opening, shared with other cached chats
    assert c2 == shared
    assert c3 == len(tokens) > shared          # more than the live KV held: the cache, whole
    assert first == again == expected(plain, france)
    assert second == expected(plain, germany)
    assert "Paris" in first


FRESH_PROCESS = r"""
import json, sys
import edgeinfer
messages = json.loads(sys.stdin.read())
with edgeinfer.load(sys.argv[1], n_ctx=int(sys.argv[2]), threads=2) as engine:
    answer = engine.chat(messages, max_tokens=int(sys.argv[3]), temperature=0)
    print(json.dumps({"answer": answer, "cached_tokens": engine.last_stats.cached_tokens}))
"""


def in_fresh_process(messages: list[dict]) -> dict:
    proc = subprocess.run([sys.executable, "-c", FRESH_PROCESS, MODEL, str(N_CTX), str(MAX_TOKENS)],
                          input=json.dumps(messages), capture_output=True, text=True,
                          timeout=SUBPROCESS_TIMEOUT, env=os.environ.copy())
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_disk_hit_in_a_fresh_process_matches_no_cache(plain, no_stale_entries):
    no_stale_entries("Southfield")
    france, italy = chat("Southfield", FRANCE), chat("Southfield", ITALY)
    with load() as engine:
        ask(engine, france)
        engine.prompt_cache.flush()
        shared = common_prefix(engine.chat_tokens(france), engine.chat_tokens(italy))

    child = in_fresh_process(italy)

    assert child["cached_tokens"] == shared > 500
    assert child["answer"] == expected(plain, italy)


def test_partial_prefix_hit_matches_no_cache(plain, no_stale_entries):
    """The cached France prompt is longer than what the Germany prompt
    shares with it: its state is restored and cut back."""
    no_stale_entries("Eastbrook")
    france, germany = chat("Eastbrook", FRANCE), chat("Eastbrook", GERMANY)
    unrelated = [{"role": "system", "content": "You are a pirate."},
                 {"role": "user", "content": "Say hello."}]
    with load() as engine:
        ask(engine, france)
        ask(engine, unrelated)                # the live KV no longer holds the system prompt
        answer, cached_tokens = ask(engine, germany)
        shared = common_prefix(engine.chat_tokens(france), engine.chat_tokens(germany))

    assert cached_tokens == shared > 500
    assert answer == expected(plain, germany)
    assert "Berlin" in answer


def test_cache_disabled_never_reuses_and_answers_alike(plain, no_stale_entries):
    no_stale_entries("Westmere")
    france, germany = chat("Westmere", FRANCE), chat("Westmere", GERMANY)
    with load() as engine:
        cached_answers = [ask(engine, m) for m in (france, germany, france)]
    assert [c for _, c in cached_answers][1:] != [0, 0]   # the cached engine did reuse

    cache_dir = paths.cache_dir() / "prompt"
    before = sorted(cache_dir.rglob("*.kv"))
    with load(prompt_cache=False) as engine:
        assert engine.prompt_cache is None
        plain_answers = [ask(engine, m) for m in (france, germany, france)]
    assert [c for _, c in plain_answers] == [0, 0, 0]
    assert [a for a, _ in plain_answers] == [a for a, _ in cached_answers]
    assert sorted(cache_dir.rglob("*.kv")) == before      # and wrote nothing


# Questions whose greedy answer after a cache hit was not the cold answer
# while llama.cpp's flash attention was on (a spider got 1 leg instead of
# 8): its CPU kernel evaluated the short tail after the reused prefix on
# its small-batch path. The engine now turns flash attention off.
@pytest.mark.parametrize("question", ["How many legs does a spider have?", "What is the largest planet?",
                                      "Who wrote Hamlet?"])
def test_more_questions_after_a_cache_hit_match_no_cache(plain, question):
    france, other = chat("Northwind", FRANCE), chat("Northwind", question)
    unrelated = [{"role": "system", "content": "You are a pirate."},
                 {"role": "user", "content": "Say hello."}]
    with load(cache_disk=False) as engine:
        ask(engine, france)
        ask(engine, unrelated)
        answer, cached_tokens = ask(engine, other)
    assert cached_tokens > 500
    assert answer == expected(plain, other)


# -- when a reused prefix is exact, and when it is not ----------------------------

BOOKSHOP = ("You are the help desk assistant of a bookshop chain. " + " ".join(
    f"Rule {i}: when a customer asks about topic {i}, answer in one plain sentence and point to "
    f"the help page." for i in range(25)))


def test_a_hit_through_a_longer_conversation_matches_no_cache(plain):
    """The prompt's KV was computed inside a longer prompt (a later turn of
    the same chat), and another chat ran in between. Before the engine left
    two prompt tokens to evaluate, the last prompt token was decoded alone
    and stored with other rounding, which flipped this near-tie ("12 * 12 =
    144" cold, "12 times 12 is equal to 144." after the hit)."""
    question = [{"role": "system", "content": BOOKSHOP}, {"role": "user", "content": "What is 12 times 12?"}]
    later = question + [{"role": "assistant", "content": "Let me check that for you, one moment please."},
                        {"role": "user", "content": "Also, what are your opening hours on Sunday?"}]
    between = [{"role": "system", "content": BOOKSHOP}, {"role": "user", "content": "How tall is Everest?"}]
    with load(cache_disk=False) as engine:
        ask(engine, later)
        ask(engine, between)          # shares the system prompt, and holds the live KV
        answer, cached_tokens = ask(engine, question)
        n = len(engine.chat_tokens(question))
    assert cached_tokens == n - 2
    assert answer == expected(plain, question)


def _last_logits(engine, tokens: list[int], plan: list[tuple[int, int]]):
    """Decode ``tokens`` in the [a, b) batches of ``plan`` on a fresh
    sequence (each may run past the end, then is cut back to where the next
    starts); the logits of the last token."""
    def run():
        ctx, ledger = engine._ctx, engine._ledger
        ledger.clear(0)
        for a, b in plan:
            ctx.seq_rm(0, a, -1)
            ctx.batch.clear()
            for i in range(a, b):
                ctx.batch.add(tokens[i], i, 0, i == b - 1)
            assert ctx.decode() == 0
        out = ctx.logits(-1).copy()
        ctx.seq_rm(0)
        return out
    return engine._exclusive(run)


def test_how_the_kv_was_computed_decides_exactness(real_model_home):
    """Measured facts the engine is built on: a prefix's KV gives the cold
    logits however the prompt was chunked, and even if it was computed
    inside a longer batch; a token decoded alone (every generated token) is
    stored with other rounding, and tokens after it see the difference."""
    from test_scheduler import TIE_TOLERANCE

    with load(prompt_cache=False) as engine:
        tokens = engine.chat_tokens([{"role": "system", "content": BOOKSHOP},
                                     {"role": "user", "content": "What is 12 times 12?"}])
        n = 400
        assert len(tokens) > n + 80
        cold = _last_logits(engine, tokens, [(0, n)])
        exact = {
            "chunked": [(0, 37), (37, 300), (300, n)],
            "inside a longer batch, then two": [(0, n + 80), (n - 2, n)],
            "in pairs": [(0, n - 40)] + [(i, i + 2) for i in range(n - 40, n, 2)],
        }
        alone = [(0, n - 40)] + [(i, i + 1) for i in range(n - 40, n)]
        shifts = {name: float(np.abs(_last_logits(engine, tokens, plan) - cold).max())
                  for name, plan in {**exact, "one at a time": alone}.items()}
    assert all(shifts[name] == 0.0 for name in exact), shifts
    # 0.39 to 0.61 at prompts of 100 to 400 tokens on a 2-core AMD EPYC; within the
    # tolerance batching is held to
    assert shifts["one at a time"] <= TIE_TOLERANCE, shifts


def _greedy_tokens(engine, messages: list[dict]) -> tuple[list[int], int]:
    events = list(engine.stream_chat(messages, max_tokens=MAX_TOKENS, temperature=0))
    return [t for ev in events[:-1] for t in ev.tokens], events[-1].stats.cached_tokens


def test_a_new_turn_reuses_the_answer_and_parts_only_at_a_near_tie(plain):
    """The other way: the next turn of a chat reuses the KV of the answer
    before it, which was generated one token at a time, where a cold
    prefill computes it in a batch. The two replies may part (this one did,
    at token 10, 0.05 logits apart on a 2-core AMD EPYC), but only where
    the cold run's own logits call it a near-tie."""
    from test_scheduler import TIE_TOLERANCE

    first = [{"role": "user", "content": "Name three rivers in Europe."}]
    with load(cache_disk=False) as engine:
        answer, _ = ask(engine, first)
        second = first + [{"role": "assistant", "content": answer},
                          {"role": "user", "content": "Which of them is the longest?"}]
        reused, cached_tokens = _greedy_tokens(engine, second)
    cold, _ = _greedy_tokens(plain, second)
    assert cached_tokens > len(plain.chat_tokens(first)) + 10     # the answer's KV was reused
    k = next((i for i, (a, b) in enumerate(zip(reused, cold)) if a != b), None)
    if k is not None:
        prompt = plain.chat_tokens(second)
        row = plain.eval_logits(prompt + cold[:k + 1])[len(prompt) - 1 + k]
        assert row[cold[k]] - row[reused[k]] <= TIE_TOLERANCE, (k, row[cold[k]], row[reused[k]])
