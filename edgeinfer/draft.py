"""A draft model for speculative decoding: a smaller model with the
target's vocabulary proposes the next few tokens, greedily, and the target
checks them in one step (edgeinfer.speculative says why the answer keeps
the target's distribution).

The draft is an Engine of its own (self-tested, memory-checked, with a KV
cache holding the same sequences as the target's), but it never runs a
scheduler of its own: the target's scheduler thread drives its context
between steps, so the two models never compute at the same time.
"""

from __future__ import annotations

import llama_cpp as lc
import numpy as np

from .errors import VocabularyMismatchError

MAX_VOCAB_DIFFERENCE = 128   # padding rows some conversions add; llama.cpp's own tolerance


def check_vocab(target, draft) -> None:
    """Raise VocabularyMismatchError unless every token id means the same
    text to both models (a vocabulary a few padding entries longer is fine:
    the draft never proposes an id the target lacks)."""
    if abs(target.n_vocab - draft.n_vocab) > MAX_VOCAB_DIFFERENCE:
        raise VocabularyMismatchError(
            f"{draft.name} has {draft.n_vocab:,} tokens and {target.name} {target.n_vocab:,}: "
            "a draft model must share the target's vocabulary")
    for what, fn in (("BOS", lc.llama_vocab_bos), ("EOS", lc.llama_vocab_eos)):
        if fn(target._vocab) != fn(draft._vocab):
            raise VocabularyMismatchError(f"{draft.name} and {target.name} have different {what} tokens")
    for t in range(min(target.n_vocab, draft.n_vocab)):
        if target.token_bytes(t, special=True) != draft.token_bytes(t, special=True):
            raise VocabularyMismatchError(
                f"token {t} is {target.token_text(t)!r} to {target.name} and {draft.token_text(t)!r} "
                f"to {draft.name}: a draft model must share the target's vocabulary")


class DraftModel:
    """Proposes tokens for the sequences of one target engine."""

    def __init__(self, target, model, **load):
        from . import resolve_model
        from .engine import Engine

        path, manifest = resolve_model(model)
        self.engine = Engine(path, n_ctx=target.n_ctx, n_seq_max=target.n_seq_max, threads=target.threads,
                             threads_batch=target.threads_batch, kv_type=target.kv_type, prompt_cache=False,
                             speculative="off", name=manifest.ref if manifest else None,
                             sha256=manifest.sha256 if manifest else None, **load)
        try:
            check_vocab(target, self.engine)
        except BaseException:
            self.engine.close()
            raise
        self.name = self.engine.name
        self.n_vocab = min(target.n_vocab, self.engine.n_vocab)

    def propose(self, seq: int, history: list[int], k: int) -> list[int]:
        """``k`` greedy tokens to follow ``history`` in sequence ``seq``. The
        draft's KV cache keeps what it shares with the history (the accepted
        part of its last draft included) and evaluates only the rest."""
        e = self.engine
        kv = e._kv_tokens[seq]
        n = 0
        for a, b in zip(kv, history):
            if a != b:
                break
            n += 1
        n = min(n, len(history) - 1)           # the last token is evaluated again for its logits
        if e._kv_truncate(seq, n) != n:
            e._kv_clear(seq)
            n = 0
        out: list[int] = []
        todo = history[n:]
        for _ in range(k):
            if e._decode(todo, seq) != 0:
                break
            logits = np.ctypeslib.as_array(lc.llama_get_logits_ith(e._ctx, -1), shape=(e.n_vocab,))
            tok = int(logits[:self.n_vocab].argmax())
            if e.is_eog(tok):
                break
            out.append(tok)
            todo = [tok]
        return out

    def forget(self, seq: int) -> None:
        self.engine._kv_clear(seq)

    def close(self) -> None:
        self.engine.close()
