"""The Anthropic face: ``POST /v1/messages`` (and ``/count_tokens``).

The Messages API as documented: ``system``, text content blocks,
``max_tokens`` required, ``stop_sequences``, ``temperature``, ``top_p``,
``top_k``; ``output_config.format`` for a JSON schema; custom ``tools``
with ``tool_choice`` (auto, any, tool, none), ``tool_use`` and
``tool_result`` blocks; streaming with its event sequence (message_start,
content_block_start, content_block_delta..., content_block_stop,
message_delta, message_stop). A last message from the assistant is a
prefill: the answer continues it. Errors come in Anthropic's own shape.
"""

from __future__ import annotations

import uuid

from starlette.responses import JSONResponse, StreamingResponse

from ..events import DoneEvent, ToolCallEvent
from ..speculative import MODES as SPEC_MODES
from ..tools import arguments_object, check_tools, named_choice
from .api import SSE_HEADERS, Generation, sse, stream_events
from .fields import Fields, text_content
from .generation import GenerationRequest, RequestError

# Our finish reasons as Anthropic stop reasons; a loop cut short reads as
# max_tokens, the reason that says "the answer was cut".
STOP_REASON = {"length": "max_tokens", "repetition": "max_tokens", "cancelled": "max_tokens",
               "tool_calls": "tool_use"}


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
        out += _message(m, f"messages[{i}]", images)
    prefill = None
    if out[-1]["role"] == "assistant" and not out[-1].get("tool_calls"):
        prefill = out.pop()["content"].rstrip()   # as Anthropic does: trailing whitespace is not allowed to matter
    return {"messages": out, "prefill": prefill}


def _message(m: dict, name: str, images: list) -> list[dict]:
    """One Anthropic message as chat messages: text blocks join into the
    content, ``tool_use`` blocks become the assistant's tool calls, and
    each ``tool_result`` block a tool message of its own."""
    content = m.get("content")
    if not isinstance(content, list):
        return [{"role": m["role"], "content": text_content(content, f"{name}.content", images)}]
    text, calls, results = [], [], []
    for j, block in enumerate(content):
        where = f"{name}.content[{j}]"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "tool_use" and m["role"] == "assistant":
            if not isinstance(block.get("name"), str) or not isinstance(block.get("id"), str):
                raise RequestError(where, f"{where}: a tool_use block needs an id, a name and an input")
            calls.append({"id": block["id"], "type": "function",
                          "function": {"name": block["name"],
                                       "arguments": arguments_object(block.get("input", {}), f"{where}.input")}})
        elif kind == "tool_result" and m["role"] == "user":
            if not isinstance(block.get("tool_use_id"), str):
                raise RequestError(where, f"{where}: a tool_result block needs the tool_use_id it answers")
            result = block.get("content", "")
            result = text_content(result, f"{where}.content", images) if result is not None else ""
            if block.get("is_error"):
                result = f"Error: {result}"
            results.append({"role": "tool", "tool_call_id": block["tool_use_id"], "content": result})
        elif kind in ("tool_use", "tool_result"):
            raise RequestError(where, f"{where}: a {kind} block belongs in a message from the "
                                      f"{'assistant' if kind == 'tool_use' else 'user'}")
        else:
            text.append(text_content([block], f"{name}.content", images))
    if m["role"] == "assistant":
        msg = {"role": "assistant", "content": "".join(text)}
        if calls:
            msg["tool_calls"] = calls
        return [msg]
    return results + ([{"role": "user", "content": "".join(text)}] if text or not results else [])


def _tools(f: Fields, req: GenerationRequest) -> None:
    """Anthropic's ``tools`` and ``tool_choice`` in the request's (OpenAI's) form."""
    tools = f.body.get("tools")
    choice = f.body.get("tool_choice")
    if tools in (None, []):
        if choice is not None and not (isinstance(choice, dict) and choice.get("type") in ("auto", "none")):
            raise f.bad("tool_choice", "needs tools")
        return
    if not isinstance(tools, list):
        raise f.bad("tools", "must be a list of tools")
    converted = []
    for i, t in enumerate(tools):
        if not isinstance(t, dict) or t.get("type", "custom") != "custom":
            kind = t.get("type") if isinstance(t, dict) else None
            raise f.bad(f"tools[{i}]", f"only custom tools (name, description, input_schema) are supported, "
                                       f"not {str(kind)[:60]}")
        fn = {"name": t.get("name"), "parameters": t.get("input_schema")}
        if t.get("description") is not None:
            fn["description"] = t["description"]
        converted.append({"type": "function", "function": fn})
    req.tools = check_tools(converted)
    if choice is not None:
        kind = choice.get("type") if isinstance(choice, dict) else None
        if kind not in ("auto", "any", "tool", "none"):
            raise f.bad("tool_choice", 'must be {"type": "auto"}, {"type": "any"}, {"type": "tool", "name": ...} '
                                       'or {"type": "none"}')
        if kind == "tool":
            named_choice(str(choice.get("name")), req.tools, "tool_choice.name")
            req.tool_choice = {"type": "function", "function": {"name": choice["name"]}}
        else:
            req.tool_choice = {"auto": "auto", "any": "required", "none": "none"}[kind]
        disable = choice.get("disable_parallel_tool_use", False)
        if not isinstance(disable, bool):
            raise f.bad("tool_choice.disable_parallel_tool_use", "must be true or false")
        req.parallel_tool_calls = not disable


def _request(f: Fields, front) -> GenerationRequest:
    """The request as far as count_tokens needs it: model and prompt."""
    front.check_model(f.body.get("model"), required=True)
    f.refuse("thinking", lambda v: isinstance(v, dict) and v.get("type") == "disabled",
             "extended thinking is not supported")
    images: list = []
    req = GenerationRequest(**_conversation(f, images))
    _tools(f, req)
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
        reply = await gen.reply(request)
        st = gen.stats
        content = [{"type": "text", "text": reply.content}] if reply.content or not reply.tool_calls else []
        content += [{"type": "tool_use", "id": c.id, "name": c.name, "input": c.arguments} for c in reply.tool_calls]
        return JSONResponse({**head, "content": content,
                             "stop_reason": _stop_reason(st), "stop_sequence": st.stop_sequence,
                             "usage": _usage(st)})

    async def body_iter():
        yield sse({"type": "message_start", "message": {
            **head, "content": [], "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": len(gen.tokens), "output_tokens": 0}}}, "message_start")
        # Blocks open as their content comes: text, or a tool call.
        block, open_block = -1, False    # the content block being written, and whether it is still open

        def start_text():
            return sse({"type": "content_block_start", "index": block,
                        "content_block": {"type": "text", "text": ""}}, "content_block_start")
        async for ev in stream_events(gen, front, "/v1/messages", error_event=True):
            if isinstance(ev, bytes):
                yield ev
                return
            if isinstance(ev, DoneEvent):
                st = ev.stats
                if block < 0:   # an empty answer is one empty text block
                    block, open_block = 0, True
                    yield start_text()
                if open_block:
                    yield sse({"type": "content_block_stop", "index": block}, "content_block_stop")
                yield sse({"type": "message_delta",
                           "delta": {"stop_reason": _stop_reason(st), "stop_sequence": st.stop_sequence},
                           "usage": _usage(st)}, "message_delta")
                yield sse({"type": "message_stop"}, "message_stop")
            elif isinstance(ev, ToolCallEvent):
                if ev.first:
                    if open_block:
                        yield sse({"type": "content_block_stop", "index": block}, "content_block_stop")
                    block, open_block = block + 1, True
                    yield sse({"type": "content_block_start", "index": block, "content_block": {
                        "type": "tool_use", "id": ev.id, "name": ev.name, "input": {}}}, "content_block_start")
                elif ev.arguments:
                    yield sse({"type": "content_block_delta", "index": block,
                               "delta": {"type": "input_json_delta", "partial_json": ev.arguments}},
                              "content_block_delta")
                if ev.done:
                    yield sse({"type": "content_block_stop", "index": block}, "content_block_stop")
                    open_block = False
            elif ev.text:
                if not open_block:
                    block, open_block = block + 1, True
                    yield start_text()
                yield sse({"type": "content_block_delta", "index": block,
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
