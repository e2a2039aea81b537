"""Checking the fields of an HTTP request body: each wrong one is a 400
that names it."""

from __future__ import annotations

from .generation import RequestError, check_stops


class Fields:
    """Typed reads of a JSON body; every refusal names the field."""

    def __init__(self, body: dict):
        self.body = body

    def bad(self, name: str, message: str) -> RequestError:
        return RequestError(name, f"{name}: {message}")

    def present(self, name: str) -> bool:
        return self.body.get(name) is not None

    def boolean(self, name: str, default: bool = False) -> bool:
        v = self.body.get(name)
        if v is None:
            return default
        if not isinstance(v, bool):
            raise self.bad(name, "must be true or false")
        return v

    def integer(self, name: str, lo: int, hi: int, default=None):
        v = self.body.get(name)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise self.bad(name, f"must be an integer from {lo} to {hi}")
        return v

    def number(self, name: str, lo: float, hi: float, default=None):
        v = self.body.get(name)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
            raise self.bad(name, f"must be a number from {lo:g} to {hi:g}")
        return float(v)

    def string(self, name: str, default=None):
        v = self.body.get(name)
        if v is None:
            return default
        if not isinstance(v, str):
            raise self.bad(name, "must be a string")
        return v

    def choice(self, name: str, allowed, default=None):
        v = self.body.get(name)
        if v is None:
            return default
        if v not in allowed:
            raise self.bad(name, f"must be one of {', '.join(allowed)}")
        return v

    def stops(self, name: str) -> list[str]:
        return check_stops(self.body.get(name), name)

    def seed(self, name: str = "seed"):
        v = self.integer(name, -(1 << 63), (1 << 64) - 1)
        return None if v is None else v % (1 << 32)   # llama.cpp's RNG takes 32 bits

    def refuse(self, name: str, unless, why: str) -> None:
        """400 when ``name`` is set to anything but the values ``unless``
        allows (a container of allowed values, or a predicate)."""
        if name not in self.body or self.body[name] is None:
            return
        v = self.body[name]
        ok = unless(v) if callable(unless) else v in unless
        if not ok:
            raise self.bad(name, why)


IMAGE_BLOCKS = ("image", "image_url", "input_image")


def text_content(content, name: str, images: list | None = None) -> str:
    """A message's content as text: a string, or a list of text blocks
    (``{"type": "text", "text": ...}``). Image blocks go to ``images``
    as ``(name, block)``, for the request to refuse by name; anything else
    is a 400."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for i, block in enumerate(content):
            if not isinstance(block, dict) or not isinstance(block.get("type"), str):
                raise RequestError(name, f"{name}[{i}]: a content block is an object with a type")
            if block["type"] in IMAGE_BLOCKS and images is not None:
                images.append((name, block))
                continue
            if block["type"] != "text":
                raise RequestError(name, f"{name}[{i}]: content of type {block['type'][:40]!r} is not "
                                         "supported; this server reads text only")
            if not isinstance(block.get("text"), str):
                raise RequestError(name, f"{name}[{i}].text must be a string")
            parts.append(block["text"])
        return "".join(parts)
    raise RequestError(name, f"{name} must be a string or a list of text blocks")
