"""The OpenAI face: ``POST /v1/chat/completions`` and ``/v1/completions``.

Requests are read as the OpenAI API documents them; a parameter this
server cannot honour (``n`` > 1, tools, log-probabilities, a logit bias) is
a 400 that names it, never silently ignored. Fields it does not know are
ignored, as newer clients send more than older servers read.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

from starlette.responses import JSONResponse, StreamingResponse

from ..events import DoneEvent
from ..speculative import MODES as SPEC_MODES
from .fields import Fields, text_content
from .http import Generation, api_error_from, sse

log = logging.getLogger("edgeinfer.http")

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
COMPLETIONS_DEFAULT_MAX_TOKENS = 16    # the OpenAI API's own default for /v1/completions

# Our finish reasons in OpenAI's words: a loop cut short reads as "length".
FINISH = {"stop": "stop", "length": "length", "repetition": "length", "cancelled": "length"}


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
    f.refuse("n", (1,), "only n=1 is supported: send several requests for several answers")
    f.refuse("logprobs", (False,), "log-probabilities are not supported")
    f.refuse("top_logprobs", (0,), "log-probabilities are not supported")
    f.refuse("logit_bias", lambda v: v == {}, "logit_bias is not supported")
    f.refuse("best_of", (1,), "only best_of=1 is supported")
    return out


def _max_tokens(f: Fields, front, n_prompt: int, default: int | None) -> int:
    n_ctx = front.engine.n_ctx
    v = f.integer("max_completion_tokens", 1, 1 << 31)
    if v is None:
        v = f.integer("max_tokens", 1, 1 << 31)
    if v is None:
        # A default that is the whole context would reserve all of it for
        # one request and stop every other from batching beside it.
        v = default or max(256, n_ctx // front.engine.n_seq_max)
    return max(1, min(v, n_ctx - n_prompt))


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


def _messages(f: Fields) -> list[dict]:
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
            raise f.bad(f"{name}.role", "must be system, developer, user or assistant (tools are not supported)")
        if m.get("tool_calls"):
            raise f.bad(f"{name}.tool_calls", "tool calls are not supported")
        out.append({"role": ROLES[role], "content": text_content(m.get("content"), f"{name}.content")})
    return out


def _common(f: Fields, front) -> dict:
    front.check_model(f.body.get("model"))
    for name in ("tools", "functions"):
        f.refuse(name, lambda v: v == [], f"{name} are not supported by this server")
    f.refuse("audio", lambda v: False, "audio output is not supported")
    f.refuse("modalities", lambda v: v == ["text"], "only text output is supported")
    # ignore_eos (run to max_tokens, for benchmarks) as vLLM and llama.cpp's server take it
    out = {"stream": f.boolean("stream"), "stop": f.stops("stop"), "seed": f.seed(),
           "sampling": _sampling(f), "include_usage": False, "ignore_eos": f.boolean("ignore_eos"),
           "speculative": f.choice("speculative", SPEC_MODES)}
    so = f.body.get("stream_options")
    if so is not None:
        if not isinstance(so, dict):
            raise f.bad("stream_options", "must be an object such as {\"include_usage\": true}")
        if not out["stream"]:
            raise f.bad("stream_options", "is only allowed with stream: true")
        out["include_usage"] = Fields(so).boolean("include_usage")
    return out


def _usage(stats) -> dict:
    return {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.generated_tokens,
            "total_tokens": stats.prompt_tokens + stats.generated_tokens,
            "prompt_tokens_details": {"cached_tokens": stats.cached_tokens}}


async def chat_completions(front, body: dict, request):
    f = Fields(body)
    c = _common(f, front)
    messages = _messages(f)
    schema = _response_format(f)
    engine = front.require_engine()
    tokens = await asyncio.to_thread(engine.chat_tokens, messages)
    max_tokens = _max_tokens(f, front, len(tokens), None)
    gen = await Generation.start(front, tokens, "/v1/chat/completions", json_schema=schema, max_tokens=max_tokens,
                                 stop=c["stop"], seed=c["seed"], ignore_eos=c["ignore_eos"],
                                 speculative=c["speculative"], **c["sampling"])
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": engine.name,
            "system_fingerprint": f"edgeinfer-{engine.native.setting}"}
    if not c["stream"]:
        text = await gen.text(request)
        st = gen.stats
        return JSONResponse({**head, "object": "chat.completion", "choices": [{
            "index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
            "logprobs": None, "finish_reason": FINISH.get(st.finish_reason, "stop")}], "usage": _usage(st)})

    def chunk(delta: dict, finish=None) -> dict:
        out = {**head, "object": "chat.completion.chunk",
               "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
        if c["include_usage"]:
            out["usage"] = None
        return out

    async def body_iter():
        yield sse(chunk({"role": "assistant", "content": ""}))
        async for ev in stream_events(gen, front, "/v1/chat/completions"):
            if isinstance(ev, bytes):
                yield ev
            elif isinstance(ev, DoneEvent):
                yield sse(chunk({}, FINISH.get(ev.stats.finish_reason, "stop")))
                if c["include_usage"]:
                    yield sse({**head, "object": "chat.completion.chunk", "choices": [],
                               "usage": _usage(ev.stats)})
            elif ev.text:
                yield sse(chunk({"content": ev.text}))
        yield sse("[DONE]")

    return StreamingResponse(body_iter(), media_type="text/event-stream", headers=_SSE_HEADERS)


async def completions(front, body: dict, request):
    f = Fields(body)
    c = _common(f, front)
    f.refuse("echo", (False,), "echo is not supported")
    f.refuse("suffix", lambda v: v == "", "suffix (fill-in-the-middle) is not supported")
    engine = front.require_engine()
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        tokens = await asyncio.to_thread(engine.tokenize, prompt)
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        if not all(0 <= t < engine.n_vocab for t in prompt):
            raise f.bad("prompt", f"token ids must be from 0 to {engine.n_vocab - 1}")
        tokens = list(prompt)
    else:
        raise f.bad("prompt", "must be a string, or a list of token ids (one prompt per request)")
    max_tokens = _max_tokens(f, front, len(tokens), COMPLETIONS_DEFAULT_MAX_TOKENS)
    gen = await Generation.start(front, tokens, "/v1/completions", max_tokens=max_tokens, stop=c["stop"],
                                 seed=c["seed"], ignore_eos=c["ignore_eos"],
                                 speculative=c["speculative"], **c["sampling"])
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": engine.name, "system_fingerprint": f"edgeinfer-{engine.native.setting}"}
    if not c["stream"]:
        text = await gen.text(request)
        st = gen.stats
        return JSONResponse({**head, "choices": [{"index": 0, "text": text, "logprobs": None,
                                                  "finish_reason": FINISH.get(st.finish_reason, "stop")}],
                             "usage": _usage(st)})

    def chunk(text: str, finish=None) -> dict:
        out = {**head, "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}
        if c["include_usage"]:
            out["usage"] = None
        return out

    async def body_iter():
        async for ev in stream_events(gen, front, "/v1/completions"):
            if isinstance(ev, bytes):
                yield ev
            elif isinstance(ev, DoneEvent):
                yield sse(chunk("", FINISH.get(ev.stats.finish_reason, "stop")))
                if c["include_usage"]:
                    yield sse({**head, "choices": [], "usage": _usage(ev.stats)})
            elif ev.text:
                yield sse(chunk(ev.text))
        yield sse("[DONE]")

    return StreamingResponse(body_iter(), media_type="text/event-stream", headers=_SSE_HEADERS)


_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def stream_events(gen: Generation, front, endpoint: str, error_event=None):
    """The stream's events; a failure after the headers went out becomes
    one error event (the OpenAI client raises it) instead of a cut stream.
    Counts the request once it ends."""
    status = 200
    t0 = time.perf_counter()
    try:
        async for ev in gen:
            yield ev
    except Exception as e:
        err = api_error_from(e)
        status = err.status
        yield sse(err.anthropic_body(), "error") if error_event else sse(err.openai_body())
    finally:
        front.metrics.count(endpoint, status)
        st = gen.stats
        if st is not None:
            log.info(
                "%s stream: %d+%d tokens (%d cached), %s, %.2f s", endpoint, st.prompt_tokens,
                st.generated_tokens, st.cached_tokens, st.finish_reason, time.perf_counter() - t0)
