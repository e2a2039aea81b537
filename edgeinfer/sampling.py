"""Sampling in llama.cpp's own sampler chain, and stop strings."""

from __future__ import annotations

from typing import Iterable

import llama_cpp as lc


def sampler_chain(seed: int, temperature: float, top_k: int, top_p: float,
                  min_p: float, repeat_penalty: float, repeat_last_n: int):
    """llama.cpp's native sampler chain; greedy when temperature <= 0."""
    chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
    add = lambda s: lc.llama_sampler_chain_add(chain, s)  # noqa: E731
    if repeat_penalty and repeat_penalty != 1.0:
        add(lc.llama_sampler_init_penalties(repeat_last_n, repeat_penalty, 0.0, 0.0))
    if temperature is None or temperature <= 0:
        add(lc.llama_sampler_init_greedy())
        return chain
    if top_k and top_k > 0:
        add(lc.llama_sampler_init_top_k(int(top_k)))
    if top_p is not None and 0 < top_p < 1:
        add(lc.llama_sampler_init_top_p(float(top_p), 1))
    if min_p and min_p > 0:
        add(lc.llama_sampler_init_min_p(float(min_p), 1))
    add(lc.llama_sampler_init_temp(float(temperature)))
    # 0xFFFFFFFF is LLAMA_DEFAULT_SEED ("pick one at random"): fold every
    # seed below it so that each one reproduces.
    add(lc.llama_sampler_init_dist(seed % 0xFFFFFFFF))
    return chain


class StopMatcher:
    """Holds back text that might be the start of a stop string."""

    def __init__(self, stops: Iterable[str]):
        self.stops = [s for s in stops if s]
        self.keep = max((len(s) for s in self.stops), default=1) - 1
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to emit, stopped)."""
        self.pending += text
        if not self.stops:
            out, self.pending = self.pending, ""
            return out, False
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[:min(hits)], ""
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
