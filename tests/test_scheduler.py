"""The batched scheduler: many callers of one Engine share decode steps.

On the tiny model the tests build. Every test runs real llama.cpp steps
and reads what the scheduler reports (``Engine.status()``) or what came
out of the streams.
"""

from __future__ import annotations

import random
import re
import threading
import time

import numpy as np
import pytest

from edgeinfer.engine import DoneEvent, Engine
from edgeinfer.errors import ContextOverflowError, EngineBusyError
from edgeinfer.prompt_cache import PromptCache

GREEDY = dict(temperature=0)
PROMPTS = ["The weather was mild", "A small computer on a desk can run", "We walked to the market",
           "Quantization makes the weights", "When a person types a question", "The program reads the file"]
# How far below the best logit a batched greedy choice may be: the largest
# shift seen when a sequence moves to other KV cells (test_scheduler_real.py,
# docs/python-api.md "Batching and exact output"); a wrong batch row or a
# crossed sequence is off by far more.
TIE_TOLERANCE = 1.0

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def engine(tiny_model):
    # Speculation off: these tests count decode steps, and accepted drafts
    # would make fewer of them (tests/test_speculative.py covers it batched).
    with Engine(tiny_model, n_ctx=4096, threads=1, n_seq_max=8, stop_on_repeat=False,
                prompt_cache=False, speculative="off") as e:
        yield e


def words(e: Engine) -> list[str]:
    return sorted({w for w in (e.detokenize([t]) for t in range(256, e.n_vocab)) if re.fullmatch(r" [a-z]{2,}", w)})


def concurrently(fns) -> list:
    out = [None] * len(fns)
    barrier = threading.Barrier(len(fns))

    def work(i):
        barrier.wait()
        out[i] = fns[i]()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    return out


def collect(e: Engine, prompt, **kw) -> tuple[list[int], DoneEvent]:
    tokens = e.tokenize(prompt) if isinstance(prompt, str) else prompt
    events = list(e.stream_tokens(tokens, **kw))
    return [t for ev in events for t in ev.tokens], events[-1]


def assert_greedy_choices(e: Engine, prompt: list[int], generated: list[int]) -> int:
    """Every generated token is the best token of a single-sequence pass over
    the same tokens, or within TIE_TOLERANCE of it. Returns how many were
    exactly the best."""
    logits = e.eval_logits(prompt + generated[:-1]) if generated else None
    exact = 0
    for k, tok in enumerate(generated):
        row = logits[len(prompt) - 1 + k]
        gap = float(row.max() - row[tok])
        assert gap <= TIE_TOLERANCE, f"token {k} ({tok}) is {gap:.3f} below the best ({int(row.argmax())})"
        exact += gap == 0.0
    return exact


def test_concurrent_callers_share_decode_steps(engine):
    before = engine.status()
    results = concurrently([lambda p=p: collect(engine, p, max_tokens=48, **GREEDY) for p in PROMPTS[:4]])
    after = engine.status()
    assert all(done.stats.finish_reason == "length" and done.stats.generated_tokens == 48
               for _, done in results)
    assert after["max_sequences_in_step"] >= 3
    multi = sum(n for size, n in after["steps_by_sequences"].items() if int(size) >= 2) - \
        sum(n for size, n in before["steps_by_sequences"].items() if int(size) >= 2)
    assert multi >= 30, after["steps_by_sequences"]  # most of the 48 steps carried several sequences
    assert after["active_sequences"] == 0 and after["queue_depth"] == 0


def test_batched_greedy_output_is_the_single_sequence_choice_up_to_near_ties(engine):
    """Batch shapes change float sums, so a batched greedy stream can take
    the other side of a near-tie; it never takes a token a single-sequence
    pass would rank far below."""
    alone = [collect(engine, p, max_tokens=40, **GREEDY)[0] for p in PROMPTS]
    batched = concurrently([lambda p=p: collect(engine, p, max_tokens=40, **GREEDY)[0] for p in PROMPTS])
    exact = same = 0
    for p, a, b in zip(PROMPTS, alone, batched):
        exact += assert_greedy_choices(engine, engine.tokenize(p), b)
        same += a == b
    assert exact >= 0.8 * sum(len(b) for b in batched)
    assert same >= 1  # and whole streams do come out equal


def test_cancelling_one_stream_leaves_the_others_running(engine):
    stop = threading.Event()

    def victim():
        tokens, done = [], None
        for ev in engine.stream("The weather was mild", max_tokens=3000, cancel=stop, **GREEDY):
            tokens += ev.tokens
            if len(tokens) >= 10:
                stop.set()
            done = ev
        return done

    results = concurrently([victim] + [lambda p=p: collect(engine, p, max_tokens=60, **GREEDY)[1]
                                       for p in PROMPTS[1:4]])
    assert results[0].stats.finish_reason == "cancelled"
    assert 10 <= results[0].stats.generated_tokens < 100
    assert [d.stats.finish_reason for d in results[1:]] == ["length"] * 3
    assert [d.stats.generated_tokens for d in results[1:]] == [60] * 3


def test_engine_cancel_stops_every_stream(engine):
    going = [threading.Event() for _ in range(3)]

    def one(k, p):
        for i, ev in enumerate(engine.stream(p, max_tokens=1000, **GREEDY)):  # 3 fit in 4096
            if i == 3:
                going[k].set()
        return ev

    def canceller():
        assert all(g.wait(20) for g in going)
        engine.cancel()

    results = concurrently([lambda k=k, p=p: one(k, p) for k, p in enumerate(PROMPTS[:3])] + [canceller])
    assert [d.stats.finish_reason for d in results[:3]] == ["cancelled"] * 3
    assert engine.status()["active_sequences"] == 0
    # and the engine works on
    assert collect(engine, PROMPTS[0], max_tokens=5, **GREEDY)[1].stats.generated_tokens == 5


def test_a_long_prompt_is_prefilled_in_chunks_between_running_tokens(tiny_model):
    with Engine(tiny_model, n_ctx=8192, threads=1, n_seq_max=4, prefill_chunk=64, prompt_cache=False,
                stop_on_repeat=False, speculative="off") as e:
        long_prompt = e.tokenize("".join(random.Random(3).choice(words(e)) for _ in range(3000)))
        assert len(long_prompt) > 2000
        # a greedy stream that runs to its limit, not to end-of-generation
        steady = next(p for p in PROMPTS if collect(e, p, max_tokens=600, **GREEDY)[1].stats.generated_tokens == 600)
        stamps: list[float] = []
        arrived = threading.Event()
        window = {}

        def runner():
            for ev in e.stream(steady, max_tokens=600, **GREEDY):
                stamps.append(time.perf_counter())
                if len(stamps) == 20:
                    arrived.set()
            return ev

        def newcomer():
            arrived.wait(20)
            window["start"] = time.perf_counter()
            _, done = collect(e, long_prompt, max_tokens=1, **GREEDY)
            window["end"] = time.perf_counter() - (done.stats.total_s - done.stats.ttft_s)
            return done

        run_done, new_done = concurrently([runner, newcomer])
        steps = e.status()["steps_by_sequences"]
    during = [t for t in stamps if window["start"] <= t <= window["end"]]
    chunks = len(long_prompt) // 64
    # The running stream got a token between (nearly) every pair of chunks.
    assert len(during) >= 0.8 * chunks, (len(during), chunks)
    assert new_done.stats.cached_tokens == 0 and new_done.stats.generated_tokens == 1
    assert run_done.stats.generated_tokens == 600
    assert window["end"] < stamps[-1]  # the stream outlived the prefill, so the window was covered
    assert steps.get(2, 0) >= chunks


def test_a_live_sequence_shares_its_prefix_with_a_new_request(tiny_model):
    # No prompt-cache tier at all (memory budget 0, no disk): a hit can only
    # come from another sequence's KV, copied with llama_memory_seq_cp.
    with Engine(tiny_model, n_ctx=4096, threads=1, n_seq_max=4, stop_on_repeat=False,
                prompt_cache=PromptCache("none", memory_budget=0, disk=False)) as e:
        system = "".join(random.Random(5).choice(words(e)) for _ in range(300))
        first = e.tokenize(system + " and then the first question")
        second = e.tokenize(system + " but a second question")
        shared = next(i for i, (a, b) in enumerate(zip(first, second)) if a != b)
        assert shared > 250
        going = threading.Event()

        def a():
            for i, ev in enumerate(e.stream_tokens(first, max_tokens=200, **GREEDY)):
                if i == 2:
                    going.set()
            return ev

        def b():
            going.wait(20)
            return collect(e, second, max_tokens=20, **GREEDY)

        done_a, (tokens_b, done_b) = concurrently([a, b])
        assert done_b.stats.cached_tokens == shared
        assert done_a.stats.generated_tokens == 200
        assert_greedy_choices(e, second, tokens_b)


def test_requests_wait_for_room_in_the_shared_context(tiny_model):
    # Each request needs prompt + max_tokens cells. In 256 two do not fit at
    # once, so the second waits for the first instead of evicting it; in
    # 1024 the same pair runs together.
    def pair(n_ctx):
        with Engine(tiny_model, n_ctx=n_ctx, threads=1, n_seq_max=4, stop_on_repeat=False,
                    prompt_cache=False, speculative="off") as e:
            p1, p2 = e.tokenize(" ".join(["weather"] * 40)), e.tokenize(" ".join(["market"] * 40))
            done = concurrently([lambda p=p: collect(e, p, max_tokens=150, **GREEDY)[1] for p in (p1, p2)])
            return [d.stats.generated_tokens for d in done], e.status()["steps_by_sequences"]

    generated, steps = pair(256)
    assert generated == [150, 150]
    assert set(steps) == {1}, steps          # never in one step together
    generated, steps = pair(1024)
    assert generated == [150, 150]
    assert steps.get(2, 0) >= 100, steps


def test_a_full_queue_refuses_at_once_and_a_prompt_over_the_context_up_front(tiny_model):
    with Engine(tiny_model, n_ctx=2048, threads=1, n_seq_max=1, queue_limit=0, stop_on_repeat=False) as e:
        with pytest.raises(ContextOverflowError):
            list(e.stream_tokens([5] * 2048, max_tokens=4))
        held = e.stream("The weather was mild", max_tokens=1000, **GREEDY)
        next(held)  # admitted; the reader now pauses
        with pytest.raises(EngineBusyError) as info:
            e.generate("We walked", max_tokens=4)
        assert "busy" in str(info.value)
        # Refused without waiting for the slot: the held stream still runs.
        assert e.status()["active_sequences"] == 1
        held.close()  # leaving the loop cancels the held stream and frees its slot
        assert e.status()["active_sequences"] == 0
        assert e.generate("We walked", max_tokens=4, **GREEDY)
        assert e.status()["busy_refusals"] == 1


def batched_logits(e: Engine, tokens: list[int], pad: int) -> np.ndarray:
    """Logits of the last of ``tokens`` (sequence 0), evaluated in one batch
    after ``pad`` tokens of another sequence (1)."""
    filler = e.tokenize(" market", add_bos=False)[0]

    def run():  # through the doorway, on the scheduler's thread
        ctx = e._ctx
        b = ctx.batch
        b.clear()
        for seq, toks in ((1, [filler] * pad), (0, tokens)):
            for j, t in enumerate(toks):
                b.add(t, j, seq, False)
        b.want_logits(b.n - 1)
        assert ctx.decode(b) == 0
        row = ctx.logits(b.n - 1).copy()
        for s in (0, 1):
            e._ledger.clear(s)
        return row

    return e._exclusive(run)


def logit_shifts(e: Engine, text: str | list[int], pads=(16, 32, 3, 5, 7, 9)) -> dict[int, float]:
    tokens = e.tokenize(text) if isinstance(text, str) else text
    alone = e.eval_logits(tokens)[-1]
    return {pad: float(np.abs(batched_logits(e, tokens, pad) - alone).max()) for pad in pads}


def test_a_sequence_after_another_in_one_batch_gets_its_own_logits(tiny_model):
    """Another sequence's tokens in the same batch move only float rounding
    (the real-model tier shows where that exceeds rounding)."""
    with Engine(tiny_model, n_ctx=4096, threads=1, n_seq_max=2, prompt_cache=False) as e:
        shifts = logit_shifts(e, "The weather was mild and the market was full of people")
    assert max(shifts.values()) < 1e-4, shifts


def test_no_room_for_a_batch_retries_smaller_instead_of_failing(tiny_model, monkeypatch):
    """llama_decode returns 1 when the KV cache has no room for a batch (and
    restores it). Injected here at the doorway for every batch over 4
    tokens, the first few times: the step retries with less prefill, and
    nobody fails. The three requests are held in the queue (behind a call
    on the scheduler's thread) until all have arrived, so they start in one
    step whatever the timing."""
    from edgeinfer import llama

    real = llama.Context.decode
    refused = []

    def decode(self, batch=None, **kw):
        b = batch or self.batch
        if b.n > 4 and len(refused) < 5:
            refused.append(b.n)
            return llama.DECODE_NO_ROOM
        return real(self, batch, **kw)

    with Engine(tiny_model, n_ctx=4096, threads=1, n_seq_max=4, prompt_cache=False, stop_on_repeat=False,
                speculative="off") as e:
        expected = [collect(e, p, max_tokens=20, **GREEDY)[1].stats.generated_tokens for p in PROMPTS[:3]]
        monkeypatch.setattr(llama.Context, "decode", decode)
        gate, holding = threading.Event(), threading.Event()
        hold = threading.Thread(target=e._exclusive, args=(lambda: holding.set() or gate.wait(60),))
        hold.start()
        assert holding.wait(30)
        done = [None] * 3

        def run(i):
            done[i] = collect(e, PROMPTS[i], max_tokens=20, **GREEDY)[1]

        runs = [threading.Thread(target=run, args=(i,)) for i in range(3)]
        for t in runs:
            t.start()
        while e.status()["queue_depth"] < 3:
            time.sleep(0.01)
        gate.set()
        for t in [hold, *runs]:
            t.join(60)
    assert len(refused) >= 2 and refused[1] < refused[0], refused  # retried with smaller batches
    assert [d.stats.generated_tokens for d in done] == expected
    assert all(d.stats.finish_reason in ("length", "stop") for d in done)


def test_max_tokens_0_prefills_and_generates_nothing(engine):
    events = list(engine.stream("The weather was mild", max_tokens=0))
    assert len(events) == 1 and events[0].stats.generated_tokens == 0
    assert events[0].stats.finish_reason == "length" and events[0].stats.prefill_tps > 0


def test_ignore_eos_runs_to_max_tokens(engine):
    eog = set(engine.eog_tokens())
    assert eog
    for seed in range(5):
        tokens, done = collect(engine, "The weather was", max_tokens=150, seed=seed, ignore_eos=True,
                               temperature=1.5, top_k=0, top_p=1.0, min_p=0.0)
        assert done.stats.generated_tokens == 150 and done.stats.finish_reason == "length"
        assert not eog & set(tokens)
