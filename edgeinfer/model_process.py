"""A model in a process of its own (``edgeinfer.server.worker``), seen
from the server that started it: spawned, asked over JSON lines on a
Unix socket, stopped. :class:`ModelProcess` stands where an Engine would
for the server's faces (``name``, ``n_ctx``, ``n_seq_max``, ``native``,
``start``, ``embed``, ``count``); edgeinfer.pool decides when one runs.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import json
import signal
import sys
from types import SimpleNamespace

from . import errors
from .errors import EdgeinferError, EngineError, ModelNotServedError
from .events import DoneEvent, Stats, TextEvent, ToolCallEvent

LOAD_TIMEOUT = 600.0            # a 4 GB model from an SD card takes minutes
STOP_TIMEOUT = 10.0             # SIGTERM, then SIGKILL
READY_LINE_LIMIT = 1 << 20


def _rebuild_error(reply: dict) -> EdgeinferError:
    """The exception a model's process reported, as the same class here
    (so the error table gives it the same meaning on every face)."""
    name, message, param = reply.get("class"), reply.get("message", "the model failed"), reply.get("param")
    cls = getattr(errors, name or "", None)
    if name == "RequestError" or (cls is None and reply.get("code") == "bad_request"):
        return errors.RequestError(param, message)
    if not (isinstance(cls, type) and issubclass(cls, EdgeinferError)) or cls is errors.ServerError:
        cls = {"busy": errors.EngineBusyError, "context_overflow": errors.ContextOverflowError,
               "bad_schema": errors.GrammarError, "shutting_down": errors.StoppingError,
               "not_found": ModelNotServedError}.get(reply.get("code"), EngineError)
    try:
        err = cls(message, hint="")   # the message already carries the hint
    except TypeError:
        return EngineError(message, hint="")
    if param:
        err.param = param
    return err


class ModelProcess:
    """A model loaded in a child process; the faces use it as they would
    an Engine (``name``, ``n_ctx``, ``n_seq_max``, ``native``, ``start``)."""

    def __init__(self, ref: str, proc: asyncio.subprocess.Process, socket_path: str, facts: dict):
        self.ref, self.proc, self.socket_path = ref, proc, socket_path
        self.name = facts["name"]
        self.n_ctx, self.n_seq_max, self.n_vocab = facts["n_ctx"], facts["n_seq_max"], facts["n_vocab"]
        self.native = SimpleNamespace(setting=facts["native"])
        self.threads = facts["threads"]
        self.pid = proc.pid
        self._loop = asyncio.get_running_loop()   # the server's: status() asks through it from other threads
        self.hung = False     # ended by the pool's hang watch
        self._ids = itertools.count(1)

    @classmethod
    async def spawn(cls, ref: str, socket_path: str, options: dict) -> "ModelProcess":
        """Start a process for ``ref`` and wait until its model is loaded.
        Raises the load's own error (MemoryFitError, GGUFError, ...)."""
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "edgeinfer.server.worker", ref, "--socket", socket_path,
            "--options", json.dumps(options), stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, limit=READY_LINE_LIMIT)
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), LOAD_TIMEOUT)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
            raise EngineError(f"{ref} did not load within {LOAD_TIMEOUT:g} s") from None
        except asyncio.CancelledError:   # the server is closing
            proc.kill()
            await proc.wait()
            raise
        try:
            facts = json.loads(line) if line else {}
        except ValueError:
            facts = {}
        if not facts.get("ready"):
            code = await proc.wait()
            if "class" in facts:
                err = _rebuild_error(facts)
                err.hint = facts.get("hint") or ""
                raise err
            raise EngineError(f"{ref} failed to load: its process exited with status {code}",
                              hint="the server's log has its last words; check the file with "
                                   f"'edgeinfer show {ref}'")
        return cls(ref, proc, socket_path, facts)

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None

    def rss(self) -> int:
        """Resident memory of the model's process, in bytes."""
        import psutil

        try:
            return psutil.Process(self.pid).memory_info().rss
        except psutil.Error:
            return 0

    def _lost(self) -> EngineError:
        if self.hung:
            return EngineError(f"{self.ref} stopped making progress and its process was ended",
                               hint="retry: the model is loaded again on the next request; if it recurs, "
                                    "check the model with 'edgeinfer doctor'")
        code = self.proc.returncode
        how = f"exit status {code}" if code is not None and code >= 0 else \
            f"signal {signal.Signals(-code).name}" if code is not None else "a closed socket"
        return EngineError(f"{self.ref}'s process ended mid-request ({how})",
                           hint="retry: the model is loaded again on the next request")

    async def _connect(self):
        try:
            return await asyncio.open_unix_connection(self.socket_path, limit=READY_LINE_LIMIT * 16)
        except OSError:
            raise self._lost() from None

    async def call(self, op: str, **fields) -> dict:
        """One request and its one reply (``stats``, ``threads``)."""
        from .server.protocol import encode

        reader, writer = await self._connect()
        try:
            writer.write(encode({"id": next(self._ids), "op": op, **fields}))
            await writer.drain()
            line = await reader.readline()
            if not line:
                raise self._lost()
            reply = json.loads(line)
            if reply.get("event") == "error":
                raise _rebuild_error(reply)
            return reply
        finally:
            writer.close()

    async def set_threads(self, threads: int) -> None:
        if threads != self.threads:
            await self.call("threads", threads=threads)
            self.threads = threads

    async def embed(self, req):
        """``req`` (an EmbeddingRequest) embedded in the model's process."""
        from .embed import Embeddings
        from .server.embedding import decode_vectors

        reply = await self.call("embed", input=req.inputs, truncate=req.truncate, encoding_format="base64")
        return Embeddings(decode_vectors(reply["embeddings"]), reply["n_tokens"], reply["truncated"])

    async def count(self, req) -> int:
        """Tokens in ``req``'s prompt, as the model renders it."""
        from .server.protocol import request_fields

        return (await self.call("count", request=request_fields(req)))["tokens"]

    def status(self) -> dict:
        """The scheduler's status (blocking: call it from a thread, never
        the event loop, which :meth:`call` runs on); {} if it does not answer."""
        try:
            reply = asyncio.run_coroutine_threadsafe(self.call("stats"), self._loop).result(5)
        except (EdgeinferError, OSError, ValueError, TimeoutError, concurrent.futures.TimeoutError):
            return {}
        return {k: v for k, v in reply.items() if k not in ("id", "event")}

    async def start(self, req):
        """Start ``req`` in the model's process: a generation.Run whose
        events come from there. Closing the events closes the connection,
        which cancels the request in the process."""
        from .server import generation
        from .server.protocol import encode, request_fields

        reader, writer = await self._connect()
        rid = next(self._ids)
        try:
            writer.write(encode({"id": rid, "op": "run", "request": request_fields(req)}))
            await writer.drain()
            reply = await self._reply(reader)
            if reply.get("event") != "started":
                raise _rebuild_error(reply) if reply.get("event") == "error" else self._lost()
        except BaseException:
            writer.close()
            raise
        def wind_down():   # the request's end between steps, in the process (protocol: cancel gently)
            if not writer.is_closing():
                writer.write(encode({"id": f"{rid}-end", "op": "cancel", "target": rid, "gently": True}))

        return generation.Run(reply["tokens"], reply["max_tokens"], self._events(reader, writer),
                              prompt_text=reply.get("prompt_text"), prompt_logprobs=reply.get("prompt_logprobs"),
                              wind_down=wind_down if req.suffix is not None else None)

    async def _reply(self, reader) -> dict:
        line = await reader.readline()
        if not line:
            await asyncio.sleep(0.05)   # let the process's exit be seen, for the message
            raise self._lost()
        return json.loads(line)

    async def _events(self, reader, writer):
        try:
            while True:
                reply = await self._reply(reader)
                kind = reply.get("event")
                if kind == "token":
                    yield TextEvent(reply.get("text", ""), reply.get("tokens") or [], logprobs=reply.get("logprobs"))
                elif kind == "tool_call":
                    yield ToolCallEvent(reply["index"], reply["call_id"], reply["name"], reply.get("arguments", ""),
                                        first=bool(reply.get("first")), done=bool(reply.get("done")),
                                        tokens=reply.get("tokens") or [])
                elif kind == "done":
                    known = {k: v for k, v in (reply.get("stats") or {}).items() if k in Stats.__dataclass_fields__}
                    stats = Stats(**known)
                    stats.finish_reason = reply.get("finish_reason", stats.finish_reason)
                    yield DoneEvent(stats)
                    return
                elif kind == "error":
                    raise _rebuild_error(reply)
        finally:
            writer.close()

    async def stop(self) -> None:
        """End the process: SIGTERM (it drains), then SIGKILL."""
        if self.alive:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), STOP_TIMEOUT)
            except asyncio.TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                await self.proc.wait()
