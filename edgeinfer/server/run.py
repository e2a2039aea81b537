"""Running the servers of ``edgeinfer serve`` together in one event loop.

The HTTP port opens first, so ``GET /health`` answers 503 while the pinned
models load (a Pi takes seconds to map a 1 GB model); the JSON-lines port
opens once they are ready. Every other model loads when a request names it
(edgeinfer.pool). SIGTERM or SIGINT drains both and returns. Meanwhile the log says when
the CPU starts throttling (edgeinfer.heat).
"""

from __future__ import annotations

import asyncio
import logging

from ..errors import ServerConfigError
from ..heat import watch as watch_heat

log = logging.getLogger("edgeinfer.server")


def _bind_error(what: str, e: OSError) -> ServerConfigError:
    return ServerConfigError(f"cannot listen on {what}: {e.strerror or e}",
                             hint="is another server using it? pick another port, or stop that one")


async def serve_all(pool, pinned=(), *, jsonl_opts=None, http_opts=None, ready=None) -> None:
    """Load the ``pinned`` models into ``pool`` (an edgeinfer.pool.ModelPool)
    while the HTTP port says it is loading; serve until a signal; drain;
    unload every model."""
    from .http import HttpFront
    from .jsonl import Server, stop_event

    stop = stop_event()
    fronts, where = [], []
    try:
        if http_opts is not None:
            http = HttpFront(None, http_opts, store=pool.store)
            try:
                where += await http.start()
            except OSError as e:
                raise _bind_error(f"{http_opts.host}:{http_opts.port}", e) from None
            fronts.append(http)
            log.info("HTTP on %s; /health answers 503 until the models are loaded", ", ".join(where))
        loading = asyncio.ensure_future(pool.start(list(pinned)))
        stopped = asyncio.ensure_future(stop.wait())
        await asyncio.wait({loading, stopped}, return_when=asyncio.FIRST_COMPLETED)
        await loading        # a load cannot be interrupted; a signal waits for it
        if stop.is_set():
            return
        stopped.cancel()
        for front in fronts:
            front.engine = pool
        if jsonl_opts is not None:
            server = Server(pool, jsonl_opts, store=pool.store)
            try:
                where[:0] = await server.start()
            except OSError as e:
                raise _bind_error(f"{jsonl_opts.host}:{jsonl_opts.port}", e) from None
            fronts.append(server)
        if ready is not None:
            ready(pool, where)
        heat = asyncio.ensure_future(watch_heat(log))
        try:
            await stop.wait()
        finally:
            heat.cancel()
    finally:
        if fronts:
            await asyncio.gather(*(f.stop() for f in fronts), return_exceptions=True)
        await pool.close()
