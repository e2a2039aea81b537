"""Speculative decoding: draft tokens that the target model verifies in one
batch.

On a CPU one decode step reads every weight to make one token; a step of
1 + k tokens reads them once for all of them, so it costs far less than
k + 1 steps. A draft of k tokens is guessed cheaply, the target evaluates
the last token and the draft together, and every draft token that the
target itself would have produced is kept.

Drafts come from the text itself (prompt lookup): the last few tokens are
looked up earlier in the prompt and the answer, and what followed them
there is the draft. Editing code, summarising and answering from a pasted
document repeat long spans of their input, and then most of a draft holds.

Correctness. At each position the target's own token is drawn from its
own distribution, exactly as without speculation, and a draft token is
kept only when it equals the token drawn. A draft is a fixed guess (a
one-point proposal), and for such a proposal this is the standard
speculative-sampling rule: the guess is kept with probability p(guess),
and otherwise the token comes from p with the guess removed and
renormalised. So the output has the target's distribution at any
temperature. At temperature 0 it is the plain answer wherever the logits
are the same; a wider step rounds them a little differently, which on
real models can flip a near-tie (docs/python-api.md, "Speculative
decoding").
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

from .errors import SpeculativeError

MODES = ("auto", "off", "lookup", "draft")
PROBE_EVERY = 16   # auto: tokens decoded plainly before a short draft tests the water again
PROBE_MOST = 256   # ... and the longest wait, reached by quadrupling it after each probe that fails
PROBE_GROWTH = 4


@dataclass(frozen=True)
class SpecConfig:
    """How drafts are made and when they are tried: ``mode`` "auto"
    (lookup drafts as far as they pay), "lookup" (always), "draft" (from a
    draft model, ``draft_tokens`` at a time) or "off".

    ``ngram``: the longest suffix looked up (shorter ones down to
    ``min_ngram`` are tried when it is not found); ``max_draft``: the most
    tokens drafted at once; ``min_draft``: a shorter draft is not worth a
    wider step and is dropped."""

    mode: str = "auto"
    ngram: int = 3
    min_ngram: int = 2
    max_draft: int = 8
    min_draft: int = 2
    draft_tokens: int = 4     # tokens a draft model proposes at a time

    def __post_init__(self):
        if self.mode not in MODES:
            raise SpeculativeError(f"speculative must be one of {', '.join(MODES)}, not {self.mode!r}")
        if not 1 <= self.min_ngram <= self.ngram <= 16:
            raise SpeculativeError("speculative n-gram sizes must satisfy 1 <= min_ngram <= ngram <= 16")
        if not 1 <= self.min_draft <= self.max_draft <= 64:
            raise SpeculativeError("draft lengths must satisfy 1 <= min_draft <= max_draft <= 64")


class NgramIndex:
    """Where each n-gram of a token history last ended, for n in
    min_ngram..ngram, kept up to date as tokens are appended."""

    def __init__(self, tokens: list[int], ngram: int, min_ngram: int):
        self.tokens: list[int] = list(tokens)
        self.sizes = range(ngram, min_ngram - 1, -1)
        self.last: dict[tuple, int] = {}    # n-gram → end index of its latest occurrence
        self.prev: dict[tuple, int] = {}    # n-gram → end index of the one before that
        self.source: tuple[int, int] | None = None   # (where the last draft came from, history length then)
        # Indexing a long prompt takes about a millisecond per thousand
        # tokens: done at the first draft, after the first token is out,
        # and never for a request that is not drafted for.
        self.indexed = 0

    def extend(self, tokens) -> None:
        self.tokens.extend(tokens)

    def _index(self) -> None:
        toks, last, prev = self.tokens, self.last, self.prev
        for end in range(self.indexed + 1, len(toks) + 1):
            for n in self.sizes:
                if end >= n:
                    key = tuple(toks[end - n:end])
                    if key in last:
                        prev[key] = last[key]
                    last[key] = end
        self.indexed = len(toks)

    def draft(self, k: int) -> list[int]:
        """``k`` tokens that followed the longest suffix of the history found
        earlier in it; [] when none is. Where the earlier occurrence is
        close enough that its continuation runs into the present, the text
        is in a loop of that period, and the draft goes on round it."""
        if self.indexed < len(self.tokens):
            self._index()
        end = len(self.tokens)
        for n in self.sizes:
            if end < n + 1:
                continue
            key = tuple(self.tokens[end - n:end])
            at = self._following(key, n, end)
            if at is None:
                at = self.prev.get(key) if self.last.get(key) == end else self.last.get(key)
            if at is not None and at < end:
                self.source = (at, end)
                period = end - at
                return [self.tokens[at + i % period] for i in range(k)]
        return []

    def _following(self, key: tuple, n: int, end: int) -> int | None:
        """Where the text being copied has got to: the place after the last
        draft's source, moved on by what was written since, if the suffix
        matches there too. A copy of a long passage (code being edited)
        repeats lines that occur elsewhere as well; the latest occurrence
        of a suffix is then often another line, and the copy's own place
        the right one."""
        if self.source is None:
            return None
        at = self.source[0] + (end - self.source[1])
        if n <= at < end and tuple(self.tokens[at - n:at]) == key:
            return at
        return None


# -- what a wider step costs on this machine --------------------------------
WIDTHS = (1, 2, 3, 5, 9)


def measure_step_costs(ctx, ledger, widths=WIDTHS, context: int = 128, reps: int = 5) -> dict[int, float]:
    """Seconds per decode step of one sequence evaluating ``w`` tokens with
    logits at every row (a pending token and a draft of w - 1), after a
    ``context``-token prompt; the median of ``reps`` after a warm-up.
    ``ctx`` and ``ledger``: a llama.Context and its KV ledger, on the
    thread that drives them, while nothing else runs on them."""
    ids = ctx.vocab.plain_tokens()
    seq = 0
    ledger.clear(seq)
    if ledger.evaluate(seq, ctx.vocab.spread(context)) != 0:
        raise RuntimeError("cancelled")
    b = ctx.batch
    out = {}
    for w in widths:
        times = []
        for rep in range(reps + 1):
            b.clear()
            for i in range(w):
                b.add(ids[(rep * 31 + i) % len(ids)], context + i, seq, True)
            t0 = time.perf_counter()
            if ctx.decode(b) != 0:
                raise RuntimeError("decode failed")
            times.append(time.perf_counter() - t0)
            ledger.drop_after(seq)
        out[w] = statistics.median(times[1:])
    ledger.clear(seq)
    return out


def relative_costs(seconds: dict[int, float]) -> dict[int, float]:
    """Each width's step time over a one-token step's, interpolated for
    every width up to the widest measured."""
    base = seconds[1]
    known = sorted(seconds)
    out = {}
    for w in range(1, known[-1] + 1):
        lo = max(k for k in known if k <= w)
        hi = min(k for k in known if k >= w)
        if lo == hi:
            out[w] = seconds[lo] / base
        else:
            f = (w - lo) / (hi - lo)
            out[w] = (seconds[lo] + f * (seconds[hi] - seconds[lo])) / base
    return out


def cost_at(costs: dict[int, float], w: int) -> float:
    """The relative cost of a step of width ``w``: from ``costs`` (every
    width from 1 up to its widest), and past the widest its last slope
    goes on."""
    widest = max(costs)
    if w <= widest:
        return costs[w]
    return costs[widest] + (w - widest) * (costs[widest] - costs.get(widest - 1, 1.0))


class StepTimes:
    """How long this scheduler's decode steps of each width took (tokens in
    the step), as they ran. The costs measured at load come from one
    sequence after a short prompt; a real step carries several sequences,
    longer contexts and every row's sampling, so what it costs is learnt
    here and preferred where it is known."""

    WEIGHT = 0.2
    ENOUGH = 4      # steps of a width before its own time is trusted

    def __init__(self):
        self.seconds: dict[int, float] = {}
        self.count: dict[int, int] = {}

    def record(self, width: int, seconds: float) -> None:
        old = self.seconds.get(width)
        self.seconds[width] = seconds if old is None else (1 - self.WEIGHT) * old + self.WEIGHT * seconds
        self.count[width] = self.count.get(width, 0) + 1

    def blend(self, measured: dict[int, float] | None) -> dict[int, float] | None:
        """Relative step costs by width: the times seen where a width ran
        often enough, elsewhere the ``measured`` shape scaled to them."""
        if not measured:
            return None
        known = {w: t for w, t in self.seconds.items() if self.count[w] >= self.ENOUGH}
        if not known:
            return measured
        widest = max(measured)

        def shape(w: int) -> float:
            return cost_at(measured, w)

        widths = sorted(known)

        def seconds(w: int) -> float:
            if w in known:
                return known[w]
            lo = max((k for k in widths if k < w), default=None)
            hi = min((k for k in widths if k > w), default=None)
            if lo is not None and hi is not None:   # between two seen widths: a straight line
                return known[lo] + (w - lo) / (hi - lo) * (known[hi] - known[lo])
            near = lo if lo is not None else hi     # beyond them: the measured shape from the nearest
            return known[near] * shape(w) / shape(near)

        out = {w: seconds(w) for w in range(1, max(widest, widths[-1]) + 1)}
        base = out[1]
        return {w: t / base for w, t in out.items()}


def best_draft(costs: dict[int, float], accept: float, available: int, others: int = 0,
               margin: float = 0.05) -> int:
    """The draft length that makes the most tokens per unit of time, given
    the chance ``accept`` that each draft token is kept, what a step of
    each width costs, and ``others`` tokens of other sequences in the same
    step; 0 when no length beats plain decoding by ``margin``.

    A draft of k tokens yields (1 - a^(k+1)) / (1 - a) tokens for its
    sequence, and widens the step from others + 1 tokens to others + 1 + k."""
    best_k, best = 0, 1.0 + margin
    for k in range(1, available + 1):
        rate = _speed_up(costs, accept, k, others)
        if rate > best:
            best_k, best = k, rate
    return best_k


def could_pay(costs: dict[int, float], least: int, available: int, others: int = 0, margin: float = 0.05) -> bool:
    """Whether a draft of ``least`` to ``available`` tokens would beat
    plain decoding even if every token were kept. Beside other streams on
    a machine where a step costs nearly its width (a 2-core box, a 1.5B
    model, four streams: no draft of two can), auto does not even probe."""
    return any(_speed_up(costs, 1.0, k, others) > 1.0 + margin for k in range(least, available + 1))


def _speed_up(costs: dict[int, float], accept: float, k: int, others: int) -> float:
    """Tokens per unit of time of a step with a k-token draft over a plain
    step's, both with ``others`` tokens of other sequences."""
    a = min(max(accept, 0.0), 0.99)
    tokens = others + (1 - a ** (k + 1)) / (1 - a)
    return tokens / (others + 1) / (cost_at(costs, others + 1 + k) / cost_at(costs, others + 1))


def next_draft(spec: SpecConfig, est: "Estimate | None", ngrams: NgramIndex | None, *, room: int, left: int,
               n_decoding: int, costs: dict[int, float] | None, propose=None) -> list[int]:
    """The draft a decoding sequence verifies after its pending token this
    step: from the draft model (``propose(k)``), or what followed the
    latest earlier occurrence of its last few tokens (``ngrams``), or
    nothing. ``room``: cells left in the context after the pending token;
    ``left``: tokens the request may still make after it. Drafts are
    shared out so that a step with several streams stays about as wide as
    one drafting stream's; auto (``est`` given) drafts only while this
    machine's step ``costs`` and the share kept so far say it pays, and
    otherwise probes now and then."""
    if spec.mode == "draft":
        k = min(spec.draft_tokens, room, left)
        return propose(k) if k >= 1 and propose is not None else []
    k = min(spec.max_draft // max(1, n_decoding), room, left)
    if est is not None:
        available = k
        k = min(k, best_draft(costs, est.accept, k, others=n_decoding - 1)) if costs else 0
        if k < spec.min_draft:
            if not costs or not could_pay(costs, spec.min_draft, available, others=n_decoding - 1):
                return []
            est.idle += 1
            if est.idle < est.wait:
                return []
            k = spec.min_draft
    if k < spec.min_draft or ngrams is None:
        return []
    draft = ngrams.draft(k)
    if est is not None and not draft:
        est.idle += 1
    return draft if len(draft) >= spec.min_draft else []


class Estimate:
    """A sequence's running share of draft tokens kept, for auto: it starts
    hopeful, so that drafting is tried, and follows what happens.

    ``wait`` is how many plain steps pass before a probe while drafts do
    not pay: it grows fourfold after every draft whose kept tokens did not
    make up for the wider step (``extra``: the step's extra time, in the
    tokens a plain step of its sequences makes in that time), so that
    where drafts seldom pay the probes cost next to nothing, and falls
    back when one pays. (Doubling it probed four times in a 256-token
    answer; on a machine where a three-token step costs 2.3 one-token
    steps, that cost about 2 % of decode speed where no draft is kept.)"""

    PRIOR = 0.6
    WEIGHT = 0.3

    def __init__(self):
        self.accept = self.PRIOR
        self.idle = 0
        self.wait = PROBE_EVERY

    def record(self, drafted: int, kept: int, extra: float = 0.0) -> None:
        self.accept = (1 - self.WEIGHT) * self.accept + self.WEIGHT * (kept / drafted)
        self.idle = 0
        paid = kept > 0 and kept >= extra
        self.wait = PROBE_EVERY if paid else min(PROBE_GROWTH * self.wait, PROBE_MOST)


def _costs_path(engine):
    from . import hardware
    from .tuning import profiles_dir

    if not engine.sha256:
        return None
    return profiles_dir() / f"steps-{hardware.fingerprint()}-{engine.sha256[:16]}-t{engine.threads_batch}.json"


def step_costs_for(engine, remeasure: bool = False) -> dict[int, float]:
    """This machine's relative step costs for the engine's model and
    threads: remembered from an earlier measurement (edgeinfer tune, or the
    first load with speculative auto), else measured now (well under a
    second for a small model, a few seconds for a 1.5B one) and kept.
    ``engine``: anything with ``name``, ``sha256``, ``threads_batch`` and
    ``measure_step_costs()`` (seconds by width)."""
    import json
    import os

    path = _costs_path(engine)
    if path is not None and path.exists() and not remeasure:
        try:
            seconds = {int(k): float(v) for k, v in json.loads(path.read_text())["seconds"].items()}
            if 1 in seconds and len(seconds) > 1:
                return relative_costs(seconds)
        except (OSError, ValueError, KeyError, TypeError):
            pass
    seconds = engine.measure_step_costs()
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"model": engine.name, "threads_batch": engine.threads_batch,
                                       "seconds": seconds, "measured": time.time()}))
            os.replace(tmp, path)
        except OSError:
            pass
    return relative_costs(seconds)
