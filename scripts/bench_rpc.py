"""A model split over llama.cpp's RPC backend, beside the same model run
locally: load time (a worker's weight cache empty and filled), prompt and
decode speed, and each worker's memory.

    python scripts/bench_rpc.py                          # SmolLM2 135M
    python scripts/bench_rpc.py --model qwen2.5-coder-1.5b-instruct --rounds 3

Three shapes, each client in a process of its own, the rounds alternating
L, R1, R2: **L** the model in the client's process; **R1** every layer on
one worker; **R2** the layers split over two workers. Each process gets
one core with taskset and one thread: the client on CPU 0, the workers on
CPU 1 (R1) or CPUs 0 and 1 (R2). On one machine this shows what the
protocol and its round trips cost, and that each worker holds only its
share; it cannot show a LAN's latency or bandwidth (loopback has neither),
nor what two boxes' separate memory buys, which is the reason to split.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

PROMPT_TOKENS = 256
GENERATED = 64


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def client(model: str, rpc: list[str], pids: list[int]) -> dict:
    """One load and one measurement in this process; the workers' memory
    (``pids``) is read while it holds them."""
    import edgeinfer

    t0 = time.perf_counter()
    engine = edgeinfer.Engine(model, n_ctx=1024, threads=1, threads_batch=1, rpc=rpc or None, prompt_cache=False,
                              speculative="off")
    load = time.perf_counter() - t0
    with engine:
        tokens = engine.vocab.spread(PROMPT_TOKENS)
        events = list(engine.stream_tokens(tokens, max_tokens=GENERATED, temperature=0, ignore_eos=True))
        st = events[-1].stats
        held = [rss_mb(p) for p in pids]
    # The first token's wait is the prompt's reading (a worker computes a
    # step before it answers, so per-step timers inside llama.cpp miss it).
    return {"load_s": load, "prefill_tps": PROMPT_TOKENS / st.ttft_s, "decode_tps": st.decode_tps,
            "worker_mb": held}


def start_worker(port: int, cpu: int, cache: str | None) -> subprocess.Popen:
    from edgeinfer import rpc
    from edgeinfer.errors import RpcError

    cmd = ["taskset", "-c", str(cpu), sys.executable, "-m", "edgeinfer", "rpc-worker", "--port", str(port),
           "--threads", "1"] + (["--cache-dir", cache] if cache else [])
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(600):
        try:
            rpc.probe(f"127.0.0.1:{port}", timeout=1)
            return proc
        except RpcError:
            time.sleep(0.1)
    raise SystemExit("a worker did not start")


def rss_mb(pid: int) -> float:
    import psutil

    return psutil.Process(pid).memory_info().rss / 2**20


def run_shape(model: str, cpus: list[int], cache_root: str) -> dict:
    """One client run against workers on ``cpus`` (none: local), started
    afresh; with a weight cache, a second client run reads it."""
    workers, endpoints = [], []
    for i, cpu in enumerate(cpus):
        port = free_port()
        workers.append(start_worker(port, cpu, os.path.join(cache_root, f"w{i}")))
        endpoints.append(f"127.0.0.1:{port}")
    try:
        base = [rss_mb(w.pid) for w in workers]
        cmd = ["taskset", "-c", "0", sys.executable, __file__, "--client", model, "--rpc", ",".join(endpoints),
               "--pids", ",".join(str(w.pid) for w in workers)]
        out = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
        out["worker_mb"] = [round(held - b) for held, b in zip(out["worker_mb"], base)]
        if workers:   # the same load again: the workers' caches hold the large tensors now
            again = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
            out["cached_load_s"] = again["load_s"]
        return out
    finally:
        for w in workers:
            w.kill()
            w.wait()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="a store name or GGUF path")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--client", help=argparse.SUPPRESS)
    ap.add_argument("--rpc", default="", help=argparse.SUPPRESS)
    ap.add_argument("--pids", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.client:
        print(json.dumps(client(args.client, [e for e in args.rpc.split(",") if e],
                                [int(p) for p in args.pids.split(",") if p])))
        return 0
    from edgeinfer import rpc
    from edgeinfer.hardware import cpu_model
    from edgeinfer.store import resolve_model

    path, _ = resolve_model(args.model)
    rpc.library(quiet=False)   # built before anything is timed
    shapes = {"L": [], "R1": [1], "R2": [0, 1]}
    results: dict[str, list[dict]] = {k: [] for k in shapes}
    for r in range(args.rounds):
        for name, cpus in shapes.items():
            with tempfile.TemporaryDirectory() as cache:
                results[name].append(run_shape(str(path), cpus, cache))
            print(f"round {r + 1} {name}: {results[name][-1]}", file=sys.stderr)
    print(f"# {cpu_model()}, {args.model} ({path.stat().st_size / 2**20:.0f} MiB), 1 thread per process, "
          f"{PROMPT_TOKENS}-token prompt, {GENERATED} tokens, medians of {args.rounds} alternating rounds")
    print("| shape | load, s | load, worker cache filled, s | prefill tok/s | decode tok/s | decode vs L | "
          "each worker's memory, MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    local = statistics.median(x["decode_tps"] for x in results["L"])
    for name, runs in results.items():
        med = {k: statistics.median(x[k] for x in runs) for k in ("load_s", "prefill_tps", "decode_tps")}
        spread = f"{min(x['decode_tps'] for x in runs):.1f}-{max(x['decode_tps'] for x in runs):.1f}"
        cached = statistics.median(x["cached_load_s"] for x in runs) if name != "L" else None
        mem = ", ".join(str(round(statistics.median(x["worker_mb"][i] for x in runs)))
                        for i in range(len(shapes[name]))) or "-"
        print(f"| {name} | {med['load_s']:.2f} | {'-' if cached is None else f'{cached:.2f}'} | "
              f"{med['prefill_tps']:.0f} | {med['decode_tps']:.1f} ({spread}) | {med['decode_tps'] / local:.2f} | "
              f"{mem} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
