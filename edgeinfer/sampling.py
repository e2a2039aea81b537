"""Sampling in llama.cpp's own sampler chain, and stop strings."""

from __future__ import annotations

import ctypes
import math
from collections import deque
from typing import Iterable

import numpy as np

from .errors import RequestError

# Every sampling option: its type and its neutral value (the engine's
# default; a catalog entry's [sampling] sets a model's own). The REPL's
# /set, the catalog parser and the engine all read this table.
OPTIONS: dict[str, tuple[type, float | int]] = {
    "temperature": (float, 0.8),        # 0 = greedy
    "top_k": (int, 40),                 # 0 = off
    "top_p": (float, 0.95),             # 1 = off
    "min_p": (float, 0.05),             # 0 = off
    "repeat_penalty": (float, 1.0),     # 1 = off; divides the logits of recent tokens
    "repeat_last_n": (int, 64),         # how many recent tokens the penalties see
    "frequency_penalty": (float, 0.0),  # minus this much per earlier use
    "presence_penalty": (float, 0.0),   # minus this much once used
    "dry_multiplier": (float, 0.0),     # 0 = off; DRY: penalise extending a repeated span
    "dry_base": (float, 1.75),
    "dry_allowed_length": (int, 2),     # a repeat this long is free
    "dry_last_n": (int, -1),            # tokens DRY looks back over; -1 = the whole context
    "infill": (int, 0),                 # 1 = llama.cpp's fill-in-the-middle sampler (needs an end-of-text token)
}
DEFAULTS = {k: v for k, (_, v) in OPTIONS.items()}
# The range each option must fall in when a request over the network sets
# it. The Python API and catalog entries take any finite number (a test
# may want a penalty of 1e6), an integer where the option counts something.
RANGES: dict[str, tuple[float, float]] = {
    "temperature": (0.0, 10.0),
    "top_k": (0, 1_000_000),
    "top_p": (0.0, 1.0),
    "min_p": (0.0, 1.0),
    "repeat_penalty": (0.0, 10.0),
    "repeat_last_n": (-1, 1_000_000),
    "frequency_penalty": (-2.0, 2.0),
    "presence_penalty": (-2.0, 2.0),
    "dry_multiplier": (0.0, 10.0),
    "dry_base": (1.0, 10.0),
    "dry_allowed_length": (0, 1_000_000),
    "dry_last_n": (-1, 1_000_000),
    "infill": (0, 1),
}
MAX_TOP_LOGPROBS = 20     # alternatives per token (OpenAI's limit)
MAX_LOGIT_BIAS = 1024      # tokens one request may bias
# llama.cpp's default DRY sequence breakers: a repeat that crosses one of
# these (a new line, a quote) is not followed further.
DRY_BREAKERS = ("\n", ":", "\"", "*")


def check_value(name: str, v, where: str = "", ranged: bool = True) -> int | float:
    """A sampling option's value as its type, or RequestError (a
    ValueError) naming it: finite, whole where it counts, and in RANGES
    unless ``ranged`` is False."""
    kind = OPTIONS[name][0]
    lo, hi = RANGES[name] if ranged else (-2 ** 31, 2 ** 31 - 1) if kind is int else (-math.inf, math.inf)
    ok = not isinstance(v, bool) and isinstance(v, (int, float))
    ok = ok and math.isfinite(v if isinstance(v, float) else 0.0) and abs(v) < 1e300 and lo <= v <= hi
    if not ok or (kind is int and v != int(v)):
        what = "an integer" if kind is int else "a finite number"
        span = f" from {lo:g} to {hi:g}" if ranged or kind is int else ""
        raise RequestError(name, f"{where}{name} must be {what}{span}, not {str(v)[:40]}")
    return kind(v)


def check_logit_bias(bias, n_vocab: int, param: str = "logit_bias") -> dict[int, float] | None:
    """A logit bias ({token id: bias}, ids as ints or digit strings as
    JSON sends them) checked: ids in the vocabulary, biases from -100 to
    100 (-100 bans the token, as OpenAI's). None or {} for none."""
    if not bias:
        return None
    if not isinstance(bias, dict) or len(bias) > MAX_LOGIT_BIAS:
        raise RequestError(param, f"{param} must be an object of at most {MAX_LOGIT_BIAS} token ids to biases")
    out = {}
    for key, v in bias.items():
        try:
            tok = int(key)
        except (TypeError, ValueError):
            tok = -1
        if isinstance(key, bool) or not 0 <= tok < n_vocab:
            raise RequestError(param, f"{param}: {str(key)[:20]!r} is not a token id of this model "
                                      f"(0 to {n_vocab - 1})")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not -100 <= v <= 100:
            raise RequestError(param, f"{param}[{tok}] must be a number from -100 to 100")
        out[tok] = float("-inf") if v <= -100 else float(v)
    return out


def check_options(opts: dict, where: str = "sampling") -> dict:
    """``opts`` with each value converted to its option's type; raises
    TypeError for an unknown name and RequestError (a ValueError) for a
    bad value."""
    unknown = set(opts) - set(OPTIONS)
    if unknown:
        raise TypeError(f"unknown sampling option(s): {', '.join(sorted(unknown))}")
    return {k: check_value(k, v, f"{where}: ", ranged=False) for k, v in opts.items()}


class Penalties:
    """The repeat, frequency and presence penalties, applied to a row of
    logits in place before the chain samples it.

    The same arithmetic as llama.cpp's penalties sampler (a positive logit
    divided by ``repeat``, any other multiplied; then minus ``count *
    frequency + presence``; all in float32), over the same window: the last
    ``last_n`` tokens sampled. llama.cpp's sampler looks each of the whole
    vocabulary's candidates up in a hash map at every step (49,152 on
    SmolLM2); here only the at most ``last_n`` tokens of the window are
    touched."""

    def __init__(self, last_n: int, repeat: float, frequency: float, presence: float):
        self.last_n = last_n
        self.repeat, self.frequency, self.presence = (np.float32(x) for x in (repeat, frequency, presence))
        self.window: deque[int] = deque()
        self.counts: dict[int, int] = {}

    def accept(self, token: int) -> None:
        """Record a sampled token (the oldest leaves a full window)."""
        if len(self.window) == self.last_n:
            old = self.window.popleft()
            if self.counts[old] == 1:
                del self.counts[old]
            else:
                self.counts[old] -= 1
        self.window.append(token)
        self.counts[token] = self.counts.get(token, 0) + 1

    def apply(self, logits: np.ndarray) -> None:
        """Penalise ``logits`` (one row, float32) in place."""
        if not self.counts:
            return
        ids = np.fromiter(self.counts, dtype=np.int64, count=len(self.counts))
        n = np.fromiter(self.counts.values(), dtype=np.float32, count=len(self.counts))
        v = logits[ids]
        if self.repeat:
            v = np.where(v <= 0, v * self.repeat, v / self.repeat)
        else:   # a penalty of 0: llama.cpp's division gives +inf, without numpy's divide-by-zero warning
            v = np.where(v <= 0, v * self.repeat, np.float32(np.inf))
        logits[ids] = v - (n * self.frequency + self.presence)   # every count here is at least 1


def penalties(n_ctx: int = 4096, **opts) -> Penalties | None:
    """The :class:`Penalties` for these sampling options, or None when they
    penalise nothing."""
    o = {**DEFAULTS, **opts}
    if (o["repeat_penalty"] == 1.0 and not o["frequency_penalty"] and not o["presence_penalty"]) \
            or not o["repeat_last_n"]:
        return None
    last_n = n_ctx if o["repeat_last_n"] < 0 else o["repeat_last_n"]
    return Penalties(last_n, o["repeat_penalty"], o["frequency_penalty"], o["presence_penalty"])


def takes_largest(bias: dict[int, float] | None = None, **opts) -> bool:
    """Whether the chain :func:`sampler_chain` builds for these options
    takes the largest logit, apart from banned tokens: greedy, no DRY, no
    bias. The scheduler then takes it with numpy's argmax (the first of
    equal logits, as llama.cpp's greedy sampler does) and skips the chain,
    which copies every logit into a candidate array first (on SmolLM2's
    49,152-token vocabulary about 20 us a token less between decodes, a
    2-core AMD EPYC). Only where argmax lands on a banned token does the
    chain draw."""
    o = {**DEFAULTS, **opts}
    temperature = o["temperature"]
    return (temperature is None or temperature <= 0) and not o["dry_multiplier"] > 0 and not bias


def sampler_chain(seed: int, *, n_vocab: int = 0, vocab=None, n_ctx: int = 4096,
                  banned: tuple[int, ...] = (), bias: dict[int, float] | None = None, **opts):
    """llama.cpp's native sampler chain; greedy when temperature <= 0.

    Order as in llama.cpp's own: (penalties: :func:`penalties`, applied to
    the logits before the chain runs), DRY, top-k, top-p, min-p, infill,
    temperature, then the draw. ``banned`` tokens are never drawn, and
    ``bias`` is added to its tokens' logits (a logit bias, first in the
    chain). A grammar is not part of the
    chain: see :class:`edgeinfer.grammar.GrammarGate`."""
    import llama_cpp as lc  # here, so that checking options (the catalog does) needs no libllama

    o = {**DEFAULTS, **opts}
    chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
    add = lambda s: lc.llama_sampler_chain_add(chain, s)  # noqa: E731
    pairs = {**(bias or {}), **{t: float("-inf") for t in banned}}
    if pairs:
        biases = (lc.llama_logit_bias * len(pairs))(*pairs.items())
        add(lc.llama_sampler_init_logit_bias(n_vocab, len(pairs), biases))
    if o["dry_multiplier"] > 0 and vocab is not None:
        breakers = (ctypes.c_char_p * len(DRY_BREAKERS))(*(b.encode() for b in DRY_BREAKERS))
        last_n = n_ctx if o["dry_last_n"] < 0 else o["dry_last_n"]
        add(lc.llama_sampler_init_dry(vocab, o["dry_multiplier"], o["dry_base"], o["dry_allowed_length"],
                                      last_n, breakers, len(DRY_BREAKERS)))
    temperature = o["temperature"]
    if temperature is None or temperature <= 0:
        add(lc.llama_sampler_init_greedy())
        return chain
    if o["top_k"] and o["top_k"] > 0:
        add(lc.llama_sampler_init_top_k(int(o["top_k"])))
    if o["top_p"] is not None and 0 < o["top_p"] < 1:
        add(lc.llama_sampler_init_top_p(float(o["top_p"]), 1))
    if o["min_p"] and o["min_p"] > 0:
        add(lc.llama_sampler_init_min_p(float(o["min_p"]), 1))
    if o["infill"] and vocab is not None and lc.llama_vocab_eot(vocab) >= 0:
        # Ends the answer where ending is likelier than all else together,
        # and merges candidates that are prefixes of one another. Where
        # nothing else is left it draws the end-of-text token, so a
        # vocabulary without one does not get it.
        add(lc.llama_sampler_init_infill(vocab))
    add(lc.llama_sampler_init_temp(float(temperature)))
    # 0xFFFFFFFF is LLAMA_DEFAULT_SEED ("pick one at random"): fold every
    # seed below it so that each one reproduces.
    add(lc.llama_sampler_init_dist(seed % 0xFFFFFFFF))
    return chain


def token_logprobs(logits: np.ndarray, tok: int, top: int, vocab) -> dict:
    """The log-probability entry (OpenAI's shape) of ``tok`` drawn from
    ``logits`` (one row, after the repetition penalties): its log of the
    softmax, and the ``top`` likeliest tokens' with theirs. About 0.3 ms a
    token with a 150k vocabulary, paid only by requests that ask."""
    m = float(logits.max())
    lse = m + math.log(float(np.exp(logits - m).sum()))

    def entry(t: int) -> dict:
        piece = vocab.token_bytes(t)
        return {"token": piece.decode("utf-8", "backslashreplace"), "bytes": list(piece),
                "logprob": max(float(logits[t]) - lse, -9999.0)}

    out = entry(tok)
    alts = []
    if top > 0:
        ids = np.argpartition(-logits, top)[:top] if top < len(logits) else np.arange(len(logits))
        alts = [entry(int(t)) for t in ids[np.argsort(-logits[ids], kind="stable")]]
    out["top_logprobs"] = alts
    return out


REPEAT_MAX_PERIOD = 64   # the longest span that counts as one unit of a loop
REPEAT_MIN_RUN = 32      # tokens of exact repetition before a loop is called


def free_chain(chain) -> None:
    """Free a chain made by :func:`sampler_chain`."""
    import llama_cpp as lc

    lc.llama_sampler_free(chain)


def repeating(tokens: list[int]) -> int:
    """The period of a loop the tail of ``tokens`` is stuck in, else 0.

    A stream is stuck when its last ``max(32, 4p)`` tokens each equal the
    token ``p`` before them, for some span of ``p <= 64`` tokens: the same
    span five or more times in a row (one token 33 times, an 8-token
    phrase 5 times, a 64-token paragraph 5 times). Ordinary text, lists
    and code repeat less exactly than that."""
    n = len(tokens)
    for p in range(1, REPEAT_MAX_PERIOD + 1):
        run = max(REPEAT_MIN_RUN, 4 * p)
        if n < run + p:
            break
        if tokens[n - run:] == tokens[n - run - p:n - p]:
            return p
    return 0


class StopMatcher:
    """Holds back text that might be the start of a stop string."""

    def __init__(self, stops: Iterable[str]):
        self.stops = [s for s in stops if s]
        self.keep = max((len(s) for s in self.stops), default=1) - 1
        self.pending = ""
        self.hit: str | None = None   # the stop string that ended the text

    def feed(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to emit, stopped)."""
        self.pending += text
        if not self.stops:
            out, self.pending = self.pending, ""
            return out, False
        hits = [(i, s) for s in self.stops if (i := self.pending.find(s)) >= 0]
        if hits:
            i, self.hit = min(hits)
            out, self.pending = self.pending[:i], ""
            return out, True
        cut = max(0, len(self.pending) - self.keep)
        # keep back only a tail that is a prefix of some stop string
        while cut < len(self.pending) and not any(s.startswith(self.pending[cut:]) for s in self.stops):
            cut += 1
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out
