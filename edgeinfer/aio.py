"""Bridging the engine's blocking stream to asyncio without blocking the
event loop: the stream runs on a worker thread and hands events over
through a queue."""

from __future__ import annotations

import asyncio
import threading
from typing import AsyncIterator, Callable, Iterator

_END = object()


async def stream_in_thread(make_stream: Callable[[threading.Event], Iterator]) -> AsyncIterator:
    """Iterate ``make_stream(stop)`` on a worker thread. ``stop`` is this
    request's own cancel event: it is set when the consumer goes away, so
    only this request stops, never another one sharing the engine."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    stop = threading.Event()

    def hand_over(item) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            stop.set()

    def worker():
        try:
            for event in make_stream(stop):
                hand_over(event)
        except BaseException as e:  # handed to the awaiting side
            hand_over(e)
        finally:
            hand_over(_END)

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
            # stop this generation so the engine is free for the next call.
            stop.set()
            await asyncio.to_thread(thread.join)
