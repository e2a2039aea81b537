"""Ports and limits of both servers, in a module light enough for the CLI
to import without loading the HTTP stack."""

DEFAULT_PORT = 8765              # JSON lines
DEFAULT_MAX_LINE = 1 << 20       # bytes in one JSON-lines request
DEFAULT_HTTP_PORT = 8080
DEFAULT_MAX_BODY = 4 << 20       # bytes in one HTTP body; a long prompt is well under this
