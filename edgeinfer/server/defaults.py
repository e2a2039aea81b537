"""Ports and limits of both servers, in a module light enough for the CLI
to import without loading the HTTP stack."""

DEFAULT_PORT = 8765              # JSON lines
DEFAULT_MAX_LINE = 1 << 20       # bytes in one JSON-lines request
DEFAULT_HTTP_PORT = 8080
DEFAULT_MAX_BODY = 1 << 20       # bytes in one HTTP body: about 250,000 tokens of text, past any context served
