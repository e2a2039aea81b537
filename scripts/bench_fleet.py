#!/usr/bin/env python
"""Past one box, measured on one machine: one `edgeinfer serve` against two
behind `edgeinfer router`, under --clients (8) clients that share a system
prompt.

Arms (each started here on loopback, stopped at the end):

  one-1core   one server, 1 thread, pinned to core 0 (the "one box");
  one-2core   one server, 2 threads, on cores 0 and 1 (the same silicon as
              the fleet, in one process);
  fleet-POLICY  two servers, 1 thread each, pinned to core 0 and core 1,
              behind `edgeinfer router --policy POLICY`, for each of
              --policies (cache_aware, round_robin).

Every server has --parallel 4 (a 4-slot box). Each client holds a chat of
--turns turns: the shared system prompt (~600 tokens), then its own
questions, each turn sending the whole history with the answers so far, as
a chat client does. Requests stream through the official openai client with
usage included; temperature 0 and ignore_eos, so each answer is
--max-tokens long. Each run's system prompt starts with a tag unique to the
run, so no prompt cache from an earlier arm or run can serve it.

Printed per arm: aggregate generated tok/s (all completion tokens / wall
time), time to first token p50 and p95 over all requests and over turns
2.. alone, the cached-token share (prompt tokens served from the prompt
cache / prompt tokens) of turns 2.., errors, and for the fleet how many
requests each worker answered (from its /metrics).

What one 2-core machine shows, and what it does not:
  - taskset gives each worker a core of its own, so the fleet arms have two
    decoders that do not steal each other's cycles, as two boxes would;
    one-1core is one such box. The ratio fleet/one-1core is the scaling a
    second box buys, and the cached share per policy shows how well the
    router keeps a conversation on the box that holds its prefix.
  - It does not show the network: router and workers talk over loopback, so
    a LAN's latency and bandwidth are not in the TTFT. The two "boxes" also
    share one memory bus and last-level cache, which decode leans on:
    two real boards each have their own, so their scaling is closer to 2x
    than these figures. The router and the clients are not pinned and take
    cycles from the same two cores (the router little: it is Rust).
  - one-2core against the fleet compares one process using both cores with
    two processes using one each on the same machine; it says nothing
    about a bigger box.

    python scripts/bench_fleet.py --model smollm2-135m-instruct
    python scripts/bench_fleet.py --model tiny.gguf --clients 2 --turns 2 --max-tokens 8   # a smoke run

Needs the fleet extra (pip install 'edgeinfer[fleet]') and taskset
(util-linux) for pinning; without taskset, or with fewer than 2 CPUs, it
runs unpinned and says so.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

START_TIMEOUT_S = 300

QUESTIONS = ["When do you open on Saturdays?", "Can I return shoes I wore once?", "How long does delivery take?",
             "Do you deliver to the islands?", "Is there a student discount?", "Can I pay by bank transfer?",
             "Where is the nearest shop?", "What if my parcel is lost?"]


def system_prompt(tag: str) -> str:
    rules = ("Opening hours are nine to six on weekdays and ten to four on Saturdays; closed on Sundays. "
             "Returns are accepted within thirty days with a receipt, unworn, in the original box. "
             "Delivery takes two to four working days on the mainland and a week to the islands. ")
    return f"[{tag}] You are the assistant of a small shoe shop. Answer in two sentences at most. " + rules * 6


class Proc:
    """A started process and the lines it printed on stderr."""

    def __init__(self, cmd: list[str], ready: re.Pattern, env: dict | None = None):
        self.cmd = cmd
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                                     env={**os.environ, **(env or {})})
        self.log: list[str] = []
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                break
            self.log.append(line)
            m = ready.search(line)
            if m:
                self.port = int(m.group(1))
                threading.Thread(target=lambda: self.log.extend(self.proc.stderr), daemon=True).start()
                return
        self.stop()
        raise RuntimeError(f"{' '.join(cmd[:6])} did not start:\n" + "".join(self.log)[-2000:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def pin(cores: str | None) -> list[str]:
    return ["taskset", "-c", cores] if cores and PINNING else []


PINNING = bool(shutil.which("taskset")) and len(os.sched_getaffinity(0)) >= 2


def serve(model: str, threads: int, cores: str | None, token_file: str, n_ctx: int) -> Proc:
    cmd = pin(cores) + [sys.executable, "-m", "edgeinfer", "serve", model, "--no-jsonl", "--http", "0",
                        "--threads", str(threads), "--parallel", "4", "--n-ctx", str(n_ctx),
                        "--token-file", token_file, "--yes"]
    return Proc(cmd, re.compile(r"^Serving .* http://127\.0\.0\.1:(\d+)"))


def router(workers: list[Proc], policy: str, token_file: str) -> Proc:
    cmd = [sys.executable, "-m", "edgeinfer", "router", "--port", "0", "--metrics-port", str(free_port()),
           "--token-file", token_file, "--policy", policy, "--health-interval", "1"]
    for w in workers:
        cmd += ["--worker", f"http://127.0.0.1:{w.port}"]
    p = Proc(cmd, re.compile(r"^Routing http://127\.0\.0\.1:(\d+)"))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{p.port}/readiness", timeout=5) as r:
                if json.loads(r.read()).get("healthy_workers") == len(workers):
                    return p
        except (OSError, ValueError):
            pass
        time.sleep(0.2)
    p.stop()
    raise RuntimeError("the router never saw every worker healthy")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def chats_served(port: int, token: str) -> int:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith('edgeinfer_requests_total{endpoint="/v1/chat/completions",status="200"}'):
                return int(float(line.rsplit(" ", 1)[1]))
    return 0


def model_name(port: int, token: str) -> str:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/models", headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())["data"][0]["id"]


def load(base_url: str, token: str, model: str, args, tag: str) -> dict:
    """--clients chats of --turns turns at once; the figures of the arm."""
    import openai

    client = openai.OpenAI(base_url=base_url + "/v1", api_key=token, max_retries=0, timeout=600)
    system = system_prompt(tag)

    def chat(k: int) -> list[dict]:
        messages = [{"role": "system", "content": system}]
        out = []
        for turn in range(args.turns):
            messages.append({"role": "user", "content": f"{QUESTIONS[(k + turn) % len(QUESTIONS)]} (client {k})"})
            t0 = time.monotonic()
            rec = {"turn": turn, "ttft": None, "completion": 0, "prompt": 0, "cached": 0, "ok": False}
            try:
                stream = client.chat.completions.create(
                    model=model, messages=messages, max_tokens=args.max_tokens, temperature=0, stream=True,
                    stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
                text = []
                for c in stream:
                    if c.choices and c.choices[0].delta.content:
                        if rec["ttft"] is None:
                            rec["ttft"] = time.monotonic() - t0
                        text.append(c.choices[0].delta.content)
                    if c.usage:
                        rec["completion"] = c.usage.completion_tokens
                        rec["prompt"] = c.usage.prompt_tokens
                        details = c.usage.prompt_tokens_details
                        rec["cached"] = (details.cached_tokens or 0) if details else 0
                rec["ok"] = True
                messages.append({"role": "assistant", "content": "".join(text)})
            except openai.APIError as e:
                rec["error"] = f"{type(e).__name__}: {e}"
                out.append(rec)
                break
            out.append(rec)
        return out

    t0 = time.monotonic()
    with ThreadPoolExecutor(args.clients) as pool:
        recs = [r for rs in pool.map(chat, range(args.clients)) for r in rs]
    wall = time.monotonic() - t0
    ok = [r for r in recs if r["ok"]]
    later = [r for r in ok if r["turn"] > 0]

    def pct(xs: list[float], q: float) -> float | None:
        xs = sorted(x for x in xs if x is not None)
        return round(xs[min(len(xs) - 1, int(q * len(xs)))], 3) if xs else None

    return {
        "requests": len(recs), "errors": len(recs) - len(ok), "wall_s": round(wall, 2),
        "tok_s": round(sum(r["completion"] for r in ok) / wall, 2),
        "ttft_p50": pct([r["ttft"] for r in ok], 0.5), "ttft_p95": pct([r["ttft"] for r in ok], 0.95),
        "ttft_later_p50": pct([r["ttft"] for r in later], 0.5),
        "ttft_later_p95": pct([r["ttft"] for r in later], 0.95),
        "cached_share_later": round(sum(r["cached"] for r in later) / max(1, sum(r["prompt"] for r in later)), 3),
        "first_errors": [r["error"] for r in recs if not r["ok"]][:3],
    }


def run_arm(name: str, args, token: str, token_file: str) -> dict:
    tag = f"{name}-{secrets.token_hex(4)}"
    procs: list[Proc] = []
    try:
        if name == "one-1core":
            procs.append(serve(args.model, 1, "0", token_file, args.n_ctx))
            port, workers = procs[0].port, procs
        elif name == "one-2core":
            procs.append(serve(args.model, 2, "0,1", token_file, args.n_ctx))
            port, workers = procs[0].port, procs
        else:
            policy = name.removeprefix("fleet-")
            workers = [serve(args.model, 1, "0", token_file, args.n_ctx), serve(args.model, 1, "1", token_file,
                                                                                 args.n_ctx)]
            procs += workers
            procs.append(router(workers, policy, token_file))
            port = procs[-1].port
        model = model_name(workers[0].port, token)
        before = [chats_served(w.port, token) for w in workers]
        out = {"arm": name, **load(f"http://127.0.0.1:{port}", token, model, args, tag)}
        if name.startswith("fleet-"):
            out["per_worker"] = [chats_served(w.port, token) - b for w, b in zip(workers, before)]
        return out
    finally:
        for p in reversed(procs):
            p.stop()


def show(rows: list[dict]) -> None:
    head = f"{'arm':<20}{'tok/s':>8}{'TTFT p50':>10}{'p95':>8}{'later p50':>11}{'p95':>8}{'cached':>8}" \
           f"{'errors':>8}  per worker"
    print(head)
    for r in rows:
        def s(v):
            return "-" if v is None else f"{v:.2f}"
        print(f"{r['arm']:<20}{r['tok_s']:>8.1f}{s(r['ttft_p50']):>10}{s(r['ttft_p95']):>8}"
              f"{s(r['ttft_later_p50']):>11}{s(r['ttft_later_p95']):>8}{r['cached_share_later']:>8.0%}"
              f"{r['errors']:>8}  {r.get('per_worker', '')}")
        for e in r["first_errors"]:
            print(f"    error: {e[:200]}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--model", required=True, help="A store name or a GGUF path, served by every arm.")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--n-ctx", type=int, default=8192, help="Each server's context, shared by its 4 slots.")
    ap.add_argument("--arms", default="one-1core,one-2core,fleet",
                    help="Comma-separated: one-1core, one-2core, fleet (one arm per --policies).")
    ap.add_argument("--policies", default="cache_aware,round_robin")
    ap.add_argument("--json", metavar="FILE", help="Also write the rows as JSON.")
    ap.add_argument("--rpc", action="store_true", help="The other shape instead: the model local, over one RPC "
                                                       "worker and over two (scripts/bench_rpc.py).")
    ap.add_argument("--rounds", type=int, default=3, help="With --rpc: alternating rounds.")
    args = ap.parse_args(argv)
    if args.rpc:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import bench_rpc

        return bench_rpc.main(["--model", args.model, "--rounds", str(args.rounds)])

    from edgeinfer.hardware import cpu_model

    arms = []
    for a in args.arms.split(","):
        arms += [f"fleet-{p}" for p in args.policies.split(",")] if a == "fleet" else [a]
    pinning = "pinned with taskset" if PINNING else "NOT pinned (no taskset, or fewer than 2 CPUs)"
    print(f"# {cpu_model()} ({os.cpu_count()} CPUs), {pinning}; model {args.model}, {args.clients} clients x "
          f"{args.turns} turns, {args.max_tokens} tokens each", flush=True)
    token = secrets.token_hex(16)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        token_file = Path(tmp) / "token"
        token_file.write_text(token)
        token_file.chmod(0o600)
        for arm in arms:
            rows.append(run_arm(arm, args, token, str(token_file)))
            print(f"  {arm}: {rows[-1]['tok_s']} tok/s, {rows[-1]['errors']} errors", file=sys.stderr, flush=True)
    show(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 1 if any(r["errors"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
