"""Two engines of one process share the cores while both generate, and
one busy alone gets them all back (edgeinfer.share_cores)."""

from __future__ import annotations

import threading
import time

import pytest

import edgeinfer

pytestmark = pytest.mark.timeout(120)


def test_two_busy_engines_each_take_half_and_one_alone_takes_all(tiny_model):
    a, b = (edgeinfer.load(tiny_model, threads=2, n_ctx=2048, prompt_cache=False) for _ in range(2))
    try:
        edgeinfer.share_cores(a, b, cores=2)
        seen = set()

        def long(engine):
            engine.generate("Once", max_tokens=1800, ignore_eos=True, temperature=0)

        workers = [threading.Thread(target=long, args=(e,)) for e in (a, b)]
        for w in workers:
            w.start()
        while any(w.is_alive() for w in workers):
            seen.add((a.threads, b.threads))
            time.sleep(0.002)
        for w in workers:
            w.join()
        assert (1, 1) in seen, seen
        assert a.generate("Once", max_tokens=4, ignore_eos=True) and a.threads == 2
    finally:
        a.close()
        b.close()
