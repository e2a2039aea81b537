"""The socket faces of an Engine: the JSON-lines server and its clients.

``protocol`` parses and checks requests, ``jsonl`` serves them over
asyncio, ``client`` holds :class:`Client` and :class:`AsyncClient`.
"""

from .client import AsyncClient, Client
from .jsonl import DEFAULT_PORT, Options, Server, serve_forever

__all__ = ["AsyncClient", "Client", "DEFAULT_PORT", "Options", "Server", "serve_forever"]
