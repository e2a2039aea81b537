"""Whether a port can be listened on, asked before anything is loaded or
started: a server that would only find its port taken after loading its
models, or a native server that would abort, says so first."""

from __future__ import annotations

import errno
import socket

from ..errors import ServerConfigError


def check_port_free(host: str, port: int, hint: str) -> None:
    """ServerConfigError when ``port`` on ``host`` is taken (``hint``: what
    to do about it) or cannot be listened on."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # As a server's own socket: a listener counts, closed connections do not.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise ServerConfigError(f"port {port} on {host} is taken", hint=hint) from None
            raise ServerConfigError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
