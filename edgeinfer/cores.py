"""Cores shared between the engines of one process.

A desktop app with a chat model and a small coder model loads two
engines; when both generate at once, each must decode with its share of
the cores, or two ggml thread teams spin against each other on the same
cores (83 tok/s alone fell to 28 with two teams of 2 on 2 cores). One
engine busy alone gets every core back at its next step.

>>> chat = edgeinfer.load("smollm2-135m-instruct")                    # doctest: +SKIP
>>> coder = edgeinfer.load("qwen2.5-coder-0.5b-instruct")             # doctest: +SKIP
>>> edgeinfer.share_cores(chat, coder)                                # doctest: +SKIP

A server does the same between the processes of its models
(edgeinfer.pool).
"""

from __future__ import annotations

import threading
import weakref


class CoreShare:
    """Splits ``cores`` between the engines that are generating now."""

    def __init__(self, cores: int | None = None):
        from .hardware import default_threads

        self.cores = int(cores or default_threads())
        self._busy: set[int] = set()
        self._engines: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
        self._lock = threading.Lock()

    def add(self, engine) -> None:
        """Share the cores with ``engine`` from now on."""
        key = id(engine)
        self._engines[key] = engine
        # The engines keep the share alive; it holds them weakly, so an
        # engine nobody else holds is still collected.
        engine._scheduler.on_busy = lambda busy: self.note(key, busy)

    def share(self, n_busy: int) -> int:
        """Threads each of ``n_busy`` busy engines decodes with."""
        return self.cores if n_busy <= 1 else max(1, self.cores // n_busy)

    def note(self, key: int, busy: bool) -> None:
        """An engine started or stopped generating (its scheduler's thread
        calls this, holding none of its locks)."""
        with self._lock:
            (self._busy.add if busy else self._busy.discard)(key)
            threads = self.share(len(self._busy))
            engines = [e for k, e in list(self._engines.items()) if k in self._busy]
        for engine in engines:
            if engine.threads != threads:
                engine.set_threads(threads, wait=False)   # maybe from an engine's own scheduler thread


def share_cores(*engines, cores: int | None = None) -> CoreShare:
    """Make ``engines`` share ``cores`` (default: this machine's physical
    cores) while they generate at once; returns the :class:`CoreShare`."""
    share = CoreShare(cores)
    for engine in engines:
        share.add(engine)
    return share
