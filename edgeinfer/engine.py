"""The llama.cpp-backed runtime: load a model, tokenize, prefill, decode.

Everything that touches llama.cpp goes through :class:`Engine`. It drives
llama-cpp-python's low-level API (``llama_cpp.llama_*``) directly: one
preallocated batch, llama.cpp's own sampler chain, the abort callback for
cancelling prefill, and per-sequence KV operations. Every KV call names its
sequence id, so several sequences can later share one context.

Generation comes in three layers (as in mlx-lm): ``_run()`` is the hot
loop; :meth:`Engine.stream` yields :class:`TextEvent` and a final
:class:`DoneEvent`; :meth:`Engine.generate` joins the stream into a string.
"""

from __future__ import annotations

import codecs
import ctypes
import hashlib
import os
import threading
import time
from pathlib import Path
from typing import Iterable, Iterator

import llama_cpp as lc

from . import hardware, selftest
from . import native as _native
from .errors import ContextOverflowError, EngineBusyError, EngineError, MemoryFitError
from .fit import DEFAULT_N_CTX, fit_hint, memory_shortfall
from .gguf_file import GGUFInfo, read_gguf
from .events import DoneEvent, Stats, TextEvent
from .prompt_cache import PromptCache, common_prefix
from .sampling import DEFAULTS as DEFAULT_SAMPLING
from .sampling import StopMatcher, check_options, repeating, sampler_chain

_NEVER = threading.Event()  # a cancel event that is never set
_NO_ABORT = ctypes.cast(None, lc.ggml_abort_callback)


class Engine:
    """A loaded model and its llama.cpp context.

    >>> import edgeinfer
    >>> with edgeinfer.load("smollm2-135m-instruct") as engine:   # doctest: +SKIP
    ...     print(engine.chat([{"role": "user", "content": "Hi!"}], max_tokens=32))

    One generation runs at a time; a second caller waits up to
    ``lock_timeout`` seconds (None: forever), then gets EngineBusyError.
    :meth:`cancel` stops a running prefill or decode from any thread.
    """

    def __init__(self, model_path: str | os.PathLike, *, n_ctx: int = DEFAULT_N_CTX,
                 threads: int | None = None, threads_batch: int | None = None,
                 n_batch: int = 512, mmap: bool = True, mlock: bool = False,
                 seed: int | None = None, n_seq_max: int = 1, name: str | None = None,
                 sha256: str | None = None, chat_template: str | None = None,
                 lock_timeout: float | None = None, check_memory: bool = True,
                 system_prompt: str | None = None, prompt_cache: "bool | PromptCache" = True,
                 cache_disk: bool = True, cache_memory_budget: int | None = None,
                 cache_disk_budget: int | None = None, flash_attn: bool = False,
                 sampling: dict | None = None, native: str | None = None,
                 stop_on_repeat: bool = True):
        self.path = Path(model_path)
        self.info: GGUFInfo = read_gguf(self.path)  # bounds-checked before llama.cpp sees it
        self.name = name or self.path.name
        self.sha256 = sha256
        train_ctx = self.info.context_length or n_ctx
        self.n_ctx = int(n_ctx) if n_ctx else min(DEFAULT_N_CTX, train_ctx)
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
        self._lock = threading.Lock()
        self._cancel = threading.Event()       # engine.cancel(): whatever is running
        self._req_cancel = _NEVER               # the running request's own cancel event
        self._model = self._ctx = None
        self._batch = None
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
        cparams.n_seq_max = self.n_seq_max = max(1, int(n_seq_max))
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
        self._kv_types = (cparams.type_k, cparams.type_v)
        self._ctx = lc.llama_init_from_model(self._model, cparams)
        if not self._ctx:
            self._free()
            raise EngineError(f"llama.cpp could not create a context of {self.n_ctx} tokens",
                              hint="try a smaller n_ctx")
        # The abort callback is polled by ggml between graph nodes, so a
        # cancel lands inside a long prefill, not after it.
        self._abort_cb = lc.ggml_abort_callback(lambda _data: self._cancelled())
        lc.llama_set_abort_callback(self._ctx, self._abort_cb, None)
        self._abort_on = True
        self._mem = lc.llama_get_memory(self._ctx)
        self._vocab = lc.llama_model_get_vocab(self._model)
        self.n_vocab = lc.llama_vocab_n_tokens(self._vocab)
        self._batch = lc.llama_batch_init(self.n_batch, 0, self.n_seq_max)
        self._piece = ctypes.create_string_buffer(256)
        self.add_bos = bool(lc.llama_vocab_get_add_bos(self._vocab))
        self._kv_tokens: dict[int, list[int]] = {s: [] for s in range(self.n_seq_max)}
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

    # -- lifecycle ---------------------------------------------------------
    def _check_memory(self) -> None:
        short = memory_shortfall(self.info, self.n_ctx)
        if short:
            raise MemoryFitError(f"{self.name} {short}", hint=fit_hint(self.n_ctx))

    def close(self, timeout: float = 30.0) -> None:
        """Free the context and the model; the engine is unusable after.

        A generation running on another thread is cancelled first and
        waited for, so llama.cpp never runs on freed memory."""
        if getattr(self, "_ctx", None) is None:
            return
        self.cancel()
        if not self._lock.acquire(timeout=timeout):
            raise EngineBusyError(f"{self.name} is still generating; it could not be closed")
        try:
            self._free()
        finally:
            self._lock.release()

    def _free(self) -> None:
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
        # At garbage collection never wait: free only if nothing holds the lock.
        try:
            if getattr(self, "_lock", None) is not None and self._lock.acquire(blocking=False):
                try:
                    self._free()
                finally:
                    self._lock.release()
        except Exception:
            pass

    def set_threads(self, threads: int, threads_batch: int | None = None) -> None:
        """Change the decode and prompt-processing thread counts in place."""
        self._check_open()
        self.threads = int(threads)
        self.threads_batch = int(threads_batch or threads)
        lc.llama_set_n_threads(self._ctx, self.threads, self.threads_batch)

    def benchmark(self, n_prompt: int = 512, n_gen: int = 128, seq: int = 0) -> tuple[float, float]:
        """Time a cold prefill of ``n_prompt`` tokens and ``n_gen`` single-token
        decodes, as llama-bench's pp and tg tests do (fixed tokens, no
        sampling, no prompt cache). Returns (prefill seconds, decode seconds)."""
        self._check_open()
        self._acquire()
        try:
            self._cancel.clear()
            # Ordinary text tokens, spread over the vocabulary, never control tokens.
            ids = [t for t in range(min(self.n_vocab, 30000)) if not lc.llama_vocab_is_control(self._vocab, t)
                   and not self.is_eog(t)]
            prompt = [ids[(i * 7919) % len(ids)] for i in range(n_prompt)]
            self.kv_clear(seq)
            t0 = time.perf_counter()
            if n_prompt and self._decode(prompt, seq) != 0:
                raise EngineError("benchmark cancelled")
            t1 = time.perf_counter()
            self.kv_clear(seq)
            tok = ids[len(ids) // 2]
            t2 = time.perf_counter()
            for _ in range(n_gen):
                if self._decode([tok], seq) != 0:
                    raise EngineError("benchmark cancelled")
            t3 = time.perf_counter()
            self.kv_clear(seq)
            return t1 - t0, t3 - t2
        finally:
            self._lock.release()

    def eval_logits(self, tokens: list[int], seq: int = 0):
        """Logits for every position of ``tokens`` (at most n_batch of them),
        evaluated from an empty sequence, as a float32 array of shape
        (len(tokens), n_vocab). For quality measurements, not generation."""
        import numpy as np

        self._check_open()
        if not 0 < len(tokens) <= self.n_batch:
            raise ValueError(f"eval_logits takes 1..{self.n_batch} tokens")
        self._acquire()
        try:
            self._cancel.clear()
            self.kv_clear(seq)
            b = self._batch
            for i, t in enumerate(tokens):
                b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = t, i, 1, 1
                b.seq_id[i][0] = seq
            b.n_tokens = len(tokens)
            self._abort_during(True)
            rc = lc.llama_decode(self._ctx, b)
            if rc != 0:
                self.kv_clear(seq)
                raise EngineError(f"llama_decode failed with status {rc}")
            ptr = lc.llama_get_logits(self._ctx)
            out = np.ctypeslib.as_array(ptr, shape=(len(tokens), self.n_vocab)).copy()
            self.kv_clear(seq)
            return out
        finally:
            self._lock.release()

    def cancel(self) -> None:
        """Stop the running prefill or decode; safe from any thread."""
        self._cancel.set()

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
        n = lc.llama_token_to_piece(self._vocab, token, self._piece, len(self._piece), 0, special)
        if n < 0:
            self._piece = ctypes.create_string_buffer(-n)
            n = lc.llama_token_to_piece(self._vocab, token, self._piece, len(self._piece), 0, special)
        return self._piece.raw[:n]

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

    # -- KV state (every call names its sequence) ---------------------------
    def seq_state(self, seq: int = 0) -> bytearray:
        """The KV state of sequence ``seq``."""
        size = lc.llama_state_seq_get_size(self._ctx, seq)
        out = bytearray(size)  # llama.cpp writes straight into it: one copy
        view = (ctypes.c_uint8 * size).from_buffer(out)
        n = lc.llama_state_seq_get_data(self._ctx, view, size, seq)
        del view
        del out[n:]
        return out

    def restore_seq_state(self, state: bytes | bytearray, tokens: list[int], seq: int = 0) -> bool:
        """Load a state saved by seq_state() for ``tokens`` into ``seq``."""
        self.kv_clear(seq)
        if isinstance(state, bytearray):
            ptr = (ctypes.c_uint8 * len(state)).from_buffer(state)
        else:  # bytes read back from disk: borrow the buffer, no copy
            ptr = ctypes.cast(ctypes.c_char_p(state), ctypes.POINTER(ctypes.c_uint8))
        if lc.llama_state_seq_set_data(self._ctx, ptr, len(state), seq) != len(state) or \
                lc.llama_memory_seq_pos_max(self._mem, seq) != len(tokens) - 1:
            self.kv_clear(seq)
            return False
        self._kv_tokens[seq][:] = tokens
        return True

    def kv_tokens(self, seq: int = 0) -> list[int]:
        """The tokens whose KV state sequence ``seq`` holds."""
        return list(self._kv_tokens[seq])

    def kv_clear(self, seq: int = 0) -> None:
        lc.llama_memory_seq_rm(self._mem, seq, -1, -1)
        self._kv_tokens[seq].clear()

    def _kv_truncate(self, seq: int, n: int) -> int:
        """Keep only the first ``n`` positions of ``seq``; returns how many
        it now holds (0 if llama.cpp could not cut the sequence)."""
        if n < len(self._kv_tokens[seq]):
            if not lc.llama_memory_seq_rm(self._mem, seq, n, -1):
                self.kv_clear(seq)
                return 0
            del self._kv_tokens[seq][n:]
        return len(self._kv_tokens[seq])

    def _kv_resync(self, seq: int) -> None:
        """After an aborted or failed decode, trust llama.cpp's positions."""
        pos_max = lc.llama_memory_seq_pos_max(self._mem, seq)
        del self._kv_tokens[seq][max(pos_max + 1, 0):]

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
    def _acquire(self) -> None:
        timeout = -1 if self.lock_timeout is None else self.lock_timeout
        if not self._lock.acquire(timeout=timeout):
            raise EngineBusyError(f"{self.name} is busy with another generation")

    def _cancelled(self) -> bool:
        return self._cancel.is_set() or self._req_cancel.is_set()

    def stream_tokens(self, tokens: list[int], *, max_tokens: int = 256, stop: Iterable[str] | str = (),
                      seed: int | None = None, seq: int = 0, cancel: threading.Event | None = None,
                      **sampling) -> Iterator[TextEvent | DoneEvent]:
        """Generate from prompt token ids; yields TextEvents, then a DoneEvent.

        ``cancel``, an Event of the caller's, stops this request alone
        (even before it starts), where :meth:`cancel` stops whatever runs."""
        self._check_open()
        if not tokens:
            tokens = [lc.llama_vocab_bos(self._vocab)]
        if len(tokens) >= self.n_ctx:
            raise ContextOverflowError(
                f"the prompt has {len(tokens):,} tokens but the context holds {self.n_ctx:,}")
        opts = {**self.sampling, **check_options({k: v for k, v in sampling.items() if v is not None})}
        stops = [stop] if isinstance(stop, str) else list(stop or ())
        self._acquire()
        try:
            self._cancel.clear()
            self._req_cancel = cancel or _NEVER
            yield from self._run(tokens, int(max_tokens), stops, seed, seq, opts)
        finally:
            self._req_cancel = _NEVER
            self._lock.release()

    def _reuse_prefix(self, tokens: list[int], seq: int) -> int:
        """Make ``seq`` hold the longest reusable prefix of ``tokens``, from
        its own KV state or the prompt cache; returns its length. At least
        one prompt token is left to evaluate, so the sampler gets logits."""
        if not self.reuse_kv:
            self.kv_clear(seq)
            return 0
        n = min(common_prefix(self._kv_tokens[seq], tokens), len(tokens) - 1)
        if self.prompt_cache is not None:
            hit = self.prompt_cache.nearest(tokens, at_least=n)
            if hit is not None:
                k, entry = hit
                k = min(k, len(tokens) - 1)
                if k > n:
                    if self.restore_seq_state(entry.state, list(entry.tokens), seq):
                        n = k
                    else:
                        self.prompt_cache.forget(entry.tokens)
                        n = 0
        return self._kv_truncate(seq, n)

    def _run(self, tokens, max_tokens, stops, seed, seq, opts):
        stats = Stats(prompt_tokens=len(tokens), native=self.native.setting)
        t0 = time.perf_counter()
        n = self._reuse_prefix(tokens, seq)
        kv = self._kv_tokens[seq]
        stats.cached_tokens = n
        if seed is None:
            seed = self.seed if self.seed is not None else int.from_bytes(os.urandom(4), "little")
        chain = sampler_chain(seed, n_vocab=self.n_vocab, vocab=self._vocab, n_ctx=self.n_ctx, **opts)
        try:
            rc = self._decode(tokens[n:], seq)
            t_prefill = time.perf_counter()
            stats.prefill_tps = (len(tokens) - n) / max(t_prefill - t0, 1e-9)
            if rc == 0 and self.prompt_cache is not None and len(tokens) > n:
                self.prompt_cache.put(tokens, self.seq_state(seq))
            if rc == 2:
                stats.finish_reason = "cancelled"
                stats.total_s = time.perf_counter() - t0
                self.last_stats = stats
                yield DoneEvent(stats)
                return
            utf8 = codecs.getincrementaldecoder("utf-8")("replace")
            matcher = StopMatcher(stops)
            t_first = None
            pending_ids: list[int] = []
            generated: list[int] = []
            finish = "length"
            hit_stop_string = False
            while stats.generated_tokens < max_tokens:
                if self._cancelled():
                    finish = "cancelled"
                    break
                tok = lc.llama_sampler_sample(chain, self._ctx, -1)
                if t_first is None:
                    t_first = time.perf_counter()
                    stats.ttft_s = t_first - t0
                if self.is_eog(tok):
                    finish = "stop"
                    break
                stats.generated_tokens += 1
                pending_ids.append(tok)
                generated.append(tok)
                text, stopped = matcher.feed(utf8.decode(self.token_bytes(tok)))
                if text:
                    yield TextEvent(text, pending_ids)
                    pending_ids = []
                if stopped:
                    finish = "stop"
                    hit_stop_string = True
                    break
                if len(kv) >= self.n_ctx:
                    finish = "length"  # the context is full: end cleanly
                    break
                if self.stop_on_repeat and len(generated) % 8 == 0 and repeating(generated):
                    finish = "repetition"  # stuck in a loop: say so rather than run to max_tokens
                    break
                if stats.generated_tokens >= max_tokens:
                    break
                if self._decode([tok], seq) == 2:
                    finish = "cancelled"
                    break
            # Whatever was held back (a possible stop-string prefix, the
            # bytes of an unfinished character) belongs to the answer unless
            # a stop string cut it off; every token id is reported once.
            tail = "" if hit_stop_string else matcher.flush() + utf8.decode(b"", final=True)
            if tail or pending_ids:
                yield TextEvent(tail, pending_ids)
            t_end = time.perf_counter()
            if t_first is not None and stats.generated_tokens > 1:
                stats.decode_tps = (stats.generated_tokens - 1) / max(t_end - t_first, 1e-9)
            stats.finish_reason = finish
            stats.total_s = t_end - t0
            stats.cpu_temperature_c = hardware.cpu_temperature()  # a Pi slows down when hot
            self.last_stats = stats
            yield DoneEvent(stats)
        finally:
            lc.llama_sampler_free(chain)

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
        """Async version of :meth:`stream`; generation runs on a worker
        thread so the event loop never blocks. Cancelling the task cancels
        the generation."""
        from .aio import stream_in_thread

        async for event in stream_in_thread(lambda stop: self.stream(prompt, cancel=stop, **kwargs)):
            yield event

    async def astream_chat(self, messages: list[dict], **kwargs):
        """Async version of :meth:`stream_chat`."""
        from .aio import stream_in_thread

        async for event in stream_in_thread(lambda stop: self.stream_chat(messages, cancel=stop, **kwargs)):
            yield event
