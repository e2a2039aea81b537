"""quantize, convert and compare: make quants and measure what they cost."""

from __future__ import annotations

import json
import sys

import click

from .. import hardware
from ..progress import human_bytes, make_progress
from ..quantize import convert, parse_type, quant_types, quantize
from ..store import ModelStore
from .models import print_columns


def _log(msg: str) -> None:
    click.echo(msg, err=True)


@click.command("quantize")
@click.argument("model")
@click.option("--to", "to", help="Target type, e.g. q4_k_m (case-insensitive).")
@click.option("--ladder", help="Several types, comma-separated: make each and compare them.")
@click.option("--name", help="Store the result as name[:tag] (default NAME:type).")
@click.option("--threads", type=int, help="Quantizer threads (default: physical cores).")
@click.option("--pure", is_flag=True, help="One type for every tensor (no per-tensor mix).")
@click.option("--output-tensor-type", help="Type for output.weight, e.g. q8_0.")
@click.option("--leave-output-tensor", is_flag=True, help="Keep output.weight unquantized.")
@click.option("--allow-requantize", is_flag=True, help="Quantize an already quantized model (compounds loss).")
@click.option("--max-kl", default=0.1, show_default=True, help="Quality bound for the ladder's recommendation.")
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (with --ladder).")
def quantize_cmd(model, to, ladder, name, threads, pure, output_tensor_type, leave_output_tensor,
                 allow_requantize, max_kl, quiet, as_json):
    """Quantize MODEL with llama.cpp's quantizer into a new model in the store.

    \b
    Examples:
      edgeinfer convert smollm2-135m-instruct --to f16
      edgeinfer quantize smollm2-135m-instruct:f16 --to q4_k_m
      edgeinfer quantize smollm2-135m-instruct:f16 --ladder q4_0,q4_k_m,q5_k_m,q8_0
    """
    if bool(to) == bool(ladder):
        raise click.UsageError("give --to TYPE or --ladder TYPE,TYPE,... (types: "
                               + ", ".join(t.lower() for t in quant_types()) + ")")
    opts = dict(threads=threads, pure=pure, output_tensor_type=output_tensor_type,
                leave_output_tensor=leave_output_tensor, allow_requantize=allow_requantize,
                log=None if quiet else _log)
    if to:
        m = quantize(model, to, name=name, progress=make_progress(quiet), **opts)
        click.echo(f"{m.ref} made from {model} ({human_bytes(m.size)}, sha256 {m.sha256[:12]})")
        return
    types = [parse_type(t) for t in ladder.split(",") if t.strip()]
    store = ModelStore()
    refs = [store.resolve(model).ref]
    for t in types:
        existing = store.get(f"{store.resolve(model).name}:{t.lower()}")
        if existing is not None and existing.parent == store.resolve(model).sha256:
            refs.append(existing.ref)
            continue
        refs.append(quantize(model, t, progress=make_progress(quiet), **opts).ref)
    _compare(refs, max_kl=max_kl, as_json=as_json, quiet=quiet)


@click.command("convert")
@click.argument("model")
@click.option("--to", "to", default="f16", show_default=True, help="f16, f32 or bf16.")
@click.option("--name", help="Store the result as name[:tag] (default NAME:type).")
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
def convert_cmd(model, to, name, quiet):
    """Dequantize MODEL into a full-precision master to quantize from.

    Its precision stays bounded by MODEL's own quantization (recorded in
    the new model's provenance).
    """
    m = convert(model, to, name=name, progress=make_progress(quiet), log=None if quiet else _log)
    click.echo(f"{m.ref} made from {model} ({human_bytes(m.size)}, sha256 {m.sha256[:12]})")


def _compare(refs, *, max_kl, as_json, quiet, chunks=8):
    import edgeinfer

    from ..quality import compare, recommend, report_json

    engines = []
    try:
        for r in refs:
            engines.append(edgeinfer.load(r, n_ctx=1024, n_batch=512, prompt_cache=False))
        bar = None if (quiet or as_json) else make_progress(False)
        if bar:
            bar.start(chunks, "evaluating")
        reports, meta = compare(engines, max_chunks=chunks, on_chunk=(lambda d, n: bar.update(1)) if bar else None)
        if bar:
            bar.close()
    finally:
        for e in engines:
            e.close()
    rec = recommend(reports, max_kl, hardware.available_memory())
    if as_json:
        click.echo(json.dumps(report_json(reports, meta, rec, max_kl), indent=2))
        return
    head = ["model", "size", "ppl", "KL vs ref", "top-1", "prefill t/s", "decode t/s"]
    rows = [[r.model, human_bytes(r.size), f"{r.perplexity:.3f}", f"{r.kl_divergence:.4f}",
             f"{r.top1_agreement * 100:.1f}%", f"{r.prefill_tps:.1f}", f"{r.decode_tps:.1f}"] for r in reports]
    print_columns([head] + rows)
    click.echo(f"reference: {meta['reference']}; {meta['scored']} tokens scored of standard-library "
               f"docstrings (sha256 {meta['eval_text_sha256'][:12]})")
    if len(reports) > 1:
        if rec:
            click.echo(f"recommended here: {rec.model} - the fastest within KL <= {max_kl} that fits in memory")
        else:
            click.echo(f"no candidate is within KL <= {max_kl}; raise --max-kl or use a larger quant")


@click.command("compare")
@click.argument("models", nargs=-1, required=True)
@click.option("--chunks", default=8, show_default=True, help="512-token chunks of evaluation text.")
@click.option("--max-kl", default=0.1, show_default=True, help="Quality bound for the recommendation.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def compare_cmd(models, chunks, max_kl, as_json):
    """Compare MODELS against the first: perplexity, KL divergence, top-1
    agreement, size and speed on this machine.

    \b
    Example:
      edgeinfer compare smollm2-135m-instruct:f16 smollm2-135m-instruct:q8_0 smollm2-135m-instruct:q4_k_m
    """
    _compare(list(models), max_kl=max_kl, as_json=as_json, quiet=not sys.stderr.isatty(), chunks=chunks)


COMMANDS = [quantize_cmd, convert_cmd, compare_cmd]
