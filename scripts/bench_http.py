#!/usr/bin/env python
"""The HTTP server of `edgeinfer serve --http` against the engine it runs:
one stream's decode tok/s straight from the Python engine, then through
HTTP/SSE with the official openai client; 4 concurrent streams against
one; and what a json_schema response_format costs in decode speed.

The engine baseline is Engine.stream_tokens with ignore_eos, the median of
--reps DoneEvent.stats.decode_tps; the engine is closed before the server
starts, so one process has the CPU at a time. The server is a subprocess,
`python -m edgeinfer serve MODEL --no-jsonl --http 0 --threads T
--parallel P --yes`, stopped with SIGTERM at the end. Over HTTP the
figures are taken client-side from the SSE chunks that carry text: tokens
are usage.completion_tokens of the final chunk; decode tok/s is (tokens -
1) / (last text chunk - first text chunk); the aggregate of a run of
streams is (all their tokens) / (last text chunk of any - first text chunk
of any), the same for one stream alone and for --streams at once. The
json_schema cost compares the decode tok/s of one stream with
response_format json_schema to one without, on the same prompt, both
ending where the model ends them (a grammar decides its own end, so
ignore_eos cannot go with it). The other HTTP streams send ignore_eos in
extra_body, so they run to max_tokens as the engine's do; the tokens
column shows where each stream ended.

    EDGEINFER_HOME=/tmp/eihome python scripts/bench_http.py --threads 2
    python scripts/bench_http.py --model qwen2.5-coder-0.5b-instruct --tokens 256 --reps 5 --json
    python scripts/bench_http.py --model /tmp/tinyb.gguf --tokens 32 --reps 1
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import queue
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import psutil

import edgeinfer
from edgeinfer import hardware
from edgeinfer.events import DoneEvent

STORY = "Write a long story about a lighthouse keeper."
# Small models given a schema and no example answer {"items": []}; with one they fill the list.
LIST = ('Describe ten famous lighthouses. Answer with JSON like '
        '{"items": [{"name": "...", "description": "..."}]}.')
SCHEMA = {
    "type": "object",
    "properties": {
        "items": {
            "type": "array",
            "maxItems": 20,
            "items": {
                "type": "object",
                "properties": {"name": {"type": "string"}, "description": {"type": "string"}},
                "required": ["name", "description"],
            },
        },
    },
    "required": ["items"],
}

log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731


def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def rnd(v, n=1):
    return None if v is None else round(v, n)


class OtherWork:
    """Cores that processes other than ours kept busy over a phase: all the
    box's busy CPU time (steal included) less ours and the server's."""

    def __init__(self, pids: list[int]):
        self.procs = [psutil.Process(pid) for pid in pids]
        self.start = self._now()

    def _now(self):
        t = psutil.cpu_times()
        busy = t.user + t.nice + t.system + getattr(t, "irq", 0) + getattr(t, "softirq", 0) + getattr(t, "steal", 0)
        ours = 0.0
        for p in self.procs:
            c = p.cpu_times()
            ours += c.user + c.system + getattr(c, "children_user", 0) + getattr(c, "children_system", 0)
        return time.perf_counter(), busy, ours

    def cores(self) -> float:
        (w0, b0, o0), (w1, b1, o1) = self.start, self._now()
        return round(max(0.0, (b1 - b0) - (o1 - o0)) / max(w1 - w0, 1e-9), 2)


# -- the engine alone ------------------------------------------------------
def engine_baseline(args) -> dict:
    engine = edgeinfer.load(args.model, threads=args.threads, n_seq_max=args.parallel)
    try:
        tokens = engine.chat_tokens([{"role": "user", "content": STORY}])
        list(engine.stream_tokens(tokens, max_tokens=8, ignore_eos=True, temperature=0))  # warm-up
        runs = []
        for _ in range(args.reps):
            for ev in engine.stream_tokens(tokens, max_tokens=args.tokens, ignore_eos=True, temperature=0):
                if isinstance(ev, DoneEvent):
                    runs.append(ev.stats)
        return {"name": engine.name, "native": engine.native.setting, "n_ctx": engine.n_ctx,
                "decode_tps": med(s.decode_tps for s in runs), "tokens": [s.generated_tokens for s in runs]}
    finally:
        engine.close()


# -- the server ------------------------------------------------------------
class ServerProcess:
    """`edgeinfer serve --http 0` in a subprocess; its stderr is read all
    along (a full pipe would stall the server) and its tail kept."""

    def __init__(self, args):
        self.cmd = [sys.executable, "-m", "edgeinfer", "serve", args.model, "--no-jsonl", "--http", "0",
                    "--threads", str(args.threads), "--parallel", str(args.parallel), "--yes"]
        self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True, errors="replace")
        self.tail: collections.deque[str] = collections.deque(maxlen=60)
        self._lines: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._read, daemon=True).start()
        self.port = self._wait_serving(args.start_timeout)
        self.url = f"http://127.0.0.1:{self.port}"
        self.model = self._wait_health(30)["model"]

    def _read(self):
        for line in self.proc.stderr:
            self.tail.append(line.rstrip("\n"))
            self._lines.put(line)
        self._lines.put(None)

    def _fail(self, why: str):
        self.stop()
        raise SystemExit(f"{why}; the server's last words:\n" + "\n".join(self.tail))

    def _wait_serving(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self._fail(f"the server did not start within {timeout:.0f} s")
            if line is None:
                self._fail(f"the server exited with {self.proc.wait()} before it served")
            m = re.search(r"^Serving .* on http://127\.0\.0\.1:(\d+)", line)
            if m:
                return int(m.group(1))

    def _wait_health(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                    if r.status == 200:
                        return json.loads(r.read())
            except (urllib.error.URLError, OSError):
                pass
            if self.proc.poll() is not None:
                self._fail(f"the server exited with {self.proc.returncode}")
            time.sleep(0.2)
        self._fail(f"GET /health did not answer 200 within {timeout:.0f} s")

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(60)
            except subprocess.TimeoutExpired:
                log("warning: the server did not stop within 60 s of SIGTERM; killing it")
                self.proc.kill()
        return self.proc.wait()


# -- HTTP streams ----------------------------------------------------------
def client_for(server):
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=600)


def http_stream(client, model: str, prompt: str, max_tokens: int, schema=None, ignore_eos: bool = True,
                start: threading.Barrier | None = None) -> dict:
    """One streamed chat completion, timed at the chunks that carry text."""
    extra = {}
    if schema is not None:
        extra["response_format"] = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    body = {"ignore_eos": True} if ignore_eos and schema is None else None  # a grammar decides its own end
    if start is not None:
        start.wait()
    t0 = time.perf_counter()
    first = last = None
    chunks, tokens, finish, text = 0, None, None, []
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, stream=True,
        stream_options={"include_usage": True}, temperature=0, extra_body=body, **extra)
    for chunk in stream:
        if chunk.choices:
            c = chunk.choices[0]
            if c.delta is not None and c.delta.content:
                now = time.perf_counter()
                first = first if first is not None else now
                last = now
                chunks += 1
                text.append(c.delta.content)
            if c.finish_reason:
                finish = c.finish_reason
        if getattr(chunk, "usage", None) is not None:
            tokens = chunk.usage.completion_tokens
    if tokens is None:
        tokens = chunks   # no usage chunk: a chunk per token, roughly
    tps = (tokens - 1) / (last - first) if tokens > 1 and first is not None and last > first else None
    return {"tokens": tokens, "chunks": chunks, "finish": finish, "first": first, "last": last,
            "ttft_s": None if first is None else first - t0, "decode_tps": tps, "text": "".join(text)}


def aggregate(runs: list[dict]) -> float | None:
    firsts = [r["first"] for r in runs if r["first"] is not None]
    lasts = [r["last"] for r in runs if r["last"] is not None]
    if not firsts or max(lasts) <= min(firsts):
        return None
    return sum(r["tokens"] for r in runs) / (max(lasts) - min(firsts))


def concurrent(server, n: int, prompt: str, max_tokens: int, ignore_eos: bool) -> list[dict]:
    barrier = threading.Barrier(n)
    out: list = [None] * n
    errors: list = []

    def one(i):
        try:
            out[i] = http_stream(client_for(server), server.model, prompt, max_tokens, ignore_eos=ignore_eos,
                                 start=barrier)
        except Exception as e:  # reported after the join; a broken barrier follows a failed peer
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return out


def summary(runs: list[dict]) -> dict:
    return {"decode_tps": rnd(med(r["decode_tps"] for r in runs)),
            "ttft_ms": rnd(med(r["ttft_s"] * 1000 for r in runs if r["ttft_s"] is not None)),
            "tokens": [r["tokens"] for r in runs], "finish": sorted({r["finish"] or "none" for r in runs})}


def http_bench(args, server) -> dict:
    client = client_for(server)
    ignore = not args.no_ignore_eos
    http_stream(client, server.model, STORY, 8, ignore_eos=ignore)   # warm-up
    one = [http_stream(client, server.model, STORY, args.tokens, ignore_eos=ignore) for _ in range(args.reps)]
    log(f"one stream: {summary(one)['decode_tps']} tok/s, tokens {[r['tokens'] for r in one]}")
    many = [concurrent(server, args.streams, STORY, args.tokens, ignore) for _ in range(args.reps)]
    log(f"{args.streams} streams: tokens {[[r['tokens'] for r in rep] for rep in many]}")
    http_stream(client, server.model, LIST, 8, schema=SCHEMA)   # warm-up: the schema's grammar
    free, shaped = [], []
    for _ in range(args.reps):   # alternating, so that other work on the box weighs on both alike
        free.append(http_stream(client, server.model, LIST, args.tokens, ignore_eos=False))
        shaped.append(http_stream(client, server.model, LIST, args.tokens, schema=SCHEMA))
    log(f"json_schema: tokens {[r['tokens'] for r in shaped]}, unconstrained {[r['tokens'] for r in free]}")
    valid = []
    for r in shaped:
        try:
            json.loads(r["text"])
            valid.append(True)
        except ValueError:
            valid.append(False)   # cut short by max_tokens
    return {
        "one_stream": summary(one),
        "one_stream_aggregate_tps": rnd(med(aggregate([r]) for r in one)),
        "streams": args.streams,
        "many_streams": {**summary([r for rep in many for r in rep]),
                         "aggregate_tps": rnd(med(aggregate(rep) for rep in many))},
        "unconstrained": summary(free),
        "json_schema": {**summary(shaped), "complete_json": valid},
    }


def ratio(a, b, n=3):
    return round(a / b, n) if a is not None and b else None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="examples:\n" + __doc__.rsplit("\n\n", 1)[1])
    p.add_argument("--model", default="smollm2-135m-instruct", help="a store name (EDGEINFER_HOME) or a GGUF path")
    p.add_argument("--threads", type=int, default=hardware.default_threads())
    p.add_argument("--tokens", type=int, default=128, help="max_tokens of every stream")
    p.add_argument("--reps", type=int, default=3, help="runs of each measure; the median is shown")
    p.add_argument("--streams", type=int, default=4, help="concurrent HTTP streams")
    p.add_argument("--parallel", type=int, help="the server's --parallel (default: --streams)")
    p.add_argument("--no-ignore-eos", action="store_true", help="do not send ignore_eos over HTTP")
    p.add_argument("--start-timeout", type=float, default=300.0, help="seconds for the server to load the model")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    args.parallel = args.parallel or args.streams
    args.reps = max(1, args.reps)
    edgeinfer.resolve_model(args.model)   # a missing model fails here, not in the server
    load_before = round(os.getloadavg()[0], 2)
    log(f"{args.model}, {args.threads} threads, load {load_before}: the engine alone")
    other = OtherWork([os.getpid()])
    base = engine_baseline(args)
    other_engine = other.cores()
    log(f"engine: {rnd(base['decode_tps'])} tok/s, native {base['native']}, other work {other_engine} cores; "
        "starting the server")
    server = ServerProcess(args)
    exit_code = None
    try:
        log(f"serving {server.model} on {server.url}")
        other = OtherWork([os.getpid(), server.proc.pid])
        http = http_bench(args, server)
        other_http = other.cores()
    finally:
        exit_code = server.stop()
    if exit_code:
        log(f"warning: the server exited with {exit_code}")
    one, many = http["one_stream"], http["many_streams"]
    free, shaped = http["unconstrained"], http["json_schema"]
    cost = None
    if free["decode_tps"] and shaped["decode_tps"]:
        cost = round((1 - shaped["decode_tps"] / free["decode_tps"]) * 100, 1)
    report = {"model": base["name"], "threads": args.threads, "tokens": args.tokens, "reps": args.reps,
              "parallel": args.parallel, "cpu": hardware.cpu_model(), "cpus": os.cpu_count(),
              "physical_cores": hardware.physical_cores(), "native": base["native"],
              "load_avg": [load_before, round(os.getloadavg()[0], 2)],
              "other_work_cores": {"engine": other_engine, "http": other_http}, "server_cmd": " ".join(server.cmd),
              "server_exit": exit_code,
              "engine_decode_tps": rnd(base["decode_tps"]), "engine_tokens": base["tokens"],
              **http,
              "http_vs_engine": ratio(one["decode_tps"], base["decode_tps"]),
              "many_vs_one_stream": ratio(many["aggregate_tps"], http["one_stream_aggregate_tps"]),
              "json_schema_cost_pct": cost}
    if args.json:
        print(json.dumps(report))
        return 0
    n = args.streams
    print(f"# {report['cpu']}, {report['cpus']} CPUs ({report['physical_cores']} cores), {args.threads} threads, "
          f"native {report['native']}, {report['model']}, max_tokens {args.tokens}, median of {args.reps}, "
          f"load average {report['load_avg'][0]} before, {report['load_avg'][1]} after")
    print(f"# other work on the box: {other_engine} cores busy during the engine runs, {other_http} during the "
          f"HTTP runs{' (the figures are only indicative)' if max(other_engine, other_http) > 0.2 else ''}")
    print("| measure | tok/s | ratio | tokens | finish | ttft ms |")
    print("|---|---:|---:|---|---|---:|")

    def row(name, tps, rat, tokens, finish="", ttft=None):
        print(f"| {name} | {'' if tps is None else f'{tps:.1f}'} | {rat} | {' '.join(map(str, tokens))} | "
              f"{' '.join(finish)} | {'' if ttft is None else ttft} |")

    row("engine, one stream, decode", report["engine_decode_tps"], "", base["tokens"], ["length"])
    row("HTTP/SSE, one stream, decode", one["decode_tps"], f"{report['http_vs_engine']} x engine",
        one["tokens"], one["finish"], one["ttft_ms"])
    row("HTTP/SSE, one stream, aggregate", http["one_stream_aggregate_tps"], "", one["tokens"], one["finish"])
    row(f"HTTP/SSE, {n} streams, aggregate", many["aggregate_tps"], f"{report['many_vs_one_stream']} x 1 stream",
        many["tokens"], many["finish"], many["ttft_ms"])
    row("HTTP/SSE, list prompt, unconstrained, decode", free["decode_tps"], "", free["tokens"], free["finish"],
        free["ttft_ms"])
    row("HTTP/SSE, list prompt, json_schema, decode", shaped["decode_tps"],
        "" if cost is None else f"{cost:+.1f}% cost", shaped["tokens"], shaped["finish"], shaped["ttft_ms"])
    print(f"\nHTTP decode / engine decode: {report['http_vs_engine']}; {n} streams / 1 stream: "
          f"{report['many_vs_one_stream']}; json_schema cost: {'n/a' if cost is None else f'{cost:.1f}%'} "
          f"(complete JSON: {sum(shaped['complete_json'])}/{len(shaped['complete_json'])})")
    short = [t for r in (one, many) for t in r["tokens"] if t < args.tokens]
    if short and not args.no_ignore_eos:
        print(f"note: {len(short)} HTTP stream(s) sent ignore_eos but stopped before {args.tokens} tokens: "
              "the server does not honour ignore_eos")
    return 0


if __name__ == "__main__":
    sys.exit(main())
