"""Chat templates, rendered only in Jinja's sandbox.

A GGUF's ``tokenizer.chat_template`` is untrusted input from a file off the
internet. llama-cpp-python once rendered it with a plain Jinja environment
and a template that reached ``().__class__.__base__.__subclasses__()`` ran
code (CVE-2024-34359). Here it renders in ``ImmutableSandboxedEnvironment``
and any sandbox violation is a TemplateError.
"""

from __future__ import annotations

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
    return _env


def check_messages(messages: list[dict]) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise TemplateError("messages must be a non-empty list of {'role', 'content'} dicts",
                            hint="pass e.g. [{'role': 'user', 'content': 'Hello'}]")
    out = []
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise TemplateError(f"bad message {m!r}: need a role ({', '.join(ROLES)}) and string content",
                                hint="pass e.g. {'role': 'user', 'content': 'Hello'}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def render_segments(template: str | None, messages: list[dict], add_generation_prompt: bool = True,
                    *, bos_token: str = "", eos_token: str = "") -> list[tuple[str, bool]]:
    """Render ``messages`` and return ``(text, is_template_text)`` pieces.

    Each message's content is swapped for a random marker before rendering,
    then put back as its own piece, so the caller can tokenize the
    template's text with control tokens enabled and the users' text
    without: typing ``<|im_end|>`` cannot end a turn.
    """
    from jinja2 import TemplateError as JinjaError
    from jinja2.exceptions import SecurityError

    messages = check_messages(messages)
    key = secrets.token_hex(8)
    marks = {f"\x00{key}:{i}\x00": m["content"] for i, m in enumerate(messages)}
    masked = [{"role": m["role"], "content": mark} for m, mark in zip(messages, marks)]
    try:
        text = _environment().from_string(template or FALLBACK_TEMPLATE).render(
            messages=masked, add_generation_prompt=add_generation_prompt,
            bos_token=bos_token, eos_token=eos_token)
    except SecurityError as e:
        raise TemplateError(f"the model's chat template tried something unsafe and was stopped: {e}") from None
    except TemplateError:
        raise
    except (JinjaError, ArithmeticError, TypeError, ValueError, LookupError, AttributeError,
            RecursionError, MemoryError) as e:
        raise TemplateError(f"the model's chat template failed: {type(e).__name__}: {e}") from None
    # One pass over the text (a request may carry thousands of messages):
    # split() puts the markers found at the odd places.
    segments: list[tuple[str, bool]] = []
    for i, piece in enumerate(re.split(f"(\x00{key}:\\d+\x00)", text)):
        if i % 2:
            segments.append((marks[piece], False))
        elif piece:
            if key in piece:
                raise TemplateError("the chat template altered message text in a way edgeinfer cannot follow")
            segments.append((piece, True))
    return segments
