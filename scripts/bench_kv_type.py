#!/usr/bin/env python
"""Decode and prefill speed with the K cache in f16 and in q8_0 (the
small-box default), on a short and a long prompt. Each engine is loaded
in turn, twice, with the prompt cache off; each figure is the median of
--reps runs of Engine.stream_tokens(..., ignore_eos=True).

    python scripts/bench_kv_type.py --model smollm2-135m-instruct --threads 2
"""

from __future__ import annotations

import argparse
import statistics

import edgeinfer
from edgeinfer import hardware


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per run")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2, help="times each K type is loaded, alternating")
    args = ap.parse_args()
    print(f"# {hardware.cpu_model()}, {hardware.physical_cores()} cores, model {args.model}, "
          f"{args.tokens} new tokens, median of {args.reps}")
    print("| K cache | prompt tokens | prefill tok/s | decode tok/s |\n|---|---:|---:|---:|")
    for _ in range(args.rounds):
        for kv in ("f16", "q8_0"):
            with edgeinfer.load(args.model, kv_type=kv, threads=args.threads, n_ctx=4096, prompt_cache=False) as e:
                for repeats in (5, 100):
                    tokens = e.tokenize("The weather was mild and the market was busy. " * repeats)
                    runs = [list(e.stream_tokens(tokens, max_tokens=args.tokens, ignore_eos=True,
                                                 temperature=0))[-1].stats for _ in range(args.reps)]
                    print(f"| {kv} | {len(tokens)} | {statistics.median(s.prefill_tps for s in runs):.1f} | "
                          f"{statistics.median(s.decode_tps for s in runs):.1f} |", flush=True)


if __name__ == "__main__":
    main()
