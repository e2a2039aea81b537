"""A fleet of ``edgeinfer serve --http`` boxes behind an existing router.

edgeinfer does not route requests itself: ``edgeinfer router`` runs
sglang-router (a Rust router from pip, the ``edgeinfer[fleet]`` extra) in
this process, with settings for boxes that each decode a handful of
sequences rather than hundreds:

- ``cache_aware``: a request goes to the box whose recent prompts share the
  longest prefix with it, so each box's prompt cache stays warm;
- rebalancing as soon as one box has 2 more requests in flight than
  another and 1.2 times as many (the router's defaults, 64 and 1.5, are
  sized for GPU servers and would never rebalance a 4-slot box);
- ``GET /health`` every few seconds: a box that fails twice is taken out,
  one that answers once is back; a request the router could not deliver
  is retried on another box, so a client loses at most the requests the
  dead box was already running;
- one token for the router and the boxes: clients must show it to the
  router, which shows it to the boxes (each ``serve`` has the same
  ``--token-file``). The router's control routes (adding and removing
  workers) sit behind the same token.

:func:`router_config` is pure (what the router will be told, printable
and testable without the package); :func:`run` starts it and blocks.
See docs/fleet.md for what the router carries and what it does not.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from .errors import ServerConfigError
from .server.jsonl import is_loopback

ROUTER_PACKAGE = "sglang-router"
ROUTER_VERSION = "0.3.2"   # the one measured (docs/fleet.md); the extra pins >=0.3.2,<0.4
INSTALL = "pip install 'edgeinfer[fleet]'"
POLICIES = ("cache_aware", "round_robin", "power_of_two", "random")
DEFAULT_ROUTER_PORT = 8000


@dataclass
class FleetConfig:
    """What ``edgeinfer router`` was asked for, checked."""

    workers: list[str]
    host: str = "127.0.0.1"
    port: int = DEFAULT_ROUTER_PORT
    metrics_port: int | None = None     # None: port + 1
    token: str | None = None
    policy: str = "cache_aware"
    health_interval: float = 5.0
    log_level: str = "warn"
    extra: dict = field(default_factory=dict)


def worker_url(text: str) -> str:
    """``--worker``'s value as ``http://HOST:PORT``: a URL with a scheme, a
    host and a port and nothing after them, or a bare ``HOST:PORT``."""
    raw = text.strip()
    example = "give the address 'edgeinfer serve --http PORT' listens on, e.g. --worker http://192.168.1.20:8080"
    if "://" not in raw:
        raw = "http://" + raw
    try:
        parts = urlsplit(raw)
        port = parts.port
    except ValueError:
        raise ServerConfigError(f"--worker {text!r} is not a URL", hint=example) from None
    if parts.scheme not in ("http", "https"):
        raise ServerConfigError(f"--worker {text!r}: the router speaks http or https to its workers, "
                                f"not {parts.scheme}", hint=example)
    if not parts.hostname:
        raise ServerConfigError(f"--worker {text!r} names no host", hint=example)
    if port is None:
        raise ServerConfigError(f"--worker {text!r} names no port", hint=example)
    if parts.path.strip("/") or parts.query or parts.fragment or parts.username or parts.password:
        raise ServerConfigError(f"--worker {text!r}: give the server's address alone, with no path, query "
                                "or credentials (the token comes from --token-file)", hint=example)
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{parts.scheme}://{host}:{port}"


def check(cfg: FleetConfig) -> FleetConfig:
    """``cfg`` with its workers normalised, or ServerConfigError saying
    what to change."""
    if not cfg.workers:
        raise ServerConfigError("no workers given", hint="name each 'edgeinfer serve --http' box with --worker URL, "
                                                         "e.g. --worker http://pi1:8080 --worker http://pi2:8080")
    workers = [worker_url(w) for w in cfg.workers]
    seen = set()
    for w in workers:
        if w in seen:
            raise ServerConfigError(f"--worker {w} is given twice", hint="name each box once")
        seen.add(w)
    if cfg.policy not in POLICIES:
        raise ServerConfigError(f"unknown policy {cfg.policy!r}", hint="choose one of " + ", ".join(POLICIES))
    if not cfg.token:
        if not is_loopback(cfg.host):
            raise ServerConfigError(f"the router would listen on {cfg.host} without a token",
                                    hint="give it the workers' token with --token-file FILE, or keep it on "
                                         "127.0.0.1")
        off_box = [w for w in workers if not is_loopback(urlsplit(w).hostname)]
        if off_box:
            raise ServerConfigError(f"{off_box[0]} is not on this machine, and a server off loopback requires a "
                                    "token", hint="give the router the same token file as the workers: "
                                                  "--token-file FILE")
    metrics_port = cfg.metrics_port if cfg.metrics_port is not None else cfg.port + 1
    if metrics_port == cfg.port or not 0 < metrics_port < 65536:
        raise ServerConfigError(f"the router's metrics cannot use port {metrics_port}",
                                hint="choose another with --metrics-port PORT")
    return FleetConfig(workers=workers, host=cfg.host, port=cfg.port, metrics_port=metrics_port, token=cfg.token,
                       policy=cfg.policy, health_interval=cfg.health_interval, log_level=cfg.log_level,
                       extra=dict(cfg.extra))


def router_config(cfg: FleetConfig) -> dict:
    """The keyword arguments of sglang-router's ``RouterArgs`` for ``cfg``
    (already :func:`check`-ed). Every value that differs from the router's
    own default says why beside it."""
    interval = max(1, round(cfg.health_interval))
    out = dict(
        worker_urls=list(cfg.workers),
        host=cfg.host,
        port=cfg.port,
        policy=cfg.policy,
        # A 4-slot box is full at 4: rebalance at a difference of 2 requests
        # (defaults 64 and 1.5 suit GPU servers with hundreds of slots).
        balance_abs_threshold=2,
        balance_rel_threshold=1.2,
        # The router checks every box this often; two failures take it out,
        # one success brings it back (defaults 60 s, 3 and 2).
        health_check_endpoint="/health",
        health_check_interval_secs=interval,
        health_check_timeout_secs=max(2, interval),
        health_failure_threshold=2,
        health_success_threshold=1,
        # A box that is not up yet when the router starts is looked for
        # this often (default 30 s); a Pi may take minutes to load a model.
        worker_startup_check_interval=interval,
        worker_startup_timeout_secs=1800,
        # A refused connection is retried on another box at once, with
        # short waits (the default waits grow to 30 s).
        retry_max_retries=3,
        retry_initial_backoff_ms=50,
        retry_max_backoff_ms=2000,
        # After 5 failures in a row a box gets no traffic for 10 s, then is
        # tried again (defaults 10 and 60 s: a box back from a restart
        # would sit idle a minute).
        cb_failure_threshold=5,
        cb_timeout_duration_secs=10,
        # Each box queues and refuses ('busy') on its own (serve --queue).
        max_concurrent_requests=-1,
        # SIGTERM lets requests in flight finish for 30 s, as serve does.
        shutdown_grace_period_secs=30,
        api_key=cfg.token,
        # Its metrics listen on loopback only (its default is every
        # address, port 29000).
        prometheus_host="127.0.0.1",
        prometheus_port=cfg.metrics_port,
        log_level=cfg.log_level,
    )
    out.update(cfg.extra)
    return out


def describe(cfg: FleetConfig) -> str:
    """One line saying where the router listens and what it routes to."""
    auth = "token required" if cfg.token else "no token (loopback only)"
    host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
    return (f"Routing http://{host}:{cfg.port} to {len(cfg.workers)} workers ({', '.join(cfg.workers)}), "
            f"policy {cfg.policy}, {auth}; router metrics on http://127.0.0.1:{cfg.metrics_port}/metrics")


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now (for --port 0)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def load_router():
    """sglang-router's launcher and argument class, or ServerConfigError
    with the pip command that installs it."""
    try:
        from sglang_router.launch_router import launch_router
        from sglang_router.router_args import RouterArgs
    except ImportError as e:
        raise ServerConfigError(f"the router is not installed ({ROUTER_PACKAGE}: {e})",
                                hint=f"install it with: {INSTALL}   (or: pip install {ROUTER_PACKAGE})") from None
    return launch_router, RouterArgs


def run(cfg: FleetConfig) -> None:
    """Run the router for ``cfg`` (checked) in this process until it is
    stopped. The token goes to it as an argument of a Python call, never
    on a command line that ``ps`` would show."""
    launch_router, RouterArgs = load_router()
    from .server.listen import check_port_free

    check_port_free(cfg.host, cfg.port, "stop what listens there, or choose another with --port PORT")
    check_port_free("127.0.0.1", cfg.metrics_port,
                    "stop what listens there, or choose another with --metrics-port PORT")
    launch_router(RouterArgs(**router_config(cfg)))
