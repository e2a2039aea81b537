#!/usr/bin/env python
"""Tool calling: how well each chat model calls tools through
Engine.chat, and what the grammar that holds a call to its schema costs
per token.

* Cases: 19 requests of its own over six tools (weather, add, multiply, a
  unit converter, a calendar event with a nested object, enums and
  patterns, a web search), of these kinds: one call needed; no call needed
  (small talk, a question the model knows); parallel calls (two cities in
  one question); tool_choice "required"; a named tool_choice; and
  multi-turn, where a tool result is in the conversation and the next step
  is an answer that uses it or, chained, a second call. Every case is
  greedy (temperature 0) and offers all six tools. Per model the table
  shows: the right function(s) called, where a call is needed; calls whose
  arguments validate against the tool's JSON schema (jsonschema; anything
  under 100 % is a bug in edgeinfer, and is printed loudly with its case);
  right no-call decisions (a call written as plain text, which no client
  could run, is a call here); the right argument values, where the case
  states them (strings compared case-insensitively); right answers, where
  the case says what one contains (the tool's result in the model's own
  words, not an echo of it; a fact); and the mean time per case. The tools' prefix is warmed
  into the prompt cache first (memory only), as a server would have it;
  --cold prefills every case from scratch.
* Grammar cost: decode tok/s of a "required" call to a tool with a long
  free-text parameter (up to --gen-tokens tokens, greedy, nothing ignored)
  against plain generation of as many tokens by the same request without
  tools. Each side runs in processes of its own (a warm-up, then --reps
  timed runs), alternating which goes first, --rounds times; speculative
  decoding and the repetition stop are off on both sides. The table shows
  medians with min-max, and the ratio grammar / plain (median over rounds
  of each round's ratio).

    python scripts/bench_tools.py                                  # the catalog's chat models in the store
    python scripts/bench_tools.py --model smollm2-135m-instruct --rounds 1
    python scripts/bench_tools.py --model qwen2.5-coder-1.5b-instruct --no-grammar -v
    python scripts/bench_tools.py --no-cases --rounds 5 --json > tools.json
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import edgeinfer  # noqa: E402
from edgeinfer import hardware  # noqa: E402


# -- the tools ---------------------------------------------------------------------
def tool(name: str, description: str, properties: dict, required: list[str], **extra) -> dict:
    return {"type": "function", "function": {
        "name": name, "description": description,
        "parameters": {"type": "object", "properties": properties, "required": required, **extra}}}


NUMBER = {"type": "number"}
UNITS = ["meter", "kilometer", "mile", "foot", "inch", "centimeter", "kilogram", "pound", "celsius", "fahrenheit"]
TOOLS = [
    tool("get_weather", "Get the current weather in a city.",
         {"city": {"type": "string", "description": "the city's name, e.g. Lisbon"},
          "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
         ["city"]),
    tool("add", "Add two numbers.", {"a": NUMBER, "b": NUMBER}, ["a", "b"]),
    tool("multiply", "Multiply two numbers.", {"a": NUMBER, "b": NUMBER}, ["a", "b"]),
    tool("convert_units", "Convert a quantity from one unit to another.",
         {"value": NUMBER, "from_unit": {"type": "string", "enum": UNITS},
          "to_unit": {"type": "string", "enum": UNITS}},
         ["value", "from_unit", "to_unit"]),
    tool("create_event", "Create an event in the user's calendar.",
         {"title": {"type": "string"},
          "start": {"type": "object",
                    "properties": {"date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$",
                                            "description": "YYYY-MM-DD"},
                                   "time": {"type": "string", "pattern": "^[0-9]{2}:[0-9]{2}$",
                                            "description": "HH:MM, 24-hour clock"}},
                    "required": ["date", "time"], "additionalProperties": False},
          "duration_minutes": {"type": "integer"},
          "attendees": {"type": "array", "items": {"type": "string", "description": "an email address"}},
          "priority": {"type": "string", "enum": ["low", "normal", "high"]}},
         ["title", "start", "duration_minutes"], additionalProperties=False),
    tool("web_search", "Search the web and return the top results.",
         {"query": {"type": "string"}, "max_results": {"type": "integer"}},
         ["query"]),
]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}

# The grammar-cost request: a call whose one long string is most of it.
NOTE_TOOL = tool("save_note", "Save a note in the user's notebook.",
                 {"title": {"type": "string"}, "body": {"type": "string", "description": "the note's whole text"}},
                 ["title", "body"])
NOTE_ASK = ("Write a detailed note of about 250 words on how to look after a sourdough starter: feeding, "
            "temperature, storage, and the signs that something is wrong. Save it in my notebook.")


# -- the cases ---------------------------------------------------------------------
class Has(str):
    """An expected string value that need only contain this (any case)."""


class Unordered(dict):
    """Expected arguments whose values may come in any order (a + b = b + a)."""


@dataclass
class Case:
    id: str
    kind: str                       # single, none, parallel, required, named, answer, chain
    messages: list[dict]
    calls: list[tuple[str, dict | None]] = field(default_factory=list)   # wanted; [] for no call
    choice: str | dict | None = None    # tool_choice; None is "auto"
    parallel: bool = True               # parallel_tool_calls (the engine's default)
    says: tuple[str, ...] = ()          # a right answer contains one of these (the result, a fact)


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def after_call(question: str, name: str, arguments: dict, result) -> list[dict]:
    """A conversation in which ``name`` was called and answered. The
    Engine takes a call's arguments as an object (as Reply gives them);
    JSON text, OpenAI's wire form, is for the server's faces."""
    return [{"role": "user", "content": question},
            {"role": "assistant", "content": "",
             "tool_calls": [{"id": "call_1", "type": "function",
                             "function": {"name": name, "arguments": arguments}}]},
            {"role": "tool", "tool_call_id": "call_1", "name": name,
             "content": result if isinstance(result, str) else json.dumps(result)}]


def named(name: str) -> dict:
    return {"type": "function", "function": {"name": name}}


CASES = [
    Case("weather", "single", user("What's the weather like in Paris right now?"),
         [("get_weather", {"city": "Paris"})]),
    Case("add", "single", user("Use the calculator: what is 1234 plus 5678?"),
         [("add", Unordered(a=1234, b=5678))]),
    Case("multiply", "single", user("Multiply 37 by 12 for me."),
         [("multiply", Unordered(a=37, b=12))]),
    Case("convert", "single", user("Convert 5 miles to kilometers."),
         [("convert_units", {"value": 5, "from_unit": "mile", "to_unit": "kilometer"})]),
    Case("event", "single", user("Put a meeting called 'Budget review' in my calendar on 2025-03-14 at 10:00 "
                                 "for 30 minutes, with alice@example.com."),
         [("create_event", {"title": "Budget review", "start": {"date": "2025-03-14", "time": "10:00"},
                            "duration_minutes": 30})]),
    Case("search", "single", user("Search the web for the latest release notes of the Rust language."),
         [("web_search", {"query": Has("rust")})]),
    Case("hello", "none", user("Hi there! How are you today?")),
    Case("capital", "none", user("What is the capital of France? Answer in one word."), says=("paris",)),
    Case("haiku", "none", user("Write a haiku about autumn leaves.")),
    Case("two-cities", "parallel", user("What's the weather in Paris and in Tokyo?"),
         [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Tokyo"})]),
    Case("sum-and-product", "parallel", user("Calculate both: 3 plus 4, and 6 times 7."),
         [("add", Unordered(a=3, b=4)), ("multiply", Unordered(a=6, b=7))]),
    Case("umbrella", "required", user("Should I bring an umbrella in London today?"),
         [("get_weather", {"city": "London"})], choice="required"),
    Case("inches", "required", user("How many centimeters are 3 inches?"),
         [("convert_units", {"value": 3, "from_unit": "inch", "to_unit": "centimeter"})], choice="required"),
    Case("world-cup", "named", user("Who won the 2022 football World Cup?"),
         [("web_search", {"query": Has("world cup")})], choice=named("web_search")),
    Case("rome", "named", user("I am flying to Rome tomorrow."),
         [("get_weather", {"city": "Rome"})], choice=named("get_weather")),
    Case("weather-answer", "answer",
         after_call("What's the weather in Paris?", "get_weather", {"city": "Paris"},
                    {"city": "Paris", "temperature_c": 18, "condition": "sunny"}),
         says=("18",)),
    Case("sum-answer", "answer",
         after_call("What is 1234 plus 5678?", "add", {"a": 1234, "b": 5678}, {"result": 6912}),
         says=("6912", "6,912")),
    Case("search-then-weather", "chain",
         after_call("Find out which city hosted the 2024 Summer Olympics, then get the weather there.",
                    "web_search", {"query": "2024 Summer Olympics host city"},
                    "The 2024 Summer Olympics were held in Paris, France, from 26 July to 11 August 2024."),
         [("get_weather", {"city": "Paris"})]),
    Case("convert-then-add", "chain",
         after_call("Convert 10 miles to kilometers, then add 5 to the result with the calculator.",
                    "convert_units", {"value": 10, "from_unit": "mile", "to_unit": "kilometer"},
                    {"value": 16.09, "unit": "kilometer"}),
         [("add", Unordered(a=16.09, b=5))]),
]


# -- judging a reply ---------------------------------------------------------------
def same(want, got) -> bool:
    """``got`` (a call's argument) is the value the case states."""
    if isinstance(want, Has):
        return isinstance(got, str) and want.lower() in got.lower()
    if isinstance(want, str):
        return isinstance(got, str) and got.strip().lower() == want.lower()
    if isinstance(want, (int, float)):
        return isinstance(got, (int, float)) and not isinstance(got, bool) and \
            math.isclose(got, want, rel_tol=1e-3, abs_tol=1e-9)
    if isinstance(want, Unordered):
        return isinstance(got, dict) and all(k in got for k in want) and any(
            all(same(w, got[k]) for w, k in zip(want.values(), keys)) for keys in itertools.permutations(want))
    if isinstance(want, dict):
        return isinstance(got, dict) and all(k in got and same(v, got[k]) for k, v in want.items())
    return want == got


def schema_errors(name: str, arguments) -> list[str]:
    from jsonschema import Draft202012Validator

    if name not in SCHEMAS:
        return [f"{name} is not one of the tools"]
    return [f"{'/'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}"
            for e in Draft202012Validator(SCHEMAS[name]).iter_errors(arguments)]


TEXT_CALL = re.compile(r'"name"\s*:\s*"(?:' + "|".join(SCHEMAS) + r')"\s*,\s*"arguments"')


def own_words(case: Case, content: str) -> str:
    """An answer less any copy of the tool's result (a small model may
    echo the ``<tool_response>`` block back), lower-cased."""
    text = re.sub(r"<tool_response>.*?(</tool_response>|$)", " ", content, flags=re.S)
    for m in case.messages:
        if m["role"] == "tool":
            text = text.replace(m["content"], " ")
    return text.lower()


def judge(case: Case, reply, seconds: float) -> dict:
    made = [(c.name, c.arguments) for c in reply.tool_calls]
    row = {"case": case.id, "kind": case.kind, "seconds": round(seconds, 3),
           "calls": [{"name": n, "arguments": a} for n, a in made],
           "content": reply.content, "finish_reason": reply.finish_reason,
           "generated_tokens": reply.stats.generated_tokens if reply.stats else None,
           "invalid": [f"{n}({json.dumps(a, ensure_ascii=False)}): {err}"
                       for n, a in made for err in schema_errors(n, a)]}
    # A call the model wrote in a form the parser does not take ({{"name": ...}} as in Qwen2.5's
    # template text, or bare JSON): no client can run it, yet the model chose to call.
    text_call = bool(TEXT_CALL.search(reply.content))
    if "<tool_call>" in reply.content:
        row["note"] = "a <tool_call> left in the content"
    elif text_call:
        row["note"] = "a call written as text, not in the call format"
    if case.calls:
        row["called_right"] = sorted(n for n, _ in made) == sorted(n for n, _ in case.calls)
        if any(args is not None for _, args in case.calls):
            left = list(made)
            ok = row["called_right"]
            for name, args in case.calls:
                hit = next((m for m in left if m[0] == name and (args is None or same(args, m[1]))), None)
                ok = ok and hit is not None
                if hit is not None:
                    left.remove(hit)
            row["values_right"] = ok
    else:
        row["no_call_right"] = not made and not text_call
    if case.says:
        row["answer_right"] = row["no_call_right"] and any(s.lower() in own_words(case, reply.content)
                                                           for s in case.says)
    return row


def run_cases(engine, cases: list[Case], max_tokens: int, warm: bool, log) -> list[dict]:
    if warm:   # the tools' prefix into the prompt cache, as a server that has seen them holds it
        engine.chat(user("Hello"), tools=TOOLS, temperature=0, max_tokens=1)
    rows = []
    for case in cases:
        t0 = time.perf_counter()
        reply = engine.chat(case.messages, tools=TOOLS, tool_choice=case.choice,
                            parallel_tool_calls=case.parallel, temperature=0, max_tokens=max_tokens)
        row = judge(case, reply, time.perf_counter() - t0)
        rows.append(row)
        log(f"  {case.id:<20} {row['seconds']:6.2f} s  {verdict(row)}")
    return rows


def verdict(row: dict) -> str:
    calls = ", ".join(f"{c['name']}({json.dumps(c['arguments'], ensure_ascii=False)})" for c in row["calls"])
    marks = [k for k in ("called_right", "values_right", "no_call_right", "answer_right") if row.get(k) is False]
    said = row["content"].strip().replace("\n", " ")
    what = calls or f"text {said[:70]!r}"
    status = ("MISS " + ",".join(marks)) if marks else "ok"
    if row["invalid"]:
        status += " INVALID " + "; ".join(row["invalid"])
    note = f" ({row['note']})" if row.get("note") else ""
    return f"{status}  [{row['finish_reason']}] {what}{note}"


def share(rows: list[dict], key: str) -> tuple[int, int]:
    seen = [r[key] for r in rows if key in r]
    return sum(seen), len(seen)


def summary(rows: list[dict]) -> dict:
    n_calls = sum(len(r["calls"]) for r in rows)
    n_invalid = sum(1 for r in rows for c in r["calls"] if schema_errors(c["name"], c["arguments"]))
    out = {key: share(rows, key) for key in ("called_right", "values_right", "no_call_right", "answer_right")}
    out["valid_calls"] = (n_calls - n_invalid, n_calls)
    out["mean_seconds"] = statistics.mean(r["seconds"] for r in rows) if rows else 0.0
    out["missed"] = [r["case"] for r in rows if any(r.get(k) is False for k in
                                                    ("called_right", "values_right", "no_call_right", "answer_right"))]
    out["invalid"] = [(r["case"], e) for r in rows for e in r["invalid"]]
    return out


# -- the grammar's cost ------------------------------------------------------------
def measure_side(side: str, model: str, threads: int, reps: int, n: int) -> dict:
    """One side in this process: one warm-up, then ``reps`` timed runs.
    grammar: a "required" call to save_note; plain: the same request
    without tools, for ``n`` tokens (nothing ignored, unless it ends
    before ``n``: then past its end, and the answer says so)."""
    engine = edgeinfer.load(model, threads=threads, threads_batch=threads, prompt_cache=False,
                            speculative="off", stop_on_repeat=False)
    ignore_eos = False

    def once():
        if side == "grammar":
            return engine.chat(user(NOTE_ASK), tools=[NOTE_TOOL], tool_choice="required",
                               temperature=0, max_tokens=n).stats
        events = list(engine.stream_chat(user(NOTE_ASK), temperature=0, max_tokens=n, ignore_eos=ignore_eos))
        return events[-1].stats

    with engine:
        first = once()   # warm-up
        if side == "plain" and first.generated_tokens < n:
            ignore_eos = True
            once()
        runs = [once() for _ in range(reps)]
        return {"side": side, "model": engine.name, "threads": engine.threads, "native": engine.native.setting,
                "prompt_tokens": runs[0].prompt_tokens, "generated": [s.generated_tokens for s in runs],
                "finish_reason": runs[0].finish_reason, "ignore_eos": ignore_eos,
                "decode_tps": [s.decode_tps for s in runs], "total_s": [s.total_s for s in runs]}


def grammar_cost(model: str, args, log) -> dict:
    """Each side in its own processes, alternating, ``args.rounds`` times."""
    sides: dict[str, list[dict]] = {"grammar": [], "plain": []}
    n = None
    for rnd in range(args.rounds):
        order = ("grammar", "plain") if rnd % 2 == 0 else ("plain", "grammar")   # round 1 learns n first
        for side in order:
            log(f"  grammar cost, round {rnd + 1}/{args.rounds}: {side} in its own process ...")
            cmd = [sys.executable, str(Path(__file__).resolve()), "--only", side, "--model", model,
                   "--threads", str(args.threads), "--reps", str(args.reps),
                   "--gen-tokens", str(n or args.gen_tokens)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                log(proc.stderr[-3000:])
                raise SystemExit(f"the {side} process for {model} failed with status {proc.returncode}")
            out = json.loads(proc.stdout.strip().splitlines()[-1])
            if side == "grammar":
                if n is None:
                    n = out["generated"][0]
                elif out["generated"][0] != n:
                    log(f"  note: the grammar side made {out['generated'][0]} tokens this time, not {n}")
            sides[side].append(out)
    per_round = [g_med / p_med for g, p in zip(sides["grammar"], sides["plain"])
                 if (g_med := statistics.median(g["decode_tps"])) and (p_med := statistics.median(p["decode_tps"]))]
    result = {"model": sides["grammar"][0]["model"], "gen_tokens": n, "rounds": args.rounds, "reps": args.reps,
              "ratio": statistics.median(per_round) if per_round else None,
              "ratio_rounds": [round(x, 3) for x in per_round]}
    for side, outs in sides.items():
        tps = [x for o in outs for x in o["decode_tps"]]
        result[side] = {"median_tps": statistics.median(tps), "min_tps": min(tps), "max_tps": max(tps),
                        "samples_tps": [round(x, 2) for x in tps], "prompt_tokens": outs[0]["prompt_tokens"],
                        "generated": sorted({g for o in outs for g in o["generated"]}),
                        "finish_reason": outs[0]["finish_reason"],
                        "ignore_eos": any(o["ignore_eos"] for o in outs),
                        "median_total_s": statistics.median(x for o in outs for x in o["total_s"])}
    g, p = result["grammar"]["median_tps"], result["plain"]["median_tps"]
    result["ms_per_token"] = round(1000 / g - 1000 / p, 3) if g and p else None
    return result


# -- the run -----------------------------------------------------------------------
def chat_models(names: list[str] | None) -> tuple[list[str], list[str]]:
    """(models to run, lines saying what was skipped): those named, else
    the catalog's chat models; a model not in the store is skipped."""
    from edgeinfer.store import resolve_model

    wanted = names or [e.ref for e in edgeinfer.load_catalog().values() if not e.embedding]
    run, skipped = [], []
    for name in wanted:
        try:
            resolve_model(name)
        except edgeinfer.EdgeinferError as e:
            skipped.append(f"skipped {name}: {e.one_line()}")
            continue
        run.append(name)
    return run, skipped


def pct(pair: tuple[int, int]) -> str:
    right, n = pair
    return f"{right}/{n} ({100 * right / n:.0f} %)" if n else "-"


def print_report(report: dict) -> None:
    head = f"# {report['cpu']} ({report['cpus']} CPUs), {report['threads']} threads, {report['date']}, " \
           f"load average {report['load_before']} before, {report['load_after']} after"
    for line in report["skipped"]:
        print(f"# {line}")
    if report["cases"]:
        print(head)
        print(f"# {len(CASES)} cases, greedy, max_tokens {report['max_tokens']}, prompt cache "
              f"{'off (cold)' if report['cold'] else 'warm with the tools'}")
        print("| model | right call | valid arguments | right no-call | right values | right answer | s/case |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for model, r in report["cases"].items():
            s = r["summary"]
            print(f"| {model} | {pct(s['called_right'])} | {pct(s['valid_calls'])} | {pct(s['no_call_right'])} "
                  f"| {pct(s['values_right'])} | {pct(s['answer_right'])} | {s['mean_seconds']:.2f} |")
        for model, r in report["cases"].items():
            s = r["summary"]
            if s["missed"]:
                print(f"{model}: missed {', '.join(s['missed'])}")
            for case, err in s["invalid"]:
                print(f"!!! {model}: INVALID ARGUMENTS in case {case}: {err}")
        print()
    if report["grammar"]:
        print(head)
        print(f"# grammar cost: decode tok/s of a 'required' save_note call vs plain generation, each side in "
              f"its own processes, {report['rounds']} rounds x {report['reps']} runs, median (min-max)")
        print("| model | tokens | grammar tok/s | plain tok/s | grammar / plain | ms per token |")
        print("|---|---:|---:|---:|---:|---:|")
        for g in report["grammar"]:
            a, b = g["grammar"], g["plain"]
            print(f"| {g['model']} | {g['gen_tokens']} | {a['median_tps']:.1f} ({a['min_tps']:.1f}-{a['max_tps']:.1f}) "
                  f"| {b['median_tps']:.1f} ({b['min_tps']:.1f}-{b['max_tps']:.1f}) | {g['ratio']:.3f} "
                  f"| {g['ms_per_token']:+.2f} |")
        for g in report["grammar"]:
            notes = [f"ratio per round {g['ratio_rounds']}"]
            if g["plain"]["ignore_eos"]:
                notes.append("plain generation ended early and ran on past its end (ignore_eos)")
            if len(g["grammar"]["generated"]) > 1 or g["grammar"]["generated"] != g["plain"]["generated"]:
                notes.append(f"token counts: grammar {g['grammar']['generated']}, plain {g['plain']['generated']}")
            print(f"{g['model']}: " + "; ".join(notes))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="examples:\n" + __doc__.rsplit("\n\n", 1)[1])
    ap.add_argument("--model", action="append",
                    help="a store name or GGUF path (repeatable; default: the catalog's chat models in the store)")
    ap.add_argument("--threads", type=int, default=hardware.default_threads(),
                    help="threads for prefill and decode (default: %(default)s, the physical cores)")
    ap.add_argument("--max-tokens", type=int, default=192, help="most new tokens per case (default: 192)")
    ap.add_argument("--cold", action="store_true", help="no prompt cache: every case prefills from scratch")
    ap.add_argument("--gen-tokens", type=int, default=128,
                    help="most tokens of the grammar-cost generation (default: 128)")
    ap.add_argument("--rounds", type=int, default=3, help="grammar cost: process pairs (default: 3)")
    ap.add_argument("--reps", type=int, default=3, help="grammar cost: timed runs per process (default: 3)")
    ap.add_argument("--no-cases", action="store_true", help="skip the cases")
    ap.add_argument("--no-grammar", action="store_true", help="skip the grammar cost")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument("-v", "--verbose", action="store_true", help="log every case's verdict to stderr")
    ap.add_argument("--only", choices=("grammar", "plain"), help=argparse.SUPPRESS)   # a grammar-cost child
    args = ap.parse_args(argv)
    if min(args.threads, args.rounds, args.reps, args.gen_tokens, args.max_tokens) < 1:
        ap.error("--threads, --rounds, --reps, --gen-tokens and --max-tokens must be >= 1")
    if args.only:
        print(json.dumps(measure_side(args.only, args.model[0], args.threads, args.reps, args.gen_tokens)))
        return 0

    def log(msg: str, always: bool = False) -> None:
        if always or args.verbose:
            print(msg, file=sys.stderr, flush=True)

    models, skipped = chat_models(args.model)
    for line in skipped:
        log(line, always=True)
    report = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
              "cpu": hardware.cpu_model(), "cpus": os.cpu_count(), "threads": args.threads,
              "load_before": [round(x, 2) for x in os.getloadavg()], "skipped": skipped,
              "max_tokens": args.max_tokens, "cold": args.cold, "rounds": args.rounds, "reps": args.reps,
              "cases": {}, "grammar": []}
    for model in models:
        if not args.no_cases:
            log(f"{model}: {len(CASES)} cases ...", always=True)
            with edgeinfer.load(model, threads=args.threads, threads_batch=args.threads,
                                prompt_cache=not args.cold, cache_disk=False) as engine:
                rows = run_cases(engine, CASES, args.max_tokens, warm=not args.cold, log=log)
                name = engine.name
            s = summary(rows)
            for case, err in s["invalid"]:
                log(f"!!! {name}: INVALID ARGUMENTS in case {case}: {err}", always=True)
            report["cases"][name] = {"summary": s, "rows": rows}
        if not args.no_grammar:
            log(f"{model}: grammar cost ...", always=True)
            report["grammar"].append(grammar_cost(model, args, log=lambda m: log(m, always=True)))
    report["load_after"] = [round(x, 2) for x in os.getloadavg()]
    if args.json:
        print(json.dumps(report, indent=2, ensure_ascii=False))
    else:
        print_report(report)
    # An invalid call is edgeinfer's bug, never the model's: fail the run.
    return 1 if any(r["summary"]["invalid"] for r in report["cases"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
