"""llama-server's ``POST /infill`` (being built)."""

from __future__ import annotations


async def infill(front, body: dict, request):
    from .generation import RequestError

    raise RequestError("input_prefix", "/infill is not ready yet")
