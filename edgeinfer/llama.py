"""The doorway to llama.cpp: the one module that drives a model's context.

Everything the runtime asks of llama.cpp for generation goes through the
handles here: a :class:`Model` (weights and vocabulary), its
:class:`Vocab` (tokenize, token bytes, end of generation), a
:class:`Context` (decode a :class:`Batch`, logits, sample, the KV
operations of each sequence, saving and restoring a sequence's state, the
abort callback) and the :class:`Batch` that :meth:`Batch.add` alone fills.
Besides this module only the quantizer, the self-test child and the
sampler builders (sampling.py, grammar.py) call ``llama_cpp``, so an
upgrade of llama-cpp-python touches one file, and a test can drive the
layers above through a scripted context.

This module imports ``llama_cpp`` at its top; nothing imports it from
``import edgeinfer``, so the CLI's ``list`` and ``--help`` never load
libllama.

The handles are not thread-safe: one thread drives a context (the
scheduler's). The vocabulary may be read from any thread.
"""

from __future__ import annotations

import ctypes
import os
import threading
from pathlib import Path
from typing import Callable, Iterable

import llama_cpp as lc
import numpy as np

from .errors import EngineError, RequestError

# K cache types by name (ggml type ids).
KV_TYPES = {"f16": lc.GGML_TYPE_F16, "q8_0": lc.GGML_TYPE_Q8_0}
# llama_decode's answers that the layers above act on.
DECODE_OK, DECODE_NO_ROOM, DECODE_ABORTED = 0, 1, 2
_NO_ABORT = ctypes.cast(None, lc.ggml_abort_callback)

# llama_token_data as numpy sees it: id, logit, p.
TOKEN_DATA = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])
assert TOKEN_DATA.itemsize == ctypes.sizeof(lc.llama_token_data)


def token_data_array(buf: np.ndarray):
    """A llama_token_data_array over ``buf`` (TOKEN_DATA rows), unsorted,
    nothing selected."""
    return lc.llama_token_data_array(buf.ctypes.data_as(ctypes.POINTER(lc.llama_token_data)), len(buf), -1, False)


def sample_logits(chain, logits: np.ndarray) -> int:
    """Draw a token with sampler ``chain`` from ``logits``, a row kept
    apart from any context, exactly as llama_sampler_sample draws from a
    context's row: every token a candidate in id order, the chain
    applied, the token chosen accepted by the chain."""
    cand = np.empty(len(logits), dtype=TOKEN_DATA)
    cand["id"] = np.arange(len(logits), dtype=np.int32)
    cand["logit"] = logits
    cand["p"] = 0.0
    arr = token_data_array(cand)
    lc.llama_sampler_apply(chain, ctypes.byref(arr))
    if not 0 <= arr.selected < arr.size:
        raise EngineError("the sampler chose no token")
    tok = int(arr.data[arr.selected].id)
    lc.llama_sampler_accept(chain, tok)
    return tok


class Vocab:
    """A model's vocabulary: text to tokens and back, and what ends a turn."""

    def __init__(self, handle):
        self.handle = handle
        self.n_tokens: int = lc.llama_vocab_n_tokens(handle)
        self.add_bos = bool(lc.llama_vocab_get_add_bos(handle))
        self.bos: int = lc.llama_vocab_bos(handle)
        self.eos: int = lc.llama_vocab_eos(handle)
        self._local = threading.local()         # token_to_piece buffers, one per thread
        self._eog: tuple[int, ...] | None = None
        # Each token's bytes and whether it ends a turn, asked once and
        # kept: the scheduler asks for every token it draws, and a call
        # into llama.cpp costs more than the lookup (the GIL changes hands).
        self._pieces: dict[tuple[int, bool], bytes] = {}
        self._ends: dict[int, bool] = {}

    def tokenize(self, text: str, *, add_bos: bool | None = None, special: bool = False) -> list[int]:
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError:
            raise RequestError("prompt", "the text holds a lone UTF-16 surrogate, which is not text; "
                                         "decode it with errors='replace' first") from None
        add = self.add_bos if add_bos is None else add_bos
        cap = len(data) + 8
        buf = (lc.llama_token * cap)()
        n = lc.llama_tokenize(self.handle, data, len(data), buf, cap, add, special)
        if n < 0:
            cap = -n
            buf = (lc.llama_token * cap)()
            n = lc.llama_tokenize(self.handle, data, len(data), buf, cap, add, special)
        return list(buf[:n])

    def token_bytes(self, token: int, special: bool = False) -> bytes:
        piece = self._pieces.get((token, special))
        if piece is None:
            piece = self._pieces[(token, special)] = self._token_bytes(token, special)
        return piece

    def _token_bytes(self, token: int, special: bool) -> bytes:
        buf = getattr(self._local, "piece", None)
        if buf is None:
            buf = self._local.piece = ctypes.create_string_buffer(256)
        n = lc.llama_token_to_piece(self.handle, token, buf, len(buf), 0, special)
        if n < 0:
            buf = self._local.piece = ctypes.create_string_buffer(-n)
            n = lc.llama_token_to_piece(self.handle, token, buf, len(buf), 0, special)
        return buf.raw[:n]

    def detokenize(self, tokens: Iterable[int], special: bool = False) -> str:
        return b"".join(self.token_bytes(t, special) for t in tokens).decode("utf-8", "replace")

    def token_text(self, token: int) -> str:
        return self.token_bytes(token, special=True).decode("utf-8", "replace")

    def is_eog(self, token: int) -> bool:
        ends = self._ends.get(token)
        if ends is None:
            ends = self._ends[token] = bool(lc.llama_vocab_is_eog(self.handle, token))
        return ends

    def is_control(self, token: int) -> bool:
        return bool(lc.llama_vocab_is_control(self.handle, token))

    def eog_tokens(self) -> tuple[int, ...]:
        """Every end-of-generation token of the vocabulary."""
        if self._eog is None:
            self._eog = tuple(t for t in range(self.n_tokens) if lc.llama_vocab_is_eog(self.handle, t))
        return self._eog

    def plain_tokens(self, limit: int = 30000) -> list[int]:
        """Ordinary text tokens (no control or end-of-generation token)
        among the first ``limit``: the tokens benchmarks feed a model."""
        return [t for t in range(min(self.n_tokens, limit)) if not self.is_control(t) and not self.is_eog(t)]

    def spread(self, n: int, offset: int = 0) -> list[int]:
        """``n`` ordinary tokens spread over the vocabulary (a fixed prompt
        for measurements: the same on every run, no control tokens)."""
        ids = self.plain_tokens()
        return [ids[((i + offset) * 7919) % len(ids)] for i in range(n)]


class Model:
    """Weights loaded from a GGUF file, with their vocabulary."""

    def __init__(self, path: str | Path, params):
        """``params``: a native.ModelParams (which native setting the load uses)."""
        self.path = Path(path)
        self._params = params   # keeps the memory the llama_model_params point to alive
        from .native import last_error, recent_log

        recent_log.clear()
        self.handle = lc.llama_model_load_from_file(str(self.path).encode(), params.params)
        if not self.handle:
            why = last_error()
            raise EngineError(f"llama.cpp could not load {self.path}" + (f": {why}" if why else ""),
                              hint="the file may be damaged or made for another llama.cpp; "
                                   "EDGEINFER_DEBUG=1 shows llama.cpp's whole log")
        self.vocab = Vocab(lc.llama_model_get_vocab(self.handle))

    def free(self) -> None:
        if self.handle:
            lc.llama_model_free(self.handle)
            self.handle = None


class Batch:
    """A llama_batch of up to ``capacity`` tokens. :meth:`add` is its only
    writer; :meth:`clear` starts a new one."""

    def __init__(self, capacity: int, n_seq_max: int):
        self.handle = lc.llama_batch_init(capacity, 0, n_seq_max)
        b = self.handle
        # The field pointers, read once: each attribute read of a ctypes
        # struct builds a new pointer object, and add() runs per token.
        self._token, self._pos, self._n_seq, self._seq, self._logits = b.token, b.pos, b.n_seq_id, b.seq_id, b.logits
        self.n = 0

    def clear(self) -> None:
        self.n = 0

    def add(self, token: int, pos: int, seq: int, logits: bool) -> int:
        """Append ``token`` at position ``pos`` of sequence ``seq``; its row
        gets logits if asked. Returns the row."""
        i = self.n
        self._token[i] = token
        self._pos[i] = pos
        self._n_seq[i] = 1
        self._seq[i][0] = seq
        self._logits[i] = logits
        self.n = i + 1
        return i

    def want_logits(self, row: int) -> None:
        self._logits[row] = 1

    def free(self) -> None:
        if self.handle is not None:
            lc.llama_batch_free(self.handle)
            self.handle = None


class Context:
    """A llama.cpp context on a :class:`Model`: one unified KV cache shared
    by ``n_seq_max`` sequences.

    ``should_abort`` is polled by ggml between graph nodes while a
    multi-token batch runs, so a cancel lands inside a long prefill."""

    def __init__(self, model: Model, *, n_ctx: int, n_batch: int, n_seq_max: int, threads: int,
                 threads_batch: int, kv_type: str = "f16", flash_attn: bool = False,
                 should_abort: Callable[[], bool] | None = None, embeddings: bool = False):
        """``embeddings``: the context gives each sequence's pooled vector
        (pooling as the GGUF says) instead of logits: an embedding model's."""
        if kv_type not in KV_TYPES:
            raise ValueError(f"kv_type must be one of {', '.join(KV_TYPES)}, not {kv_type!r}")
        self.model, self.vocab = model, model.vocab
        self.n_vocab = model.vocab.n_tokens
        p = lc.llama_context_default_params()
        p.n_ctx = n_ctx
        p.n_batch = p.n_ubatch = self.n_batch = min(int(n_batch), n_ctx)
        p.n_seq_max = self.n_seq_max = max(1, int(n_seq_max))
        # One pool of n_ctx cells for every sequence, of any length; without
        # it llama.cpp splits the context evenly between them.
        p.kv_unified = True
        p.n_threads, p.n_threads_batch = threads, threads_batch
        p.no_perf = True
        p.embeddings = self.embeddings = bool(embeddings)
        # Flash attention is off by default: its CPU kernel takes another
        # path for short batches, so the few tokens evaluated after a
        # reused prefix would get different logits than in a cold prefill
        # (up to 0.65 on the default model) and a cache hit could change
        # the answer. Off, a hit is bit-exact. On is a few % faster.
        p.flash_attn_type = lc.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else lc.LLAMA_FLASH_ATTN_TYPE_DISABLED
        # Only K: llama.cpp quantizes the V cache only with flash attention.
        p.type_k = KV_TYPES[kv_type]
        self.kv_types = (p.type_k, p.type_v)
        self.n_ctx = n_ctx
        self.handle = lc.llama_init_from_model(model.handle, p)
        if not self.handle:
            raise EngineError(f"llama.cpp could not create a context of {n_ctx} tokens", hint="try a smaller n_ctx")
        self._mem = lc.llama_get_memory(self.handle)   # None for an encoder: it keeps no KV cache
        # An encoder (BERT) evaluates a batch with llama_encode; everything else decodes.
        self.encoder_only = bool(lc.llama_model_has_encoder(model.handle)) and \
            not lc.llama_model_has_decoder(model.handle)
        self.n_embd = lc.llama_model_n_embd(model.handle)
        self.should_abort = should_abort or (lambda: False)
        self._abort_cb = lc.ggml_abort_callback(lambda _data: self.should_abort())
        lc.llama_set_abort_callback(self.handle, self._abort_cb, None)
        self._abort_on = True
        self.batch = Batch(self.n_batch, self.n_seq_max)
        # A debugging aid, on in the tests: every decode of a context on one
        # thread. A second thread running ggml graphs brings a second OpenMP
        # team, whose idle workers spin against the first's and slow both.
        self._decoder: int | None = None
        self._check_thread = os.environ.get("EDGEINFER_CHECKS") == "1"

    # -- decode --------------------------------------------------------------
    def decode(self, batch: Batch | None = None, *, abortable: bool | None = None) -> int:
        """Evaluate ``batch`` (default: this context's own). Returns
        DECODE_OK, DECODE_NO_ROOM (no cells for it; llama.cpp left the cache
        as it was), DECODE_ABORTED, or another llama.cpp status on failure.

        ggml polls the abort callback at every graph node (~500 times a
        token), which costs a few % of decode speed. A decode-only step is
        short and cancel is checked between steps, so the callback is
        installed only when ``abortable`` (default: more than one token)."""
        b = self._ready(batch, abortable)
        return lc.llama_decode(self.handle, b.handle)

    def _ready(self, batch: Batch | None, abortable: bool | None) -> Batch:
        """The batch to evaluate, with the abort callback set as asked
        (None: on for more than one token) and its token count handed over."""
        b = batch or self.batch
        if self._check_thread:
            self._one_thread()
        on = b.n > 1 if abortable is None else abortable
        if on != self._abort_on:
            lc.llama_set_abort_callback(self.handle, self._abort_cb if on else _NO_ABORT, None)
            self._abort_on = on
        b.handle.n_tokens = b.n
        return b

    def embed(self, batch: Batch | None = None) -> int:
        """Evaluate ``batch`` for its sequences' pooled vectors (an
        embedding context): encode for an encoder, else decode after the
        KV cache is cleared (each batch stands alone). Returns llama.cpp's
        status, 0 for success."""
        b = self._ready(batch, abortable=False)
        if self.encoder_only:
            return lc.llama_encode(self.handle, b.handle)
        if self._mem:
            lc.llama_memory_clear(self._mem, True)
        return lc.llama_decode(self.handle, b.handle)

    def pooled(self, seq: int) -> np.ndarray:
        """A copy of sequence ``seq``'s pooled vector from the last :meth:`embed`."""
        ptr = lc.llama_get_embeddings_seq(self.handle, seq)
        if not ptr:
            raise EngineError("llama.cpp gave no embedding for this input",
                              hint="the model may not pool its token vectors; check it with 'edgeinfer show'")
        return np.ctypeslib.as_array(ptr, shape=(self.n_embd,)).copy()

    def _one_thread(self) -> None:
        me = threading.get_ident()
        if self._decoder is None:
            self._decoder = me
        elif me != self._decoder:
            raise EngineError(f"a context decoded on two threads ({self._decoder} and {me}): every decode "
                              "belongs on the scheduler's thread")

    def logits(self, row: int) -> np.ndarray:
        """The logits of batch row ``row`` (-1: the last), a view valid until the next decode."""
        return np.ctypeslib.as_array(lc.llama_get_logits_ith(self.handle, row), shape=(self.n_vocab,))

    def all_logits(self, rows: int) -> np.ndarray:
        """A copy of the logits of the first ``rows`` rows of the last batch
        (every one of which asked for logits)."""
        return np.ctypeslib.as_array(lc.llama_get_logits(self.handle), shape=(rows, self.n_vocab)).copy()

    def sample(self, chain, row: int) -> int:
        """Draw a token with sampler ``chain`` from the logits of ``row``."""
        return lc.llama_sampler_sample(chain, self.handle, row)

    def set_threads(self, threads: int, threads_batch: int) -> None:
        lc.llama_set_n_threads(self.handle, threads, threads_batch)

    def threads(self) -> tuple[int, int]:
        """The threads a decode and a prompt's evaluation use now."""
        return lc.llama_n_threads(self.handle), lc.llama_n_threads_batch(self.handle)

    # -- the KV cells of each sequence ----------------------------------------
    def seq_rm(self, seq: int, p0: int = -1, p1: int = -1) -> bool:
        """Remove positions [p0, p1) of ``seq`` (-1: open end); False if
        llama.cpp could not cut the sequence there."""
        return bool(lc.llama_memory_seq_rm(self._mem, seq, p0, p1))

    def seq_cp(self, src: int, dst: int, p0: int, p1: int) -> None:
        """Let ``dst`` share the cells of positions [p0, p1) of ``src``."""
        lc.llama_memory_seq_cp(self._mem, src, dst, p0, p1)

    def seq_pos_max(self, seq: int) -> int:
        """The last position ``seq`` holds, -1 when empty."""
        return lc.llama_memory_seq_pos_max(self._mem, seq)

    def seq_state(self, seq: int) -> bytearray:
        """The saved KV state of ``seq``."""
        size = lc.llama_state_seq_get_size(self.handle, seq)
        out = bytearray(size)  # llama.cpp writes straight into it: one copy
        view = (ctypes.c_uint8 * size).from_buffer(out)
        n = lc.llama_state_seq_get_data(self.handle, view, size, seq)
        del view
        del out[n:]
        return out

    def set_seq_state(self, seq: int, state: bytes | bytearray) -> bool:
        """Load a state saved by :meth:`seq_state` into ``seq``; False if
        llama.cpp did not take all of it."""
        if isinstance(state, bytearray):
            ptr = (ctypes.c_uint8 * len(state)).from_buffer(state)
        else:  # bytes read back from disk: borrow the buffer, no copy
            ptr = ctypes.cast(ctypes.c_char_p(state), ctypes.POINTER(ctypes.c_uint8))
        return lc.llama_state_seq_set_data(self.handle, ptr, len(state), seq) == len(state)

    def free(self) -> None:
        self.batch.free()
        if self.handle:
            lc.llama_free(self.handle)
            self.handle = None


def library_name() -> str:
    """The file name of the loaded libllama (part of what makes a saved KV state valid)."""
    return str(getattr(getattr(lc.llama_cpp, "_lib", None), "_name", ""))


def binding_version() -> str:
    return lc.__version__
