"""The Anthropic face: ``POST /v1/messages`` (and ``/count_tokens``).

The Messages API as documented: ``system``, text content blocks,
``max_tokens`` required, ``stop_sequences``, ``temperature``, ``top_p``,
``top_k``; ``output_config.format`` for a JSON schema; streaming with its event sequence (message_start,
content_block_start, content_block_delta..., content_block_stop,
message_delta, message_stop). A last message from the assistant is a
prefill: the answer continues it. Errors come in Anthropic's own shape.
"""

from __future__ import annotations

import uuid

from starlette.responses import JSONResponse, StreamingResponse

from ..events import DoneEvent
from ..speculative import MODES as SPEC_MODES
from .api import SSE_HEADERS, Generation, sse, stream_events
from .fields import Fields, text_content
from .generation import GenerationRequest

# Our finish reasons as Anthropic stop reasons; a loop cut short reads as
# max_tokens, the reason that says "the answer was cut".
STOP_REASON = {"length": "max_tokens", "repetition": "max_tokens", "cancelled": "max_tokens"}


def _stop_reason(stats) -> str:
    if stats.finish_reason == "stop":
        return "stop_sequence" if stats.stop_sequence is not None else "end_turn"
    return STOP_REASON.get(stats.finish_reason, "end_turn")


def _conversation(f: Fields, images: list) -> dict:
    """The prompt fields of the request: chat messages for the template,
    and the assistant prefill if the conversation ends with one."""
    out = []
    system = f.body.get("system")
    if system is not None:
        out.append({"role": "system", "content": text_content(system, "system", images)})
    msgs = f.body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise f.bad("messages", 'must be a non-empty list of {"role": "user" | "assistant", "content": ...}')
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
            raise f.bad(f"messages[{i}].role", 'must be "user" or "assistant" (system goes in the top-level system)')
        out.append({"role": m["role"], "content": text_content(m.get("content"), f"messages[{i}].content", images)})
    prefill = None
    if out[-1]["role"] == "assistant":
        prefill = out.pop()["content"].rstrip()   # as Anthropic does: trailing whitespace is not allowed to matter
    return {"messages": out, "prefill": prefill}


def _request(f: Fields, front) -> GenerationRequest:
    """The request as far as count_tokens needs it: model and prompt."""
    front.check_model(f.body.get("model"), required=True)
    f.refuse("thinking", lambda v: isinstance(v, dict) and v.get("type") == "disabled",
             "extended thinking is not supported")
    images: list = []
    req = GenerationRequest(**_conversation(f, images))
    req.tools = None if f.body.get("tools") in (None, []) else f.body["tools"]
    names = {}
    if images:
        req.images, names["images"] = [block for _, block in images], images[0][0]
    req.refuse_unsupported(names)
    return req


def _output_schema(f: Fields):
    oc = f.body.get("output_config")
    if oc is None:
        return None
    fmt = oc.get("format") if isinstance(oc, dict) else None
    if not isinstance(oc, dict) or (fmt is not None and not (
            isinstance(fmt, dict) and fmt.get("type") == "json_schema" and isinstance(fmt.get("schema"), dict))):
        raise f.bad("output_config", 'format must be {"type": "json_schema", "schema": {...}}')
    return fmt["schema"] if fmt is not None else None


async def messages(front, body: dict, request):
    f = Fields(body)
    req = _request(f, front)
    req.max_tokens = f.integer("max_tokens", 1, 1 << 31)
    if req.max_tokens is None:
        raise f.bad("max_tokens", "is required: the most tokens the answer may have")
    for name, lo, hi in (("temperature", 0.0, 1.0), ("top_p", 0.0, 1.0)):
        v = f.number(name, lo, hi)
        if v is not None:
            req.sampling[name] = v
    top_k = f.integer("top_k", 0, 1_000_000)
    if top_k is not None:
        req.sampling["top_k"] = top_k
    req.json_schema = _output_schema(f)
    req.stop = f.stops("stop_sequences")
    stream = f.boolean("stream")
    req.seed = f.seed("seed")
    req.speculative = f.choice("speculative", SPEC_MODES)
    gen = await Generation.start(front, req, "/v1/messages", body)
    msg_id = f"msg_{uuid.uuid4().hex[:24]}"
    head = {"id": msg_id, "type": "message", "role": "assistant", "model": gen.model.name}

    if not stream:
        text = await gen.text(request)
        st = gen.stats
        return JSONResponse({**head, "content": [{"type": "text", "text": text}],
                             "stop_reason": _stop_reason(st), "stop_sequence": st.stop_sequence,
                             "usage": _usage(st)})

    async def body_iter():
        yield sse({"type": "message_start", "message": {
            **head, "content": [], "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": len(gen.tokens), "output_tokens": 0}}}, "message_start")
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

    return StreamingResponse(body_iter(), media_type="text/event-stream", headers=SSE_HEADERS)


def _usage(stats) -> dict:
    # Anthropic counts cached prompt tokens apart from the rest.
    return {"input_tokens": stats.prompt_tokens - stats.cached_tokens, "output_tokens": stats.generated_tokens,
            "cache_read_input_tokens": stats.cached_tokens, "cache_creation_input_tokens": 0}


async def count_tokens(front, body: dict, request):
    req = _request(Fields(body), front)
    model = await front.require_pool().model_for(body.get("model"))
    return JSONResponse({"input_tokens": await model.count(req)})
