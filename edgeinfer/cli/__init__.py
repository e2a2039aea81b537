"""The ``edgeinfer`` command: a thin dispatcher over the library.

Each command group lives in its own module. Library errors become one-line
messages that say what to do next; ``EDGEINFER_DEBUG=1`` shows tracebacks.
"""

from __future__ import annotations

import faulthandler
import os
import sys

import click

from ..errors import EdgeinferError


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except EdgeinferError as e:
            if os.environ.get("EDGEINFER_DEBUG") == "1":
                raise
            raise click.ClickException(e.one_line()) from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="edgeinfer")
def cli():
    """edgeinfer: run GGUF language models on this CPU.

    \b
    Start with:
      edgeinfer chat                       (pulls the default model first)
      edgeinfer run smollm2-135m-instruct "Why is the sky blue?"
      edgeinfer list
    """


def _register() -> None:
    from . import chat, models, quant, router, serve, system

    for cmd in (models.COMMANDS + chat.COMMANDS + serve.COMMANDS + system.COMMANDS + quant.COMMANDS
                + router.COMMANDS):
        cli.add_command(cmd)


_register()


# Commands that run llama.cpp in this process, and so leave a marker while
# they run (runs.py).
NATIVE_COMMANDS = {"run", "chat", "bench", "tune", "compare", "doctor", "serve"}


def main() -> None:
    # A crash inside native code still names the Python frame it came from.
    faulthandler.enable()
    from . import runs

    for m in runs.unfinished():
        click.echo(runs.warning(m), err=True)
    marker = runs.begin(sys.argv) if len(sys.argv) > 1 and sys.argv[1] in NATIVE_COMMANDS else None
    try:
        cli(prog_name="edgeinfer")
    finally:
        runs.end(marker)
