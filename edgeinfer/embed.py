"""Embeddings: one vector per input text from an embedding model.

An embedding model (BERT and its kin, or any GGUF that names a pooling
type) loads through the same doorway as a chat model, with a context that
gives each sequence's pooled vector (``llama.Context(embeddings=True)``).
Inputs are packed into batches of up to EMBED_BATCH_TOKENS tokens and
``n_seq_max`` sequences, each input a sequence of its own (an input's
tokens attend only to each other, so packing never changes a vector);
every batch runs on the engine's scheduler thread, and inputs from
callers that arrive together share batches.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np

from .errors import ContextOverflowError, EngineError, RequestError

EMBED_SEQUENCES = 64      # inputs per batch at most (llama.cpp allows 256 sequences)
# Tokens per batch at most (a longer input goes alone). Attention in a
# batch spans all of its tokens, masked per input, so its cost grows with
# the square of the batch: 128 sentences of all-minilm-l6-v2 took 114-136
# per second in batches of 512 tokens, 197-247 in batches of 128 and
# 219-222 in batches of 64 (2-core AMD EPYC, one process, alternating).
EMBED_BATCH_TOKENS = 128


@dataclass
class Embeddings:
    """The vectors of some inputs, in order, and what was done to them."""

    vectors: np.ndarray                     # (n, dim) float32
    n_tokens: list[int]                     # tokens of each input as evaluated
    truncated: list[bool]                   # cut to the model's context


def chat_model_error(name: str) -> RequestError:
    return RequestError("model", f"{name} is a generative model and does not embed; use an embedding model, "
                                 "such as all-minilm-l6-v2 (edgeinfer pull all-minilm-l6-v2)")


def embedding_model_error(name: str) -> RequestError:
    return RequestError("model", f"{name} is an embedding model: it turns text into vectors "
                                 "(Engine.embed, POST /v1/embeddings) and does not generate text")


def fit(tokens: list[int], n_ctx: int, truncate: bool, index: int) -> tuple[list[int], bool]:
    """``tokens`` within ``n_ctx``: cut (keeping the last token, the
    separator an encoder's input ends with) when ``truncate``, else
    ContextOverflowError naming the input."""
    if not tokens:
        raise RequestError("input", f"input[{index}] is empty: there is nothing to embed")
    if len(tokens) <= n_ctx:
        return tokens, False
    if not truncate:
        raise ContextOverflowError(f"input[{index}] has {len(tokens):,} tokens; this model embeds at most "
                                   f"{n_ctx:,}", hint="shorten it, split it, or allow truncation")
    return tokens[:n_ctx - 1] + tokens[-1:], True


def pack(lengths: list[int], n_batch: int, n_seq: int) -> list[list[int]]:
    """Indices of the inputs in each batch, in order: as many as fit in
    ``n_batch`` tokens and ``n_seq`` sequences (an input longer than
    ``n_batch`` alone)."""
    batches: list[list[int]] = []
    used = 0
    for i, n in enumerate(lengths):
        if not batches or used + n > n_batch or len(batches[-1]) >= n_seq:
            batches.append([])
            used = 0
        batches[-1].append(i)
        used += n
    return batches


def normalized(vectors: np.ndarray) -> np.ndarray:
    """Each row scaled to unit length (a zero row stays zero)."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms > 0, norms, 1.0)


def run_batches(ctx, inputs: list[list[int]]) -> np.ndarray:
    """The pooled vectors of ``inputs`` (each fits in ``ctx.n_batch``),
    evaluated in as few batches as fit. On the scheduler's thread."""
    out = np.zeros((len(inputs), ctx.n_embd), dtype=np.float32)
    b = ctx.batch
    for group in pack([len(t) for t in inputs], min(ctx.n_batch, EMBED_BATCH_TOKENS), ctx.n_seq_max):
        b.clear()
        for seq, i in enumerate(group):
            for pos, tok in enumerate(inputs[i]):
                b.add(tok, pos, seq, True)
        rc = ctx.embed(b)
        if rc != 0:
            raise EngineError(f"llama.cpp failed to evaluate the inputs (status {rc})")
        for seq, i in enumerate(group):
            out[i] = ctx.pooled(seq)
    return out


@dataclass
class _Job:
    inputs: list[list[int]]
    done: threading.Event = field(default_factory=threading.Event)
    result: np.ndarray | None = None
    error: BaseException | None = None


class Batcher:
    """Runs embedding jobs on the scheduler's thread, packing the inputs
    of every job waiting at that moment into shared batches."""

    def __init__(self, ctx, call):
        """``call(fn)``: run ``fn`` on the scheduler's thread and wait."""
        self.ctx, self.call = ctx, call
        self._waiting: list[_Job] = []
        self._lock = threading.Lock()

    def vectors(self, inputs: list[list[int]]) -> np.ndarray:
        job = _Job(inputs)
        with self._lock:
            self._waiting.append(job)
        try:
            self.call(self._drain)     # may find the job done already by another caller's drain
        except BaseException:
            with self._lock:
                if job in self._waiting:
                    self._waiting.remove(job)
            if not job.done.is_set():
                raise
        job.done.wait()
        if job.error is not None:
            raise job.error
        return job.result

    def _drain(self) -> None:
        with self._lock:
            jobs, self._waiting = self._waiting, []
        if not jobs:
            return
        flat = [toks for job in jobs for toks in job.inputs]
        try:
            vectors = run_batches(self.ctx, flat)
        except BaseException as e:
            for job in jobs:
                job.error = e
                job.done.set()
            return
        start = 0
        for job in jobs:
            job.result = vectors[start:start + len(job.inputs)]
            start += len(job.inputs)
            job.done.set()
