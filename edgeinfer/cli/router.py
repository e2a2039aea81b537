"""``edgeinfer router``: an existing router in front of several servers."""

from __future__ import annotations

import click

from ..fleet import DEFAULT_ROUTER_PORT, POLICIES, FleetConfig, check, describe, free_port, router_config, run
from .serve import read_token


@click.command("router")
@click.option("--worker", "workers", multiple=True, metavar="URL",
              help="An 'edgeinfer serve --http PORT' box, e.g. http://pi1:8080; repeat for each.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address the router listens on; anything but loopback needs --token-file.")
@click.option("--port", default=DEFAULT_ROUTER_PORT, show_default=True, type=click.IntRange(0, 65535),
              help="Port the router listens on (0: a free one, printed).")
@click.option("--metrics-port", type=click.IntRange(1, 65535), metavar="PORT",
              help="The router's own Prometheus metrics, on 127.0.0.1 (default: --port + 1).")
@click.option("--token-file", type=click.Path(dir_okay=False),
              help="The workers' token: clients must show it to the router, which shows it to the workers.")
@click.option("--policy", type=click.Choice(POLICIES), default="cache_aware", show_default=True,
              help="cache_aware sends a prompt to the box that saw its prefix last (warm prompt cache).")
@click.option("--health-interval", default=5.0, show_default=True, type=click.FloatRange(1, 600), metavar="SECONDS",
              help="How often each box's GET /health is checked; 2 failures take it out, 1 success brings it back.")
@click.option("--print-config", is_flag=True, help="Print the router's settings (token hidden) and exit.")
@click.option("-v", "--verbose", is_flag=True, help="The router's own log at info level (default: warnings).")
def router_cmd(workers, host, port, metrics_port, token_file, policy, health_interval, print_config, verbose):
    """Spread requests over several 'edgeinfer serve --http' boxes.

    Runs sglang-router (pip install 'edgeinfer[fleet]') tuned for small boxes:
    prompts sharing a prefix go to the same box, a box that stops answering
    GET /health is taken out and comes back when it answers again. OpenAI
    routes only (chat, completions, embeddings, responses); see docs/fleet.md
    for Anthropic and JSON-lines traffic.

    \b
    On each box (same token file everywhere):
      edgeinfer serve MODEL --host 0.0.0.0 --http 8080 --token-file token
    On the router:
      edgeinfer router --worker http://pi1:8080 --worker http://pi2:8080 \\
          --host 0.0.0.0 --port 8000 --token-file token
    """
    token = read_token(None, token_file) if token_file else None
    if port == 0:
        port = free_port(host or "127.0.0.1")
    cfg = check(FleetConfig(workers=list(workers), host=host, port=port, metrics_port=metrics_port, token=token,
                            policy=policy, health_interval=health_interval, log_level="info" if verbose else "warn"))
    if print_config:
        shown = router_config(cfg)
        if shown.get("api_key"):
            shown["api_key"] = "(from --token-file)"
        for k, v in shown.items():
            click.echo(f"{k} = {v}")
        return
    click.echo(describe(cfg), err=True)
    run(cfg)
    click.echo("Stopped.", err=True)


COMMANDS = [router_cmd]
