"""Bridging the engine's blocking stream to asyncio without blocking the
event loop: the stream runs on a worker thread and hands events over
through a queue."""

from __future__ import annotations

import asyncio
import threading
from typing import AsyncIterator, Callable, Iterator

_END = object()


async def stream_in_thread(engine, make_stream: Callable[[], Iterator]) -> AsyncIterator:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    def worker():
        try:
            for event in make_stream():
                loop.call_soon_threadsafe(queue.put_nowait, event)
        except BaseException as e:  # handed to the awaiting side
            loop.call_soon_threadsafe(queue.put_nowait, e)
        finally:
            loop.call_soon_threadsafe(queue.put_nowait, _END)

    thread = threading.Thread(target=worker, name="edgeinfer-astream", daemon=True)
    thread.start()
    finished = False
    try:
        while True:
            item = await queue.get()
            if item is _END:
                finished = True
                return
            if isinstance(item, BaseException):
                finished = True
                raise item
            yield item
    finally:
        if not finished:
            # The consumer went away (task cancelled, loop broken out of):
            # stop the generation so the engine is free for the next call.
            engine.cancel()
            await asyncio.to_thread(thread.join)
