#!/usr/bin/env python
"""Two models behind one `edgeinfer serve`: what sharing a server costs.

Starts `edgeinfer serve --http PORT --threads T` on loopback with no model
pinned (each loads in a process of its own when named) and measures,
through the official openai client, temperature 0 and ignore_eos:

  1. load and unload: a cold request's time to its first token minus a
     warm one's (the load), and from a keep_alive 0 request's end until
     the model's process has exited (the unload);
  2. each model alone, then both at once: decode tok/s of one stream
     (tokens after the first / first to last token); with both busy the
     aggregate is the sum, compared with the faster model alone (the
     target: at least 0.8x);
  3. the cost of the process per model, per token: the same model over
     JSON lines through the server (front → model's process → front) and
     straight to a model process started here alone, alternating; the
     difference of the per-token times is what the extra hop costs.

Repeats alternate the order; the table shows medians and min-max. Name
the CPU beside any figure you quote.

    python scripts/bench_models.py
    python scripts/bench_models.py --a smollm2-135m-instruct --b qwen2.5-coder-1.5b-instruct --reps 3
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
import threading
import time
import urllib.request
from pathlib import Path

import openai
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edgeinfer import Client  # noqa: E402
from edgeinfer.hardware import cpu_model  # noqa: E402

PROMPT = "Write a long story about a lighthouse keeper and the sea."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer within {timeout} s")


def stream(client, model: str, n: int, **extra) -> tuple[float, float, int]:
    """(seconds to the first token, decode tok/s after it, tokens)."""
    t0 = time.perf_counter()
    first = last = None
    count = 0
    for chunk in client.completions.create(model=model, prompt=PROMPT, max_tokens=n, stream=True, temperature=0,
                                           extra_body={"ignore_eos": True, **extra}):
        if chunk.choices and chunk.choices[0].text:
            now = time.perf_counter()
            first = first or now
            last = now
            count += 1
    tps = (count - 1) / (last - first) if count > 1 and last > first else 0.0
    return (first or time.perf_counter()) - t0, tps, count


def loaded(base: str) -> dict[str, int]:
    """The loaded models (name without tag) and their processes."""
    with urllib.request.urlopen(base + "/v1/models", timeout=10) as r:
        return {c["id"].split(":")[0]: c["edgeinfer"]["pid"] for c in json.load(r)["data"] if c.get("loaded")}


def running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def med(xs: list[float]) -> str:
    return f"{statistics.median(xs):8.2f} ({min(xs):.2f}-{max(xs):.2f})" if xs else "-"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--a", default="smollm2-135m-instruct")
    p.add_argument("--b", default="qwen2.5-coder-1.5b-instruct")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--n-ctx", type=int, default=2048)
    args = p.parse_args()

    port, jport = free_port(), free_port()
    cmd = [sys.executable, "-m", "edgeinfer", "serve", "--http", str(port), "--port", str(jport), "--threads",
           str(args.threads), "--n-ctx", str(args.n_ctx), "--parallel", "2", "--keep-alive", "30m"]
    server = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
    sock_dir = tempfile.mkdtemp(prefix="bench-models-")
    worker = None
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for(base + "/health")
        client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=600)
        rows: dict[str, list[float]] = {}

        def add(key: str, value: float) -> None:
            rows.setdefault(key, []).append(value)

        # 1. load and unload
        for rep in range(args.reps):
            for m in (args.a, args.b):
                cold, _, _ = stream(client, m, 2)
                warm, _, _ = stream(client, m, 2)
                add(f"load {m} (s)", cold - warm)
                pid = loaded(base)[m]
                stream(client, m, 2, keep_alive=0)
                t = time.perf_counter()
                while running(pid):
                    time.sleep(0.005)
                add(f"unload {m} (s)", time.perf_counter() - t)
            print(f"load/unload rep {rep + 1}/{args.reps} done", file=sys.stderr)

        # 2. alone, then both at once
        for m in (args.a, args.b):
            stream(client, m, 8)   # loaded and warm
        for rep in range(args.reps):
            order = (args.a, args.b) if rep % 2 == 0 else (args.b, args.a)
            for m in order:
                add(f"alone {m} tok/s", stream(client, m, args.tokens)[1])
            both: dict[str, float] = {}
            threads = [threading.Thread(target=lambda m=m: both.__setitem__(m, stream(client, m, args.tokens)[1]))
                       for m in order]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            for m in order:
                add(f"both {m} tok/s", both[m])
            add("both aggregate tok/s", sum(both.values()))
            print(f"alone/both rep {rep + 1}/{args.reps} done", file=sys.stderr)

        # 3. the hop through the server, on model a
        path = os.path.join(sock_dir, "a.sock")
        worker = subprocess.Popen([sys.executable, "-m", "edgeinfer.server.worker", args.a, "--socket", path,
                                   "--options", json.dumps({"n_ctx": args.n_ctx, "threads": args.threads,
                                                            "n_seq_max": 2})],
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        worker.stdout.readline()   # loaded
        stream(client, args.b, 2, keep_alive=0)   # only a in the server, as only a runs alone
        with Client(port=jport) as front, Client(unix=path) as direct:
            for rep in range(args.reps * 2):
                pair = (("server", front, {"model": args.a}), ("direct", direct, {}))
                for name, c, extra in pair if rep % 2 == 0 else pair[::-1]:
                    done = list(c.stream(PROMPT, max_tokens=args.tokens, temperature=0, ignore_eos=True,
                                         **extra))[-1]
                    add(f"hop: {name} tok/s", done.stats.decode_tps)
        hop_us = (1 / statistics.median(rows["hop: server tok/s"]) -
                  1 / statistics.median(rows["hop: direct tok/s"])) * 1e6

        fastest = max(statistics.median(rows[f"alone {m} tok/s"]) for m in (args.a, args.b))
        print(f"# {cpu_model()}, {os.cpu_count()} CPUs; {args.threads} threads, {args.tokens} tokens, "
              f"{args.reps} repeats; median (min-max)")
        for key, xs in rows.items():
            print(f"{key:<55} {med(xs)}")
        ratio = statistics.median(rows["both aggregate tok/s"]) / fastest
        print(f"both busy, aggregate / the faster alone = {ratio:.2f} (target >= 0.8)")
        print(f"the model's own process costs {hop_us:.0f} us a token through the server "
              f"(server {statistics.median(rows['hop: server tok/s']):.1f} vs "
              f"direct {statistics.median(rows['hop: direct tok/s']):.1f} tok/s)")
    finally:
        for proc in (server, worker):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                proc.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
