"""The one hot loop: batched decode steps over many sequences.

One thread owns the llama.cpp context. Callers submit a :class:`Request`
and read its events; the thread admits requests from a bounded queue into
sequence slots and runs *steps*. A step is one ``llama_decode`` of

* the next token of every sequence that is generating, then
* prompt chunks of sequences still prefilling, within ``n_batch`` and,
  while anything is generating, within ``prefill_chunk`` tokens, so a long
  new prompt never freezes the streams already running.

After the step every sequence that asked for logits is sampled with its
own sampler chain at its own index in the batch; stop strings, max_tokens,
repetition and cancel are applied per sequence. All sequences share one
unified KV cache: a request is admitted when a slot is free and the
context has room for its prompt plus its max_tokens, so a running
sequence never runs out of room because others arrived. What finished
sequences leave in the cache stays there only until someone needs the
cells.

Work that needs the whole context (a benchmark, logits for a quality
measure, saving a sequence's state) runs on the same thread between
steps, through :meth:`Scheduler.call`.
"""

from __future__ import annotations

import codecs
import collections
import itertools
import os
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Callable

import llama_cpp as lc

from . import heat
from .errors import EngineBusyError, EngineError
from .events import DoneEvent, Stats, TextEvent
from .grammar import GrammarGate
from .sampling import StopMatcher, repeating, sampler_chain
from .speculative import Estimate, NgramIndex, SpecConfig, best_draft

# While other streams decode, a step carries as many prompt tokens as this
# machine prefills in GAP_TARGET seconds (measured as steps run), so a long
# new prompt delays each running stream's next token by about that much.
GAP_TARGET = 0.2
MIN_CHUNK = 16
FIRST_CHUNK = 64              # until a prefill step has been timed
DEFAULT_QUEUE = 64            # requests that may wait for a slot
STALL_EVENTS = 256            # undelivered events after which a sequence waits for its reader


def default_parallel(n_ctx: int, cores: int) -> int:
    """Sequences to run at once: batching gains flatten past about twice
    the core count, and each sequence should have room for 512 tokens on
    average in the shared context."""
    return max(1, min(8, 2 * max(cores, 1), n_ctx // 512))


_ids = itertools.count(1)


@dataclass(eq=False)
class Request:
    """One generation: prompt tokens in, events out through ``sink``.

    ``sink`` is called on the scheduler thread with each TextEvent, the
    final DoneEvent, or an exception for the reader to raise. It must not
    block; the reader counts what it has taken in ``consumed`` so a reader
    that stops reading holds back only its own sequence."""

    tokens: list[int]
    max_tokens: int
    stops: list[str]
    seed: int
    options: dict
    sink: Callable[[object], None]
    cancel_event: threading.Event | None = None   # the caller's own
    admit_timeout: float | None = None            # None: wait for a slot forever
    ignore_eos: bool = False                      # run to max_tokens: no end-of-generation, no loop stop
    grammar: str | None = None                    # GBNF the answer must follow
    spec: SpecConfig | None = None                # speculative decoding; None: off
    id: int = field(default_factory=lambda: next(_ids))
    consumed: int = 0
    # set by the scheduler
    delivered: int = 0
    seq: int = -1
    stats: Stats | None = None
    finished: bool = False

    def __post_init__(self):
        self._cancelled = threading.Event()
        self.submitted = time.perf_counter()
        self.reserve = 0

    def cancel(self) -> None:
        self._cancelled.set()

    def cancelled(self) -> bool:
        return self._cancelled.is_set() or (self.cancel_event is not None and self.cancel_event.is_set())


class _Running:
    """A request in a sequence slot: what is left to evaluate, its sampler
    and the text state between steps."""

    __slots__ = ("req", "seq", "pending", "chain", "gate", "utf8", "matcher", "generated", "pending_ids",
                 "t0", "t_first", "stats", "prefilled", "n_cached", "ngrams", "estimate", "drafts")

    def __init__(self, req: Request, seq: int, n_cached: int, chain, t0: float):
        self.req, self.seq, self.chain, self.t0 = req, seq, chain, t0
        self.gate = None   # a GrammarGate when the request has a grammar
        self.pending = req.tokens[n_cached:]   # tokens still to evaluate
        self.n_cached = n_cached
        self.prefilled = False
        self.utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        self.matcher = StopMatcher(req.stops)
        self.generated: list[int] = []
        self.pending_ids: list[int] = []
        self.t_first: float | None = None
        self.stats = req.stats
        # Speculation: the prompt and answer so far, indexed by n-gram.
        spec = req.spec
        self.ngrams = NgramIndex(req.tokens, spec.ngram, spec.min_ngram) if spec else None
        self.estimate = Estimate() if spec and spec.mode == "auto" else None
        self.drafts: list[int] = []     # drafted after pending[0], in this step


class Scheduler:
    """Runs every generation of one Engine on one thread."""

    def __init__(self, engine, *, n_seq: int, queue_limit: int = DEFAULT_QUEUE,
                 prefill_chunk: int | None = None):
        # A proxy, so that an Engine nobody holds any more is still
        # collected (its __del__ stops this thread, then frees the context).
        self.engine = weakref.proxy(engine)
        self.n_seq = n_seq
        self.queue_limit = max(0, int(queue_limit))
        self.fixed_chunk = int(prefill_chunk) if prefill_chunk else None  # None: sized by measurement
        self._prefill_tps = 0.0
        self._cond = threading.Condition()
        self._queue: collections.deque[Request] = collections.deque()
        self._calls: collections.deque = collections.deque()
        self._running: dict[int, _Running] = {}        # seq → running request
        self._idle_since = {s: 0.0 for s in range(n_seq)}  # LRU of free slots' cached KV
        self._closing = False
        self._abort_events: list[threading.Event] = []
        self.counters = collections.Counter()
        self.steps_by_size: collections.Counter = collections.Counter()  # sequences in a step → steps
        self.max_sequences_in_step = 0
        self._recent = collections.deque(maxlen=256)      # (time, tokens generated in the step)
        self._thread = threading.Thread(target=self._loop, name="edgeinfer-scheduler", daemon=True)
        self._thread.start()

    # -- the caller's side ------------------------------------------------
    def submit(self, req: Request) -> None:
        """Queue ``req``; raises EngineBusyError at once if the queue is full."""
        with self._cond:
            if self._closing:
                raise EngineError(f"{self.engine.name} is closed",
                                  hint="load the model again with edgeinfer.load()")
            waiting = len(self._queue)
            free = max(0, self.n_seq - len(self._running))
            if waiting >= self.queue_limit + free:
                self.counters["busy"] += 1
                raise EngineBusyError(f"{self.engine.name} is busy: {len(self._running)} sequences "
                                      f"running and {waiting} requests waiting")
            self._queue.append(req)
            self._cond.notify()

    def call(self, fn: Callable, timeout: float | None = None):
        """Run ``fn()`` on the scheduler thread while no sequence runs;
        returns its result or raises what it raised."""
        if threading.current_thread() is self._thread:
            return fn()
        done = threading.Event()
        box: list = []
        item = (fn, done, box)
        with self._cond:
            if self._closing:
                raise EngineError(f"{self.engine.name} is closed",
                                  hint="load the model again with edgeinfer.load()")
            self._calls.append(item)
            self._cond.notify()
        if not done.wait(timeout):
            with self._cond:
                if item in self._calls:
                    self._calls.remove(item)
                    raise EngineBusyError(f"{self.engine.name} is busy with other generations")
            done.wait()
        ok, value = box[0]
        if not ok:
            raise value
        return value

    def wake(self) -> None:
        """Have the loop look at the queue now (a request was cancelled)."""
        with self._cond:
            self._cond.notify()

    def cancel_all(self) -> None:
        with self._cond:
            for r in list(self._queue) + [run.req for run in self._running.values()]:
                r.cancel()
            self._cond.notify()

    def close(self, timeout: float = 30.0) -> bool:
        """Cancel everything, stop the thread; False if it did not stop."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self.cancel_all()
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def status(self) -> dict:
        with self._cond:
            running = len(self._running)
            queued = len(self._queue)
        now = time.perf_counter()
        recent = [(t, n) for t, n in list(self._recent) if now - t < 10]
        tps = 0.0
        if len(recent) > 1:
            span = recent[-1][0] - recent[0][0]
            tps = sum(n for _, n in recent[1:]) / span if span > 0 else 0.0
        return {
            "active_sequences": running, "queue_depth": queued, "parallel": self.n_seq,
            "queue_limit": self.queue_limit, "kv_cells_used": self.engine.kv_cells_used(),
            "n_ctx": self.engine.n_ctx, "prompt_cache_hits": self.counters["cache_hits"],
            "requests": self.counters["requests"], "busy_refusals": self.counters["busy"],
            "steps": self.counters["steps"], "max_sequences_in_step": self.max_sequences_in_step,
            "steps_by_sequences": dict(sorted(self.steps_by_size.items())),
            "generated_tokens": self.counters["generated"], "prefill_tokens": self.counters["prefilled"],
            "decode_tps": round(tps, 2), "prefill_chunk": self.prefill_chunk,
            "drafted_tokens": self.counters["drafted"], "accepted_tokens": self.counters["accepted"],
            "prefill_chunk_source": "given" if self.fixed_chunk else "measured",
        }

    @property
    def prefill_chunk(self) -> int:
        """Prompt tokens per step while other sequences decode."""
        if self.fixed_chunk:
            return max(1, self.fixed_chunk)
        if not self._prefill_tps:
            return FIRST_CHUNK
        return int(max(MIN_CHUNK, min(self.engine.n_batch, self._prefill_tps * GAP_TARGET)))

    def should_abort(self) -> bool:
        """Polled by llama.cpp during a multi-token step (the abort callback)."""
        for ev in self._abort_events:
            if ev.is_set():
                return True
        return False

    # -- the loop ---------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                self._expire_queue()
                if self._closing and not self._running:
                    for r in list(self._queue):
                        self._finish_unstarted(r, "cancelled")
                    self._queue.clear()
                    for fn, done, box in self._calls:
                        box.append((False, EngineError(f"{self.engine.name} is closed")))
                        done.set()
                    self._calls.clear()
                    return
                call = self._calls.popleft() if self._calls and not self._running else None
                if call is None and not self._calls and not self._closing:
                    self._admit()
                if call is None and not self._running:
                    self._cond.wait(self._next_deadline())
                    if not self._engine_alive():
                        return
                    continue
            if call is not None:
                fn, done, box = call
                try:
                    box.append((True, fn()))
                except BaseException as e:
                    box.append((False, e))
                done.set()
                continue
            try:
                self._step()
            except BaseException as e:  # never leave a reader hanging
                for run in list(self._running.values()):
                    self._fail(run, e if isinstance(e, EngineError) else EngineError(f"generation failed: {e}"))

    def _engine_alive(self) -> bool:
        try:
            self.engine.n_ctx
            return True
        except ReferenceError:
            return False

    def _next_deadline(self) -> float:
        deadlines = [r.submitted + r.admit_timeout for r in self._queue if r.admit_timeout is not None]
        if not deadlines:
            return 1.0 if not self._queue else 0.05
        return max(0.0, min(deadlines) - time.perf_counter()) + 0.001

    def _expire_queue(self) -> None:
        now = time.perf_counter()
        for r in list(self._queue):
            if r.cancelled():
                self._queue.remove(r)
                self._finish_unstarted(r, "cancelled")
            elif r.admit_timeout is not None and now - r.submitted > r.admit_timeout:
                self._queue.remove(r)
                self.counters["busy"] += 1
                self._deliver(r, EngineBusyError(
                    f"{self.engine.name} is busy: no sequence was free within {r.admit_timeout:g} s"))
                r.finished = True

    def _finish_unstarted(self, r: Request, reason: str) -> None:
        stats = Stats(prompt_tokens=len(r.tokens), native=self.engine.native.setting, finish_reason=reason)
        r.stats = stats
        self._deliver(r, DoneEvent(stats))
        r.finished = True

    # -- admission --------------------------------------------------------
    def _admit(self) -> None:
        """Move queued requests into free slots while the context has room
        for each one's prompt and max_tokens (FIFO: the head waits, so a
        long request is not starved by short ones behind it)."""
        n_ctx = self.engine.n_ctx
        while self._queue and len(self._running) < self.n_seq:
            r = self._queue[0]
            reserved = sum(run.req.reserve for run in self._running.values())
            need = min(len(r.tokens) + max(r.max_tokens, 1), n_ctx)
            if reserved + need > n_ctx and self._running:
                return
            self._queue.popleft()
            r.reserve = need
            try:
                self._start(r)
            except BaseException as e:
                self._deliver(r, e if isinstance(e, EngineError) else EngineError(f"could not start: {e}"))
                r.finished = True

    def _start(self, r: Request) -> None:
        eng = self.engine
        free = [s for s in range(self.n_seq) if s not in self._running]
        seq = eng.choose_slot(r.tokens, free, self._idle_since)
        t0 = time.perf_counter()
        n = eng.reuse_prefix(r.tokens, seq)
        # What finished sequences left in the cache would widen every step's
        # attention (it spans all used cells), so only the KV of running
        # sequences stays; the prompt cache keeps what is worth keeping.
        for s in range(self.n_seq):
            if s != seq and s not in self._running and eng._kv_tokens[s]:
                eng._kv_clear(s)
                if eng.draft is not None:
                    eng.draft.forget(s)
        r.stats = Stats(prompt_tokens=len(r.tokens), cached_tokens=n, native=eng.native.setting)
        self.counters["requests"] += 1
        self.counters["cache_hits"] += n > 0
        chain = sampler_chain(r.seed, n_vocab=eng.n_vocab, vocab=eng._vocab, n_ctx=eng.n_ctx,
                              banned=eng.eog_tokens() if r.ignore_eos else (), **r.options)
        r.seq = seq
        eng.last_seq = seq
        run = _Running(r, seq, n, chain, t0)
        if r.grammar is not None:
            try:
                run.gate = GrammarGate(eng._vocab, r.grammar, eng.n_vocab)
            except BaseException:
                lc.llama_sampler_free(chain)
                raise
        self._running[seq] = run

    # -- one step ---------------------------------------------------------
    def _step(self) -> None:
        eng = self.engine
        for run in list(self._running.values()):
            if run.req.cancelled():
                self._finish(run, "cancelled")
        decoding = [run for run in self._running.values() if run.prefilled and
                    run.req.delivered - run.req.consumed < STALL_EVENTS]
        prefilling = [run for run in self._running.values() if not run.prefilled]
        if not decoding and not prefilling:
            if self._running:  # everyone is waiting for a slow reader
                time.sleep(0.002)
            return
        for run in decoding:
            run.drafts = self._draft(run, len(decoding))
        n_decode = sum(1 + len(run.drafts) for run in decoding)
        limit = min(eng.n_batch - n_decode, self.prefill_chunk if decoding else eng.n_batch)
        while True:
            plan = self._plan(decoding, prefilling, limit)
            t_step = time.perf_counter()
            rc = self._decode(plan)
            if rc != 1:
                break
            # No room in the KV cache for this batch (llama.cpp restored it):
            # retry with less prefill, then end the youngest stream.
            in_prefill = sum(len(toks) for run, toks, _ in plan if not run.prefilled)
            if in_prefill > 1:
                limit = in_prefill // 2
                continue
            if prefilling:
                prefilling = []
                continue
            if any(run.drafts for run in decoding):   # drafts need cells too: drop them first
                for run in decoding:
                    run.drafts = []
                continue
            youngest = max(decoding, key=lambda run: run.req.submitted)
            decoding.remove(youngest)
            self._finish(youngest, "length")
            if not decoding:
                return
        if rc == 2:   # cancelled: the step is rolled back for everyone in it
            for run, toks, _ in plan:
                if run.req.cancelled():
                    self._finish(run, "cancelled")
            return
        if rc != 0:
            err = EngineError(f"llama_decode failed with status {rc}",
                              hint="the context may be full; start a new conversation")
            for run, _, _ in plan:
                self._fail(run, err)
            return
        now = time.perf_counter()
        n_seqs = len(plan)
        n_tokens = sum(len(toks) for _, toks, _ in plan)
        if n_tokens >= 32:  # a prefill step: how fast this machine takes prompt tokens
            tps = n_tokens / max(now - t_step, 1e-6)
            self._prefill_tps = tps if not self._prefill_tps else 0.7 * self._prefill_tps + 0.3 * tps
        self.counters["steps"] += 1
        self.steps_by_size[n_seqs] += 1
        self.max_sequences_in_step = max(self.max_sequences_in_step, n_seqs)
        made = 0
        for run, toks, idx in plan:
            if run.prefilled:
                made += self._verify(run, toks, idx)
                continue
            eng._kv_tokens[run.seq].extend(toks)
            if not run.prefilled:
                del run.pending[:len(toks)]
                self.counters["prefilled"] += len(toks)
                if run.pending:
                    continue
                run.prefilled = True
                run.stats.prefill_tps = (len(run.req.tokens) - run.n_cached) / max(now - run.t0, 1e-9)
                if eng.prompt_cache is not None and len(run.req.tokens) > run.n_cached:
                    eng.prompt_cache.put(run.req.tokens, eng.seq_state(run.seq))
            if run.req.cancelled():
                self._finish(run, "cancelled")
                continue
            if run.req.max_tokens <= 0:  # a prefill only (benchmarks, cache warming)
                self._finish(run, "length")
                continue
            made += self._sample(run, idx) >= 0
        self.counters["generated"] += made
        self._recent.append((time.perf_counter(), made))

    def _draft(self, run: _Running, n_decoding: int) -> list[int]:
        """The draft to verify after ``run``'s pending token this step: what
        followed the latest earlier occurrence of its last few tokens, or
        nothing. Drafts are shared out so that a step with several
        streams stays about as wide as one drafting stream's."""
        spec = run.req.spec
        if spec is None:
            return []
        eng = self.engine
        room = eng.n_ctx - len(eng._kv_tokens[run.seq]) - 1
        left = run.req.max_tokens - run.stats.generated_tokens - 1
        if spec.mode == "draft":
            k = min(spec.draft_tokens, room, left)
            if k < 1:
                return []
            return eng.draft.propose(run.seq, eng._kv_tokens[run.seq] + run.pending[:1], k)
        k = min(spec.max_draft // max(1, n_decoding), room, left)
        est = run.estimate
        if est is not None:
            # auto: as long as this machine's step costs and the share kept
            # so far say it pays; else a short probe now and then.
            costs = self.engine.step_costs()
            k = min(k, best_draft(costs, est.accept, k, others=n_decoding - 1)) if costs else 0
            if k < spec.min_draft:
                est.idle += 1
                if est.idle < est.wait:
                    return []
                k = spec.min_draft
        if k < spec.min_draft:
            return []
        draft = run.ngrams.draft(k)
        if est is not None and not draft:
            est.idle += 1
        return draft if len(draft) >= spec.min_draft else []

    def _plan(self, decoding, prefilling, limit):
        """(run, tokens to evaluate, batch index): for a decoding run its
        pending token and its draft, with logits at every row from that
        index on; for a prefill chunk the row of the last prompt token's
        logits, or -1 while the prompt is not done."""
        plan = []
        i = 0
        for run in decoding:
            toks = run.pending[:1] + run.drafts
            plan.append((run, toks, i))
            i += len(toks)
        budget = limit
        for run in prefilling:
            if budget <= 0:
                break
            take = run.pending[:budget]
            last = len(take) == len(run.pending)
            plan.append((run, take, i + len(take) - 1 if last else -1))
            i += len(take)
            budget -= len(take)
        return plan

    def _decode(self, plan) -> int:
        eng = self.engine
        b = eng._batch
        i = 0
        for run, toks, idx in plan:
            kv_len = len(eng._kv_tokens[run.seq])
            every = 1 if run.prefilled else 0   # a decoding run's draft is checked row by row
            for j, t in enumerate(toks):
                b.token[i] = t
                b.pos[i] = kv_len + j
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = run.seq
                b.logits[i] = every
                i += 1
            if idx >= 0:
                b.logits[idx] = 1
        b.n_tokens = i
        # The abort callback costs a few % per token, so it is installed only
        # for steps that carry prompt chunks; a decode-only step is short.
        prefill = [run for run, toks, _ in plan if not run.prefilled]
        self._abort_events = [e for run in prefill for e in (run.req._cancelled, run.req.cancel_event) if e]
        eng._abort_during(bool(prefill))
        rc = lc.llama_decode(eng._ctx, b)
        self._abort_events = []
        if rc not in (0, 1):
            # Aborted or failed: llama.cpp keeps the ubatches it finished, so
            # roll every sequence of the step back to where it stood.
            for run, _, _ in plan:
                lc.llama_memory_seq_rm(eng._mem, run.seq, len(eng._kv_tokens[run.seq]), -1)
        return rc

    def _verify(self, run: _Running, toks: list[int], idx: int) -> int:
        """After a step that evaluated ``run``'s pending token and its
        draft at rows idx, idx+1, ...: draw the target's token at each row
        in turn, keeping the draft while it matches what was drawn (the
        module docstring of edgeinfer.speculative says why this keeps the
        distribution). The KV cells of the draft tokens not kept are
        removed. Returns the tokens generated."""
        eng = self.engine
        kv = eng._kv_tokens[run.seq]
        start = len(kv)
        drafts = toks[1:]
        kept = made = 0
        kv.append(toks[0])
        # kv grows with each draft token kept, so that what _sample sees
        # (a full context, say) is what it would see without speculation.
        for j in range(len(toks)):
            tok = self._sample(run, idx + j)
            if tok < 0:
                break
            made += 1
            if run.req.finished or j >= len(drafts) or tok != drafts[j]:
                break
            kept += 1
            kv.append(drafts[j])
        # The cells of the draft tokens not kept go, unless the run ended and
        # released its whole sequence already.
        if kept < len(drafts) and len(kv) == start + 1 + kept:
            lc.llama_memory_seq_rm(eng._mem, run.seq, len(kv), -1)
        if drafts:
            run.stats.drafted_tokens += len(drafts)
            run.stats.accepted_tokens += kept
            self.counters["drafted"] += len(drafts)
            self.counters["accepted"] += kept
            if run.estimate is not None:
                costs = eng.step_costs() or {}
                run.estimate.record(len(drafts), kept, extra=costs.get(1 + len(drafts), 1.0) - 1.0)
        run.drafts = []
        return made

    def _sample(self, run: _Running, idx: int) -> int:
        """Sample the next token of ``run`` at batch row ``idx``; emit text;
        finish it if it ended. Returns the token generated, or -1 if the
        run ended without one."""
        eng, req, stats = self.engine, run.req, run.stats
        if run.gate is None:
            tok = lc.llama_sampler_sample(run.chain, eng._ctx, idx)
        else:
            tok = run.gate.sample(run.chain, eng._ctx, idx, eng.is_eog)
            if tok < 0:  # the grammar allows nothing more
                self._finish(run, "stop")
                return -1
        if run.t_first is None:
            run.t_first = time.perf_counter()
            stats.ttft_s = run.t_first - req.submitted
        if eng.is_eog(tok):
            self._finish(run, "stop")
            return -1
        stats.generated_tokens += 1
        run.pending_ids.append(tok)
        run.generated.append(tok)
        if run.ngrams is not None:
            run.ngrams.extend((tok,))
        text, stopped = run.matcher.feed(run.utf8.decode(eng.token_bytes(tok)))
        if text:
            self._deliver(req, TextEvent(text, run.pending_ids))
            run.pending_ids = []
        if stopped:
            self._finish(run, "stop", hit_stop_string=True)
        elif len(eng._kv_tokens[run.seq]) >= eng.n_ctx:
            self._finish(run, "length")  # the context is full: end cleanly
        elif eng.stop_on_repeat and not req.ignore_eos and len(run.generated) % 8 == 0 \
                and repeating(run.generated):
            self._finish(run, "repetition")  # stuck in a loop: say so rather than run on
        elif stats.generated_tokens >= req.max_tokens:
            self._finish(run, "length")
        else:
            run.pending = [tok]
        return tok

    # -- ending -----------------------------------------------------------
    def _deliver(self, req: Request, item) -> None:
        req.delivered += 1
        try:
            req.sink(item)
        except Exception:  # the reader is gone (a closed event loop): stop its work
            req.cancel()

    def _release(self, run: _Running) -> None:
        self._running.pop(run.seq, None)
        if not self.engine.reuse_kv:
            self.engine._kv_clear(run.seq)
        self._idle_since[run.seq] = time.perf_counter()
        lc.llama_sampler_free(run.chain)
        if run.gate is not None:
            run.gate.free()
        run.req.finished = True
        with self._cond:
            self._cond.notify()

    def _finish(self, run: _Running, reason: str, hit_stop_string: bool = False) -> None:
        if run.req.finished:
            return
        stats = run.stats
        # Whatever was held back (a possible stop-string prefix, the bytes
        # of an unfinished character) belongs to the answer unless a stop
        # string cut it off; every token id is reported once.
        tail = "" if hit_stop_string else run.matcher.flush() + run.utf8.decode(b"", final=True)
        if tail or run.pending_ids:
            self._deliver(run.req, TextEvent(tail, run.pending_ids))
        t_end = time.perf_counter()
        if run.t_first is not None and stats.generated_tokens > 1:
            stats.decode_tps = (stats.generated_tokens - 1) / max(t_end - run.t_first, 1e-9)
        stats.finish_reason = reason
        if hit_stop_string:
            stats.stop_sequence = run.matcher.hit
        stats.total_s = t_end - run.req.submitted
        # A Pi slows down when hot: the last reading, taken off this thread.
        stats.cpu_temperature_c, stats.throttled = heat.latest.get()
        self.engine.last_stats = stats
        self._release(run)
        self._deliver(run.req, DoneEvent(stats))

    def _fail(self, run: _Running, err: BaseException) -> None:
        if run.req.finished:
            return
        self.engine._kv_resync(run.seq)
        self._release(run)
        self._deliver(run.req, err)


def new_seed(seed: int | None, engine_seed: int | None) -> int:
    if seed is not None:
        return int(seed)
    if engine_seed is not None:
        return int(engine_seed)
    return int.from_bytes(os.urandom(4), "little")
