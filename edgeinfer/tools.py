"""Tool calling: the tools a request offers, the promise its
``tool_choice`` makes, and the grammar that keeps that promise, in the
format the model's family was trained on (edgeinfer.tool_calls reads the
calls back out of the answer).

- **hermes**: the template mentions ``<tool_call>`` (Qwen2.5, Hermes 2/3
  and the many models trained on their format). A call is
  ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``; some of
  these models (Qwen2.5-Coder) write a fenced ```` ```json ```` block
  instead, which is read too.
- **llama3**: Llama 3.1-3.3's templates (``<|python_tag|>``, the
  ``ipython`` role). A call is the answer itself: ``{"name": ...,
  "parameters": {...}}``, one per turn.
- **mistral**: ``[TOOL_CALLS]`` in the template (Mistral 7B v0.3, Nemo,
  Small). Calls are a JSON array after the ``[TOOL_CALLS]`` token; call
  ids are nine letters and digits, as its templates insist.
- **generic**: a template that knows nothing of tools (SmolLM2, Gemma 3).
  The tools go into a system message that teaches the hermes format
  (:data:`GENERIC_PROMPT`); earlier calls and their results are written
  into the conversation as text in that format.

Promises are kept by grammar, not hoped for:

- ``"required"`` and a named function: the whole answer is one call (or
  several, with ``parallel_tool_calls``), its arguments valid against the
  function's JSON schema;
- ``"auto"``: the model writes text or calls; from the moment it opens a
  call, a lazy grammar holds the rest to the schema (it starts where the
  text shows the call's opening: edgeinfer.grammar.GrammarGate);
- ``"none"``: the tools are not offered, and the answer is not read for
  calls: no call can come out.
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
FENCE, FENCE_CLOSE = "```json", "```"     # a call some hermes models write instead (read under "auto" only)
PYTHON_TAG = "<|python_tag|>"
TOOL_CALLS = "[TOOL_CALLS]"

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
    native: bool                                 # the chat template renders tools and calls itself
    openings: tuple[tuple[str, str], ...]        # (what opens a call, what closes it; "" for the object's end)
    args_key: str = "arguments"
    array: bool = False                          # the calls are a JSON array after the opening
    at_start: bool = False                       # a bare call object may open the answer
    parallel: bool = True                        # several calls in one answer
    id_length: int | None = None                 # call ids of exactly this many letters and digits

    @property
    def markers(self) -> tuple[str, ...]:
        """Openings that are no text of their own: control tokens the
        answer's text must show."""
        return tuple(o for o, _ in self.openings if o.startswith(("<|", "[")))


HERMES = Family("hermes", True, ((OPEN, CLOSE), (FENCE, FENCE_CLOSE)))
GENERIC = Family("generic", False, ((OPEN, CLOSE), (FENCE, FENCE_CLOSE)))
LLAMA3 = Family("llama3", True, ((PYTHON_TAG, ""),), args_key="parameters", at_start=True, parallel=False)
MISTRAL = Family("mistral", True, ((TOOL_CALLS, ""),), array=True, id_length=9)


def family_of(template: str | None) -> Family:
    """The tool-call family of a chat template."""
    if not template or "tools" not in template and "tool_calls" not in template:
        return GENERIC
    if TOOL_CALLS in template:
        return MISTRAL
    if OPEN in template:
        return HERMES
    if PYTHON_TAG in template or ("ipython" in template and '"parameters"' in template):
        return LLAMA3
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
            clean["strict"] = fn["strict"]   # true: a keyword the grammar cannot keep is refused
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


def new_call_id(length: int | None = None) -> str:
    """A fresh call id: ``call_`` and 24 letters and digits, or exactly
    ``length`` of them."""
    alnum = string.ascii_letters + string.digits
    if length:
        return "".join(secrets.choice(alnum) for _ in range(length))
    return "call_" + "".join(secrets.choice(alnum) for _ in range(24))


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


def call_grammar(tools: list[dict], choice: ToolChoice, parallel: bool,
                 family: Family | None = None) -> CallGrammar | None:
    """The grammar that keeps ``choice``'s promise over ``tools``, in
    ``family``'s format (hermes by default); None for "none".

    Under "auto" it is lazy: it starts at the family's opening (for
    hermes, ``<tool_call>`` or a fenced JSON block that names one of the
    tools, which Qwen2.5-Coder writes instead of the tags; for llama3, a
    call object at the very start of the answer)."""
    from . import grammar

    family = family or HERMES
    offered = choice.offered(tools)
    if not offered:
        return None
    key = family.args_key
    alternatives = []
    for t in offered:
        fn = t["function"]
        try:
            # A tool that is not strict may carry keywords the grammar cannot
            # keep (a number's bounds): shown to the model, checked by the
            # caller, as OpenAI's non-strict tools. Integer bounds are kept.
            grammar.check_schema(fn["parameters"], f"the tool {fn['name']}'s parameters",
                                 strict=fn.get("strict") is True)
        except GrammarError as e:
            e.param = "tools"   # the error names the tools, not response_format
            raise
        alternatives.append({"type": "object", "properties": {"name": {"const": fn["name"]}, key: fn["parameters"]},
                             "required": ["name", key]})
    schema = alternatives[0] if len(alternatives) == 1 else {"anyOf": alternatives}
    # A lazy grammar must accept whatever whitespace the model wrote before
    # its trigger; a grammar from the first token on keeps it short, so
    # that a call costs few tokens.
    lazy = choice.mode == "auto"
    rules = grammar.schema_rules(schema, "call", ["name", key], loose=lazy)
    ws = "[ \\t\\n]{0,20}" if lazy else '"\\n"?'
    several = parallel and family.parallel
    names = "|".join(re.escape(t["function"]["name"]) for t in offered)
    opens_call = r'\{\s*"name"\s*:\s*"(?:' + names + ')"'
    if family.array:
        opening = family.openings[0][0]
        more = ' (ws "," ws call)*' if several else ""
        top = f'root ::= "{opening}" ws "[" ws call{more} ws "]"'
        trigger = re.escape(opening)
    elif family.at_start:
        top = f'root ::= ws ("{PYTHON_TAG}" ws)? call'
        trigger = r"\A\s*(?:" + re.escape(PYTHON_TAG) + r")?\s*" + opens_call
    else:
        fenced = f' | "{FENCE}" ws call ws "{FENCE_CLOSE}"' if lazy else ""
        top = (f"root ::= tool-call{' (ws tool-call)*' if several else ''}\n"
               f'tool-call ::= "{OPEN}" ws call ws "{CLOSE}"{fenced}')
        trigger = re.escape(OPEN) + "|" + re.escape(FENCE) + r"\s*" + opens_call
    gbnf = f"{top}\nws ::= {ws}\n{rules}"
    grammar.check_cost(gbnf, "the tools' grammar")
    return CallGrammar(gbnf, trigger.encode("utf-8") if lazy else None)


# -- one request's tools -----------------------------------------------------------
class ToolUse:
    """One request's tools and choice, for a model's template: the tools
    its prompt lists, the grammar that keeps the choice's promise, and
    what edgeinfer.tool_calls.CallParser reads the answer for (the
    ``callable`` names, in the ``family``'s format)."""

    def __init__(self, tools: list[dict], choice: ToolChoice, parallel: bool, template: str | None = None):
        self.tools, self.choice, self.parallel = tools, choice, parallel
        self.family = family_of(template)

    @classmethod
    def of(cls, req_tools, tool_choice=None, parallel: bool = True, template: str | None = None) -> "ToolUse":
        """From a request's fields in OpenAI's form; RequestError names a bad one."""
        tools = check_tools(req_tools)
        return cls(tools, check_choice(tool_choice, tools), parallel, template)

    @property
    def offered(self) -> list[dict]:
        """The tools the prompt lists: none for "none", else all of them
        (a named choice still shows the model the others, as trained)."""
        return [] if self.choice.mode == "none" else self.tools

    def grammar(self) -> CallGrammar | None:
        return call_grammar(self.tools, self.choice, self.parallel, self.family)

    @property
    def callable(self) -> list[str]:
        """The names a call in the answer may have (none under "none")."""
        return [t["function"]["name"] for t in self.choice.offered(self.tools)]

    def shown_tokens(self, tokenize) -> tuple[int, ...]:
        """The ids of the family's markers that are single control
        tokens, which the answer's text must show for its calls to be
        read (``tokenize(text)`` with control tokens)."""
        ids = [tokenize(m) for m in self.family.markers]
        return tuple(t[0] for t in ids if len(t) == 1)


def prompt_messages(messages: list[dict], tools: list[dict] | None, template: str | None):
    """(messages, tools) for ``template``: a template that knows nothing
    of tools gets them, and earlier calls, written into the messages; one
    that wants short call ids gets them."""
    family = family_of(template)
    if family.native:
        return (_short_ids(messages, family.id_length) if family.id_length else messages), tools or None
    if tools or (isinstance(messages, list) and any(
            isinstance(m, dict) and (m.get("tool_calls") or m.get("role") == "tool") for m in messages)):
        return generic_messages(messages, tools), None
    return messages, None


def _short_ids(messages, length: int):
    """Call ids of exactly ``length`` letters and digits (Mistral's
    templates refuse others): each id given mapped to one of its own."""
    import hashlib

    def short(cid):
        if not isinstance(cid, str) or (len(cid) == length and cid.isalnum()):
            return cid
        return hashlib.sha256(cid.encode("utf-8")).hexdigest()[:length]

    if not isinstance(messages, list):
        return messages
    out = []
    for m in messages:
        if isinstance(m, dict) and m.get("tool_calls"):
            m = {**m, "tool_calls": [{**c, "id": short(c.get("id"))} if isinstance(c, dict) else c
                                     for c in m["tool_calls"]]}
        if isinstance(m, dict) and m.get("tool_call_id") is not None:
            m = {**m, "tool_call_id": short(m["tool_call_id"])}
        out.append(m)
    return out
