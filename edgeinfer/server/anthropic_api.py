"""The Anthropic face: ``POST /v1/messages`` (and ``/count_tokens``).

The Messages API as documented: ``system``, text content blocks,
``max_tokens`` required, ``stop_sequences``, ``temperature``, ``top_p``,
``top_k``; ``output_config.format`` for a JSON schema; streaming with its event sequence (message_start,
content_block_start, content_block_delta..., content_block_stop,
message_delta, message_stop). A last message from the assistant is a
prefill: the answer continues it. Errors come in Anthropic's own shape.
"""

from __future__ import annotations

import asyncio
import uuid

from starlette.responses import JSONResponse, StreamingResponse

from ..events import DoneEvent
from ..speculative import MODES as SPEC_MODES
from .fields import Fields, text_content
from .http import Generation, sse
from .openai_api import stream_events

# Our finish reasons as Anthropic stop reasons; a loop cut short reads as
# max_tokens, the reason that says "the answer was cut".
STOP_REASON = {"length": "max_tokens", "repetition": "max_tokens", "cancelled": "max_tokens"}


def _stop_reason(stats) -> str:
    if stats.finish_reason == "stop":
        return "stop_sequence" if stats.stop_sequence is not None else "end_turn"
    return STOP_REASON.get(stats.finish_reason, "end_turn")


def _conversation(f: Fields) -> tuple[list[dict], str | None]:
    """Chat messages for the template, and the assistant prefill if the
    conversation ends with one."""
    out = []
    system = f.body.get("system")
    if system is not None:
        out.append({"role": "system", "content": text_content(system, "system")})
    msgs = f.body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise f.bad("messages", 'must be a non-empty list of {"role": "user" | "assistant", "content": ...}')
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
            raise f.bad(f"messages[{i}].role", 'must be "user" or "assistant" (system goes in the top-level system)')
        out.append({"role": m["role"], "content": text_content(m.get("content"), f"messages[{i}].content")})
    prefill = None
    if out[-1]["role"] == "assistant":
        prefill = out.pop()["content"].rstrip()   # as Anthropic does: trailing whitespace is not allowed to matter
    return out, prefill


async def _tokens(front, f: Fields) -> list[int]:
    messages, prefill = _conversation(f)
    engine = front.require_engine()

    def render():
        ids = engine.chat_tokens(messages)
        if prefill:
            ids += engine.tokenize(prefill, add_bos=False)
        return ids

    return await asyncio.to_thread(render)


def _refusals(f: Fields) -> None:
    f.refuse("tools", lambda v: v == [], "tools are not supported by this server")
    f.refuse("thinking", lambda v: isinstance(v, dict) and v.get("type") == "disabled",
             "extended thinking is not supported")


async def messages(front, body: dict, request):
    f = Fields(body)
    front.check_model(body.get("model"), required=True)
    _refusals(f)
    engine = front.require_engine()
    max_tokens = f.integer("max_tokens", 1, 1 << 31)
    if max_tokens is None:
        raise f.bad("max_tokens", "is required: the most tokens the answer may have")
    sampling = {}
    for name, lo, hi in (("temperature", 0.0, 1.0), ("top_p", 0.0, 1.0)):
        v = f.number(name, lo, hi)
        if v is not None:
            sampling[name] = v
    top_k = f.integer("top_k", 0, 1_000_000)
    if top_k is not None:
        sampling["top_k"] = top_k
    schema = None
    oc = body.get("output_config")
    if oc is not None:
        fmt = oc.get("format") if isinstance(oc, dict) else None
        if not isinstance(oc, dict) or (fmt is not None and not (
                isinstance(fmt, dict) and fmt.get("type") == "json_schema" and isinstance(fmt.get("schema"), dict))):
            raise f.bad("output_config", 'format must be {"type": "json_schema", "schema": {...}}')
        schema = fmt["schema"] if fmt is not None else None
    stops = f.stops("stop_sequences")
    stream = f.boolean("stream")
    tokens = await _tokens(front, f)
    max_tokens = max(1, min(max_tokens, engine.n_ctx - len(tokens)))
    gen = await Generation.start(front, tokens, "/v1/messages", json_schema=schema, max_tokens=max_tokens,
                                 stop=stops, seed=f.seed("seed"),
                                 speculative=f.choice("speculative", SPEC_MODES), **sampling)
    msg_id = f"msg_{uuid.uuid4().hex[:24]}"
    head = {"id": msg_id, "type": "message", "role": "assistant", "model": engine.name}

    if not stream:
        text = await gen.text(request)
        st = gen.stats
        return JSONResponse({**head, "content": [{"type": "text", "text": text}],
                             "stop_reason": _stop_reason(st), "stop_sequence": st.stop_sequence,
                             "usage": _usage(st)})

    async def body_iter():
        yield sse({"type": "message_start", "message": {
            **head, "content": [], "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": len(tokens), "output_tokens": 0}}}, "message_start")
        yield sse({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
                  "content_block_start")
        async for ev in stream_events(gen, front, "/v1/messages", error_event=True):
            if isinstance(ev, bytes):
                yield ev
                return
            if isinstance(ev, DoneEvent):
                st = ev.stats
                yield sse({"type": "content_block_stop", "index": 0}, "content_block_stop")
                yield sse({"type": "message_delta",
                           "delta": {"stop_reason": _stop_reason(st), "stop_sequence": st.stop_sequence},
                           "usage": _usage(st)}, "message_delta")
                yield sse({"type": "message_stop"}, "message_stop")
            elif ev.text:
                yield sse({"type": "content_block_delta", "index": 0,
                           "delta": {"type": "text_delta", "text": ev.text}}, "content_block_delta")

    return StreamingResponse(body_iter(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _usage(stats) -> dict:
    # Anthropic counts cached prompt tokens apart from the rest.
    return {"input_tokens": stats.prompt_tokens - stats.cached_tokens, "output_tokens": stats.generated_tokens,
            "cache_read_input_tokens": stats.cached_tokens, "cache_creation_input_tokens": 0}


async def count_tokens(front, body: dict, request):
    f = Fields(body)
    front.check_model(body.get("model"), required=True)
    _refusals(f)
    tokens = await _tokens(front, f)
    return JSONResponse({"input_tokens": len(tokens)})


