"""What the native self-test costs, and what each native setting is worth.

For each model (default: the catalog's default model; it must be in the
store), with a self-test record of its own in a temporary directory:

- the load time at the first load (self-test child included) and at a
  later load (the record read), median of --reps;
- the vocabulary-only check that `edgeinfer import` runs;
- with --settings, prefill and decode tok/s (llama-bench style pp/tg, as
  `edgeinfer bench`) under every native setting that passes the self-test
  for the model here; a setting that crashes is reported, not measured.

    python scripts/bench_selftest.py
    python scripts/bench_selftest.py --model qwen2.5-coder-1.5b-instruct --settings --json

Run it on a quiet machine: the figures are wall-clock times.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import edgeinfer
from edgeinfer import hardware, native, selftest, tuning


def timed_load(path, manifest, **kw) -> tuple[float, "edgeinfer.Engine"]:
    t0 = time.perf_counter()
    engine = edgeinfer.Engine(path, name=manifest.ref if manifest else None,
                              sha256=manifest.sha256 if manifest else None, prompt_cache=False, **kw)
    return time.perf_counter() - t0, engine


def bench_model(name: str, reps: int, settings: bool, n_prompt: int, n_gen: int) -> dict:
    path, manifest = edgeinfer.resolve_model(name)
    first, later, child, vocab = [], [], [], []
    out: dict = {"model": manifest.ref if manifest else str(path), "size": path.stat().st_size}
    for _ in range(reps):
        selftest.forget()
        t, e = timed_load(path, manifest)
        first.append(t)
        child.append(e.native.seconds)
        out["chosen"] = e.native.to_dict()
        e.close()
        t, e = timed_load(path, manifest)
        assert e.native.source == "record"
        later.append(t)
        e.close()
        t0 = time.perf_counter()
        selftest.check_file(path)
        vocab.append(time.perf_counter() - t0)
    out["first_load_s"] = statistics.median(first)
    out["selftest_s"] = statistics.median(child)
    out["later_load_s"] = statistics.median(later)
    out["vocab_check_s"] = statistics.median(vocab)
    if settings:
        out["settings"] = []
        for s in native.ladder():
            row = {"setting": s}
            try:
                _, e = timed_load(path, manifest, native=s, n_ctx=max(1024, n_prompt + n_gen + 8))
            except edgeinfer.EngineError as err:  # the forced setting crashed its test child
                row["crashed"] = str(err)
                out["settings"].append(row)
                continue
            try:
                pre, dec = tuning.measure(e, n_prompt, n_gen, reps)
                row.update(pp=statistics.median(pre), tg=statistics.median(dec),
                           repacked=e._mparams.repacked, threads=e.threads)
            finally:
                e.close()
            out["settings"].append(row)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", help="a store name or GGUF path (repeatable)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--settings", action="store_true", help="also measure pp/tg under every setting")
    ap.add_argument("--pp", type=int, default=512)
    ap.add_argument("--tg", type=int, default=128)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    models = args.model or [edgeinfer.default_entry().ref]
    # A record of our own, so the user's is left as it was. The store stays.
    home = os.environ.get("EDGEINFER_HOME")
    real = Path(home) if home else edgeinfer.paths.home()
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        for child in ("blobs", "manifests"):
            if (real / child).exists():
                (scratch / child).symlink_to(real / child)
        os.environ["EDGEINFER_HOME"] = str(scratch)
        results = [bench_model(m, args.reps, args.settings, args.pp, args.tg) for m in models]
    head = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": hardware.cpu_model(),
            "python": platform.python_version(), "llama_cpp_python": native.build_id()["llama_cpp_python"],
            "extra_buffer_types": list(native.extra_buffer_types()), "ladder": native.ladder(),
            "amx_on_cpu_and_build": native.amx_on_cpu_and_build(), "load": os.getloadavg()}
    if args.json:
        print(json.dumps({**head, "models": results}, indent=2))
        return 0
    print(f"{head['date']}  {head['cpu']}  llama-cpp-python {head['llama_cpp_python']}  "
          f"extra buffer types: {', '.join(head['extra_buffer_types']) or 'none'}  "
          f"load {head['load'][0]:.2f}")
    print("| model | chosen | first load (self-test) | later load | vocabulary check |")
    print("|---|---|---:|---:|---:|")
    for r in results:
        print(f"| {r['model']} | {r['chosen']['setting']} | {r['first_load_s'] * 1000:.0f} ms "
              f"({r['selftest_s'] * 1000:.0f} ms) | {r['later_load_s'] * 1000:.0f} ms | "
              f"{r['vocab_check_s'] * 1000:.0f} ms |")
    for r in results:
        if "settings" in r:
            print(f"\n{r['model']}, pp{args.pp} / tg{args.tg}, median of {args.reps}:")
            print("| setting | pp tok/s | tg tok/s | weights in CPU_REPACK |")
            print("|---|---:|---:|---:|")
            for row in r["settings"]:
                if "crashed" in row:
                    print(f"| {row['setting']} | crashed its test child | | |")
                else:
                    print(f"| {row['setting']} | {row['pp']:.1f} | {row['tg']:.1f} | {row['repacked']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
