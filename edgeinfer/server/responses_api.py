"""The OpenAI Responses API: ``POST /v1/responses``, stateless.

``input`` (text, or a list of items: messages, ``function_call`` and
``function_call_output``), ``instructions``, function ``tools`` with
``tool_choice`` and ``parallel_tool_calls``, ``max_output_tokens``,
``temperature``, ``top_p``, ``text.format`` (text, json_object,
json_schema) and streaming with the API's typed events. Nothing is
stored, so ``previous_response_id`` and ``conversation`` are refused
(send the whole input each time), as are ``background``, built-in tools
(web search, file search, ...), ``reasoning`` and ``include``.
"""

from __future__ import annotations

import json
import time
import uuid

from starlette.responses import JSONResponse, StreamingResponse

from ..events import DoneEvent, ToolCallEvent
from ..speculative import MODES as SPEC_MODES
from ..tools import arguments_object, check_choice, check_tools
from .api import SSE_HEADERS, Generation, sse, stream_events
from .fields import Fields
from .generation import GenerationRequest, RequestError

STATELESS = "this server keeps no responses: send the whole conversation as input each time"
REFUSED = {
    "previous_response_id": STATELESS,
    "conversation": STATELESS,
    "background": "background responses are not supported",
    "prompt": "stored prompts are not supported",
    "include": "include is not supported",
}
TEXT_BLOCKS = ("input_text", "output_text", "text")


def _text(content, where: str) -> str:
    """A message's content: a string or a list of text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for i, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind not in TEXT_BLOCKS or not isinstance(part.get("text"), str):
                what = "images are not supported; this server reads text only" \
                    if kind in ("input_image", "input_file") else "must be an input_text part"
                raise RequestError(f"{where}[{i}]", f"{where}[{i}]: {what}")
            parts.append(part["text"])
        return "".join(parts)
    raise RequestError(where, f"{where} must be a string or a list of input_text parts")


def _messages(f: Fields) -> list[dict]:
    """``instructions`` and ``input`` as chat messages."""
    out = []
    instructions = f.string("instructions")
    if instructions:
        out.append({"role": "system", "content": instructions})
    items = f.body.get("input")
    if isinstance(items, str):
        return out + [{"role": "user", "content": items}]
    if not isinstance(items, list) or not items:
        raise f.bad("input", "must be a string or a non-empty list of items")
    for i, item in enumerate(items):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise RequestError(where, f"{where} must be an object")
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise RequestError(f"{where}.role", f"{where}.role must be user, system, developer or assistant")
            out.append({"role": "system" if role == "developer" else role,
                        "content": _text(item.get("content"), f"{where}.content")})
        elif kind == "function_call":
            if not isinstance(item.get("name"), str) or not isinstance(item.get("call_id"), str):
                raise RequestError(where, f"{where}: a function_call needs call_id, name and arguments")
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"],
                                 "arguments": arguments_object(item.get("arguments", "{}"), f"{where}.arguments")}}
            if out and out[-1]["role"] == "assistant":   # calls after the text of one turn join it
                out[-1].setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            if not isinstance(item.get("call_id"), str) or not isinstance(output, (str, list)):
                raise RequestError(where, f"{where}: a function_call_output needs call_id and output")
            out.append({"role": "tool", "tool_call_id": item["call_id"],
                        "content": _text(output, f"{where}.output")})
        else:
            raise RequestError(f"{where}.type", f"{where}.type {str(kind)[:40]!r} is not supported: send "
                                                "message, function_call or function_call_output items")
    return out


def _tools(f: Fields, req: GenerationRequest) -> None:
    tools = f.body.get("tools")
    choice = f.body.get("tool_choice")
    if tools in (None, []):
        if choice not in (None, "auto", "none"):
            raise f.bad("tool_choice", "needs tools")
        return
    if not isinstance(tools, list):
        raise f.bad("tools", "must be a list of function tools")
    flat = []
    for i, t in enumerate(tools):
        if not isinstance(t, dict) or t.get("type") != "function":
            kind = t.get("type") if isinstance(t, dict) else None
            raise f.bad(f"tools[{i}]", f"only function tools are supported, not {str(kind)[:60]}")
        flat.append({"type": "function", "function": {k: t[k] for k in ("name", "description", "parameters")
                                                      if t.get(k) is not None}})
    req.tools = check_tools(flat)
    if isinstance(choice, dict) and choice.get("type") == "function":   # {"type": "function", "name": ...}
        choice = {"type": "function", "function": {"name": choice.get("name")}}
    check_choice(choice, req.tools)
    req.tool_choice = choice
    req.parallel_tool_calls = f.boolean("parallel_tool_calls", True)


def _format(f: Fields):
    text = f.body.get("text")
    if text is None:
        return None
    fmt = text.get("format") if isinstance(text, dict) else None
    if fmt is None and isinstance(text, dict):
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind not in ("text", "json_object", "json_schema") or \
            (kind == "json_schema" and not isinstance(fmt.get("schema"), dict)):
        raise f.bad("text.format", 'must be {"type": "text"}, {"type": "json_object"} or '
                                   '{"type": "json_schema", "name": ..., "schema": {...}}')
    return None if kind == "text" else "json" if kind == "json_object" else fmt["schema"]


def parse(f: Fields) -> GenerationRequest:
    """The request, every field read or refused by name."""
    for name, why in REFUSED.items():
        f.refuse(name, lambda v: v in (False, [], ""), why)
    f.refuse("reasoning", lambda v: v == {} or (isinstance(v, dict) and v.get("effort") in (None, "none")),
             "reasoning is not supported by these models")
    f.refuse("truncation", ("disabled",), 'only truncation "disabled" is supported: a long input is an error')
    f.refuse("top_logprobs", (0,), "log-probabilities are not supported")
    req = GenerationRequest(messages=_messages(f), max_tokens=f.integer("max_output_tokens", 1, 1 << 31),
                            seed=f.seed(), speculative=f.choice("speculative", SPEC_MODES))
    for name, lo, hi in (("temperature", 0.0, 2.0), ("top_p", 0.0, 1.0)):
        v = f.number(name, lo, hi)
        if v is not None:
            req.sampling[name] = v
    _tools(f, req)
    req.json_schema = _format(f)
    return req


def _usage(st) -> dict:
    return {"input_tokens": st.prompt_tokens, "input_tokens_details": {"cached_tokens": st.cached_tokens},
            "output_tokens": st.generated_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": st.prompt_tokens + st.generated_tokens}


class _Response:
    """The response object, as it grows."""

    def __init__(self, f: Fields, req: GenerationRequest, model: str):
        self.id = f"resp_{uuid.uuid4().hex}"
        self.output: list[dict] = []
        self.head = {
            "id": self.id, "object": "response", "created_at": int(time.time()), "model": model,
            "instructions": f.body.get("instructions"), "max_output_tokens": f.body.get("max_output_tokens"),
            "metadata": f.body.get("metadata") or {}, "parallel_tool_calls": req.parallel_tool_calls,
            "temperature": req.sampling.get("temperature", 1.0), "top_p": req.sampling.get("top_p", 1.0),
            "tool_choice": f.body.get("tool_choice", "auto"), "tools": f.body.get("tools") or [],
            "text": f.body.get("text") or {"format": {"type": "text"}}, "truncation": "disabled",
            "store": False, "error": None, "previous_response_id": None, "reasoning": None, "user": f.body.get("user"),
        }

    def body(self, status: str, stats=None) -> dict:
        out = {**self.head, "status": status, "output": self.output, "incomplete_details": None, "usage": None}
        if stats is not None:
            out["usage"] = _usage(stats)
            if stats.finish_reason in ("length", "repetition", "cancelled"):
                out["status"] = "incomplete"
                out["incomplete_details"] = {"reason": "max_output_tokens"}
        return out

    @staticmethod
    def message(text: str, status: str = "completed") -> dict:
        return {"type": "message", "id": f"msg_{uuid.uuid4().hex}", "status": status, "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": []}] if status == "completed" else []}

    @staticmethod
    def call(call_id: str, name: str, arguments: str, status: str = "completed") -> dict:
        return {"type": "function_call", "id": f"fc_{uuid.uuid4().hex}", "call_id": call_id, "name": name,
                "arguments": arguments, "status": status}


async def responses(front, body: dict, request):
    f = Fields(body)
    front.check_model(body.get("model"), required=True)
    req = parse(f)
    stream = f.boolean("stream")
    f.boolean("store", True)   # read: nothing is stored either way, and "store": false says so
    gen = await Generation.start(front, req, "/v1/responses", body)
    resp = _Response(f, req, gen.model.name)
    if not stream:
        reply = await gen.reply(request)
        if reply.content or not reply.tool_calls:
            resp.output.append(resp.message(reply.content))
        resp.output += [resp.call(c.id, c.name, json.dumps(c.arguments, ensure_ascii=False))
                        for c in reply.tool_calls]
        return JSONResponse(resp.body("completed", gen.stats))
    return StreamingResponse(_events(gen, front, resp), media_type="text/event-stream", headers=SSE_HEADERS)


async def _events(gen: Generation, front, resp: _Response):
    seq = 0

    def event(kind: str, **fields) -> bytes:
        nonlocal seq
        seq += 1
        return sse({"type": kind, "sequence_number": seq - 1, **fields}, kind)

    yield event("response.created", response=resp.body("in_progress"))
    yield event("response.in_progress", response=resp.body("in_progress"))
    item = None          # the output item being written
    text: list[str] = []
    args: list[str] = []

    def close():
        """The events that finish the item under way."""
        index = len(resp.output)
        if item["type"] == "message":
            whole = "".join(text)
            part = {"type": "output_text", "text": whole, "annotations": []}
            done = {**item, "status": "completed", "content": [part]}
            out = [event("response.output_text.done", item_id=item["id"], output_index=index, content_index=0,
                         text=whole),
                   event("response.content_part.done", item_id=item["id"], output_index=index, content_index=0,
                         part=part)]
        else:
            done = {**item, "status": "completed", "arguments": "".join(args)}
            out = [event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                         arguments=done["arguments"])]
        out.append(event("response.output_item.done", output_index=index, item=done))
        resp.output.append(done)
        return out

    async for ev in stream_events(gen, front, "/v1/responses"):
        if isinstance(ev, bytes):   # the stream failed: its error as the API's error event, then the end
            err = json.loads(ev.split(b"data: ", 1)[1])["error"]
            yield event("error", code=err.get("code") or err.get("type"), message=err["message"],
                        param=err.get("param"))
            return
        if isinstance(ev, DoneEvent):
            if item is None and not resp.output:   # an empty answer is one empty message
                item, text = resp.message("", "in_progress"), []
                yield event("response.output_item.added", output_index=0, item=item)
                yield event("response.content_part.added", item_id=item["id"], output_index=0, content_index=0,
                            part={"type": "output_text", "text": "", "annotations": []})
            if item is not None:
                for out in close():
                    yield out
            final = resp.body("completed", ev.stats)
            yield event("response.completed" if final["status"] == "completed" else "response.incomplete",
                        response=final)
            return
        if isinstance(ev, ToolCallEvent):
            if ev.first:
                if item is not None:
                    for out in close():
                        yield out
                item, args = resp.call(ev.id, ev.name, "", "in_progress"), []
                yield event("response.output_item.added", output_index=len(resp.output), item=item)
            elif ev.arguments:
                args.append(ev.arguments)
                yield event("response.function_call_arguments.delta", item_id=item["id"],
                            output_index=len(resp.output), delta=ev.arguments)
            if ev.done:
                for out in close():
                    yield out
                item = None
        elif ev.text:
            if item is None:
                item, text = resp.message("", "in_progress"), []
                index = len(resp.output)
                yield event("response.output_item.added", output_index=index, item=item)
                yield event("response.content_part.added", item_id=item["id"], output_index=index, content_index=0,
                            part={"type": "output_text", "text": "", "annotations": []})
            text.append(ev.text)
            yield event("response.output_text.delta", item_id=item["id"], output_index=len(resp.output),
                        content_index=0, delta=ev.text)

