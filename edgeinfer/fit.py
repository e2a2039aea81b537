"""Will a model fit in memory at a given context? One answer, used by the
pull (which warns) and the engine (which refuses before llama.cpp
allocates anything)."""

from __future__ import annotations

from dataclasses import dataclass

from . import hardware
from .gguf_file import GGUFInfo

DEFAULT_N_CTX = 4096
SMALL_BOX_BYTES = 3 << 30      # a 1 or 2 GB board, or a container held to less than 3 GiB
TINY_BOX_BYTES = 3 << 29       # 1.5 GiB: a 1 GB board


@dataclass(frozen=True)
class BoxProfile:
    """Defaults sized to the machine's memory. On a small box every byte
    of KV cache and every sequence slot is memory the model needs."""

    name: str           # "standard" or "small"
    n_ctx: int          # the default context
    max_parallel: int   # the most sequences decoded together by default
    kv_type: str        # the K cache's type: "f16", or "q8_0" (half the bytes)
    why: str

    def describe(self) -> str:
        if self.name == "standard":
            return f"standard defaults ({self.why}): context {self.n_ctx}, K cache {self.kv_type}"
        return (f"small box ({self.why}): context {self.n_ctx}, at most {self.max_parallel} sequences at once, "
                f"K cache {self.kv_type}")


def box_profile() -> BoxProfile:
    """The defaults for this machine, from its memory (the cgroup limit
    counts: a service held to 1 GB is a 1 GB box)."""
    total = hardware.total_memory()
    why = f"{total / (1 << 30):.1f} GiB of memory"
    if total <= TINY_BOX_BYTES:
        return BoxProfile("small", 1024, 1, "q8_0", why)
    if total <= SMALL_BOX_BYTES:
        return BoxProfile("small", 2048, 2, "q8_0", why)
    return BoxProfile("standard", DEFAULT_N_CTX, 8, "f16", why)


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
