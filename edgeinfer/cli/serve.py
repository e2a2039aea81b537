"""``edgeinfer serve``: the models behind a JSON-lines socket and HTTP."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shlex
import stat
import sys

import click

from ..errors import ServerConfigError
from ..server.defaults import DEFAULT_HTTP_PORT, DEFAULT_MAX_BODY, DEFAULT_MAX_LINE, DEFAULT_PORT
from ..speculative import MODES
from ._common import ensure_model


def read_token(token: str | None, token_file: str | None) -> str | None:
    """The token from --token, --token-file or $EDGEINFER_TOKEN."""
    if token_file:
        try:
            st = os.stat(token_file)
            with open(token_file, encoding="utf-8") as f:
                value = f.read().strip()
        except OSError as e:
            raise ServerConfigError(f"cannot read the token file {token_file}: {e.strerror}",
                                    hint="create it with: umask 077; openssl rand -hex 32 > FILE") from None
        if not value:
            raise ServerConfigError(f"the token file {token_file} is empty",
                                    hint="put a long random string in it: openssl rand -hex 32 > FILE")
        if st.st_mode & (stat.S_IRGRP | stat.S_IROTH):
            click.echo(f"warning: {token_file} is readable by other users; chmod 600 it", err=True)
        return value
    value = token or os.environ.get("EDGEINFER_TOKEN") or None
    if value is not None and len(value) < 16:
        raise ServerConfigError("the token is shorter than 16 characters",
                                hint="use a long random one: openssl rand -hex 32")
    return value


def systemd_unit(model: str | None, argv_opts: list[str], *, user: str, home: str, host: str | None,
                 token_file: str | None, memory_max: str | None, cpu_quota: str | None) -> str:
    """A unit that runs this server as a service with these options."""
    from ..server.jsonl import is_loopback

    exec_args = [sys.executable, "-m", "edgeinfer", "serve"] + ([model] if model else []) + ["--yes"] + argv_opts
    creds = ""
    if token_file:
        # systemd hands the file to the service in its credentials directory,
        # readable by the service alone; the unit itself holds no secret.
        exec_args += ["--token-file", "${CREDENTIALS_DIRECTORY}/token"]
        creds = f"LoadCredential=token:{os.path.abspath(token_file)}\n"
    if memory_max is None:
        from ..hardware import total_memory

        memory_max = f"{total_memory() * 3 // 4 // (1 << 20)}M"  # leave the box a quarter of its RAM
    cpu = f"CPUQuota={cpu_quota}\n" if cpu_quota else ""
    exposed = "on the network (token required)" if host and not is_loopback(host) else "on loopback"
    return f"""\
# edgeinfer serve, {exposed}. Install with:
#   sudo cp edgeinfer.service /etc/systemd/system/ && sudo systemctl daemon-reload
#   sudo systemctl enable --now edgeinfer
[Unit]
Description=edgeinfer model server{f' ({model})' if model else ''}
After=network-online.target
Wants=network-online.target

[Service]
Type=exec
User={user}
Group={user}
Environment=EDGEINFER_HOME={home}
Environment=PYTHONUNBUFFERED=1
StateDirectory=edgeinfer
{creds}ExecStart={' '.join(_quote(a) for a in exec_args)}
Restart=on-failure
RestartSec=5
# SIGTERM drains requests in flight for up to 30 s
TimeoutStopSec=45
MemoryMax={memory_max}
CPUWeight=50
{cpu}NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=read-only
ReadWritePaths={home}
PrivateTmp=yes
PrivateDevices=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
SystemCallArchitectures=native
CapabilityBoundingSet=
UMask=0077

[Install]
WantedBy=multi-user.target
"""


def _quote(arg: str) -> str:
    return arg if arg.startswith("${") else shlex.quote(arg)


OLLAMA_PORT = 11434   # Ollama's own, where its clients look by default


def parse_aliases(aliases: tuple[str, ...]) -> dict[str, str]:
    """``--alias NAME=MODEL`` options as a dict."""
    out = {}
    for a in aliases:
        name, sep, target = a.partition("=")
        if not sep or not name.strip() or not target.strip():
            raise click.UsageError(f"--alias {a!r}: give NAME=MODEL, e.g. --alias gpt-4.1=smollm2-135m-instruct")
        out[name.strip()] = target.strip()
    return out


@click.command("serve")
@click.argument("model", required=False)
@click.option("--model", "models", multiple=True, metavar="MODEL",
              help="A model to load at start and keep loaded; repeatable (MODEL alone is one).")
@click.option("--alias", "aliases", multiple=True, metavar="NAME=MODEL",
              help="Answer requests for NAME with MODEL (e.g. gpt-4.1=smollm2-135m-instruct); repeatable. "
                   "config.toml's [aliases] table adds more.")
@click.option("--any-name", is_flag=True, help="With exactly one model loaded at start: answer a request "
              "for any model name with it (for clients that hard-code a vendor's model name).")
@click.option("--keep-alive", default="5m", show_default=True, metavar="DURATION",
              help="How long a model loaded on demand stays loaded when idle: 30s, 5m, 1h; 0 unloads "
                   "after each request; -1 or forever keeps it.")
@click.option("--hang-timeout", default=300.0, show_default=True, type=click.FloatRange(1, None), metavar="SECONDS",
              help="A model busy this long without finishing a step (or without answering) is ended and "
                   "loaded again on the next request.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; anything but loopback needs a token. '' for none.")
@click.option("--port", default=DEFAULT_PORT, show_default=True, type=click.IntRange(0, 65535),
              help="The JSON-lines port.")
@click.option("--jsonl/--no-jsonl", default=True, show_default=True,
              help="Serve JSON lines on --port (--no-jsonl with --http: HTTP alone).")
@click.option("--http", "http_port", type=click.IntRange(0, 65535), metavar="PORT",
              help=f"Also serve OpenAI- and Anthropic-compatible HTTP and /metrics on PORT "
                   f"(e.g. {DEFAULT_HTTP_PORT}).")
@click.option("--ollama", is_flag=True,
              help=f"Serve HTTP on Ollama's port, {OLLAMA_PORT}, so Ollama's clients find this server with no "
                   "setting changed (docs/ollama.md); the same as --http 11434.")
@click.option("--cors", multiple=True, metavar="ORIGIN",
              help="Let web pages from ORIGIN (e.g. http://localhost:3000) call the HTTP API; repeatable.")
@click.option("--max-body", default=DEFAULT_MAX_BODY, show_default=True, type=click.IntRange(1024, 1 << 30),
              help="Largest HTTP request body in bytes.")
@click.option("--unix", "unix", metavar="PATH", help="Also (or, with --host '', only) listen on a Unix socket.")
@click.option("--parallel", type=click.IntRange(1, 64), help="Sequences decoded together (default: sized "
              "to this machine's cores and the context).")
@click.option("--queue", "queue_limit", default=64, show_default=True, type=click.IntRange(0, 100000),
              help="Requests that may wait for a sequence; past it, 'busy'.")
@click.option("--n-ctx", type=click.IntRange(64, 1 << 20), help="Context tokens, shared by all sequences.")
@click.option("--threads", type=click.IntRange(1, 512))
@click.option("--prefill-chunk", type=click.IntRange(1, 1 << 16),
              help="Prompt tokens per step while other streams decode.")
@click.option("--token", help="Token every request must carry (prefer --token-file).")
@click.option("--token-file", type=click.Path(dir_okay=False), help="File holding the token.")
@click.option("--max-line", default=DEFAULT_MAX_LINE, show_default=True, type=click.IntRange(1024, 1 << 30),
              help="Longest request line in bytes.")
@click.option("--idle-timeout", default=300.0, show_default=True, type=click.FloatRange(1, None),
              help="Seconds an idle connection stays open.")
@click.option("--speculative", type=click.Choice(MODES), default=None,
              help="Speculative decoding for requests that do not choose (default auto, or draft with --draft).")
@click.option("--draft", metavar="MODEL", help="A smaller model with the same vocabulary that drafts.")
@click.option("--rpc", "rpc_workers", metavar="HOST:PORT[,HOST:PORT]",
              help="Split MODEL's layers over these 'edgeinfer rpc-worker's, by their free memory (docs/fleet.md).")
@click.option("-y", "--yes", is_flag=True, help="Pull the model without asking if it is missing.")
@click.option("--print-systemd-unit", is_flag=True, help="Print a systemd unit for these options and exit.")
@click.option("--unit-user", default="edgeinfer", show_default=True, help="With --print-systemd-unit: the "
              "service's user.")
@click.option("--unit-home", default="/var/lib/edgeinfer", show_default=True,
              help="With --print-systemd-unit: the service's EDGEINFER_HOME.")
@click.option("--memory-max", help="With --print-systemd-unit: MemoryMax= (default: 3/4 of RAM).")
@click.option("--cpu-quota", help="With --print-systemd-unit: CPUQuota=, e.g. 300%.")
def serve_cmd(model, models, aliases, any_name, keep_alive, hang_timeout, host, port, jsonl, http_port, ollama, cors,
              max_body, unix, parallel, queue_limit, n_ctx, threads, prefill_chunk, token, token_file, max_line,
              idle_timeout, speculative, draft, rpc_workers, yes, print_systemd_unit, unit_user, unit_home, memory_max,
              cpu_quota):
    """Serve models to other programs: JSON lines (docs/protocol.md) and,
    with --http, the OpenAI and Anthropic HTTP APIs (docs/http.md).

    Every model in the store is served: each loads, in a process of its
    own, when a request names it, and unloads after --keep-alive idle or
    when another needs its memory. MODEL (and each --model) loads at start
    and stays loaded.

    \b
    Examples:
      edgeinfer serve                               (JSON lines on 127.0.0.1:8765)
      edgeinfer serve smollm2-135m-instruct --model qwen2.5-coder-0.5b-instruct
      edgeinfer serve --http 8080                   (and http://127.0.0.1:8080/v1)
      edgeinfer serve --ollama                      (and Ollama's API on http://127.0.0.1:11434)
      edgeinfer serve --http 8080 --no-jsonl --host 0.0.0.0 --token-file ~/.edgeinfer-token
      edgeinfer serve --print-systemd-unit > edgeinfer.service
    """
    from ..server.jsonl import Options, check_exposure

    host = host or None
    if ollama:
        if http_port is not None and http_port != OLLAMA_PORT:
            raise click.UsageError(f"--ollama serves HTTP on {OLLAMA_PORT}; leave out --http {http_port}, or "
                                   "--ollama to keep that port (Ollama's API is on every HTTP port, under /api)")
        http_port = OLLAMA_PORT
    if not jsonl and http_port is None:
        raise click.UsageError("--no-jsonl leaves nothing to serve: add --http PORT")
    if http_port is not None and not host:
        raise click.UsageError("--http needs --host: HTTP is served on a TCP address")
    if jsonl and not host and not unix:
        raise click.UsageError("give --host or --unix: the server needs somewhere to listen")
    if print_systemd_unit:
        if token and not token_file:
            raise ServerConfigError("a unit file must not hold the token",
                                    hint="put it in a file (chmod 600) and pass --token-file FILE")
        check_exposure(Options(host=host, port=port, token="x" if token_file else None))
        opts = ["--host", host or "", "--port", str(port), "--keep-alive", keep_alive, "--hang-timeout",
                f"{hang_timeout:g}"]
        for m in models:
            opts += ["--model", m]
        for a in aliases:
            opts += ["--alias", a]
        if any_name:
            opts.append("--any-name")
        if not jsonl:
            opts.append("--no-jsonl")
        for c in cors:
            opts += ["--cors", c]
        for flag, value in (("--http", http_port), ("--unix", unix), ("--parallel", parallel),
                            ("--queue", queue_limit), ("--n-ctx", n_ctx), ("--threads", threads),
                            ("--prefill-chunk", prefill_chunk), ("--max-line", max_line),
                            ("--idle-timeout", idle_timeout),
                            ("--speculative", speculative), ("--draft", draft), ("--rpc", rpc_workers)):
            if value is not None:
                opts += [flag, str(value)]
        click.echo(systemd_unit(model, opts, user=unit_user, home=unit_home, host=host, token_file=token_file,
                                memory_max=memory_max, cpu_quota=cpu_quota), nl=False)
        return
    secret = read_token(token, token_file)
    opts = Options(host=host, port=port, unix=unix, token=secret, max_line=max_line, idle_timeout=idle_timeout)
    check_exposure(opts)  # before a model is pulled or loaded
    if ollama:
        from ..server.listen import check_port_free

        # Most likely an Ollama (its service starts at boot on many machines).
        check_port_free(host, OLLAMA_PORT, "probably Ollama itself (its API's port): stop it first (e.g. 'sudo "
                                           "systemctl stop ollama', or quit the Ollama app), or serve on another "
                                           "port with --http PORT and point the client at it "
                                           "(OLLAMA_HOST=127.0.0.1:PORT)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    quiet = not sys.stderr.isatty()
    from ..errors import RequestError
    from ..pool import ModelPool, PoolOptions
    from ..server.generation import parse_keep_alive
    from ..store import ModelStore

    try:
        keep = parse_keep_alive(keep_alive, "--keep-alive")
    except RequestError as e:
        raise click.UsageError(str(e)) from None
    from ..model_choice import aliases as config_aliases

    alias_map = {**config_aliases(), **parse_aliases(aliases)}   # the command line over config.toml
    store = ModelStore()
    pinned = [ensure_model(m, yes, quiet=quiet) for m in ([model] if model else []) + list(models)]
    if not pinned and not store.list():   # an empty store: the model chosen for this machine
        ensure_model(None, yes, quiet=quiet)
    if any_name and len(pinned) != 1:
        raise click.UsageError("--any-name needs exactly one model loaded at start: give MODEL")

    from ..server.http import HttpOptions
    from ..server.run import serve_all

    load = {k: v for k, v in dict(n_ctx=n_ctx, threads=threads, n_seq_max=parallel, queue_limit=queue_limit,
                                  prefill_chunk=prefill_chunk, speculative=speculative,
                                  draft=ensure_model(draft, yes, quiet=quiet) if draft else None).items()
            if v is not None}
    per_model = {}
    if rpc_workers:   # one model's layers over the workers (each serves one client: one model)
        from ..rpc import check_endpoint

        if len(pinned) != 1:
            raise click.UsageError("--rpc splits one model over the workers: give exactly one MODEL")
        endpoints = [w.strip() for w in rpc_workers.split(",") if w.strip()]
        for w in endpoints:
            check_endpoint(w)
        per_model[pinned[0]] = {"rpc": endpoints}
    pool = ModelPool(store, PoolOptions(keep_alive=keep, load=load, per_model=per_model, aliases=alias_map,
                                        any_name=any_name, cores=threads, hang_timeout=hang_timeout))
    http_opts = None
    if http_port is not None:
        http_opts = HttpOptions(host=host, port=http_port, token=secret, cors=list(cors), max_body=max_body)

    def ready(pool, where):
        loaded = [s.model for s in pool.slots.values() if s.model is not None]
        what = ", ".join(f"{m.name} ({m.n_seq_max} sequences, context {m.n_ctx})" for m in loaded)
        what = f"{what}, and the store's other models on demand" if what else "the store's models on demand"
        click.echo(f"Serving {what} on {', '.join(where)}: queue {queue_limit}"
                   f"{', token required' if secret else ''}. Ctrl-C or SIGTERM stops.", err=True)

    asyncio.run(serve_all(pool, pinned, jsonl_opts=opts if jsonl else None, http_opts=http_opts, ready=ready))
    click.echo("Stopped.", err=True)


def loaded_models(port: int, unix: str | None, http: str | None, token: str | None) -> list[dict]:
    """The models a running server has loaded, as it describes them."""
    if http:
        import urllib.error
        import urllib.request

        req = urllib.request.Request(http.rstrip("/") + "/v1/models",
                                     headers={"Authorization": f"Bearer {token}"} if token else {})
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                cards = json.load(r)["data"]
        except (OSError, ValueError, KeyError) as e:
            raise ServerConfigError(f"cannot read {http}/v1/models: {e}",
                                    hint="is 'edgeinfer serve --http PORT' running there?") from None
        return [{"name": c["id"], **c.get("edgeinfer", {})} for c in cards if c.get("loaded")
                and "alias_of" not in c.get("edgeinfer", {})]
    from ..server.client import Client

    with Client(port=port, unix=unix, token=token, timeout=10) as c:
        return c.stats().get("models", [])


@click.command("ps")
@click.option("--port", default=DEFAULT_PORT, show_default=True, type=click.IntRange(1, 65535),
              help="The server's JSON-lines port on 127.0.0.1.")
@click.option("--unix", metavar="PATH", help="The server's Unix socket instead.")
@click.option("--http", "http_url", metavar="URL", help="Ask over HTTP instead, e.g. http://127.0.0.1:8080.")
@click.option("--token-file", type=click.Path(dir_okay=False), help="File holding the server's token.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def ps_cmd(port, unix, http_url, token_file, as_json):
    """Show the models a running server has loaded: memory, threads,
    requests in flight, and when each unloads."""
    from ..progress import human_bytes

    models = loaded_models(port, unix, http_url, read_token(None, token_file))
    if as_json:
        click.echo(json.dumps(models, indent=2))
        return
    if not models:
        click.echo("No model is loaded; one loads when a request names it.")
        return
    click.echo(f"{'NAME':<40} {'STATE':<6} {'MEMORY':>9} {'THREADS':>7} {'REQUESTS':>8}  UNLOADS")
    for m in models:
        left = m.get("expires_in_s")
        unloads = "when idle" if m.get("state") == "busy" and left is None and not m.get("pinned") else \
            "never (pinned)" if m.get("pinned") else "never" if left is None else f"in {left:.0f} s"
        click.echo(f"{m['name']:<40} {m.get('state', ''):<6} {human_bytes(m.get('memory_bytes') or 0):>9} "
                   f"{m.get('threads', ''):>7} {m.get('requests', 0):>8}  {unloads}")


from .rpc_worker import rpc_worker_cmd  # noqa: E402 - a command of the same family, registered with these

COMMANDS = [serve_cmd, ps_cmd, rpc_worker_cmd]
