"""What the HTTP faces share: errors in each API's shape, server-sent
events, reading a JSON body, and a started generation.

``http`` mounts the faces; ``openai_api`` and ``anthropic_api`` parse
requests into a :class:`~.generation.GenerationRequest` and format its
events with what is here. The imports run one way:
``http → {openai_api, anthropic_api} → {fields, api} → generation``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time

from starlette.requests import Request
from starlette.responses import JSONResponse

from ..events import DoneEvent
from . import generation
from .generation import HTTP_KINDS, GenerationRequest, load_json

log = logging.getLogger("edgeinfer.http")

RETRY_AFTER_S = 2
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class ApiError(Exception):
    """A request answered with an error status, in the API's own shape."""

    KINDS = HTTP_KINDS   # kind → (HTTP status, OpenAI error type, Anthropic error type)

    def __init__(self, kind: str, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        assert kind in self.KINDS, kind
        self.kind, self.param, self.code = kind, param, code
        self.status = self.KINDS[kind][0]

    def headers(self) -> dict:
        return {"Retry-After": str(RETRY_AFTER_S)} if self.kind in ("rate_limit", "unavailable") else {}

    def openai_body(self) -> dict:
        return {"error": {"message": str(self), "type": self.KINDS[self.kind][1], "param": self.param,
                          "code": self.code}}

    def anthropic_body(self) -> dict:
        return {"type": "error", "error": {"type": self.KINDS[self.kind][2], "message": str(self)}}


assert {m.kind for _, m in generation.ERRORS} <= set(HTTP_KINDS)


def api_error_from(e: BaseException) -> ApiError:
    """The HTTP face of an exception raised while serving a request
    (generation.ERRORS says what each one means)."""
    if isinstance(e, ApiError):
        return e
    m = generation.meaning(e)
    return ApiError(m.kind, generation.message(e), param=m.param, code=m.api_code)


def is_anthropic(path: str) -> bool:
    return path.startswith("/v1/messages")


def is_ollama(path: str) -> bool:
    return path == "/api" or path.startswith("/api/")


def error_response(e: ApiError, path: str) -> JSONResponse:
    """``e`` in the shape of the API ``path`` belongs to: Anthropic's,
    Ollama's (``{"error": "..."}``, which its clients show as it is) or
    OpenAI's."""
    if is_anthropic(path):
        body = e.anthropic_body()
    elif is_ollama(path):
        body = {"error": str(e)}
    else:
        body = e.openai_body()
    return JSONResponse(body, status_code=e.status, headers=e.headers())


def sse(data, event: str | None = None) -> bytes:
    """One server-sent event."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return (f"event: {event}\n" if event else "").encode() + f"data: {text}\n\n".encode("utf-8")


# What a body may be labelled when the request cannot come from a web page:
# curl's -d says form-urlencoded, and some clients send no label at all.
NON_BROWSER_TYPES = ("application/json", "", "application/x-www-form-urlencoded")


async def read_json(request: Request, limit: int) -> dict:
    """The request's JSON object; ApiError for a body too large, not JSON
    or not an object.

    A web page can post a form, or text, to any address without asking
    first; only a JSON body needs the browser to ask (a CORS preflight).
    So a request from a page (it has an ``Origin`` header: browsers send
    one on every cross-site POST, and the guard has already refused
    origins not allowed by --cors) must say application/json. One with no
    Origin comes from a program (curl, a client library), and may leave
    the type out or say form-urlencoded, as curl's ``-d`` does: the body
    is read as JSON all the same."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    allowed = ("application/json",) if "origin" in request.headers else NON_BROWSER_TYPES
    if ctype not in allowed:
        raise ApiError("media_type", f"send the body as application/json, not {ctype[:60] or 'unlabelled'} "
                                     "(curl: -H 'Content-Type: application/json')")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError("too_large", f"the body is over {limit:,} bytes, the most this server accepts")
        chunks.append(chunk)
    data = b"".join(chunks)
    try:
        # On the event loop: a worker thread would not free it, since
        # json.loads keeps Python's global lock, and load_json's limits keep
        # the worst body to about 50 ms (docs/http.md, "Limits").
        body = load_json(data)
    except ValueError as e:
        raise ApiError("invalid_request", f"the body is not JSON: {e}") from None
    if not isinstance(body, dict):
        raise ApiError("invalid_request", "the body must be a JSON object")
    return body


class Generation:
    """One request's event stream, started: its first event is already in
    hand, so anything that fails before it (a full queue, a prompt too
    long) is still an HTTP error rather than a broken stream."""

    def __init__(self, run: generation.Run, first, endpoint: str, metrics):
        self._run, self._first = run, first
        self.tokens = run.tokens          # the prompt's ids
        self.model = run.model            # what runs it: .name, .native
        self.endpoint, self.metrics = endpoint, metrics
        self.stats = None

    @classmethod
    async def start(cls, front, req: GenerationRequest, endpoint: str, body: dict) -> "Generation":
        """Start ``req`` on the model ``body`` names (its ``model`` and
        ``keep_alive``); ``front`` has ``require_pool()`` and ``metrics``."""
        run = await front.require_pool().run(body.get("model"), req, keep_alive=generation.keep_alive_of(body))
        try:
            first = await run.events.__anext__()
        except BaseException:
            await run.aclose()
            raise
        return cls(run, first, endpoint, front.metrics)

    async def __aiter__(self):
        """TextEvents, then the DoneEvent (kept in ``.stats`` too). Closing
        this iterator early cancels the request."""
        last = None   # the first token's wait is time to first token, counted apart
        async with contextlib.aclosing(self._run.events) as events:
            ev = self._first
            while True:
                if isinstance(ev, DoneEvent):
                    self.stats = ev.stats
                    self.metrics.finished(ev.stats)
                    yield ev
                    return
                if ev.tokens:
                    now = time.perf_counter()
                    if last is None:   # tokens held back with the first one came at the same moment
                        self.metrics.inter_token(0.0, len(ev.tokens) - 1)
                    else:
                        self.metrics.inter_token(now - last, len(ev.tokens))
                    last = now
                yield ev
                ev = await events.__anext__()

    async def text(self, request: Request) -> str:
        """The whole answer's text (see :meth:`reply`)."""
        return (await self.reply(request)).content

    async def reply(self, request: Request):
        """The whole answer, as an edgeinfer.tools.Reply: its text, the
        tool calls it made, and its log-probabilities if asked. A client
        that hangs up while waiting for it cancels the request (a stream
        notices through its writes; this watches the connection instead)."""
        return await until_hang_up(request, self._collect())

    async def _collect(self):
        from ..tool_calls import Collector

        answer = Collector()
        async for ev in self:
            answer.add(ev)
        return answer.reply()


async def until_hang_up(request: Request, work):
    """The result of the coroutine ``work``, cancelled if the client
    hangs up first (then an ApiError)."""
    async def hang_up():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    answer, gone = asyncio.ensure_future(work), asyncio.ensure_future(hang_up())
    try:
        await asyncio.wait({answer, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in (answer, gone):
            if not t.done():
                t.cancel()
        await asyncio.gather(answer, gone, return_exceptions=True)
    if not answer.done() or answer.cancelled():
        raise ApiError("invalid_request", "the client closed the connection before the answer was ready")
    return answer.result()


MAX_CHOICES = 16


class Choices:
    """The ``n`` answers of one request: a Generation each, started
    together (sequences of the same prompt share its prefill in the
    scheduler), their events merged as ``(index, event)``."""

    def __init__(self, gens: list[Generation]):
        self.gens = gens
        self.stats = None     # the answers' figures summed, once all are done
        self.model, self.tokens = gens[0].model, gens[0].tokens

    @classmethod
    async def start(cls, front, req: GenerationRequest, endpoint: str, body: dict, n: int) -> "Choices":
        """``n`` copies of ``req``, each with its own seed (``seed + i``
        when the request gives one, so that answers differ)."""
        import dataclasses

        if n == 1:
            return cls([await Generation.start(front, req, endpoint, body)])
        reqs = [dataclasses.replace(req, seed=None if req.seed is None else (req.seed + i) % (1 << 32),
                                    sampling=dict(req.sampling), stop=list(req.stop)) for i in range(n)]
        started = await asyncio.gather(*(Generation.start(front, r, endpoint, body) for r in reqs),
                                       return_exceptions=True)
        failed = [g for g in started if isinstance(g, BaseException)]
        if failed:
            for g in started:
                if isinstance(g, Generation):
                    await g._run.aclose()
            raise failed[0]
        return cls(list(started))

    async def __aiter__(self):
        if len(self.gens) == 1:   # the usual case: no merging
            gen = self.gens[0]
            async for ev in gen:
                yield 0, ev
            self.stats = gen.stats
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, gen: Generation):
            try:
                async for ev in gen:
                    await queue.put((i, ev))
            except Exception as e:
                await queue.put((i, e))

        tasks = [asyncio.ensure_future(pump(i, g)) for i, g in enumerate(self.gens)]
        try:
            left = len(tasks)
            while left:
                i, ev = await queue.get()
                if isinstance(ev, Exception):
                    raise ev
                if isinstance(ev, DoneEvent):
                    left -= 1
                yield i, ev
            self.stats = summed([g.stats for g in self.gens])
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def replies(self, request: Request) -> list:
        """Each answer as an edgeinfer.tools.Reply, in order."""
        from ..tool_calls import Collector

        async def collect():
            answers = [Collector() for _ in self.gens]
            async for i, ev in self:
                answers[i].add(ev)
            return [a.reply() for a in answers]

        return await until_hang_up(request, collect())


def summed(stats: list):
    """One Stats for several answers to one prompt: the prompt counted
    once, the generated tokens of all."""
    import dataclasses

    out = dataclasses.replace(stats[0])
    out.generated_tokens = sum(s.generated_tokens for s in stats)
    return out


async def stream_events(gen: Generation, front, endpoint: str, error_event=None):
    """The stream's events; a failure after the headers went out becomes
    one error event (the OpenAI client raises it) instead of a cut stream:
    OpenAI's by default, Anthropic's with ``error_event`` true, or what
    ``error_event(ApiError)`` makes of it (bytes) when it is callable.
    Counts the request once it ends."""
    status = 200
    t0 = time.perf_counter()
    try:
        async for ev in gen:
            yield ev
    except Exception as e:
        err = api_error_from(e)
        status = err.status
        if status >= 500:
            log.error("%s failed mid-stream: %s", endpoint, err, exc_info=not isinstance(e, ApiError))
        if callable(error_event):
            yield error_event(err)
        else:
            yield sse(err.anthropic_body(), "error") if error_event else sse(err.openai_body())
    finally:
        front.metrics.count(endpoint, status)
        st = gen.stats
        if st is not None:
            log.info(
                "%s stream: %d+%d tokens (%d cached), %s, %.2f s", endpoint, st.prompt_tokens,
                st.generated_tokens, st.cached_tokens, st.finish_reason, time.perf_counter() - t0)
