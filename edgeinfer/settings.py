"""What a load will use: context, threads, K cache type, sequences,
speculative decoding, resolved from the user's options and what is known
about the machine and the model, without llama.cpp.

:func:`resolve` is pure: everything it weighs is an argument, so a test
can give it any machine, and ``edgeinfer doctor`` can print what a load
would use. :func:`for_load` gathers the machine's side (memory profile,
tuned threads, busy cores) and calls it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import SpeculativeError
from .fit import BoxProfile
from .speculative import SpecConfig

KV_TYPE_NAMES = ("f16", "q8_0")
DEFAULT_N_BATCH = 512


def default_parallel(n_ctx: int, cores: int) -> int:
    """Sequences to run at once: batching gains flatten past about twice
    the core count, and each sequence should have room for 512 tokens on
    average in the shared context."""
    return max(1, min(8, 2 * max(cores, 1), n_ctx // 512))


@dataclass(frozen=True)
class EngineSettings:
    """The resolved settings of one load; ``threads_source`` says where the
    thread counts came from ("given", "tuned", "default", with a cap for
    a busy box)."""

    n_ctx: int
    n_batch: int
    n_seq_max: int
    kv_type: str
    threads: int
    threads_batch: int
    threads_source: str
    flash_attn: bool
    speculative: SpecConfig
    box: BoxProfile = field(compare=False)

    def describe(self) -> dict:
        return {"n_ctx": self.n_ctx, "n_batch": self.n_batch, "sequences": self.n_seq_max,
                "kv_type": self.kv_type, "threads": self.threads, "threads_batch": self.threads_batch,
                "threads_source": self.threads_source, "flash_attn": self.flash_attn,
                "speculative": self.speculative.mode, "box": self.box.describe()}


def resolve(*, box: BoxProfile, train_ctx: int | None, cores: int, busy: float, usable: int,
            tuned: tuple[int, int] | None = None, n_ctx: int | None = None, threads: int | None = None,
            threads_batch: int | None = None, n_batch: int = DEFAULT_N_BATCH, n_seq_max: int | None = None,
            kv_type: str | None = None, flash_attn: bool = False,
            speculative: "str | SpecConfig | None" = None, has_draft: bool = False) -> EngineSettings:
    """The settings a load uses.

    ``box``: the machine's memory profile (fit.box_profile); ``train_ctx``:
    the model's training context; ``cores``: the default thread count
    (physical cores within affinity and quota); ``busy``: cores other work
    keeps busy now; ``usable``: cores this process may use; ``tuned``: the
    (threads, threads_batch) measured for this model here, if any. The rest
    are the user's options, None meaning "choose"."""
    n_ctx = int(n_ctx) if n_ctx else min(box.n_ctx, train_ctx or box.n_ctx)
    kv_type = kv_type or box.kv_type
    if kv_type not in KV_TYPE_NAMES:
        raise ValueError(f"kv_type must be one of {', '.join(KV_TYPE_NAMES)}, not {kv_type!r}")
    # Threads: what the caller says, else this machine's tuned profile for
    # this model (`edgeinfer tune`), else physical cores.
    source = "given" if (threads or threads_batch) else "default"
    if source != "given" and tuned is not None:
        threads, threads_batch = tuned
        source = "tuned"
    threads = int(threads or cores)
    threads_batch = int(threads_batch or threads)
    if source != "given":
        # A busy box: leave the cores other work holds. llama.cpp's threads
        # meet at a barrier after every graph node, so one preempted thread
        # stalls all of them.
        cap = max(1, min(max(threads, threads_batch), usable - int(busy + 0.5)))
        if cap < max(threads, threads_batch):
            threads, threads_batch = min(threads, cap), min(threads_batch, cap)
            source += f", capped at {cap}: {busy:.1f} cores busy with other work"
    if n_seq_max is None:
        n_seq_max = min(default_parallel(n_ctx, cores), box.max_parallel)
    if speculative is None:   # a draft model given is a choice made
        speculative = "draft" if has_draft else "auto"
    spec = speculative if isinstance(speculative, SpecConfig) else SpecConfig(mode=speculative)
    if spec.mode == "draft" and not has_draft:
        raise SpeculativeError("speculative='draft' needs a draft model")
    return EngineSettings(n_ctx=n_ctx, n_batch=min(int(n_batch), n_ctx), n_seq_max=max(1, int(n_seq_max)),
                          kv_type=kv_type, threads=threads, threads_batch=threads_batch,
                          threads_source=source, flash_attn=bool(flash_attn), speculative=spec, box=box)


def for_load(train_ctx: int | None, sha256: str | None = None, **options) -> EngineSettings:
    """:func:`resolve` with this machine's side read now: its memory
    profile, the thread profile tuned for the model (by ``sha256``), the
    cores other work keeps busy (only sampled when threads are not given)."""
    from . import hardware
    from .fit import box_profile
    from .tuning import load_profile

    given = options.get("threads") or options.get("threads_batch")
    profile = None if given else load_profile(sha256)
    tuned = (profile.threads, profile.threads_batch) if profile is not None else None
    return resolve(box=box_profile(), train_ctx=train_ctx, cores=hardware.default_threads(),
                   busy=0.0 if given else hardware.busy_cores(), usable=hardware.usable_cores(),
                   tuned=tuned, **options)
