"""What a generation stream yields: text events, then one done event
carrying the figures. Every front end (REPL, Python API, server) reads
these."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Stats:
    """Figures for one generation."""

    prompt_tokens: int = 0
    cached_tokens: int = 0        # prompt tokens whose KV state was reused
    generated_tokens: int = 0
    ttft_s: float = 0.0           # request start to first token
    prefill_tps: float = 0.0      # prompt tokens evaluated per second
    decode_tps: float = 0.0       # generated tokens per second after the first
    finish_reason: str = ""       # "stop", "length", "repetition" (stuck in a loop) or "cancelled"
    stop_sequence: str | None = None  # the stop string that ended the answer, if one did
    drafted_tokens: int = 0       # speculative decoding: tokens drafted for the target to check
    accepted_tokens: int = 0      # of those, kept
    total_s: float = 0.0
    native: str = ""              # the native setting in force (see edgeinfer.native)
    cpu_temperature_c: float | None = None  # the hottest CPU sensor near the end, where readable
    throttled: list[str] | None = None      # what the CPU reports now ([] for nothing), where it reports

    @property
    def acceptance_rate(self) -> float | None:
        """Drafted tokens kept, as a fraction; None when nothing was drafted."""
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class TextEvent:
    """A piece of generated text and the token ids that produced it;
    ``logprobs``, when the request asked, has one entry per token:
    ``{"token", "bytes", "logprob", "top_logprobs": [{"token", "bytes",
    "logprob"}, ...]}`` (OpenAI's shape)."""

    text: str
    tokens: list[int] = field(default_factory=list)
    logprobs: list[dict] | None = None


@dataclass
class ToolCallEvent:
    """A piece of a tool call (edgeinfer.tools). A call's first piece has
    ``first`` (its ``id`` and ``name`` are new); the next carry fragments
    of its arguments' JSON text, which joined make the whole; its last has
    ``done``. A call cut short by max_tokens never gets ``done``.
    ``text`` is empty, so joining the ``.text`` of every event gives the
    answer's content."""

    index: int
    id: str
    name: str
    arguments: str = ""
    first: bool = False
    done: bool = False
    text: str = ""
    tokens: list[int] = field(default_factory=list)


@dataclass
class DoneEvent:
    """The last event of a stream; ``text`` is empty so that joining the
    ``.text`` of every event gives the answer."""

    stats: Stats
    text: str = ""
    tokens: list[int] = field(default_factory=list)
