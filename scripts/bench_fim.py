"""Code completion as the cursor moves: time to first token for a
fill-in-the-middle request on a ~1,500-token source file, cold, then after
each of 10 characters typed at the cursor, and after a new line.

edgeinfer's engine (in this process), and beside it llama-server's
``/infill`` on the same model file when ``--llama-server PATH`` is given
(its own process, started here with ``--cache-reuse 256`` as editors'
guides advise; input_prefix, the cursor's line as ``prompt``, and
input_suffix, as llama.vscode sends them). Each side runs alone, one
after the other; run it on a quiet machine.

    python scripts/bench_fim.py --model qwen2.5-coder-1.5b-instruct
    python scripts/bench_fim.py --model qwen2.5-coder-1.5b-instruct --llama-server /path/to/llama-server
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

TYPED = "    if not"       # ten keystrokes, one request after each
CHARS = 6000                # ~1,500 tokens of Python


def source() -> tuple[str, str]:
    """A real source file cut at the start of a line two thirds in: (prefix, suffix)."""
    import edgeinfer.sampling as module

    text = inspect.getsource(module)[:CHARS]
    cut = text.index("\n", len(text) * 2 // 3) + 1
    return text[:cut], text[cut:]


def p95(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(0.95 * (len(xs) - 1)))]


def edgeinfer_side(model: str, threads: int) -> dict:
    import edgeinfer

    prefix, suffix = source()
    with tempfile.TemporaryDirectory() as home:
        os.environ["EDGEINFER_HOME"] = home   # an empty prompt cache: the first request is cold
        engine = edgeinfer.load(model, threads=threads, threads_batch=threads, n_ctx=4096)
        with engine:
            n_prompt = len(engine.infill_tokens(prefix, suffix, max_tokens=16))

            read = []   # prompt tokens each request read (the rest came from the cache)

            def ttft(pre: str) -> float:
                events = list(engine.stream_infill(pre, suffix, temperature=0, max_tokens=16, max_lines=1))
                st = events[-1].stats
                read.append(st.prompt_tokens - st.cached_tokens)
                return st.ttft_s

            cold = ttft(prefix)
            edits = [ttft(prefix + TYPED[:k]) for k in range(1, len(TYPED) + 1)]
            newline = ttft(prefix + TYPED + "\n")
            name = engine.name
    return {"side": "edgeinfer", "model": name, "prompt_tokens": n_prompt, "cold": cold, "edits": edits,
            "newline": newline, "read": read}


def llama_server_side(binary: str, model_path: str, threads: int, port: int) -> dict:
    prefix, suffix = source()
    proc = subprocess.Popen([binary, "-m", model_path, "-c", "4096", "-t", str(threads), "-tb", str(threads),
                             "--host", "127.0.0.1", "--port", str(port), "--cache-reuse", "256", "-np", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                with urllib.request.urlopen(base + "/health", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.2)

        def ttft(pre: str) -> float:
            line = pre.rfind("\n") + 1
            body = {"input_prefix": pre[:line], "prompt": pre[line:], "input_suffix": suffix, "n_predict": 1,
                    "temperature": 0, "cache_prompt": True}
            req = urllib.request.Request(base + "/infill", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
            t0 = time.perf_counter()
            with urllib.request.urlopen(req, timeout=600) as r:
                r.read()
            return time.perf_counter() - t0

        cold = ttft(prefix)
        edits = [ttft(prefix + TYPED[:k]) for k in range(1, len(TYPED) + 1)]
        newline = ttft(prefix + TYPED + "\n")
    finally:
        proc.terminate()
        proc.wait(30)
    return {"side": "llama-server", "cold": cold, "edits": edits, "newline": newline}


def report(r: dict) -> None:
    edits = r["edits"]
    med = statistics.median(edits)
    print(f"| {r['side']} | {r['cold'] * 1000:,.0f} | {med * 1000:,.0f} | {p95(edits) * 1000:,.0f} | "
          f"{min(edits) * 1000:,.0f}-{max(edits) * 1000:,.0f} | {med / r['cold']:.3f} | {r['newline'] * 1000:,.0f} |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--model", default="qwen2.5-coder-1.5b-instruct", help="a store name or GGUF path")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--llama-server", help="a llama-server binary to compare with (same model file)")
    ap.add_argument("--port", type=int, default=18099)
    args = ap.parse_args(argv)
    from edgeinfer.hardware import cpu_model
    from edgeinfer.store import resolve_model

    path, _ = resolve_model(args.model)
    results = [edgeinfer_side(str(path), args.threads)]   # by path: the side runs on an empty home
    if args.llama_server:
        results.append(llama_server_side(args.llama_server, str(path), args.threads, args.port))
    print(f"# {cpu_model()} ({os.cpu_count()} CPUs), {args.threads} threads, {results[0]['model']}, "
          f"a {results[0]['prompt_tokens']:,}-token prompt, {len(TYPED)} keystrokes, temperature 0")
    print("| side | cold TTFT, ms | edits: median | p95 | range | median / cold | after a new line |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        report(r)
    for r in results:
        if "read" in r:
            print(f"\n{r['side']}, per request (cold, keystrokes, new line): ms (prompt tokens read)")
            times = [r["cold"], *r["edits"], r["newline"]]
            print(", ".join(f"{t * 1000:,.0f} ({n})" for t, n in zip(times, r["read"])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
