"""Will a model fit in memory at a given context? One answer, used by the
pull (which warns) and the engine (which refuses before llama.cpp
allocates anything)."""

from __future__ import annotations

from . import hardware
from .gguf_file import GGUFInfo

DEFAULT_N_CTX = 4096


def fit_hint(n_ctx: int) -> str:
    return (f"use a smaller quant (e.g. q4_k_m or q4_0) or a smaller context "
            f"(n_ctx={max(512, n_ctx // 4)})")


def memory_shortfall(info: GGUFInfo, n_ctx: int) -> str | None:
    """What is missing, as a sentence, when weights plus KV cache at
    ``n_ctx`` exceed the memory available now; None when it fits."""
    need = info.memory_estimate(n_ctx)
    have = hardware.available_memory()
    if need <= have:
        return None
    return f"needs about {need / 1e9:.1f} GB at n_ctx={n_ctx}, {have / 1e9:.1f} GB is available"
