"""``edgeinfer rpc-worker``: lend this box's memory and cores to a model
served from another box (edgeinfer.rpc, docs/fleet.md)."""

from __future__ import annotations

import click

from ..rpc import DEFAULT_PORT, UPSTREAM_WARNING


@click.command("rpc-worker")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; anything but loopback needs --allow-lan.")
@click.option("--port", default=DEFAULT_PORT, show_default=True, type=click.IntRange(1, 65535))
@click.option("--threads", type=click.IntRange(1, 512), help="Threads for the layers held here (default: the "
                                                              "cores this process may use).")
@click.option("--mem", metavar="SIZE", help="Offer at most this much memory (e.g. 4G); the server splits a model's "
                                         "layers by what each worker offers (default: its free memory).")
@click.option("--cache-dir", type=click.Path(file_okay=False),
              help="Keep large tensors here, so a model's next load sends only their hashes.")
@click.option("--allow-lan", is_flag=True, help="Listen on an address other machines can reach. The protocol "
                                                "has no authentication: only on a LAN you trust.")
@click.option("--build-only", is_flag=True, help="Build the RPC backend if it is not built yet, then exit "
                                                 "(installers run this).")
def rpc_worker_cmd(host, port, threads, mem, cache_dir, allow_lan, build_only):
    """Hold part of a model for a server on another box.

    \b
    On each worker:     edgeinfer rpc-worker --host 192.168.1.21 --allow-lan
    On the server:      edgeinfer serve MODEL --rpc 192.168.1.21:50052,192.168.1.22:50052 --http 8080

    The server sends each worker its share of the layers, in proportion to
    its free memory. One server uses a worker at a time. It buys memory,
    not speed: a model that fits one box runs faster there.
    """
    import sys

    from ..hardware import default_threads
    from ..server.jsonl import is_loopback

    if build_only:
        from .. import rpc

        click.echo(f"RPC backend: {rpc.library(quiet=False)}")
        return
    if not is_loopback(host) and not allow_lan:
        raise click.UsageError(f"--host {host} lets other machines reach this worker, and llama.cpp's RPC protocol "
                               "has no authentication: add --allow-lan if every machine on that network is trusted")
    from ..server.listen import check_port_free

    # llama.cpp would abort the process on a taken port: say so first.
    check_port_free(host, port, "another worker? stop it, or choose another --port")
    from .. import rpc

    cap = rpc.parse_size(mem) if mem else None
    path = rpc.library(quiet=False)   # built once, before anything listens
    if not is_loopback(host):
        click.echo(f"WARNING: {UPSTREAM_WARNING}.", err=True)
    threads = threads or default_threads()
    click.echo(f"RPC worker on {host}:{port} ({threads} threads{', at most ' + mem if mem else ''}"
               f"{', cache ' + cache_dir if cache_dir else ''}; backend {path.name}). Ctrl-C stops it.", err=True)
    sys.stderr.flush()
    rpc.serve_forever(f"{host}:{port}", cache_dir=cache_dir, threads=threads, mem=cap)


COMMANDS = [rpc_worker_cmd]
