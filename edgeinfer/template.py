"""Chat templates, rendered only in Jinja's sandbox.

A GGUF's ``tokenizer.chat_template`` is untrusted input from a file off the
internet. llama-cpp-python once rendered it with a plain Jinja environment
and a template that reached ``().__class__.__base__.__subclasses__()`` ran
code (CVE-2024-34359). Here it renders in ``ImmutableSandboxedEnvironment``
and any sandbox violation is a TemplateError.
"""

from __future__ import annotations

import contextvars
import functools
import json
import re
import secrets
from datetime import datetime

from .errors import TemplateError

# Used when a model carries no template: ChatML, the most common format
# for small instruction-tuned models.
FALLBACK_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

ROLES = ("system", "user", "assistant", "tool")

_env = None


def _environment():
    global _env
    if _env is None:
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TemplateError(f"the chat template refused the messages: {message}")

        from jinja2.exceptions import SecurityError

        class _StrictSandbox(ImmutableSandboxedEnvironment):
            # The stock sandbox turns a blocked attribute into an Undefined
            # that prints as ''; a template that reaches for __globals__
            # is hostile, so stop it outright.
            def unsafe_undefined(self, obj, attribute):
                raise SecurityError(f"access to {attribute!r} of {type(obj).__name__} is not allowed")

        _env = _StrictSandbox(trim_blocks=True, lstrip_blocks=True)
        _env.globals["raise_exception"] = raise_exception
        _env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        _env.filters["tojson"] = _tojson
    return _env


@functools.lru_cache(maxsize=16)
def _template(source: str):
    """``source`` compiled in the sandbox, once: compiling a chat template
    takes a few ms, which every request would otherwise spend before its
    first token. Templates are few (one per model, and the fallback)."""
    return _environment().from_string(source)


def check_messages(messages: list[dict]) -> list[dict]:
    """Messages as the template sees them: a role and string content;
    an assistant's may carry ``tool_calls`` instead of content (each
    ``{"id", "type": "function", "function": {"name", "arguments": {...}}}``),
    a tool result its ``tool_call_id`` and ``name``."""
    if not isinstance(messages, list) or not messages:
        raise TemplateError("messages must be a non-empty list of {'role', 'content'} dicts",
                            hint="pass e.g. [{'role': 'user', 'content': 'Hello'}]")
    out = []
    for m in messages:
        calls = m.get("tool_calls") if isinstance(m, dict) and m.get("role") == "assistant" else None
        content = m.get("content") if isinstance(m, dict) else None
        if calls and content is None:
            content = ""
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(content, str):
            raise TemplateError(f"bad message {m!r}: need a role ({', '.join(ROLES)}) and string content",
                                hint="pass e.g. {'role': 'user', 'content': 'Hello'}")
        msg = {"role": m["role"], "content": content}
        if calls:
            msg["tool_calls"] = [_check_call(c) for c in calls]
        if m["role"] == "tool" and m.get("tool_call_id") is not None:
            msg["tool_call_id"] = _check_id(m["tool_call_id"])
        if m["role"] == "tool" and isinstance(m.get("name"), str):
            msg["name"] = m["name"]
        out.append(msg)
    return out


# A call's id goes to the template as it is (templates test its length):
# letters, digits, "_" and "-" alone, so it can never spell a control token.
CALL_ID = re.compile(r"[A-Za-z0-9_\-]{0,64}")


def _check_id(value) -> str:
    if not isinstance(value, str) or not CALL_ID.fullmatch(value):
        raise TemplateError(f"bad tool call id {str(value)[:80]!r}: at most 64 letters, digits, '_' or '-'")
    return value


def _check_call(call) -> dict:
    fn = call.get("function") if isinstance(call, dict) else None
    args = fn.get("arguments") if isinstance(fn, dict) else None
    if isinstance(args, str):   # OpenAI's form: the object as JSON text
        try:
            args = json.loads(args) if args.strip() else {}
        except ValueError:
            args = None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not isinstance(args, dict):
        raise TemplateError(f"bad tool call {str(call)[:200]}: need function.name and function.arguments "
                            "(an object, or its JSON text)")
    fn = {**fn, "arguments": args}
    return {"id": _check_id(call.get("id") or ""), "type": "function",
            "function": {"name": fn["name"], "arguments": fn["arguments"]}}


class _Marks:
    """Text swapped for random markers while a template renders, so that
    what came from a request is tokenized as plain text afterwards."""

    def __init__(self):
        self.key = secrets.token_hex(8)
        self.text: dict[str, str] = {}
        self.markers: dict[str, str] = {}    # one marker per text, so that equal texts compare equal
        self.pattern = re.compile(f"(\x00{self.key}:\\d+\x00)")   # one group: split() keeps the markers

    def mark(self, text: str) -> str:
        m = self.markers.get(text)
        if m is None:
            m = self.markers[text] = f"\x00{self.key}:{len(self.text)}\x00"
            self.text[m] = text
        return m

    def unmark(self, value):
        """``value`` with every marker in it put back."""
        if isinstance(value, str):
            return self.pattern.sub(lambda m: self.text[m.group()], value)
        if isinstance(value, dict):
            return {self.unmark(k): self.unmark(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self.unmark(v) for v in value]
        return value

    def leaves(self, value):
        """``value`` with every string in it marked."""
        if isinstance(value, str):
            return self.mark(value)
        if isinstance(value, dict):
            return {k: self.leaves(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.leaves(v) for v in value]
        return value


_rendering: contextvars.ContextVar[_Marks] = contextvars.ContextVar("rendering")


class _MarkedText(str):
    """Request text a template holds as a marker (its str value) that
    still answers ``length`` and slicing as the text would: Mistral's
    template takes ``tojson`` output ``[:-1]`` to add a key."""

    def __new__(cls, text: str, marks: "_Marks"):
        obj = super().__new__(cls, marks.mark(text))
        obj.text, obj.marks = text, marks
        return obj

    def __len__(self):
        return len(self.text)

    def __getitem__(self, key):
        return _MarkedText(self.text[key], self.marks)


def _tojson(value, indent=None, ensure_ascii=False, separators=None, sort_keys=False):
    """``tojson`` as chat templates are written for (Hugging Face's: no
    HTML escaping, Unicode kept). Its output is text from the request, so
    it comes back as a marked piece, tokenized as plain text."""
    marks = _rendering.get()
    text = json.dumps(marks.unmark(value), indent=indent, ensure_ascii=ensure_ascii, separators=separators,
                      sort_keys=sort_keys)
    return _MarkedText(text, marks)


def _masked_tool(tool: dict, marks: _Marks) -> dict:
    """A tool whose request text is marked: its name and description, and
    in its parameters every property name, description, title and enum
    value (templates print them as they are: Hermes 2 Pro's prints each
    parameter's). Types and other keywords stay as they are, since
    templates compare them."""
    fn = tool.get("function", {})
    out = {**fn, "name": marks.mark(fn.get("name", ""))}
    if isinstance(fn.get("description"), str):
        out["description"] = marks.mark(fn["description"])
    if isinstance(fn.get("parameters"), dict):
        out["parameters"] = _masked_schema(fn["parameters"], marks)
    return {**tool, "function": out}


def _masked_schema(node, marks: _Marks, depth: int = 0):
    if depth > 64:
        return node
    if isinstance(node, list):
        return [_masked_schema(v, marks, depth + 1) for v in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key in ("description", "title") and isinstance(value, str):
            out[key] = marks.mark(value)
        elif key == "properties" and isinstance(value, dict):
            out[key] = {marks.mark(k) if isinstance(k, str) else k: _masked_schema(v, marks, depth + 1)
                        for k, v in value.items()}
        elif key in ("required", "enum") and isinstance(value, list):
            out[key] = [marks.mark(v) if isinstance(v, str) else v for v in value]
        else:
            out[key] = _masked_schema(value, marks, depth + 1)
    return out


def _masked_message(m: dict, marks: _Marks) -> dict:
    # Empty content stays empty: templates test it ("if message.content").
    out = {"role": m["role"], "content": marks.mark(m["content"]) if m["content"] else ""}
    if m.get("tool_calls"):
        out["tool_calls"] = [{"id": c["id"], "type": "function",   # ids are checked: plain letters and digits
                              "function": {"name": marks.mark(c["function"]["name"]),
                                           "arguments": marks.leaves(c["function"]["arguments"])}}
                             for c in m["tool_calls"]]
    if "tool_call_id" in m:
        out["tool_call_id"] = m["tool_call_id"]
    if "name" in m:
        out["name"] = marks.mark(m["name"])
    return out


def render_segments(template: str | None, messages: list[dict], add_generation_prompt: bool = True,
                    *, bos_token: str = "", eos_token: str = "",
                    tools: list[dict] | None = None) -> list[tuple[str, bool]]:
    """Render ``messages`` (and ``tools``, in OpenAI's form, for a
    template that lists them) and return ``(text, is_template_text)``
    pieces.

    Each message's content, each tool's name and description and each
    call's name and arguments are swapped for random markers before
    rendering, then put back as pieces of their own, so the caller can
    tokenize the template's text with control tokens enabled and the
    request's text without: typing ``<|im_end|>`` cannot end a turn.
    """
    from jinja2 import TemplateError as JinjaError
    from jinja2.exceptions import SecurityError

    messages = check_messages(messages)
    marks = _Marks()
    masked = [_masked_message(m, marks) for m in messages]
    extra = {"tools": [_masked_tool(t, marks) for t in tools]} if tools else {}
    token = _rendering.set(marks)
    try:
        text = _template(template or FALLBACK_TEMPLATE).render(
            messages=masked, add_generation_prompt=add_generation_prompt,
            bos_token=bos_token, eos_token=eos_token, **extra)
    except SecurityError as e:
        raise TemplateError(f"the model's chat template tried something unsafe and was stopped: {e}") from None
    except TemplateError:
        raise
    except (JinjaError, ArithmeticError, TypeError, ValueError, LookupError, AttributeError,
            RecursionError, MemoryError) as e:
        raise TemplateError(f"the model's chat template failed: {type(e).__name__}: {e}") from None
    finally:
        _rendering.reset(token)
    # One pass over the text (a request may carry thousands of messages):
    # split() puts the markers found at the odd places.
    segments: list[tuple[str, bool]] = []
    for i, piece in enumerate(marks.pattern.split(text)):
        if i % 2:
            segments.append((marks.unmark(marks.text[piece]), False))
        elif piece:
            if marks.key in piece:
                raise TemplateError("the chat template altered message text in a way edgeinfer cannot follow")
            segments.append((piece, True))
    return segments
