"""The OpenAI face: ``POST /v1/chat/completions`` and ``/v1/completions``.

Requests are read as the OpenAI API documents them into a
:class:`~.generation.GenerationRequest`: tools and tool calls
(edgeinfer.tools), log-probabilities (and ``echo`` on completions), a
logit bias, ``n`` answers (api.Choices), and a ``suffix`` on completions
(fill-in-the-middle, edgeinfer.fim). A parameter this server cannot
honour (images, audio, ``best_of``) is a 400 that names it, never
silently ignored. Fields it does not know are ignored, as
newer clients send more than older servers read.
"""

from __future__ import annotations

import json
import time
import uuid

from starlette.responses import JSONResponse, StreamingResponse

from ..events import DoneEvent, ToolCallEvent
from ..sampling import MAX_TOP_LOGPROBS
from ..speculative import MODES as SPEC_MODES
from ..tools import check_choice, check_tools, openai_calls
from .api import MAX_CHOICES, SSE_HEADERS, Choices, sse, stream_events
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


# Other servers' ways to constrain an answer, as clients written for them
# send them: read where they mean what ours do, refused by name where not.
GUIDED_SCHEMA = ("guided_json", "json_schema")   # vLLM's older field, llama.cpp's server's
REFUSED_GUIDES = {"guided_regex": "regular expressions", "guided_grammar": "vLLM's grammars",
                  "guided_whitespace_pattern": "whitespace patterns", "guided_decoding_backend": "decoding backends"}


def _constrain(f: Fields, req: GenerationRequest, response_format) -> None:
    """The one constraint on the answer: ``response_format``, vLLM's
    ``guided_json``/``guided_choice``/``structured_outputs``, or
    llama.cpp's ``json_schema`` and ``grammar`` (GBNF)."""
    found = {}
    if response_format is not None:
        found["response_format"] = ("schema", response_format)
    for name in GUIDED_SCHEMA:
        v = f.body.get(name)
        if v is not None:
            if not isinstance(v, (dict, str)):
                raise f.bad(name, "must be a JSON schema")
            found[name] = ("schema", v)
    if f.body.get("guided_choice") is not None:
        found["guided_choice"] = ("grammar", _choice_grammar(f, "guided_choice", f.body["guided_choice"]))
    if f.body.get("grammar") is not None:
        found["grammar"] = ("grammar", f.string("grammar"))
    so = f.body.get("structured_outputs")
    if so is not None:
        if not isinstance(so, dict) or len([k for k in so if so[k] is not None]) != 1 or \
                not ({"json", "choice"} & set(so)):
            raise f.bad("structured_outputs", 'only {"json": schema} and {"choice": [...]} are supported '
                                              "(regular expressions and grammars are not)")
        found["structured_outputs"] = ("schema", so["json"]) if so.get("json") is not None else \
            ("grammar", _choice_grammar(f, "structured_outputs.choice", so["choice"]))
    for name, what in REFUSED_GUIDES.items():
        f.refuse(name, lambda v: False, f"{what} are not supported; use response_format with a JSON schema")
    if len(found) > 1:
        raise f.bad(list(found)[1], f"give one constraint, not {' and '.join(found)}")
    for kind, value in found.values():
        if kind == "schema":
            req.json_schema = value
        else:
            req.grammar = value


def _choice_grammar(f: Fields, name: str, choices) -> str:
    """GBNF for exactly one of ``choices``, as it is (no JSON quotes)."""
    if not isinstance(choices, list) or not choices or not all(isinstance(c, str) and c for c in choices):
        raise f.bad(name, "must be a non-empty list of non-empty strings")
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


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
             default_max_tokens: int | None) -> tuple[GenerationRequest, bool, bool, int]:
    """The request (``prompt``: its messages, prompt or tokens), and what
    only this face reads: stream, stream_options.include_usage, and n."""
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
    lb = f.body.get("logit_bias")
    if lb is not None and not isinstance(lb, dict):
        raise f.bad("logit_bias", "must be an object of token ids to biases from -100 to 100")
    req.logit_bias = lb or None   # the ids are checked against the model's vocabulary where it runs
    n = f.integer("n", 1, MAX_CHOICES, 1)
    # What no face supports yet goes into the request, which refuses it by name.
    names = {}
    _tools(f, req)
    req.suffix = f.string("suffix")   # fill-in-the-middle (completions): the text after the cursor
    if images:
        req.images, names["images"] = [block for _, block in images], images[0][0]
    req.refuse_unsupported(names)
    return req, stream, include_usage, n


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
    req, stream, include_usage, n = _request(f, front, {"messages": messages}, images, None)
    _constrain(f, req, _response_format(f))
    top = f.integer("top_logprobs", 0, MAX_TOP_LOGPROBS)
    if f.boolean("logprobs"):
        req.logprobs = top or 0
    elif top:
        raise f.bad("top_logprobs", "needs logprobs: true")
    choices = await Choices.start(front, req, "/v1/chat/completions", body, n)
    head = _head("chatcmpl", choices.model)
    if not stream:
        out = []
        for i, reply in enumerate(await choices.replies(request)):
            message = {"role": "assistant", "content": reply.content, "refusal": None}
            if reply.tool_calls:
                message["content"] = reply.content or None
                message["tool_calls"] = [c.openai() for c in reply.tool_calls]
            out.append({"index": i, "message": message, "finish_reason": FINISH.get(reply.finish_reason, "stop"),
                        "logprobs": None if req.logprobs is None else {"content": reply.logprobs or [],
                                                                       "refusal": None}})
        return JSONResponse({**head, "object": "chat.completion", "choices": out, "usage": _usage(choices.stats)})

    def chunk(i: int, delta: dict, finish=None, logprobs=None) -> dict:
        out = {**head, "object": "chat.completion.chunk",
               "choices": [{"index": i, "delta": delta, "finish_reason": finish,
                            "logprobs": None if logprobs is None else {"content": logprobs, "refusal": None}}]}
        if include_usage:
            out["usage"] = None
        return out

    async def body_iter():
        for i in range(n):
            yield sse(chunk(i, {"role": "assistant", "content": ""}))
        async for item in stream_events(choices, front, "/v1/chat/completions"):
            if isinstance(item, bytes):
                yield item
                continue
            i, ev = item
            if isinstance(ev, DoneEvent):
                yield sse(chunk(i, {}, FINISH.get(ev.stats.finish_reason, "stop")))
            elif isinstance(ev, ToolCallEvent):
                if ev.first:
                    yield sse(chunk(i, {"tool_calls": [{"index": ev.index, "id": ev.id, "type": "function",
                                                        "function": {"name": ev.name, "arguments": ""}}]}))
                elif ev.arguments:
                    yield sse(chunk(i, {"tool_calls": [{"index": ev.index,
                                                        "function": {"arguments": ev.arguments}}]}))
            elif ev.text or ev.logprobs:
                yield sse(chunk(i, {"content": ev.text}, logprobs=ev.logprobs))
        if include_usage and choices.stats is not None:
            yield sse({**head, "object": "chat.completion.chunk", "choices": [], "usage": _usage(choices.stats)})
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


def legacy_logprobs(entries: list, offset: int = 0) -> dict:
    """Log-probability entries in /v1/completions' older shape: parallel
    lists of tokens, their log-probabilities, the top alternatives as
    {token: logprob}, and each token's offset in the text."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for e in entries:
        out["tokens"].append(e["token"])
        out["token_logprobs"].append(e["logprob"])
        out["top_logprobs"].append({a["token"]: a["logprob"] for a in e["top_logprobs"]})
        out["text_offset"].append(offset)
        offset += len(bytes(e["bytes"]).decode("utf-8", "ignore"))
    return out


def _echoed(run, entries: list) -> dict:
    """With echo: the prompt's entries, then the answer's. The first
    prompt token has no log-probability (nothing came before it); its
    text is what the other tokens leave of the prompt."""
    scored = (run.prompt_logprobs or [None])[1:]
    text = run.prompt_text or ""
    first = text[:max(0, len(text) - sum(len(bytes(e["bytes"]).decode("utf-8", "ignore")) for e in scored))]
    out = {"tokens": [first], "token_logprobs": [None], "top_logprobs": [None], "text_offset": [0]}
    for part in (legacy_logprobs(scored, len(first)), legacy_logprobs(entries, len(text))):
        for k in out:
            out[k] += part[k]
    return out


async def completions(front, body: dict, request):
    f = Fields(body)
    front.check_model(body.get("model"))
    echo = f.boolean("echo")
    zero = echo and body.get("max_tokens") == 0   # the prompt scored alone, as evaluation harnesses ask
    if zero:
        f = Fields({**body, "max_tokens": None})
    req, stream, include_usage, n = _request(f, front, _prompt(f), [], COMPLETIONS_DEFAULT_MAX_TOKENS)
    if zero:
        req.max_tokens = 0
    req.echo = echo
    req.logprobs = f.integer("logprobs", 0, MAX_TOP_LOGPROBS)
    _constrain(f, req, None)
    if echo and stream:
        raise f.bad("echo", "is only supported without stream")
    if req.suffix is not None and n == 1:   # code completion: a newer request from the editor ends this one
        from .infill_api import editor_key

        gen = await front.editors.start(front, req, body, editor_key("/v1/completions", request, body),
                                        "/v1/completions")
        if gen is None:   # typed past before it started: nothing to say
            return _superseded(body, stream)
        choices = Choices([gen])
    else:
        choices = await Choices.start(front, req, "/v1/completions", body, n)
    head = {**_head("cmpl", choices.model), "object": "text_completion"}
    if not stream:
        out = []
        for i, reply in enumerate(await choices.replies(request)):
            gen = choices.gens[i]._run
            text = (gen.prompt_text or "") + reply.content if echo else reply.content
            lp = None
            if req.logprobs is not None:
                lp = _echoed(gen, reply.logprobs or []) if echo else legacy_logprobs(reply.logprobs or [])
            out.append({"index": i, "text": text, "logprobs": lp,
                        "finish_reason": FINISH.get(reply.finish_reason, "stop")})
        return JSONResponse({**head, "choices": out, "usage": _usage(choices.stats)})

    def chunk(i: int, text: str, finish=None, logprobs=None) -> dict:
        out = {**head, "choices": [{"index": i, "text": text, "finish_reason": finish,
                                    "logprobs": None if logprobs is None else legacy_logprobs(logprobs)}]}
        if include_usage:
            out["usage"] = None
        return out

    async def body_iter():
        async for item in stream_events(choices, front, "/v1/completions"):
            if isinstance(item, bytes):
                yield item
                continue
            i, ev = item
            if isinstance(ev, DoneEvent):
                yield sse(chunk(i, "", FINISH.get(ev.stats.finish_reason, "stop")))
            elif ev.text or ev.logprobs:
                yield sse(chunk(i, ev.text, logprobs=ev.logprobs))
        if include_usage and choices.stats is not None:
            yield sse({**head, "choices": [], "usage": _usage(choices.stats)})
        yield sse("[DONE]")

    return StreamingResponse(body_iter(), media_type="text/event-stream", headers=SSE_HEADERS)


def _superseded(body: dict, stream: bool):
    """An empty completion, for a request a newer one ended before it began."""
    out = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
           "model": body.get("model") or "", "choices": [{"index": 0, "text": "", "finish_reason": "length",
                                                          "logprobs": None}],
           "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}}
    if not stream:
        return JSONResponse(out)
    return StreamingResponse(iter([sse(out), sse("[DONE]")]), media_type="text/event-stream", headers=SSE_HEADERS)


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
