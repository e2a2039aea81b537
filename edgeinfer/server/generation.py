"""One request model for every front end.

The JSON-lines protocol, the OpenAI API and the Anthropic API each parse
their requests into a :class:`GenerationRequest`, hand it to :func:`run`,
and format the events that come back. What the faces share is written
here once:

- the request itself, with a place for the fields no face honours yet
  (several answers, images): a face
  that reads one puts it in the request, and
  :meth:`GenerationRequest.refuse_unsupported` refuses it by name, so
  nothing is silently ignored;
- the limits every face applies (stop strings, the model's name with or
  without its tag, the model list from the store);
- running a request against an engine: the prompt is rendered and the
  grammar resolved in a thread, ``max_tokens`` is fitted to the context,
  then :meth:`Engine.astream_tokens` streams;
- :data:`ERRORS`, the one table from an exception to what it means on
  each face: the JSON-lines error code, the HTTP status with each API's
  error type, OpenAI's ``code`` and ``param``. A llama.cpp failure means
  "the server failed" on every face; bad input means "bad request".

A new option is a field of the request, its use in :func:`run`, and a
line in each face's parser that reads it in that API's words.

The engine is duck-typed: anything with ``name``, ``n_ctx``,
``n_seq_max``, ``n_vocab``, ``tokenize``, ``chat_tokens`` and
``astream_tokens`` serves (tests/fakes.py has a scripted one).
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from dataclasses import dataclass, field, fields
from typing import AsyncIterator, Callable, Mapping

from ..errors import (
    ContextOverflowError,
    EdgeinferError,
    EngineBusyError,
    EngineError,
    FimUnsupportedError,
    GrammarError,
    ModelNotServedError,
    RequestError,
    SpeculativeError,
    StoppingError,
    TemplateError,
)

MAX_STOPS = 16
MAX_STOP_CHARS = 256
# Arrays and objects nested in one request: a schema may nest 64 levels,
# and a request wraps it in a few more. Python's JSON parser recurses, and
# at about 1,000 levels raises RecursionError, which no face should see.
MAX_JSON_DEPTH = 100
# What one request may hold, counted before parsing: json.loads keeps
# Python's global lock while it runs, so even in a worker thread a parse
# stops the event loop, and its cost follows the objects it makes (about
# 0.6 us an array, 0.15 us a small number), not the bytes: 1 MiB of nested
# arrays took 300 ms. A request of 4,096 messages, a schema of 1,000
# properties or a prompt of 50,000 token ids fits within these.
MAX_JSON_CONTAINERS = 20_000     # arrays and objects
MAX_JSON_ITEMS = 100_000         # commas and colons: array elements and object members
_STRINGS = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')   # unrolled: linear and fast on long strings
# A number that might overflow a float: an exponent of three digits or more,
# or a long run of digits. Only then are numbers parsed one by one in Python
# (slow) to refuse 1e999; without them every float json.loads makes is finite.
_HUGE_NUMBER = re.compile(rb"[eE][+-]?[0-9]{3}|[0-9]{200}")
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abcdefABCDEF]")


def _finite(text: str) -> float:
    v = float(text)
    if not math.isfinite(v):
        raise ValueError(f"the number {text[:20]} is too large")
    return v


def _constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def load_json(data: bytes):
    """A request body or line as JSON, strictly: UTF-8 without lone
    surrogates (a ``\\ud800`` escape included), finite numbers only (no NaN,
    Infinity or 1e999), arrays and objects nested at most MAX_JSON_DEPTH
    deep, at most MAX_JSON_CONTAINERS of them and MAX_JSON_ITEMS values
    (counted before parsing, a few ms a megabyte). Raises ValueError
    saying what is wrong; every face answers it as bad JSON and keeps the
    connection."""
    try:
        text = data.decode("utf-8")   # strict: encoded surrogates are refused here
    except UnicodeDecodeError as e:
        raise ValueError(f"it is not UTF-8 (at byte {e.start:,})") from None
    bare = _STRINGS.sub(b"", data)
    depth, containers, items = json_shape(bare)
    if depth > MAX_JSON_DEPTH:
        raise ValueError(f"it nests {depth:,} levels deep; at most {MAX_JSON_DEPTH} are accepted")
    if containers > MAX_JSON_CONTAINERS:
        raise ValueError(f"it holds {containers:,} arrays and objects; at most {MAX_JSON_CONTAINERS:,} "
                         "are accepted")
    if items > MAX_JSON_ITEMS:
        raise ValueError(f"it holds {items:,} values; at most {MAX_JSON_ITEMS:,} are accepted")
    parse_float = _finite if _HUGE_NUMBER.search(bare) else None
    obj = json.loads(text, parse_float=parse_float, parse_constant=_constant)
    if _SURROGATE_ESCAPE.search(data):   # a \ud800-style escape: one half of a pair, or alone?
        try:
            json.dumps(obj, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("a string holds a lone UTF-16 surrogate, which is not text") from None
    return obj


def json_shape(bare: bytes) -> tuple[int, int, int]:
    """(nesting depth, arrays and objects, commas and colons) of JSON text
    whose strings were taken out."""
    import numpy as np

    marks = np.frombuffer(bare, dtype=np.uint8)
    opens = (marks == ord("[")) | (marks == ord("{"))
    steps = opens.astype(np.int32) - (marks == ord("]")) - (marks == ord("}"))
    depth = int(np.cumsum(steps).max(initial=0))
    items = int(np.count_nonzero((marks == ord(",")) | (marks == ord(":"))))
    return depth, int(np.count_nonzero(opens)), items


# -- the request ---------------------------------------------------------------
# Fields no face honours yet, each with why it is refused. Supporting one
# means: run() uses it, and its line goes.
UNSUPPORTED: dict[str, str] = {
    "n": "only n=1 is supported: send several requests for several answers",
    "images": "images are not supported; this server reads text only",
}


@dataclass
class GenerationRequest:
    """What to generate, whichever face asked.

    The prompt is one of ``prompt`` (text, tokenized as is), ``messages``
    (rendered by the model's chat template, then ``prefill``: assistant
    text the answer continues) or ``tokens`` (ids). ``max_tokens`` None
    means the engine's fair share of the context."""

    prompt: str | None = None
    messages: list[dict] | None = None
    prefill: str | None = None
    tokens: list[int] | None = None
    max_tokens: int | None = None
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    sampling: dict = field(default_factory=dict)     # temperature, top_k, ... (edgeinfer.sampling.OPTIONS)
    json_schema: dict | str | None = None             # a schema, its JSON text, or "json" for any object
    grammar: str | None = None                        # GBNF; not with json_schema
    speculative: str | None = None                    # None: the engine's own mode
    ignore_eos: bool = False
    tools: list | None = None                         # function tools, in OpenAI's form (edgeinfer.tools)
    tool_choice: str | dict | None = None             # OpenAI's form: "auto", "none", "required" or a function
    parallel_tool_calls: bool = True
    logprobs: int | None = None                       # log-probabilities per token, with the top N alternatives
    logit_bias: dict | None = None                    # {token id: bias from -100 to 100}
    echo: bool = False                                # the prompt's text (and its logprobs) before the answer
    suffix: str | None = None                         # fill-in-the-middle: the text after the cursor
    fim_extra: list = field(default_factory=list)     # fill-in-the-middle: other files' [name, text] chunks
    fim_middle: str = ""                              # fill-in-the-middle: text at the cursor the answer continues
    fit: dict = field(default_factory=dict)           # fill-in-the-middle: edgeinfer.fim.EditorFit's rules
    # Not supported yet (UNSUPPORTED): a face that reads one sets it here.
    n: int = 1                                        # answers per request
    images: list | None = None

    def __post_init__(self):
        given = [x for x in (self.prompt, self.messages, self.tokens) if x is not None]
        if len(given) != 1:
            raise TypeError("a GenerationRequest has exactly one of prompt, messages or tokens")

    def refuse_unsupported(self, names: Mapping[str, str] | None = None) -> None:
        """RequestError for the first field set that this server cannot
        honour; ``names`` maps a field to the face's name for it."""
        defaults = {f.name: f.default for f in fields(self)}
        for name, why in UNSUPPORTED.items():
            if getattr(self, name) not in (defaults[name], [], ""):
                param = (names or {}).get(name, name)
                raise RequestError(param, f"{param}: {why}")


# -- limits every face applies -----------------------------------------------------
def check_stops(value, name: str = "stop") -> list[str]:
    """Stop strings as a list: a string or a list of up to MAX_STOPS
    non-empty strings of at most MAX_STOP_CHARS characters."""
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or len(value) > MAX_STOPS or \
            not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in value):
        raise RequestError(name, f"{name} must be a string or a list of at most {MAX_STOPS} non-empty strings "
                                 f"of at most {MAX_STOP_CHARS} characters")
    return value


def serves(served: str, model: str) -> bool:
    """Whether ``model`` names the model served: its whole name, or the
    name without its tag (``smollm2-135m-instruct`` for
    ``smollm2-135m-instruct:q4_1``)."""
    return model in (served, served.split(":")[0])


def check_model(served: str, model, *, param: str = "model", required: bool = False) -> None:
    """RequestError for a missing or non-string name; ModelNotServedError
    for the name of a model this server does not run."""
    if model is None:
        if required:
            raise RequestError(param, f"{param} is required: {served}")
        return
    if not isinstance(model, str):
        raise RequestError(param, f"{param} must be a string")
    if not serves(served, model):
        raise ModelNotServedError(f"this server runs {served}, not {model[:100]}; its model list names it")


def model_names(served: str, store) -> list[str]:
    """The model served, then the others in the store (if it can be read);
    blocking, so call it in a thread."""
    names = [served]
    if store is not None:
        try:
            names += [m.ref for m in store.list() if m.ref != served]
        except EdgeinferError:
            pass   # an unreadable store still leaves the model that runs
    return names


def parse_keep_alive(value, param: str = "keep_alive") -> float | None:
    """Seconds an idle model stays loaded, from a number of seconds or a
    duration ("5m", "30s", "1h", "0"); None for forever (-1, "-1",
    "forever"). Raises RequestError for anything else."""
    if isinstance(value, bool):
        raise RequestError(param, f"{param} must be a duration such as \"5m\", a number of seconds, or -1")
    if isinstance(value, (int, float)):
        return None if value < 0 else float(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("-1", "forever", "inf"):
            return None
        units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
        for unit in ("ms", "s", "m", "h", ""):
            if text.endswith(unit):
                number = text[:len(text) - len(unit)] if unit else text
                try:
                    seconds = float(number) * units.get(unit, 1)
                except ValueError:
                    break
                if seconds != seconds or seconds == float("inf"):
                    break
                return None if seconds < 0 else seconds
    raise RequestError(param, f"{param} must be a duration such as \"5m\" or \"30s\", a number of seconds, "
                              "0 (unload after the request) or -1 (keep loaded)")


def keep_alive_of(body: dict) -> float | None:
    """A request body's ``keep_alive`` for the pool: None when absent (the
    server's own), inf for forever, else seconds."""
    if body.get("keep_alive") is None:
        return None
    seconds = parse_keep_alive(body["keep_alive"])
    return float("inf") if seconds is None else seconds


# -- running a request -------------------------------------------------------------
def render(engine, req: GenerationRequest) -> list[int]:
    """The request's prompt as token ids (blocking: templates and long
    prompts take a while)."""
    if req.tokens is not None:
        if not all(0 <= t < engine.n_vocab for t in req.tokens):
            raise RequestError("prompt", f"prompt: token ids must be from 0 to {engine.n_vocab - 1}")
        return list(req.tokens)
    if req.suffix is not None:   # fill-in-the-middle: the prompt is the text before the cursor
        if req.prompt is None:
            raise RequestError("suffix", "suffix needs a text prompt (the code before the cursor)")
        try:
            if not hasattr(engine, "infill_tokens"):
                raise FimUnsupportedError(f"{engine.name} cannot fill in the middle")
            return engine.infill_tokens(req.prompt, req.suffix, extra=req.fim_extra, middle=req.fim_middle,
                                        max_tokens=req.max_tokens or 256)
        except FimUnsupportedError as e:
            e.param = "suffix"
            raise
    if req.prompt is not None:
        return engine.tokenize(req.prompt)
    use = tool_use(req, getattr(engine, "chat_template", None))
    tools = use.offered if use is not None else None
    ids = engine.chat_tokens(req.messages, tools=tools) if tools else engine.chat_tokens(req.messages)
    if req.prefill:
        ids += engine.tokenize(req.prefill, add_bos=False)
    return ids


# A prompt of up to about this many characters is rendered and tokenized
# on the event loop: under a millisecond, less than the hop to a worker
# thread and back costs before the first token (1.3 ms measured, on a
# loop the scheduler thread competes with for the GIL). A larger one, or
# one with tools, goes to a worker thread, so that it never stalls the
# loop every other client shares.
INLINE_RENDER_CHARS = 16_000
MESSAGE_CHARS = 200   # what a message costs the template beyond its text, counted in characters


def _light(req: GenerationRequest) -> bool:
    """Whether rendering ``req`` is quick enough for the event loop."""
    if req.tools or req.suffix is not None:
        return False
    n = len(req.prompt or "") + len(req.prefill or "") + len(req.tokens or ())
    for m in req.messages or ():
        content = m.get("content") if isinstance(m, dict) else None
        n += MESSAGE_CHARS + (len(content) if isinstance(content, str) else INLINE_RENDER_CHARS)
        if n >= INLINE_RENDER_CHARS:
            return False
    return n < INLINE_RENDER_CHARS


def tool_use(req: GenerationRequest, template: str | None = None):
    """The request's edgeinfer.tools.ToolUse for a model's chat
    ``template``, or None without tools."""
    if not req.tools:
        if req.tool_choice not in (None, "auto", "none"):
            raise RequestError("tool_choice", "tool_choice needs tools")
        return None
    if req.messages is None:
        raise RequestError("tools", "tools need a chat: send messages, not a prompt")
    from ..tools import ToolUse

    use = ToolUse.of(req.tools, req.tool_choice, req.parallel_tool_calls, template)
    if req.logprobs is not None:
        raise RequestError("logprobs", "logprobs cannot be combined with tools")
    if use.choice.mode != "none" and (req.json_schema is not None or req.grammar is not None):
        raise RequestError("tools", "tools cannot be combined with a JSON schema or grammar for the same answer; "
                                    "give the schema as a tool's parameters instead")
    return use


def fitted_max_tokens(engine, req: GenerationRequest, n_prompt: int) -> int:
    """``max_tokens`` within what the context has left after the prompt.
    Unset, a fair share: a default of the whole context would reserve all
    of it for one request and keep every other from batching beside it."""
    v = req.max_tokens
    if v is None:
        v = max(256, engine.n_ctx // engine.n_seq_max)
    return max(1, min(v, engine.n_ctx - n_prompt))


@dataclass
class Run:
    """A request under way: its prompt ids, and its events (TextEvents,
    then a DoneEvent). Nothing runs until the first event is awaited;
    closing ``events`` cancels the request."""

    tokens: list[int]
    max_tokens: int
    events: AsyncIterator
    model: object = None     # what ran it (edgeinfer.pool sets it): .name, .native, .n_ctx
    wind_down: Callable[[], None] | None = None   # ends it between steps (fill-in-the-middle: sequence.BetweenSteps)
    prompt_text: str | None = None            # with echo: the prompt as text
    prompt_logprobs: list | None = None       # with echo and logprobs: an entry per prompt token (None first)

    def __aiter__(self):
        return self.events.__aiter__()

    async def aclose(self) -> None:
        await self.events.aclose()


async def run(engine, req: GenerationRequest) -> Run:
    """Start ``req`` on ``engine``. Rendering, a bad field or a schema
    that does not convert raise here; what the engine refuses (a prompt
    over the context, a full queue) raises at the first event."""
    req.refuse_unsupported()   # a face that forgot to refuse one still never ignores it
    use = tool_use(req, getattr(engine, "chat_template", None))
    tokens = render(engine, req) if _light(req) else await asyncio.to_thread(render, engine, req)
    gbnf = None
    extra = {}
    if use is not None:
        gbnf = await asyncio.to_thread(use.grammar)
        if gbnf is not None and use.family.markers:
            extra["show_tokens"] = use.shown_tokens(lambda t: engine.tokenize(t, add_bos=False, special=True))
    elif req.json_schema is not None or req.grammar is not None:
        from .. import grammar  # loads llama.cpp's converter: only when a request needs it
        gbnf = await asyncio.to_thread(grammar.resolve, req.json_schema, req.grammar)  # big schemas take a while
    prompt_text = prompt_lp = None
    if req.echo:
        prompt_text = req.prompt if req.prompt is not None else await asyncio.to_thread(engine.detokenize, tokens)
        if req.logprobs is not None:
            prompt_lp = await asyncio.to_thread(engine.prompt_logprobs, tokens, req.logprobs)
    if req.max_tokens == 0 and req.suffix is not None:   # an editor warming the cache: read the prompt only
        events = engine.astream_tokens(tokens, max_tokens=0)
        return Run(tokens, 0, events)
    if req.max_tokens == 0:   # the prompt alone: echo scores a text without generating
        if not req.echo:
            raise RequestError("max_tokens", "max_tokens must be at least 1 (0 only with echo)")
        events = _nothing(len(tokens))
        return Run(tokens, 0, events, prompt_text=prompt_text, prompt_logprobs=prompt_lp)
    max_tokens = fitted_max_tokens(engine, req, len(tokens))
    extra.update({k: v for k, v in (("logit_bias", req.logit_bias), ("logprobs", req.logprobs)) if v is not None})
    stop = None
    if req.suffix is not None:   # an answer shaped for an editor, which ends it through this event
        from ..sequence import BetweenSteps

        stop = extra["cancel"] = BetweenSteps()
    events = engine.astream_tokens(tokens, max_tokens=max_tokens, stop=req.stop, seed=req.seed,
                                   ignore_eos=req.ignore_eos, grammar=gbnf, speculative=req.speculative,
                                   **extra, **req.sampling)
    if use is not None and use.callable:
        from ..tool_calls import CallParser, asplit_calls

        events = asplit_calls(events, CallParser.of(use))
    if stop is not None:
        from ..fim import EditorFit, afitted

        events = afitted(events, EditorFit(req.prompt + req.fim_middle, req.suffix, **req.fit), stop)
    return Run(tokens, max_tokens, events, prompt_text=prompt_text, prompt_logprobs=prompt_lp,
               wind_down=stop.set if stop is not None else None)


async def _nothing(n_prompt: int):
    from ..events import DoneEvent, Stats

    yield DoneEvent(Stats(prompt_tokens=n_prompt, finish_reason="length"))


# -- the error table -------------------------------------------------------------
@dataclass(frozen=True)
class Meaning:
    """What an exception means on each face."""

    code: str                   # the JSON-lines error code (protocol.CODES)
    kind: str                   # the HTTP kind: a status and each API's error type (HTTP_KINDS)
    api_code: str | None = None  # OpenAI's error.code
    param: str | None = None     # OpenAI's error.param, when the class implies one


# HTTP kind → (status, OpenAI error type, Anthropic error type)
HTTP_KINDS: dict[str, tuple[int, str, str]] = {
    "invalid_request": (400, "invalid_request_error", "invalid_request_error"),
    "authentication": (401, "authentication_error", "authentication_error"),
    "permission": (403, "permission_error", "permission_error"),
    "not_found": (404, "not_found_error", "not_found_error"),
    "method": (405, "invalid_request_error", "invalid_request_error"),
    "too_large": (413, "invalid_request_error", "request_too_large"),
    "media_type": (415, "invalid_request_error", "invalid_request_error"),
    "rate_limit": (429, "rate_limit_error", "rate_limit_error"),
    "unavailable": (503, "server_error", "overloaded_error"),
    "server": (500, "server_error", "api_error"),
}

# The first row whose class the exception is an instance of gives its
# meaning: most specific first. A class not listed falls to its nearest
# listed base; anything unforeseen is the server's failure.
ERRORS: tuple[tuple[type[BaseException], Meaning], ...] = (
    (RequestError, Meaning("bad_request", "invalid_request")),           # param: the exception's own
    (ModelNotServedError, Meaning("not_found", "not_found", "model_not_found", "model")),
    (StoppingError, Meaning("shutting_down", "unavailable")),
    (ContextOverflowError, Meaning("context_overflow", "invalid_request", "context_length_exceeded", "messages")),
    (EngineBusyError, Meaning("busy", "rate_limit", "busy")),
    (GrammarError, Meaning("bad_schema", "invalid_request", "bad_schema", "response_format")),
    (TemplateError, Meaning("bad_request", "invalid_request", None, "messages")),
    (SpeculativeError, Meaning("bad_request", "invalid_request", None, "speculative")),
    (EngineError, Meaning("internal", "server")),                        # llama.cpp failed: not the client's doing
    (EdgeinferError, Meaning("bad_request", "invalid_request")),         # any other refusal of ours
    (Exception, Meaning("internal", "server")),
)


def meaning(e: BaseException) -> Meaning:
    """The row of :data:`ERRORS` for ``e``, with a RequestError's own param."""
    for cls, m in ERRORS:
        if isinstance(e, cls):
            if getattr(e, "param", None):   # a RequestError's own; a tool's schema names tools
                return Meaning(m.code, m.kind, m.api_code, e.param)
            return m
    return Meaning("internal", "server")   # a BaseException that is not an Exception


def message(e: BaseException) -> str:
    """The one-line message a client sees for ``e``."""
    if isinstance(e, EdgeinferError):
        return e.one_line()
    return f"{type(e).__name__}: {e}"
