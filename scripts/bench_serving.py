#!/usr/bin/env python
"""Serving workloads against OpenAI-compatible servers: edgeinfer's HTTP
server and llama.cpp's llama-server alike, through the official openai
client with streaming, the same prompts for every server.

Workloads (temperature 0, ignore_eos, so every stream runs to max_tokens):

  a. one stream: decode tok/s (tokens after the first / first to last
     token) and time to first token (TTFT);
  b. --streams (4) streams at once: aggregate decode tok/s (every stream's
     tokens after its first / last first token to last token, so prefill
     is not in it) and the median TTFT;
  c. a ~1,000-token system prompt shared by 6 requests sent one after
     another: cold TTFT (request 1) and warm TTFT (median of 2..6);
  d. two different ~1,000-token system prompts, A,B,A,B,A,B: cold TTFT
     (median of 1 and 2) and warm TTFT (median of 3..6);
  e. (--restart, servers started here) the server stopped and started
     again, then the prompt it saw before the restart: TTFT. edgeinfer
     keeps its prompt cache on disk by itself; llama-server is helped by
     hand, as its users must: the slot is saved before the restart and
     restored after it (--slot-save-path, POST /slots/0?action=...), and
     the restore's own time is printed apart, outside the TTFT.

Tokens are the stream's usage.completion_tokens (stream_options
include_usage), else the count of chunks that carry text. Each prompt
starts with a tag unique to this run and repeat, so no cache from an
earlier run or repeat can serve it (edgeinfer keeps prompt prefixes on
disk across restarts). Every repeat runs each workload on every server,
the order of the servers reversed on odd repeats, so that drift on the
box hits them alike; the table shows each server's median and min-max
over the repeats, and the ratio first/second server.

Servers are given as --server NAME=BASE_URL, or started here on loopback:
--edgeinfer-model runs `python -m edgeinfer serve MODEL --no-jsonl --http
PORT --host 127.0.0.1 --threads T --parallel P --n-ctx C`, --llama-server
runs `llama-server -m GGUF --host 127.0.0.1 --port PORT -t T -tb T -np P
-kvu -c C -b 512 -fa off --cache-prompt --no-webui` (-kvu: one KV buffer shared by
all slots, as edgeinfer's context is; without it llama-server gives each
slot C/P tokens). --gguf defaults to the file behind --edgeinfer-model,
so both serve the very same file. Started servers are stopped at the end,
on an error and on Ctrl-C.

    python scripts/bench_serving.py --edgeinfer-model smollm2-135m-instruct \\
        --llama-server ~/llama.cpp/build/bin/llama-server --restart
    python scripts/bench_serving.py --server edgeinfer=http://127.0.0.1:8080/v1 \\
        --server llama-server=http://127.0.0.1:8081/v1 --reps 5 --json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

import psutil

log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731

SYSTEM = "You are a helpful assistant."
STORIES = ["Write a long story about a lighthouse keeper.", "Write a long story about a clockmaker's apprentice.",
           "Write a long story about a ship's cook.", "Write a long story about a mountain guide.",
           "Write a long story about a village baker.", "Write a long story about a night train conductor.",
           "Write a long story about a beekeeper.", "Write a long story about a map maker."]
QUESTIONS = ["A parcel arrived damaged. What do I do first?", "Can I refund an expired voucher?",
             "Who reviews late deliveries?", "What must I record for a duplicate invoice?",
             "When do I escalate a complaint?", "How fast must the order number be confirmed?"]

# A ~1,000-token system prompt: a company handbook of numbered rules drawn
# from these parts (about 18 SmolLM2 tokens per rule).
SUBJECTS = ["The support team", "Every agent", "A customer", "The warehouse", "Our billing office", "The night shift",
            "Each manager", "The returns desk", "A new hire", "The quality group", "The courier", "Regional staff"]
VERBS = ["must confirm", "should record", "may refuse", "will review", "needs to check", "is asked to explain",
         "can escalate", "has to archive", "ought to verify", "is expected to summarise"]
OBJECTS = ["the order number", "any damaged parcel", "the refund amount", "a late delivery", "the shipping label",
           "each written complaint", "the warranty terms", "a duplicate invoice", "the delivery address",
           "the customer's consent", "the stock level", "an expired voucher"]
WHEN = ["before the end of the day", "within two working days", "when the ticket is opened", "after a phone call",
        "if the amount exceeds fifty euros", "unless a supervisor objects", "on the first contact",
        "once the parcel is scanned", "whenever the system is down", "at the weekly review"]


def handbook(tag: str, tokens: int) -> str:
    """A system prompt of about ``tokens`` tokens that starts with
    ``tag``, so that prompts with different tags share no more than the
    chat template's first tokens."""
    rng = random.Random(tag)
    head = (f"[{tag}] You are the assistant of the Nordwind Trading Company. "
            "Answer staff questions briefly and follow these rules.\n")
    rules = [f"{i}. {rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(WHEN)}."
             for i in range(1, max(1, round((tokens - 25) / 18.1)) + 1)]
    return head + "\n".join(rules)


def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


# -- servers -----------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One OpenAI-compatible server: given by URL, or started here (then
    ``cmd`` is set and ``stop()`` ends it)."""

    def __init__(self, name: str, base_url: str, cmd: list[str] | None = None):
        self.name, self.base_url, self.cmd = name, base_url.rstrip("/"), cmd
        self.proc: subprocess.Popen | None = None
        self.log_path: str | None = None
        self.model = ""

    @property
    def root(self) -> str:
        return self.base_url[:-3] if self.base_url.endswith("/v1") else self.base_url

    def start(self, timeout: float) -> None:
        fd, self.log_path = tempfile.mkstemp(prefix=f"bench-serving-{self.name}-", suffix=".log")
        with os.fdopen(fd, "w") as out:
            self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise SystemExit(f"{self.name} exited with {self.proc.returncode} before it served; "
                                 f"its log:\n{self.tail()}")
            try:
                with urllib.request.urlopen(self.root + "/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.25)
        else:
            raise SystemExit(f"{self.name} did not answer GET {self.root}/health with 200 within {timeout:.0f} s; "
                             f"its log:\n{self.tail()}")
        self.model = client_for(self).models.list().data[0].id

    def tail(self, n: int = 30) -> str:
        if not self.log_path:
            return "(not started here)"
        with open(self.log_path, errors="replace") as f:
            return "".join(f.readlines()[-n:])

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            # llama-server stopped with streams open was seen to hang after "cleaning up before exit"
            return self.proc.wait(15)
        except subprocess.TimeoutExpired:
            log(f"warning: {self.name} did not stop within 15 s of SIGTERM; killing it")
            self.proc.kill()
            return self.proc.wait()

    def restart(self, timeout: float) -> float:
        """Stop and start again; the seconds until /health said 200."""
        self.stop()
        t0 = time.perf_counter()
        with open(self.log_path, "a") as out:
            self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        self.wait_ready(timeout)
        return time.perf_counter() - t0

    def cpu_seconds(self) -> float:
        if self.proc is None or self.proc.poll() is not None:
            return 0.0
        try:
            p = psutil.Process(self.proc.pid)
            return sum(c.cpu_times().user + c.cpu_times().system for c in [p, *p.children(recursive=True)])
        except psutil.Error:
            return 0.0


def edgeinfer_cmd(args, port: int) -> list[str]:
    return [sys.executable, "-m", "edgeinfer", "serve", args.edgeinfer_model, "--no-jsonl", "--http", str(port),
            "--host", "127.0.0.1", "--threads", str(args.threads), "--parallel", str(args.parallel),
            "--n-ctx", str(args.ctx), *shlex.split(args.edgeinfer_args)]


def llama_server_cmd(args, port: int) -> list[str]:
    # -kvu: one KV buffer for all slots, each slot up to -c, as edgeinfer shares its context; without it,
    # llama-server splits -c into -np slots of c/np. -fa off: edgeinfer's default. -b 512: edgeinfer's n_batch.
    # With -kvu the idle slots' KV (kept for prompt reuse) stays in the one buffer, and later requests attend
    # over those cells too: a 20-token prompt went from 3.2 to 6.1 ms a token once a 1,000-token slot sat idle.
    # --llama-server-args '-no-kvu -c 16384' (later flags win) gives each slot 4,096 tokens of its own instead.
    return [args.llama_server, "-m", args.gguf, "--host", "127.0.0.1", "--port", str(port),
            "-t", str(args.threads), "-tb", str(args.threads), "-np", str(args.parallel), "-kvu",
            "-c", str(args.ctx), "-b", "512", "-fa", "off", "--cache-prompt", "--no-webui",
            *(["--slot-save-path", args.slot_dir] if args.restart else []), *shlex.split(args.llama_server_args)]


# -- requests ----------------------------------------------------------------
def client_for(server: Server):
    import openai

    return openai.OpenAI(base_url=server.base_url, api_key="unused-on-loopback", max_retries=0, timeout=600)


def stream(server: Server, messages: list[dict], max_tokens: int, start: threading.Barrier | None = None,
           client=None, extra: dict | None = None) -> dict:
    """One streamed chat completion, timed at the chunks that carry text."""
    client = client or client_for(server)
    if start is not None:
        start.wait()
    t0 = time.perf_counter()
    first = last = None
    chunks, usage, finish, fingerprint = 0, None, None, None
    for chunk in client.chat.completions.create(
            model=server.model, messages=messages, max_tokens=max_tokens, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True, **(extra or {})}):
        fingerprint = fingerprint or getattr(chunk, "system_fingerprint", None)
        if chunk.choices:
            c = chunk.choices[0]
            if c.delta is not None and c.delta.content:
                last = time.perf_counter()
                first = first if first is not None else last
                chunks += 1
            finish = c.finish_reason or finish
        if getattr(chunk, "usage", None) is not None:
            usage = chunk.usage
    if first is None:
        raise RuntimeError(f"{server.name}: the stream carried no text")
    tokens = usage.completion_tokens if usage is not None else chunks
    details = getattr(usage, "prompt_tokens_details", None)
    return {"ttft_s": first - t0, "first": first, "last": last, "tokens": tokens, "chunks": chunks,
            "counted_from": "usage" if usage is not None else "chunks",
            "prompt_tokens": None if usage is None else usage.prompt_tokens,
            "cached_tokens": None if details is None else getattr(details, "cached_tokens", None),
            "finish": finish, "fingerprint": fingerprint,
            "decode_tps": (tokens - 1) / (last - first) if tokens > 1 and last > first else None}


def chat(system: str, user: str) -> list[dict]:
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def one_stream(server: Server, tag: str, args) -> dict:
    r = stream(server, chat(SYSTEM, f"[{tag}] {STORIES[0]}"), args.tokens)
    return {"decode_tps": r["decode_tps"], "ttft_ms": r["ttft_s"] * 1000, "requests": [r]}


def many_streams(server: Server, tag: str, args) -> dict:
    n = args.streams
    barrier = threading.Barrier(n)
    clients = [client_for(server) for _ in range(n)]
    out: list = [None] * n
    errors: list = []

    def one(i):
        try:
            out[i] = stream(server, chat(SYSTEM, f"[{tag}] {STORIES[i % len(STORIES)]}"), args.tokens,
                            start=barrier, client=clients[i])
        except Exception as e:  # raised after the join; a broken barrier follows a failed peer
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    span = max(r["last"] for r in out) - max(r["first"] for r in out)
    agg = (sum(r["tokens"] for r in out) - n) / span if span > 0 else None
    return {"aggregate_tps": agg, "ttft_ms": med(r["ttft_s"] * 1000 for r in out), "requests": out}


def shared_system(server: Server, tag: str, args) -> dict:
    system = handbook(tag, args.system_tokens)
    runs = [stream(server, chat(system, q), args.short_tokens) for q in QUESTIONS]
    return {"cold_ttft_ms": runs[0]["ttft_s"] * 1000, "warm_ttft_ms": med(r["ttft_s"] * 1000 for r in runs[1:]),
            "requests": runs}


def alternating(server: Server, tag: str, args) -> dict:
    systems = [handbook("A" + tag, args.system_tokens), handbook("B" + tag, args.system_tokens)]
    runs = [stream(server, chat(systems[i % 2], q), args.short_tokens) for i, q in enumerate(QUESTIONS)]
    return {"cold_ttft_ms": med(r["ttft_s"] * 1000 for r in runs[:2]),
            "warm_ttft_ms": med(r["ttft_s"] * 1000 for r in runs[2:]), "requests": runs}


WORKLOADS = [("a", one_stream), ("b", many_streams), ("c", shared_system), ("d", alternating)]

# What each repeat's progress line shows of a workload: (key, format).
PROGRESS = {"a": ("decode_tps", "a {:.1f} tok/s"), "b": ("aggregate_tps", "b {:.1f} tok/s"),
            "c": ("warm_ttft_ms", "c warm {:.0f} ms"), "d": ("warm_ttft_ms", "d warm {:.0f} ms")}

# (workload, key, label, higher is better)
ROWS = [("a", "decode_tps", "a. 1 stream: decode tok/s", True),
        ("a", "ttft_ms", "a. 1 stream: TTFT ms", False),
        ("b", "aggregate_tps", "b. {streams} streams: aggregate decode tok/s", True),
        ("b", "ttft_ms", "b. {streams} streams: median TTFT ms", False),
        ("c", "cold_ttft_ms", "c. shared system prompt: cold TTFT ms (request 1)", False),
        ("c", "warm_ttft_ms", "c. shared system prompt: warm TTFT ms (median of 2..6)", False),
        ("d", "cold_ttft_ms", "d. A,B alternating: cold TTFT ms (median of 1, 2)", False),
        ("d", "warm_ttft_ms", "d. A,B alternating: warm TTFT ms (median of 3..6)", False),
        ("e", "cold_ttft_ms", "e. before a restart: cold TTFT ms", False),
        ("e", "ttft_ms", "e. after a restart: TTFT ms, same prompt", False)]


def after_restart(server: Server, tag: str, args) -> dict:
    """The prompt once cold, a restart, a short unrelated warm-up, the
    prompt again. edgeinfer finds the prompt in its own cache; llama-server
    is given what it needs by hand: the slot that read the prompt is saved
    before the restart and restored after it (its /slots API, which needs
    --slot-save-path), and the restore's time is reported apart."""
    manual = server.name != "edgeinfer"
    slot = {"id_slot": 0} if manual else None
    messages = chat(handbook(tag, args.system_tokens), QUESTIONS[0])
    cold = stream(server, messages, args.short_tokens, extra=slot)
    file = f"bench-{tag}.bin"
    if manual:
        slot_action(server, 0, "save", file)
    load_s = server.restart(args.start_timeout)
    stream(server, chat(SYSTEM, f"[{tag}] Say hello."), 4, extra=manual and {"id_slot": 1} or None)
    restore_ms = slot_action(server, 0, "restore", file) if manual else None
    again = stream(server, messages, args.short_tokens, extra=slot)
    return {"cold_ttft_ms": cold["ttft_s"] * 1000, "ttft_ms": again["ttft_s"] * 1000, "restart_s": load_s,
            "restore_ms": restore_ms, "requests": [cold, again]}


def slot_action(server: Server, slot: int, action: str, filename: str) -> float:
    """llama-server's POST /slots/N?action=save|restore; its milliseconds."""
    req = urllib.request.Request(f"{server.root}/slots/{slot}?action={action}",
                                 data=json.dumps({"filename": filename}).encode(),
                                 headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=120) as r:
        r.read()
    return (time.perf_counter() - t0) * 1000


def settle(server: Server, quiet: float = 0.02, most: float = 10.0) -> None:
    """Wait until ``server`` (started here) is idle: work it put off
    (edgeinfer writes prompt-cache entries to disk a second after a
    request, at the lowest priority) is done before the other server is
    measured, instead of running during its measurement."""
    deadline = time.monotonic() + most
    before = server.cpu_seconds()
    while time.monotonic() < deadline:
        time.sleep(0.25)
        now = server.cpu_seconds()
        if now - before < quiet:
            return
        before = now


# -- the run -----------------------------------------------------------------
def run(servers: list[Server], args) -> dict:
    run_tag = f"{random.randrange(16**6):06x}"
    workloads = [(w, fn) for w, fn in WORKLOADS if w in args.workloads]
    results: dict = {s.name: {w: [] for w, _ in workloads} for s in servers}
    idle_cpu = {s.name: 0.0 for s in servers}
    for s in servers:   # one short request each: lazy start-up work out of the way
        stream(s, chat(SYSTEM, f"[warm-up {run_tag}] Say hello."), 8)
    for rep in range(args.reps):
        order = servers if rep % 2 == 0 else servers[::-1]
        for w, fn in workloads:
            for s in order:
                before = {o.name: o.cpu_seconds() for o in servers if o is not s}
                r = fn(s, f"{w}{rep}-{run_tag}", args)
                for o in servers:
                    if o is not s:
                        idle_cpu[o.name] += o.cpu_seconds() - before[o.name]
                results[s.name][w].append(r)
                time.sleep(0.3)   # let the other server's OpenMP workers stop spinning
                settle(s)
        log(f"rep {rep + 1}/{args.reps}: " + "; ".join(
            f"{s.name} " + ", ".join(PROGRESS[w][1].format(results[s.name][w][-1][PROGRESS[w][0]])
                                     for w, _ in workloads)
            for s in servers))
    if args.restart:   # the servers started here (a restart needs the command)
        restartable = [s for s in servers if s.cmd]
        for s in restartable:
            results[s.name]["e"] = []
        for rep in range(args.reps):
            for s in (restartable if rep % 2 == 0 else restartable[::-1]):
                results[s.name]["e"].append(after_restart(s, f"e{rep}-{run_tag}", args))
                log(f"restart {rep + 1}/{args.reps}: {s.name} TTFT {results[s.name]['e'][-1]['ttft_ms']:.0f} ms")
    return {"results": results, "idle_cpu_s": {k: round(v, 2) for k, v in idle_cpu.items()}, "run_tag": run_tag}


def summarize(servers: list[Server], out: dict, args) -> dict:
    res = out["results"]
    rows = []
    for w, key, label, higher in ROWS:
        row = {"workload": w, "key": key, "label": label.format(streams=args.streams), "higher_is_better": higher,
               "servers": {}}
        for s in servers:
            vals = [r[key] for r in res[s.name].get(w, []) if r.get(key) is not None]
            if vals:
                row["servers"][s.name] = {"median": round(med(vals), 2), "min": round(min(vals), 2),
                                          "max": round(max(vals), 2),
                                          "values": [round(v, 2) for v in vals]}
        if not row["servers"]:
            continue
        if len(servers) >= 2 and all(s.name in row["servers"] for s in servers[:2]):
            row["ratio"] = round(row["servers"][servers[0].name]["median"]
                                 / row["servers"][servers[1].name]["median"], 3)
        rows.append(row)
    tokens = {}
    for s in servers:
        tokens[s.name] = {}
        for w, reps in res[s.name].items():
            reqs = [q for r in reps for q in r["requests"]]
            tokens[s.name][w] = {"prompt_tokens": sorted({q["prompt_tokens"] for q in reqs}, key=str),
                                 "completion_tokens": sorted({q["tokens"] for q in reqs}),
                                 "counted_from": sorted({q["counted_from"] for q in reqs}),
                                 "finish": sorted({q["finish"] or "none" for q in reqs}),
                                 "cached_tokens": [[q["cached_tokens"] for q in r["requests"]] for r in reps]}
    return {"rows": rows, "token_counts": tokens}


def notes(servers: list[Server], summary: dict, args) -> list[str]:
    out = []
    tok = summary["token_counts"]
    names = [s.name for s in servers]
    for w in (w for w in "abcd" if w in args.workloads):
        seen = {n: (tuple(tok[n][w]["prompt_tokens"]), tuple(tok[n][w]["completion_tokens"])) for n in names}
        if len(set(seen.values())) > 1:
            out.append(f"workload {w}: token counts differ between servers (prompt; completion): "
                       + ", ".join(f"{n} {list(p)}; {list(c)}" for n, (p, c) in seen.items()))
        for n in names:
            want = args.tokens if w in ("a", "b") else args.short_tokens
            if any(c != want for c in tok[n][w]["completion_tokens"]):
                out.append(f"workload {w}: {n} did not always generate {want} tokens "
                           f"({tok[n][w]['completion_tokens']}, finish {tok[n][w]['finish']})")
            if "chunks" in tok[n][w]["counted_from"]:
                out.append(f"workload {w}: {n} sent no usage chunk; tokens counted as text chunks")
    return out


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.split(":")[0].strip() in ("model name", "cpu model", "Model"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def fmt(v: float) -> str:
    return f"{v:.1f}" if v < 1000 else f"{v:,.0f}"


def print_report(report: dict) -> None:
    servers = report["servers"]
    names = [s["name"] for s in servers]
    threads = "threads as the servers were started" if report["threads"] is None else f"{report['threads']} threads"
    print(f"# {report['cpu']}, {report['cpus']} CPUs, {threads}, model {report['model']}, "
          f"median of {report['reps']} (min-max), max_tokens {report['max_tokens']} (a, b) / "
          f"{report['short_max_tokens']} (c, d, e), load average {report['load_avg'][0]} before, "
          f"{report['load_avg'][1]} after")
    print(f"# command: {report['command']}")
    for s in servers:
        print(f"# {s['name']}: {s['base_url']}, model {s['model']!r}, fingerprint {s['fingerprint']!r}"
              + (f"\n#   started: {s['cmd']}" if s["cmd"] else ""))
    ratio_head = f" {names[0]} / {names[1]} |" if len(names) >= 2 else ""
    print()
    print(f"| workload | better | {' | '.join(names)} |{ratio_head}")
    print(f"|---|---|{'---:|' * (len(names) + bool(ratio_head))}")
    for row in report["rows"]:
        cells = []
        for n in names:
            c = row["servers"].get(n)
            cells.append("" if c is None else f"{fmt(c['median'])} ({fmt(c['min'])}-{fmt(c['max'])})")
        ratio = ""
        if ratio_head:
            ratio = f" {row['ratio']:.3f} |" if row.get("ratio") is not None else "  |"
        print(f"| {row['label']} | {'higher' if row['higher_is_better'] else 'lower'} | {' | '.join(cells)} "
              f"|{ratio}")
    print()
    for n in names:
        t = report["token_counts"][n]
        print(f"{n}: " + "; ".join(f"{w} prompt {v['prompt_tokens']} completion {v['completion_tokens']}"
                                   for w, v in t.items()))
        for w in ("c", "d", "e"):
            if w in t:
                print(f"  {w} cached tokens per request: {t[w]['cached_tokens']}")
    for name, seconds in report.get("restart_s", {}).items():
        print(f"{name} restart to /health 200: {', '.join(f'{x:.1f}' for x in seconds)} s")
    for name, ms in report.get("restore_ms", {}).items():
        print(f"{name} slot restore by hand before the request, not in its TTFT: "
              f"{', '.join(f'{x:.0f}' for x in ms)} ms")
    idle = {k: v for k, v in report["idle_cpu_s"].items() if v}
    if idle:
        print("CPU seconds a server used while the other one was measured: "
              + ", ".join(f"{k} {v}" for k, v in idle.items()))
    for line in report["notes"]:
        print(f"note: {line}")


def interrupted(signum, frame):
    """SIGTERM as Ctrl-C, so that main's finally stops the servers started here."""
    raise KeyboardInterrupt


def parse_servers(specs: list[str]) -> list[Server]:
    out = []
    for spec in specs:
        name, sep, url = spec.partition("=")
        if not sep or not name or not url.startswith(("http://", "https://")):
            raise SystemExit(f"--server {spec!r}: give NAME=BASE_URL, e.g. edgeinfer=http://127.0.0.1:8080/v1")
        out.append(Server(name, url))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="examples:\n" + __doc__.rsplit("\n\n", 1)[1])
    p.add_argument("--server", action="append", default=[], metavar="NAME=BASE_URL",
                   help="a running server, e.g. llama-server=http://127.0.0.1:8081/v1; repeatable")
    p.add_argument("--edgeinfer-model", metavar="MODEL", help="start `edgeinfer serve MODEL` here")
    p.add_argument("--edgeinfer-args", default="", help="extra arguments for edgeinfer serve, e.g. "
                   "'--speculative off'")
    p.add_argument("--llama-server", metavar="PATH", help="start this llama-server binary here")
    p.add_argument("--gguf", metavar="PATH", help="the file llama-server serves (default: --edgeinfer-model's)")
    p.add_argument("--llama-server-args", default="", help="extra arguments for llama-server, e.g. '--no-repack'")
    p.add_argument("--threads", type=int, default=2, help="threads of the servers started here")
    p.add_argument("--parallel", type=int, default=4, help="sequences / slots of the servers started here")
    p.add_argument("--ctx", type=int, default=4096, help="context of the servers started here, shared by all "
                   "sequences")
    p.add_argument("--streams", type=int, default=4, help="streams at once in workload b")
    p.add_argument("--tokens", type=int, default=128, help="max_tokens in workloads a and b")
    p.add_argument("--short-tokens", type=int, default=16, help="max_tokens in workloads c, d and e")
    p.add_argument("--system-tokens", type=int, default=1000, help="about this many tokens of system prompt "
                   "in c, d and e")
    p.add_argument("--workloads", default="abcd", help="which of a, b, c and d to run, e.g. 'a' for one "
                   "stream's decode alone (--restart adds e)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--restart", action="store_true", help="workload e: TTFT of a prompt seen before a restart "
                   "(the servers started here; llama-server's slot saved and restored by hand)")
    p.add_argument("--start-timeout", type=float, default=300.0, help="seconds for a server to load its model")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    args = p.parse_args(argv)
    args.reps = max(1, args.reps)
    if not args.workloads or set(args.workloads) - set("abcd"):
        p.error(f"--workloads {args.workloads!r}: give some of the letters a, b, c, d")
    if args.restart and not (args.edgeinfer_model or args.llama_server):
        p.error("--restart restarts the servers this script starts: give --edgeinfer-model or --llama-server")
    args.slot_dir = tempfile.mkdtemp(prefix="bench-serving-slots-") if args.restart else None
    if args.llama_server and not args.gguf:
        if not args.edgeinfer_model:
            p.error("--llama-server needs --gguf (or --edgeinfer-model, whose file it then serves)")
        from edgeinfer.store import resolve_model

        args.gguf = str(resolve_model(args.edgeinfer_model)[0])
    if args.llama_server and not (os.path.isfile(args.llama_server) and os.access(args.llama_server, os.X_OK)):
        p.error(f"--llama-server {args.llama_server}: no such executable (build it: docs/benchmarks.md)")
    if args.gguf and not os.path.isfile(args.gguf):
        p.error(f"--gguf {args.gguf}: no such file")
    servers = parse_servers(args.server)
    started: list[Server] = []
    if args.edgeinfer_model:
        port = free_port()
        servers.insert(0, Server("edgeinfer", f"http://127.0.0.1:{port}/v1", edgeinfer_cmd(args, port)))
        started.append(servers[0])
    if args.llama_server:
        port = free_port()
        servers.insert(1 if args.edgeinfer_model else 0,
                       Server("llama-server", f"http://127.0.0.1:{port}/v1", llama_server_cmd(args, port)))
        started.append(servers[1 if args.edgeinfer_model else 0])
    if not servers:
        p.error("no server: give --server NAME=BASE_URL, --edgeinfer-model or --llama-server")
    if len({s.name for s in servers}) != len(servers):
        p.error("two servers have the same name")

    signal.signal(signal.SIGTERM, interrupted)
    load_before = round(os.getloadavg()[0], 2)
    exits, out = {}, None
    try:
        for s in started:   # one at a time: loading is not what is measured
            log(f"starting {s.name}: {shlex.join(s.cmd)}")
            s.start(args.start_timeout)
        for s in servers:
            if s.proc is None:
                s.wait_ready(10)
            log(f"{s.name}: {s.base_url}, model {s.model!r}")
        out = run(servers, args)
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        for s in started:
            with contextlib.suppress(Exception):
                exits[s.name] = s.stop()
            if s.log_path and out is not None:
                os.unlink(s.log_path)
            elif s.log_path:
                log(f"{s.name}'s log: {s.log_path}")
        if args.slot_dir:
            shutil.rmtree(args.slot_dir, ignore_errors=True)
    summary = summarize(servers, out, args)
    res = out["results"]
    report = {
        "cpu": cpu_name(), "cpus": os.cpu_count(),
        # threads, parallel and ctx are what the servers started here were given
        "threads": args.threads if started else None, "parallel": args.parallel if started else None,
        "ctx": args.ctx if started else None,
        "model": args.edgeinfer_model or args.gguf or servers[0].model, "gguf": args.gguf,
        "reps": args.reps, "workloads": args.workloads, "max_tokens": args.tokens,
        "short_max_tokens": args.short_tokens, "streams": args.streams,
        "system_tokens": args.system_tokens, "command": shlex.join([sys.executable, *sys.argv]),
        "load_avg": [load_before, round(os.getloadavg()[0], 2)], "run_tag": out["run_tag"],
        "servers": [{"name": s.name, "base_url": s.base_url, "model": s.model,
                     "cmd": shlex.join(s.cmd) if s.cmd else None, "exit": exits.get(s.name),
                     "fingerprint": next((q["fingerprint"] for reps in res[s.name].values() for r in reps[:1]
                                          for q in r["requests"]), None)}
                    for s in servers],
        **summary, "idle_cpu_s": out["idle_cpu_s"],
        "restart_s": {n: [round(r["restart_s"], 2) for r in ws["e"]] for n, ws in res.items() if ws.get("e")},
        "restore_ms": {n: [round(r["restore_ms"], 1) for r in ws["e"]] for n, ws in res.items()
                       if ws.get("e") and ws["e"][0]["restore_ms"] is not None},
    }
    report["notes"] = notes(servers, summary, args)
    for s in report["servers"]:
        if s["exit"] not in (None, 0, -signal.SIGTERM):
            report["notes"].append(f"{s['name']} exited with {s['exit']} when stopped")
    if args.json:
        report["raw"] = {n: {w: [{k: v for k, v in r.items() if k != "requests"} for r in reps]
                             for w, reps in ws.items()} for n, ws in res.items()}
        print(json.dumps(report))
    else:
        print_report(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
