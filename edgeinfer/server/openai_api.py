"""The OpenAI face: ``POST /v1/chat/completions`` and ``/v1/completions``.

Requests are read as the OpenAI API documents them into a
:class:`~.generation.GenerationRequest`, tools and tool calls included
(edgeinfer.tools); a parameter this server cannot honour (``n`` > 1,
log-probabilities, a logit bias) is a 400 that names it, never silently
ignored. Fields it does not know are ignored, as
newer clients send more than older servers read.
"""

from __future__ import annotations

import time
import uuid

from starlette.responses import JSONResponse, StreamingResponse

from ..events import DoneEvent, ToolCallEvent
from ..speculative import MODES as SPEC_MODES
from ..tools import check_choice, check_tools, openai_calls
from .api import SSE_HEADERS, Generation, sse, stream_events
from .fields import Fields, text_content
from .generation import GenerationRequest, keep_alive_of

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
COMPLETIONS_DEFAULT_MAX_TOKENS = 16    # the OpenAI API's own default for /v1/completions

# Our finish reasons in OpenAI's words: a loop cut short reads as "length".
FINISH = {"stop": "stop", "length": "length", "repetition": "length", "cancelled": "length",
          "tool_calls": "tool_calls"}


def _sampling(f: Fields) -> dict:
    """OpenAI's sampling parameters mapped onto llama.cpp's sampler chain;
    top_k, min_p and repeat_penalty are accepted as extensions, as vLLM
    and llama.cpp's server accept them (and speculative, edgeinfer's own)."""
    out = {}
    for name, lo, hi in (("temperature", 0.0, 2.0), ("top_p", 0.0, 1.0), ("presence_penalty", -2.0, 2.0),
                         ("frequency_penalty", -2.0, 2.0), ("min_p", 0.0, 1.0), ("repeat_penalty", 0.0, 10.0)):
        v = f.number(name, lo, hi)
        if v is not None:
            out[name] = v
    top_k = f.integer("top_k", -1, 1_000_000)
    if top_k is not None:
        out["top_k"] = max(0, top_k)
    f.refuse("logit_bias", lambda v: v == {}, "logit_bias is not supported")
    f.refuse("best_of", (1,), "only best_of=1 is supported")
    return out


def _max_tokens(f: Fields):
    v = f.integer("max_completion_tokens", 1, 1 << 31)
    return f.integer("max_tokens", 1, 1 << 31) if v is None else v


def _response_format(f: Fields):
    rf = f.body.get("response_format")
    if rf is None:
        return None
    if not isinstance(rf, dict) or rf.get("type") not in ("text", "json_object", "json_schema"):
        raise f.bad("response_format", 'must be {"type": "text"}, {"type": "json_object"} or '
                                       '{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}')
    if rf["type"] == "text":
        return None
    if rf["type"] == "json_object":
        return "json"
    spec = rf.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
        raise f.bad("response_format", "json_schema needs an object with the schema under 'schema'")
    return spec.get("schema", {"type": "object"})


def _messages(f: Fields, images: list) -> list[dict]:
    msgs = f.body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise f.bad("messages", 'must be a non-empty list of {"role": ..., "content": ...}')
    out = []
    for i, m in enumerate(msgs):
        name = f"messages[{i}]"
        if not isinstance(m, dict):
            raise f.bad(name, "must be an object with role and content")
        role = m.get("role")
        if role not in ROLES:
            raise f.bad(f"{name}.role", "must be system, developer, user, assistant or tool")
        msg = {"role": ROLES[role]}
        if role == "assistant" and m.get("tool_calls"):
            msg["tool_calls"] = openai_calls(m["tool_calls"], f"{name}.tool_calls")
            msg["content"] = "" if m.get("content") is None else text_content(m["content"], f"{name}.content")
        else:
            msg["content"] = text_content(m.get("content"), f"{name}.content", images)
        if role == "tool":
            if not isinstance(m.get("tool_call_id"), str):
                raise f.bad(f"{name}.tool_call_id", "a tool message needs the tool_call_id it answers")
            msg["tool_call_id"] = m["tool_call_id"]
        out.append(msg)
    return out


def _request(f: Fields, front, prompt: dict, images: list,
             default_max_tokens: int | None) -> tuple[GenerationRequest, bool, bool]:
    """The request (``prompt``: its messages, prompt or tokens), and what
    only this face reads: stream, and stream_options.include_usage."""
    f.refuse("functions", lambda v: v == [], "functions are not supported by this server")
    f.refuse("audio", lambda v: False, "audio output is not supported")
    f.refuse("modalities", lambda v: v == ["text"], "only text output is supported")
    stream = f.boolean("stream")
    include_usage = False
    so = f.body.get("stream_options")
    if so is not None:
        if not isinstance(so, dict):
            raise f.bad("stream_options", "must be an object such as {\"include_usage\": true}")
        if not stream:
            raise f.bad("stream_options", "is only allowed with stream: true")
        include_usage = Fields(so).boolean("include_usage")
    max_tokens = _max_tokens(f)
    req = GenerationRequest(
        **prompt, max_tokens=default_max_tokens if max_tokens is None else max_tokens,
        stop=f.stops("stop"), seed=f.seed(), sampling=_sampling(f),
        # ignore_eos (run to max_tokens, for benchmarks) as vLLM and llama.cpp's server take it
        ignore_eos=f.boolean("ignore_eos"), speculative=f.choice("speculative", SPEC_MODES))
    # What no face supports yet goes into the request, which refuses it by name.
    names = {}
    body = f.body
    _tools(f, req)
    req.n = 1 if body.get("n") is None else body["n"]
    for name, off in (("logprobs", False), ("top_logprobs", 0)):
        if body.get(name) not in (None, off):
            req.logprobs, names["logprobs"] = body[name], name
    req.suffix = None if body.get("suffix") in (None, "") else body["suffix"]
    if images:
        req.images, names["images"] = [block for _, block in images], images[0][0]
    req.refuse_unsupported(names)
    return req, stream, include_usage


def _tools(f: Fields, req: GenerationRequest) -> None:
    """``tools``, ``tool_choice`` and ``parallel_tool_calls`` into the request."""
    tools = f.body.get("tools")
    if tools in (None, []):
        if f.body.get("tool_choice") not in (None, "none", "auto"):
            raise f.bad("tool_choice", "needs tools")
        return
    req.tools = check_tools(tools)
    req.tool_choice = f.body.get("tool_choice")
    check_choice(req.tool_choice, req.tools)
    req.parallel_tool_calls = f.boolean("parallel_tool_calls", True)


def _usage(stats) -> dict:
    return {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.generated_tokens,
            "total_tokens": stats.prompt_tokens + stats.generated_tokens,
            "prompt_tokens_details": {"cached_tokens": stats.cached_tokens}}


def _head(prefix: str, engine) -> dict:
    return {"id": f"{prefix}-{uuid.uuid4().hex}", "created": int(time.time()), "model": engine.name,
            "system_fingerprint": f"edgeinfer-{engine.native.setting}"}


async def chat_completions(front, body: dict, request):
    f = Fields(body)
    front.check_model(body.get("model"))
    images: list = []
    messages = _messages(f, images)
    req, stream, include_usage = _request(f, front, {"messages": messages}, images, None)
    req.json_schema = _response_format(f)
    gen = await Generation.start(front, req, "/v1/chat/completions", body)
    head = _head("chatcmpl", gen.model)
    if not stream:
        reply = await gen.reply(request)
        st = gen.stats
        message = {"role": "assistant", "content": reply.content, "refusal": None}
        if reply.tool_calls:
            message["content"] = reply.content or None
            message["tool_calls"] = [c.openai() for c in reply.tool_calls]
        return JSONResponse({**head, "object": "chat.completion", "choices": [{
            "index": 0, "message": message, "logprobs": None,
            "finish_reason": FINISH.get(st.finish_reason, "stop")}], "usage": _usage(st)})

    def chunk(delta: dict, finish=None) -> dict:
        out = {**head, "object": "chat.completion.chunk",
               "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
        if include_usage:
            out["usage"] = None
        return out

    async def body_iter():
        yield sse(chunk({"role": "assistant", "content": ""}))
        async for ev in stream_events(gen, front, "/v1/chat/completions"):
            if isinstance(ev, bytes):
                yield ev
            elif isinstance(ev, DoneEvent):
                yield sse(chunk({}, FINISH.get(ev.stats.finish_reason, "stop")))
                if include_usage:
                    yield sse({**head, "object": "chat.completion.chunk", "choices": [],
                               "usage": _usage(ev.stats)})
            elif isinstance(ev, ToolCallEvent):
                if ev.first:
                    yield sse(chunk({"tool_calls": [{"index": ev.index, "id": ev.id, "type": "function",
                                                     "function": {"name": ev.name, "arguments": ""}}]}))
                elif ev.arguments:
                    yield sse(chunk({"tool_calls": [{"index": ev.index, "function": {"arguments": ev.arguments}}]}))
            elif ev.text:
                yield sse(chunk({"content": ev.text}))
        yield sse("[DONE]")

    return StreamingResponse(body_iter(), media_type="text/event-stream", headers=SSE_HEADERS)


def _prompt(f: Fields) -> dict:
    prompt = f.body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return {"prompt": prompt}
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return {"tokens": list(prompt)}
    raise f.bad("prompt", "must be a string, or a list of token ids (one prompt per request)")


async def completions(front, body: dict, request):
    f = Fields(body)
    front.check_model(body.get("model"))
    f.refuse("echo", (False,), "echo is not supported")
    req, stream, include_usage = _request(f, front, _prompt(f), [], COMPLETIONS_DEFAULT_MAX_TOKENS)
    gen = await Generation.start(front, req, "/v1/completions", body)
    head = {**_head("cmpl", gen.model), "object": "text_completion"}
    if not stream:
        text = await gen.text(request)
        st = gen.stats
        return JSONResponse({**head, "choices": [{"index": 0, "text": text, "logprobs": None,
                                                  "finish_reason": FINISH.get(st.finish_reason, "stop")}],
                             "usage": _usage(st)})

    def chunk(text: str, finish=None) -> dict:
        out = {**head, "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}
        if include_usage:
            out["usage"] = None
        return out

    async def body_iter():
        async for ev in stream_events(gen, front, "/v1/completions"):
            if isinstance(ev, bytes):
                yield ev
            elif isinstance(ev, DoneEvent):
                yield sse(chunk("", FINISH.get(ev.stats.finish_reason, "stop")))
                if include_usage:
                    yield sse({**head, "choices": [], "usage": _usage(ev.stats)})
            elif ev.text:
                yield sse(chunk(ev.text))
        yield sse("[DONE]")

    return StreamingResponse(body_iter(), media_type="text/event-stream", headers=SSE_HEADERS)


async def embeddings(front, body: dict, request):
    """``POST /v1/embeddings``: vectors of an embedding model, normalised,
    as float lists or base64 (OpenAI's clients ask for base64 by default)."""
    from .embedding import EmbeddingRequest, encode_vectors, parse_input

    f = Fields(body)
    front.check_model(body.get("model"))
    encoding = f.choice("encoding_format", ("float", "base64")) or "float"
    truncate = body.get("truncate", True)   # an extension, as Ollama's field
    if not isinstance(truncate, bool):
        raise f.bad("truncate", "must be true or false")
    req = EmbeddingRequest(parse_input(body.get("input")), truncate=truncate)
    dimensions = f.integer("dimensions", 1, 1 << 20)
    model, out = await front.require_pool().embed(body.get("model"), req, keep_alive=keep_alive_of(body))
    width = out.vectors.shape[1] if out.vectors.ndim == 2 else 0
    if dimensions is not None and dimensions != width:
        raise f.bad("dimensions", f"{model.name} gives vectors of {width} dimensions only; leave dimensions "
                                  "out or set it to that")
    rows = encode_vectors(out.vectors) if encoding == "base64" else out.vectors.tolist()
    n = sum(out.n_tokens)
    return JSONResponse({"object": "list", "model": model.name,
                         "data": [{"object": "embedding", "index": i, "embedding": row} for i, row in enumerate(rows)],
                         "usage": {"prompt_tokens": n, "total_tokens": n}})
