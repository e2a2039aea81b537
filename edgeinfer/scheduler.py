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

import collections
import os
import threading
import time
from typing import Callable

import numpy as np

from . import heat
from .errors import EngineBusyError, EngineError
from .events import DoneEvent, Stats
from .grammar import GrammarGate
from .llama import DECODE_ABORTED, DECODE_NO_ROOM, DECODE_OK, sample_logits
from .sampling import free_chain, penalties, sampler_chain, takes_largest, token_logprobs
from .sequence import Request, Sequence, State
from .speculative import StepTimes, cost_at, next_draft

# While other streams decode, a step carries as many prompt tokens as this
# machine prefills in GAP_TARGET seconds (measured as steps run), so a long
# new prompt delays each running stream's next token by about that much.
GAP_TARGET = 0.2
MIN_CHUNK = 16
FIRST_CHUNK = 64              # until a prefill step has been timed
DEFAULT_QUEUE = 64            # requests that may wait for a slot
STALL_EVENTS = 256            # undelivered events after which a sequence waits for its reader
QUIET_S = 0.5                 # busy() for this long after a request ends


class Scheduler:
    """Runs every generation of one context on one thread.

    It owns what a step needs and nothing else: the llama.cpp context
    (``ctx``, a llama.Context), the KV ledger of its sequences, the prompt
    cache (the ledger's), a draft model if any, and this machine's step
    costs for speculative auto. It holds no reference to the Engine, so an
    Engine nobody holds is collected (its ``__del__`` stops this thread)."""

    def __init__(self, ctx, ledger, *, name: str, native: str = "", draft=None,
                 step_costs: dict[int, float] | None = None, stop_on_repeat: bool = True,
                 queue_limit: int = DEFAULT_QUEUE, prefill_chunk: int | None = None):
        self.ctx, self.ledger, self.vocab = ctx, ledger, ctx.vocab
        self.name, self.native, self.draft = name, native, draft
        self.step_costs = step_costs      # measured at load (speculative.step_costs_for)
        self.step_times = StepTimes()     # ... and as steps run
        self._costs, self._n_decoding = step_costs, 1   # this step's blend of the two, and its streams
        self._blend_in = 0                              # steps until the blend is worked out again
        self.stop_on_repeat = stop_on_repeat
        self.n_seq = ctx.n_seq_max
        self.queue_limit = max(0, int(queue_limit))
        self.fixed_chunk = int(prefill_chunk) if prefill_chunk else None  # None: sized by measurement
        self._prefill_tps = 0.0
        self._cond = threading.Condition()
        self._queue: collections.deque[Request] = collections.deque()
        self._last_end = 0.0   # when a request last ended (busy())
        self._calls: collections.deque = collections.deque()
        self._running: dict[int, Sequence] = {}        # slot → its sequence
        self._idle_since = {s: 0.0 for s in range(self.n_seq)}  # LRU of free slots' cached KV
        self._closing = False
        self._abort_events: list[threading.Event] = []   # written on this thread only
        self._threads_next: tuple | None = None  # set_threads: (threads, batch, done event), applied before a step
        self._decode_since: float | None = None   # when the llama_decode under way began (a hang shows here)
        self.on_busy: Callable[[bool], object] | None = None  # told when generation starts and stops (cores.py)
        self._told_busy = False
        self.counters: collections.Counter = collections.Counter()
        self.steps_by_size: collections.Counter = collections.Counter()  # sequences in a step → steps
        self.max_sequences_in_step = 0
        self.last_seq = 0                  # the slot of the request admitted last
        self.last_stats: Stats | None = None
        self._recent: collections.deque = collections.deque(maxlen=256)  # (time, tokens generated in the step)
        ctx.should_abort = self.should_abort
        # A debugging aid, on in the tests: after every step, the ledgers
        # must hold exactly the positions llama.cpp holds.
        self.check_kv = os.environ.get("EDGEINFER_CHECKS") == "1"
        self._thread = threading.Thread(target=self._loop, name="edgeinfer-scheduler", daemon=True)
        self._thread.start()

    # -- the caller's side ------------------------------------------------
    def submit(self, req: Request) -> None:
        """Queue ``req``; raises EngineBusyError at once if the queue is full."""
        with self._cond:
            if self._closing:
                raise EngineError(f"{self.name} is closed",
                                  hint="load the model again with edgeinfer.load()")
            waiting = len(self._queue)
            free = max(0, self.n_seq - len(self._running))
            if waiting >= self.queue_limit + free:
                self.counters["busy"] += 1
                raise EngineBusyError(f"{self.name} is busy: {len(self._running)} sequences "
                                      f"running and {waiting} requests waiting")
            self._queue.append(req)
            self._cond.notify()

    def call(self, fn: Callable, timeout: float | None = None, cancel: threading.Event | None = None):
        """Run ``fn()`` on the scheduler thread while no sequence runs;
        returns its result or raises what it raised. Setting ``cancel``
        aborts a decode that ``fn`` runs."""
        if threading.current_thread() is self._thread:
            return fn()
        done = threading.Event()
        box: list = []
        item = (fn, done, box, cancel)
        with self._cond:
            if self._closing:
                raise EngineError(f"{self.name} is closed",
                                  hint="load the model again with edgeinfer.load()")
            self._calls.append(item)
            self._cond.notify()
        if not done.wait(timeout):
            with self._cond:
                if item in self._calls:
                    self._calls.remove(item)
                    raise EngineBusyError(f"{self.name} is busy with other generations")
            done.wait()
        ok, value = box[0]
        if not ok:
            raise value
        return value

    def set_threads(self, threads: int, threads_batch: int, wait: float | None = None) -> None:
        """Decode with these thread counts from the next step on, even
        while sequences run (a server shares the cores between models that
        are busy at once). ``wait``: seconds to wait until they are in
        force (at most one step)."""
        applied = threading.Event()
        with self._cond:
            self._threads_next = (int(threads), int(threads_batch), applied)
            self._cond.notify_all()
        if wait and threading.get_ident() != self._thread.ident:
            applied.wait(wait)

    def _apply_threads(self) -> None:
        with self._cond:
            want, self._threads_next = self._threads_next, None
        if want is not None:
            self.ctx.set_threads(want[0], want[1])
            if self.draft is not None:
                self.draft.ctx.set_threads(want[0], want[1])
            want[2].set()

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
            "queue_limit": self.queue_limit, "kv_cells_used": self.ledger.cells_used(),
            "n_ctx": self.ctx.n_ctx, "prompt_cache_hits": self.counters["cache_hits"],
            "requests": self.counters["requests"], "busy_refusals": self.counters["busy"],
            "steps": self.counters["steps"], "max_sequences_in_step": self.max_sequences_in_step,
            "steps_by_sequences": dict(sorted(self.steps_by_size.items())),
            "generated_tokens": self.counters["generated"], "prefill_tokens": self.counters["prefilled"],
            "decode_tps": round(tps, 2), "prefill_chunk": self.prefill_chunk,
            "drafted_tokens": self.counters["drafted"], "accepted_tokens": self.counters["accepted"],
            "prefill_chunk_source": "given" if self.fixed_chunk else "measured",
            "threads": self.ctx.threads()[0],
            "in_decode_s": round(now - since, 3) if (since := self._decode_since) is not None else 0.0,
        }

    @property
    def prefill_chunk(self) -> int:
        """Prompt tokens per step while other sequences decode."""
        if self.fixed_chunk:
            return max(1, self.fixed_chunk)
        if not self._prefill_tps:
            return FIRST_CHUNK
        return int(max(MIN_CHUNK, min(self.ctx.n_batch, self._prefill_tps * GAP_TARGET)))

    def should_abort(self) -> bool:
        """Polled by llama.cpp during a multi-token step (the abort callback)."""
        for ev in self._abort_events:
            if ev.is_set():
                return True
        return False

    # -- the loop ---------------------------------------------------------
    def _loop(self) -> None:
        while True:
            if self.on_busy is not None and bool(self._running) != self._told_busy:
                self._told_busy = not self._told_busy
                try:
                    self.on_busy(self._told_busy)   # outside our lock: it may set other engines' threads
                except Exception:  # noqa: BLE001 - sharing cores is a courtesy, never a failure
                    pass
            with self._cond:
                self._expire_queue()
                if self._closing and not self._running:
                    for r in list(self._queue):
                        self._finish_unstarted(r, "cancelled")
                    self._queue.clear()
                    for fn, done, box, _ in self._calls:
                        box.append((False, EngineError(f"{self.name} is closed")))
                        done.set()
                    self._calls.clear()
                    return
                call = self._calls.popleft() if self._calls and not self._running else None
                if call is None and not self._calls and not self._closing:
                    self._admit()
                if call is None and not self._running and self._threads_next is None:
                    if not self._told_busy or self.on_busy is None:   # else: say so first, outside the lock
                        self._cond.wait(self._next_deadline())
                    continue
            if self._threads_next is not None:   # before the next call or step
                self._apply_threads()
            if call is not None:
                fn, done, box, cancel = call
                self._abort_events = [cancel] if cancel is not None else []
                try:
                    box.append((True, fn()))
                except BaseException as e:
                    box.append((False, e))
                finally:
                    self._abort_events = []
                done.set()
                continue
            try:
                self._step()
                if self.check_kv:
                    self._check_ledgers()
            except BaseException as e:  # never leave a reader hanging
                for run in list(self._running.values()):
                    self._fail(run, e if isinstance(e, EngineError) else EngineError(f"generation failed: {e}"))

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
                    f"{self.name} is busy: no sequence was free within {r.admit_timeout:g} s"))
                r.finished = True

    def busy(self) -> bool:
        """Whether a request is running or waiting, or one ended less than
        QUIET_S ago (the next turn of a chat, a client's next request, is
        likely on its way). Read from any thread."""
        return bool(self._running) or bool(self._queue) or time.monotonic() - self._last_end < QUIET_S

    def _finish_unstarted(self, r: Request, reason: str) -> None:
        stats = Stats(prompt_tokens=len(r.tokens), native=self.native, finish_reason=reason)
        r.stats = stats
        self._deliver(r, DoneEvent(stats))
        r.finished = True

    def _check_ledgers(self) -> None:
        for what, ledger in (("target", self.ledger), ("draft", self.draft and self.draft.ledger)):
            wrong = ledger.mismatches() if ledger else {}
            if wrong:
                raise EngineError(f"the {what}'s KV ledger is out of step with llama.cpp: "
                                  f"seq -> (recorded, held) {wrong}")

    # -- admission --------------------------------------------------------
    def _admit(self) -> None:
        """Move queued requests into free slots while the context has room
        for each one's prompt and max_tokens (FIFO: the head waits, so a
        long request is not starved by short ones behind it)."""
        n_ctx = self.ctx.n_ctx
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
        ledger = self.ledger
        free = [s for s in range(self.n_seq) if s not in self._running]
        seq = ledger.choose_slot(r.tokens, free, self._idle_since)
        t0 = time.perf_counter()
        # A prompt the cache kept whole, with its last logits, is not read
        # again at all: its first token is drawn from those logits below.
        whole = ledger.reuse_whole(r.tokens, seq, idle=tuple(free)) if r.grammar is None else None
        n = len(r.tokens) if whole is not None else ledger.reuse_prefix(r.tokens, seq, idle=tuple(free))
        # What finished sequences left in the cache would widen every step's
        # attention (it spans all used cells), so only the KV of running
        # sequences stays; the prompt cache keeps what is worth keeping.
        for s in range(self.n_seq):
            if s != seq and s not in self._running and ledger.length(s):
                ledger.clear(s)
                if self.draft is not None:
                    self.draft.forget(s)
        r.stats = Stats(prompt_tokens=len(r.tokens), cached_tokens=n, native=self.native)
        self.counters["requests"] += 1
        self.counters["cache_hits"] += n > 0
        ctx, vocab = self.ctx, self.vocab
        chain = sampler_chain(r.seed, n_vocab=ctx.n_vocab, vocab=vocab.handle, n_ctx=ctx.n_ctx,
                              banned=vocab.eog_tokens() if r.ignore_eos else (), bias=r.logit_bias, **r.options)
        r.seq = seq
        self.last_seq = seq
        run = Sequence(r, seq, n, chain=chain, t0=t0, stop_on_repeat=self.stop_on_repeat)
        run.penalties = penalties(ctx.n_ctx, **r.options)
        run.greedy = takes_largest(r.logit_bias, **r.options)
        if r.grammar is not None:
            try:
                run.gate = GrammarGate(r.grammar, ctx.n_vocab, vocab,
                                       greedy=(r.options.get("temperature") or 0) <= 0)
            except BaseException:
                free_chain(chain)
                raise
        self._running[seq] = run
        if whole is not None:
            run.prefill_done(0)
            try:
                self.counters["generated"] += self._first_token(run, -1, np.frombuffer(whole, np.float32).copy())
            except Exception as e:
                self._fail(run, e if isinstance(e, EngineError) else EngineError(f"could not start: {e}"))

    # -- one step ---------------------------------------------------------
    def _step(self) -> None:
        for run in list(self._running.values()):
            if run.req.stops_now(run.state is State.PREFILLING):
                self._finish(run, "cancelled")
        decoding = [run for run in self._running.values() if run.state is State.DECODING and
                    run.req.delivered - run.req.consumed < STALL_EVENTS]
        prefilling = [run for run in self._running.values() if run.state is State.PREFILLING]
        if not decoding and not prefilling:
            if self._running:  # everyone is waiting for a slow reader
                time.sleep(0.002)
            return
        self._n_decoding = len(decoding)
        if any(run.estimate is not None for run in decoding):
            self._blend_in -= 1
            if self._blend_in <= 0:   # the blend moves slowly: worked out again every 16 steps
                self._costs, self._blend_in = self.step_times.blend(self.step_costs), 16
        else:
            self._costs = self.step_costs
        for run in decoding:
            run.drafts = self._draft(run, len(decoding))
        n_decode = sum(1 + len(run.drafts) for run in decoding)
        n_batch = self.ctx.n_batch
        limit = min(n_batch - n_decode, self.prefill_chunk if decoding else n_batch)
        while True:
            plan = self._plan(decoding, prefilling, limit)
            t_step = self._decode_since = time.perf_counter()
            try:
                rc = self._decode(plan)
            finally:
                self._decode_since = None
            if rc != DECODE_NO_ROOM:
                break
            # No room in the KV cache for this batch (llama.cpp restored it):
            # retry with less prefill, then end the youngest stream.
            in_prefill = sum(len(toks) for run, toks, _ in plan if run.state is State.PREFILLING)
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
        if rc == DECODE_ABORTED:   # cancelled: the step is rolled back for everyone in it
            for run, toks, _ in plan:
                if run.req.stops_now(run.state is State.PREFILLING):
                    self._finish(run, "cancelled")
            return
        if rc != DECODE_OK:
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
        if not any(run.state is State.PREFILLING for run, _, _ in plan):
            self.step_times.record(n_tokens, now - t_step)
        self.counters["steps"] += 1
        self.steps_by_size[n_seqs] += 1
        self.max_sequences_in_step = max(self.max_sequences_in_step, n_seqs)
        made = 0
        for run, toks, idx in plan:
            if run.state is State.DECODING:
                made += self._verify(run, toks, idx)
                continue
            self.ledger.extend(run.seq, toks)
            self.counters["prefilled"] += len(toks)
            if not run.prefill_done(len(toks)):
                continue
            run.stats.prefill_tps = (len(run.req.tokens) - run.n_cached) / max(now - run.t0, 1e-9)
            cache = self.ledger.prompt_cache
            keep = cache is not None and len(run.req.tokens) > run.n_cached and \
                not cache.holds(run.req.tokens, logits=idx >= 0)
            # The prompt's last logits go into the cache with its KV, copied
            # before sampling changes them (penalties work in place).
            logits = self.ctx.logits(idx).tobytes() if keep and idx >= 0 else None
            made += self._first_token(run, idx)
            # Once the first token is on its way: the copy of the prompt's KV
            # takes a while (9 ms for 1,100 tokens of SmolLM2). Until the next
            # step the sequence still holds exactly the prompt.
            if keep:
                cache.put(run.req.tokens, self.ledger.save(run.seq), logits)
        self.counters["generated"] += made
        self._recent.append((time.perf_counter(), made))

    def _first_token(self, run: Sequence, idx: int, logits: np.ndarray | None = None) -> int:
        """A run whose prompt is read: its first token (at batch row
        ``idx``, or from ``logits``), unless it ended or only reads its
        prompt. Returns the tokens generated (0 or 1)."""
        if run.req.cancelled():
            self._finish(run, "cancelled")
        elif run.req.max_tokens <= 0:  # a prefill only (benchmarks, cache warming)
            self._finish(run, "length")
        else:
            return int(self._sample(run, idx, logits) >= 0)
        return 0

    def _draft(self, run: Sequence, n_decoding: int) -> list[int]:
        """The draft to verify after ``run``'s pending token this step
        (edgeinfer.speculative.next_draft decides)."""
        spec = run.req.spec
        if spec is None:
            return []
        held = self.ledger.tokens(run.seq)
        draft = self.draft
        propose = None
        if spec.mode == "draft":
            def propose(k: int) -> list[int]:
                return draft.propose(run.seq, held + run.pending[:1], k)
        return next_draft(spec, run.estimate, run.ngrams, room=self.ctx.n_ctx - len(held) - 1,
                          left=run.req.max_tokens - run.stats.generated_tokens - 1, n_decoding=n_decoding,
                          costs=self._costs, propose=propose)

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
            if len(run.pending) - len(take) == 1 < len(take):
                # Never leave one prompt token for a step of its own: a token
                # decoded alone is stored with other rounding (KVLedger.reuse_prefix).
                take = take[:-1]
            last = len(take) == len(run.pending)
            plan.append((run, take, i + len(take) - 1 if last else -1))
            i += len(take)
            budget -= len(take)
        return plan

    def _decode(self, plan) -> int:
        ctx, ledger = self.ctx, self.ledger
        b = ctx.batch
        b.clear()
        add = b.add
        prefill = []
        for run, toks, idx in plan:
            pos0 = ledger.length(run.seq)
            seq = run.seq
            decoding = run.state is State.DECODING   # a decoding run's draft is checked row by row
            if not decoding:
                prefill.append(run)
            for j, t in enumerate(toks):
                add(t, pos0 + j, seq, decoding)
            if idx >= 0:
                b.want_logits(idx)
        # The abort callback costs a few % per token, so it is installed only
        # for steps that carry prompt chunks; a decode-only step is short.
        self._abort_events = [e for run in prefill for e in run.req.abort_events()]
        rc = ctx.decode(b, abortable=bool(prefill))
        self._abort_events = []
        if rc not in (DECODE_OK, DECODE_NO_ROOM):
            # Aborted or failed: llama.cpp keeps the ubatches it finished, so
            # roll every sequence of the step back to where it stood.
            for run, _, _ in plan:
                ledger.drop_after(run.seq)
        return rc

    def _verify(self, run: Sequence, toks: list[int], idx: int) -> int:
        """After a step that evaluated ``run``'s pending token and its
        draft at rows idx, idx+1, ...: draw the target's token at each row
        in turn, keeping the draft while it matches what was drawn (the
        module docstring of edgeinfer.speculative says why this keeps the
        distribution). The KV cells of the draft tokens not kept are
        removed. Returns the tokens generated."""
        ledger, seq = self.ledger, run.seq
        start = ledger.length(seq)
        drafts = toks[1:]
        kept = made = 0
        ledger.append(seq, toks[0])
        # The ledger grows with each draft token kept, so that what _sample
        # sees (a full context, say) is what it would see without speculation.
        for j in range(len(toks)):
            tok = self._sample(run, idx + j)
            if tok < 0:
                break
            made += 1
            if run.req.finished or j >= len(drafts) or tok != drafts[j]:
                break
            kept += 1
            ledger.append(seq, drafts[j])
        # The cells of the draft tokens not kept go, unless the run ended and
        # released its whole sequence already.
        if kept < len(drafts) and ledger.length(seq) == start + 1 + kept:
            ledger.drop_after(seq)
        if drafts:
            run.stats.drafted_tokens += len(drafts)
            run.stats.accepted_tokens += kept
            self.counters["drafted"] += len(drafts)
            self.counters["accepted"] += kept
            if run.estimate is not None:
                # Paid if the step made more tokens per second than a plain
                # one would: its extra time in the tokens of a plain step.
                costs, base = self._costs, self._n_decoding
                extra = base * (cost_at(costs, base + len(drafts)) / cost_at(costs, base) - 1.0) if costs else 0.0
                run.estimate.record(len(drafts), kept, extra=extra)
        run.drafts = []
        return made

    def _sample(self, run: Sequence, idx: int, logits: np.ndarray | None = None) -> int:
        """Sample the next token of ``run`` at batch row ``idx`` (or from
        ``logits``, a row of its own, which this changes; never with a
        grammar); emit text; finish it if it ended. Returns the token
        generated, or -1 if the run ended without one."""
        ctx, vocab = self.ctx, self.vocab
        row = ctx.logits(idx) if logits is None else logits
        if run.penalties is not None:
            run.penalties.apply(row)   # in place, so the chain or the grammar sees it
        if run.gate is not None:
            tok = run.gate.sample(run.chain, ctx, idx, vocab.is_eog)
            if tok < 0:  # the grammar allows nothing more
                self._finish(run, "stop")
                return -1
        else:
            tok = int(row.argmax()) if run.greedy else -1
            # Not greedy, or argmax landed on a token ignore_eos bans: the chain draws.
            if tok < 0 or (run.req.ignore_eos and vocab.is_eog(tok)):
                tok = ctx.sample(run.chain, idx) if logits is None else sample_logits(run.chain, logits)
        if run.penalties is not None:
            run.penalties.accept(tok)
        run.first_token_at(time.perf_counter())
        if vocab.is_eog(tok):
            self._finish(run, "stop")
            return -1
        logprob = None if run.req.logprobs is None else token_logprobs(row, tok, run.req.logprobs, vocab)
        event, reason = run.emit(tok, vocab.token_bytes(tok, tok in run.req.shown), logprob=logprob,
                                 context_full=self.ledger.length(run.seq) >= ctx.n_ctx)
        if event is not None:
            self._deliver(run.req, event)
        if reason is not None:
            self._finish(run, reason)
        return tok

    # -- ending -----------------------------------------------------------
    def _deliver(self, req: Request, item) -> None:
        req.delivered += 1
        try:
            req.sink(item)
        except Exception:  # the reader is gone (a closed event loop): stop its work
            req.cancel()

    def _release(self, run: Sequence) -> None:
        self._running.pop(run.seq, None)
        self._last_end = time.monotonic()
        if not self.ledger.reuse:
            self.ledger.clear(run.seq)
        self._idle_since[run.seq] = time.perf_counter()
        free_chain(run.chain)
        if run.gate is not None:
            run.gate.free()
        run.req.finished = True
        with self._cond:
            self._cond.notify()

    def _finish(self, run: Sequence, reason: str) -> None:
        if run.req.finished:
            return
        tail = run.finish(reason, time.perf_counter())
        if tail is not None:
            self._deliver(run.req, tail)
        stats = run.stats
        # A Pi slows down when hot: the last reading, taken off this thread.
        stats.cpu_temperature_c, stats.throttled = heat.latest.get()
        self.last_stats = stats
        self._release(run)
        self._deliver(run.req, DoneEvent(stats))

    def _fail(self, run: Sequence, err: BaseException) -> None:
        if run.req.finished:
            return
        self.ledger.resync(run.seq)
        run.state = State.FINISHED
        self._release(run)
        self._deliver(run.req, err)


def new_seed(seed: int | None, engine_seed: int | None) -> int:
    if seed is not None:
        return int(seed)
    if engine_seed is not None:
        return int(engine_seed)
    return int.from_bytes(os.urandom(4), "little")
