"""Chat sessions: a conversation's history over an engine, saved and
loaded as JSON. Templates are rendered by :mod:`edgeinfer.template`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from .errors import EdgeinferError
from .events import DoneEvent
from .template import FALLBACK_TEMPLATE, ROLES, check_messages, render_segments  # noqa: F401  (re-exported)

if TYPE_CHECKING:
    from .engine import Engine
    from .events import Stats, TextEvent


class ChatSession:
    """A conversation: history, a system prompt, and an engine.

    >>> session = ChatSession(engine, system="You are terse.")  # doctest: +SKIP
    >>> session.send("What is the capital of France?", temperature=0)
    'Paris.'

    A cancelled answer is kept in the history as far as it got.

    With ``tools`` (OpenAI's form), the model may call them: the calls
    made are in ``last_calls`` (edgeinfer.tools.ToolCall), kept in the
    history, and :meth:`tool_result` answers one, after which
    :meth:`stream` with no text lets the model go on.
    """

    def __init__(self, engine: "Engine", system: str | None = None, *, tools: list[dict] | None = None,
                 **options):
        self.engine = engine
        self.system = system
        self.tools = tools
        self.last_calls: list = []      # the calls the last answer made
        self.options = options          # default sampling options for every turn
        self.history: list[dict] = []   # user and assistant turns, without the system prompt
        self.last_stats: "Stats | None" = None

    @property
    def messages(self) -> list[dict]:
        sys_msg = [{"role": "system", "content": self.system}] if self.system else []
        return sys_msg + self.history

    def stream(self, text: str | None, **options) -> Iterator["TextEvent | DoneEvent"]:
        """Add a user turn (None: none, after tool results) and stream the
        reply; the reply joins the history when the stream ends, however
        it ends."""
        from .tool_calls import Collector

        if text is not None:
            self.history.append({"role": "user", "content": text})
        answer = Collector()
        opts = {**self.options, **options}
        if self.tools:
            opts["tools"] = self.tools
        else:   # set for tools no longer offered
            opts.pop("tool_choice", None)
            opts.pop("parallel_tool_calls", None)
        try:
            for event in self.engine.stream_chat(self.messages, **opts):
                answer.add(event)
                if isinstance(event, DoneEvent):
                    self.last_stats = event.stats
                yield event
        except BaseException:
            if not answer.text and not answer.calls:
                if text is not None:
                    self.history.pop()
                raise
            self._keep(answer.reply())
            raise
        self._keep(answer.reply())

    def _keep(self, reply) -> None:
        msg = {"role": "assistant", "content": reply.content}
        if reply.tool_calls:
            msg["tool_calls"] = [{"id": c.id, "type": "function",
                                  "function": {"name": c.name, "arguments": c.arguments}} for c in reply.tool_calls]
        self.last_calls = reply.tool_calls
        self.history.append(msg)

    def tool_result(self, call_id: str, content: str) -> None:
        """Answer the call ``call_id`` with ``content`` (its result, as
        text: JSON is usual)."""
        self.history.append({"role": "tool", "tool_call_id": call_id, "content": content})

    def send(self, text: str | None, **options) -> str:
        """Add a user turn and return the whole reply."""
        return "".join(e.text for e in self.stream(text, **options))

    def reset(self) -> None:
        """Forget the turns; keep the system prompt."""
        self.history.clear()

    def to_json(self) -> dict:
        return {"system": self.system, "messages": self.history}

    def save(self, path: str | Path) -> None:
        """Write the conversation as JSON (atomically)."""
        p = Path(path)
        tmp = p.with_name(f".{p.name}.tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        tmp.replace(p)

    def load(self, path: str | Path) -> None:
        """Replace the conversation with one saved by :meth:`save`."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            history = check_messages(data["messages"]) if data.get("messages") else []
            system = data.get("system")
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise EdgeinferError(f"cannot load a conversation from {path}: {e}",
                                hint="pass a file written by /save or ChatSession.save()") from None
        self.system = system if isinstance(system, str) else None
        self.history = [m for m in history if m["role"] != "system"]
