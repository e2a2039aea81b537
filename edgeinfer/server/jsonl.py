"""``edgeinfer serve``: an asyncio server speaking JSON lines.

Every connection may have several requests in flight; each generating
request is a task reading the engine's event stream
(:meth:`Engine.astream_tokens`), so all of them share the scheduler's
batched steps. A connection that closes cancels its requests, which frees
their sequences within one step.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
import os
import signal
import socket
import time
from dataclasses import dataclass

from ..errors import ServerConfigError
from ..events import DoneEvent, ToolCallEvent
from . import generation, protocol
from .defaults import DEFAULT_MAX_LINE, DEFAULT_PORT  # noqa: F401  (DEFAULT_PORT: re-exported)
from .protocol import Call, ProtocolError, encode, error_event, tool_call_event

log = logging.getLogger("edgeinfer.server")


@dataclass
class Options:
    host: str | None = "127.0.0.1"
    port: int = DEFAULT_PORT
    unix: str | None = None
    token: str | None = None
    max_line: int = DEFAULT_MAX_LINE
    idle_timeout: float = 300.0     # seconds a connection may sit with nothing in flight
    drain_timeout: float = 30.0     # seconds SIGTERM waits for requests in flight
    internal: bool = False          # a model's own process: protocol.INTERNAL_OPS are answered


def is_loopback(host: str) -> bool:
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(opts: Options) -> None:
    """Refuse to listen beyond loopback without a token."""
    if opts.host and not is_loopback(opts.host) and not opts.token:
        raise ServerConfigError(
            f"serving on {opts.host} exposes the model to the network, so a token is required",
            hint="pass --token-file FILE (or set EDGEINFER_TOKEN), or serve on 127.0.0.1")


class Server:
    """The JSON-lines front of one Engine."""

    def __init__(self, engine, opts: Options, store=None):
        """``engine``: an Engine, or an edgeinfer.pool.ModelPool of the
        models to serve."""
        from ..pool import ModelPool

        self.pool = engine if isinstance(engine, ModelPool) else ModelPool.of_engine(engine, store)
        self.opts = opts
        self.store = store
        self._servers: list[asyncio.base_events.Server] = []
        self._connections: set[asyncio.Task] = set()
        self._requests: set[asyncio.Task] = set()
        self._stopping = False
        self.started = time.time()

    # -- lifecycle --------------------------------------------------------
    async def start(self) -> list[str]:
        check_exposure(self.opts)
        where = []
        if self.opts.unix:
            path = self.opts.unix
            if os.path.exists(path) and _is_stale_socket(path):
                os.unlink(path)
            srv = await asyncio.start_unix_server(self._client, path=path, limit=self.opts.max_line)
            os.chmod(path, 0o600)  # the owner only; the file mode is the access control here
            self._servers.append(srv)
            where.append(f"unix:{path}")
        if self.opts.host:
            srv = await asyncio.start_server(self._client, self.opts.host, self.opts.port,
                                             limit=self.opts.max_line, reuse_address=True)
            self._servers.append(srv)
            for s in srv.sockets:
                host, port = s.getsockname()[:2]
                where.append(f"{host}:{port}")
        return where

    async def stop(self) -> None:
        """Stop accepting, let requests in flight finish within the drain
        timeout, cancel the rest, close every connection."""
        self._stopping = True
        for srv in self._servers:
            srv.close()
        if self._requests:
            _, pending = await asyncio.wait(set(self._requests), timeout=self.opts.drain_timeout)
            for t in pending:
                t.cancel()
            if pending:
                await asyncio.wait(pending, timeout=5)
        for t in set(self._connections):
            t.cancel()
        if self._connections:
            await asyncio.wait(set(self._connections), timeout=5)
        if self.opts.unix and os.path.exists(self.opts.unix):
            os.unlink(self.opts.unix)

    # -- one connection ---------------------------------------------------
    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._connections.add(task)
        conn = _Connection(self, reader, writer)
        try:
            await conn.run()
        except (ConnectionError, asyncio.CancelledError):
            pass
        except Exception:
            log.exception("connection failed")
        finally:
            await conn.close()
            self._connections.discard(task)


class _Connection:
    def __init__(self, server: Server, reader, writer):
        self.server, self.reader, self.writer = server, reader, writer
        self.pool = server.pool
        self.inflight: dict = {}           # request id → task
        self.wind_downs: dict = {}         # request id → how to end it gently (a fill-in-the-middle run's)
        self._write_lock = asyncio.Lock()
        self.closed = False

    async def send(self, obj: dict) -> None:
        if self.closed:
            return
        async with self._write_lock:
            self.writer.write(encode(obj))
            await self.writer.drain()

    async def close(self) -> None:
        self.closed = True
        for t in list(self.inflight.values()):
            t.cancel()  # a client gone mid-stream: its sequences are freed
        if self.inflight:
            await asyncio.wait(list(self.inflight.values()), timeout=5)
        try:
            self.writer.close()
            await asyncio.wait_for(self.writer.wait_closed(), 2)
        except (ConnectionError, asyncio.TimeoutError, OSError):
            pass

    async def read_line(self) -> bytes | None:
        """The next line, None at end of input; raises ProtocolError for
        a line over the limit (after skipping the rest of it)."""
        idle = self.server.opts.idle_timeout
        while True:
            try:
                return await asyncio.wait_for(self.reader.readuntil(b"\n"), idle)
            except asyncio.TimeoutError:
                if self.inflight:
                    continue
                await self.send(error_event(None, "bad_request",
                                            f"idle for {idle:g} s with nothing in flight; closing"))
                return None
            except asyncio.IncompleteReadError as e:
                return e.partial or None
            except asyncio.LimitOverrunError:
                await self._skip_long_line()
                raise ProtocolError("line_too_long",
                                    f"a request line may be at most {self.server.opts.max_line:,} bytes") from None

    async def _skip_long_line(self) -> None:
        while True:
            try:
                await self.reader.readuntil(b"\n")
                return
            except asyncio.LimitOverrunError as e:
                await self.reader.readexactly(e.consumed)
            except asyncio.IncompleteReadError:
                return

    async def run(self) -> None:
        first = True
        while not self.closed:
            try:
                line = await self.read_line()
            except ProtocolError as e:
                await self.send(e.event())
                continue
            if line is None:
                return
            if not line.strip():
                continue
            if first and protocol.looks_like_http(line):
                await self.send(error_event(None, "http", "this port speaks JSON lines, one object per line; "
                                                          "see docs/protocol.md"))
                return
            first = False
            try:
                call = protocol.parse(line, n_ctx=self._n_ctx(), internal=self.server.opts.internal)
                self.authorize(call)
                await self.dispatch(call)
            except ProtocolError as e:
                await self.send(e.event())

    def authorize(self, call: Call) -> None:
        want = self.server.opts.token
        if want is None:
            return
        if call.token is None or not hmac.compare_digest(call.token.encode(), want.encode()):
            raise ProtocolError("unauthorized", "this server needs the right token in each request's "
                                                '"token" field', call.id)

    async def dispatch(self, call: Call) -> None:
        if call.op in protocol.GENERATING_OPS or call.op == "embed":
            if self.server._stopping:
                raise ProtocolError.of(generation.StoppingError("the server is stopping; no new requests"), call.id)
            if call.id in self.inflight:
                raise ProtocolError("duplicate_id", f"request {call.id!r} is still running", call.id)
            task = asyncio.create_task(self.generate(call) if call.op != "embed" else self.embed(call))
            self.inflight[call.id] = task
            self.server._requests.add(task)
            task.add_done_callback(lambda t, rid=call.id: self._done(rid, t))
            return
        if call.op == "cancel":
            task = self.inflight.get(call.target)
            gently = self.wind_downs.get(call.target) if call.gently else None
            if gently is not None:
                gently()
            elif task is not None:
                task.cancel()
            await self.send({"id": call.id, "event": "result", "cancelled": task is not None})
        elif call.op == "health":
            only = self.pool.only()
            await self.send({"id": call.id, "event": "result", "status": "ok",
                             "model": only.model.name if only is not None and only.model is not None else None,
                             "loaded": [s.name for s in self.pool.slots.values() if s.model is not None],
                             "uptime_s": round(time.time() - self.server.started, 1)})
        elif call.op == "count":
            try:
                n = await self.pool.only().model.count(call.request)
            except Exception as e:
                raise ProtocolError.of(e, call.id) from None
            await self.send({"id": call.id, "event": "result", "tokens": n})
        elif call.op == "threads":
            await self.pool.only().model.set_threads(call.threads)
            await self.send({"id": call.id, "event": "result", "threads": call.threads})
        elif call.op == "stats":
            await self.send({"id": call.id, "event": "result", **await self.stats(call.model)})
        elif call.op == "models":
            models = await asyncio.to_thread(self.pool.listed)
            loaded = [m["name"] for m in models if m.get("loaded") and "alias_of" not in m]
            await self.send({"id": call.id, "event": "result", "loaded": loaded[0] if len(loaded) == 1 else loaded,
                             "models": models})

    def _n_ctx(self) -> int:
        """The bound for max_tokens: the context of the one model served,
        else the largest a request could use (the model checks its own)."""
        only = self.pool.only()
        return only.model.n_ctx if only is not None and only.model is not None else 1 << 20

    async def stats(self, name) -> dict:
        """The scheduler's status of the one model served (or the one
        named), and every model's state under "models"."""
        pool = self.pool
        try:
            ref = await asyncio.to_thread(pool.resolve, name) if name or pool.only() else None
        except Exception as e:
            raise ProtocolError.of(e) from None
        slot = pool.slots.get(ref) if ref else None
        out = {}
        if slot is not None and slot.model is not None:
            out = await asyncio.to_thread(slot.model.status)
        out["models"] = [pool.describe(r) for r, s in pool.slots.items() if s.model is not None]
        return out

    def _done(self, rid, task: asyncio.Task) -> None:
        if self.inflight.get(rid) is task:
            del self.inflight[rid]
            self.wind_downs.pop(rid, None)
        self.server._requests.discard(task)

    async def embed(self, call: Call) -> None:
        from .embedding import encode_vectors

        try:
            model, out = await self.pool.embed(call.model, call.embedding, keep_alive=call.keep_alive)
            vectors = encode_vectors(out.vectors) if call.encoding == "base64" else out.vectors.tolist()
            await self.send({"id": call.id, "event": "result", "model": model.name, "embeddings": vectors,
                             "n_tokens": out.n_tokens, "truncated": out.truncated})
        except asyncio.CancelledError:
            raise
        except Exception as e:
            await self._fail(call.id, e)

    async def generate(self, call: Call) -> None:
        rid = call.id
        try:
            run = await self.pool.run(call.model, call.request, keep_alive=call.keep_alive)
            if run.wind_down is not None:
                self.wind_downs[rid] = run.wind_down
            internal = call.op == "run"
            if internal:   # the server that started this process answers with the prompt's size first
                await self.send({"id": rid, "event": "started", "tokens": run.tokens, "max_tokens": run.max_tokens,
                                 "prompt_text": run.prompt_text, "prompt_logprobs": run.prompt_logprobs})
            parts, calls, arguments, logprobs = [], [], {}, []
            # aclosing: however the loop ends (a write to a closed socket
            # raises here), the stream is closed, which cancels its sequence.
            async with contextlib.aclosing(run.events) as events:
                async for ev in events:
                    if isinstance(ev, DoneEvent):
                        done = {"id": rid, "event": "done", "finish_reason": ev.stats.finish_reason,
                                "stats": ev.stats.to_dict()}
                        if not call.stream:
                            done["text"] = "".join(parts)
                            if call.request.logprobs is not None:
                                done["logprobs"] = logprobs
                            if calls:
                                done["tool_calls"] = [{"id": c.id, "name": c.name, "arguments": json.loads(
                                    "".join(arguments[c.index]))} for c in calls]
                        st = ev.stats
                        log.info("%s %r: %d+%d tokens (%d cached), %s, %.2f s", call.op, rid, st.prompt_tokens,
                                 st.generated_tokens, st.cached_tokens, st.finish_reason, st.total_s)
                        await self.send(done)
                    elif isinstance(ev, ToolCallEvent):
                        if internal or call.stream:
                            await self.send(tool_call_event(rid, ev, tokens=internal))
                        elif ev.done:
                            calls.append(ev)
                        else:
                            arguments.setdefault(ev.index, []).append(ev.arguments)
                    elif internal:
                        out = {"id": rid, "event": "token", "text": ev.text, "tokens": ev.tokens}
                        if ev.logprobs is not None:
                            out["logprobs"] = ev.logprobs
                        await self.send(out)
                    elif ev.text or ev.logprobs:
                        if call.stream:
                            out = {"id": rid, "event": "token", "text": ev.text}
                            if ev.logprobs is not None:
                                out["logprobs"] = ev.logprobs
                            await self.send(out)
                        else:
                            parts.append(ev.text)
                            if ev.logprobs is not None:
                                logprobs += ev.logprobs
        except asyncio.CancelledError:
            # Cancelled by "cancel", a drain timeout or the connection going:
            # tell a client that is still there.
            if not self.closed:
                try:
                    await asyncio.shield(self.send({"id": rid, "event": "done", "finish_reason": "cancelled",
                                                    "stats": {}}))
                except Exception:
                    pass
            raise
        except Exception as e:
            await self._fail(rid, e)

    async def _fail(self, rid, e: Exception) -> None:
        """Answer a request that failed with its error event."""
        if self.closed or self.writer.is_closing() or isinstance(e, ConnectionError):
            return   # our own writes failed: the client is gone
        m = generation.meaning(e)
        if m.code == "internal":
            log.error("request %r failed: %s", rid, generation.message(e), exc_info=e)
        event = ProtocolError.of(e, rid).event()
        if self.server.opts.internal:   # enough for the other side to raise the same error
            event.update({"class": type(e).__name__, "param": getattr(e, "param", None)})
        try:
            await self.send(event)
        except (ConnectionError, RuntimeError):
            pass


def _is_stale_socket(path: str) -> bool:
    """A socket file nobody listens on (left by a crash) may be replaced."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        return False
    except ConnectionRefusedError:
        return True
    except OSError:
        return False
    finally:
        s.close()


def stop_event() -> asyncio.Event:
    """An event set by SIGTERM or SIGINT, on the running loop."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):
            pass
    return stop


async def serve_forever(server: Server, ready=None) -> None:
    """Run until SIGTERM or SIGINT, then drain and return."""
    stop = stop_event()
    where = await server.start()
    if ready is not None:
        ready(where)
    await stop.wait()
    await server.stop()
