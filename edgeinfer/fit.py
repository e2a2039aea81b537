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


MIN_N_CTX = 512


def fit_hint(n_ctx: int) -> str:
    return (f"use a smaller quant (e.g. q4_k_m or q4_0) or a smaller context "
            f"(n_ctx={max(MIN_N_CTX, n_ctx // 4)})")


def largest_context(need_at, n_ctx: int, have: int) -> int | None:
    """The largest power-of-two context from 512 up to ``n_ctx`` whose
    ``need_at(ctx)`` fits in ``have`` bytes; None if not even 512 does."""
    best, ctx = None, MIN_N_CTX
    while ctx <= n_ctx:
        if need_at(ctx) <= have:
            best = ctx
        ctx *= 2
    return best


def smaller_models(have: int, exclude: str = "") -> list:
    """Catalog entries that would run in ``have`` bytes at the default
    context, largest first (the likeliest to answer well)."""
    from . import catalog

    try:
        entries = catalog.load_catalog().values()
    except Exception:
        return []
    fits = [e for e in entries if e.ref != exclude and (e.memory or e.size * 5 // 4) <= have]
    return sorted(fits, key=lambda e: e.memory or e.size, reverse=True)


def advice(name: str, need_at, n_ctx: int, have: int) -> str:
    """What would fit instead, as a hint: a smaller context for this
    model, else smaller catalog models."""
    ctx = largest_context(need_at, n_ctx, have)
    if ctx is not None and ctx < n_ctx:
        return f"it fits with a {ctx}-token context: add --n-ctx {ctx} (n_ctx={ctx} in Python)"
    others = smaller_models(have, exclude=name)[:3]
    if others:
        listed = ", ".join(f"{e.ref} ({(e.memory or e.size) / 1e9:.1f} GB)" for e in others)
        return f"it does not fit at any context; these do: {listed}"
    return "it does not fit at any context, and no catalog model does: free memory, or use a bigger machine"


def memory_shortfall(info: GGUFInfo, n_ctx: int) -> str | None:
    """What is missing, as a sentence, when weights plus KV cache at
    ``n_ctx`` exceed the memory available now; None when it fits."""
    need = info.memory_estimate(n_ctx)
    have = hardware.available_memory()
    if need <= have:
        return None
    return f"needs about {need / 1e9:.1f} GB at n_ctx={n_ctx}, {have / 1e9:.1f} GB is available"


def refusal(name: str, info: GGUFInfo, n_ctx: int):
    """A MemoryFitError for a model that will not fit at ``n_ctx``, naming
    what would; None when it fits."""
    from .errors import MemoryFitError

    short = memory_shortfall(info, n_ctx)
    if short is None:
        return None
    return MemoryFitError(f"{name} {short}", hint=advice(name, info.memory_estimate, n_ctx,
                                                         hardware.available_memory()))


def entry_refusal(entry, n_ctx: int | None = None):
    """The same before a download, from the catalog's figures: the
    weights (the file's size) and what the entry needs at the default
    context, the rest of which grows with the context. ``n_ctx``
    defaults to this machine's (box_profile)."""
    from .errors import MemoryFitError

    n_ctx = n_ctx or box_profile().n_ctx
    have = hardware.available_memory()
    run = entry.memory or entry.size * 5 // 4

    def need_at(ctx: int) -> int:
        return entry.size + (run - entry.size) * ctx // DEFAULT_N_CTX

    if need_at(n_ctx) <= have:
        return None
    return MemoryFitError(
        f"{entry.ref} needs about {need_at(n_ctx) / 1e9:.1f} GB to run at n_ctx={n_ctx} and "
        f"{have / 1e9:.1f} GB is available, so it was not downloaded",
        hint=advice(entry.ref, need_at, n_ctx, have) + "; pull --force downloads it anyway")
