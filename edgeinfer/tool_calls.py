"""The tool calls in a model's answer, read as it streams.

:class:`CallParser` turns the text into content and
:class:`~edgeinfer.events.ToolCallEvent` pieces, in the format of the
model's family (edgeinfer.tools.Family): a call's id and name once, its
arguments' JSON in fragments as they are generated, then ``done`` once the
call is whole and checked. Only what the grammar held the model to counts
as a call: the function's name written out as offered, first, then its
arguments. A call the answer did not finish (cut by ``max_tokens``) never
gets ``done``, is not among the calls, and the finish reason says
"length". :func:`split_calls` applies a parser to a stream of events;
:func:`collect` gathers one into a :class:`Reply`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from .events import DoneEvent, TextEvent, ToolCallEvent
from .tools import FENCE, HERMES, Family, new_call_id

_HEADERS: dict[str, re.Pattern] = {}


def _header(args_key: str) -> re.Pattern:
    """A call object's opening up to its arguments, matched once the
    arguments' "{" is there; the name as written, unescaped."""
    if args_key not in _HEADERS:
        _HEADERS[args_key] = re.compile(r'\{\s*"name"\s*:\s*"([^"\\]*)"\s*,\s*"' + args_key + r'"\s*:\s*(?=\{)')
    return _HEADERS[args_key]


class _JsonEnd:
    """Finds where one JSON value ends, fed a character at a time."""

    def __init__(self):
        self.depth, self.in_string, self.escape = 0, False, False

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
        elif ch in "}]":
            self.depth -= 1
            return self.depth == 0
        elif ch == '"':
            self.in_string = True
        return False


class CallParser:
    """Content and tool calls out of a model's text, as it streams.

    :meth:`feed` takes each piece of text and returns what can be said
    already: strings of content and ToolCallEvents. Text that might be the
    start of a call's opening, and whitespace before one, is held back
    until the next piece says what it is."""

    @classmethod
    def of(cls, use) -> "CallParser | None":
        """The parser for an edgeinfer.tools.ToolUse, or None when no call can come."""
        return cls(use.callable, use.family) if use.callable else None

    def __init__(self, names: list[str], family: Family = HERMES):
        self.family = family
        self.names = set(names)
        self.header = _header(self.family.args_key)
        self.calls: list[dict] = []     # finished: {"id", "name", "arguments" (JSON text)}
        self.open = False               # inside an opening (a call, or calls in an array)
        self._indexes = 0               # calls begun, finished or not
        self._said = False              # content given out already
        self._held = ""                 # content not yet given out
        self._gap = ""                  # whitespace before the opening, given back if it was no call
        self._raw = ""                  # the opening's text so far, given back as content if it was no call
        self._opening = ("", "")        # how the calls under way opened, and how they close
        self._in_array = False          # past the "[" of an array of calls
        self._reset_call()

    def _reset_call(self) -> None:
        self._stage = "before"          # before a call object, in one, or after it ("closing")
        self._buf = ""                  # the call object's text so far (from its "{")
        self._call = None               # (index, id, name) once its header is read
        self._arg0 = self._sent = 0     # where its arguments start, and how much of them went out
        self._args = None               # a _JsonEnd over the arguments
        self._args_end = None           # where they end in _buf
        self._obj = _JsonEnd()          # over the whole object
        self._scanned = 0               # characters of _buf the object scanner has seen
        self._obj_end = None            # where the object ends in _buf

    # -- text between calls --------------------------------------------------------
    def feed(self, text: str) -> list:
        out: list = []
        while text:
            text = self._feed_call(text, out) if self.open else self._feed_text(text, out)
        return out

    def _feed_text(self, text: str, out: list) -> str:
        held = self._held + text
        openings = self.family.openings
        if self.family.at_start and not self._said and not self.calls:
            body = held.lstrip()
            if not body:
                self._held = held
                return ""
            if body.startswith("{"):   # a bare call object opens the answer
                return self._enter(held, len(held) - len(body), ("", ""), out)
        found = [(i, pair) for pair in openings if (i := held.find(pair[0])) >= 0]
        if found:
            i, pair = min(found)
            return self._enter(held, i, pair, out)
        # Hold back the start of an opening, and the whitespace before it.
        n = max((n for o, _ in openings for n in range(min(len(o) - 1, len(held)), 0, -1)
                 if held.endswith(o[:n])), default=0)
        cut = len(held[:len(held) - n].rstrip())
        self._say(held[:cut], out)
        self._held = held[cut:]
        return ""

    def _enter(self, held: str, i: int, pair: tuple[str, str], out: list) -> str:
        before = held[:i]
        kept = before.rstrip()
        self._say(kept, out)
        self._gap, self._raw = before[len(kept):], pair[0]
        self._held, self.open, self._opening, self._in_array = "", True, pair, False
        self._reset_call()
        return held[i + len(pair[0]):]

    def _say(self, text: str, out: list) -> None:
        if text:
            out.append(text)
            self._said = True

    # -- inside an opening ---------------------------------------------------------
    def _feed_call(self, text: str, out: list) -> str:
        self._raw += text
        if self._stage == "closing":   # a whole call: waiting for the closing marker
            self._wait += text
            i = self._wait.find(self._opening[1])
            if i < 0:
                return ""
            return self._leave(self._wait[i + len(self._opening[1]):])
        if self._stage == "before":
            text = self._before_object(text, out)
            if not self.open or text is None:
                return text or ""
            self._stage = "object"
        start = len(self._buf)
        self._buf += text
        if self._call is None:
            m = self.header.match(self._buf)
            if m and m.group(1) in self.names:
                self._call = (self._indexes, self._new_id(), m.group(1))
                self._indexes += 1
                out.append(ToolCallEvent(*self._call, "", first=True))
                self._arg0 = start = m.end()
                self._args = _JsonEnd()
        if self._call is not None and self._args_end is None:
            for j in range(max(start, self._arg0), len(self._buf)):
                if self._args.feed(self._buf[j]):
                    self._args_end = j + 1
                    break
            piece = self._buf[self._arg0 + self._sent:self._args_end or len(self._buf)]
            if piece:
                self._sent += len(piece)
                out.append(ToolCallEvent(*self._call, piece))
        for j in range(self._scanned, len(self._buf)):
            if self._obj.feed(self._buf[j]):
                self._obj_end = j + 1
                break
        self._scanned = len(self._buf) if self._obj_end is None else self._obj_end
        if self._obj_end is None:
            return ""
        rest = self._buf[self._obj_end:]
        if not self._finish_call(self._buf[:self._obj_end], out):
            return self._not_a_call(out, rest)
        self._reset_call()
        self._raw = ""             # what follows is read afresh
        if self.family.array:
            return rest            # the next call, or the "]"
        if self._opening[1]:
            self._stage, self._wait = "closing", ""
            return rest
        return self._leave(rest)

    def _before_object(self, text: str, out: list) -> str | None:
        """Whitespace, and for an array its "[" and commas, before a call
        object: the text from the object's "{" on; None to wait for more."""
        array = self.family.array
        body = text.lstrip()
        if array and not self._in_array:
            if not body:
                return None
            if body[0] != "[":
                return self._not_a_call(out)
            self._in_array, body = True, body[1:].lstrip()
        if array and body.startswith(","):
            body = body[1:].lstrip()
        if not body:
            return None
        if array and body[0] == "]":
            return self._leave(body[1:])
        if body[0] != "{":
            return self._not_a_call(out)
        return body

    def _leave(self, rest: str) -> str:
        self.open, self._raw, self._gap = False, "", ""
        self._reset_call()
        return rest

    def _finish_call(self, body: str, out: list) -> bool:
        """A whole call object: True (and ``done``) if it is the call its
        header said; the grammar makes it so."""
        if self._call is None:
            return False
        key = self.family.args_key
        try:
            obj = json.loads(body)
        except ValueError:
            return False
        if not (isinstance(obj, dict) and obj.get("name") == self._call[2] and isinstance(obj.get(key), dict)):
            return False
        index, cid, name = self._call
        self.calls.append({"id": cid, "name": name, "arguments": body[self._arg0:self._args_end]})
        out.append(ToolCallEvent(index, cid, name, "", done=True))
        return True

    def _not_a_call(self, out: list, rest: str = "") -> str:
        """What opened was no call after all: its text is content."""
        raw = self._raw[:len(self._raw) - len(rest)]
        self._say(self._gap + raw, out)
        self.open, self._raw, self._gap = False, "", ""
        self._reset_call()
        return rest

    def _new_id(self) -> str:
        return new_call_id(self.family.id_length)

    # -- the end -------------------------------------------------------------------
    def finish(self) -> list:
        """What is left at the end: held content. An unfinished call stays
        unfinished (its events had no ``done``). An opening that never
        became a call is content when it could have been content (a fenced
        block, a bare object) and no call came before it."""
        out: list = []
        if not self.open:
            if self._held.strip() or not self.calls:
                self._say(self._held, out)
        elif self._call is None and not self.calls and self._opening[0] in (FENCE, ""):
            self._say(self._gap + self._raw, out)
        self._held = ""
        return out


# -- a stream --------------------------------------------------------------------
class _Split:
    """A stream's events with tool calls read out of its text."""

    def __init__(self, parser: CallParser):
        self.parser = parser
        self.tokens: list[int] = []   # tokens of text held back, given to the next event out

    def events(self, ev) -> list:
        if isinstance(ev, DoneEvent):
            out = self._wrap(self.parser.finish())
            if self.tokens:   # held back to the end and given out as nothing: counted all the same
                out.append(TextEvent("", self.tokens))
                self.tokens = []
            if self.parser.calls and ev.stats.finish_reason == "stop":
                ev.stats.finish_reason = "tool_calls"
            return out + [ev]
        self.tokens += ev.tokens
        return self._wrap(self.parser.feed(ev.text))

    def _wrap(self, pieces: list) -> list:
        out = [TextEvent(p) if isinstance(p, str) else p for p in pieces]
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
