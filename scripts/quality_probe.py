"""Does a model answer simple questions right, and does it stop?

Asks each question through the chat template with k seeds, for each model
and each sampling variant, and counts per (model, sampling):

- right: the expected answer appears and the answer ended by itself
  (end of turn or a stop), not at max_tokens and not in a loop;
- wrong: it ended by itself without the expected answer;
- ran to max_tokens: it never stopped (usually a loop), whatever it said;
- repetition: the engine ended it as stuck in a loop (finish_reason
  "repetition"; counted apart from max_tokens).

    python scripts/quality_probe.py                                  # the default model, its own sampling
    python scripts/quality_probe.py --model smollm2-135m-instruct --seeds 3 \\
        --sampling default --sampling '{"repeat_penalty": 1.1}' --sampling '{"dry_multiplier": 0.8}'
    python scripts/quality_probe.py --questions 5 --json

``--sampling default`` is the model's own defaults (its catalog entry, else
the engine's); a JSON object adds options over those. Decode tok/s is the
median over the answers; take it from a quiet machine only.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time

import edgeinfer

# (question, a regex that a right answer contains)
QUESTIONS = [
    ("What is the capital of France?", r"\bparis\b"),
    ("What is 2 + 3?", r"\b5\b|\bfive\b"),
    ("How many legs does a spider have?", r"\b8\b|\beight\b"),
    ("What is the capital of Japan?", r"\btokyo\b"),
    ("What color is the sky on a clear day?", r"\bblue\b"),
    ("How many days are there in a week?", r"\b7\b|\bseven\b"),
    ("What is the largest planet in our solar system?", r"\bjupiter\b"),
    ("At how many degrees Celsius does water freeze?", r"\b0\b|\bzero\b"),
    ("Who wrote Romeo and Juliet?", r"\bshakespeare\b"),
    ("What is the capital of Italy?", r"\brome\b|\broma\b"),
]


def judge(answer: str, pattern: str, finish: str) -> str:
    if finish == "length":
        return "ran to max_tokens"
    if finish == "repetition":
        return "repetition"
    return "right" if re.search(pattern, answer, re.IGNORECASE) else "wrong"


def probe(engine, sampling: dict, questions, seeds: int, max_tokens: int, log=None) -> dict:
    counts = {"right": 0, "wrong": 0, "ran to max_tokens": 0, "repetition": 0}
    speeds, answers = [], []
    for q, pattern in questions:
        for seed in range(seeds):
            events = list(engine.stream_chat([{"role": "user", "content": q}], max_tokens=max_tokens,
                                             seed=1000 + seed, **sampling))
            text = "".join(e.text for e in events)
            st = events[-1].stats
            verdict = judge(text, pattern, st.finish_reason)
            counts[verdict] += 1
            if st.decode_tps:
                speeds.append(st.decode_tps)
            answers.append({"question": q, "seed": 1000 + seed, "verdict": verdict,
                            "finish": st.finish_reason, "answer": text})
            if log:
                log(f"  {verdict:>17}  {q}  {text.strip()[:70]!r}")
    return {"counts": counts, "total": sum(counts.values()),
            "decode_tps": statistics.median(speeds) if speeds else 0.0, "answers": answers}


def parse_sampling(spec: str) -> dict:
    if spec == "default":
        return {}
    try:
        d = json.loads(spec)
    except ValueError:
        raise SystemExit(f"--sampling takes 'default' or a JSON object, not {spec!r}") from None
    if not isinstance(d, dict):
        raise SystemExit(f"--sampling takes a JSON object, not {spec!r}")
    return d


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", help="a store name or GGUF path (repeatable); "
                                                     "default: this machine's default model")
    ap.add_argument("--sampling", action="append", help="'default' or a JSON object (repeatable)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--questions", type=int, default=len(QUESTIONS), help="the first N questions")
    ap.add_argument("--max-tokens", type=int, default=200)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("-v", "--verbose", action="store_true", help="print every answer")
    args = ap.parse_args()
    models = args.model or [edgeinfer.default_model().entry.ref]
    variants = [parse_sampling(s) for s in (args.sampling or ["default"])]
    questions = QUESTIONS[:args.questions]
    log = (lambda m: print(m, file=sys.stderr, flush=True)) if args.verbose else None
    rows = []
    for model in models:
        kw = {"threads": args.threads} if args.threads else {}
        with edgeinfer.load(model, **kw) as engine:
            for extra in variants:
                t0 = time.perf_counter()
                r = probe(engine, extra, questions, args.seeds, args.max_tokens, log)
                rows.append({"model": engine.name, "sampling": {**engine.sampling, **extra}, "extra": extra,
                             "seconds": time.perf_counter() - t0, **r})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{len(questions)} questions x {args.seeds} seeds, max_tokens {args.max_tokens}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print("| model | sampling over the model's defaults | right | wrong | ran to max_tokens | repetition "
          "| decode tok/s |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        c, n = r["counts"], r["total"]
        extra = json.dumps(r["extra"]) if r["extra"] else "its defaults"
        print(f"| {r['model']} | {extra} | {c['right']}/{n} | {c['wrong']}/{n} | {c['ran to max_tokens']}/{n} "
              f"| {c['repetition']}/{n} | {r['decode_tps']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
