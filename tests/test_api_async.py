"""The asyncio API: ``Engine.astream`` and ``Engine.astream_chat``.

Generation runs on the engine's scheduler thread, which hands events to
the event loop as they come, so the loop keeps running while the model
prefills and decodes, and cancelling the consuming task cancels the
generation. No asyncio plugin is needed: each test drives its own loop
with ``asyncio.run``.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import threading
import time

import pytest

from edgeinfer.engine import Engine
from edgeinfer.errors import ContextOverflowError, TemplateError
from edgeinfer.events import DoneEvent, TextEvent

GREEDY = dict(temperature=0)
USER = [{"role": "user", "content": "Hello there"}]

pytestmark = pytest.mark.timeout(120)  # a lost wake-up would otherwise hang the run


@pytest.fixture(scope="module")
def engine(tiny_model):
    # one thread: see THREADS in test_engine.py; long greedy streams of the
    # tiny model loop, and these tests need them to run on
    with Engine(tiny_model, n_ctx=4096, threads=1, stop_on_repeat=False) as e:
        yield e


def long_prompt(e: Engine, n_words: int, key: str) -> str:
    words = sorted({w for w in (e.detokenize([t]) for t in range(256, e.n_vocab))
                    if re.fullmatch(r" [a-z]{2,}", w)})
    rng = random.Random(key)
    return "".join(rng.choice(words) for _ in range(n_words))


async def collect(agen) -> list:
    return [event async for event in agen]


@pytest.fixture
def worker_threads():
    """A function that lists the threads this test started that are still
    alive a moment later: astream needs none of its own, and must leave
    none behind."""
    before = set(threading.enumerate())

    def alive(wait: float = 2) -> list[threading.Thread]:
        new = set(threading.enumerate()) - before - {threading.current_thread()}
        for t in new:
            t.join(wait)
        return sorted((t for t in new if t.is_alive()), key=lambda t: t.ident)

    return alive


def test_astream_yields_what_stream_yields(engine, worker_threads):
    prompt = "The weather was"
    expected = list(engine.stream(prompt, max_tokens=60, **GREEDY))

    events = asyncio.run(collect(engine.astream(prompt, max_tokens=60, **GREEDY)))

    assert isinstance(events[-1], DoneEvent)
    assert all(isinstance(e, TextEvent) for e in events[:-1])
    assert [(e.text, e.tokens) for e in events[:-1]] == [(e.text, e.tokens) for e in expected[:-1]]
    assert events[-1].stats.finish_reason == expected[-1].stats.finish_reason
    assert events[-1].stats.generated_tokens == expected[-1].stats.generated_tokens
    assert not worker_threads()


def test_event_loop_keeps_ticking_during_generation(engine):
    prompt = long_prompt(engine, 2500, "responsive")  # a long prefill, then a long decode

    async def main():
        ticks = 0
        running = True

        async def ticker():
            nonlocal ticks
            while running:
                await asyncio.sleep(0.01)
                ticks += 1

        tick_task = asyncio.create_task(ticker())
        await asyncio.sleep(0)
        t0 = time.perf_counter()
        events = await collect(engine.astream(prompt, max_tokens=1000, **GREEDY))
        elapsed = time.perf_counter() - t0
        during = ticks
        running = False
        await tick_task
        return events, elapsed, during

    events, elapsed, ticks = asyncio.run(main())
    stats = events[-1].stats
    assert stats.prompt_tokens >= 2500 and stats.generated_tokens > 500
    # A loop blocked by the generation would tick about once; a free one
    # ticks every 10 ms, less what the scheduler of a busy machine takes.
    possible = elapsed / 0.01
    assert ticks >= 10 and ticks >= 0.25 * possible, f"{ticks} ticks in {elapsed:.2f} s"


def test_cancelling_the_consumer_cancels_the_generation(engine, worker_threads):
    prompt = "Quantization makes the weights"
    expected = engine.generate(prompt, max_tokens=20, **GREEDY)

    async def main():
        got_some = asyncio.Event()
        seen = []

        async def consume():
            async for event in engine.astream(prompt, max_tokens=3000, **GREEDY):
                seen.append(event)
                if len(seen) == 10:
                    got_some.set()

        task = asyncio.create_task(consume())
        await got_some.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return seen

    seen = asyncio.run(main())

    # The request's own cancel event stopped it (not an engine-wide cancel).
    assert not worker_threads(wait=0)  # the worker had finished before the task did
    stats = engine.last_stats
    assert stats.finish_reason == "cancelled"
    assert len(seen) <= stats.generated_tokens < 3000
    # the engine is free and its state is sound
    assert engine.generate(prompt, max_tokens=20, **GREEDY) == expected


def test_leaving_the_loop_early_cancels_the_generation(engine, worker_threads):
    prompt = "We walked to the market"
    expected = engine.generate(prompt, max_tokens=20, **GREEDY)

    async def main():
        async with contextlib.aclosing(engine.astream(prompt, max_tokens=3000, **GREEDY)) as agen:
            async for _ in agen:
                break

    asyncio.run(main())
    assert engine.last_stats.finish_reason == "cancelled"
    assert not worker_threads()
    assert engine.generate(prompt, max_tokens=20, **GREEDY) == expected


def test_astream_chat(engine):
    expected = engine.chat(USER, max_tokens=30, **GREEDY)
    events = asyncio.run(collect(engine.astream_chat(USER, max_tokens=30, **GREEDY)))
    assert "".join(e.text for e in events) == expected
    assert events[-1].stats.prompt_tokens == len(engine.chat_tokens(USER))


def test_errors_reach_the_awaiting_side(engine, worker_threads):
    too_long = long_prompt(engine, 4500, "too-long")

    async def expect(exc_type, agen):
        with pytest.raises(exc_type):
            await collect(agen)
        # Keep the loop open until the worker has finished: it may still be
        # handing over its end marker (the last test of this file).
        await asyncio.to_thread(worker_threads)

    asyncio.run(expect(ContextOverflowError, engine.astream(too_long, max_tokens=4)))
    asyncio.run(expect(TemplateError, engine.astream_chat([{"role": "user"}])))
    assert not worker_threads()
    assert asyncio.run(collect(engine.astream("The weather was", max_tokens=3, **GREEDY)))


def test_cancelling_a_waiting_consumer_leaves_the_running_generation_alone(tiny_model):
    # One sequence slot, held by a synchronous reader that pauses: the
    # async request waits in the queue, and is cancelled there.
    with Engine(tiny_model, n_ctx=4096, threads=1, n_seq_max=1, stop_on_repeat=False) as e:
        holding, release = threading.Event(), threading.Event()
        held = {}

        def hold():
            events = []
            for event in e.stream("The weather was", max_tokens=600, **GREEDY):
                events.append(event)
                holding.set()
                release.wait(10)
            held["stats"] = events[-1].stats

        holder = threading.Thread(target=hold)
        holder.start()
        assert holding.wait(10)
        waiting = {}

        async def main():
            task = asyncio.create_task(collect(e.astream("A small computer", max_tokens=200, **GREEDY)))
            deadline = time.monotonic() + 30   # a guard against a hang: wait for it to be queued
            while e.status()["queue_depth"] == 0 and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            waiting.update(e.status())
            task.cancel()
            threading.Timer(0.2, release.set).start()
            with pytest.raises(asyncio.CancelledError):
                await task

        try:
            asyncio.run(main())
        finally:
            release.set()
            holder.join(10)
        assert (waiting["active_sequences"], waiting["queue_depth"]) == (1, 1)
        # nobody cancelled the holder's generation ...
        assert held["stats"].finish_reason == "length"
        assert held["stats"].generated_tokens == 600
        # ... and the abandoned request never started
        assert e.status()["requests"] == 1


def test_a_closed_event_loop_cancels_its_stream_and_nothing_else(engine, monkeypatch, worker_threads):
    # The reader's event loop goes away mid-stream (an app quitting): the
    # scheduler's hand-over fails, and it cancels that request alone.
    thread_errors = []
    monkeypatch.setattr(threading, "excepthook", lambda args: thread_errors.append(args.exc_value))
    loop = asyncio.new_event_loop()
    agen = engine.astream("The weather was", max_tokens=3000, **GREEDY)
    first = loop.run_until_complete(agen.__anext__())
    assert isinstance(first, TextEvent)
    loop.close()
    deadline = time.monotonic() + 10
    while engine.status()["active_sequences"]:
        assert time.monotonic() < deadline, "the stream ran on for a loop that is gone"
        time.sleep(0.01)
    assert engine.last_stats.finish_reason == "cancelled"
    assert engine.last_stats.generated_tokens < 3000
    assert thread_errors == []
    assert not worker_threads()
    # The engine still serves: a new request runs to its own end (an empty
    # answer would be a legitimate one).
    done = list(engine.stream("The weather was", max_tokens=5, **GREEDY))[-1]
    assert isinstance(done, DoneEvent) and done.stats.finish_reason in ("stop", "length")
    assert done.stats.generated_tokens <= 5 and done.stats.prompt_tokens > 0
