"""One request in a sequence slot, and the rules that turn its tokens
into text.

A :class:`Request` waits in the scheduler's queue until a slot is free
and the context has room for it; then a :class:`Sequence` holds it in
that slot and moves through named states::

    (queued) ──► PREFILLING ──► DECODING ──► FINISHED
                      └──────────────────────────▲   (cancelled, failed, a prefill only)

Its text rules live here and nowhere else, so they can be driven token by
token without a model: bytes become text only once they are whole UTF-8,
text that may be the start of a stop string is held back, a stop string
ends the answer (and is not part of it), and so do max_tokens, a loop
(``repeating``) and a full context. Whatever was held back belongs to the
answer at the end unless a stop string cut it off; every token id is
reported exactly once.
"""

from __future__ import annotations

import codecs
import enum
import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from .events import Stats, TextEvent
from .sampling import StopMatcher, repeating
from .speculative import Estimate, NgramIndex, SpecConfig

_ids = itertools.count(1)


class BetweenSteps(threading.Event):
    """A cancel Event that ends its request between steps, never inside
    one: a prompt being read is read to the end first (its KV stays in the
    slot and the prompt cache, for the next request that shares it), and
    no step is aborted, so nobody else's prompt chunk is rolled back.
    Editors use it: a completion the user typed past ends this way."""


@dataclass(eq=False)
class Request:
    """One generation: prompt tokens in, events out through ``sink``.

    ``sink`` is called on the scheduler thread with each TextEvent, the
    final DoneEvent, or an exception for the reader to raise. It must not
    block; the reader counts what it has taken in ``consumed`` so a reader
    that stops reading holds back only its own sequence."""

    tokens: list[int]
    max_tokens: int
    stops: list[str]
    seed: int
    options: dict
    sink: Callable[[object], None]
    cancel_event: threading.Event | None = None   # the caller's own
    admit_timeout: float | None = None            # None: wait for a slot forever
    ignore_eos: bool = False                      # run to max_tokens: no end-of-generation, no loop stop
    grammar: object | None = None                 # a grammar.CompiledGrammar the answer must follow
    spec: SpecConfig | None = None                # speculative decoding; None: off
    logit_bias: dict[int, float] | None = None    # added to those tokens' logits
    logprobs: int | None = None                   # None: none; N: each token's and the N likeliest
    shown: frozenset = frozenset()                # control tokens whose text the answer shows
    id: int = field(default_factory=lambda: next(_ids))
    consumed: int = 0                             # events the reader has taken
    # set by the scheduler
    delivered: int = 0                            # events given to the sink
    seq: int = -1                                 # the slot, once admitted
    stats: Stats | None = None
    finished: bool = False
    submitted: float = field(default_factory=time.perf_counter)
    reserve: int = 0                              # context cells held for it (prompt + max_tokens)
    _cancelled: threading.Event = field(default_factory=threading.Event, repr=False)

    def cancel(self) -> None:
        self._cancelled.set()

    def cancelled(self) -> bool:
        return self._cancelled.is_set() or (self.cancel_event is not None and self.cancel_event.is_set())

    def stops_now(self, prefilling: bool) -> bool:
        """Whether to end it at the start of a step: a BetweenSteps cancel
        lets a prompt being read finish first."""
        e = self.cancel_event
        return self._cancelled.is_set() or (
            e is not None and e.is_set() and not (prefilling and isinstance(e, BetweenSteps)))

    def abort_events(self) -> list[threading.Event]:
        """The events whose setting should stop this request mid-decode."""
        return [e for e in (self._cancelled, self.cancel_event) if e is not None and not isinstance(e, BetweenSteps)]


class State(enum.Enum):
    PREFILLING = "prefilling"   # prompt tokens still to evaluate
    DECODING = "decoding"       # one token (and maybe a draft) per step
    FINISHED = "finished"


class Sequence:
    """A request in slot ``seq``: what is left to evaluate, its sampler,
    and the text state between steps."""

    __slots__ = ("req", "seq", "state", "pending", "chain", "gate", "penalties", "utf8", "matcher", "generated",
                 "pending_ids", "pending_lp", "t0", "t_first", "stats", "n_cached", "ngrams", "estimate", "drafts",
                 "stop_on_repeat", "greedy")

    def __init__(self, req: Request, seq: int, n_cached: int, *, chain=None, t0: float | None = None,
                 stop_on_repeat: bool = True):
        self.req, self.seq, self.chain = req, seq, chain
        self.t0 = time.perf_counter() if t0 is None else t0
        self.state = State.PREFILLING
        self.gate = None   # a GrammarGate when the request has a grammar
        self.penalties = None   # a sampling.Penalties when the options penalise repeats
        self.greedy = False     # the chain only takes the largest logit (sampling.takes_largest)
        self.pending = req.tokens[n_cached:]   # tokens still to evaluate
        self.n_cached = n_cached
        self.utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        self.matcher = StopMatcher(req.stops)
        self.generated: list[int] = []
        self.pending_ids: list[int] = []
        self.pending_lp: list[dict] | None = [] if req.logprobs is not None else None
        self.t_first: float | None = None
        if req.stats is None:
            req.stats = Stats(prompt_tokens=len(req.tokens), cached_tokens=n_cached)
        self.stats = req.stats
        self.stop_on_repeat = stop_on_repeat and not req.ignore_eos
        # Speculation: the prompt and answer so far, indexed by n-gram.
        spec = req.spec
        self.ngrams = NgramIndex(req.tokens, spec.ngram, spec.min_ngram) if spec else None
        self.estimate = Estimate() if spec and spec.mode == "auto" else None
        self.drafts: list[int] = []     # drafted after pending[0], in this step

    def prefill_done(self, tokens: int) -> bool:
        """Record that ``tokens`` more prompt tokens were evaluated; True
        once the whole prompt is (the sequence then decodes)."""
        del self.pending[:tokens]
        if self.pending:
            return False
        self.state = State.DECODING
        return True

    def first_token_at(self, now: float) -> None:
        if self.t_first is None:
            self.t_first = now
            self.stats.ttft_s = now - self.req.submitted

    def emit(self, tok: int, piece: bytes, *, context_full: bool = False,
             logprob: dict | None = None) -> tuple[TextEvent | None, str | None]:
        """Take generated token ``tok`` (not an end-of-generation token),
        whose bytes are ``piece`` (and ``logprob``, its log-probability
        entry, when the request asked). Returns the text event to deliver
        now, if any, and the finish reason if the answer ends with it.
        ``context_full``: the context has no room for another token."""
        stats = self.stats
        stats.generated_tokens += 1
        self.pending_ids.append(tok)
        if self.pending_lp is not None:
            self.pending_lp.append(logprob)
        self.generated.append(tok)
        if self.ngrams is not None:
            self.ngrams.extend((tok,))
        text, stopped = self.matcher.feed(self.utf8.decode(piece))
        event = None
        if text:
            event = self._event(text)
        if stopped:
            return event, "stop_string"
        if context_full:
            return event, "length"     # the context is full: end cleanly
        if self.stop_on_repeat and len(self.generated) % 8 == 0 and repeating(self.generated):
            return event, "repetition"  # stuck in a loop: say so rather than run on
        if stats.generated_tokens >= self.req.max_tokens:
            return event, "length"
        self.pending = [tok]
        return event, None

    def _event(self, text: str) -> TextEvent:
        """The tokens held so far, with ``text``."""
        event = TextEvent(text, self.pending_ids, logprobs=self.pending_lp)
        self.pending_ids = []
        if self.pending_lp is not None:
            self.pending_lp = []
        return event

    def finish(self, reason: str, now: float) -> TextEvent | None:
        """End the answer with ``reason`` ("stop_string" for a stop string,
        reported as "stop"); returns the held-back text and ids to deliver
        before the done event, if any."""
        hit_stop = reason == "stop_string"
        stats = self.stats
        # Whatever was held back (a possible stop-string prefix, the bytes
        # of an unfinished character) belongs to the answer unless a stop
        # string cut it off; every token id is reported once.
        tail = "" if hit_stop else self.matcher.flush() + self.utf8.decode(b"", final=True)
        event = self._event(tail) if tail or self.pending_ids else None
        if self.t_first is not None and stats.generated_tokens > 1:
            stats.decode_tps = (stats.generated_tokens - 1) / max(now - self.t_first, 1e-9)
        stats.finish_reason = "stop" if hit_stop else reason
        if hit_stop:
            stats.stop_sequence = self.matcher.hit
        stats.total_s = now - self.req.submitted
        self.state = State.FINISHED
        return event
