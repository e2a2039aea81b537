"""The socket faces of an Engine: the JSON-lines server, the HTTP APIs
and the JSON-lines clients.

Every face parses its requests into one
:class:`~.generation.GenerationRequest` and formats the events
:func:`~.generation.run` streams back; ``generation.ERRORS`` says what
each exception means on every face. ``protocol`` parses JSON lines and
``jsonl`` serves them over asyncio; ``openai_api`` and ``anthropic_api``
parse and format HTTP with the toolkit in ``api``, and ``http`` mounts
them; ``client`` holds :class:`Client` and :class:`AsyncClient`.
"""

from .client import AsyncClient, Client
from .jsonl import DEFAULT_PORT, Options, Server, serve_forever

__all__ = ["AsyncClient", "Client", "DEFAULT_PORT", "Options", "Server", "serve_forever"]
