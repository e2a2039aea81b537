"""The Ollama face: ``/api/*`` on the HTTP port, so programs written for
Ollama's own API (Home Assistant, Raycast, editors, the ``ollama``
clients) work unchanged. docs/ollama.md says what is covered and what
differs.

``/api/chat`` and ``/api/generate`` read a request into the one
:class:`~.generation.GenerationRequest` and stream its events as
newline-delimited JSON (Ollama's default; ``stream: false`` for one
object), the last with ``done: true``, why it ended and its timings in
nanoseconds. ``options`` map onto the sampler; options this server has
no use for are ignored, as Ollama ignores what it does not know, and
logged. Every other field is honoured or refused by name. Model
management (tags, show, ps, delete, copy) and the names Ollama's
clients use are in :mod:`.ollama_models`, pulling in :mod:`.ollama_pull`.
"""

from __future__ import annotations

import json
import logging
import time

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from .. import __version__
from ..events import DoneEvent, ToolCallEvent
from ..sampling import MAX_TOP_LOGPROBS, OPTIONS, check_value
from ..tools import check_tools, openai_calls
from . import ollama_models, ollama_pull
from .api import ApiError, Generation, stream_events
from .fields import Fields
from .generation import GenerationRequest, RequestError, keep_alive_of
from .ollama_models import model_field, ndjson, our_name

log = logging.getLogger("edgeinfer.http")

# The version of Ollama's API this face follows: clients compare it with
# the oldest Ollama they support (VS Code's Copilot refuses a version it
# cannot read as a number).
API_VERSION = "0.12.0"
NDJSON = "application/x-ndjson"

# Our finish reasons in Ollama's words: a loop cut short reads as "length".
DONE_REASON = {"stop": "stop", "length": "length", "repetition": "length", "cancelled": "length",
               "tool_calls": "stop"}

# Options Ollama takes that change nothing here: how its runner loads a
# model (the context, threads and batch are the server's, set at start),
# and samplers llama.cpp's chain here does not use. Ignored, and logged.
IGNORED_OPTIONS = ("num_keep", "typical_p", "tfs_z", "mirostat", "mirostat_tau", "mirostat_eta",
                   "penalize_newline", "numa", "num_batch", "num_gpu", "main_gpu", "low_vram", "f16_kv",
                   "logits_all", "vocab_only", "use_mmap", "use_mlock", "embedding_only", "num_thread")


def now() -> str:
    return ollama_models.iso(time.time())


# -- options ---------------------------------------------------------------------------
def apply_options(f: Fields, req: GenerationRequest, model: str) -> None:
    """Ollama's ``options`` onto the request: the sampler's options by
    their own names (edgeinfer.sampling.OPTIONS, which include Ollama's),
    ``seed``, ``stop``, ``num_predict``; ``num_ctx`` is the server's (the
    context is set when a model loads), the rest ignored. A bad value of
    an option it reads is a 400 naming it."""
    opts = f.body.get("options")
    if opts is None:
        return
    if not isinstance(opts, dict):
        raise f.bad("options", 'must be an object such as {"temperature": 0.2, "num_predict": 64}')
    ignored, unknown = [], []
    for name, value in opts.items():
        where = f"options.{name}"
        if value is None:
            continue
        if name in OPTIONS:
            req.sampling[name] = check_value(name, value, "options.")
        elif name == "seed":
            seed = Fields({where: value}).integer(where, -(1 << 63), (1 << 64) - 1)
            req.seed = None if seed < 0 else seed % (1 << 32)   # Ollama's -1: a random seed
        elif name == "stop":
            req.stop = Fields({where: value}).stops(where)
        elif name == "num_predict":
            n = Fields({where: value}).integer(where, -2, 1 << 31)
            if n == 0:
                raise RequestError(where, f"{where} must be at least 1, or -1 for up to the end of the context")
            req.max_tokens = (1 << 31) if n < 0 else n   # fitted to what the context has left
        elif name == "num_ctx":
            Fields({where: value}).integer(where, 1, 1 << 24)
            ignored.append(name)
        elif name in IGNORED_OPTIONS:
            ignored.append(name)
        else:
            unknown.append(name[:40])
    if ignored:
        log.info("%s: Ollama options with no use here, ignored: %s (a model's context, threads and batch "
                 "are set when it loads; docs/ollama.md)", model, ", ".join(sorted(ignored)))
    if unknown:
        log.info("%s: unknown options ignored, as Ollama ignores them: %s", model, ", ".join(sorted(unknown)[:20]))


def _format(f: Fields):
    """``format``: "json" (any JSON object) or a JSON schema; "" for none."""
    v = f.body.get("format")
    if v is None or v == "":
        return None
    if v == "json" or isinstance(v, dict):
        return v
    raise f.bad("format", 'must be "json" or a JSON schema (an object)')


def _common(f: Fields, req: GenerationRequest, model: str) -> tuple[bool, float | None]:
    """What /api/chat and /api/generate share: options, format, logprobs
    and the fields refused by name. Returns ``stream`` and ``keep_alive``
    (checked here, so a bad duration is a 400 before anything runs)."""
    apply_options(f, req, model)
    req.json_schema = _format(f)
    top = f.integer("top_logprobs", 0, MAX_TOP_LOGPROBS)
    if f.boolean("logprobs"):
        req.logprobs = top or 0
    elif top:
        raise f.bad("top_logprobs", "needs logprobs: true")
    # think: models here do not think out loud apart from their answer; the
    # field is read (a value of the wrong type is still an error) and has no effect.
    think = f.body.get("think")
    if think is not None and not isinstance(think, (bool, str)):
        raise f.bad("think", 'must be true, false, or "low", "medium" or "high"')
    f.refuse("truncate", (False,), "only false is supported: a prompt longer than the context is refused, "
                                   "never cut; shorten the conversation")
    f.refuse("shift", (False,), "only false is supported: an answer stops at the end of the context")
    return f.boolean("stream", True), keep_alive_of(f.body)


# -- /api/generate and /api/chat ----------------------------------------------------
def _generate_request(f: Fields, name: str) -> GenerationRequest | None:
    """The request, or None for an empty prompt (load or unload)."""
    prompt = f.string("prompt", "")
    suffix = f.string("suffix")
    system = f.string("system")
    raw = f.boolean("raw")
    f.refuse("template", ("",), "Go templates are not supported: the model's own chat template is used; "
                                "send raw: true with a prompt already formatted to use another")
    f.refuse("context", lambda v: v == [], "is not supported (Ollama deprecated it): send the conversation as "
                                           "messages to /api/chat")
    for field in ("width", "height", "steps"):
        f.refuse(field, lambda v: False, "image generation is not supported")
    images = f.body.get("images")
    if images is not None and not isinstance(images, list):
        raise f.bad("images", "must be a list of base64-encoded images")
    if suffix == "":   # as Ollama reads it: no suffix, a plain completion
        suffix = None
    if not prompt and suffix is None:
        return None
    if suffix is not None:
        # Fill-in-the-middle: the prompt is the code before the cursor, the
        # suffix what follows it, both raw text in the model's FIM tokens.
        if system:
            raise f.bad("system", "cannot be combined with suffix: fill-in-the-middle writes code, not a chat")
        req = GenerationRequest(prompt=prompt, suffix=suffix)
    elif raw:
        if system:
            raise f.bad("system", "cannot be combined with raw: put it in the prompt as the model's format has it")
        req = GenerationRequest(prompt=prompt)
    else:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        req = GenerationRequest(messages=messages)
    req.images = images or None
    return req


def _messages(f: Fields) -> tuple[list[dict], list]:
    """Ollama's messages as the request's, with each message's images."""
    msgs = f.body.get("messages")
    if msgs is None:
        return [], []
    if not isinstance(msgs, list):
        raise f.bad("messages", 'must be a list of {"role": ..., "content": ...}')
    out, images = [], []
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "tool"):
            raise f.bad(f"{where}.role", "must be system, user, assistant or tool")
        content = m.get("content")
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise f.bad(f"{where}.content", "must be a string")
        msg = {"role": m["role"], "content": content}
        if m.get("images"):
            images.append((f"{where}.images", m["images"]))
        if m["role"] == "assistant" and m.get("tool_calls"):
            msg["tool_calls"] = openai_calls(m["tool_calls"], f"{where}.tool_calls")
        if m["role"] == "tool":
            for key, ours in (("tool_name", "name"), ("tool_call_id", "tool_call_id")):
                if m.get(key) is not None:
                    if not isinstance(m[key], str):
                        raise f.bad(f"{where}.{key}", "must be a string")
                    msg[ours] = m[key]
        # "thinking" on an earlier answer: no template here shows it, so it is left out.
        out.append(msg)
    return out, images


def _chat_request(f: Fields) -> tuple[GenerationRequest | None, str]:
    """The request, or None for no messages (load or unload), and the
    name of the first field with images (refused by that name)."""
    messages, images = _messages(f)
    tools = f.body.get("tools")
    if not messages:
        if tools:
            raise f.bad("messages", "are needed with tools")
        return None, "images"
    prefill = None
    if messages[-1]["role"] == "assistant" and not messages[-1].get("tool_calls") and len(messages) > 1:
        prefill = messages.pop()["content"]   # a last answer of the assistant's: the model continues it
    req = GenerationRequest(messages=messages, prefill=prefill or None)
    if tools not in (None, []):
        req.tools = check_tools(tools)
    if images:
        req.images = [img for _, img in images]
        return req, images[0][0]
    return req, "images"


def _stats(gen: Generation, t0: float, started: float) -> dict:
    """The last object's figures: tokens, and durations in nanoseconds.
    ``load_duration`` is the time before the model took the request (a
    load, when the model was not loaded), apart from its prompt's."""
    st = gen.stats
    total = time.perf_counter() - t0
    prompt_s = st.ttft_s
    load = max(0.0, (started - t0) - prompt_s)
    ns = 1_000_000_000
    return {"done_reason": DONE_REASON.get(st.finish_reason, "stop"), "total_duration": int(total * ns),
            "load_duration": int(load * ns), "prompt_eval_count": st.prompt_tokens,
            "prompt_eval_duration": int(prompt_s * ns), "eval_count": st.generated_tokens,
            "eval_duration": int(max(0.0, st.total_s - prompt_s) * ns)}


def _tool_call(index: int, call_id: str, name: str, arguments: dict) -> dict:
    """A finished call in Ollama's shape: its arguments as an object."""
    return {"id": call_id, "function": {"index": index, "name": name, "arguments": arguments}}


async def _answer(front, req: GenerationRequest, body: dict, stream: bool, request: Request, t0: float,
                  images_param: str = "images") -> Response:
    """Run ``req`` and answer as Ollama does: NDJSON chunks, or one object."""
    name, path = model_field(Fields(body)), request.url.path
    chat = path == "/api/chat"
    req.refuse_unsupported({"images": images_param})
    target = {"model": our_name(name), "keep_alive": body.get("keep_alive")}
    head = {"model": name}
    if req.suffix is not None:   # code completion: a newer request from the editor ends this one
        from .infill_api import editor_key

        gen = await front.editors.start(front, req, target, editor_key(path, request, body), path)
        if gen is None:   # typed past before it started: an empty answer
            done = {**head, "created_at": now(), "response": "", "done": True, "done_reason": "stop"}
            return JSONResponse(done) if not stream else StreamingResponse(iter([ndjson(done)]), media_type=NDJSON)
    else:
        gen = await Generation.start(front, req, path, target)
    started = time.perf_counter()

    def piece(text: str, calls=None, logprobs=None) -> dict:
        out = {**head, "created_at": now()}
        if chat:
            out["message"] = {"role": "assistant", "content": text}
            if calls:
                out["message"]["tool_calls"] = calls
        else:
            out["response"] = text
        if logprobs is not None:
            out["logprobs"] = logprobs
        return out

    if not stream:
        reply = await gen.reply(request)
        calls = [_tool_call(i, c.id, c.name, c.arguments) for i, c in enumerate(reply.tool_calls)]
        out = piece(reply.content, calls, reply.logprobs if req.logprobs is not None else None)
        return JSONResponse({**out, "done": True, **_stats(gen, t0, started)})

    def error_line(err: ApiError) -> bytes:
        return ndjson({"error": str(err)})

    async def lines():
        args: dict[int, list[str]] = {}
        async for ev in stream_events(gen, front, path, error_event=error_line):
            if isinstance(ev, bytes):
                yield ev
                return
            if isinstance(ev, DoneEvent):
                yield ndjson({**piece(""), "done": True, **_stats(gen, t0, started)})
            elif isinstance(ev, ToolCallEvent):
                # Ollama sends each call whole, once it is complete.
                args.setdefault(ev.index, []).append(ev.arguments)
                if ev.done:
                    call = _tool_call(ev.index, ev.id, ev.name, json.loads("".join(args[ev.index])))
                    yield ndjson({**piece("", [call]), "done": False})
            elif ev.text or ev.logprobs:
                yield ndjson({**piece(ev.text, logprobs=ev.logprobs), "done": False})

    return StreamingResponse(lines(), media_type=NDJSON)


async def _load_or_unload(front, name: str, keep: float | None, chat: bool) -> Response:
    """An empty prompt (or no messages): load the model, or with
    ``keep_alive`` 0 unload it, as Ollama does."""
    pool = front.require_pool()
    if keep == 0:
        await pool.aresolve(our_name(name))   # a 404 for a name that means nothing
        await pool.unload(our_name(name))
        reason = "unload"
    else:
        await pool.load(our_name(name), keep_alive=keep)
        reason = "load"
    out = {"model": name, "created_at": now()}
    out.update({"message": {"role": "assistant", "content": ""}} if chat else {"response": ""})
    return JSONResponse({**out, "done": True, "done_reason": reason})


async def generate(front, body: dict, request: Request) -> Response:
    t0 = time.perf_counter()
    f = Fields(body)
    name = model_field(f)
    front.require_pool()
    req = _generate_request(f, name)
    stream, keep = _common(f, req or GenerationRequest(prompt=""), name)
    if req is None:
        return await _load_or_unload(front, name, keep, chat=False)
    return await _answer(front, req, body, stream, request, t0)


async def chat(front, body: dict, request: Request) -> Response:
    t0 = time.perf_counter()
    f = Fields(body)
    name = model_field(f)
    front.require_pool()
    req, images_param = _chat_request(f)
    stream, keep = _common(f, req or GenerationRequest(prompt=""), name)
    if req is None:
        return await _load_or_unload(front, name, keep, chat=True)
    return await _answer(front, req, body, stream, request, t0, images_param)


# -- /api/embed and /api/embeddings --------------------------------------------------
async def _embed(front, f: Fields, inputs, param: str):
    """The vectors of ``inputs`` (as /v1/embeddings takes them), through
    the pool; (model, embed.Embeddings, seconds before the model took it)."""
    from .embedding import EmbeddingRequest, parse_input

    name = model_field(f)
    truncate = f.boolean("truncate", True)
    opts = f.body.get("options")
    if opts is not None and not isinstance(opts, dict):
        raise f.bad("options", "must be an object")
    req = EmbeddingRequest(parse_input(inputs, param), truncate=truncate)
    return await front.require_pool().embed(our_name(name), req, keep_alive=keep_alive_of(f.body))


async def embed(front, body: dict, request: Request) -> Response:
    """``POST /api/embed``: unit vectors, one per input."""
    t0 = time.perf_counter()
    f = Fields(body)
    dimensions = f.integer("dimensions", 1, 1 << 20)
    model, out = await _embed(front, f, body.get("input"), "input")
    width = out.vectors.shape[1] if out.vectors.ndim == 2 else 0
    if dimensions is not None and dimensions != width:
        raise f.bad("dimensions", f"{model.name} gives vectors of {width} dimensions only; leave dimensions "
                                  "out or set it to that")
    total = int((time.perf_counter() - t0) * 1e9)
    return JSONResponse({"model": model_field(f), "embeddings": out.vectors.tolist(), "total_duration": total,
                         "prompt_eval_count": sum(out.n_tokens)})


async def embeddings(front, body: dict, request: Request) -> Response:
    """``POST /api/embeddings`` (Ollama's older route): one ``prompt``, one
    vector. Unit length here too, where Ollama's was not normalised: the
    direction, which similarity search compares, is the same."""
    f = Fields(body)
    prompt = f.string("prompt")
    if not prompt:
        raise f.bad("prompt", "is required: the text to embed")
    _, out = await _embed(front, f, prompt, "prompt")
    return JSONResponse({"embedding": out.vectors[0].tolist()})


# -- the small routes -----------------------------------------------------------------
async def version(front, request: Request) -> Response:
    front.metrics.count("/api/version", 200)
    return JSONResponse({"version": API_VERSION, "edgeinfer": __version__})


async def root(front, request: Request) -> Response:
    return PlainTextResponse("edgeinfer is running (Ollama's API under /api, OpenAI's under /v1)")


def _plain(front, handler):
    async def endpoint(request: Request) -> Response:
        from .api import api_error_from, error_response

        try:
            return await handler(front, request)
        except Exception as e:   # noqa: BLE001 - every failure in Ollama's shape
            err = api_error_from(e)
            front.metrics.count(request.url.path, err.status)
            return error_response(err, request.url.path)
    return endpoint


PATHS: tuple[str, ...] = ("/api/version", "/api/tags", "/api/show", "/api/ps", "/api/chat", "/api/generate",
                          "/api/embed", "/api/embeddings", "/api/pull", "/api/delete", "/api/copy",
                          "/api/create", "/api/push")   # for /metrics' endpoint labels


def routes(front) -> list:
    """Starlette routes of the Ollama API, served by ``front`` (an HttpFront)."""
    m = ollama_models
    return [
        Route("/", _plain(front, root), methods=["GET"]),
        Route("/api/version", _plain(front, version), methods=["GET"]),
        Route("/api/tags", _plain(front, m.tags), methods=["GET"]),
        Route("/api/ps", _plain(front, m.ps), methods=["GET"]),
        Route("/api/show", front._wrap(m.show), methods=["POST"]),
        Route("/api/chat", front._wrap(chat), methods=["POST"]),
        Route("/api/generate", front._wrap(generate), methods=["POST"]),
        Route("/api/embed", front._wrap(embed), methods=["POST"]),
        Route("/api/embeddings", front._wrap(embeddings), methods=["POST"]),
        Route("/api/pull", front._wrap(ollama_pull.pull), methods=["POST"]),
        Route("/api/delete", front._wrap(m.delete), methods=["DELETE"]),
        Route("/api/copy", front._wrap(m.copy), methods=["POST"]),
        Route("/api/create", front._wrap(m.refused), methods=["POST"]),
        Route("/api/push", front._wrap(m.refused), methods=["POST"]),
    ]
