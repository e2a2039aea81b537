"""Model references: ``name[:tag]``, validated so no name can reach
outside the store (Ollama's CVE-2024-37032 wrote files via ``../``)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import InvalidNameError

# Lower-case letters, digits and . _ - ; must start with a letter or digit,
# so '.', '..' and hidden names are impossible.
_PART = re.compile(r"^[a-z0-9][a-z0-9._-]{0,127}$")


@dataclass(frozen=True)
class ModelRef:
    name: str
    tag: str | None = None

    def __str__(self) -> str:
        return f"{self.name}:{self.tag}" if self.tag else self.name

    def with_tag(self, tag: str) -> "ModelRef":
        return ModelRef(self.name, check_part(tag, "tag"))


def check_part(value: str, what: str = "name") -> str:
    """Return ``value`` lower-cased, or raise InvalidNameError."""
    v = value.strip().lower()
    if not _PART.match(v) or ".." in v:
        raise InvalidNameError(f"invalid model {what} {value!r}")
    return v


def parse_ref(text: str) -> ModelRef:
    """Parse ``name`` or ``name:tag``; tags are case-insensitive."""
    if not isinstance(text, str) or not text:
        raise InvalidNameError("empty model name")
    if text.count(":") > 1:
        raise InvalidNameError(f"invalid model name {text!r}: more than one ':'")
    name, _, tag = text.partition(":")
    return ModelRef(check_part(name, "name"), check_part(tag, "tag") if tag else None)


def sanitize(text: str) -> str:
    """Turn a file stem such as ``SmolLM2-135M.Q4_1`` into a valid name part."""
    v = re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-._")
    v = re.sub(r"\.{2,}", ".", v)
    return v[:128] or "model"
