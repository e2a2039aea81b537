"""``edgeinfer serve --http``: OpenAI- and Anthropic-compatible HTTP.

The app is Starlette, served by uvicorn inside the same event loop as the
JSON-lines server, on a socket bound here. Every generating endpoint is a
thin view of :meth:`Engine.astream_tokens`, so HTTP streams share the
scheduler's batched steps with everything else.

Security, as on the JSON-lines port: loopback by default; anywhere else a
token is required (``Authorization: Bearer`` or ``x-api-key``, compared in
constant time). On loopback the Host header must name a loopback host, so
a web page that rebinds its own DNS name to 127.0.0.1 is refused
(Ollama's CVE-2024-28224); a request from a browser page (an ``Origin``
header) is refused unless ``--cors ORIGIN`` allows that origin.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import socket
import time
from dataclasses import dataclass, field

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from . import anthropic_api, generation, infill_api, ollama_api, openai_api, responses_api
from .api import RETRY_AFTER_S, ApiError, api_error_from, error_response, read_json
from .defaults import DEFAULT_HTTP_PORT, DEFAULT_MAX_BODY
from .jsonl import is_loopback
from .metrics import Metrics

log = logging.getLogger("edgeinfer.http")


@dataclass
class HttpOptions:
    host: str = "127.0.0.1"
    port: int = DEFAULT_HTTP_PORT
    token: str | None = None
    cors: list[str] = field(default_factory=list)
    max_body: int = DEFAULT_MAX_BODY
    drain_timeout: float = 30.0
    read_timeout: float = 20.0     # seconds for a request's head and body to arrive (slowloris)


def host_of(header: str) -> str:
    """The host part of a Host header: 'localhost:8080' → 'localhost',
    '[::1]:8080' → '::1', 'LOCALHOST.' → 'localhost' (names are caseless,
    and a trailing dot names the same host). Anything that is not a host
    with an optional port ('[::1]evil.com', '[::1', 'localhost:x') is '',
    which no loopback check accepts."""
    h = header.strip()
    if h.startswith("["):
        end = h.find("]")
        rest = h[end + 1:] if end > 0 else "?"
        if rest and not (rest.startswith(":") and rest[1:].isdigit()):
            return ""
        return h[1:end]
    if h.count(":") == 1:
        h, port = h.split(":")
        if not port.isdigit():
            return ""
    return h.lower().removesuffix(".")


class Guard:
    """ASGI middleware in front of every route: Host, Origin and token
    checks, and a body-size limit taken from Content-Length. It answers
    refusals itself, so nothing behind it runs for them."""

    def __init__(self, app, front: "HttpFront"):
        self.app, self.front = app, front

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        try:
            self.check(scope)
        except ApiError as e:
            self.front.metrics.count(_endpoint(scope["path"]), e.status)
            return await error_response(e, scope["path"])(scope, receive, send)
        return await self.app(scope, receive, send)

    def check(self, scope) -> None:
        opts = self.front.opts
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if is_loopback(opts.host):
            host = headers.get("host")
            if host is not None and not is_loopback(host_of(host)):
                raise ApiError("permission", f"Host {host[:80]!r} is not a loopback name; this server "
                                             "listens on loopback and answers only to localhost or 127.0.0.1")
        origin = headers.get("origin")
        if origin is not None and origin not in opts.cors:
            raise ApiError("permission", f"requests from web pages at {origin[:80]!r} are not allowed; "
                                         "start the server with --cors ORIGIN to allow one")
        if opts.token is not None and scope["path"] != "/health" and scope["method"] != "OPTIONS":
            given = headers.get("x-api-key")
            auth = headers.get("authorization", "")
            if given is None and auth[:7].lower() == "bearer ":
                given = auth[7:].strip()
            if given is None or not hmac.compare_digest(given.encode(), opts.token.encode()):
                raise ApiError("authentication", "this server needs its token, as 'Authorization: Bearer TOKEN' "
                                                 "or 'x-api-key: TOKEN'", code="invalid_api_key")
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > opts.max_body:
            raise ApiError("too_large", f"the body is {int(length):,} bytes; this server accepts at most "
                                        f"{opts.max_body:,}")


def _endpoint(path: str) -> str:
    return path if path in ROUTE_PATHS else "other"


def _protocol_with_deadline(seconds: float):
    """uvicorn's HTTP/1.1 protocol, where a request's head and body must
    arrive within ``seconds`` of the connection opening (or of the previous
    response on a kept-alive one): a client that trickles its headers or
    never finishes a body (slowloris) is disconnected instead of holding a
    connection forever. uvicorn itself times out only idle kept-alive
    connections, not a request that is still arriving."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Protocol(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self):
            super().on_response_complete()
            self._arm()

        def connection_lost(self, exc):
            if self._deadline is not None:
                self._deadline.cancel()
            super().connection_lost(exc)

        def _arm(self):
            if self._deadline is not None:
                self._deadline.cancel()
            self._deadline = self.loop.call_later(seconds, self._late)

        def _late(self):
            # IDLE: no whole request head yet; SEND_BODY: its body unfinished.
            if self.conn.their_state in (h11.IDLE, h11.SEND_BODY) and not self.transport.is_closing():
                self.transport.close()

    return Protocol


class HttpFront:
    """The HTTP server of the models a server runs (which may still be
    loading)."""

    def __init__(self, engine, opts: HttpOptions, store=None):
        """``engine``: an Engine, an edgeinfer.pool.ModelPool, or None while
        the models load (/health says 503 until :attr:`pool` is set)."""
        self.store = store
        self.pool = None
        self.engine = engine
        self.opts = opts
        self.metrics = Metrics(lambda: self.pool)
        self.editors = infill_api.Editors()   # fill-in-the-middle: a newer request ends the editor's last
        self.stopping = False
        self._server = None
        self._tick = None
        self._sockets: list[socket.socket] = []
        self.started = time.time()
        self.app = self._build_app()

    @property
    def engine(self):
        """The one model served, when exactly one is pinned."""
        only = self.pool.only() if self.pool is not None else None
        return only.model if only is not None else None

    @engine.setter
    def engine(self, engine) -> None:
        from ..pool import ModelPool

        self.pool = engine if engine is None or isinstance(engine, ModelPool) else \
            ModelPool.of_engine(engine, self.store)

    # -- the app ----------------------------------------------------------
    def _build_app(self) -> Starlette:
        routes = [
            Route("/health", self.health, methods=["GET"]),
            Route("/metrics", self.metrics_page, methods=["GET"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/models/{model_id:path}", self.model, methods=["GET"]),
            Route("/v1/chat/completions", self._wrap(openai_api.chat_completions), methods=["POST"]),
            Route("/v1/completions", self._wrap(openai_api.completions), methods=["POST"]),
            Route("/v1/embeddings", self._wrap(openai_api.embeddings), methods=["POST"]),
            Route("/v1/responses", self._wrap(responses_api.responses), methods=["POST"]),
            Route("/v1/messages", self._wrap(anthropic_api.messages), methods=["POST"]),
            Route("/v1/messages/count_tokens", self._wrap(anthropic_api.count_tokens), methods=["POST"]),
            Route("/infill", self._wrap(infill_api.infill), methods=["POST"]),
            *ollama_api.routes(self),
        ]
        middleware = [Middleware(Guard, front=self)]
        if self.opts.cors:
            # Outermost, so a browser's preflight is answered before the guard.
            middleware.insert(0, Middleware(CORSMiddleware, allow_origins=self.opts.cors,
                                            allow_methods=["GET", "POST", "OPTIONS"],
                                            allow_headers=["authorization", "content-type", "x-api-key",
                                                           "anthropic-version", "anthropic-beta"]))
        handlers = {404: self._not_found, 405: self._not_allowed}
        return Starlette(routes=routes, middleware=middleware, exception_handlers=handlers)

    def _wrap(self, handler):
        """A generating endpoint: parse, run, answer; every failure in the
        API's own error shape, counted by endpoint and status."""
        async def endpoint(request: Request) -> Response:
            path = request.url.path
            t0 = time.perf_counter()
            try:
                if self.stopping:
                    raise generation.StoppingError("the server is stopping; no new requests")
                body = await read_json(request, self.opts.max_body)
                response = await handler(self, body, request)
            except Exception as e:
                err = api_error_from(e)
                if err.status >= 500:
                    log.error("%s failed: %s", path, err, exc_info=not isinstance(e, ApiError))
                self.metrics.count(path, err.status)
                return error_response(err, path)
            if not isinstance(response, StreamingResponse):
                self.metrics.count(path, response.status_code)
                log.info("%s %d in %.2f s", path, response.status_code, time.perf_counter() - t0)
            return response
        return endpoint

    async def _not_found(self, request: Request, exc) -> Response:
        self.metrics.count("other", 404)
        return error_response(ApiError("not_found", f"no route {request.url.path[:100]}; see docs/http.md"),
                              request.url.path)

    async def _not_allowed(self, request: Request, exc) -> Response:
        self.metrics.count(_endpoint(request.url.path), 405)
        return error_response(ApiError("method", f"{request.method} is not allowed on {request.url.path}"),
                              request.url.path)

    def require_pool(self):
        if self.pool is None:
            raise ApiError("unavailable", "the model is still loading; retry shortly")
        return self.pool

    def check_model(self, model, param: str = "model", required: bool = False) -> None:
        """A RequestError for a model name that is missing (when
        ``required``) or not a string; which model it means is the
        pool's to say (a 404 when none)."""
        self.require_pool()
        if model is None and required:
            raise generation.RequestError(param, f"{param} is required: GET /v1/models lists the models here")
        if model is not None and not isinstance(model, str):
            raise generation.RequestError(param, f"{param} must be a string")

    async def health(self, request: Request) -> Response:
        if self.pool is None:
            return JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": str(RETRY_AFTER_S)})
        if self.stopping:
            return JSONResponse({"status": "stopping"}, status_code=503)
        only = self.engine
        return JSONResponse({"status": "ok", "model": only.name if only is not None else None,
                             "loaded": [s.name for s in self.pool.slots.values() if s.model is not None],
                             "uptime_s": round(time.time() - self.started, 1)})

    async def metrics_page(self, request: Request) -> Response:
        body, ctype = await asyncio.to_thread(self.metrics.render)
        self.metrics.count("/metrics", 200)
        return Response(body, media_type=ctype)

    def _model_card(self, d: dict) -> dict:
        """An OpenAI model object, with what edgeinfer knows of it under
        "edgeinfer" (loaded, state, memory, threads, expiry)."""
        card = {"id": d["name"], "object": "model", "created": int(self.started), "owned_by": "edgeinfer",
                "loaded": d.get("loaded", False)}
        if d.get("n_ctx"):
            card["context_length"] = d["n_ctx"]
        card["edgeinfer"] = {k: v for k, v in d.items() if k != "name"}
        return card

    async def models(self, request: Request) -> Response:
        pool = self.require_pool()
        listed = await asyncio.to_thread(pool.listed)
        self.metrics.count("/v1/models", 200)
        return JSONResponse({"object": "list", "data": [self._model_card(d) for d in listed]})

    async def model(self, request: Request) -> Response:
        try:
            pool = self.require_pool()
            name = request.path_params["model_id"]
            ref = await asyncio.to_thread(pool.resolve, name)
        except Exception as e:
            return error_response(api_error_from(e), request.url.path)
        return JSONResponse({**self._model_card(pool.describe(ref)), "id": name})

    # -- lifecycle --------------------------------------------------------
    async def start(self) -> list[str]:
        import uvicorn

        sock = socket.create_server((self.opts.host, self.opts.port),
                                    family=socket.AF_INET6 if ":" in self.opts.host else socket.AF_INET,
                                    backlog=256)
        sock.setblocking(False)
        self._sockets = [sock]
        config = uvicorn.Config(self.app, lifespan="off", log_config=None, access_log=False,
                                timeout_keep_alive=30, timeout_graceful_shutdown=int(self.opts.drain_timeout),
                                server_header=False, date_header=True,
                                http=_protocol_with_deadline(self.opts.read_timeout))
        config.load()
        server = uvicorn.Server(config)
        # Run inside our loop: startup on our socket, tick, shutdown. The
        # server's own serve() would take over the process's signals.
        server.lifespan = config.lifespan_class(config)
        logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
        await server.startup(sockets=self._sockets)
        # Starlette streams through anyio, which imports its asyncio backend
        # on first use: about 50 ms that would otherwise land on the first
        # streamed answer after a start.
        import anyio

        await anyio.sleep(0)
        self._server = server
        self._tick = asyncio.create_task(server.main_loop())
        host, port = sock.getsockname()[:2]
        return [f"http://{'[' + host + ']' if ':' in host else host}:{port}"]

    @property
    def port(self) -> int:
        return self._sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Refuse new requests, let streams in flight finish within the
        drain timeout, then close."""
        self.stopping = True
        if self._server is None:
            return
        self._server.should_exit = True
        if self._tick is not None:
            await self._tick
        await self._server.shutdown(sockets=self._sockets)
        for s in self._sockets:
            s.close()


ROUTE_PATHS = ("/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions", "/v1/embeddings",
               "/v1/responses", "/v1/messages", "/v1/messages/count_tokens", "/infill", *ollama_api.PATHS)
