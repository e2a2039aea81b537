"""A scripted engine for in-process tests of the servers.

As llm's ``MockModel.enqueue`` or httpx's ``MockTransport``: a test says
what the next request will stream, and the server under test runs
against it with no model, no llama.cpp and no subprocess::

    engine = ScriptedEngine()
    engine.enqueue("Hel", "lo")                       # two TextEvents, then a DoneEvent (finish "stop")
    engine.enqueue(EngineBusyError("queue full"))     # raises before the first event
    engine.enqueue("Hel", EngineError("llama_decode failed"))   # raises after one event
    gate = engine.enqueue("a", Hold(), "b")           # waits at Hold until gate.release()

Each request takes the next script; with none queued it answers "ok".
``engine.calls`` records what each request asked for (prompt ids and
keyword arguments); ``engine.closed_early`` counts streams their reader
closed before the end (a client that left, a cancel).
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field

from edgeinfer.events import DoneEvent, Stats, TextEvent


class Hold:
    """A point in a script where the stream waits until released."""

    def __init__(self):
        self._event: asyncio.Event | None = None
        self._released = False
        self.reached = 0    # how many streams have come to it

    def _get(self) -> asyncio.Event:
        if self._event is None:
            self._event = asyncio.Event()
            if self._released:
                self._event.set()
        return self._event

    async def wait(self) -> None:
        self.reached += 1
        await self._get().wait()

    def release(self) -> None:
        self._released = True
        if self._event is not None:
            self._event.set()


@dataclass
class Script:
    steps: tuple
    finish: str = "stop"
    stop_sequence: str | None = None
    hold: Hold | None = None

    def release(self) -> None:
        if self.hold is not None:
            self.hold.release()


@dataclass
class _Native:
    setting: str = "fake"


@dataclass
class ScriptedEngine:
    """What the servers use of an Engine, answering from scripts."""

    name: str = "fake-model:q4_0"
    n_ctx: int = 512
    n_seq_max: int = 2
    n_vocab: int = 1000
    native: _Native = field(default_factory=_Native)
    calls: list[dict] = field(default_factory=list)
    closed_early: int = 0
    _scripts: deque = field(default_factory=deque)

    def enqueue(self, *steps, finish: str = "stop", stop_sequence: str | None = None) -> Script:
        """The next request streams ``steps``: a string is a TextEvent, an
        exception is raised there (ending the stream), a Hold waits. A
        script that does not end in an exception ends with a DoneEvent."""
        holds = [s for s in steps if isinstance(s, Hold)]
        script = Script(steps, finish, stop_sequence, holds[0] if holds else None)
        self._scripts.append(script)
        return script

    # -- what the servers call --------------------------------------------
    def tokenize(self, text: str, *, add_bos: bool | None = None, special: bool = False) -> list[int]:
        ids = [1 + ord(c) % (self.n_vocab - 1) for c in text]
        return ([0] if add_bos is not False else []) + ids

    def chat_tokens(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        text = "".join(f"<{m['role']}>{m['content']}\n" for m in messages)
        return self.tokenize(text + ("<assistant>" if add_generation_prompt else ""))

    def status(self) -> dict:
        return {"active_sequences": 0, "queue_depth": 0, "parallel": self.n_seq_max, "kv_cells_used": 0,
                "n_ctx": self.n_ctx, "prompt_cache_hits": 0, "busy_refusals": 0, "steps": 0, "decode_tps": 0.0}

    def close(self) -> None:
        pass

    async def astream_tokens(self, tokens: list[int], **kwargs):
        self.calls.append({"tokens": list(tokens), **kwargs})
        script = self._scripts.popleft() if self._scripts else Script(("ok",))
        generated = 0
        finished = False
        try:
            for step in script.steps:
                if isinstance(step, BaseException):
                    finished = True
                    raise step
                if isinstance(step, Hold):
                    await step.wait()
                    continue
                generated += 1
                yield TextEvent(step, [generated])
            finished = True
            yield DoneEvent(Stats(prompt_tokens=len(tokens), generated_tokens=generated,
                                  finish_reason=script.finish, stop_sequence=script.stop_sequence))
        finally:
            if not finished:
                self.closed_early += 1
