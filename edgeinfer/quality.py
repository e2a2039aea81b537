"""What a quant costs: perplexity, KL divergence and top-1 agreement
against a reference model, file size, and speed on this machine.

The evaluation text is read at run time from what every Python install
carries: the docstrings of a fixed list of standard-library modules,
ordinary technical English. Its sha256 is reported, so two reports are
comparable only when they used the same text.

Models are evaluated in lock-step, one chunk at a time, so the reference
distributions never need to be stored: memory stays at one chunk of
logits per model.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
from dataclasses import asdict, dataclass

import numpy as np

from .errors import CompareError

EVAL_MODULES = ["json", "argparse", "collections", "textwrap", "string", "pathlib", "functools",
                "itertools", "subprocess", "threading", "logging", "csv", "datetime", "decimal",
                "fractions", "heapq", "bisect", "shutil", "tempfile", "zipfile", "tarfile", "random",
                "statistics", "difflib", "contextlib", "dataclasses", "enum", "typing", "urllib.parse"]


def eval_text(min_chars: int = 24_000) -> str:
    """Standard-library docstrings, in a fixed order, until ``min_chars``."""
    parts: list[str] = []
    total = 0
    for name in EVAL_MODULES:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        docs = [inspect.getdoc(mod) or ""]
        for attr in sorted(vars(mod)):
            obj = getattr(mod, attr)
            if not attr.startswith("_") and (inspect.isfunction(obj) or inspect.isclass(obj)):
                if getattr(obj, "__module__", None) == mod.__name__:
                    docs.append(inspect.getdoc(obj) or "")
        for d in docs:
            d = d.strip()
            if len(d) > 200:  # skip one-liners: too little context to predict
                parts.append(d)
                total += len(d)
        if total >= min_chars:
            break
    return "\n\n".join(parts)


@dataclass
class ModelReport:
    model: str
    size: int
    quant: str | None
    tokens_scored: int
    perplexity: float
    kl_divergence: float        # mean KL(reference || this model), nats per token
    top1_agreement: float       # share of positions whose argmax equals the reference's
    prefill_tps: float
    decode_tps: float


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64, copy=False)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def compare(engines: list, *, text: str | None = None, chunk: int = 512, max_chunks: int = 8,
            speed: bool = True, on_chunk=None) -> tuple[list[ModelReport], dict]:
    """Evaluate ``engines`` (the first is the reference) on the same tokens.

    Each chunk of ``chunk`` tokens is evaluated from an empty context and
    its second half is scored (every scored token sees at least
    chunk/2 tokens of context), as llama.cpp's perplexity tool does.
    """
    ref = engines[0]
    text = text if text is not None else eval_text()
    tokens = ref.tokenize(text, add_bos=False)
    for e in engines[1:]:
        if e.n_vocab != ref.n_vocab or e.tokenize(text, add_bos=False) != tokens:
            raise CompareError(f"{e.name} has a different vocabulary from {ref.name}; compare needs one tokenizer")
    n_chunks = min(max_chunks, len(tokens) // chunk)
    if n_chunks < 1:
        raise CompareError(f"the evaluation text has only {len(tokens)} tokens; need {chunk}",
                           hint="use a smaller chunk")
    first = chunk // 2
    nll = [0.0] * len(engines)
    kl = [0.0] * len(engines)
    agree = [0] * len(engines)
    scored = 0
    for c in range(n_chunks):
        ids = tokens[c * chunk:(c + 1) * chunk]
        target = np.array(ids[first + 1:])
        ref_lp = None
        for i, e in enumerate(engines):
            lp = _log_softmax(e.eval_logits(ids)[first:-1])
            nll[i] -= float(lp[np.arange(len(target)), target].sum())
            if ref_lp is None:
                ref_lp = lp
                ref_top = lp.argmax(axis=-1)
            kl[i] += float((np.exp(ref_lp) * (ref_lp - lp)).sum())
            agree[i] += int((lp.argmax(axis=-1) == ref_top).sum())
        scored += len(target)
        if on_chunk:
            on_chunk(c + 1, n_chunks)
    reports = []
    for i, e in enumerate(engines):
        pp = dec = 0.0
        if speed:
            from .tuning import measure

            (pp,), (dec,) = measure(e, 128, 32, reps=1)
        reports.append(ModelReport(e.name, e.info.file_size, e.info.file_type, scored,
                                   float(np.exp(nll[i] / scored)), max(kl[i] / scored, 0.0),
                                   agree[i] / scored, pp, dec))
    meta = {"eval_text_sha256": hashlib.sha256(text.encode()).hexdigest(), "tokens": n_chunks * chunk,
            "scored": scored, "chunk": chunk, "reference": ref.name}
    return reports, meta


def recommend(reports: list[ModelReport], max_kl: float, available: int) -> ModelReport | None:
    """The fastest (decode) model within the KL bound that fits in memory."""
    ok = [r for r in reports[1:] if r.kl_divergence <= max_kl and r.size < available]
    return max(ok, key=lambda r: r.decode_tps) if ok else None


def report_json(reports: list[ModelReport], meta: dict, rec: ModelReport | None, max_kl: float) -> dict:
    return {"meta": meta, "models": [asdict(r) for r in reports], "max_kl": max_kl,
            "recommendation": rec.model if rec else None}
