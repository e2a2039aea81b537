"""The Ollama face: ``/api/*`` on the HTTP port (being built; see issue 24)."""

from __future__ import annotations

PATHS: tuple[str, ...] = ()   # the routes below, for /metrics' endpoint labels


def routes(front) -> list:
    """Starlette routes of the Ollama API, served by ``front`` (an HttpFront)."""
    return []
