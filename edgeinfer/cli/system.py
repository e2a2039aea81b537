"""Machine and runtime commands: doctor, tune, bench, cache."""

from __future__ import annotations

import json
import resource
import statistics
import sys
import time
from pathlib import Path

import click

from .. import hardware, prompt_cache, settings, tuning
from ..errors import EdgeinferError
from ..fit import box_profile
from ..progress import human_bytes
from .models import _params


def _gb(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**30:.1f} GiB"


def _throttle_line(t: dict | None) -> str:
    if t is None:
        return "not reported by this machine"
    now = ", ".join(t["now"]) or "none now"
    since = f"; since boot: {', '.join(t['since_boot'])}" if t["since_boot"] else ""
    return f"{now}{since} ({t['source']})"


def _native_report() -> dict:
    """What the self-test learned on this machine, as data."""
    from .. import native, selftest

    rec = selftest.load_record()
    forced = None
    try:
        forced = native.forced_setting()
    except ValueError as e:
        forced = f"invalid: {e}"
    return {
        "machine_id": native.machine_id(), "llama_cpp_python": native.build_id()["llama_cpp_python"],
        "extra_buffer_types": list(native.extra_buffer_types()), "ladder": native.ladder(),
        "amx_on_cpu_and_build": native.amx_on_cpu_and_build(), "forced": forced,
        "record": str(selftest.record_path()),
        "models": [{"model": v.get("name"), "key": k, "setting": v.get("setting"), "passed": v.get("passed"),
                    "trials": v.get("trials", [])} for k, v in rec["models"].items()],
        "refused": [{"model": v.get("name"), "key": k, "trials": v.get("trials", [])}
                    for k, v in rec["refused"].items()],
        "crashed": rec["crashed"],
    }


def _verdict_line(setting: str, trials: list[dict]) -> str:
    from ..selftest import Verdict

    return Verdict(setting, "record", _trials(trials)).summary()


def _rerun_selftest(models: tuple[str, ...]) -> list[dict]:
    """Forget this machine's record and test each model again."""
    from .. import resolve_model, selftest
    from ..store import ModelStore

    before = selftest.load_record()
    # A store model by its name; a bare file by the path in its key.
    names = list(models) or [k[5:].rsplit(":", 2)[0] if k.startswith("file:") else v.get("name")
                             for k, v in (*before["models"].items(), *before["refused"].items())]
    store = ModelStore()
    names = [n for n in dict.fromkeys(names) if n]
    if not names:
        from .. import catalog

        default = catalog.default_entry().ref
        if store.get(default) is None:
            raise click.ClickException(f"no model to test yet - run 'edgeinfer pull {default}' first")
        names = [default]
    selftest.forget()
    out = []
    for n in names:
        try:
            path, m = resolve_model(n, store)
        except EdgeinferError as e:  # a model removed since it was tested
            out.append({"model": n, "error": str(e)})
            continue
        t0 = time.perf_counter()
        try:
            v = selftest.ensure(path, sha256=m.sha256 if m else None, name=m.ref if m else n,
                                threads=hardware.default_threads(), rerun=True)
            out.append({"model": n, **v.to_dict()})
        except (EdgeinferError, OSError) as e:  # refused (GGUFError): reported, so the rest run
            out.append({"model": n, "error": str(e), "seconds": time.perf_counter() - t0})
    return out


@click.command("doctor")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--selftest", "rerun", is_flag=True,
              help="Run the native self-test again (for MODELS, else every model tested here).")
@click.argument("models", nargs=-1)
def doctor_cmd(as_json, rerun, models):
    """Show what this machine has and what edgeinfer will do by default.

    \b
    The native self-test runs by itself at the first load of each model;
    --selftest forgets what it learned on this machine and runs it again:
      edgeinfer doctor --selftest
    """
    if models and not rerun:
        raise click.UsageError("MODELS are for --selftest: edgeinfer doctor --selftest MODEL")
    retested = _rerun_selftest(models) if rerun else None
    d = hardware.describe()
    profiles = [p for p in tuning.list_profiles() if p.fingerprint == d["fingerprint"]]
    d["profiles"] = [{"model": p.model, "threads": p.threads, "threads_batch": p.threads_batch}
                     for p in profiles]
    d["native"] = _native_report()
    from .. import rpc

    d["rpc"] = rpc.status()
    if retested is not None:
        d["native"]["retested"] = retested
    box = box_profile()
    d["defaults"] = {"profile": box.name, "n_ctx": box.n_ctx, "max_parallel": box.max_parallel,
                     "kv_type": box.kv_type, "why": box.why}
    # What a load of an untuned model would use now: the engine's own pure
    # function, given what this machine reports.
    busy = hardware.busy_cores()
    load = settings.resolve(box=box, train_ctx=None, cores=d["default_threads"], busy=busy,
                            usable=hardware.usable_cores())
    d["load"] = load.describe()
    if as_json:
        click.echo(json.dumps(d, indent=2))
        return
    # A cluster's key is its maximum frequency in kHz, or Arm's cpu_capacity (at most 1024).
    clusters = ", ".join(f"{len(c)} × {int(f) / 1e6:.2f} GHz" if int(f) > 4096
                         else f"{len(c)} × capacity {f}" if int(f) else f"{len(c)} cores"
                         for f, c in d["clusters"].items())
    rows = [
        ("cpu", d["cpu_model"]),
        *([("board", d["board"])] if d["board"] else []),
        ("cores", f"{d['physical_cores']} physical, {d['logical_cpus']} logical; "
                  f"allowed CPUs {','.join(map(str, d['affinity']))}"),
        ("clusters", clusters + (" (big.LITTLE)" if d["big_little"] else "")),
        ("cpu quota", f"{d['cgroup_cpu_quota']:.2f} CPUs (cgroup)" if d["cgroup_cpu_quota"] else "none"),
        ("memory", f"{_gb(d['available_memory'])} available of {_gb(d['total_memory'])}"
                   + (f" (cgroup limit {_gb(d['cgroup_memory_limit'])})" if d["cgroup_memory_limit"] else "")),
        ("temperature", f"{d['cpu_temperature_c']:.0f} °C" if d["cpu_temperature_c"] else "not readable"),
        ("throttling", _throttle_line(d["throttling"])),
        ("default threads", f"{d['default_threads']} (physical cores within affinity and quota)"
                            + (f"; {busy:.1f} cores busy with other work now, so a load takes "
                               f"{hardware.threads_for_load(d['default_threads'], busy)}"
                               if busy >= 0.5 else "")),
        ("defaults", box.describe()),
        ("a load uses", f"context {load.n_ctx} (less if the model's own is shorter), "
                        f"{load.n_seq_max} sequences at once, K cache {load.kv_type}, "
                        f"{load.threads}/{load.threads_batch} threads ({load.threads_source}), "
                        f"speculative {load.speculative.mode}"),
        ("tuned profiles", ", ".join(f"{p['model']}: {p['threads']}/{p['threads_batch']}" for p in d["profiles"])
         or "none - run 'edgeinfer tune' to measure this machine"),
        ("fingerprint", d["fingerprint"]),
    ]
    n = d["native"]
    rows.append(("llama.cpp", f"llama-cpp-python {n['llama_cpp_python']}; extra buffer types: "
                              f"{', '.join(n['extra_buffer_types']) or 'none'}"
                              + ("; AMX on this CPU and build" if n["amx_on_cpu_and_build"] else "")))
    r = d["rpc"]
    rows.append(("rpc", f"ready ({Path(r['library']).name}): 'edgeinfer rpc-worker' lends this box's memory, "
                        "'edgeinfer serve MODEL --rpc HOST:PORT' uses other boxes'" if r["ready"] else
                        "built from llama.cpp's sources at the first 'edgeinfer rpc-worker' (a C++ compiler "
                        "is here)" if r["compiler"] else
                        "needs a C++ compiler to build (sudo apt install g++), see docs/fleet.md"))
    if n["forced"]:
        rows.append(("native setting", f"{n['forced']} (forced by EDGEINFER_NATIVE)"))
    tested = [f"{m['model']}: {_verdict_line(m['setting'], m['trials'])}" for m in n["models"] if m["setting"]]
    if not tested:
        tested = ["not run yet - it runs at the first load of each model; "
                  "'edgeinfer doctor --selftest' runs it now"]
    rows += [("self-test" if i == 0 else "", line) for i, line in enumerate(tested)]
    for m in n["refused"]:
        rows.append(("refused", f"{m['model']}: crashed llama.cpp with every setting ("
                                + "; ".join(f"{t.setting} {t.why()}" for t in _trials(m["trials"])) + ")"))
    for s_, c in n["crashed"].items():
        rows.append(("turned off", f"{s_}: {c.get('why')} with {c.get('model')}"))
    w = max(len(k) for k, _ in rows)
    for k, v in rows:
        click.echo(f"  {k.ljust(w)}  {v}")
    for r in retested or []:
        if "error" in r:
            click.echo(f"self-test of {r['model']} failed: {r['error']}")


def _trials(trials: list[dict]):
    from ..selftest import trials_of

    return trials_of({"trials": trials})


def _load_for_measuring(model, n_ctx=2048, **kw):
    import edgeinfer

    from ._common import ensure_model

    name = ensure_model(model, yes=False)
    return edgeinfer.load(name, n_ctx=n_ctx, prompt_cache=False, **kw)


@click.command("tune")
@click.argument("model", required=False)
@click.option("--show", is_flag=True, help="List saved profiles and exit.")
@click.option("--reps", default=3, show_default=True, help="Timed runs per thread count (median).")
@click.option("--pp", "n_prompt", default=128, show_default=True, help="Prompt tokens per prefill run.")
@click.option("--tg", "n_gen", default=32, show_default=True, help="Tokens per decode run.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def tune_cmd(model, show, reps, n_prompt, n_gen, as_json):
    """Measure prefill and decode speed across thread counts and save the
    best as this machine's profile for MODEL (default: the catalog default).

    \b
    The engine then uses the profile on its own; --threads still wins.
    Example:
      edgeinfer tune && edgeinfer bench
    """
    if show:
        ps = tuning.list_profiles()
        if as_json:
            click.echo(json.dumps([p.to_json() for p in ps], indent=2))
        elif not ps:
            click.echo("No profiles yet - run 'edgeinfer tune'")
        else:
            here = hardware.fingerprint()
            for p in ps:
                click.echo(f"{p.model}  threads {p.threads}  threads_batch {p.threads_batch}  "
                           f"machine {p.fingerprint}{' (this one)' if p.fingerprint == here else ''}  "
                           f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(p.created))}")
        return
    engine = _load_for_measuring(model)
    try:
        if not engine.sha256:
            raise click.ClickException("tune works on models in the store - import the file first with "
                                       "'edgeinfer import PATH --name NAME'")
        cands = tuning.candidates()
        quiet = as_json or not sys.stderr.isatty()
        with click.progressbar(length=len(cands) * (reps + 1), label=f"Tuning {engine.name}",
                               file=sys.stderr, show_pos=True) if not quiet else _NoBar() as bar:
            def step(done, total, t):
                bar.update(1)
                if quiet and not as_json:
                    click.echo(f"  {done}/{total} runs (threads={t})", err=True)
            ms = tuning.sweep(engine, threads=cands, n_prompt=n_prompt, n_gen=n_gen, reps=reps, on_step=step)
        profile = tuning.make_profile(engine, ms)
        path = tuning.save_profile(profile)
        # What a wider step costs with the chosen threads: speculative auto
        # drafts by it (edgeinfer.speculative).
        from ..speculative import step_costs_for

        engine.set_threads(profile.threads, profile.threads_batch)
        costs = step_costs_for(engine, remeasure=True)
    finally:
        engine.close()
    if as_json:
        click.echo(json.dumps({**profile.to_json(), "path": str(path), "step_costs": costs}, indent=2))
        return
    click.echo(f"{'threads':>7}  {'prefill tok/s':>13}  {'decode tok/s':>12}")
    for m in ms:
        marks = []
        if m.threads == profile.threads:
            marks.append("decode choice")
        if m.threads == profile.threads_batch:
            marks.append("prefill choice")
        if m.threads == profile.default_threads:
            marks.append("default")
        click.echo(f"{m.threads:>7}  {m.prefill_tps:>13.1f}  {m.decode_tps:>12.1f}  {', '.join(marks)}")
    for key, g in profile.gaps().items():
        what = key.split("_")[0]
        line = f"{what}: chosen is {g['chosen_gap'] * 100:.1f}% from the best measured"
        if g["default_gap"] is not None:
            line += f"; the untuned default ({profile.default_threads}) is {g['default_gap'] * 100:.1f}% from it"
        click.echo(line)
    click.echo(f"Saved: threads {profile.threads}, threads_batch {profile.threads_batch} -> {path}")
    click.echo("A step of w tokens costs, against one: " +
               ", ".join(f"{w}: {c:.2f}" for w, c in costs.items() if w in (2, 3, 5, 9)) +
               " (speculative decoding drafts by this)")


class _NoBar:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False

    def update(self, n):
        pass


@click.command("bench")
@click.argument("model", required=False)
@click.option("--pp", "n_prompt", default=512, show_default=True, help="Prompt tokens (prefill test).")
@click.option("--tg", "n_gen", default=128, show_default=True, help="Generated tokens (decode test).")
@click.option("--reps", default=3, show_default=True, help="Timed runs (median and spread).")
@click.option("--threads", type=int, help="Decode threads (default: tuned profile, else physical cores).")
@click.option("--threads-batch", type=int, help="Prefill threads.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def bench_cmd(model, n_prompt, n_gen, reps, threads, threads_batch, as_json):
    """Measure prefill and decode tok/s, time to first token and peak memory.

    \b
    The table follows llama-bench's pp/tg tests. Example:
      edgeinfer bench smollm2-135m-instruct --json
    """
    kw = {k: v for k, v in dict(threads=threads, threads_batch=threads_batch).items() if v}
    engine = _load_for_measuring(model, n_ctx=max(2048, n_prompt + n_gen + 8), **kw)
    try:
        pre, dec = tuning.measure(engine, n_prompt, n_gen, reps)
        # time to first token: a real request through the sampler
        ttfts = []
        for i in range(reps):
            ev = list(engine.stream(f"Tell me a fact about the number {i}.", max_tokens=1, temperature=0))
            ttfts.append(ev[-1].stats.ttft_s)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
        result = {
            "model": engine.name, "size": engine.info.file_size, "params": engine.info.parameter_count,
            "quant": engine.info.file_type, "threads": engine.threads, "threads_batch": engine.threads_batch,
            "threads_source": engine.threads_source,
            "native": {"setting": engine.native.setting, "source": engine.native.source},
            "tests": [
                {"test": f"pp{n_prompt}", "tps": statistics.median(pre), "stdev": _sd(pre), "runs": pre},
                {"test": f"tg{n_gen}", "tps": statistics.median(dec), "stdev": _sd(dec), "runs": dec},
            ],
            "ttft_s": statistics.median(ttfts), "peak_rss": peak,
        }
    finally:
        engine.close()
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    head = ["model", "size", "params", "threads", "test", "t/s"]
    rows = [[result["model"], human_bytes(result["size"]), _params(result["params"]),
             f"{result['threads']}/{result['threads_batch']} ({result['threads_source']})",
             t["test"], f"{t['tps']:.2f} ± {t['stdev']:.2f}"] for t in result["tests"]]
    widths = [max(len(str(r[i])) for r in [head] + rows) for i in range(len(head))]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    click.echo(line(head))
    click.echo("| " + " | ".join("-" * w for w in widths) + " |")
    for r in rows:
        click.echo(line(r))
    click.echo(f"time to first token {result['ttft_s'] * 1000:.0f} ms, peak RSS {human_bytes(peak)}, "
               f"threads from {result['threads_source']}, native setting {result['native']['setting']}")


def _sd(xs):
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


@click.group("cache")
def cache_group():
    """The prompt cache on disk: list or clear it."""


@cache_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def cache_list(as_json):
    """List cached prompt prefixes (namespace = model, context, build)."""
    entries = prompt_cache.disk_entries()
    if as_json:
        click.echo(json.dumps(entries, indent=2))
        return
    if not entries:
        click.echo("The prompt cache is empty.")
        return
    for e in entries:
        click.echo(f"{e['namespace']}  {e['tokens']:>6} tokens  {human_bytes(e['bytes']):>9}  "
                   f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(e['modified']))}")
    click.echo(f"{len(entries)} entries, {human_bytes(sum(e['bytes'] for e in entries))}")


@cache_group.command("clear")
def cache_clear():
    """Delete every cached prompt prefix on disk."""
    freed = prompt_cache.clear_disk()
    click.echo(f"Cleared the prompt cache ({human_bytes(freed)}).")


COMMANDS = [doctor_cmd, tune_cmd, bench_cmd, cache_group]
