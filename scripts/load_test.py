#!/usr/bin/env python
"""Load-test `edgeinfer serve`: N concurrent clients for a bounded time and
number of requests.

Prints requests/s, p50/p95 time to first token, p50/p95 gap between
tokens, aggregate generated tokens/s, errors by kind, and the server's RSS
before and after. With --model it starts its own server on a free
loopback port (and stops it after); otherwise it connects to --port.

    python scripts/load_test.py --model smollm2-135m-instruct --clients 8 --duration 30
    python scripts/load_test.py --port 8765 --clients 32 --requests 500 --json
    python scripts/load_test.py --model smollm2-135m-instruct --clients 8 --requests 400 --soak
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import psutil

from edgeinfer import AsyncClient
from edgeinfer.errors import ServerError

PROMPTS = ["Tell me about the weather.", "What is a CPU?", "Write a short poem about rivers.",
           "Explain how a battery works.", "Give three tips for sleeping well.", "What is 17 times 3?"]


def pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def start_server(args) -> tuple[subprocess.Popen, int]:
    cmd = [sys.executable, "-m", "edgeinfer", "serve", args.model, "--port", "0", "--yes",
           "--queue", str(args.queue)]
    if args.parallel:
        cmd += ["--parallel", str(args.parallel)]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if line.startswith("Serving "):
            # The server logs a line per request: keep draining its stderr,
            # or a full pipe would block its event loop mid-test.
            threading.Thread(target=proc.stderr.read, daemon=True).start()
            return proc, int(re.search(r"127\.0\.0\.1:(\d+)", line).group(1))
    raise SystemExit("the server did not start: " + (proc.stderr.read() or "")[-2000:])


async def run(args, port: int) -> dict:
    ttft, gaps, tokens, errors, hung = [], [], 0, {}, 0
    issued = answered = 0
    deadline = time.monotonic() + args.duration

    async def one_client(k: int):
        nonlocal issued, answered, tokens, hung
        async with AsyncClient(port=port) as c:
            while issued < args.requests and time.monotonic() < deadline:
                issued += 1
                prompt = PROMPTS[(issued + k) % len(PROMPTS)]
                t0 = time.perf_counter()
                last = None
                try:
                    async def consume():
                        nonlocal last
                        async for ev in c.stream(messages=[{"role": "user", "content": prompt}],
                                                 max_tokens=args.max_tokens, temperature=0.7):
                            now = time.perf_counter()
                            if ev.text:
                                if last is None:
                                    ttft.append(now - t0)
                                else:
                                    gaps.append(now - last)
                                last = now
                        return ev

                    done = await asyncio.wait_for(consume(), args.request_timeout)
                    tokens += done.stats.generated_tokens
                    answered += 1
                except ServerError as e:  # before TimeoutError: "busy" is one too
                    errors[e.code] = errors.get(e.code, 0) + 1
                    if e.code == "busy":
                        await asyncio.sleep(0.05)
                except asyncio.TimeoutError:
                    hung += 1

    t_start = time.perf_counter()
    await asyncio.gather(*(one_client(k) for k in range(args.clients)))
    elapsed = time.perf_counter() - t_start
    return {"clients": args.clients, "requests": issued, "answered": answered, "errors": errors, "hung": hung,
            "elapsed_s": round(elapsed, 2), "requests_per_s": round(answered / elapsed, 2),
            "ttft_p50_ms": round(pct(ttft, 0.5) * 1000, 1), "ttft_p95_ms": round(pct(ttft, 0.95) * 1000, 1),
            "gap_p50_ms": round(pct(gaps, 0.5) * 1000, 1), "gap_p95_ms": round(pct(gaps, 0.95) * 1000, 1),
            "gap_max_ms": round(max(gaps, default=0) * 1000, 1),
            "generated_tokens": tokens, "aggregate_tps": round(tokens / elapsed, 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="examples:\n" + __doc__.rsplit("\n\n", 1)[1])
    p.add_argument("--model", help="start a server for this model (store name or GGUF path)")
    p.add_argument("--port", type=int, default=8765, help="a running server's port (without --model)")
    p.add_argument("--server-pid", type=int, help="a running server's pid, for its RSS")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=100, help="stop after this many requests")
    p.add_argument("--duration", type=float, default=60.0, help="stop issuing after this many seconds")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--request-timeout", type=float, default=60.0, help="a request slower than this has hung")
    p.add_argument("--parallel", type=int, help="with --model: the server's --parallel")
    p.add_argument("--queue", type=int, default=64, help="with --model: the server's --queue")
    p.add_argument("--soak", action="store_true", help="report RSS growth between the first and last tenth")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    proc = None
    if args.model:
        proc, port = start_server(args)
        pid = proc.pid
    else:
        port, pid = args.port, args.server_pid
    rss = lambda: psutil.Process(pid).memory_info().rss if pid else 0  # noqa: E731
    try:
        rss_before = rss()
        if args.soak:  # warm up first, so the baseline holds the caches a server keeps
            warm = argparse.Namespace(**{**vars(args), "requests": max(args.requests // 10, args.clients)})
            asyncio.run(run(warm, port))
            rss_before = rss()
        report = asyncio.run(run(args, port))
        report["rss_before_mb"] = round(rss_before / 2**20, 1)
        report["rss_after_mb"] = round(rss() / 2**20, 1)
        report["rss_growth_mb"] = round(report["rss_after_mb"] - report["rss_before_mb"], 1)
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            report_exit = proc.wait(60)
            if report_exit != 0:
                print(f"warning: the server exited with {report_exit}", file=sys.stderr)
    if args.json:
        print(json.dumps(report))
    else:
        print(f"# {args.clients} clients, {report['requests']} requests in {report['elapsed_s']} s "
              f"({os.cpu_count()} CPUs)")
        for k, v in report.items():
            print(f"{k:>18}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
