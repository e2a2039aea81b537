"""Helpers the commands share: find the model to run (offering to pull a
catalog model that is missing) and load it with the options given.

Nothing here imports llama.cpp at module level, so ``edgeinfer --help``
stays light.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from ..errors import ModelNotFoundError


def ensure_model(name: str | None, yes: bool, quiet: bool = False) -> str:
    """The model to load: a GGUF path or a store name, pulled first if it
    is a catalog model that is not in the store yet.

    With no ``name``, the catalog model chosen for this machine. A missing
    model is pulled with ``yes``; otherwise the user is asked, and without
    a terminal to ask on it is an error whose hint says what to run.
    """
    from .. import catalog
    from ..names import parse_ref
    from ..pull import pull
    from ..store import ModelStore

    choice = None
    if name is None:
        from ..model_choice import choose

        choice = choose()
        ref = choice.entry.ref
    else:
        ref = name

    # 1. A file on disk.
    if Path(ref).expanduser().is_file():
        return ref
    if ref.endswith(".gguf") or os.sep in ref:
        raise ModelNotFoundError(f"{ref}: no such file", hint="check the path")

    # 2. A model already in the store.
    if ModelStore().get(parse_ref(ref)) is not None:
        return ref

    # 3. A catalog model not downloaded yet: pull it, with consent.
    entry = catalog.lookup(parse_ref(ref))
    if entry is None:
        raise ModelNotFoundError(f"model '{ref}' is not in the store or the catalog",
                                 hint="run 'edgeinfer list --catalog' to see the names that can be pulled, "
                                      "or pull a URL or file with 'edgeinfer pull'")
    if choice is not None:
        click.echo(f"Default model for this machine: {choice.line()}", err=True)
    if not yes and not _confirm_pull(ref, f"{entry.ref} is not downloaded yet ({entry.size / 1e6:.0f} MB). "
                                          f"Pull it now?"):
        raise ModelNotFoundError(f"model '{ref}' is not in the store", hint=f"run 'edgeinfer pull {ref}'")
    pull(entry.ref, quiet=quiet)
    return entry.ref


def _confirm_pull(ref: str, question: str) -> bool:
    if not sys.stdin.isatty():
        raise ModelNotFoundError(f"model '{ref}' is not in the store",
                                 hint=f"run 'edgeinfer pull {ref}' or add --yes")
    return click.confirm(question, default=True, err=True)


def load_engine(model: str, n_ctx: int | None = None, threads: int | None = None,
                threads_batch: int | None = None, **extra):
    """``edgeinfer.load(model, ...)`` with the options the user gave
    (None or 0: the engine's own default)."""
    import edgeinfer

    given = {k: v for k, v in dict(n_ctx=n_ctx, threads=threads, threads_batch=threads_batch).items() if v}
    return edgeinfer.load(model, **given, **extra)

