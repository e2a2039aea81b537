"""Decode speed on a busy box: the old default, the new default, the best.

Starts a CPU hog (a busy loop pinned to the last allowed CPU), then loads
the model with the engine's default threads (which now leave the cores
other work holds) and measures prefill and decode like `edgeinfer bench`,
against the old default (every physical core) and every thread count.
Then the same new default on the quiet box, to show it costs nothing
there.

    python scripts/bench_busy.py                      # SmolLM2 135M, 3 reps
    python scripts/bench_busy.py --model qwen2.5-coder-0.5b-instruct --json

The target: the new default within 10 % of the best on the busy box.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import edgeinfer
from edgeinfer import hardware, tuning

HOG = "import os, sys\nos.sched_setaffinity(0, {int(sys.argv[1])})\nwhile True:\n    pass\n"


def measure(engine, reps: int, n_prompt: int, n_gen: int) -> tuple[float, float]:
    pre, dec = tuning.measure(engine, n_prompt, n_gen, reps)
    return statistics.median(pre), statistics.median(dec)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--pp", type=int, default=64)
    ap.add_argument("--tg", type=int, default=64)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    cpus = hardware.affinity_cpus()
    old_default = hardware.default_threads()
    rows = []
    hog = subprocess.Popen([sys.executable, "-c", HOG, str(cpus[-1])])
    try:
        time.sleep(1.0)
        with edgeinfer.load(args.model, prompt_cache=False) as e:
            auto = (e.threads, e.threads_source)
            rows.append(("busy", "new default", e.threads, *measure(e, args.reps, args.pp, args.tg)))
            for t in range(1, hardware.usable_cores() + 1):
                e.set_threads(t, t)
                label = "old default" if t == old_default else f"{t} threads"
                rows.append(("busy", label, t, *measure(e, args.reps, args.pp, args.tg)))
    finally:
        hog.kill()
        hog.wait()
    time.sleep(1.0)
    with edgeinfer.load(args.model, prompt_cache=False) as e:
        rows.append(("quiet", "new default", e.threads, *measure(e, args.reps, args.pp, args.tg)))
    best = max(r[4] for r in rows if r[0] == "busy")
    new = rows[0][4]
    result = {"cpu": hardware.cpu_model(), "model": args.model, "cpus": len(cpus),
              "busy_default": {"threads": auto[0], "source": auto[1]},
              "rows": [dict(zip(("box", "threads_from", "threads", "pp_tps", "tg_tps"), r)) for r in rows],
              "new_default_vs_best": new / best}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  {result['cpu']}  {args.model}  "
          f"hog on CPU {cpus[-1]}; new default: {auto[1]}")
    print(f"| box | threads | count | pp{args.pp} tok/s | tg{args.tg} tok/s |")
    print("|---|---|---:|---:|---:|")
    for box, label, t, pp, tg in rows:
        print(f"| {box} | {label} | {t} | {pp:.1f} | {tg:.1f} |")
    print(f"new default / best on the busy box: {new / best:.2f} (target >= 0.90)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
