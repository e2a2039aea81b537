"""The llama.cpp-backed runtime: load a model, tokenize, prefill, decode.

Everything that touches llama.cpp goes through :class:`Engine`: the model,
the context, the tokenizer and the KV operations of each sequence, through
llama-cpp-python's low-level API (``llama_cpp.llama_*``). Generation runs
in the engine's :class:`~edgeinfer.scheduler.Scheduler`, one thread that
batches every caller's sequences into shared decode steps.

Generation comes in three layers (as in mlx-lm): the scheduler's step is
the hot loop; :meth:`Engine.stream` yields :class:`TextEvent` and a final
:class:`DoneEvent`; :meth:`Engine.generate` joins the stream into a string.
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import os
import queue
import threading
import time
from pathlib import Path
from typing import Iterable, Iterator

import llama_cpp as lc

from . import hardware, selftest
from . import native as _native
from .errors import ContextOverflowError, EngineBusyError, EngineError, GrammarError, SpeculativeError
from .fit import box_profile, refusal
from .gguf_file import GGUFInfo, read_gguf
from .grammar import check_grammar
from .grammar import resolve as constrain
from .events import DoneEvent, Stats, TextEvent
from .kv import SequenceKV
from .prompt_cache import PromptCache
from .sampling import DEFAULTS as DEFAULT_SAMPLING
from .sampling import check_options
from .speculative import SpecConfig, step_costs_for
from .scheduler import DEFAULT_QUEUE, Request, Scheduler, default_parallel, new_seed

_NO_ABORT = ctypes.cast(None, lc.ggml_abort_callback)
# K cache types by name (ggml type ids).
KV_TYPES = {"f16": lc.GGML_TYPE_F16, "q8_0": lc.GGML_TYPE_Q8_0}


def _take(req: Request, item) -> bool:
    """Count ``item`` as read; raise it if it is an error; True if it ends the stream."""
    req.consumed += 1
    if isinstance(item, BaseException):
        raise item
    return isinstance(item, DoneEvent)


async def _until_done(events) -> None:
    while not isinstance(await events.get(), (DoneEvent, BaseException)):
        pass


class Engine(SequenceKV):
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
                 n_batch: int = 512, mmap: bool = True, mlock: bool = False,
                 seed: int | None = None, n_seq_max: int | None = None, name: str | None = None,
                 sha256: str | None = None, chat_template: str | None = None,
                 lock_timeout: float | None = None, check_memory: bool = True,
                 system_prompt: str | None = None, prompt_cache: "bool | PromptCache" = True,
                 cache_disk: bool = True, cache_memory_budget: int | None = None,
                 cache_disk_budget: int | None = None, flash_attn: bool = False,
                 sampling: dict | None = None, native: str | None = None,
                 stop_on_repeat: bool = True, queue_limit: int = DEFAULT_QUEUE,
                 prefill_chunk: int | None = None, kv_type: str | None = None,
                 speculative: "str | SpecConfig | None" = None, draft: str | os.PathLike | None = None):
        self.path = Path(model_path)
        self.info: GGUFInfo = read_gguf(self.path)  # bounds-checked before llama.cpp sees it
        self.name = name or self.path.name
        self.sha256 = sha256
        # Defaults sized to this machine's memory (fit.box_profile): a small
        # box gets a shorter context, fewer sequences and a q8_0 K cache.
        self.box = box_profile()
        train_ctx = self.info.context_length or self.box.n_ctx
        self.n_ctx = int(n_ctx) if n_ctx else min(self.box.n_ctx, train_ctx)
        kv_type = kv_type or self.box.kv_type
        if kv_type not in KV_TYPES:
            raise ValueError(f"kv_type must be one of {', '.join(KV_TYPES)}, not {kv_type!r}")
        self.kv_type = kv_type
        if check_memory:
            self._check_memory()
        # Threads: what the caller says, else this machine's tuned profile
        # for this model (`edgeinfer tune`), else physical cores.
        self.threads_source = "given" if (threads or threads_batch) else "default"
        if not (threads or threads_batch):
            from .tuning import load_profile

            profile = load_profile(sha256)
            if profile is not None:
                threads, threads_batch = profile.threads, profile.threads_batch
                self.threads_source = "tuned"
        self.threads = int(threads or hardware.default_threads())
        self.threads_batch = int(threads_batch or self.threads)
        if self.threads_source != "given":
            # A busy box: leave the cores other work holds (hardware.threads_for_load).
            busy = hardware.busy_cores()
            cap = hardware.threads_for_load(max(self.threads, self.threads_batch), busy)
            if cap < max(self.threads, self.threads_batch):
                self.threads, self.threads_batch = min(self.threads, cap), min(self.threads_batch, cap)
                self.threads_source += f", capped at {cap}: {busy:.1f} cores busy with other work"
        self.seed = seed
        self.lock_timeout = lock_timeout
        if speculative is None:   # a draft model given is a choice made
            speculative = "draft" if draft is not None else "auto"
        self.speculative = speculative if isinstance(speculative, SpecConfig) else SpecConfig(mode=speculative)
        self.draft = None
        if self.speculative.mode == "draft" and draft is None:
            raise SpeculativeError("speculative='draft' needs a draft model")
        self._cancel = threading.Event()       # engine.cancel() during a whole-context call
        self._model = self._ctx = None
        self._batch = None
        self._scheduler: Scheduler | None = None
        self._local = threading.local()         # token_to_piece buffers, one per thread
        # Native code is tried in a child process before this one trusts it
        # (selftest.py): the first load of a file on a machine costs a test
        # run, later loads read the record.
        self.native: selftest.Verdict = selftest.ensure(
            self.path, self.info, sha256=sha256, name=self.name, forced=_native.forced_setting(native),
            threads=self.threads, threads_batch=self.threads_batch, mmap=mmap)
        _native.init_backend()
        self._mparams = _native.ModelParams(self.native.setting, self.info, mmap=mmap, mlock=mlock)
        self._model = lc.llama_model_load_from_file(str(self.path).encode(), self._mparams.params)
        if not self._model:
            raise EngineError(f"llama.cpp could not load {self.path}",
                              hint="run with EDGEINFER_DEBUG=1 to see llama.cpp's log")
        cparams = lc.llama_context_default_params()
        cparams.n_ctx = self.n_ctx
        cparams.n_batch = cparams.n_ubatch = self.n_batch = min(int(n_batch), self.n_ctx)
        if n_seq_max is None:
            n_seq_max = min(default_parallel(self.n_ctx, hardware.default_threads()), self.box.max_parallel)
        cparams.n_seq_max = self.n_seq_max = max(1, int(n_seq_max))
        # One pool of n_ctx cells for every sequence, of any length; without
        # it llama.cpp splits the context evenly between them.
        cparams.kv_unified = True
        cparams.n_threads = self.threads
        cparams.n_threads_batch = self.threads_batch
        cparams.no_perf = True
        # Flash attention is off by default: its CPU kernel takes another
        # path for short batches, so the few tokens evaluated after a
        # reused prefix would get different logits than in a cold prefill
        # (up to 0.65 on the default model) and a cache hit could change
        # the answer. Off, a hit is bit-exact. On is a few % faster.
        cparams.flash_attn_type = (lc.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn
                                   else lc.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        self.flash_attn = bool(flash_attn)
        # Only K: llama.cpp quantizes the V cache only with flash attention.
        cparams.type_k = KV_TYPES[kv_type]
        self._kv_types = (cparams.type_k, cparams.type_v)
        self._ctx = lc.llama_init_from_model(self._model, cparams)
        if not self._ctx:
            self._free()
            raise EngineError(f"llama.cpp could not create a context of {self.n_ctx} tokens",
                              hint="try a smaller n_ctx")
        # The abort callback is polled by ggml between graph nodes, so a
        # cancel lands inside a long prefill, not after it.
        self._abort_cb = lc.ggml_abort_callback(lambda _data: self._should_abort())
        lc.llama_set_abort_callback(self._ctx, self._abort_cb, None)
        self._abort_on = True
        self._mem = lc.llama_get_memory(self._ctx)
        self._vocab = lc.llama_model_get_vocab(self._model)
        self.n_vocab = lc.llama_vocab_n_tokens(self._vocab)
        self._batch = lc.llama_batch_init(self.n_batch, 0, self.n_seq_max)
        self.add_bos = bool(lc.llama_vocab_get_add_bos(self._vocab))
        self._kv_tokens: dict[int, list[int]] = {s: [] for s in range(self.n_seq_max)}
        self.last_seq = 0   # the sequence of the request admitted last
        self.chat_template = chat_template if chat_template is not None else self.info.chat_template
        self.system_prompt = system_prompt or None
        # The model's own defaults (from its catalog entry) over ours.
        self.sampling = {**DEFAULT_SAMPLING, **check_options(sampling or {})}
        self.last_stats: Stats | None = None
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
        else:
            self.prompt_cache = None
        self._scheduler = Scheduler(self, n_seq=self.n_seq_max, queue_limit=queue_limit,
                                    prefill_chunk=prefill_chunk)
        if draft is not None:
            from .draft import DraftModel

            try:
                self.draft = DraftModel(self, draft)
            except BaseException:
                self.close()
                raise
        self._step_costs: dict[int, float] | None = None
        if self.speculative.mode == "auto":
            try:
                self._step_costs = step_costs_for(self)
            except Exception:   # no measure, no auto drafts; lookup still works when asked for
                self._step_costs = None

    def step_costs(self) -> dict[int, float] | None:
        """What a decode step of w tokens costs here, relative to one token
        (speculative auto weighs drafts with it); None if not measured."""
        return self._step_costs

    # -- lifecycle ---------------------------------------------------------
    def _check_memory(self) -> None:
        err = refusal(self.name, self.info, self.n_ctx)
        if err is not None:
            raise err

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
        if self._batch is not None:
            lc.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx:
            lc.llama_free(self._ctx)
            self._ctx = None
        if self._model:
            lc.llama_model_free(self._model)
            self._model = None

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        # Nobody holds the engine, so no stream reads from it: stop the
        # scheduler (which holds only a weak proxy), then free.
        try:
            sched = getattr(self, "_scheduler", None)
            if sched is not None and sched._thread is not threading.current_thread():
                if not sched.close(10):
                    return  # never free under a running decode
            self._free()
        except Exception:
            pass

    def status(self) -> dict:
        """What the scheduler is doing: active sequences, queue depth, KV
        cells used, prompt-cache hits, steps by sequences per step, recent
        decode tokens/s."""
        self._check_open()
        return self._scheduler.status()

    def _exclusive(self, fn):
        """Run ``fn`` on the scheduler thread while no sequence runs."""
        self._check_open()

        def run():
            self._cancel.clear()
            self._scheduler._abort_events = [self._cancel]
            try:
                return fn()
            finally:
                self._scheduler._abort_events = []

        return self._scheduler.call(run, timeout=self.lock_timeout)

    def set_threads(self, threads: int, threads_batch: int | None = None) -> None:
        """Change the decode and prompt-processing thread counts in place."""
        def apply():
            self.threads = int(threads)
            self.threads_batch = int(threads_batch or threads)
            lc.llama_set_n_threads(self._ctx, self.threads, self.threads_batch)

        self._exclusive(apply)

    def benchmark(self, n_prompt: int = 512, n_gen: int = 128, seq: int = 0) -> tuple[float, float]:
        """Time a cold prefill of ``n_prompt`` tokens and ``n_gen`` single-token
        decodes, as llama-bench's pp and tg tests do (fixed tokens, no
        sampling, no prompt cache). Returns (prefill seconds, decode seconds)."""
        return self._exclusive(lambda: self._benchmark(n_prompt, n_gen, seq))

    def _benchmark(self, n_prompt: int, n_gen: int, seq: int) -> tuple[float, float]:
        # Ordinary text tokens, spread over the vocabulary, never control tokens.
        ids = [t for t in range(min(self.n_vocab, 30000)) if not lc.llama_vocab_is_control(self._vocab, t)
               and not self.is_eog(t)]
        prompt = [ids[(i * 7919) % len(ids)] for i in range(n_prompt)]
        self._kv_clear(seq)
        t0 = time.perf_counter()
        if n_prompt and self._decode(prompt, seq) != 0:
            raise EngineError("benchmark cancelled")
        t1 = time.perf_counter()
        self._kv_clear(seq)
        tok = ids[len(ids) // 2]
        t2 = time.perf_counter()
        for _ in range(n_gen):
            if self._decode([tok], seq) != 0:
                raise EngineError("benchmark cancelled")
        t3 = time.perf_counter()
        self._kv_clear(seq)
        return t1 - t0, t3 - t2

    def eval_logits(self, tokens: list[int], seq: int = 0):
        """Logits for every position of ``tokens`` (at most n_batch of them),
        evaluated from an empty sequence, as a float32 array of shape
        (len(tokens), n_vocab). For quality measurements, not generation."""
        import numpy as np

        self._check_open()
        if not 0 < len(tokens) <= self.n_batch:
            raise ValueError(f"eval_logits takes 1..{self.n_batch} tokens")

        def run():
            self._kv_clear(seq)
            b = self._batch
            for i, t in enumerate(tokens):
                b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = t, i, 1, 1
                b.seq_id[i][0] = seq
            b.n_tokens = len(tokens)
            self._abort_during(True)
            rc = lc.llama_decode(self._ctx, b)
            if rc != 0:
                self._kv_clear(seq)
                raise EngineError(f"llama_decode failed with status {rc}")
            ptr = lc.llama_get_logits(self._ctx)
            out = np.ctypeslib.as_array(ptr, shape=(len(tokens), self.n_vocab)).copy()
            self._kv_clear(seq)
            return out

        return self._exclusive(run)

    def cancel(self) -> None:
        """Stop every running and waiting generation (prefill as well as
        decode); safe from any thread."""
        self._cancel.set()
        if self._scheduler is not None:
            self._scheduler.cancel_all()

    def _should_abort(self) -> bool:
        return self._scheduler.should_abort()

    # -- tokens ------------------------------------------------------------
    def _check_open(self) -> None:
        if self._ctx is None:
            raise EngineError(f"{self.name} is closed", hint="load the model again with edgeinfer.load()")

    def tokenize(self, text: str, *, add_bos: bool | None = None, special: bool = False) -> list[int]:
        """Text to token ids. With ``special=False`` (the default) text such
        as ``<|im_end|>`` stays plain text and never becomes a control token."""
        self._check_open()
        data = text.encode("utf-8")
        add = self.add_bos if add_bos is None else add_bos
        cap = len(data) + 8
        buf = (lc.llama_token * cap)()
        n = lc.llama_tokenize(self._vocab, data, len(data), buf, cap, add, special)
        if n < 0:
            cap = -n
            buf = (lc.llama_token * cap)()
            n = lc.llama_tokenize(self._vocab, data, len(data), buf, cap, add, special)
        return list(buf[:n])

    def token_bytes(self, token: int, special: bool = False) -> bytes:
        buf = getattr(self._local, "piece", None)
        if buf is None:
            buf = self._local.piece = ctypes.create_string_buffer(256)
        n = lc.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, special)
        if n < 0:
            buf = self._local.piece = ctypes.create_string_buffer(-n)
            n = lc.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, special)
        return buf.raw[:n]

    def detokenize(self, tokens: Iterable[int], special: bool = False) -> str:
        return b"".join(self.token_bytes(t, special) for t in tokens).decode("utf-8", "replace")

    def is_eog(self, token: int) -> bool:
        return bool(lc.llama_vocab_is_eog(self._vocab, token))

    def token_text(self, token_id: int) -> str:
        return self.token_bytes(token_id, special=True).decode("utf-8", "replace")

    def cache_namespace(self) -> str:
        """A hash of everything that makes a saved KV state valid here."""
        ident = self.sha256
        if not ident:  # a bare path: identify the file by name, size and time
            st = self.path.stat()
            ident = f"{self.path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
        lib = getattr(lc.llama_cpp, "_lib", None)
        parts = [ident, str(self.n_ctx), str(self.n_seq_max), lc.__version__,
                 _native.system_info(),
                 str(self._kv_types[0]), str(self._kv_types[1]), f"fa={self.flash_attn}",
                 f"native={self.native.setting}",
                 str(getattr(lib, "_name", ""))]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]

    def _abort_during(self, on: bool) -> None:
        """ggml polls the abort callback at every graph node (~500 times a
        token here), which costs a few % of decode speed. Single-token
        decodes are short, and cancel is checked between them, so the
        callback is installed only for multi-token batches (prefill)."""
        if on != self._abort_on:
            lc.llama_set_abort_callback(self._ctx, self._abort_cb if on else _NO_ABORT, None)
            self._abort_on = on

    def _decode(self, tokens: list[int], seq: int, logits_last: bool = True) -> int:
        """Evaluate ``tokens`` after what ``seq`` holds, in n_batch chunks.
        Returns 0, or 2 when cancelled; raises EngineError on failure."""
        b = self._batch
        kv = self._kv_tokens[seq]
        for start in range(0, len(tokens), self.n_batch):
            chunk = tokens[start:start + self.n_batch]
            pos0 = len(kv)
            for i, t in enumerate(chunk):
                b.token[i] = t
                b.pos[i] = pos0 + i
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = seq
                b.logits[i] = 0
            if logits_last and start + len(chunk) == len(tokens):
                b.logits[len(chunk) - 1] = 1
            b.n_tokens = len(chunk)
            self._abort_during(len(chunk) > 1)
            rc = lc.llama_decode(self._ctx, b)
            if rc != 0:
                self._kv_resync(seq)
                if rc == 2:
                    return 2
                raise EngineError(f"llama_decode failed with status {rc}",
                                  hint="the context may be full; start a new conversation")
            kv.extend(chunk)
        return 0

    # -- generation --------------------------------------------------------
    def eog_tokens(self) -> tuple[int, ...]:
        """Every end-of-generation token of the vocabulary."""
        if getattr(self, "_eog", None) is None:
            self._eog = tuple(t for t in range(self.n_vocab) if lc.llama_vocab_is_eog(self._vocab, t))
        return self._eog

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
                 speculative: str | None = None) -> Request:
        self._check_open()
        gbnf = constrain(json_schema, grammar)
        if gbnf is not None:
            if ignore_eos:
                raise GrammarError("ignore_eos cannot be combined with a schema or grammar: the grammar decides "
                                   "where the answer ends", hint="drop ignore_eos, or the schema")
            check_grammar(self._vocab, gbnf)
        if not tokens:
            tokens = [lc.llama_vocab_bos(self._vocab)]
        if len(tokens) >= self.n_ctx:
            raise ContextOverflowError(
                f"the prompt has {len(tokens):,} tokens but the context holds {self.n_ctx:,}")
        opts = {**self.sampling, **check_options({k: v for k, v in sampling.items() if v is not None})}
        stops = [stop] if isinstance(stop, str) else list(stop or ())
        return Request(list(tokens), int(max_tokens), stops, new_seed(seed, self.seed), opts, sink,
                       cancel_event=cancel, admit_timeout=self.lock_timeout, ignore_eos=bool(ignore_eos),
                       grammar=gbnf, spec=self._spec(speculative))

    def stream_tokens(self, tokens: list[int], *, max_tokens: int = 256, stop: Iterable[str] | str = (),
                      seed: int | None = None, cancel: threading.Event | None = None,
                      ignore_eos: bool = False, json_schema=None, grammar: str | None = None,
                      speculative: str | None = None, **sampling) -> Iterator[TextEvent | DoneEvent]:
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
        speculative decoding for this request (edgeinfer.speculative)."""
        events: queue.SimpleQueue = queue.SimpleQueue()
        req = self._request(tokens, max_tokens, stop, seed, cancel, sampling, events.put, ignore_eos,
                            json_schema, grammar, speculative)
        self._scheduler.submit(req)
        done = False
        item = None
        try:
            while not done:
                item = events.get()
                done = isinstance(item, BaseException)  # an error ends the stream too
                done = _take(req, item)
                yield item
        finally:
            if not done:
                # Cancelled by the reader: wait (within a step or two) for the
                # scheduler to free the sequence, so it is free when we return.
                req.cancel()
                self._scheduler.wake()
                deadline = time.monotonic() + 10
                while not isinstance(item, (DoneEvent, BaseException)):
                    try:
                        item = events.get(timeout=max(0.0, deadline - time.monotonic()))
                    except queue.Empty:
                        break

    async def astream_tokens(self, tokens: list[int], *, max_tokens: int = 256,
                             stop: Iterable[str] | str = (), seed: int | None = None,
                             cancel: threading.Event | None = None, ignore_eos: bool = False,
                             json_schema=None, grammar: str | None = None, speculative: str | None = None,
                             **sampling):
        """Async :meth:`stream_tokens`: events arrive on the running event
        loop straight from the scheduler thread. Cancelling the task, or
        leaving the loop, cancels the request."""
        import asyncio

        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        req = self._request(tokens, max_tokens, stop, seed, cancel, sampling,
                            lambda item: loop.call_soon_threadsafe(events.put_nowait, item), ignore_eos,
                            json_schema, grammar, speculative)
        self._scheduler.submit(req)
        done = False
        try:
            while not done:
                item = await events.get()
                done = isinstance(item, BaseException)  # an error ends the stream too
                done = _take(req, item)
                yield item
        finally:
            if not done:
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
    def chat_tokens(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Render ``messages`` through the chat template and tokenize them.

        The template's own text may contain control tokens; the messages'
        content is tokenized as plain text, so a user who types
        ``<|im_end|>`` cannot close a turn."""
        from .chat import render_segments

        self._check_open()  # the vocabulary below is freed with the model
        if self.system_prompt and not any(m.get("role") == "system" for m in messages):
            messages = [{"role": "system", "content": self.system_prompt}, *messages]
        segments = render_segments(self.chat_template, messages, add_generation_prompt,
                                   bos_token=self.token_text(lc.llama_vocab_bos(self._vocab)),
                                   eos_token=self.token_text(lc.llama_vocab_eos(self._vocab)))
        ids: list[int] = []
        bos = lc.llama_vocab_bos(self._vocab)
        for text, is_template in segments:
            if text:
                ids.extend(self.tokenize(text, add_bos=False, special=is_template))
        if self.add_bos and bos >= 0 and (not ids or ids[0] != bos):
            ids.insert(0, bos)
        return ids

    def stream_chat(self, messages: list[dict], **kwargs) -> Iterator[TextEvent | DoneEvent]:
        """Stream the assistant's reply to OpenAI-style ``messages``."""
        return self.stream_tokens(self.chat_tokens(messages), **kwargs)

    def chat(self, messages: list[dict], **kwargs) -> str:
        """The assistant's reply to ``messages`` as a string.

        >>> engine.chat([{"role": "user", "content": "Capital of France?"}],  # doctest: +SKIP
        ...             temperature=0)
        """
        return "".join(e.text for e in self.stream_chat(messages, **kwargs))

    # -- asyncio -----------------------------------------------------------
    async def astream(self, prompt: str, **kwargs):
        """Async version of :meth:`stream`; the event loop never blocks.
        Cancelling the task cancels the generation."""
        async for event in self.astream_tokens(self.tokenize(prompt), **kwargs):
            yield event

    async def astream_chat(self, messages: list[dict], **kwargs):
        """Async version of :meth:`stream_chat`."""
        async for event in self.astream_tokens(self.chat_tokens(messages), **kwargs):
            yield event
