"""Several models behind one server: loaded when a request names them,
unloaded when idle, evicted to fit memory, each in a process of its own.

A :class:`ModelPool` maps the names requests use (store names with or
without their tag, and aliases) to models. Each model runs in a child
process (``edgeinfer.server.worker``, driven through
:class:`~edgeinfer.model_process.ModelProcess`) that answers JSON lines
on a Unix socket; the server's faces parse a request once and hand the child the
whole :class:`~edgeinfer.server.generation.GenerationRequest`. A process
per model is what makes the promises hold:

- a crash, abort or hang in one model's native code ends its process
  only: its requests get an error, the model is loaded again on the
  next request, and the other models never notice;
- an unloaded model's memory really leaves: the process exits, where
  llama.cpp's free inside a long-lived process would leave the heap to
  the allocator;
- a load cannot stall the event loop that serves the other models.

The pool also shares the cores: while two models are busy at once each
decodes with half of them (two ggml thread teams on the same cores spin
against each other: 83 tok/s alone fell to 28 with two teams of 2 on 2
cores); one busy model gets them all back at its next step.

An :class:`InlineModel` wraps an Engine of this process instead (the
Python library, tests), with the same interface.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from types import SimpleNamespace

from .errors import EdgeinferError, EngineError, MemoryFitError, ModelNotServedError
from .model_process import ModelProcess

log = logging.getLogger("edgeinfer.pool")

DEFAULT_KEEP_ALIVE = 300.0      # seconds an idle model stays loaded (Ollama's default too)
REAP_EVERY = 0.5                # seconds between checks for idle models past their keep-alive
HANG_CHECK_EVERY = 2.0          # seconds between looks at a busy model's progress
DEFAULT_HANG_TIMEOUT = 300.0    # a step taking longer is a hang (a 512-token chunk of a 7B on a Pi: ~100 s)


class InlineModel:
    """An Engine of this process, as the pool holds a model."""

    def __init__(self, engine):
        self.engine = engine
        self.name = self.ref = engine.name
        self.n_ctx, self.n_seq_max = engine.n_ctx, engine.n_seq_max
        self.n_vocab = getattr(engine, "n_vocab", 0)
        self.native = getattr(engine, "native", SimpleNamespace(setting="full"))
        self.threads = getattr(engine, "threads", 0)
        self.alive = True

    async def start(self, req):
        from .server import generation

        return await generation.run(self.engine, req)

    async def embed(self, req):
        from .server import embedding

        return await embedding.run(self.engine, req)

    async def count(self, req) -> int:
        from .server import generation

        return len(await asyncio.to_thread(generation.render, self.engine, req))

    async def set_threads(self, threads: int) -> None:
        if threads != self.threads and hasattr(self.engine, "set_threads"):
            self.engine.set_threads(threads, wait=False)   # on the event loop: never wait for a step
            self.threads = threads

    def status(self) -> dict:
        return self.engine.status()

    def rss(self) -> int:
        return 0

    async def stop(self) -> None:
        await asyncio.to_thread(self.engine.close)


@dataclass
class PoolOptions:
    """How a pool loads and keeps models."""

    keep_alive: float | None = DEFAULT_KEEP_ALIVE   # None: forever
    load: dict = field(default_factory=dict)          # edgeinfer.load() options for every model
    per_model: dict = field(default_factory=dict)     # model -> edgeinfer.load() options for it alone
    aliases: dict = field(default_factory=dict)       # name a request may use → model
    any_name: bool = False   # with exactly one model pinned: any other name is answered by it
    cores: int | None = None  # the cores shared between busy models (default: hardware.default_threads())
    share_cores: bool = True  # False: leave each model's threads alone (a model's own process: its server shares)
    hang_timeout: float | None = DEFAULT_HANG_TIMEOUT  # a busy model with no step for this long is ended


@dataclass
class Slot:
    """One model the pool knows: loaded or not."""

    ref: str
    model: object | None = None        # ModelProcess or InlineModel
    pinned: bool = False
    busy: int = 0                      # requests in flight
    last_used: float = 0.0
    expires: float | None = None       # monotonic time it unloads when idle; None: never
    loading: asyncio.Task | None = None
    last_error: str | None = None
    loads: int = 0
    checked: float = 0.0               # the hang watch: its last look, and the last sign of progress
    progressed: float = 0.0

    @property
    def name(self) -> str:
        """What requests call it: a store name, or a file's name (its path
        stays on the server)."""
        return os.path.basename(self.ref) if os.sep in self.ref else self.ref


class ModelPool:
    """The models a server answers for."""

    def __init__(self, store=None, opts: PoolOptions | None = None):
        self.store = store
        self.opts = opts or PoolOptions()
        self.slots: dict[str, Slot] = {}
        self._dir = None
        self._reaper: asyncio.Task | None = None
        self._fit_lock = asyncio.Lock()
        self._stopping: set[asyncio.Task] = set()   # processes being stopped in the background
        self.closed = False

    @classmethod
    def of_engine(cls, engine, store=None) -> "ModelPool":
        """A pool of one Engine of this process, pinned."""
        pool = cls(store, PoolOptions(keep_alive=None, share_cores=False))
        model = InlineModel(engine)
        pool.slots[model.ref] = Slot(model.ref, model=model, pinned=True, loads=1)
        return pool

    # -- names ------------------------------------------------------------
    @property
    def pinned(self) -> list[Slot]:
        return [s for s in self.slots.values() if s.pinned]

    def only(self) -> Slot | None:
        """The one pinned model, when exactly one is."""
        pinned = self.pinned
        return pinned[0] if len(pinned) == 1 else None

    def resolve(self, name) -> str:
        """The store reference a request's model name means (blocking:
        it may read the store). Raises ModelNotServedError."""
        from .errors import RequestError

        if name is not None and not isinstance(name, str):
            raise RequestError("model", "model must be a string")
        if name is None or name == "":
            only = self.only() or (next(iter(self.slots.values())) if len(self.slots) == 1 else None)
            if only is not None:
                return only.ref
            raise RequestError("model", "model is required: this server runs several models "
                                        "(GET /v1/models lists them)")
        known = self._known(name)
        if known is not None:
            return known
        name = self.opts.aliases.get(name, name)
        if self.store is not None:
            try:
                return self.store.resolve(name).ref
            except (EdgeinferError, ValueError):
                pass
        only = self.only()
        if only is not None and self.opts.any_name:
            return only.ref
        hint = "'edgeinfer list' shows the models here; 'edgeinfer pull NAME' fetches another"
        if only is not None:
            hint += f"; start the server with --any-name to answer every name with {only.name}"
        raise ModelNotServedError(f"no model named {name[:100]!r} here", hint=hint)

    def _known(self, name) -> str | None:
        """The model a name means without reading the store: one this
        pool holds already (by name, name without tag, or alias)."""
        if not isinstance(name, str) or not name:
            return None
        name = self.opts.aliases.get(name, name)
        for slot in self.slots.values():
            if name in (slot.name, slot.name.split(":")[0]) or (slot.model is not None and name == slot.model.name):
                return slot.ref
        return None

    async def aresolve(self, name) -> str:
        """:meth:`resolve` on the event loop: at once for a model held
        already, else in a thread (the store is read)."""
        if name is None or name == "":
            return self.resolve(name)   # the one model, or a refusal: no store to read
        known = self._known(name)
        return known if known is not None else await asyncio.to_thread(self.resolve, name)

    def listed(self) -> list[dict]:
        """Every model a request may name: the store's, then aliases, with
        whether each is loaded (blocking: reads the store)."""
        refs = list(self.slots)
        if self.store is not None:
            try:
                refs += [m.ref for m in self.store.list() if m.ref not in self.slots]
            except EdgeinferError:
                pass
        out = [self.describe(ref) for ref in refs]
        for alias, target in sorted(self.opts.aliases.items()):
            out.append({"name": alias, "alias_of": target, "loaded": self._loaded(target)})
        return out

    def _loaded(self, name: str) -> bool:
        slot = self.slots.get(name) or next((s for s in self.slots.values() if s.ref.split(":")[0] == name), None)
        return bool(slot and slot.model is not None and slot.model.alive)

    def describe(self, ref: str) -> dict:
        """One model's state: loaded or on demand; memory, threads,
        requests in flight, seconds until it unloads."""
        slot = self.slots.get(ref)
        if slot is None or slot.model is None or not slot.model.alive:
            d = {"name": slot.name if slot else ref, "loaded": False,
                 "state": "failed" if slot and slot.last_error else "on demand"}
            if slot is not None and slot.last_error:
                d["error"] = slot.last_error
            return d
        m = slot.model
        left = None if slot.expires is None or slot.busy else max(0.0, slot.expires - time.monotonic())
        return {"name": slot.name, "loaded": True, "state": "busy" if slot.busy else "idle", "pinned": slot.pinned,
                "n_ctx": m.n_ctx, "parallel": m.n_seq_max, "threads": m.threads, "requests": slot.busy,
                "memory_bytes": m.rss(), "pid": getattr(m, "pid", os.getpid()),
                "expires_in_s": None if left is None else round(left, 1), "loads": slot.loads}

    # -- lifecycle --------------------------------------------------------
    async def start(self, pinned: list[str] = ()) -> None:
        """Load the pinned models (in order; an error here stops the server)
        and start unloading idle ones."""
        for name in pinned:
            # A file given at start is served under its own path; a request
            # can only name it by its file name (the model's name), never
            # load a file of its choosing.
            ref = name if os.path.isfile(name) else await self.aresolve(name)
            if name in self.opts.per_model:   # its own options, given under the name it was started with
                self.opts.per_model[ref] = self.opts.per_model[name]
            slot = self.slots.setdefault(ref, Slot(ref))
            slot.pinned = True
            await self._ensure_loaded(slot)
        if self._reaper is None:
            self._reaper = asyncio.create_task(self._reap())

    async def close(self) -> None:
        self.closed = True
        if self._reaper is not None:
            self._reaper.cancel()
        await asyncio.gather(*(self._unload(s) for s in self.slots.values()), *list(self._stopping),
                             return_exceptions=True)
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)

    async def unload(self, name: str) -> bool:
        """Unload a model now (after its requests); False if it was not loaded."""
        ref = await self.aresolve(name)
        slot = self.slots.get(ref)
        if slot is None or slot.model is None:
            return False
        slot.expires = time.monotonic()
        if not slot.busy:
            await self._unload(slot)
        return True

    # -- requests ---------------------------------------------------------
    async def run(self, name, req, keep_alive=None):
        """Start ``req`` on the model ``name`` means, loading it if need be.
        Returns a generation.Run with ``.model`` (the model) set; the
        model counts as busy until its events end. ``keep_alive``
        (seconds, None: the pool's) applies once it is idle again."""
        slot, model = await self._acquire(name)
        try:
            run = await model.start(req)
        except BaseException:
            await self._release(slot, keep_alive)
            raise
        run.model = model
        run.events = self._held(run.events, slot, model, keep_alive)
        return run

    async def embed(self, name, req, keep_alive=None):
        """Embed ``req`` (a server.embedding.EmbeddingRequest) with the
        model ``name`` means, loading it if need be. Returns (the model,
        embed.Embeddings)."""
        slot, model = await self._acquire(name)
        try:
            return model, await model.embed(req)
        except EngineError:
            self._note_lost(slot, model)
            raise
        finally:
            await self._release(slot, keep_alive)

    async def load(self, name, keep_alive=None):
        """Load the model ``name`` means, if it is not loaded, and start its
        keep-alive as a request that generates nothing would (Ollama's
        clients preload a model so, with ``keep_alive`` -1 for good).
        Returns the model."""
        slot, model = await self._acquire(name)
        await self._release(slot, keep_alive)
        return model

    async def model_for(self, name):
        """The loaded model ``name`` means (loading it), for a face that
        needs its facts without generating (count_tokens)."""
        ref = await self.aresolve(name)
        return await self._ensure_loaded(self.slots.setdefault(ref, Slot(ref)))

    async def _acquire(self, name) -> tuple[Slot, object]:
        """The slot and loaded model ``name`` means, counted busy (every
        acquire is paired with a _release), the cores shared anew."""
        ref = await self.aresolve(name)
        slot = self.slots.setdefault(ref, Slot(ref))
        model = await self._ensure_loaded(slot)
        if not slot.busy:
            slot.progressed = time.monotonic()   # the hang watch counts from here
        slot.busy += 1
        await self._share_cores()
        return slot, model

    async def _held(self, events, slot: Slot, model, keep_alive):
        try:
            async with contextlib.aclosing(events) as inner:
                async for ev in inner:
                    yield ev
        except EngineError:
            self._note_lost(slot, model)
            raise
        finally:
            await self._release(slot, keep_alive)

    def _note_lost(self, slot: Slot, model) -> None:
        """After an EngineError: if the model's process ended, say so
        (the next request loads it again)."""
        if not model.alive:
            slot.last_error = "its process ended"
            log.error("%s: the model's process ended (status %s); it loads again on the next request",
                      slot.name, getattr(getattr(model, "proc", None), "returncode", "?"))

    async def _release(self, slot: Slot, keep_alive) -> None:
        slot.busy -= 1
        slot.last_used = time.monotonic()
        seconds = self.opts.keep_alive if keep_alive is None else keep_alive
        forever = seconds is None or seconds == float("inf") or (slot.pinned and seconds != 0) or \
            isinstance(slot.model, InlineModel)   # an Engine of this process has no process to end
        slot.expires = None if forever else slot.last_used + seconds
        if not slot.busy and slot.expires is not None and seconds == 0:
            # In the background: the answer's last bytes need not wait for
            # the process to end (a load that needs its memory waits).
            model, slot.model, slot.expires = slot.model, None, None
            if model is not None:
                task = asyncio.ensure_future(self._stop(slot, model))
                self._stopping.add(task)
                task.add_done_callback(self._stopping.discard)
        await self._share_cores()

    async def _share_cores(self) -> None:
        """Every busy model decodes with its share of the cores: all of
        them when it is the only one busy."""
        from . import hardware

        if not self.opts.share_cores:
            return
        cores = self.opts.cores or hardware.default_threads()
        busy = [s for s in self.slots.values() if s.busy and s.model is not None and s.model.alive]
        if not busy:
            return
        share = cores if len(busy) == 1 else max(1, cores // len(busy))
        for s in busy:
            try:
                await s.model.set_threads(share)
            except EdgeinferError:
                pass   # a process that just died: its request reports it

    # -- loading and unloading --------------------------------------------
    async def _ensure_loaded(self, slot: Slot):
        if slot.model is not None and slot.model.alive:
            return slot.model
        if slot.model is not None:   # its process died: load it again
            slot.model = None
        if slot.loading is None:
            slot.loading = asyncio.ensure_future(self._load(slot))
        try:
            return await asyncio.shield(slot.loading)
        finally:
            if slot.loading is not None and slot.loading.done():
                slot.loading = None

    async def _load(self, slot: Slot):
        t0 = time.perf_counter()
        async with self._fit_lock:   # one load at a time: each must see the memory the last one took
            await self._make_room(slot.ref)
            if self._dir is None:
                self._dir = tempfile.mkdtemp(prefix="edgeinfer-models-")   # mode 700: ours alone
            path = os.path.join(self._dir, f"{len(os.listdir(self._dir))}-{os.getpid()}.sock")
            try:
                # The fit was checked here, against the memory of every
                # model's process; the new process, its interpreter loaded
                # already, would count itself twice.
                model = await ModelProcess.spawn(slot.ref, path, {**self.opts.load, **self.opts.per_model.get(
                    slot.ref, {}), "check_memory": False})
            except EdgeinferError as e:
                slot.last_error = e.one_line()
                raise
        slot.model, slot.last_error, slot.loads = model, None, slot.loads + 1
        slot.last_used = time.monotonic()
        slot.expires = None if slot.pinned or self.opts.keep_alive is None else slot.last_used + self.opts.keep_alive
        log.info("%s loaded in %.1f s (process %d, %d threads)", slot.ref, time.perf_counter() - t0,
                 model.pid, model.threads)
        return model

    async def _make_room(self, ref: str) -> None:
        """Unload idle models, least recently used first, until ``ref``
        fits in the memory available; MemoryFitError if it cannot fit
        beside the models that are busy or pinned, or even alone."""
        from . import fit, hardware

        if self._stopping:   # models on their way out: their memory is not free until they are gone
            await asyncio.gather(*list(self._stopping), return_exceptions=True)
        sized = await asyncio.to_thread(self._need, ref)
        if sized is None:
            return   # not a GGUF this can read: the load itself says what is wrong
        info, n_ctx = sized
        need = info.memory_estimate(n_ctx)
        while True:
            have = hardware.available_memory()
            if need <= have:
                return
            idle = sorted((s for s in self.slots.values() if s.model is not None and not s.busy and not s.pinned
                           and s.ref != ref), key=lambda s: s.last_used)
            if not idle:
                loaded = [s.name for s in self.slots.values() if s.model is not None and s.ref != ref]
                if loaded:
                    why = f"{', '.join(loaded)} {'is' if len(loaded) == 1 else 'are'} loaded and busy or pinned"
                    hint = "retry when the other models are idle, or serve fewer models at once"
                else:
                    why, hint = "nothing else is loaded", fit.advice(ref, info.memory_estimate, n_ctx, have)
                raise MemoryFitError(f"{ref} needs about {need / 1e9:.2f} GB at n_ctx={n_ctx} and "
                                     f"{have / 1e9:.2f} GB is available; {why}", hint=hint)
            log.info("unloading %s to make room for %s", idle[0].name, ref)
            await self._unload(idle[0])

    def _need(self, ref: str):
        """(GGUFInfo, context) of ``ref`` (a store name or a file) as it
        will load; None when it cannot be read."""
        from .fit import box_profile
        from .gguf_file import read_gguf
        from .store import resolve_model

        try:
            info = read_gguf(resolve_model(ref, self.store)[0])
        except Exception:   # noqa: BLE001 - the load itself will say what is wrong
            return None
        box = box_profile()
        return info, self.opts.load.get("n_ctx") or min(box.n_ctx, info.context_length or box.n_ctx)

    async def _unload(self, slot: Slot) -> None:
        model, slot.model, slot.expires = slot.model, None, None
        if model is not None:
            await self._stop(slot, model)

    async def _stop(self, slot: Slot, model) -> None:
        await model.stop()
        log.info("%s unloaded", slot.name)

    async def _reap(self) -> None:
        while True:
            await asyncio.sleep(REAP_EVERY)
            now = time.monotonic()
            for slot in list(self.slots.values()):
                if slot.model is None:
                    continue
                if not slot.model.alive and not slot.busy:
                    log.error("%s: the model's process ended (status %s)", slot.ref,
                              getattr(getattr(slot.model, "proc", None), "returncode", "?"))
                    slot.model, slot.last_error = None, "its process ended"
                elif not slot.busy and slot.expires is not None and now >= slot.expires:
                    await self._unload(slot)
                elif slot.busy and isinstance(slot.model, ModelProcess) and now >= slot.checked + HANG_CHECK_EVERY:
                    slot.checked = now
                    self._watch(slot)

    def _watch(self, slot: Slot) -> None:
        """A busy model whose process stops answering, or whose scheduler
        takes no step for the hang timeout, is ended: its requests fail
        (as after a crash) and the next one loads it again."""
        model = slot.model

        async def check():
            try:
                stuck = (await asyncio.wait_for(model.call("stats"), HANG_CHECK_EVERY)).get("in_decode_s", 0.0)
            except (asyncio.TimeoutError, EdgeinferError, OSError, ValueError):
                stuck = None   # no answer at all
            now = time.monotonic()
            if stuck is not None and stuck < (self.opts.hang_timeout or float("inf")):
                slot.progressed = now   # answering, and no decode stuck (a slow reader is no hang)
            elif self.opts.hang_timeout is not None and now - slot.progressed > self.opts.hang_timeout \
                    and slot.model is model and model.alive:
                log.error("%s made no progress for %.0f s with requests in flight: ending its process",
                          slot.name, now - slot.progressed)
                model.hung = True
                with contextlib.suppress(ProcessLookupError):
                    model.proc.kill()

        task = asyncio.ensure_future(check())
        self._stopping.add(task)
        task.add_done_callback(self._stopping.discard)
