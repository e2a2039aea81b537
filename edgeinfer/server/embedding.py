"""One embedding request model for every face.

OpenAI's ``/v1/embeddings``, the JSON-lines ``embed`` op and (in a model's
own process) the server that forwards to it parse their input into an
:class:`EmbeddingRequest`; :func:`run` embeds it on an engine. The input
is a string, a list of strings, a list of token ids or a list of such
lists, as OpenAI's API takes it.
"""

from __future__ import annotations

import asyncio
import base64
from dataclasses import dataclass

import numpy as np

from ..errors import RequestError

MAX_INPUTS = 2048            # OpenAI's own limit per request
MAX_INPUT_CHARS = 100_000    # one text; a model embeds at most a few thousand tokens of it anyway


@dataclass
class EmbeddingRequest:
    """Texts (``str``) or token-id lists, in order; ``truncate``: cut an
    input longer than the model's context (else refuse it)."""

    inputs: list
    truncate: bool = True


def parse_input(value, param: str = "input") -> list:
    """OpenAI's ``input`` as a list of texts or of token-id lists."""
    def ids(v) -> bool:
        return isinstance(v, list) and bool(v) and all(isinstance(t, int) and not isinstance(t, bool) for t in v)

    if isinstance(value, str):
        value = [value]
    elif ids(value):
        value = [value]
    if not isinstance(value, list) or not value:
        raise RequestError(param, f"{param} must be a string, a list of strings, a list of token ids or a "
                                  "list of such lists, and not empty")
    if len(value) > MAX_INPUTS:
        raise RequestError(param, f"{param} holds {len(value):,} inputs; at most {MAX_INPUTS:,} are accepted "
                                  "in one request")
    for i, v in enumerate(value):
        if isinstance(v, str):
            if not v:
                raise RequestError(param, f"{param}[{i}] is empty: there is nothing to embed")
            if len(v) > MAX_INPUT_CHARS:
                raise RequestError(param, f"{param}[{i}] has {len(v):,} characters; at most "
                                          f"{MAX_INPUT_CHARS:,} are accepted")
        elif not ids(v):
            raise RequestError(param, f"{param}[{i}] must be a non-empty string or a list of token ids; "
                                      "one request holds texts or token lists, not a mix of other things")
    if len({isinstance(v, str) for v in value}) > 1:
        raise RequestError(param, f"{param} mixes texts and token lists; send one kind per request")
    return value


def _tokens(engine, inputs: list) -> list[list[int]]:
    return [engine.tokenize(x, add_bos=True) if isinstance(x, str) else list(x) for x in inputs]


async def run(engine, req: EmbeddingRequest):
    """Embed ``req`` on ``engine`` (an Engine of this process): texts are
    tokenized and the vectors computed in threads. Returns embed.Embeddings."""
    def work():
        return engine.embed_tokens(_tokens(engine, req.inputs), truncate=req.truncate)

    return await asyncio.to_thread(work)


def encode_vectors(vectors: np.ndarray) -> list[str]:
    """Each vector as base64 of its little-endian float32 bytes (OpenAI's
    ``encoding_format: "base64"``)."""
    v = np.ascontiguousarray(vectors, dtype="<f4")
    return [base64.b64encode(row.tobytes()).decode("ascii") for row in v]


def decode_vectors(rows: list[str]) -> np.ndarray:
    """The inverse of :func:`encode_vectors`."""
    if not rows:
        return np.zeros((0, 0), dtype=np.float32)
    return np.stack([np.frombuffer(base64.b64decode(r), dtype="<f4") for r in rows]).astype(np.float32)
