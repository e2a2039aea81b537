"""Model manager commands: pull, list, show, rm, import."""

from __future__ import annotations

import json
import os
import time

import click

from ..fit import DEFAULT_N_CTX
from ..gguf_file import read_gguf
from ..progress import human_bytes
from ..store import ModelStore


def print_columns(rows: list[tuple[str, ...]]) -> None:
    """Left-aligned columns, the first row a header."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


def _params(n: int | None) -> str:
    if not n:
        return "-"
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


@click.command("pull")
@click.argument("model")
@click.option("--name", help="Store the model under this name[:tag] (URLs and files).")
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
@click.option("--force", is_flag=True, help="Download even if the model will not fit in memory here.")
def pull_cmd(model, name, quiet, force):
    """Download MODEL into the store: a catalog name[:tag], a URL or a file.

    \b
    Sources are tried in order; the bytes are checked against the catalog's
    sha256 before the model is published. An interrupted HTTP download
    resumes where it stopped.

    \b
    Example:
      edgeinfer pull smollm2-135m-instruct
    """
    from ..pull import pull

    result = pull(model, quiet=quiet, name=name, force=force)
    m = result.manifest
    if result.source == "store":
        click.echo(f"{m.ref} is already in the store ({human_bytes(m.size)}, sha256 {m.sha256[:12]})")
    elif quiet:  # otherwise the pull has said so on stderr
        click.echo(f"{m.ref} pulled from {result.source} ({human_bytes(m.size)}, sha256 {m.sha256[:12]})")


def _list_catalog(as_json: bool) -> None:
    from .. import catalog

    entries = sorted(catalog.load_catalog().values(), key=lambda e: e.ref)
    have = {m.sha256 for m in ModelStore().list()}
    if as_json:
        click.echo(json.dumps([{"name": e.ref, "size": e.size, "sha256": e.sha256, "license": e.license,
                                "description": e.description, "default": e.default_model,
                                "pulled": e.sha256 in have} for e in entries], indent=2))
        return
    rows = [("NAME", "SIZE", "LICENSE", "", "DESCRIPTION")]
    for e in entries:
        mark = "pulled" if e.sha256 in have else ("default" if e.default_model else "")
        rows.append((e.ref, human_bytes(e.size), e.license, mark, e.description))
    print_columns(rows)


@click.command("list")
@click.option("--catalog", "show_catalog", is_flag=True, help="List what can be pulled by name instead.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def list_cmd(show_catalog, as_json):
    """List the models in the store (or, with --catalog, those that can be pulled)."""
    if show_catalog:
        _list_catalog(as_json)
        return
    models = ModelStore().list()
    if as_json:
        click.echo(json.dumps([m.to_json() for m in models], indent=2))
        return
    if not models:
        click.echo("No models yet - run 'edgeinfer pull smollm2-135m-instruct'")
        return
    rows = [("NAME", "SIZE", "QUANT", "PARAMS", "MODIFIED")]
    for m in models:
        f = m.facts or {}
        rows.append((m.ref, human_bytes(m.size), f.get("quant") or "-", _params(f.get("parameter_count")),
                     time.strftime("%Y-%m-%d %H:%M", time.localtime(m.created))))
    print_columns(rows)


def native_facts(m) -> dict:
    """The native setting the self-test chose for this model on this machine."""
    from .. import native, selftest

    rec = selftest.load_record()
    key = selftest.model_key(m.path, m.sha256)
    entry = rec["models"].get(key) or {}
    return {"setting": entry.get("setting"), "refused": key in rec["refused"],
            "forced": os.environ.get(native.ENV) or None,
            "tested_here": bool(entry) or key in rec["refused"]}


def show_facts(m, n_ctx: int = DEFAULT_N_CTX) -> dict:
    info = read_gguf(m.path)
    ctx = min(n_ctx, info.context_length or n_ctx)
    facts = info.to_dict()
    facts.update({
        "name": m.ref, "sha256": m.sha256, "path": str(m.path), "size": m.size,
        "license": m.license or info.metadata.get("general.license") or "unknown",
        "source": m.source, "parent": m.parent, "options": m.options,
        "memory_estimate": {"n_ctx": ctx, "bytes": info.memory_estimate(ctx),
                            "kv_cache_bytes": info.kv_cache_bytes(ctx)},
        "native": native_facts(m),
    })
    return facts


@click.command("show")
@click.argument("model")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def show_cmd(model, as_json):
    """Show what MODEL is: architecture, size, quant, context, license.

    \b
    Example:
      edgeinfer show smollm2-135m-instruct --json
    """
    m = ModelStore().resolve(model)
    f = show_facts(m)
    if as_json:
        click.echo(json.dumps(f, indent=2))
        return
    quants = ", ".join(f"{k} ×{v}" for k, v in f["quant_types"].items())
    mem = f["memory_estimate"]
    lines = [
        ("model", f["name"]),
        ("architecture", f["architecture"] or "-"),
        ("parameters", f"{_params(f['parameter_count'])} ({f['parameter_count']:,})"),
        ("quantization", f"{f.get('file_type') or '-'} (tensors: {quants})"),
        ("context length", f"{f['context_length']:,}" if f["context_length"] else "-"),
        ("vocab size", f"{f['vocab_size']:,}" if f["vocab_size"] else "-"),
        ("chat template", "yes" if f["chat_template_present"] else "no"),
        ("license", f["license"]),
        ("size", f"{human_bytes(f['size'])} ({f['size']:,} bytes)"),
        ("sha256", f["sha256"]),
        ("path", f["path"]),
        ("memory", f"about {human_bytes(mem['bytes'])} at context {mem['n_ctx']:,} "
                   f"(KV cache {human_bytes(mem['kv_cache_bytes'])})"),
        ("source", f["source"] or "-"),
        ("native", _native_line(f["native"])),
    ]
    if f["parent"]:
        lines.append(("parent", f["parent"]))
    width = max(len(k) for k, _ in lines)
    for k, v in lines:
        click.echo(f"  {k.ljust(width)}  {v}")


def _native_line(n: dict) -> str:
    if n["refused"]:
        return "refused here: it crashed llama.cpp in the self-test ('edgeinfer doctor' says how)"
    line = n["setting"] or "not tested on this machine yet (the first load runs the self-test)"
    return line + (f"; {n['forced']} forced by EDGEINFER_NATIVE" if n["forced"] else "")


@click.command("rm")
@click.argument("models", nargs=-1, required=True)
def rm_cmd(models):
    """Remove MODELS from the store (the file goes when nothing else uses it)."""
    store = ModelStore()
    store.clean_scratch()  # what a killed pull or quantize left behind
    for name in models:
        m, blob_gone = store.remove(name)
        click.echo(f"removed {m.ref}" + ("" if blob_gone else " (its file is shared and stays)"))


@click.command("import")
@click.argument("path", type=click.Path())
@click.option("--name", required=True, help="Name for the model, name[:tag].")
@click.option("--to", "to", type=click.Choice(["f16", "q8_0"], case_sensitive=False),
              help="For a folder: the type to convert to (default f16).")
def import_cmd(path, name, to):
    """Copy a local GGUF file into the store under --name, or convert a
    Hugging Face model folder into one.

    The file is checked first; a damaged file is refused and nothing enters
    the store. A folder must hold a sentence-transformers BERT (BertModel:
    config.json, tokenizer.json or vocab.txt, model.safetensors, its
    1_Pooling); other architectures are refused. The tag defaults to the
    type.

    \b
    Examples:
      edgeinfer import ./my-model.Q4_K_M.gguf --name my-model:q4_k_m
      edgeinfer import ./all-MiniLM-L6-v2 --name minilm --to q8_0
    """
    from ..pull import import_file

    m = import_file(path, name, to=to.lower() if to else None)
    how = "converted" if os.path.isdir(path) else "imported"
    click.echo(f"{how} {m.ref} ({human_bytes(m.size)}, sha256 {m.sha256[:12]})")


COMMANDS = [pull_cmd, list_cmd, show_cmd, rm_cmd, import_cmd]
