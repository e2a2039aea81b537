"""The KV ledger: which tokens each sequence of a context holds.

llama.cpp keeps the KV cells; the ledger keeps, per sequence, the tokens
whose state those cells hold, so a new request can reuse the longest
prefix it shares with what is already there. Its one invariant, "the
ledger's tokens of ``seq`` are positions 0.. of ``seq`` in llama.cpp", is
kept here and nowhere else: every change to a sequence's cells goes
through a method of the ledger, and after a failed or aborted decode
:meth:`resync` trusts llama.cpp's positions.

The scheduler owns the target's ledger and calls it on its own thread; a
draft model's context has a ledger of its own.
"""

from __future__ import annotations

from .llama import DECODE_OK
from .prompt_cache import common_prefix


class KVLedger:
    """The tokens each sequence of ``ctx`` holds, and the operations on them."""

    def __init__(self, ctx, *, reuse: bool = True, prompt_cache=None):
        """``reuse``: False makes every request prefill from scratch (no
        prefix is kept or shared); ``prompt_cache``: a PromptCache to look
        in and fill, or None."""
        self.ctx = ctx
        self.n_seq = ctx.n_seq_max
        self.reuse = reuse
        self.prompt_cache = prompt_cache
        self._tokens: dict[int, list[int]] = {s: [] for s in range(self.n_seq)}

    # -- reading ----------------------------------------------------------------
    def tokens(self, seq: int) -> list[int]:
        """The tokens ``seq`` holds (the ledger's own list: do not change it)."""
        return self._tokens[seq]

    def length(self, seq: int) -> int:
        return len(self._tokens[seq])

    def mismatches(self) -> dict[int, tuple[int, int]]:
        """Sequences whose ledger disagrees with llama.cpp's positions:
        seq → (tokens recorded, positions llama.cpp holds). Empty when the
        invariant holds (the scheduler checks it after every step when
        EDGEINFER_CHECKS=1, as the tests run)."""
        out = {}
        for s, toks in self._tokens.items():
            held = self.ctx.seq_pos_max(s) + 1
            if held != len(toks):
                out[s] = (len(toks), held)
        return out

    def cells_used(self) -> int:
        """Cells the sequences hold (a shared prefix counts once per sequence)."""
        return sum(len(t) for t in self._tokens.values())

    # -- changing ---------------------------------------------------------------
    def extend(self, seq: int, tokens) -> None:
        """Record that a decode put ``tokens`` after what ``seq`` held."""
        self._tokens[seq].extend(tokens)

    def append(self, seq: int, token: int) -> None:
        self._tokens[seq].append(token)

    def clear(self, seq: int) -> None:
        self.ctx.seq_rm(seq)
        self._tokens[seq].clear()

    def truncate(self, seq: int, n: int) -> int:
        """Keep only the first ``n`` positions of ``seq``; returns how many
        it now holds (0 if llama.cpp could not cut the sequence)."""
        if n < len(self._tokens[seq]):
            if not self.ctx.seq_rm(seq, n, -1):
                self.clear(seq)
                return 0
            del self._tokens[seq][n:]
        return len(self._tokens[seq])

    def drop_after(self, seq: int) -> None:
        """Remove the cells a batch left past what the ledger records for
        ``seq`` (an aborted step, or draft tokens the target refused)."""
        self.ctx.seq_rm(seq, len(self._tokens[seq]), -1)

    def resync(self, seq: int) -> None:
        """After an aborted or failed decode, trust llama.cpp's positions."""
        pos_max = self.ctx.seq_pos_max(seq)
        del self._tokens[seq][max(pos_max + 1, 0):]

    def save(self, seq: int) -> bytearray:
        """The KV state of ``seq`` (what :meth:`restore` takes back)."""
        return self.ctx.seq_state(seq)

    def restore(self, seq: int, state, tokens: list[int]) -> bool:
        """Load a state saved for ``tokens`` into ``seq``; False (and ``seq``
        empty) when llama.cpp refuses it or it does not hold ``tokens``."""
        self.clear(seq)
        if not self.ctx.set_seq_state(seq, state) or self.ctx.seq_pos_max(seq) != len(tokens) - 1:
            self.clear(seq)
            return False
        self._tokens[seq][:] = tokens
        return True

    def evaluate(self, seq: int, tokens: list[int], logits_last: bool = True) -> int:
        """Decode ``tokens`` after what ``seq`` holds, in n_batch chunks, on
        the context's own batch; the last row gets logits if asked. Returns
        DECODE_OK, or llama.cpp's status when a chunk failed (2: aborted),
        with the ledger resynced to what llama.cpp kept."""
        ctx = self.ctx
        b, n_batch = ctx.batch, ctx.n_batch
        held = self._tokens[seq]
        for start in range(0, len(tokens), n_batch):
            chunk = tokens[start:start + n_batch]
            last = logits_last and start + len(chunk) == len(tokens)
            b.clear()
            pos0 = len(held)
            for i, t in enumerate(chunk):
                b.add(t, pos0 + i, seq, last and i == len(chunk) - 1)
            rc = ctx.decode(b)
            if rc != DECODE_OK:
                self.resync(seq)
                return rc
            held.extend(chunk)
        return DECODE_OK

    # -- prefix reuse (on the scheduler's thread) -------------------------------
    def choose_slot(self, tokens: list[int], free: list[int], idle_since: dict[int, float]) -> int:
        """The free sequence slot for ``tokens``: the one whose own KV
        shares the longest prefix with them, else an empty one, else the
        one idle longest."""
        return max(free, key=lambda s: (common_prefix(self._tokens[s], tokens) if self.reuse else 0,
                                        not self._tokens[s], -idle_since.get(s, 0.0)))

    def reuse_prefix(self, tokens: list[int], seq: int, idle: tuple[int, ...] = ()) -> int:
        """Make ``seq`` hold the longest reusable prefix of ``tokens``: its
        own KV, another sequence's (copied by llama_memory_seq_cp, which
        shares the cells), or the prompt cache's memory and disk tiers.
        Returns its length.

        Two prompt tokens are left to evaluate (one if there is only one),
        so the sampler gets logits and no prompt token's KV comes from a
        one-token decode: llama.cpp stores a token decoded alone with other
        float rounding than one in a batch of two or more, and the tokens
        after it would see the difference; how a batch is chunked does not
        matter. ``idle``: sequences that hold nothing anyone is using; they
        are cleared before a prompt-cache entry is restored, so on an
        otherwise empty cache it lands on cell 0 as a cold prefill does
        (where a sequence starts changes the order of its attention sums)."""
        if not self.reuse:
            self.clear(seq)
            return 0
        cap = max(0, len(tokens) - 2)
        n = min(common_prefix(self._tokens[seq], tokens), cap)
        donor, k = -1, n
        for s in range(self.n_seq):
            if s != seq:
                shared = min(common_prefix(self._tokens[s], tokens), cap)
                if shared > k:
                    donor, k = s, shared
        if donor >= 0:
            self.clear(seq)
            self.ctx.seq_cp(donor, seq, 0, k)
            self._tokens[seq][:] = tokens[:k]
            n = k
        if self.prompt_cache is not None:
            hit = self.prompt_cache.nearest(tokens, at_least=n)
            if hit is not None:
                k, entry = hit
                k = min(k, cap)
                if k > n:
                    for s in idle:
                        if s != seq:
                            self.clear(s)
                    if self.restore(seq, entry.state, list(entry.tokens)):
                        n = k
                    else:
                        self.prompt_cache.forget(entry.tokens)
                        n = 0
        return self.truncate(seq, n)

    def reuse_whole(self, tokens: list[int], seq: int, idle: tuple[int, ...] = ()) -> bytes | None:
        """Make ``seq`` hold all of ``tokens`` when the prompt cache kept
        exactly this prompt with the logits its last token gave; returns
        those logits (float32 bytes), or None (``seq`` untouched) when it
        did not. The KV comes from ``seq`` itself, another sequence or the
        cache, as in :meth:`reuse_prefix`. Nothing is evaluated again, so
        no prompt token's KV comes from a one-token decode, and the first
        token drawn from these logits is the one a cold prefill draws."""
        if not self.reuse or self.prompt_cache is None or not tokens:
            return None
        entry = self.prompt_cache.exact(tokens)
        if entry is None:
            return None
        n = len(tokens)
        if common_prefix(self._tokens[seq], tokens) == n:
            self.truncate(seq, n)
            return entry.logits
        donor = next((s for s in range(self.n_seq) if s != seq and common_prefix(self._tokens[s], tokens) == n), -1)
        if donor >= 0:
            self.clear(seq)
            self.ctx.seq_cp(donor, seq, 0, n)
            self._tokens[seq][:] = tokens
            return entry.logits
        for s in idle:
            if s != seq:
                self.clear(s)
        if self.restore(seq, entry.state, list(tokens)):
            return entry.logits
        self.prompt_cache.forget(entry.tokens)
        return None

    def sync_to(self, seq: int, history: list[int]) -> int:
        """Keep the part of ``seq`` that ``history`` starts with, all but its
        last token (evaluated again for its logits); returns its length."""
        n = min(common_prefix(self._tokens[seq], history), len(history) - 1)
        if self.truncate(seq, n) != n:
            self.clear(seq)
            return 0
        return n
