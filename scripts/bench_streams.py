#!/usr/bin/env python
"""Many streams on one Engine: aggregate decode tok/s at 1, 2, 4 and 8
streams, next to llama-batched-bench from the same vendored llama.cpp;
one stream through the socket server against the engine alone; and the
longest gap between tokens of a running stream while a long prompt
arrives. Also reached as ``bench_engine.py --streams``.

Each stream gets a prompt of --npp plain tokens of its own and decodes
--ntg tokens greedily (llama-batched-bench's -npp / -ntg / -npl). The
aggregate is (streams x tokens after the first) / (last token - first
token), so the prefill is not counted.

    python scripts/bench_streams.py
    python scripts/bench_streams.py --batched-bench ~/llama.cpp/build/bin/llama-batched-bench --reps 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time

import edgeinfer
from edgeinfer import hardware
from edgeinfer.engine import Engine, TextEvent


def plain(engine: Engine, n: int, rng: random.Random) -> list[int]:
    out = []
    while len(out) < n:
        t = rng.randrange(engine.n_vocab)
        if not engine.is_eog(t) and engine.token_bytes(t) and engine.token_bytes(t) == engine.token_bytes(t, True):
            out.append(t)
    return out


def streams_tps(engine: Engine, n: int, npp: int, ntg: int, rng: random.Random) -> float:
    prompts = [plain(engine, npp, rng) for _ in range(n)]
    firsts, ends, counts = [0.0] * n, [0.0] * n, [0] * n
    barrier = threading.Barrier(n)

    def one(i):
        barrier.wait()
        for ev in engine.stream_tokens(prompts[i], max_tokens=ntg, temperature=0):
            if isinstance(ev, TextEvent) and ev.tokens:
                now = time.perf_counter()
                if not counts[i]:
                    firsts[i] = now
                counts[i] += len(ev.tokens)
                ends[i] = now

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return (sum(counts) - n) / (max(ends) - max(firsts))


def socket_tps(engine: Engine, ntg: int, rng: random.Random) -> float:
    """One stream through a JSON-lines server on loopback, in this process."""
    from edgeinfer.server.client import Client
    from edgeinfer.server.jsonl import Options, Server

    ready = threading.Event()
    box = {}

    def serve():
        async def main():
            srv = Server(engine, Options(host="127.0.0.1", port=0))
            where = await srv.start()
            box["port"] = int(where[0].rsplit(":", 1)[1])
            box["loop"], box["stop"] = asyncio.get_running_loop(), asyncio.Event()
            ready.set()
            await box["stop"].wait()
            await srv.stop()
        asyncio.run(main())

    th = threading.Thread(target=serve, daemon=True)
    th.start()
    ready.wait(30)
    prompt = engine.detokenize(plain(engine, 16, rng))
    stamps = []
    with Client(port=box["port"]) as c:
        for ev in c.stream(prompt, max_tokens=ntg, temperature=0):
            if ev.text:
                stamps.append(time.perf_counter())
    box["loop"].call_soon_threadsafe(box["stop"].set)
    th.join(30)
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def engine_tps(engine: Engine, ntg: int, rng: random.Random) -> float:
    prompt = engine.detokenize(plain(engine, 16, rng))
    stamps = [time.perf_counter() for ev in engine.stream(prompt, max_tokens=ntg, temperature=0) if ev.text]
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def gap_during_long_prompt(engine: Engine, n_prompt: int, rng: random.Random) -> dict:
    long_prompt = plain(engine, n_prompt, rng)
    stamps: list[float] = []
    going = threading.Event()
    window = {}

    def runner():
        for ev in engine.stream_tokens(plain(engine, 16, rng), max_tokens=2000, temperature=0):
            stamps.append(time.perf_counter())
            if len(stamps) == 20:
                going.set()
            if "end" in window:
                break

    th = threading.Thread(target=runner)
    th.start()
    going.wait(60)
    before = [b - a for a, b in zip(stamps, stamps[1:])]
    window["start"] = time.perf_counter()
    list(engine.stream_tokens(long_prompt, max_tokens=1, temperature=0))
    window["end"] = time.perf_counter()
    th.join()
    inside = [t for t in stamps if window["start"] - 1 <= t <= window["end"]]
    gaps = [b - a for a, b in zip(inside, inside[1:])]
    return {"prompt_tokens": n_prompt, "prefill_chunk": engine.status()["prefill_chunk"],
            "longest_gap_ms": round(max(gaps) * 1000, 1),
            "typical_gap_ms": round(statistics.median(before) * 1000, 1),
            "prefill_s": round(window["end"] - window["start"], 2)}


def batched_bench(binary: str, model, threads: int, npp: int, ntg: int, npl: list[int], extra: list[str],
                  flash_attn: bool = False):
    # -fa is explicit: the tool's own default is "auto", which is on for CPUs
    cmd = [binary, "-m", str(model), "-t", str(threads), "-tb", str(threads), "-c", "4096", "-b", "512",
           "-fa", "on" if flash_attn else "off",
           "-ub", "512", "-npp", str(npp), "-ntg", str(ntg), "-npl", ",".join(map(str, npl)), "-kvu", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"llama-batched-bench failed ({proc.returncode}): {proc.stderr[-800:]}")
    out = {}
    for line in proc.stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 8 and cells[2].isdigit():
            out[int(cells[2])] = float(cells[7])   # B -> S_TG t/s
    return out, cmd


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="examples:\n" + __doc__.rsplit("\n\n", 1)[1])
    p.add_argument("--model", default=edgeinfer.default_entry().name)
    p.add_argument("--threads", type=int, default=hardware.default_threads())
    p.add_argument("--npp", type=int, default=64)
    p.add_argument("--ntg", type=int, default=96)
    p.add_argument("--streams", default="1,2,4,8")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--long-prompt", type=int, default=1000)
    p.add_argument("--flash-attn", action="store_true")
    p.add_argument("--batched-bench", metavar="PATH", help="also run this llama-batched-bench binary")
    p.add_argument("--batched-bench-args", default="", help="e.g. '--no-repack' where the self-test "
                   "turned extra buffer types off")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    npl = [int(x) for x in args.streams.split(",")]
    path, _ = edgeinfer.resolve_model(args.model)
    rng = random.Random(7)
    engine = edgeinfer.load(args.model, n_ctx=4096, threads=args.threads, threads_batch=args.threads,
                            n_seq_max=max(npl), prompt_cache=False, stop_on_repeat=False,
                            flash_attn=args.flash_attn)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    log(f"{engine.name}, {args.threads} threads, native {engine.native.setting}, load {os.getloadavg()[0]:.2f}")
    streams_tps(engine, 1, args.npp, 8, rng)  # warm-up
    ours = {n: [] for n in npl}
    for rep in range(args.reps):
        for n in npl:
            ours[n].append(streams_tps(engine, n, args.npp, args.ntg, rng))
        log(f"rep {rep + 1}/{args.reps}: " + ", ".join(f"{n}: {ours[n][-1]:.1f}" for n in npl))
    alone = statistics.median(engine_tps(engine, 128, rng) for _ in range(args.reps))
    through = statistics.median(socket_tps(engine, 128, rng) for _ in range(args.reps))
    gap = gap_during_long_prompt(engine, args.long_prompt, rng)
    engine.close()
    report = {"model": args.model, "threads": args.threads, "flash_attn": args.flash_attn,
              "cpu": hardware.cpu_model(), "npp": args.npp, "ntg": args.ntg,
              "edgeinfer_tps": {n: round(statistics.median(v), 1) for n, v in ours.items()},
              "engine_one_stream_tps": round(alone, 1), "socket_one_stream_tps": round(through, 1),
              "socket_vs_engine": round(through / alone, 3), "long_prompt": gap}
    if args.batched_bench:
        import shlex

        theirs, cmd = batched_bench(args.batched_bench, path, args.threads, args.npp, args.ntg, npl,
                                    shlex.split(args.batched_bench_args), args.flash_attn)
        report["llama_batched_bench_tps"] = theirs
        report["llama_batched_bench_cmd"] = " ".join(map(str, cmd))
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"# {report['cpu']}, {args.threads} threads, {args.model}, prompts {args.npp}, {args.ntg} new tokens each, "
          f"flash attention {'on' if args.flash_attn else 'off'}")
    print("| streams | edgeinfer tok/s | x one stream | llama-batched-bench tok/s | x one stream | ratio of ratios |")
    print("|---:|---:|---:|---:|---:|---:|")
    e1 = report["edgeinfer_tps"][npl[0]]
    t = report.get("llama_batched_bench_tps", {})
    for n in npl:
        e = report["edgeinfer_tps"][n]
        if t:
            rr = (e / e1) / (t[n] / t[npl[0]])
            print(f"| {n} | {e:.1f} | {e / e1:.2f} | {t[n]:.1f} | {t[n] / t[npl[0]]:.2f} | {rr:.2f} |")
        else:
            print(f"| {n} | {e:.1f} | {e / e1:.2f} | | | |")
    print(f"\none stream: engine {alone:.1f} tok/s, through the socket {through:.1f} "
          f"({report['socket_vs_engine']:.3f}x)")
    g = report["long_prompt"]
    print(f"a {g['prompt_tokens']}-token prompt arriving (prefill chunk {g['prefill_chunk']}, "
          f"{g['prefill_s']} s): longest gap of the running stream {g['longest_gap_ms']} ms, "
          f"typical {g['typical_gap_ms']} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
