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
temperature, and at temperature 0 it is the same text, token for token.
"""

from __future__ import annotations

from dataclasses import dataclass

MODES = ("auto", "off", "lookup")


@dataclass(frozen=True)
class SpecConfig:
    """How drafts are made and when they are tried.

    ``ngram``: the longest suffix looked up (shorter ones down to
    ``min_ngram`` are tried when it is not found); ``max_draft``: the most
    tokens drafted at once; ``min_draft``: a shorter draft is not worth a
    wider step and is dropped."""

    mode: str = "auto"
    ngram: int = 3
    min_ngram: int = 2
    max_draft: int = 8
    min_draft: int = 2

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"speculative must be one of {', '.join(MODES)}, not {self.mode!r}")
        if not 1 <= self.min_ngram <= self.ngram <= 16:
            raise ValueError("speculative n-gram sizes must satisfy 1 <= min_ngram <= ngram <= 16")
        if not 1 <= self.min_draft <= self.max_draft <= 64:
            raise ValueError("draft lengths must satisfy 1 <= min_draft <= max_draft <= 64")


class NgramIndex:
    """Where each n-gram of a token history last ended, for n in
    min_ngram..ngram, kept up to date as tokens are appended."""

    def __init__(self, tokens: list[int], ngram: int, min_ngram: int):
        self.tokens: list[int] = []
        self.sizes = range(ngram, min_ngram - 1, -1)
        self.last: dict[tuple, int] = {}    # n-gram → end index of its latest occurrence
        self.prev: dict[tuple, int] = {}    # n-gram → end index of the one before that
        self.extend(tokens)

    def extend(self, tokens) -> None:
        for t in tokens:
            self.tokens.append(t)
            end = len(self.tokens)
            for n in self.sizes:
                if end >= n:
                    key = tuple(self.tokens[end - n:end])
                    if key in self.last:
                        self.prev[key] = self.last[key]
                    self.last[key] = end

    def draft(self, k: int) -> list[int]:
        """``k`` tokens that followed the longest suffix of the history found
        earlier in it; [] when none is. Where the earlier occurrence is
        close enough that its continuation runs into the present, the text
        is in a loop of that period, and the draft goes on round it."""
        end = len(self.tokens)
        for n in self.sizes:
            if end < n + 1:
                continue
            key = tuple(self.tokens[end - n:end])
            at = self.prev.get(key) if self.last.get(key) == end else self.last.get(key)
            if at is not None and at < end:
                period = end - at
                return [self.tokens[at + i % period] for i in range(k)]
        return []


class Backoff:
    """Per-sequence: stop drafting after drafts keep failing, and try again
    now and then (the text may reach a part that repeats its input)."""

    FAILS = 3          # drafts in a row with nothing kept
    PAUSE = 16         # tokens decoded plainly before drafting again

    def __init__(self):
        self.fails = 0
        self.paused = 0

    def allow(self) -> bool:
        if self.paused > 0:
            self.paused -= 1
            return False
        return True

    def record(self, drafted: int, kept: int) -> None:
        if kept == 0:
            self.fails += 1
            if self.fails >= self.FAILS:
                self.paused, self.fails = self.PAUSE, 0
        else:
            self.fails = 0
