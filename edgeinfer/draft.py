"""A draft model for speculative decoding: a smaller model with the
target's vocabulary proposes the next few tokens, greedily, and the target
checks them in one step (edgeinfer.speculative says why the answer keeps
the target's distribution).

The draft is a llama.cpp context of its own (its file self-tested like
any other) with a KV ledger holding the same sequence slots as the
target's. It has no scheduler: the target's scheduler thread drives it
between steps, so the two models never compute at the same time.
"""

from __future__ import annotations

from pathlib import Path

from .errors import VocabularyMismatchError

MAX_VOCAB_DIFFERENCE = 128   # padding rows some conversions add; llama.cpp's own tolerance


def check_vocab(target, draft, target_name: str, draft_name: str) -> None:
    """Raise VocabularyMismatchError unless every token id means the same
    text to both vocabularies (llama.Vocab; one a few padding entries
    longer is fine: the draft never proposes an id the target lacks)."""
    if abs(target.n_tokens - draft.n_tokens) > MAX_VOCAB_DIFFERENCE:
        raise VocabularyMismatchError(
            f"{draft_name} has {draft.n_tokens:,} tokens and {target_name} {target.n_tokens:,}: "
            "a draft model must share the target's vocabulary")
    for what in ("bos", "eos"):
        if getattr(target, what) != getattr(draft, what):
            raise VocabularyMismatchError(f"{draft_name} and {target_name} have different {what.upper()} tokens")
    for t in range(min(target.n_tokens, draft.n_tokens)):
        if target.token_bytes(t, special=True) != draft.token_bytes(t, special=True):
            raise VocabularyMismatchError(
                f"token {t} is {target.token_text(t)!r} to {target_name} and {draft.token_text(t)!r} "
                f"to {draft_name}: a draft model must share the target's vocabulary")


class DraftModel:
    """Proposes tokens for the sequences of one target context."""

    def __init__(self, name: str, model, ctx, n_vocab: int):
        """``model`` and ``ctx``: the draft's llama.Model and llama.Context,
        which this object now owns; ``n_vocab``: the ids both models share."""
        from .kv import KVLedger

        self.name, self.model, self.ctx = name, model, ctx
        self.ledger = KVLedger(ctx)
        self.n_vocab = n_vocab

    @classmethod
    def open(cls, path: str | Path, *, name: str, sha256: str | None, target_vocab, target_name: str,
             n_ctx: int, n_seq_max: int, threads: int, threads_batch: int, kv_type: str,
             native: str | None = None, mmap: bool = True) -> "DraftModel":
        """Load the draft at ``path`` beside a target: the same context size,
        sequence slots, threads and K cache type; its vocabulary checked
        against the target's."""
        from . import llama, selftest
        from . import native as _native
        from .fit import refusal
        from .gguf_file import read_gguf

        path = Path(path)
        info = read_gguf(path)
        err = refusal(name, info, n_ctx)   # refused before llama.cpp allocates anything, as the target is
        if err is not None:
            raise err
        verdict = selftest.ensure(path, info, sha256=sha256, name=name, forced=_native.forced_setting(native),
                                  threads=threads, threads_batch=threads_batch, mmap=mmap)
        _native.init_backend()
        model = llama.Model(path, _native.ModelParams(verdict.setting, info, mmap=mmap))
        try:
            check_vocab(target_vocab, model.vocab, target_name, name)
            # The draft evaluates a history once, then a token at a time.
            ctx = llama.Context(model, n_ctx=n_ctx, n_batch=512, n_seq_max=n_seq_max,
                                threads=threads, threads_batch=threads_batch, kv_type=kv_type)
        except BaseException:
            model.free()
            raise
        return cls(name, model, ctx, min(target_vocab.n_tokens, model.vocab.n_tokens))

    def propose(self, seq: int, history: list[int], k: int) -> list[int]:
        """``k`` greedy tokens to follow ``history`` in sequence ``seq``. The
        draft's KV cache keeps what it shares with the history (the accepted
        part of its last draft included) and evaluates only the rest."""
        n = self.ledger.sync_to(seq, history)
        out: list[int] = []
        todo = history[n:]
        vocab = self.model.vocab
        for _ in range(k):
            if self.ledger.evaluate(seq, todo) != 0:
                break
            tok = int(self.ctx.logits(-1)[:self.n_vocab].argmax())
            if vocab.is_eog(tok):
                break
            out.append(tok)
            todo = [tok]
        return out

    def forget(self, seq: int) -> None:
        self.ledger.clear(seq)

    def close(self) -> None:
        self.ctx.free()
        self.model.free()
