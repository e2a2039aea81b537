#!/usr/bin/env python
"""Prefill and decode speed of edgeinfer's Engine next to llama-cpp-python's
high-level ``Llama``, on the same model, threads and token counts.

It mirrors llama-bench's pp512 / tg128:

* pp: evaluate a prompt of ``--pp`` random token ids (control and
  end-of-generation tokens excluded, the same ids for both runtimes) from an
  empty KV cache; tok/s = prompt tokens / time.
* tg: from a one-token prompt, generate ``--tg + 1`` tokens greedily; tok/s
  is measured over the ``--tg`` tokens after the first, so each timed token is
  one single-token ``llama_decode`` plus one sample, on both sides.

Each runtime gets one warm-up run per test, then ``--reps`` timed runs,
interleaved so that load from other processes hits both alike; the table
shows the median and the standard deviation. With ``--llama-bench PATH`` the
llama-bench binary built from the same vendored llama.cpp runs too, and the
0.97x target is checked against it.

Flash attention is off by default for the Engine (so prompt-cache hits are
bit-exact), for Llama and for llama-bench; ``--flash-attn`` turns it on for
all three.

    python scripts/bench_engine.py
    python scripts/bench_engine.py --threads 2 --reps 5 --llama-bench ~/llama.cpp/build/bin/llama-bench
    python scripts/bench_engine.py --json > bench.json
    python scripts/bench_engine.py --threads 2 --separate 4      # each side in its own processes
    python scripts/bench_engine.py --streams 1,2,4,8      # many streams: see bench_streams.py
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import llama_cpp

import edgeinfer
from edgeinfer import hardware, native
from edgeinfer.engine import DoneEvent, Engine, TextEvent

# The targets: at least this fraction of llama-bench, and above Llama.
TARGET_VS_LLAMA_BENCH = 0.97
# llama-bench on a 2-core x86-64 box, default model (SmolLM2-135M-Instruct
# Q4_1), 2 threads (REFERENCE.md). Shown when llama-bench is not run here, as
# an indication only: another run, maybe another machine.
REFERENCE_LLAMA_BENCH = {"pp": ("pp512", 332.0), "tg": ("tg128", 137.0)}
SEED = 1234


@dataclass
class Result:
    runtime: str
    test: str                   # "pp" or "tg"
    n_tokens: int               # tokens that the tok/s figure counts
    samples: list[float] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.test}{self.n_tokens}"

    @property
    def median(self) -> float:
        return statistics.median(self.samples) if self.samples else 0.0

    @property
    def stdev(self) -> float:
        return statistics.stdev(self.samples) if len(self.samples) > 1 else 0.0

    def to_dict(self) -> dict:
        return {"runtime": self.runtime, "test": self.name, "n_tokens": self.n_tokens,
                "median_tps": round(self.median, 2), "stdev_tps": round(self.stdev, 2),
                "samples_tps": [round(s, 2) for s in self.samples]}


# -- token choice ------------------------------------------------------------

def is_plain(engine: Engine, token: int) -> bool:
    """A token that renders as text: neither end-of-generation nor a control
    token (control tokens render as nothing unless ``special=True``)."""
    if engine.is_eog(token):
        return False
    piece = engine.token_bytes(token)
    return bool(piece) and piece == engine.token_bytes(token, special=True)


def plain_tokens(engine: Engine, n: int, rng: random.Random) -> list[int]:
    out: list[int] = []
    while len(out) < n:
        t = rng.randrange(engine.n_vocab)
        if is_plain(engine, t):
            out.append(t)
    return out


def bos_prefix(engine: Engine) -> list[int]:
    """[BOS] when the model adds one (as llama-bench does), else []."""
    return engine.tokenize("", add_bos=True) if engine.add_bos else []


# -- edgeinfer -----------------------------------------------------------------

def engine_run(engine: Engine, prompt: list[int], max_tokens: int) -> tuple[DoneEvent, list[int]]:
    engine.kv_clear(0)  # forget the KV state, so the prefill is really cold
    generated: list[int] = []
    for event in engine.stream_tokens(prompt, max_tokens=max_tokens, temperature=0):
        if isinstance(event, TextEvent):
            generated.extend(event.tokens)
    if event.stats.cached_tokens:
        raise RuntimeError(f"the engine reused {event.stats.cached_tokens} cached tokens")
    return event, generated


def engine_pp(engine: Engine, prompt: list[int]) -> float:
    done, _ = engine_run(engine, prompt, 0)
    return done.stats.prefill_tps


def engine_tg(engine: Engine, prompt: list[int], n_gen: int) -> tuple[float, int, list[int]]:
    """tok/s over the tokens after the first, how many those were, the tokens."""
    done, generated = engine_run(engine, prompt, n_gen + 1)
    return done.stats.decode_tps, max(done.stats.generated_tokens - 1, 0), generated


# -- llama-cpp-python's Llama --------------------------------------------------

def llama_pp(llm: llama_cpp.Llama, prompt: list[int]) -> float:
    llm.reset()  # n_tokens = 0: eval() drops the whole KV cache first, no prompt reuse
    t0 = time.perf_counter()
    llm.eval(prompt)
    return len(prompt) / (time.perf_counter() - t0)


def llama_tg(llm: llama_cpp.Llama, prompt: list[int], n_gen: int) -> tuple[float, list[int]]:
    """Like engine_tg: n_gen + 1 tokens, timed from the first to the last."""
    llm.reset()
    generated: list[int] = []
    t_first = t_end = 0.0
    gen = llm.generate(prompt, temp=0, reset=True)
    for token in gen:  # Llama.generate never stops on EOG by itself
        generated.append(token)
        if len(generated) == 1:
            t_first = time.perf_counter()
        if len(generated) == n_gen + 1:
            t_end = time.perf_counter()
            break
    gen.close()
    return n_gen / (t_end - t_first), generated


# -- llama-bench ---------------------------------------------------------------

def run_llama_bench(binary: str, model: Path, threads: int, pp: int, tg: int, reps: int,
                    flash_attn: bool, extra: list[str] = ()) -> tuple[list[Result], dict]:
    cmd = [binary, "-m", str(model), "-t", str(threads), "-p", str(pp), "-n", str(tg),
           "-r", str(reps), "-o", "json", "-fa", "1" if flash_attn else "0", *extra]
    # -fa is explicit: llama-bench's own default is "auto", which is on for CPUs.
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"llama-bench failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    rows = json.loads(proc.stdout)
    results = []
    for row in rows:
        n_prompt, n_gen = int(row.get("n_prompt", 0)), int(row.get("n_gen", 0))
        test, n = ("pp", n_prompt) if n_gen == 0 else ("tg", n_gen)
        samples = row.get("samples_ts") or [row.get("avg_ts", 0.0)]
        results.append(Result("llama-bench", test, n, [float(s) for s in samples]))
    info = {"command": cmd, "build_commit": rows[0].get("build_commit") if rows else None,
            "build_number": rows[0].get("build_number") if rows else None}
    return results, info


# -- the run -------------------------------------------------------------------

def resolve(name_or_path: str) -> tuple[Path, bool]:
    """The GGUF path, and whether it is the catalog's default model."""
    try:
        path, manifest = edgeinfer.resolve_model(name_or_path)
    except edgeinfer.ModelNotFoundError as e:
        raise SystemExit(f"Error: {e.one_line()}") from None
    return path, manifest is not None and manifest.sha256 == edgeinfer.default_entry().sha256


def pick_tg_prompt(engine: Engine, rng: random.Random, n_gen: int, tries: int = 20) -> tuple[list[int], int, list[int]]:
    """A one-token prompt (after BOS, if any) from which greedy decoding runs
    n_gen + 1 tokens without end-of-generation. This is also the warm-up.
    Returns (prompt, timed token count, generated tokens); if every try hits
    EOG, the longest one, with its shorter count."""
    best: tuple[list[int], int, list[int]] | None = None
    for candidate in plain_tokens(engine, tries, rng):
        prompt = bos_prefix(engine) + [candidate]
        _, n, generated = engine_tg(engine, prompt, n_gen)
        if best is None or n > best[1]:
            best = (prompt, n, generated)
        if n == n_gen:
            break
    return best


def measure(args, model: Path, log) -> dict:
    n_ctx = args.pp + args.tg + 2
    # Every prefill must be cold: no prompt cache (where the Engine has one),
    # and kv_clear() before each run.
    engine = Engine(model, n_ctx=n_ctx, threads=args.threads, threads_batch=args.threads,
                    n_batch=args.batch, prompt_cache=False, flash_attn=args.flash_attn,
                    stop_on_repeat=False)  # tg must decode exactly --tg tokens
    # --only: one runtime timed in this process (the engine still loads, for
    # its native setting and to choose the prompts).
    runtimes = (args.only,) if args.only else ("edgeinfer", "Llama")
    llm = None
    # Llama gets the native setting the engine's self-test chose: on a
    # machine whose AMX matmul crashes, a plain Llama dies on its first decode.
    if "Llama" in runtimes:
        with native.llama_defaults(engine.native.setting, engine.info):
            llm = llama_cpp.Llama(str(model), n_ctx=n_ctx, n_threads=args.threads,
                                  n_threads_batch=args.threads, n_batch=args.batch,
                                  flash_attn=args.flash_attn, verbose=False)
    rng = random.Random(SEED)
    results: dict[tuple[str, str], Result] = {}
    notes: list[str] = [f"native setting for both runtimes: {engine.native.setting}"]
    # Llama runs on the engine's scheduler thread. Measured: when two OS
    # threads of one process both run ggml's OpenMP graphs, each one's idle
    # workers spin against the other's and both decode at a third of their
    # speed (83 -> 28 tok/s on the default model, 2 cores).
    on_engine_thread = engine._scheduler.call

    def llama_pp(llm, prompt):
        return on_engine_thread(lambda: globals()["llama_pp"](llm, prompt))

    def llama_tg(llm, prompt, n_gen):
        return on_engine_thread(lambda: globals()["llama_tg"](llm, prompt, n_gen))

    pp_prompt = []
    if args.pp:
        pp_prompt = (bos_prefix(engine) + plain_tokens(engine, args.pp, rng))[:args.pp]
        for runtime in runtimes:
            results[(runtime, "pp")] = Result(runtime, "pp", args.pp)
        engine_pp(engine, pp_prompt)        # warm-up
        if llm is not None:
            llama_pp(llm, pp_prompt)

    n_timed, tg_prompt, same_tokens = args.tg, [], None
    if args.tg:
        log(f"choosing a tg prompt without end-of-generation in {args.tg + 1} greedy tokens ...")
        tg_prompt, n_timed, ours = pick_tg_prompt(engine, rng, args.tg)   # also our warm-up
        if n_timed < args.tg:
            notes.append(f"every tried prompt hit end-of-generation; tg counts {n_timed} tokens on both sides")
        if n_timed < 2:
            notes.append("tg skipped: too few tokens before end-of-generation")
        else:
            if llm is not None:
                _, theirs = llama_tg(llm, tg_prompt, n_timed)              # warm-up
                same_tokens = ours == theirs if len(runtimes) == 2 else None
            for runtime in runtimes:
                results[(runtime, "tg")] = Result(runtime, "tg", n_timed)
    do_tg = (runtimes[0], "tg") in results

    for rep in range(args.reps):
        # alternate who goes first, so that a change in load splits evenly
        order = runtimes if rep % 2 == 0 else runtimes[::-1]
        for runtime in order:
            if args.pp:
                tps = engine_pp(engine, pp_prompt) if runtime == "edgeinfer" else llama_pp(llm, pp_prompt)
                results[(runtime, "pp")].samples.append(tps)
            if do_tg:
                if runtime == "edgeinfer":
                    tps, n, _ = engine_tg(engine, tg_prompt, n_timed)
                    if n != n_timed:
                        raise RuntimeError(f"edgeinfer decoded {n} tokens, expected {n_timed}")
                else:
                    tps, _ = llama_tg(llm, tg_prompt, n_timed)
                results[(runtime, "tg")].samples.append(tps)
        log(f"rep {rep + 1}/{args.reps} done")

    info = engine.info
    engine.close()
    if llm is not None:
        llm.close()
    return {"results": results, "notes": notes, "n_ctx": n_ctx, "tg_prompt": tg_prompt,
            "same_greedy_tokens": same_tokens, "info": info}


def human_count(n: int | None) -> str:
    if not n:
        return "?"
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return str(n)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def checks(by_key: dict, reference: bool) -> list[dict]:
    """One row per target: measured here when possible, else (for the
    default model at 2 threads) the reference figures."""
    rows = []
    for test in ("pp", "tg"):
        ours = by_key.get(("edgeinfer", test))
        if ours is None:
            continue
        llama = by_key.get(("Llama", test))
        if llama is not None:
            noise = max(ours.stdev, llama.stdev)
            rows.append({"test": ours.name, "target": "edgeinfer > Llama",
                         "need": llama.median, "have": ours.median,
                         "source": "this run" + (", within one stdev"
                                                 if abs(ours.median - llama.median) < noise else ""),
                         "met": ours.median > llama.median})
        bench = by_key.get(("llama-bench", test))
        if bench is not None:
            rows.append({"test": ours.name, "target": f"edgeinfer >= {TARGET_VS_LLAMA_BENCH} x llama-bench",
                         "need": TARGET_VS_LLAMA_BENCH * bench.median, "have": ours.median,
                         "source": "this run", "met": ours.median >= TARGET_VS_LLAMA_BENCH * bench.median})
        elif reference and REFERENCE_LLAMA_BENCH[test][0] == ours.name:
            ref_name, ref = REFERENCE_LLAMA_BENCH[test]
            rows.append({"test": ours.name, "target": f"edgeinfer >= {TARGET_VS_LLAMA_BENCH} x llama-bench",
                         "need": TARGET_VS_LLAMA_BENCH * ref, "have": ours.median,
                         "source": f"reference {ref_name} = {ref:g} tok/s from another run; "
                                   "pass --llama-bench to measure",
                         "met": ours.median >= TARGET_VS_LLAMA_BENCH * ref})
    return rows


def print_report(report: dict, by_key: dict) -> None:
    cfg = report["config"]
    print(f"# {report['date']}  {cfg['cpu']} ({cfg['cpus']} CPUs)  llama-cpp-python {cfg['llama_cpp_python']}")
    print(f"# load average before {report['load_before']}, after {report['load_after']}")
    print(f"# n_ctx {cfg['n_ctx']}, n_batch {cfg['n_batch']}, {cfg['reps']} reps after 1 warm-up; flash attention: "
          f"{'on' if cfg['flash_attn'] else 'off'} for all")
    if report["load_before"][0] >= cfg["cpus"]:
        print(f"# WARNING: the 1-minute load average ({report['load_before'][0]}) was at or above "
              f"the CPU count; other processes were competing and the figures are unreliable")
    print()
    head = ("model", "size", "params", "runtime", "threads", "test", "t/s")
    runtimes = ("edgeinfer", "Llama", "llama-bench")
    ordered = sorted(by_key.values(), key=lambda r: (r.test, runtimes.index(r.runtime)))
    rows = [(cfg["model_desc"], f"{cfg['model_bytes'] / 2**20:.2f} MiB", cfg["params"], r.runtime,
             str(cfg["threads"]), r.name, f"{r.median:.2f} ± {r.stdev:.2f}") for r in ordered]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    right = {1, 2, 4, 5, 6}
    fmt = lambda cells: "| " + " | ".join(c.rjust(w) if i in right else c.ljust(w)  # noqa: E731
                                          for i, (c, w) in enumerate(zip(cells, widths))) + " |"
    print(fmt(head))
    print("|" + "|".join(("-" * (w + 1) + ":") if i in right else "-" * (w + 2) for i, w in enumerate(widths)) + "|")
    for row in rows:
        print(fmt(row))
    print()
    for r in report["ratios"]:
        print(f"{r['test']:>6}: edgeinfer / {r['vs']:<11} = {r['ratio']:.3f}")
    print()
    for c in report["checks"]:
        mark = "met" if c["met"] else "NOT met"
        print(f"{c['test']:>6}: {c['target']:<34} {c['have']:8.2f} vs {c['need']:8.2f} tok/s  "
              f"{mark:<8} ({c['source']})")
    if report["same_greedy_tokens"] is not None:
        same = "identical" if report["same_greedy_tokens"] else "DIFFERENT (numerics differ, e.g. flash attention)"
        print(f"\ngreedy tokens of edgeinfer and Llama in the tg test: {same}")
    for note in report["notes"]:
        print(f"note: {note}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--streams" in argv:  # the multi-stream mode: bench_streams.py
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import bench_streams

        return bench_streams.main(argv)
    default_model = edgeinfer.default_entry().name
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="examples:\n" + __doc__.rsplit("\n\n", 1)[1])
    p.add_argument("--model", default=default_model,
                   help=f"a store name or a GGUF path (default: {default_model})")
    p.add_argument("--threads", type=int, default=hardware.default_threads(),
                   help="threads for prefill and decode (default: %(default)s, the physical cores)")
    p.add_argument("--pp", type=int, default=512, help="prompt tokens for the prefill test (default: 512; 0: skip)")
    p.add_argument("--tg", type=int, default=128, help="timed tokens for the decode test (default: 128; 0: skip)")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions after one warm-up (default: 3)")
    p.add_argument("--batch", type=int, default=512, help="n_batch for both runtimes (default: 512)")
    p.add_argument("--llama-bench", metavar="PATH", help="also run this llama-bench binary")
    p.add_argument("--llama-bench-args", default="", metavar="ARGS",
                   help="more arguments for llama-bench, e.g. '--repack 0' where the self-test "
                        "turned extra buffer types off (edgeinfer doctor)")
    p.add_argument("--flash-attn", action="store_true",
                   help="flash attention on for all three runtimes (default: off for all)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--separate", type=int, default=0, metavar="ROUNDS",
                   help="time each runtime in its own process, ROUNDS times each, alternating which goes "
                        "first (each process: one warm-up and --reps timed runs)")
    p.add_argument("--only", choices=("edgeinfer", "Llama"), help=argparse.SUPPRESS)   # a --separate child
    args = p.parse_args(argv)
    if args.reps < 1 or args.pp < 0 or args.tg < 0 or args.threads < 1 or not (args.pp or args.tg):
        p.error("--reps and --threads must be >= 1, --pp and --tg >= 0 and not both 0")

    model, is_default_model = resolve(args.model)
    def log(msg):
        print(msg, file=sys.stderr, flush=True)
    if args.separate:
        return separate(args, argv, is_default_model, log)
    load_before = [round(x, 2) for x in os.getloadavg()]
    log(f"benchmarking {model} with {args.threads} threads (load average {load_before}) ...")
    # A shared or virtual machine's speed drifts over minutes, so llama-bench
    # runs both before and after the Python runtimes and its samples are
    # pooled: all three are measured over the same stretch of time.
    bench_runs = []
    bench_info = None
    if args.llama_bench:
        log(f"running {args.llama_bench} (before) ...")
        bench_runs.append(run_llama_bench(args.llama_bench, model, args.threads, args.pp, args.tg,
                                          args.reps, args.flash_attn, shlex.split(args.llama_bench_args)))
    run = measure(args, model, log)
    by_key: dict[tuple[str, str], Result] = run["results"]
    if args.llama_bench:
        log(f"running {args.llama_bench} (after) ...")
        bench_runs.append(run_llama_bench(args.llama_bench, model, args.threads, args.pp, args.tg,
                                          args.reps, args.flash_attn, shlex.split(args.llama_bench_args)))
        bench_info = bench_runs[0][1]
        for results, _ in bench_runs:
            for r in results:
                key = ("llama-bench", r.test)
                if key in by_key:
                    by_key[key].samples.extend(r.samples)
                else:
                    by_key[key] = r
    load_after = [round(x, 2) for x in os.getloadavg()]

    ratios = []
    for test in ("pp", "tg"):
        ours = by_key.get(("edgeinfer", test))
        for other in ("Llama", "llama-bench"):
            theirs = by_key.get((other, test))
            if ours and theirs and theirs.median:
                ratios.append({"test": ours.name, "vs": other, "ratio": ours.median / theirs.median})
    info = run["info"]
    report = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "config": {"model": str(model),
                   "model_desc": f"{info.architecture} {human_count(info.parameter_count)} {info.file_type}",
                   "model_bytes": info.file_size, "params": human_count(info.parameter_count),
                   "threads": args.threads, "pp": args.pp, "tg": args.tg, "reps": args.reps,
                   "n_ctx": run["n_ctx"], "n_batch": args.batch, "flash_attn": args.flash_attn,
                   "cpu": cpu_model(), "cpus": os.cpu_count(),
                   "llama_cpp_python": llama_cpp.__version__, "tg_prompt": run["tg_prompt"]},
        "load_before": load_before, "load_after": load_after,
        "results": [r.to_dict() for r in by_key.values()],
        "ratios": ratios,
        "checks": checks(by_key, reference=is_default_model and args.threads == 2),
        "same_greedy_tokens": run["same_greedy_tokens"],
        "llama_bench": bench_info,
        "notes": run["notes"],
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report, by_key)
    return 0


def separate(args, argv: list[str], is_default_model: bool, log) -> int:
    """--separate: each runtime timed in child processes of its own,
    alternating A, B, B, A, ...; the samples pooled, and the ratio of each
    round's medians reported."""
    child_argv = []
    skip = False
    for a in argv:   # the same options, less --separate N and --json
        if skip:
            skip = False
        elif a == "--separate":
            skip = True
        elif not a.startswith("--separate=") and a != "--json":
            child_argv.append(a)
    load_before = [round(x, 2) for x in os.getloadavg()]
    by_key: dict[tuple[str, str], Result] = {}
    rounds: list[dict[tuple[str, str], float]] = []
    config = None
    for rnd in range(args.separate):
        order = ("edgeinfer", "Llama") if rnd % 2 == 0 else ("Llama", "edgeinfer")
        medians = {}
        for runtime in order:
            log(f"round {rnd + 1}/{args.separate}: {runtime} in its own process ...")
            proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), *child_argv, "--only", runtime,
                                   "--json"], capture_output=True, text=True)
            if proc.returncode != 0:
                log(proc.stderr)
                raise SystemExit(f"the {runtime} process failed with status {proc.returncode}")
            child = json.loads(proc.stdout)
            config = config or child["config"]
            for r in child["results"]:
                key = (r["runtime"], r["test"][:2])
                by_key.setdefault(key, Result(r["runtime"], r["test"][:2], r["n_tokens"])).samples.extend(
                    r["samples_tps"])
                medians[key] = r["median_tps"]
        rounds.append(medians)
    per_round = []
    for test in ("pp", "tg"):
        pairs = [m[("edgeinfer", test)] / m[("Llama", test)] for m in rounds
                 if ("edgeinfer", test) in m and m.get(("Llama", test))]
        if pairs:
            per_round.append({"test": by_key[("edgeinfer", test)].name, "vs": "Llama",
                              "ratio": statistics.median(pairs), "rounds": [round(x, 3) for x in pairs]})
    report = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *argv]),
        "config": {**config, "reps": f"{args.separate} processes x {args.reps}"},
        "load_before": load_before, "load_after": [round(x, 2) for x in os.getloadavg()],
        "results": [r.to_dict() for r in by_key.values()],
        "ratios": per_round,
        "checks": checks(by_key, reference=is_default_model and args.threads == 2),
        "same_greedy_tokens": None, "llama_bench": None,
        "notes": ["each runtime in its own processes; a ratio is the median over rounds of "
                  "edgeinfer's median / Llama's median in that round: "
                  + ", ".join(f"{r['test']} {r['rounds']}" for r in per_round)],
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report, by_key)
    return 0


if __name__ == "__main__":
    sys.exit(main())
