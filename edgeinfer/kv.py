"""The KV cache, one sequence at a time: save and restore a sequence's
state, cut it, clear it, and give a new request the longest prefix it can
reuse. A part of :class:`~edgeinfer.engine.Engine`; the scheduler calls the
underscored methods on its own thread, users call the public ones, which
run there between steps.
"""

from __future__ import annotations

import ctypes
import llama_cpp as lc

from .prompt_cache import common_prefix


class SequenceKV:
    """KV operations of an Engine; every call names its sequence id.

    ``_kv_tokens[seq]`` mirrors the tokens whose KV state ``seq`` holds.
    """

    # -- KV state (every call names its sequence) ---------------------------
    def seq_state(self, seq: int = 0) -> bytearray:
        """The KV state of sequence ``seq``."""
        return self._exclusive(lambda: self._seq_state(seq))

    def _seq_state(self, seq: int) -> bytearray:
        size = lc.llama_state_seq_get_size(self._ctx, seq)
        out = bytearray(size)  # llama.cpp writes straight into it: one copy
        view = (ctypes.c_uint8 * size).from_buffer(out)
        n = lc.llama_state_seq_get_data(self._ctx, view, size, seq)
        del view
        del out[n:]
        return out

    def restore_seq_state(self, state: bytes | bytearray, tokens: list[int], seq: int = 0) -> bool:
        """Load a state saved by seq_state() for ``tokens`` into ``seq``."""
        return self._exclusive(lambda: self._restore_seq_state(state, tokens, seq))

    def _restore_seq_state(self, state, tokens: list[int], seq: int) -> bool:
        self._kv_clear(seq)
        if isinstance(state, bytearray):
            ptr = (ctypes.c_uint8 * len(state)).from_buffer(state)
        else:  # bytes read back from disk: borrow the buffer, no copy
            ptr = ctypes.cast(ctypes.c_char_p(state), ctypes.POINTER(ctypes.c_uint8))
        if lc.llama_state_seq_set_data(self._ctx, ptr, len(state), seq) != len(state) or \
                lc.llama_memory_seq_pos_max(self._mem, seq) != len(tokens) - 1:
            self._kv_clear(seq)
            return False
        self._kv_tokens[seq][:] = tokens
        return True

    def kv_tokens(self, seq: int | None = None) -> list[int]:
        """The tokens whose KV state sequence ``seq`` holds (default: the
        sequence of the request admitted last)."""
        return list(self._kv_tokens[self.last_seq if seq is None else seq])

    def kv_clear(self, seq: int | None = None) -> None:
        """Forget the KV state of ``seq``, or of every sequence."""
        seqs = range(self.n_seq_max) if seq is None else [seq]
        self._exclusive(lambda: [self._kv_clear(s) for s in seqs])

    def kv_cells_used(self) -> int:
        """Cells the sequences hold (a shared prefix counts once per sequence)."""
        return sum(len(t) for t in self._kv_tokens.values())

    def _kv_clear(self, seq: int) -> None:
        lc.llama_memory_seq_rm(self._mem, seq, -1, -1)
        self._kv_tokens[seq].clear()

    def _kv_truncate(self, seq: int, n: int) -> int:
        """Keep only the first ``n`` positions of ``seq``; returns how many
        it now holds (0 if llama.cpp could not cut the sequence)."""
        if n < len(self._kv_tokens[seq]):
            if not lc.llama_memory_seq_rm(self._mem, seq, n, -1):
                self._kv_clear(seq)
                return 0
            del self._kv_tokens[seq][n:]
        return len(self._kv_tokens[seq])

    def _kv_resync(self, seq: int) -> None:
        """After an aborted or failed decode, trust llama.cpp's positions."""
        pos_max = lc.llama_memory_seq_pos_max(self._mem, seq)
        del self._kv_tokens[seq][max(pos_max + 1, 0):]

    # -- prefix reuse (called by the scheduler, on its thread) ---------------
    def choose_slot(self, tokens: list[int], free: list[int], idle_since: dict[int, float]) -> int:
        """The free sequence slot for ``tokens``: the one whose own KV
        shares the longest prefix with them, else an empty one, else the
        one idle longest."""
        best = max(free, key=lambda s: (common_prefix(self._kv_tokens[s], tokens) if self.reuse_kv else 0,
                                        not self._kv_tokens[s], -idle_since.get(s, 0.0)))
        return best

    def reuse_prefix(self, tokens: list[int], seq: int) -> int:
        """Make ``seq`` hold the longest reusable prefix of ``tokens``: its
        own KV, another sequence's (copied by llama_memory_seq_cp, which
        shares the cells), or the prompt cache's memory and disk tiers.
        Returns its length; at least one prompt token is left to evaluate,
        so the sampler gets logits."""
        if not self.reuse_kv:
            self._kv_clear(seq)
            return 0
        cap = len(tokens) - 1
        n = min(common_prefix(self._kv_tokens[seq], tokens), cap)
        donor, k = -1, n
        for s in range(self.n_seq_max):
            if s != seq:
                shared = min(common_prefix(self._kv_tokens[s], tokens), cap)
                if shared > k:
                    donor, k = s, shared
        if donor >= 0:
            self._kv_clear(seq)
            lc.llama_memory_seq_cp(self._mem, donor, seq, 0, k)
            self._kv_tokens[seq][:] = tokens[:k]
            n = k
        if self.prompt_cache is not None:
            hit = self.prompt_cache.nearest(tokens, at_least=n)
            if hit is not None:
                k, entry = hit
                k = min(k, cap)
                if k > n:
                    if self._restore_seq_state(entry.state, list(entry.tokens), seq):
                        n = k
                    else:
                        self.prompt_cache.forget(entry.tokens)
                        n = 0
        return self._kv_truncate(seq, n)
