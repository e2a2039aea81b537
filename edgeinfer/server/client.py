"""Clients for ``edgeinfer serve``: :class:`Client` (blocking) and
:class:`AsyncClient` (asyncio).

>>> from edgeinfer import Client
>>> with Client() as c:                                              # doctest: +SKIP
...     print(c.chat([{"role": "user", "content": "Hi!"}], max_tokens=32))
...     for event in c.stream("Once upon a time", max_tokens=20):
...         print(event.text, end="")

Both keep one connection and route replies by request id, so several
requests (from several threads, or tasks) may be in flight on it at once.
Streams yield the engine's own :class:`TextEvent` and :class:`DoneEvent`.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import queue
import socket
import threading

from ..errors import AuthError, ConnectionLostError, ServerBusyError, ServerError
from ..events import DoneEvent, Stats, TextEvent, ToolCallEvent
from .jsonl import DEFAULT_PORT
from .protocol import encode

_LOST = object()


def _error(reply: dict) -> ServerError:
    code, message = reply.get("code", "internal"), reply.get("message", "the server failed")
    kind = {"busy": ServerBusyError, "unauthorized": AuthError}.get(code)
    if kind is not None:
        return kind(message, code)
    return ServerError(message, code)


def _event(reply: dict):
    """A reply to the event a stream yields (None for a reply that is not one)."""
    kind = reply.get("event")
    if kind == "token":
        return TextEvent(reply.get("text", ""), logprobs=reply.get("logprobs"))
    if kind == "tool_call":
        return ToolCallEvent(reply["index"], reply["call_id"], reply["name"], reply.get("arguments", ""),
                             first=bool(reply.get("first")), done=bool(reply.get("done")))
    if kind == "done":
        known = {k: v for k, v in (reply.get("stats") or {}).items() if k in Stats.__dataclass_fields__}
        stats = Stats(**known)
        stats.finish_reason = reply.get("finish_reason", stats.finish_reason)
        return DoneEvent(stats, text=reply.get("text", ""))
    if kind == "error":
        return _error(reply)
    return None


def _request(op: str, rid: str, token: str | None, **fields) -> dict:
    req = {"id": rid, "op": op, **{k: v for k, v in fields.items() if v is not None}}
    if token:
        req["token"] = token
    return req


class Client:
    """A blocking client. ``host``/``port`` or ``unix`` (a socket path);
    ``token`` defaults to ``$EDGEINFER_TOKEN``."""

    def __init__(self, host: str = "127.0.0.1", port: int = DEFAULT_PORT, *, unix: str | None = None,
                 token: str | None = None, timeout: float | None = 30.0):
        self.token = token if token is not None else os.environ.get("EDGEINFER_TOKEN") or None
        self.timeout = timeout
        try:
            if unix:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self._sock.settimeout(timeout)
                self._sock.connect(unix)
            else:
                self._sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as e:
            raise ConnectionLostError(f"cannot connect to {unix or f'{host}:{port}'}: {e}",
                                      "connection") from None
        self._sock.settimeout(None)  # the reader thread blocks; requests time out on their queues
        self._ids = itertools.count(1)
        self._send_lock = threading.Lock()
        self._queues: dict[str, queue.SimpleQueue] = {}
        self._lost: str | None = None
        self._reader = threading.Thread(target=self._read, name="edgeinfer-client", daemon=True)
        self._reader.start()

    def close(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _read(self) -> None:
        f = self._sock.makefile("rb")
        try:
            for line in f:
                try:
                    reply = json.loads(line)
                except ValueError:
                    continue
                q = self._queues.get(reply.get("id"))
                if q is not None:
                    q.put(reply)
                elif reply.get("id") is None and reply.get("event") == "error":
                    for q in list(self._queues.values()):  # a connection-level error
                        q.put(reply)
        except OSError:
            pass
        self._lost = "the server closed the connection"
        for q in list(self._queues.values()):
            q.put(_LOST)

    def _send(self, op: str, request_id: str | None = None, **fields) -> tuple[str, queue.SimpleQueue]:
        rid = request_id or f"c{next(self._ids)}"
        q: queue.SimpleQueue = queue.SimpleQueue()
        self._queues[rid] = q
        if self._lost:
            q.put(_LOST)
            return rid, q
        try:
            with self._send_lock:
                self._sock.sendall(encode(_request(op, rid, self.token, **fields)))
        except OSError:
            q.put(_LOST)
        return rid, q

    def _next(self, rid: str, q: queue.SimpleQueue, timeout: float | None):
        try:
            reply = q.get(timeout=timeout)
        except queue.Empty:
            raise ConnectionLostError(f"no reply to {rid} within {timeout:g} s", "timeout") from None
        if reply is _LOST:
            raise ConnectionLostError(f"{self._lost or 'the connection dropped'} during request {rid}",
                                      "connection")
        return reply

    def _result(self, op: str, **fields) -> dict:
        rid, q = self._send(op, **fields)
        try:
            reply = self._next(rid, q, self.timeout)
        finally:
            self._queues.pop(rid, None)
        if reply.get("event") == "error":
            raise _error(reply)
        return {k: v for k, v in reply.items() if k not in ("id", "event")}

    def stream(self, prompt: str | None = None, *, messages: list[dict] | None = None,
               request_id: str | None = None, **options):
        """Stream a completion of ``prompt``, or a chat reply to ``messages``;
        yields TextEvents, then a DoneEvent. Options as in the protocol:
        max_tokens, stop, seed, temperature, top_p, ... ``request_id``
        names the request for :meth:`cancel` from another thread. Leaving
        the loop early cancels the request on the server."""
        op = "chat" if messages is not None else "generate"
        rid, q = self._send(op, request_id, prompt=prompt, messages=messages, **options)
        finished = False
        try:
            while True:
                # Between tokens the wait is unbounded only while the server streams.
                ev = _event(self._next(rid, q, None))
                if ev is None:
                    continue
                if isinstance(ev, Exception):
                    finished = True
                    raise ev
                finished = isinstance(ev, DoneEvent)
                yield ev
                if finished:
                    return
        finally:
            if not finished and not self._lost:
                try:
                    with self._send_lock:
                        self._sock.sendall(encode(_request("cancel", f"x{rid}", self.token, target=rid)))
                except OSError:
                    pass
            self._queues.pop(rid, None)

    def generate(self, prompt: str, **options) -> str:
        return "".join(e.text for e in self.stream(prompt, **options))

    def chat(self, messages: list[dict], **options):
        """The reply's text; with ``tools``, an edgeinfer.tools.Reply (its
        text, calls and finish reason), as Engine.chat gives."""
        if options.get("tools"):
            from ..tool_calls import collect

            return collect(self.stream(messages=messages, **options))
        return "".join(e.text for e in self.stream(messages=messages, **options))

    def cancel(self, request_id: str) -> bool:
        return bool(self._result("cancel", target=request_id).get("cancelled"))

    def health(self) -> dict:
        return self._result("health")

    def stats(self) -> dict:
        return self._result("stats")

    def models(self) -> dict:
        return self._result("models")


class AsyncClient:
    """The asyncio client: ``async with AsyncClient() as c: ...``."""

    def __init__(self, host: str = "127.0.0.1", port: int = DEFAULT_PORT, *, unix: str | None = None,
                 token: str | None = None, timeout: float | None = 30.0):
        self.host, self.port, self.unix = host, port, unix
        self.token = token if token is not None else os.environ.get("EDGEINFER_TOKEN") or None
        self.timeout = timeout
        self._ids = itertools.count(1)
        self._queues: dict[str, asyncio.Queue] = {}
        self._writer = None
        self._reader_task = None
        self._lost: str | None = None

    async def connect(self) -> "AsyncClient":
        try:
            if self.unix:
                reader, self._writer = await asyncio.open_unix_connection(self.unix, limit=1 << 24)
            else:
                reader, self._writer = await asyncio.wait_for(
                    asyncio.open_connection(self.host, self.port, limit=1 << 24), self.timeout)
        except (OSError, asyncio.TimeoutError) as e:
            raise ConnectionLostError(f"cannot connect to {self.unix or f'{self.host}:{self.port}'}: {e}",
                                      "connection") from None
        self._reader_task = asyncio.create_task(self._read(reader))
        return self

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            try:
                await self._writer.wait_closed()
            except OSError:
                pass
        if self._reader_task is not None:
            self._reader_task.cancel()

    async def __aenter__(self) -> "AsyncClient":
        return await self.connect()

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while line := await reader.readline():
                try:
                    reply = json.loads(line)
                except ValueError:
                    continue
                q = self._queues.get(reply.get("id"))
                if q is not None:
                    q.put_nowait(reply)
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self._lost = "the server closed the connection"
            for q in list(self._queues.values()):
                q.put_nowait(_LOST)

    async def _send(self, op: str, request_id: str | None = None, **fields) -> tuple[str, asyncio.Queue]:
        rid = request_id or f"a{next(self._ids)}"
        q: asyncio.Queue = asyncio.Queue()
        self._queues[rid] = q
        if self._lost:
            q.put_nowait(_LOST)
            return rid, q
        try:
            self._writer.write(encode(_request(op, rid, self.token, **fields)))
            await self._writer.drain()
        except OSError:
            q.put_nowait(_LOST)
        return rid, q

    async def _next(self, rid, q, timeout):
        try:
            reply = await asyncio.wait_for(q.get(), timeout)
        except asyncio.TimeoutError:
            raise ConnectionLostError(f"no reply to {rid} within {timeout:g} s", "timeout") from None
        if reply is _LOST:
            raise ConnectionLostError(f"{self._lost or 'the connection dropped'} during request {rid}",
                                      "connection")
        return reply

    async def _result(self, op: str, **fields) -> dict:
        rid, q = await self._send(op, **fields)
        try:
            reply = await self._next(rid, q, self.timeout)
        finally:
            self._queues.pop(rid, None)
        if reply.get("event") == "error":
            raise _error(reply)
        return {k: v for k, v in reply.items() if k not in ("id", "event")}

    async def stream(self, prompt: str | None = None, *, messages: list[dict] | None = None,
                     request_id: str | None = None, **options):
        """As :meth:`Client.stream`, as an async iterator."""
        op = "chat" if messages is not None else "generate"
        rid, q = await self._send(op, request_id, prompt=prompt, messages=messages, **options)
        finished = False
        try:
            while True:
                ev = _event(await self._next(rid, q, None))
                if ev is None:
                    continue
                if isinstance(ev, Exception):
                    finished = True
                    raise ev
                finished = isinstance(ev, DoneEvent)
                yield ev
                if finished:
                    return
        finally:
            self._queues.pop(rid, None)
            if not finished and not self._lost and self._writer is not None:
                try:
                    self._writer.write(encode(_request("cancel", f"x{rid}", self.token, target=rid)))
                except OSError:
                    pass

    async def generate(self, prompt: str, **options) -> str:
        return "".join([e.text async for e in self.stream(prompt, **options)])

    async def chat(self, messages: list[dict], **options):
        """As :meth:`Client.chat`."""
        if options.get("tools"):
            from ..tool_calls import Collector

            answer = Collector()
            async for ev in self.stream(messages=messages, **options):
                answer.add(ev)
            return answer.reply()
        return "".join([e.text async for e in self.stream(messages=messages, **options)])

    async def cancel(self, request_id: str) -> bool:
        return bool((await self._result("cancel", target=request_id)).get("cancelled"))

    async def health(self) -> dict:
        return await self._result("health")

    async def stats(self) -> dict:
        return await self._result("stats")

    async def models(self) -> dict:
        return await self._result("models")
