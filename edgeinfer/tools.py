"""Tool calling: the tools a request offers, the promise its
``tool_choice`` makes, the grammar that keeps that promise, and the calls
read back out of the model's text.

A call is written in the model family's own format, so that a model
trained to call tools does what it learned:

- **hermes**: the template mentions ``<tool_call>`` (Qwen2.5, Hermes 2/3
  and the many models trained on their format). The template renders the
  tools itself; a call is ``<tool_call>{"name": ..., "arguments":
  {...}}</tool_call>``.
- **generic**: a template that knows nothing of tools (SmolLM2, Gemma 3).
  The tools go into a system message that teaches the same call format
  (:data:`GENERIC_PROMPT`); earlier calls and their results are written
  into the conversation as text in that format.

Promises are kept by grammar, not hoped for:

- ``"required"`` and a named function: the whole answer is one call (or
  several, with ``parallel_tool_calls``), its arguments valid against the
  function's JSON schema;
- ``"auto"``: the model writes text or calls; from the moment it opens a
  call, a lazy grammar holds the rest to the schema (it starts where the
  text shows the call's opening: edgeinfer.grammar.GrammarGate);
- ``"none"``: the tools are not offered and the call marker, where it is
  one token, is never drawn: no call can come out.

:class:`CallParser` turns the text stream into content and
:class:`~edgeinfer.events.ToolCallEvent` pieces: a call's id and name once,
then its arguments' JSON in fragments as they are generated. A call the
answer did not finish (cut by ``max_tokens``) is never completed: its
events end without ``done``, and the finish reason says "length".
"""

from __future__ import annotations

import json
import re
import secrets
import string
from dataclasses import dataclass

from .errors import GrammarError, RequestError

MAX_TOOLS = 128
NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
CHOICES = ("auto", "none", "required")

OPEN, CLOSE = "<tool_call>", "</tool_call>"
FENCE, FENCE_CLOSE = "```json", "```"     # a call some models write instead (allowed under "auto" only)
OPENINGS = ((OPEN, CLOSE), (FENCE, FENCE_CLOSE))

# The generic family's system message: the same format hermes models learn.
GENERIC_PROMPT = (
    "You can call functions to help answer. Their signatures, as JSON, are within <tools></tools>:\n"
    "<tools>\n{tools}\n</tools>\n"
    "To call a function, answer with a JSON object of its name and arguments within "
    "<tool_call></tool_call> tags, and nothing else:\n"
    '<tool_call>\n{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>\n'
    "When no function is needed, answer normally.")


@dataclass(frozen=True)
class Family:
    """How a model family writes tool calls."""

    name: str
    native: bool      # the chat template renders tools and calls itself


HERMES = Family("hermes", native=True)
GENERIC = Family("generic", native=False)


def family_of(template: str | None) -> Family:
    """The tool-call family of a chat template."""
    if template and OPEN in template and "tools" in template:
        return HERMES
    return GENERIC


# -- what a request offers -------------------------------------------------------
def check_tools(tools, param: str = "tools") -> list[dict]:
    """``tools`` in OpenAI's form (``{"type": "function", "function":
    {"name", "description", "parameters"}}``), checked and normalised:
    every function has a name of letters, digits, ``_.-`` (at most 64),
    names are unique, and ``parameters`` is a JSON schema object (an empty
    object schema when left out). Raises RequestError naming the field."""
    if not isinstance(tools, list) or not tools:
        raise RequestError(param, f"{param} must be a non-empty list of function tools")
    if len(tools) > MAX_TOOLS:
        raise RequestError(param, f"{param}: at most {MAX_TOOLS} tools are accepted, not {len(tools)}")
    out, seen = [], set()
    for i, tool in enumerate(tools):
        where = f"{param}[{i}]"
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" or \
                not isinstance(tool.get("function"), dict):
            raise RequestError(where, f'{where} must be {{"type": "function", "function": {{"name": ..., '
                                      f'"parameters": {{...}}}}}}; only function tools are supported')
        fn = tool["function"]
        name = fn.get("name")
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise RequestError(f"{where}.function.name", f"{where}.function.name must be 1 to 64 letters, "
                                                         "digits, underscores, dots or dashes")
        if name in seen:
            raise RequestError(f"{where}.function.name", f"{where}.function.name: {name} is offered twice")
        seen.add(name)
        description = fn.get("description")
        if description is not None and not isinstance(description, str):
            raise RequestError(f"{where}.function.description", f"{where}.function.description must be a string")
        params = fn.get("parameters")
        if params is None:
            params = {"type": "object", "properties": {}}
        if not isinstance(params, dict) or params.get("type", "object") != "object":
            raise RequestError(f"{where}.function.parameters",
                               f"{where}.function.parameters must be a JSON schema of an object")
        clean = {"name": name, **({"description": description} if description else {}), "parameters": params}
        if "strict" in fn:
            clean["strict"] = fn["strict"]   # every call is held to the schema anyway
        out.append({"type": "function", "function": clean})
    return out


@dataclass(frozen=True)
class ToolChoice:
    """What the model may do with the tools: "auto" (text or calls),
    "none", "required" (at least one call) or "function" (a call of
    ``name``)."""

    mode: str = "auto"
    name: str | None = None

    def offered(self, tools: list[dict]) -> list[dict]:
        """The tools a call may name."""
        if self.mode == "function":
            return [t for t in tools if t["function"]["name"] == self.name]
        return [] if self.mode == "none" else tools


def check_choice(value, tools: list[dict], param: str = "tool_choice") -> ToolChoice:
    """OpenAI's ``tool_choice``: "auto", "none", "required", or
    ``{"type": "function", "function": {"name": ...}}`` naming one of
    ``tools``."""
    if value is None:
        return ToolChoice()
    if isinstance(value, str):
        if value not in CHOICES:
            raise RequestError(param, f'{param} must be "auto", "none", "required" or '
                                      '{"type": "function", "function": {"name": ...}}')
        return ToolChoice(value)
    name = value.get("function", {}).get("name") if isinstance(value, dict) and \
        isinstance(value.get("function"), dict) else None
    if not isinstance(value, dict) or value.get("type") != "function" or not isinstance(name, str):
        raise RequestError(param, f'{param} must be "auto", "none", "required" or '
                                  '{"type": "function", "function": {"name": ...}}')
    return named_choice(name, tools, param)


def named_choice(name: str, tools: list[dict], param: str) -> ToolChoice:
    """A choice of the function ``name``, which must be one of ``tools``."""
    names = [t["function"]["name"] for t in tools]
    if name not in names:
        raise RequestError(param, f"{param} names {name[:64]!r}, which is not among the tools "
                                  f"({', '.join(names)[:200]})")
    return ToolChoice("function", name)


def arguments_object(value, param: str) -> dict:
    """An earlier call's arguments as an object: OpenAI sends them as JSON
    text, Anthropic and Ollama as the object itself. Templates render
    them with ``tojson``, so text that is not a JSON object is refused."""
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except ValueError:
            raise RequestError(param, f"{param} must be a JSON object (as text or as an object)") from None
    if not isinstance(value, dict):
        raise RequestError(param, f"{param} must be a JSON object (as text or as an object)")
    return value


def openai_calls(calls, param: str) -> list[dict]:
    """An assistant message's ``tool_calls`` in OpenAI's form, with each
    call's arguments as an object (as templates want them)."""
    if not isinstance(calls, list):
        raise RequestError(param, f"{param} must be a list of tool calls")
    out = []
    for i, call in enumerate(calls):
        where = f"{param}[{i}]"
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or \
                (call.get("id") is not None and not isinstance(call["id"], str)):
            raise RequestError(where, f'{where} must be {{"id": ..., "type": "function", "function": '
                                      '{"name": ..., "arguments": ...}}')
        out.append({"id": call.get("id") or new_call_id(), "type": "function",
                    "function": {"name": fn["name"],
                                 "arguments": arguments_object(fn.get("arguments"), f"{where}.function.arguments")}})
    return out


def new_call_id() -> str:
    return "call_" + "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(24))


# -- the prompt --------------------------------------------------------------------
def generic_messages(messages: list[dict], tools: list[dict] | None) -> list[dict]:
    """``messages`` for a template that knows nothing of tools: the tools
    described in the system message, earlier calls written out as the
    assistant's text, results as the user's."""
    from .template import check_messages

    out: list[dict] = []
    for m in check_messages(messages):
        if m["role"] == "assistant" and m.get("tool_calls"):
            calls = "\n".join(f"{OPEN}\n" + json.dumps({"name": c["function"]["name"],
                                                        "arguments": c["function"]["arguments"]},
                                                       ensure_ascii=False) + f"\n{CLOSE}"
                              for c in m["tool_calls"])
            text = (m.get("content") or "").strip()
            out.append({"role": "assistant", "content": f"{text}\n{calls}" if text else calls})
        elif m["role"] == "tool":
            result = f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"
            if out and out[-1]["role"] == "user" and out[-1].get("tool_results"):
                out[-1]["content"] += "\n" + result
            else:
                out.append({"role": "user", "content": result, "tool_results": True})
        else:
            out.append(m)
    for m in out:
        m.pop("tool_results", None)
    if tools:
        described = GENERIC_PROMPT.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{described}"}
        else:
            out.insert(0, {"role": "system", "content": described})
    return out


# -- the grammar -------------------------------------------------------------------
@dataclass(frozen=True)
class CallGrammar:
    """A grammar for tool calls: ``gbnf``, and for a lazy one the
    ``trigger`` (a regex over the bytes of the text so far) whose match
    starts it, with the text from the match's start."""

    gbnf: str
    trigger: bytes | None = None


def call_grammar(tools: list[dict], choice: ToolChoice, parallel: bool) -> CallGrammar | None:
    """The grammar that keeps ``choice``'s promise over ``tools``; None
    for "none".

    Under "auto" it is lazy, and starts at ``<tool_call>``, or at a
    fenced JSON block that names one of the tools (```` ```json
    {"name": "get_weather"`` ...), which some models (Qwen2.5-Coder)
    write instead of the tags."""
    from . import grammar

    offered = choice.offered(tools)
    if not offered:
        return None
    alternatives = []
    for t in offered:
        fn = t["function"]
        try:
            grammar.check_schema(fn["parameters"], f"the tool {fn['name']}'s parameters")
        except GrammarError as e:
            e.param = "tools"   # the error names the tools, not response_format
            raise
        alternatives.append({"type": "object", "properties": {"name": {"const": fn["name"]},
                                                              "arguments": fn["parameters"]},
                             "required": ["name", "arguments"]})
    schema = alternatives[0] if len(alternatives) == 1 else {"anyOf": alternatives}
    # A lazy grammar must accept whatever whitespace the model wrote before
    # its trigger; a grammar from the first token on keeps it short, so
    # that a call costs few tokens.
    lazy = choice.mode == "auto"
    rules = grammar.schema_rules(schema, "call", ["name", "arguments"], loose=lazy)
    repeat = " (ws tool-call)*" if parallel else ""
    fenced = f' | "{FENCE}" ws call ws "{FENCE_CLOSE}"' if lazy else ""
    ws = "[ \\t\\n]{0,20}" if lazy else '"\\n"?'
    gbnf = (f"root ::= tool-call{repeat}\n"
            f'tool-call ::= "{OPEN}" ws call ws "{CLOSE}"{fenced}\n'
            f"ws ::= {ws}\n"
            f"{rules}")
    grammar.check_cost(gbnf, "the tools' grammar")
    if not lazy:
        return CallGrammar(gbnf)
    names = "|".join(re.escape(t["function"]["name"]) for t in offered)
    trigger = re.escape(OPEN) + "|" + re.escape(FENCE) + r'\s*\{\s*"name"\s*:\s*"(?:' + names + ')"'
    return CallGrammar(gbnf, trigger.encode("utf-8"))


# -- the calls in the answer -------------------------------------------------------
# A call's opening up to its arguments, matched once the arguments' "{" is there.
_HEADER = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*(?=\{)')


class _JsonEnd:
    """Finds where one JSON value ends, fed a character at a time."""

    def __init__(self):
        self.depth, self.in_string, self.escape, self.started = 0, False, False, False

    def feed(self, ch: str) -> bool:
        """True once ``ch`` closed the value."""
        if self.in_string:
            if self.escape:
                self.escape = False
            elif ch == "\\":
                self.escape = True
            elif ch == '"':
                self.in_string = False
            return False
        if ch in "{[":
            self.depth += 1
            self.started = True
        elif ch in "}]":
            self.depth -= 1
            return self.depth == 0
        elif ch == '"':
            self.in_string = True
            self.started = True
        return False


class CallParser:
    """Content and tool calls out of a model's text, as it streams.

    :meth:`feed` takes each piece of text and returns what can be said
    already: strings of content and ToolCallEvents. Text that might be the
    start of a call marker, and whitespace before one, is held back until
    the next piece says what it is."""

    def __init__(self, names: list[str]):
        from .events import ToolCallEvent

        self._event = ToolCallEvent
        self.names = set(names)
        self.calls: list[dict] = []     # finished: {"id", "name", "arguments" (JSON text)}
        self.open = False               # inside a call
        self._held = ""                 # content not yet given out
        self._opening = (OPEN, CLOSE)   # how the call under way opened, and how it closes
        self._buf = ""                  # the call's text so far
        self._call = None               # (index, id, name) once its header is read
        self._arg0 = 0                  # where the arguments start in _buf
        self._sent = 0                  # characters of the arguments given out
        self._end = None                # a _JsonEnd over the arguments
        self._args_end = None           # where the arguments end in _buf

    def feed(self, text: str) -> list:
        out: list = []
        while text:
            text = self._feed_call(text, out) if self.open else self._feed_text(text, out)
        return out

    def _feed_text(self, text: str, out: list) -> str:
        held = self._held + text
        found = [(i, o, c) for o, c in OPENINGS if (i := held.find(o)) >= 0]
        if found:
            i, opening, closing = min(found)
            self._say(held[:i].rstrip(), out)
            self._held, self.open, self._buf, self._opening = "", True, "", (opening, closing)
            return held[i + len(opening):]
        # Hold back the start of an opening, and the whitespace before it.
        n = max((n for o, _ in OPENINGS for n in range(min(len(o) - 1, len(held)), 0, -1)
                 if held.endswith(o[:n])), default=0)
        before = held[:len(held) - n]
        cut = len(before.rstrip())
        self._say(held[:cut], out)
        self._held = held[cut:]
        return ""

    @staticmethod
    def _say(text: str, out: list) -> None:
        if text:
            out.append(text)

    def _feed_call(self, text: str, out: list) -> str:
        start = len(self._buf)
        self._buf += text
        if self._call is None:
            m = _HEADER.match(self._buf)
            if m:
                try:
                    name = json.loads(f'"{m.group(1)}"')
                except ValueError:
                    name = None
                if name in self.names:
                    self._call = (len(self.calls), new_call_id(), name)
                    out.append(self._event(self._call[0], self._call[1], name, "", first=True))
                    self._arg0, self._end = m.end(), _JsonEnd()
                    start = m.end()
        if self._call is not None and self._args_end is None:
            for j in range(max(start, self._arg0), len(self._buf)):
                if self._end.feed(self._buf[j]):
                    self._args_end = j + 1
                    break
            upto = self._args_end or len(self._buf)
            piece = self._buf[self._arg0 + self._sent:upto]
            if piece:
                self._sent += len(piece)
                index, cid, name = self._call
                out.append(self._event(index, cid, name, piece))
        closing = self._opening[1]
        if self._call is not None and self._args_end is None:
            return ""   # a closing inside the arguments' strings is theirs
        i = self._buf.find(closing, self._args_end or 0)
        if i < 0:
            return ""
        rest = self._buf[i + len(closing):]
        self._close(self._buf[:i], out)
        return rest

    def _close(self, body: str, out: list) -> None:
        """The call's text is whole: check it, and end it."""
        call = None
        try:
            obj = json.loads(body)
            if isinstance(obj, dict) and obj.get("name") in self.names and isinstance(obj.get("arguments"), dict):
                call = obj
        except ValueError:
            pass
        if call is not None and self._call is None:   # a call whose header the stream could not read
            self._call = (len(self.calls), new_call_id(), call["name"])
            out.append(self._event(self._call[0], self._call[1], call["name"], "", first=True))
            out.append(self._event(self._call[0], self._call[1], call["name"],
                                   json.dumps(call["arguments"], ensure_ascii=False)))
        if call is not None and self._call[2] == call["name"]:
            index, cid, name = self._call
            args = json.dumps(call["arguments"], ensure_ascii=False) if self._args_end is None else \
                self._buf[self._arg0:self._args_end]
            self.calls.append({"id": cid, "name": name, "arguments": args})
            out.append(self._event(index, cid, name, "", done=True))
        elif self._call is None:   # not a call after all: the text was content
            self._say("{}{}{}".format(self._opening[0], body, self._opening[1]), out)
        self.open, self._buf, self._call, self._sent, self._end, self._args_end = False, "", None, 0, None, None

    def finish(self) -> list:
        """What is left at the end: held content. An unfinished call stays
        unfinished (its events had no ``done``); an unfinished opening
        that never became a call is content, unless calls came before it."""
        out: list = []
        if not self.open and (self._held.strip() or not self.calls):
            self._say(self._held, out)
        elif self.open and self._call is None and not self.calls:
            self._say(self._opening[0] + self._buf, out)   # after calls, it was another call, cut short
        self._held = ""
        return out


# -- one request's tools -----------------------------------------------------------
class ToolUse:
    """One request's tools and choice: the tools its prompt lists, the
    grammar that keeps the choice's promise, and a parser for the answer."""

    def __init__(self, tools: list[dict], choice: ToolChoice, parallel: bool):
        self.tools, self.choice, self.parallel = tools, choice, parallel

    @classmethod
    def of(cls, req_tools, tool_choice=None, parallel: bool = True) -> "ToolUse":
        """From a request's fields in OpenAI's form; RequestError names a bad one."""
        tools = check_tools(req_tools)
        return cls(tools, check_choice(tool_choice, tools), parallel)

    @property
    def offered(self) -> list[dict]:
        """The tools the prompt lists: none for "none", else all of them
        (a named choice still shows the model the others, as trained)."""
        return [] if self.choice.mode == "none" else self.tools

    def grammar(self) -> CallGrammar | None:
        return call_grammar(self.tools, self.choice, self.parallel)

    def parser(self) -> CallParser | None:
        names = [t["function"]["name"] for t in self.choice.offered(self.tools)]
        return CallParser(names) if names else None


def prompt_messages(messages: list[dict], tools: list[dict] | None, template: str | None):
    """(messages, tools) for ``template``: a template that knows nothing
    of tools gets them, and earlier calls, written into the messages."""
    if family_of(template).native:
        return messages, tools or None
    if tools or (isinstance(messages, list) and any(
            isinstance(m, dict) and (m.get("tool_calls") or m.get("role") == "tool") for m in messages)):
        return generic_messages(messages, tools), None
    return messages, None


class _Split:
    """A stream's events with tool calls read out of its text."""

    def __init__(self, parser: CallParser):
        self.parser = parser
        self.tokens: list[int] = []   # tokens of text held back, given to the next event out

    def events(self, ev) -> list:
        from .events import DoneEvent, TextEvent

        if isinstance(ev, DoneEvent):
            out = self._wrap(self.parser.finish(), TextEvent)
            if self.parser.calls and ev.stats.finish_reason == "stop":
                ev.stats.finish_reason = "tool_calls"
            return out + [ev]
        self.tokens += ev.tokens
        return self._wrap(self.parser.feed(ev.text), TextEvent)

    def _wrap(self, pieces: list, text_event) -> list:
        out = [text_event(p) if isinstance(p, str) else p for p in pieces]
        if out:
            out[0].tokens, self.tokens = self.tokens, []
        return out


def split_calls(events, parser: CallParser):
    """``events`` (TextEvents, then a DoneEvent) with the calls read out:
    content TextEvents, ToolCallEvents, and the DoneEvent, whose
    finish_reason is "tool_calls" when calls were made."""
    split = _Split(parser)
    for ev in events:
        yield from split.events(ev)


async def asplit_calls(events, parser: CallParser):
    """Async :func:`split_calls`; closing it closes ``events``."""
    split = _Split(parser)
    try:
        async for ev in events:
            for out in split.events(ev):
                yield out
    finally:
        await events.aclose()


# -- a whole answer ----------------------------------------------------------------
@dataclass
class ToolCall:
    """A call the model made: ``arguments`` parsed, valid against the
    function's schema."""

    id: str
    name: str
    arguments: dict

    def openai(self) -> dict:
        """The call in OpenAI's form (arguments as JSON text)."""
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": json.dumps(self.arguments, ensure_ascii=False)}}


@dataclass
class Reply:
    """An answer to a request with tools: its text, the calls it made
    (finished ones only) and why it ended ("tool_calls" when it called)."""

    content: str
    tool_calls: list[ToolCall]
    finish_reason: str
    stats: object = None     # the events.Stats of the generation
    logprobs: list | None = None   # an entry per token, when the request asked


class Collector:
    """Gathers a stream's events into a :class:`Reply`."""

    def __init__(self):
        self.text: list[str] = []
        self.args: dict[int, list[str]] = {}
        self.calls: list[ToolCall] = []
        self.logprobs: list | None = None
        self.stats = None

    def add(self, ev) -> None:
        from .events import DoneEvent, ToolCallEvent

        if isinstance(ev, ToolCallEvent):
            self.args.setdefault(ev.index, []).append(ev.arguments)
            if ev.done:
                self.calls.append(ToolCall(ev.id, ev.name, json.loads("".join(self.args[ev.index]))))
        elif isinstance(ev, DoneEvent):
            self.stats = ev.stats
        else:
            self.text.append(ev.text)
            if ev.logprobs is not None:
                self.logprobs = (self.logprobs or []) + ev.logprobs

    def reply(self) -> Reply:
        return Reply("".join(self.text), self.calls, self.stats.finish_reason if self.stats else "", self.stats,
                     self.logprobs)


def collect(events) -> Reply:
    """The :class:`Reply` of a stream of events."""
    c = Collector()
    for ev in events:
        c.add(ev)
    return c.reply()
