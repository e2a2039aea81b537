#!/usr/bin/env python
"""Speculative decoding against plain decoding, on two tasks:

- edit: about 40 lines of Python in the prompt, and the request to return
  the same code with one function renamed (the answer repeats the prompt
  but for two names, which prompt lookup drafts well);
- chat: a free-form question (little to look up).

For each model and task it runs speculative off, lookup and auto in turn,
--reps times, greedy, and prints decode tok/s (DoneEvent.stats.decode_tps,
first token to last), the share of drafted tokens accepted, the speed-up
over off, and whether the answer is the same as off's. A fourth mode,
"plain chain", is off with the repeat penalty the model's defaults carry
turned off (repeat_penalty 1.0): off over it is what the default sampling
chain costs (on non-repetitive text the answer is the same).

The modes alternate in one engine, so drift on the box hits them alike.

    python scripts/bench_speculative.py --threads 2
    python scripts/bench_speculative.py --model qwen2.5-coder-1.5b-instruct --draft qwen2.5-coder-0.5b-instruct
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import edgeinfer
from edgeinfer import hardware

FUNCTIONS = """\
def parse_record(line, separator=","):
    fields = line.strip().split(separator)
    record = {"name": fields[0], "count": int(fields[1])}
    return record


def load_records(path, separator=","):
    records = []
    with open(path) as handle:
        for line in handle:
            if line.strip():
                records.append(parse_record(line, separator))
    return records


def total_count(records):
    total = 0
    for record in records:
        total += record["count"]
    return total


def top_records(records, limit=3):
    ordered = sorted(records, key=lambda record: record["count"], reverse=True)
    return ordered[:limit]


def summarize(path, separator=","):
    records = load_records(path, separator)
    best = top_records(records)
    names = [record["name"] for record in best]
    return {"total": total_count(records), "top": names}


if __name__ == "__main__":
    print(summarize("counts.csv"))
"""

TASKS = {
    "edit": "Rename the function `total_count` to `sum_counts` in this code. Reply with the whole "
            "changed code only.\n\n```python\n" + FUNCTIONS + "```",
    "chat": "Tell me about the history of lighthouses and the people who kept them.",
}
MODES = ("off", "lookup", "auto", "plain chain")


def run(engine, tokens, mode: str, n: int):
    t0 = time.perf_counter()
    options = {"speculative": "off", "repeat_penalty": 1.0} if mode == "plain chain" else {"speculative": mode}
    events = list(engine.stream_tokens(tokens, max_tokens=n, temperature=0, **options))
    stats = events[-1].stats
    return "".join(e.text for e in events), stats, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", help="repeatable; default smollm2-135m-instruct")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--tokens", type=int, default=256, help="most new tokens per answer")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--draft", help="also a draft model for each target (e.g. qwen2.5-coder-0.5b-instruct)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    models = args.model or ["smollm2-135m-instruct"]
    rows = []
    for model in models:
        extra = {"draft": args.draft, "speculative": "auto"} if args.draft else {}
        try:
            engine = edgeinfer.load(model, threads=args.threads, prompt_cache=False, **extra)
        except edgeinfer.VocabularyMismatchError as e:   # --draft fits some targets, not all
            print(f"# no draft for {model}: {e}", flush=True)
            extra = {}
            engine = edgeinfer.load(model, threads=args.threads, prompt_cache=False)
        modes = MODES + (("draft",) if extra else ())
        with engine:
            head = (f"# {hardware.cpu_model()}, {engine.threads} threads, native {engine.native.setting}, "
                    f"{engine.name}, up to {args.tokens} tokens, median of {args.reps}")
            if not args.json:
                print(head, flush=True)
            for task, prompt in TASKS.items():
                tokens = engine.chat_tokens([{"role": "user", "content": prompt}])
                run(engine, tokens, "off", 8)   # warm up
                results = {m: [] for m in modes}
                for _ in range(args.reps):
                    for mode in modes:   # interleaved, so drift on the box hits every mode alike
                        results[mode].append(run(engine, tokens, mode, args.tokens))
                base_text = results["off"][0][0]
                base = statistics.median(s.decode_tps for _, s, _ in results["off"])
                for mode in modes:
                    tps = statistics.median(s.decode_tps for _, s, _ in results[mode])
                    drafted = sum(s.drafted_tokens for _, s, _ in results[mode])
                    accepted = sum(s.accepted_tokens for _, s, _ in results[mode])
                    rows.append({
                        "model": engine.name, "task": task,
                        "mode": f"draft {engine.draft.name}" if mode == "draft" else mode, "prompt_tokens": len(tokens),
                        "generated": results[mode][0][1].generated_tokens, "decode_tps": round(tps, 1),
                        "speedup": round(tps / base, 3) if base else None,
                        "drafted": drafted, "accepted": accepted,
                        "acceptance": round(accepted / drafted, 3) if drafted else None,
                        "same_answer": all(t == base_text for t, _, _ in results[mode]),
                    })
    if args.json:
        print(json.dumps({"machine": hardware.cpu_model(), "rows": rows}, indent=2))
        return
    print("| model | task | mode | tokens | decode tok/s | × off | accepted / drafted | same answer |")
    print("|---|---|---|---:|---:|---:|---|---|")
    for r in rows:
        acc = f"{r['accepted']} / {r['drafted']} ({r['acceptance']:.0%})" if r["drafted"] else "-"
        print(f"| {r['model']} | {r['task']} | {r['mode']} | {r['generated']} | {r['decode_tps']} | "
              f"{r['speedup']} | {acc} | {'yes' if r['same_answer'] else 'no'} |")


if __name__ == "__main__":
    main()
