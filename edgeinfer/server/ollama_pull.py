"""``POST /api/pull``: a catalog model into the store, by its name or its
Ollama name, with progress as Ollama streams it (NDJSON objects of
``status``, and ``digest``, ``total`` and ``completed`` while bytes
arrive), or one object with ``stream: false``.

Only the catalog's names are pulled: a client of this API cannot make
the server fetch a URL or read a file. A name only Ollama's registry has
is a 404 that says where the names that can be pulled are listed.
"""

from __future__ import annotations

import asyncio
import logging
import time

from starlette.responses import JSONResponse, Response, StreamingResponse

from ..errors import InvalidNameError, ModelNotFoundError, RequestError
from .api import ApiError, api_error_from
from .fields import Fields
from .ollama_models import model_field, ndjson, our_name

log = logging.getLogger("edgeinfer.http")


class _PullProgress:
    """A pull's progress (edgeinfer.progress.Progress) as Ollama's
    progress objects, handed to the event loop from the pull's thread."""

    EVERY = 0.2   # seconds between objects while bytes arrive

    def __init__(self, put, digest: str):
        self.put, self.digest = put, digest
        self.total, self.done, self.last = None, 0, 0.0

    def _send(self) -> None:
        self.last = time.monotonic()
        self.put({"status": f"pulling {self.digest[:12]}", "digest": f"sha256:{self.digest}",
                  "total": self.total, "completed": self.done})

    def start(self, total, desc, initial=0, unit="B"):
        self.total, self.done = total, initial
        self._send()

    def update(self, n):
        self.done += n
        if time.monotonic() - self.last >= self.EVERY:
            self._send()

    def close(self):
        self._send()
        self.put({"status": "verifying sha256 digest"})


async def pull(front, body: dict, request) -> Response:
    from .. import catalog
    from ..fit import entry_refusal
    from ..names import parse_ref
    from ..pull import pull_entry

    f = Fields(body)
    name = model_field(f)
    stream = f.boolean("stream", True)
    f.boolean("insecure")   # every byte is checked against the catalog's sha256: nothing to loosen
    pool = front.require_pool()
    store = pool.store
    if store is None:
        raise ApiError("invalid_request", "this server has no model store to pull into; start it with "
                                          "'edgeinfer serve' (not on a single file)")

    def check():
        try:
            ref = parse_ref(our_name(name))
        except InvalidNameError as e:
            raise RequestError("model", f"{e.one_line()}: pull takes a name from edgeinfer's catalog "
                                        "('edgeinfer list --catalog' shows them)") from None
        entry = catalog.lookup(ref)
        if entry is None:
            have = store.get(ref)
            if have is not None and have.path and have.path.exists():
                return None   # in the store already (imported, or copied)
            raise ModelNotFoundError(f"{name[:100]!r} is not in edgeinfer's catalog; run 'edgeinfer list "
                                     "--catalog' to see what can be pulled by name (Ollama's registry is "
                                     "not a source), or pull a URL or file with 'edgeinfer pull'")
        if not store.blob_path(entry.sha256).exists():
            refusal = entry_refusal(entry)
            if refusal is not None:
                raise refusal
        return entry

    try:
        entry = await asyncio.to_thread(check)
    except ModelNotFoundError as e:
        raise ApiError("not_found", e.one_line()) from None
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    def put(obj):
        loop.call_soon_threadsafe(queue.put_nowait, obj)

    def work():
        if entry is not None:
            pull_entry(entry, store=store, progress=_PullProgress(put, entry.sha256),
                       log=lambda msg: put({"status": msg}), quiet=True)

    async def run():
        try:
            await asyncio.to_thread(work)
        except Exception as e:   # noqa: BLE001 - said to the client, whatever it is
            err = api_error_from(e)
            log.warning("pull %s failed: %s", name, err)
            queue.put_nowait({"error": str(err)})
        else:
            queue.put_nowait({"status": "success"})
        queue.put_nowait(None)

    task = asyncio.ensure_future(run())

    async def objects():
        try:
            yield {"status": "pulling manifest"}
            while (obj := await queue.get()) is not None:
                yield obj
        finally:
            if not task.done():   # the client left: the pull goes on to the end (it resumes anyway)
                task.add_done_callback(lambda t: t.exception())

    if stream:
        async def lines():
            status = 200
            async for obj in objects():
                if "error" in obj:
                    status = 500
                yield ndjson(obj)
            front.metrics.count("/api/pull", status)
        return StreamingResponse(lines(), media_type="application/x-ndjson")
    last = None
    async for obj in objects():
        last = obj
        if "error" in obj:
            raise ApiError("server", obj["error"])
    return JSONResponse(last)
