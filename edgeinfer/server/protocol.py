"""The JSON-lines protocol: one JSON object per line each way, UTF-8.

Requests carry an ``id`` and an ``op``; every reply carries the request's
``id`` and an ``event``. This module only parses and checks: it turns a
line into a :class:`Call` (whose ``request`` is a
:class:`~.generation.GenerationRequest` for ``generate`` and ``chat``) or
raises :class:`ProtocolError` with the code and message the client will
see. docs/protocol.md describes the wire format with examples.

It loads nothing heavy (no llama.cpp), as the client imports it.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass

from ..sampling import MAX_TOP_LOGPROBS, OPTIONS, check_value
from ..speculative import MODES as SPEC_MODES
from . import generation
from .generation import GenerationRequest, RequestError

OPS = ("generate", "chat", "embed", "cancel", "models", "health", "stats")
GENERATING_OPS = ("generate", "chat", "run")
# Ops a model's own process answers to the server that started it (on a
# Unix socket only that server can open): "run" carries a whole
# GenerationRequest, parsed already by the face that received it;
# "count" renders one and says how many tokens its prompt is; "threads"
# sets the threads it decodes with (edgeinfer.pool).
INTERNAL_OPS = ("run", "count", "threads")
MAX_ID = 128            # characters in a request id
MAX_MESSAGES = 4096

# Error codes a client may see, and what each means.
CODES = {
    "bad_json": "the line is not a JSON object",
    "bad_request": "a field is missing, has the wrong type or is out of range",
    "unknown_op": "op is not one of " + ", ".join(OPS),
    "line_too_long": "the line is longer than the server accepts",
    "duplicate_id": "a request with this id is still running on this connection",
    "unauthorized": "the token is missing or wrong",
    "context_overflow": "the prompt does not fit in the context",
    "bad_schema": "the JSON schema or grammar cannot constrain generation",
    "busy": "every sequence is taken and the queue is full; retry later",
    "not_found": "the model or request named is not here",
    "http": "this port speaks JSON lines, not HTTP",
    "shutting_down": "the server is stopping",
    "internal": "the server failed; the connection stays usable",
}
assert {m.code for _, m in generation.ERRORS} <= set(CODES)


class ProtocolError(Exception):
    """A request the server answers with an ``error`` event."""

    def __init__(self, code: str, message: str, request_id=None):
        super().__init__(message)
        assert code in CODES, code
        self.code = code
        self.request_id = request_id

    def event(self) -> dict:
        return error_event(self.request_id, self.code, str(self))

    @classmethod
    def of(cls, e: Exception, request_id=None) -> "ProtocolError":
        """``e`` as the error event generation.ERRORS says it is."""
        return cls(generation.meaning(e).code, generation.message(e), request_id)


@dataclass
class Call:
    """A checked request."""

    id: str | int | None
    op: str
    token: str | None = None
    target: str | int | None = None
    gently: bool = False                          # cancel: end it between steps, its prompt read to the end
    model: str | None = None
    stream: bool = True
    request: GenerationRequest | None = None      # generate, chat and run
    threads: int | None = None                    # threads
    keep_alive: float | None = None               # seconds the model stays loaded after this request
    embedding: object = None                      # embed: a server.embedding.EmbeddingRequest
    encoding: str = "float"                       # embed: vectors as "float" lists or "base64"


def error_event(request_id, code: str, message: str) -> dict:
    return {"id": request_id, "event": "error", "code": code, "message": message}


def encode(obj: dict) -> bytes:
    return (json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")


_HTTP_REQUEST_LINE = re.compile(rb"^[A-Z]{3,10} \S+ HTTP/\d")


def looks_like_http(line: bytes) -> bool:
    """An HTTP request line, as a browser or curl would send first."""
    return bool(_HTTP_REQUEST_LINE.match(line[:2048]))


def parse(line: bytes, *, n_ctx: int, internal: bool = False) -> Call:
    """One request line to a Call; raises ProtocolError. ``internal``:
    the INTERNAL_OPS are known too."""
    try:
        obj = generation.load_json(line)
    except ValueError as e:
        raise ProtocolError("bad_json", f"not JSON: {e}") from None
    if not isinstance(obj, dict):
        raise ProtocolError("bad_json", "a request is a JSON object, as in "
                                        '{"id": "r1", "op": "generate", "prompt": "Hello"}')
    rid = obj.get("id")
    if rid is not None and (isinstance(rid, bool) or not isinstance(rid, (str, int)) or
                            (isinstance(rid, str) and len(rid) > MAX_ID)):
        raise ProtocolError("bad_request", f"id must be a string of at most {MAX_ID} characters or an integer")

    def bad(message: str):
        return ProtocolError("bad_request", message, rid)

    op = obj.get("op")
    if not isinstance(op, str):
        raise bad('op is required, e.g. "op": "generate"')
    if op not in OPS and not (internal and op in INTERNAL_OPS):
        raise ProtocolError("unknown_op", f"unknown op {op[:40]!r}: use one of {', '.join(OPS)}", rid)
    token = obj.get("token")
    if token is not None and not isinstance(token, str):
        raise bad("token must be a string")
    call = Call(id=rid, op=op, token=token)
    model = obj.get("model")
    if model is not None and not isinstance(model, str):
        raise bad("model must be a string")
    call.model = model
    if obj.get("keep_alive") is not None:
        try:
            call.keep_alive = generation.parse_keep_alive(obj["keep_alive"])
        except RequestError as e:
            raise bad(str(e)) from None
        if call.keep_alive is None:
            call.keep_alive = float("inf")
    if op == "cancel":
        target = obj.get("target")
        if isinstance(target, bool) or not isinstance(target, (str, int)):
            raise bad("cancel needs target: the id of a request on this connection")
        call.target = target
        call.gently = obj.get("gently") is True
        return call
    if op == "threads":
        n = obj.get("threads")
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 512:
            raise bad("threads must be an integer from 1 to 512")
        call.threads = n
        return call
    if op in ("run", "count"):
        return _internal_run(call, obj, bad)
    if op == "embed":
        return _embed(call, obj, bad)
    if op not in GENERATING_OPS:
        return call
    if rid is None:
        raise bad(f"{op} needs an id, so its events can be told apart")
    if op == "generate":
        prompt = obj.get("prompt")
        if not isinstance(prompt, str):
            raise bad("generate needs prompt: a string")
        req = GenerationRequest(prompt=prompt)
    else:
        req = GenerationRequest(messages=_messages(obj.get("messages"), bad))
    stream = obj.get("stream", True)
    if not isinstance(stream, bool):
        raise bad("stream must be true or false")
    call.stream = stream
    max_tokens = obj.get("max_tokens", 256)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 1 <= max_tokens <= n_ctx:
        raise bad(f"max_tokens must be an integer from 1 to {n_ctx} (the context size)")
    req.max_tokens = max_tokens
    try:
        req.stop = generation.check_stops(obj.get("stop"), "stop")
    except RequestError as e:
        raise bad(str(e)) from None
    seed = obj.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 32):
        raise bad("seed must be an integer from 0 to 4294967295")
    req.seed = seed
    ignore_eos = obj.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise bad("ignore_eos must be true or false")
    req.ignore_eos = ignore_eos
    json_schema, grammar = obj.get("json_schema"), obj.get("grammar")
    if json_schema is not None and not (isinstance(json_schema, dict) or json_schema == "json"):
        raise bad('json_schema must be a JSON schema (an object) or "json" for any JSON object')
    if grammar is not None and not isinstance(grammar, str):
        raise bad("grammar must be a string of GBNF")
    if json_schema is not None and grammar is not None:
        raise bad("give json_schema or grammar, not both")
    req.json_schema, req.grammar = json_schema, grammar
    speculative = obj.get("speculative")
    if speculative is not None:
        if speculative not in SPEC_MODES:
            raise bad(f"speculative must be one of {', '.join(SPEC_MODES)}")
        req.speculative = speculative
    for name in OPTIONS:
        if obj.get(name) is not None:
            try:
                req.sampling[name] = check_value(name, obj[name])
            except RequestError as e:
                raise bad(str(e)) from None
    if obj.get("tools") is not None:
        if op != "chat":
            raise bad("tools need a chat: use op chat")
        parallel = obj.get("parallel_tool_calls", True)
        if not isinstance(parallel, bool):
            raise bad("parallel_tool_calls must be true or false")
        try:
            from ..tools import ToolUse

            use = ToolUse.of(obj["tools"], obj.get("tool_choice"), parallel)
        except RequestError as e:
            raise bad(str(e)) from None
        req.tools, req.tool_choice, req.parallel_tool_calls = use.tools, obj.get("tool_choice"), parallel
    elif obj.get("tool_choice") is not None:
        raise bad("tool_choice needs tools")
    logprobs = obj.get("logprobs")
    if logprobs is not None:
        if isinstance(logprobs, bool) or not isinstance(logprobs, int) or not 0 <= logprobs <= MAX_TOP_LOGPROBS:
            raise bad(f"logprobs must be an integer from 0 to {MAX_TOP_LOGPROBS}: how many alternatives to give "
                      "beside each token's log-probability")
        req.logprobs = logprobs
    if obj.get("logit_bias") is not None:
        if not isinstance(obj["logit_bias"], dict):
            raise bad("logit_bias must be an object of token ids to biases from -100 to 100")
        req.logit_bias = obj["logit_bias"]   # the ids are checked against the model's vocabulary where it runs
    # Fields the request model has but this server does not honour yet
    # (n, suffix, images) are unknown here, so refused.
    known = {"id", "op", "token", "model", "keep_alive", "prompt", "messages", "stream", "max_tokens", "stop",
             "seed", "ignore_eos", "json_schema", "grammar", "speculative", "tools", "tool_choice",
             "parallel_tool_calls", "logprobs", "logit_bias", *OPTIONS}
    unknown = sorted(set(obj) - known)
    if unknown:
        raise bad(f"unknown field(s): {', '.join(unknown)[:200]}")
    call.request = req
    return call


def tool_call_event(rid, ev, tokens: bool = False) -> dict:
    """A "tool_call" event: a piece of a call (edgeinfer.events.ToolCallEvent)."""
    out = {"id": rid, "event": "tool_call", "index": ev.index, "call_id": ev.id, "name": ev.name,
           "arguments": ev.arguments}
    if ev.first:
        out["first"] = True
    if ev.done:
        out["done"] = True
    if tokens:
        out["tokens"] = ev.tokens
    return out


def _embed(call: Call, obj: dict, bad) -> Call:
    from .embedding import EmbeddingRequest, parse_input

    if call.id is None:
        raise bad("embed needs an id, so its result can be told apart")
    unknown = sorted(set(obj) - {"id", "op", "token", "model", "keep_alive", "input", "truncate",
                                 "encoding_format"})
    if unknown:
        raise bad(f"unknown field(s): {', '.join(unknown)[:200]}")
    truncate = obj.get("truncate", True)
    if not isinstance(truncate, bool):
        raise bad("truncate must be true or false")
    encoding = obj.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise bad('encoding_format must be "float" or "base64"')
    try:
        call.embedding = EmbeddingRequest(parse_input(obj.get("input")), truncate=truncate)
    except RequestError as e:
        raise bad(str(e)) from None
    call.encoding = encoding
    return call


def _internal_run(call: Call, obj: dict, bad) -> Call:
    """A GenerationRequest sent whole by the server that started this
    process: its face checked every field already."""
    fields = obj.get("request")
    stream = obj.get("stream", True)
    if not isinstance(fields, dict) or not isinstance(stream, bool):
        raise bad("run needs request: the fields of a GenerationRequest")
    try:
        call.request = GenerationRequest(**fields)
    except TypeError as e:
        raise bad(f"request: {e}") from None
    call.stream = stream
    return call


def request_fields(req: GenerationRequest) -> dict:
    """``req`` as the ``request`` of a "run" line: its fields that differ
    from the defaults."""
    out = {}
    for f in dataclasses.fields(req):
        v = getattr(req, f.name)
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if v != default:
            out[f.name] = v
    return out


def _messages(messages, bad) -> list[dict]:
    from ..tools import openai_calls

    if not isinstance(messages, list) or not messages:
        raise bad('chat needs messages: a list of {"role": ..., "content": ...}')
    if len(messages) > MAX_MESSAGES:
        raise bad(f"at most {MAX_MESSAGES} messages")
    out = []
    for i, m in enumerate(messages):
        calls = m.get("tool_calls") if isinstance(m, dict) and m.get("role") == "assistant" else None
        content = m.get("content") if isinstance(m, dict) else None
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "tool") or \
                not (isinstance(content, str) or (calls and content is None)):
            raise bad(f"messages[{i}] needs a role (system, user, assistant or tool) and string content")
        msg = {"role": m["role"], "content": content or ""}
        if calls:
            try:
                msg["tool_calls"] = openai_calls(calls, f"messages[{i}].tool_calls")
            except RequestError as e:
                raise bad(str(e)) from None
        if m["role"] == "tool" and isinstance(m.get("tool_call_id"), str):
            msg["tool_call_id"] = m["tool_call_id"]
        out.append(msg)
    return out
