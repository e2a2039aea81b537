"""A loaded model: the public generate/stream/chat over a scheduler.

An :class:`Engine` is assembled from parts, each with one job:
:mod:`edgeinfer.settings` resolves what the load uses (a pure function),
:mod:`edgeinfer.selftest` picks a native setting that survives here,
:mod:`edgeinfer.llama` is the doorway to llama.cpp (model, context,
batch, vocabulary), :mod:`edgeinfer.kv` keeps the ledger of what each
sequence holds, :mod:`edgeinfer.prompt_cache` keeps prefixes across
requests and restarts, :mod:`edgeinfer.draft` is an optional draft model,
and :mod:`edgeinfer.scheduler` runs every generation on one thread that
batches every caller's sequences into shared decode steps.

Generation comes in three layers (as in mlx-lm): the scheduler's step is
the hot loop; :meth:`Engine.stream` yields :class:`TextEvent` and a final
:class:`DoneEvent`; :meth:`Engine.generate` joins the stream into a string.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import hashlib
import os
import queue
import threading
import time
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from . import llama, selftest, settings
from . import native as _native
from .embed import EMBED_SEQUENCES, Batcher, Embeddings, chat_model_error, embedding_model_error, normalized
from .embed import fit as fit_input
from .errors import ContextOverflowError, EngineBusyError, EngineError, GrammarError, RequestError, SpeculativeError
from .events import DoneEvent, Stats, TextEvent
from .fit import refusal
from .gguf_file import GGUFInfo, read_gguf
from .grammar import compile_grammar
from .grammar import resolve as constrain
from .kv import KVLedger
from .prompt_cache import PromptCache
from .sampling import DEFAULTS as DEFAULT_SAMPLING
from .sampling import MAX_TOP_LOGPROBS, check_logit_bias, check_options
from .scheduler import DEFAULT_QUEUE, Scheduler, new_seed
from .sequence import Request
from .speculative import SpecConfig, measure_step_costs, step_costs_for

SEGMENT_MEMO_CHARS = 512   # chat pieces this long have their tokens remembered ...
SEGMENT_MEMO_SIZE = 32     # ... this many of them

__all__ = ["Engine", "TextEvent", "DoneEvent", "Stats"]


class Engine:
    """A loaded model and its llama.cpp context.

    >>> import edgeinfer
    >>> with edgeinfer.load("smollm2-135m-instruct") as engine:   # doctest: +SKIP
    ...     print(engine.chat([{"role": "user", "content": "Hi!"}], max_tokens=32))

    Callers on any number of threads share it: their sequences run
    together in one batch per decode step (``n_seq_max`` of them at once,
    the rest wait in a queue of ``queue_limit``). A caller that is not
    admitted within ``lock_timeout`` seconds (None: wait as long as it
    takes) gets EngineBusyError, as does one that finds the queue full.
    :meth:`cancel` stops every running prefill and decode from any thread;
    a ``cancel`` event passed to a stream stops that stream alone.
    """

    def __init__(self, model_path: str | os.PathLike, *, n_ctx: int | None = None,
                 threads: int | None = None, threads_batch: int | None = None,
                 n_batch: int = settings.DEFAULT_N_BATCH, mmap: bool = True, mlock: bool = False,
                 seed: int | None = None, n_seq_max: int | None = None, name: str | None = None,
                 sha256: str | None = None, chat_template: str | None = None,
                 lock_timeout: float | None = None, check_memory: bool = True,
                 system_prompt: str | None = None, prompt_cache: "bool | PromptCache" = True,
                 cache_disk: bool = True, cache_memory_budget: int | None = None,
                 cache_disk_budget: int | None = None, flash_attn: bool = False,
                 sampling: dict | None = None, native: str | None = None,
                 stop_on_repeat: bool = True, queue_limit: int = DEFAULT_QUEUE,
                 prefill_chunk: int | None = None, kv_type: str | None = None,
                 speculative: "str | SpecConfig | None" = None, draft: str | os.PathLike | None = None,
                 rpc: list[str] | None = None):
        self.path = Path(model_path)
        self.info: GGUFInfo = read_gguf(self.path)  # bounds-checked before llama.cpp sees it
        self.name = name or self.path.name
        # An embedding model turns whole inputs into vectors (embed.py): each
        # input is evaluated in one piece, nothing is generated or cached.
        self.embedding = self.info.is_embedding
        if self.embedding:
            # Never past the positions it was trained for: an encoder looks
            # each position up in a table of that many rows.
            trained = self.info.context_length or 512
            n_ctx = min(n_ctx or trained, trained)
            n_batch = max(n_batch, n_ctx)
            n_seq_max = n_seq_max or EMBED_SEQUENCES
            speculative, prompt_cache, draft = "off", False, None
        self.sha256 = sha256
        self._model = self._ctx = self._scheduler = self.draft = None
        self._cancel = threading.Event()       # engine.cancel() during a whole-context call
        self._fim_splits = None                # fim.Splits: where recent code completions' middles began
        # Everything the load uses, resolved before llama.cpp allocates anything.
        self.settings = s = settings.for_load(
            self.info.context_length, sha256, n_ctx=n_ctx, threads=threads, threads_batch=threads_batch,
            n_batch=n_batch, n_seq_max=n_seq_max, kv_type=kv_type, flash_attn=flash_attn,
            speculative=speculative, has_draft=draft is not None)
        self.box, self.n_ctx, self.kv_type = s.box, s.n_ctx, s.kv_type
        self.threads, self.threads_batch, self.threads_source = s.threads, s.threads_batch, s.threads_source
        self.n_batch, self.n_seq_max, self.flash_attn, self.speculative = s.n_batch, s.n_seq_max, s.flash_attn, \
            s.speculative
        self.rpc = list(rpc or [])
        if check_memory and not self.rpc:   # over RPC the weights live on the workers
            err = refusal(self.name, self.info, self.n_ctx)
            if err is not None:
                raise err
        self.seed = seed
        self.lock_timeout = lock_timeout
        if self.rpc:
            # The layers run on the workers, each in llama.cpp's RPC server;
            # this process's own CPU code is the plainest, and a test load of
            # a model that does not fit here would only fail.
            from . import rpc as _rpc

            _rpc.connect(self.rpc)
            self.native = selftest.Verdict("plain", "rpc")
        else:
            # Native code is tried in a child process before this one trusts it
            # (selftest.py): the first load of a file on a machine costs a test
            # run, later loads read the record.
            self.native = selftest.ensure(
                self.path, self.info, sha256=sha256, name=self.name, forced=_native.forced_setting(native),
                threads=self.threads, threads_batch=self.threads_batch, mmap=mmap)
        _native.init_backend()
        self._mparams = _native.ModelParams(self.native.setting, self.info, mmap=mmap, mlock=mlock,
                                            offload=bool(self.rpc))
        self._model = llama.Model(self.path, self._mparams)
        self.vocab = self._model.vocab
        self.n_vocab = self.vocab.n_tokens
        self.add_bos = self.vocab.add_bos
        try:
            self._ctx = llama.Context(self._model, n_ctx=self.n_ctx, n_batch=self.n_batch,
                                      n_seq_max=self.n_seq_max, threads=self.threads,
                                      threads_batch=self.threads_batch, kv_type=self.kv_type,
                                      flash_attn=self.flash_attn, embeddings=self.embedding)
        except BaseException:
            self._free()
            raise
        self.chat_template = chat_template if chat_template is not None else self.info.chat_template
        self.system_prompt = system_prompt or None
        # The model's own defaults (from its catalog entry) over ours.
        self.sampling = {**DEFAULT_SAMPLING, **check_options(sampling or {})}
        self.stop_on_repeat = bool(stop_on_repeat)  # finish_reason "repetition" (sampling.repeating)
        # prompt_cache=False turns off every reuse of KV state, so each
        # request prefills from scratch (the baseline the cache must match).
        self.reuse_kv = prompt_cache is not False
        if isinstance(prompt_cache, PromptCache):
            self.prompt_cache: PromptCache | None = prompt_cache
        elif prompt_cache:
            budgets = {k: v for k, v in (("memory_budget", cache_memory_budget),
                                         ("disk_budget", cache_disk_budget)) if v is not None}
            self.prompt_cache = PromptCache(self.cache_namespace(), disk=cache_disk, **budgets)
            self.prompt_cache.preload()
        else:
            self.prompt_cache = None
        self._ledger = KVLedger(self._ctx, reuse=self.reuse_kv, prompt_cache=self.prompt_cache)
        try:
            if draft is not None:
                self.draft = self._open_draft(draft, native, mmap)
        except BaseException:
            self._free()
            raise
        self._scheduler = Scheduler(self._ctx, self._ledger, name=self.name, native=self.native.setting,
                                    draft=self.draft, stop_on_repeat=self.stop_on_repeat,
                                    queue_limit=queue_limit, prefill_chunk=prefill_chunk)
        if self.prompt_cache is not None:
            self.prompt_cache.busy = self._scheduler.busy   # disk writes wait for a gap
        self._step_costs: dict[int, float] | None = None
        self._batcher = Batcher(self._ctx, self._exclusive) if self.embedding else None
        self._memo: collections.OrderedDict = collections.OrderedDict()   # see _segment_tokens
        self._memo_lock = threading.Lock()
        if self.speculative.mode == "auto":
            # Measured on the scheduler's thread, like every decode: a second
            # thread running ggml graphs brings a second OpenMP team whose idle
            # workers spin against the first one's (decode fell from 123 to
            # 75 tok/s on the default model, 2-core EPYC, when this ran here).
            try:
                self._step_costs = step_costs_for(self)
            except Exception:   # no measure, no auto drafts; lookup still works when asked for
                self._step_costs = None
            self._scheduler.step_costs = self._step_costs   # before the first request: no race

    def _open_draft(self, draft, native, mmap):
        from .draft import DraftModel
        from .store import resolve_model

        path, manifest = resolve_model(draft)
        return DraftModel.open(path, name=manifest.ref if manifest else Path(path).name,
                               sha256=manifest.sha256 if manifest else None, target_vocab=self.vocab,
                               target_name=self.name, n_ctx=self.n_ctx, n_seq_max=self.n_seq_max,
                               threads=self.threads, threads_batch=self.threads_batch, kv_type=self.kv_type,
                               native=native, mmap=mmap)

    def step_costs(self) -> dict[int, float] | None:
        """What a decode step of w tokens costs here, relative to one token
        (speculative auto weighs drafts with it); None if not measured."""
        return self._step_costs

    def measure_step_costs(self) -> dict[int, float]:
        """Seconds per decode step of 1, 2, 3, 5 and 9 tokens of one
        sequence on this machine (edgeinfer.speculative)."""
        return self._exclusive(lambda: measure_step_costs(self._ctx, self._ledger))

    # -- lifecycle ---------------------------------------------------------
    def close(self, timeout: float = 30.0) -> None:
        """Free the context and the model; the engine is unusable after.

        Generations running on other threads are cancelled first and
        waited for, so llama.cpp never runs on freed memory."""
        if getattr(self, "_ctx", None) is None:
            return
        self._cancel.set()
        if self._scheduler is not None and not self._scheduler.close(timeout):
            raise EngineBusyError(f"{self.name} is still generating; it could not be closed")
        self._free()

    def _free(self) -> None:
        if getattr(self, "draft", None) is not None:
            self.draft.close()
            self.draft = None
        if getattr(self, "prompt_cache", None) is not None:
            self.prompt_cache.flush()
        if getattr(self, "_ctx", None) is not None:
            self._ctx.free()
            self._ctx = None
        if getattr(self, "_model", None) is not None:
            self._model.free()
            self._model = None

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        # Nobody holds the engine, so no stream reads from it: stop the
        # scheduler (which holds no reference to the engine), then free.
        try:
            sched = getattr(self, "_scheduler", None)
            if sched is not None and sched._thread is not threading.current_thread():
                if not sched.close(10):
                    return  # never free under a running decode
            self._free()
        except Exception:
            pass

    @property
    def last_stats(self) -> Stats | None:
        """The figures of the generation that finished last."""
        return self._scheduler.last_stats if self._scheduler is not None else None

    @property
    def last_seq(self) -> int:
        """The sequence slot of the request admitted last."""
        return self._scheduler.last_seq if self._scheduler is not None else 0

    def status(self) -> dict:
        """What the scheduler is doing: active sequences, queue depth, KV
        cells used, prompt-cache hits, steps by sequences per step, recent
        decode tokens/s."""
        self._check_open()
        return self._scheduler.status()

    def _exclusive(self, fn):
        """Run ``fn`` on the scheduler thread while no sequence runs;
        :meth:`cancel` aborts a decode it runs."""
        self._check_open()
        self._cancel.clear()
        return self._scheduler.call(fn, timeout=self.lock_timeout, cancel=self._cancel)

    def set_threads(self, threads: int, threads_batch: int | None = None, *, wait: bool = True) -> None:
        """Change the decode and prompt-processing thread counts in place,
        from the scheduler's next step on (streams under way carry on with
        them). ``wait``: return once they are in force (at most one step;
        False from an event loop)."""
        self._check_open()
        self.threads = int(threads)
        self.threads_batch = int(threads_batch or threads)
        self._scheduler.set_threads(self.threads, self.threads_batch, wait=30.0 if wait else None)

    def benchmark(self, n_prompt: int = 512, n_gen: int = 128, seq: int = 0) -> tuple[float, float]:
        """Time a cold prefill of ``n_prompt`` tokens and ``n_gen`` single-token
        decodes, as llama-bench's pp and tg tests do (fixed tokens, no
        sampling, no prompt cache). Returns (prefill seconds, decode seconds)."""
        return self._exclusive(lambda: self._benchmark(n_prompt, n_gen, seq))

    def _benchmark(self, n_prompt: int, n_gen: int, seq: int) -> tuple[float, float]:
        ledger = self._ledger
        prompt = self.vocab.spread(n_prompt)
        ledger.clear(seq)
        t0 = time.perf_counter()
        if n_prompt and ledger.evaluate(seq, prompt) != 0:
            raise EngineError("benchmark cancelled")
        t1 = time.perf_counter()
        ledger.clear(seq)
        ids = self.vocab.plain_tokens()
        tok = ids[len(ids) // 2]
        t2 = time.perf_counter()
        for _ in range(n_gen):
            if ledger.evaluate(seq, [tok]) != 0:
                raise EngineError("benchmark cancelled")
        t3 = time.perf_counter()
        ledger.clear(seq)
        return t1 - t0, t3 - t2

    def eval_logits(self, tokens: list[int], seq: int = 0):
        """Logits for every position of ``tokens`` (at most n_batch of them),
        evaluated from an empty sequence, as a float32 array of shape
        (len(tokens), n_vocab). For quality measurements, not generation."""
        self._check_open()
        if not 0 < len(tokens) <= self.n_batch:
            raise ValueError(f"eval_logits takes 1..{self.n_batch} tokens")

        def run():
            ctx, ledger = self._ctx, self._ledger
            ledger.clear(seq)
            b = ctx.batch
            b.clear()
            for i, t in enumerate(tokens):
                b.add(t, i, seq, True)
            rc = ctx.decode(b, abortable=True)
            if rc != 0:
                ledger.clear(seq)
                raise EngineError(f"llama_decode failed with status {rc}")
            out = ctx.all_logits(len(tokens))
            ledger.clear(seq)
            return out

        return self._exclusive(run)

    def prompt_logprobs(self, tokens: list[int], top: int = 0, seq: int = 0) -> list[dict | None]:
        """Each prompt token's log-probability entry given the tokens
        before it (as TextEvent.logprobs has them; None for the first),
        with the ``top`` likeliest alternatives: how likely the model
        finds a text, as evaluation harnesses ask with ``echo``. Evaluated
        alone, in batches, while other requests wait."""
        from .sampling import token_logprobs

        self._check_open()
        if not 0 < len(tokens) < self.n_ctx:
            raise ContextOverflowError(f"the prompt has {len(tokens):,} tokens; the context holds {self.n_ctx:,}")

        def run():
            ctx, ledger, vocab = self._ctx, self._ledger, self.vocab
            out: list[dict | None] = [None]
            ledger.clear(seq)
            try:
                for start in range(0, len(tokens), self.n_batch):
                    chunk = tokens[start:start + self.n_batch]
                    b = ctx.batch
                    b.clear()
                    for i, t in enumerate(chunk):
                        b.add(t, start + i, seq, True)
                    rc = ctx.decode(b, abortable=True)
                    if rc != 0:
                        raise EngineError(f"llama_decode failed with status {rc}")
                    for i in range(len(chunk)):
                        if start + i + 1 < len(tokens):
                            out.append(token_logprobs(ctx.logits(i), tokens[start + i + 1], top, vocab))
            finally:
                ledger.clear(seq)
            return out

        return self._exclusive(run)

    def cancel(self) -> None:
        """Stop every running and waiting generation (prefill as well as
        decode); safe from any thread."""
        self._cancel.set()
        if self._scheduler is not None:
            self._scheduler.cancel_all()

    # -- KV state (every call names its sequence) ------------------------------
    def seq_state(self, seq: int = 0) -> bytearray:
        """The KV state of sequence ``seq``."""
        return self._exclusive(lambda: self._ledger.save(seq))

    def restore_seq_state(self, state: bytes | bytearray, tokens: list[int], seq: int = 0) -> bool:
        """Load a state saved by seq_state() for ``tokens`` into ``seq``."""
        return self._exclusive(lambda: self._ledger.restore(seq, state, tokens))

    def kv_tokens(self, seq: int | None = None) -> list[int]:
        """The tokens whose KV state sequence ``seq`` holds (default: the
        sequence of the request admitted last)."""
        return list(self._ledger.tokens(self.last_seq if seq is None else seq))

    def kv_clear(self, seq: int | None = None) -> None:
        """Forget the KV state of ``seq``, or of every sequence."""
        seqs = range(self.n_seq_max) if seq is None else [seq]
        self._exclusive(lambda: [self._ledger.clear(s) for s in seqs])

    def kv_cells_used(self) -> int:
        """Cells the sequences hold (a shared prefix counts once per sequence)."""
        return self._ledger.cells_used()

    # -- tokens ------------------------------------------------------------
    def _check_open(self) -> None:
        if self._ctx is None:
            raise EngineError(f"{self.name} is closed", hint="load the model again with edgeinfer.load()")

    def tokenize(self, text: str, *, add_bos: bool | None = None, special: bool = False) -> list[int]:
        """Text to token ids. With ``special=False`` (the default) text such
        as ``<|im_end|>`` stays plain text and never becomes a control token."""
        self._check_open()
        return self.vocab.tokenize(text, add_bos=add_bos, special=special)

    def token_bytes(self, token: int, special: bool = False) -> bytes:
        """The bytes of one token (a piece of a UTF-8 character, maybe);
        ``special``: control tokens as their text, else as nothing."""
        return self.vocab.token_bytes(token, special)

    def detokenize(self, tokens: Iterable[int], special: bool = False) -> str:
        """Token ids to text (bytes that are not whole UTF-8 become U+FFFD)."""
        return self.vocab.detokenize(tokens, special)

    def is_eog(self, token: int) -> bool:
        """True for a token that ends a turn (end of sequence, end of turn ...)."""
        return self.vocab.is_eog(token)

    def token_text(self, token_id: int) -> str:
        """A token's text, control tokens included (``<|im_end|>``)."""
        return self.vocab.token_text(token_id)

    def eog_tokens(self) -> tuple[int, ...]:
        """Every end-of-generation token of the vocabulary."""
        return self.vocab.eog_tokens()

    def cache_namespace(self) -> str:
        """A hash of everything that makes a saved KV state valid here."""
        ident = self.sha256
        if not ident:  # a bare path: identify the file by name, size and time
            st = self.path.stat()
            ident = f"{self.path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
        parts = [ident, str(self.n_ctx), str(self.n_seq_max), llama.binding_version(),
                 _native.system_info(),
                 str(self._ctx.kv_types[0]), str(self._ctx.kv_types[1]), f"fa={self.flash_attn}",
                 f"native={self.native.setting}", llama.library_name()]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]

    # -- generation --------------------------------------------------------
    def _spec(self, speculative: str | None) -> SpecConfig | None:
        """A request's speculative decoding: the engine's, or its own mode."""
        spec = self.speculative
        if speculative is not None and speculative != spec.mode:
            spec = dataclasses.replace(spec, mode=speculative)
        if spec.mode == "draft" and self.draft is None:
            raise SpeculativeError("speculative='draft' needs a draft model")
        return None if spec.mode == "off" else spec

    def _request(self, tokens: list[int], max_tokens: int, stop, seed, cancel, sampling, sink,
                 ignore_eos: bool = False, json_schema=None, grammar: str | None = None,
                 speculative: str | None = None, logit_bias: dict | None = None,
                 logprobs: int | None = None, show_tokens: tuple[int, ...] = ()) -> Request:
        self._check_open()
        if self.embedding:
            raise embedding_model_error(self.name)
        gbnf = constrain(json_schema, grammar)
        compiled = None
        if gbnf is not None:
            if ignore_eos:
                raise GrammarError("ignore_eos cannot be combined with a schema or grammar: the grammar decides "
                                   "where the answer ends", hint="drop ignore_eos, or the schema")
            compiled = compile_grammar(self.vocab.handle, gbnf)   # here, in the caller's thread, once
        if not tokens:
            tokens = [self.vocab.bos]
        if len(tokens) >= self.n_ctx:
            raise ContextOverflowError(
                f"the prompt has {len(tokens):,} tokens but the context holds {self.n_ctx:,}")
        opts = {**self.sampling, **check_options({k: v for k, v in sampling.items() if v is not None})}
        stops = [stop] if isinstance(stop, str) else list(stop or ())
        if not all(isinstance(s, str) and s for s in stops):
            raise RequestError("stop", "stop must be a string or a list of non-empty strings")
        for name, v in (("max_tokens", max_tokens), ("seed", seed)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise RequestError(name, f"{name} must be a whole number of 0 or more, not {str(v)[:40]}")
        bias = check_logit_bias(logit_bias, self.n_vocab)
        if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, int)
                                     or not 0 <= logprobs <= MAX_TOP_LOGPROBS):
            raise RequestError("logprobs", f"logprobs must be a whole number from 0 to {MAX_TOP_LOGPROBS} "
                                           "(how many alternatives to give beside each token)")
        # Speculation checks drafts in batches; log-probabilities are read a token at a time.
        spec = None if logprobs is not None else self._spec(speculative)
        return Request(list(tokens), int(max_tokens), stops, new_seed(seed, self.seed), opts, sink,
                       cancel_event=cancel, admit_timeout=self.lock_timeout, ignore_eos=bool(ignore_eos),
                       grammar=compiled, spec=spec, logit_bias=bias, logprobs=logprobs,
                       shown=frozenset(show_tokens))

    def stream_tokens(self, tokens: list[int], *, max_tokens: int = 256, stop: Iterable[str] | str = (),
                      seed: int | None = None, cancel: threading.Event | None = None,
                      ignore_eos: bool = False, json_schema=None, grammar: str | None = None,
                      speculative: str | None = None, logit_bias: dict | None = None,
                      logprobs: int | None = None, show_tokens: tuple[int, ...] = (),
                      **sampling) -> Iterator[TextEvent | DoneEvent]:
        """Generate from prompt token ids; yields TextEvents, then a DoneEvent.

        ``cancel``, an Event of the caller's, stops this request alone
        (even before it starts), where :meth:`cancel` stops all of them.
        Leaving the loop early cancels the request too. ``ignore_eos``
        runs to max_tokens (for benchmarks): end-of-generation tokens are
        never drawn and a loop does not end the stream.

        ``json_schema`` (a dict or its JSON text; ``"json"`` for any JSON
        object) or ``grammar`` (GBNF text) constrains the answer: it
        parses, and follows the schema, unless max_tokens cuts it short.
        A schema that cannot be converted raises GrammarError.

        ``speculative`` ("auto", "lookup" or "off") overrides the engine's
        speculative decoding for this request (edgeinfer.speculative).

        ``logit_bias`` ({token id: bias from -100 to 100}) is added to those
        tokens' logits before sampling (-100 bans a token). ``logprobs`` (0
        to 20) gives each TextEvent the log-probability of each of its
        tokens and of that many most likely alternatives (``.logprobs``).
        ``show_tokens``: control tokens whose text the answer shows (a
        family's tool-call marker), where others show as nothing."""
        events: queue.SimpleQueue = queue.SimpleQueue()
        req = self._request(tokens, max_tokens, stop, seed, cancel, sampling, events.put, ignore_eos,
                            json_schema, grammar, speculative, logit_bias, logprobs, show_tokens)
        self._scheduler.submit(req)
        item = None
        try:
            while not _ends(item):
                item = events.get()
                req.consumed += 1
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            if not _ends(item):
                # Cancelled by the reader: wait (within a step or two) for the
                # scheduler to free the sequence, so it is free when we return.
                req.cancel()
                self._scheduler.wake()
                deadline = time.monotonic() + 10
                while not _ends(item):
                    try:
                        item = events.get(timeout=max(0.0, deadline - time.monotonic()))
                    except queue.Empty:
                        break

    async def astream_tokens(self, tokens: list[int], *, max_tokens: int = 256,
                             stop: Iterable[str] | str = (), seed: int | None = None,
                             cancel: threading.Event | None = None, ignore_eos: bool = False,
                             json_schema=None, grammar: str | None = None, speculative: str | None = None,
                             logit_bias: dict | None = None, logprobs: int | None = None,
                             show_tokens: tuple[int, ...] = (),
                             **sampling):
        """Async :meth:`stream_tokens`: events arrive on the running event
        loop straight from the scheduler thread. Cancelling the task, or
        leaving the loop, cancels the request."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        args = (tokens, max_tokens, stop, seed, cancel, sampling,
                lambda item: loop.call_soon_threadsafe(events.put_nowait, item), ignore_eos,
                json_schema, grammar, speculative, logit_bias, logprobs, show_tokens)
        # A grammar is converted and parsed in a worker thread: a large one
        # must not stall the event loop every other client shares.
        constrained = json_schema is not None or grammar is not None
        req = await asyncio.to_thread(self._request, *args) if constrained else self._request(*args)
        self._scheduler.submit(req)
        item = None
        try:
            while not _ends(item):
                item = await events.get()
                req.consumed += 1
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            if not _ends(item):
                req.cancel()
                self._scheduler.wake()
                try:  # as in stream_tokens: return once the sequence is free
                    await asyncio.wait_for(_until_done(events), 10)
                except BaseException:
                    pass

    def stream(self, prompt: str, *, max_tokens: int = 256, stop: Iterable[str] | str = (),
               seed: int | None = None, **sampling) -> Iterator[TextEvent | DoneEvent]:
        """Stream a completion of a plain-text ``prompt``.

        >>> for event in engine.stream("Once upon a time", max_tokens=20):  # doctest: +SKIP
        ...     print(event.text, end="", flush=True)

        Sampling options: temperature (0 = greedy), top_k, top_p, min_p,
        repeat_penalty, repeat_last_n. The last event's ``.stats`` has the
        figures and ``finish_reason``.
        """
        return self.stream_tokens(self.tokenize(prompt), max_tokens=max_tokens, stop=stop,
                                  seed=seed, **sampling)

    def generate(self, prompt: str, **kwargs) -> str:
        """Complete ``prompt`` and return the text (see :meth:`stream`)."""
        return "".join(e.text for e in self.stream(prompt, **kwargs))

    # -- chat --------------------------------------------------------------
    def chat_tokens(self, messages: list[dict], add_generation_prompt: bool = True, *,
                    tools: list[dict] | None = None) -> list[int]:
        """Render ``messages`` (and ``tools``, in OpenAI's form) through the
        chat template and tokenize them.

        The template's own text may contain control tokens; the messages'
        content is tokenized as plain text, so a user who types
        ``<|im_end|>`` cannot close a turn. A template that knows nothing
        of tools gets them written into the system message
        (edgeinfer.tools)."""
        from .template import render_segments
        from .tools import prompt_messages

        self._check_open()  # the vocabulary below is freed with the model
        if self.system_prompt and not any(m.get("role") == "system" for m in messages):
            messages = [{"role": "system", "content": self.system_prompt}, *messages]
        messages, tools = prompt_messages(messages, tools, self.chat_template)
        vocab = self.vocab
        segments = render_segments(self.chat_template, messages, add_generation_prompt, tools=tools,
                                   bos_token=vocab.token_text(vocab.bos), eos_token=vocab.token_text(vocab.eos))
        ids: list[int] = []
        for text, is_template in segments:
            if text:
                ids.extend(self._segment_tokens(text, is_template))
        if vocab.add_bos and vocab.bos >= 0 and (not ids or ids[0] != vocab.bos):
            ids.insert(0, vocab.bos)
        return ids

    def _segment_tokens(self, text: str, special: bool) -> list[int] | tuple[int, ...]:
        """The tokens of one piece of a rendered chat. Long pieces (a
        system prompt every request repeats) are remembered, so that a
        request does not tokenize them again (chat_tokens of a 1,084-token
        chat: 6.6 ms the first time, 2.6 ms after)."""
        if len(text) < SEGMENT_MEMO_CHARS:
            return self.vocab.tokenize(text, add_bos=False, special=special)
        key = (text, special)
        with self._memo_lock:
            ids = self._memo.get(key)
            if ids is not None:
                self._memo.move_to_end(key)
                return ids
        ids = tuple(self.vocab.tokenize(text, add_bos=False, special=special))
        with self._memo_lock:
            self._memo[key] = ids
            while len(self._memo) > SEGMENT_MEMO_SIZE:
                self._memo.popitem(last=False)
        return ids

    def stream_chat(self, messages: list[dict], *, tools: list[dict] | None = None, tool_choice=None,
                    parallel_tool_calls: bool = True, **kwargs) -> Iterator:
        """Stream the assistant's reply to OpenAI-style ``messages``:
        TextEvents, then a DoneEvent.

        With ``tools`` (OpenAI's form: ``{"type": "function", "function":
        {"name", "description", "parameters"}}``) the stream carries
        ToolCallEvents too, and ``tool_choice`` ("auto", "none",
        "required" or ``{"type": "function", "function": {"name": ...}}``)
        is kept by grammar (edgeinfer.tools)."""
        tokens, kwargs, parser = self._chat_request(messages, tools, tool_choice, parallel_tool_calls, kwargs)
        events = self.stream_tokens(tokens, **kwargs)
        if parser is None:
            return events
        from .tool_calls import split_calls

        return split_calls(events, parser)

    def _chat_request(self, messages, tools, tool_choice, parallel: bool, kwargs: dict):
        """(prompt tokens, stream options, a tool-call parser or None)."""
        if tools is None:
            if tool_choice not in (None, "auto", "none"):
                raise RequestError("tool_choice", "tool_choice needs tools")
            return self.chat_tokens(messages), kwargs, None
        from .tools import ToolUse

        use = ToolUse.of(tools, tool_choice, parallel, self.chat_template)
        if use.choice.mode != "none" and (kwargs.get("json_schema") is not None or kwargs.get("grammar") is not None):
            raise RequestError("tools", "tools cannot be combined with a JSON schema or grammar")
        tokens = self.chat_tokens(messages, tools=use.offered or None)
        gbnf = use.grammar()
        if gbnf is not None:
            kwargs = {**kwargs, "grammar": gbnf,
                      "show_tokens": use.shown_tokens(lambda t: self.tokenize(t, add_bos=False, special=True))}
        from .tool_calls import CallParser

        return tokens, kwargs, CallParser.of(use)

    def chat(self, messages: list[dict], *, tools: list[dict] | None = None, **kwargs):
        """The assistant's reply to ``messages``: a string, or with
        ``tools`` a :class:`~edgeinfer.tools.Reply` (its ``content``,
        ``tool_calls`` with arguments as dicts, and ``finish_reason``).

        >>> engine.chat([{"role": "user", "content": "Capital of France?"}],  # doctest: +SKIP
        ...             temperature=0)
        """
        if tools is None:
            return "".join(e.text for e in self.stream_chat(messages, **kwargs))
        from .tool_calls import collect

        return collect(self.stream_chat(messages, tools=tools, **kwargs))

    # -- code completion ---------------------------------------------------
    def infill_tokens(self, prefix: str, suffix: str = "", *, extra=(), middle: str = "",
                      max_tokens: int = 256) -> list[int]:
        """The fill-in-the-middle prompt for a cursor between ``prefix``
        and ``suffix`` (edgeinfer.fim): ``extra`` other files' chunks as
        (name, text), ``middle`` text the answer starts with. It fits the
        context with ``max_tokens`` to spare. FimUnsupportedError for a
        model without FIM tokens."""
        from .fim import FimTokens, Splits, fim_prompt

        self._check_open()
        vocab = self.vocab
        if self._fim_splits is None:
            self._fim_splits = Splits()
        split = self._fim_splits.choose(prefix, suffix)
        return fim_prompt(lambda text: vocab.tokenize(text, add_bos=False), FimTokens.of(vocab.handle), prefix,
                          suffix, extra=extra, middle=middle, budget=self.n_ctx - max(1, max_tokens),
                          add_bos=vocab.bos if vocab.add_bos else None, model=self.name, split=split)

    def stream_infill(self, prefix: str, suffix: str = "", *, extra=(), middle: str = "", max_tokens: int = 256,
                      max_lines: int | None = None, dedent: bool = False, **kwargs) -> Iterator:
        """Stream the code that goes between ``prefix`` and ``suffix``:
        TextEvents, then a DoneEvent. The answer ends at ``max_lines``
        lines, at a line below the cursor's indentation (``dedent``), or
        at a line the suffix has already; a tail the suffix starts with is
        left out. The cursor's line goes after the middle token, so that
        typing in it and asking again reads only what was typed."""
        from .fim import EditorFit, fitted
        from .sequence import BetweenSteps

        tokens = self.infill_tokens(prefix, suffix, extra=extra, middle=middle, max_tokens=max_tokens)
        stop = kwargs.pop("cancel", None) or BetweenSteps()   # the editor's rules end it between steps
        fit = EditorFit(prefix + middle, suffix, max_lines=max_lines, dedent=dedent)
        return fitted(self.stream_tokens(tokens, max_tokens=max_tokens, cancel=stop, **kwargs), fit, stop)

    def infill(self, prefix: str, suffix: str = "", **kwargs) -> str:
        """The code between ``prefix`` and ``suffix`` (see :meth:`stream_infill`).

        >>> engine.infill("def add(a, b):\n    return ", "\n\nprint(add(1, 2))\n")  # doctest: +SKIP
        'a + b'
        """
        return "".join(e.text for e in self.stream_infill(prefix, suffix, **kwargs))

    # -- embeddings --------------------------------------------------------
    def embed(self, texts: str | Iterable[str], *, normalize: bool = True, truncate: bool = True) -> np.ndarray:
        """One vector per text, as a float32 array of shape (n, dim),
        unit length unless ``normalize=False``. A text longer than the
        model's context is cut to fit (``truncate=False``: refused with
        ContextOverflowError); :meth:`embed_tokens` says which were.
        Texts from callers on several threads share batches. An embedding
        model only (``all-minilm-l6-v2``); a chat model raises RequestError.

        >>> engine = edgeinfer.load("all-minilm-l6-v2")                    # doctest: +SKIP
        >>> v = engine.embed(["a cat sat on the mat", "a dog lay on the rug"])
        >>> float(v[0] @ v[1])                                             # cosine similarity
        """
        if isinstance(texts, str):
            texts = [texts]
        self._check_open()
        return self.embed_tokens([self.tokenize(t, add_bos=True) for t in texts], normalize=normalize,
                                 truncate=truncate).vectors

    def embed_tokens(self, inputs: list[list[int]], *, normalize: bool = True,
                     truncate: bool = True) -> Embeddings:
        """:meth:`embed` for inputs already tokenized (each with the
        model's special tokens), with each input's token count and whether
        it was cut."""
        self._check_open()
        if not self.embedding:
            raise chat_model_error(self.name)
        fitted = [fit_input(list(t), self.n_ctx, truncate, i) for i, t in enumerate(inputs)]
        for i, (toks, _) in enumerate(fitted):
            if not all(0 <= t < self.n_vocab for t in toks):
                raise RequestError("input", f"input[{i}]: token ids must be from 0 to {self.n_vocab - 1}")
        vectors = self._batcher.vectors([toks for toks, _ in fitted]) if fitted else \
            np.zeros((0, self._ctx.n_embd), dtype=np.float32)
        return Embeddings(normalized(vectors) if normalize else vectors, [len(t) for t, _ in fitted],
                          [cut for _, cut in fitted])

    @property
    def n_embd(self) -> int:
        """The width of the model's vectors."""
        return self._ctx.n_embd

    # -- asyncio -----------------------------------------------------------
    async def astream(self, prompt: str, **kwargs):
        """Async version of :meth:`stream`; the event loop never blocks.
        Cancelling the task cancels the generation."""
        async for event in self.astream_tokens(self.tokenize(prompt), **kwargs):
            yield event

    async def astream_chat(self, messages: list[dict], *, tools: list[dict] | None = None, tool_choice=None,
                           parallel_tool_calls: bool = True, **kwargs):
        """Async version of :meth:`stream_chat`."""
        tokens, kwargs, parser = self._chat_request(messages, tools, tool_choice, parallel_tool_calls, kwargs)
        events = self.astream_tokens(tokens, **kwargs)
        if parser is not None:
            from .tool_calls import asplit_calls

            events = asplit_calls(events, parser)
        async with contextlib.aclosing(events) as stream:
            async for event in stream:
                yield event


def _ends(item) -> bool:
    """True for the item that ends a stream: its DoneEvent or an error."""
    return isinstance(item, (DoneEvent, BaseException))


async def _until_done(events) -> None:
    while not _ends(await events.get()):
        pass
