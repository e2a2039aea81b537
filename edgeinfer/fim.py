"""Fill-in-the-middle: code completion between the text before the cursor
and the text after it, as code editors ask.

The prompt is written in the model's own FIM tokens, prefix-suffix-middle
order, with other files' chunks first where the model knows repository
tokens (Qwen2.5-Coder's ``<|repo_name|>`` and ``<|file_sep|>``)::

    <|repo_name|>project\\n<|file_sep|>a.py\\n...<|file_sep|>file\\n
    <|fim_prefix|>PREFIX<|fim_suffix|>SUFFIX<|fim_middle|>MIDDLE

``MIDDLE`` is text the answer starts with: the cursor's line as typed so
far, taken off the prefix (and llama-server's ``prompt``, which is the
same thing). Typing in that line then changes only the end of the prompt,
and asking again reads only what was typed: the file on both sides stays
in the KV cache as it was. After a new line the middle keeps beginning
where it began (:class:`Splits`), for the same reason. (Moving the suffix's KV into place after an
edit in the prefix would spare more, but the suffix's KV was computed
without the edit, and the answer then changes: Qwen2.5-Coder 1.5B
completing ``retu`` gave "rn" with p 0.98 cold and not among its three
likeliest tokens with the suffix's KV moved; so it is not done.) A model without the three FIM tokens is refused with
:class:`~edgeinfer.errors.FimUnsupportedError`.

:class:`EditorFit` shapes an answer for an editor as it streams: at most
``max_lines`` lines, no line that drops below the cursor's indentation
(the block ended), never a line the suffix already has, and no tail the
suffix starts with.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from .errors import FimUnsupportedError

REPO_NAME = "project"      # the repository name a repo-level prompt gives
FILE_NAME = "file"         # the current file's name, when the request gives none
STICKY_LINES = 16          # lines below where a recent middle began that may join it (Splits)
SUFFIX_SHARE = 4           # the suffix gets at most 1/SUFFIX_SHARE of the prompt's budget
MIDDLE_ROOM = 128          # tokens of a long file's budget kept for the cursor's line


@dataclass(frozen=True)
class FimTokens:
    """A vocabulary's fill-in-the-middle tokens (-1 where it has none)."""

    pre: int
    suf: int
    mid: int
    pad: int = -1
    rep: int = -1
    sep: int = -1

    @classmethod
    def of(cls, vocab_handle) -> "FimTokens":
        import llama_cpp as lc

        return cls(lc.llama_vocab_fim_pre(vocab_handle), lc.llama_vocab_fim_suf(vocab_handle),
                   lc.llama_vocab_fim_mid(vocab_handle), lc.llama_vocab_fim_pad(vocab_handle),
                   lc.llama_vocab_fim_rep(vocab_handle), lc.llama_vocab_fim_sep(vocab_handle))

    @property
    def usable(self) -> bool:
        return min(self.pre, self.suf, self.mid) >= 0

    @property
    def repo_level(self) -> bool:
        return self.rep >= 0 and self.sep >= 0


def check_extra(extra, param: str = "input_extra") -> list[tuple[str, str]]:
    """Other files' chunks as (file name, text): a list of ``{"filename",
    "text"}`` objects (llama-server's ``input_extra``)."""
    from .errors import RequestError

    if extra is None:
        return []
    if not isinstance(extra, list):
        raise RequestError(param, f'{param} must be a list of {{"filename": ..., "text": ...}} objects')
    out = []
    for i, chunk in enumerate(extra):
        if not isinstance(chunk, dict) or not isinstance(chunk.get("text"), str) or \
                not isinstance(chunk.get("filename", ""), str):
            raise RequestError(f"{param}[{i}]", f'{param}[{i}] must be {{"filename": ..., "text": ...}}')
        out.append((chunk.get("filename", ""), chunk["text"]))
    return out


def fim_prompt(tokenize, fim: FimTokens, prefix: str, suffix: str, *, extra=(), middle: str = "",
               budget: int, add_bos: int | None = None, model: str = "this model",
               split: int | None = None) -> list[int]:
    """The prompt's token ids. ``tokenize(text)`` gives the ids of plain
    text; ``budget`` caps the prompt's tokens: the suffix keeps its start
    (at most a quarter of the budget), the prefix its end, and other
    files' chunks fill what is left, the last given first (editors send
    the least relevant first). The prefix from ``split`` on (by default
    the cursor's line) goes after the middle token, before ``middle``."""
    cut = prefix.rfind("\n") + 1 if split is None else split   # the middle begins at the cursor's line
    prefix, middle = prefix[:cut], prefix[cut:] + middle
    if not fim.usable:
        raise FimUnsupportedError(
            f"{model} has no fill-in-the-middle tokens",
            hint="use a coder model that has them: edgeinfer pull qwen2.5-coder-1.5b-instruct")
    head = [add_bos] if add_bos is not None and add_bos >= 0 else []
    mid = tokenize(middle) if middle else []
    pre, suf = tokenize(prefix) if prefix else [], tokenize(suffix) if suffix else []
    # What the middle may take is set aside whole, so that typing in it
    # does not move where a long file's prefix is cut (which would change
    # the prompt from its start, and nothing cached would match).
    room = max(0, budget - len(head) - max(len(mid), MIDDLE_ROOM) - 3)
    suf = suf[:min(len(suf), room // SUFFIX_SHARE)]
    pre = pre[max(0, len(pre) - (room - len(suf))):]
    left = room - len(suf) - len(pre)
    context: list[int] = []
    chunks = list(extra)
    if chunks and fim.repo_level:
        opening = [fim.rep, *tokenize(f"{REPO_NAME}\n")]
        closing = [fim.sep, *tokenize(f"{FILE_NAME}\n")]
        if left >= len(opening) + len(closing):
            left -= len(opening) + len(closing)
            kept = []
            for name, text in reversed(chunks):
                ids = [fim.sep, *tokenize(f"{name}\n{text}")]
                if len(ids) > left:
                    break
                kept.insert(0, ids)
                left -= len(ids)
            context = opening + [t for ids in kept for t in ids] + closing
    elif chunks:   # no repository tokens: the chunks' text before the prefix
        kept = []
        for name, text in reversed(chunks):
            ids = tokenize(text if text.endswith("\n") else text + "\n")
            if len(ids) > left:
                break
            kept.insert(0, ids)
            left -= len(ids)
        context = [t for ids in kept for t in ids]
    return head + context + [fim.pre, *pre, fim.suf, *suf, fim.mid, *mid]


class Splits:
    """Where recent prompts' middles began, per file. A prompt whose
    prefix still starts with one of them, cursor at most STICKY_LINES
    lines below and the suffix unchanged, begins its middle there too: a
    new line typed then re-reads only the lines since, where a middle
    begun at the cursor's new line would move the suffix and have it all
    read again (seconds for a long file on a CPU)."""

    def __init__(self, size: int = 8):
        self._recent: list[tuple[str, str]] = []   # (prefix up to the split, suffix), the latest last
        self.size = size

    def choose(self, prefix: str, suffix: str) -> int:
        """Where this prompt's middle begins in ``prefix``; remembered."""
        line = prefix.rfind("\n") + 1
        split = line
        for head, suf in reversed(self._recent):
            if len(head) <= line and suf == suffix and prefix.startswith(head) and \
                    prefix.count("\n", len(head)) <= STICKY_LINES:
                split = len(head)
                break
        entry = (prefix[:split], suffix)
        self._recent = [e for e in self._recent if e != entry][-(self.size - 1):] + [entry]
        return split


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" \t"))


class EditorFit:
    """Shapes a completion for an editor as it streams.

    :meth:`feed` takes each piece of text and returns (text to give out,
    whether the answer should end here). The line being written is held
    back until it is whole, since a rule may drop it, and blank lines
    until a line with code follows them. :meth:`finish`
    gives what is left, less a tail the suffix starts with."""

    def __init__(self, prefix: str, suffix: str, *, max_lines: int | None = None, dedent: bool = False,
                 indent: int | None = None, time_limit: float | None = None, clock=time.monotonic):
        """``indent``: a line after the first indented by fewer characters
        ends the answer (llama-server's ``n_indent``); ``dedent`` does so
        below the cursor's own indentation. ``time_limit``: seconds from the
        first text; once they pass, the answer ends with the line being
        written (llama-server's ``t_max_predict_ms``)."""
        self.max_lines = max_lines
        # A line indented less than the cursor's own has left the block. On
        # a line with nothing typed yet, the line above tells: as deep as
        # it, or deeper if it opens a block ("def f():" wants a body).
        lines = prefix.split("\n")
        cursor_line = lines[-1]
        base = _indent(cursor_line)
        if not cursor_line.strip():
            above = next((line for line in reversed(lines[:-1]) if line.strip()), "")
            base = max(len(cursor_line), _indent(above) + (1 if above.rstrip().endswith((":", "{", "(", "[")) else 0))
        self.min_indent = indent if indent is not None else base if dedent else None
        self.time_limit, self.clock, self.started = time_limit, clock, None
        self.suffix = suffix
        self.suffix_line = next((line.strip() for line in suffix.split("\n") if line.strip()), "")
        self.pending = ""        # the line being written
        self.blanks = 0          # blank lines written after the last line given out
        self.lines = 0           # whole lines given out (the cursor's own counts as the first)
        self.out = ""            # everything given out
        self.stopped = False

    def feed(self, text: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        if self.started is None:
            self.started = self.clock()
        self.pending += text
        given = []
        while "\n" in self.pending:
            line, self.pending = self.pending.split("\n", 1)
            if self._ends_before(line):
                self.stopped, self.pending = True, ""
                break
            if self.lines and not line.strip():   # held until a line with code follows: the end may come first
                self.blanks += 1
                continue
            # A line's new line goes out with the next line: the last one's
            # would add a line the suffix already has.
            given.append(("\n" if self.lines else "") + "\n" * self.blanks + line)
            self.lines += 1 + self.blanks
            self.blanks = 0
            if (self.max_lines is not None and self.lines >= self.max_lines) or \
                    (self.time_limit is not None and self.clock() - self.started >= self.time_limit):
                self.stopped, self.pending = True, ""
                break
        out = "".join(given)
        self.out += out
        return out, self.stopped

    def _ends_before(self, line: str) -> bool:
        """Whether ``line`` (a whole line after the first) is not part of
        the completion: it leaves the block, or the suffix has it."""
        if self.lines == 0:
            return False   # the cursor's own line: it continues what is there
        stripped = line.strip()
        if not stripped:
            return False
        if self.suffix_line and stripped == self.suffix_line:
            return True
        return self.min_indent is not None and _indent(line) < self.min_indent

    def finish(self) -> str:
        """What is left: the line being written (less an end the suffix
        already starts with, such as a closing bracket), or the last
        line's new line where the suffix does not start with one."""
        if self.pending and not self.stopped:
            tail = ("\n" if self.lines else "") + "\n" * self.blanks + self.pending
        else:
            tail = "\n" if self.lines and not self.suffix.startswith("\n") else ""
        self.pending, self.blanks = "", 0
        whole = self.out + tail
        cut = _overlap(whole, self.suffix)
        if cut:
            keep = len(whole) - cut - len(self.out)
            tail = tail[:max(0, keep)]
        self.out += tail
        return tail


def _overlap(text: str, suffix: str) -> int:
    """The length of the longest end of ``text`` that ``suffix`` starts
    with, counted only when it is no word (brackets, quotes, punctuation)
    or four characters or more: "1" at the end of "x = 1" is no overlap
    with a suffix "1 + y"."""
    for n in range(min(len(text), len(suffix)), 0, -1):
        end = text[-n:]
        if suffix.startswith(end) and end.strip():
            if n >= 4 or not any(c.isalnum() or c == "_" for c in end):
                return n
    return 0


def _shaped(fit: EditorFit, ev, stop) -> list:
    from .events import DoneEvent, TextEvent

    if isinstance(ev, DoneEvent):
        tail = fit.finish()
        if fit.stopped and ev.stats.finish_reason == "cancelled":
            ev.stats.finish_reason = "stop"   # ended by the editor's rules, not by a caller
        return ([TextEvent(tail)] if tail else []) + [ev]
    text, ended = fit.feed(ev.text)
    if ended:
        stop.set()
    return [TextEvent(text, ev.tokens, logprobs=ev.logprobs)] if text or ev.tokens else []


def fitted(events, fit: EditorFit, stop):
    """``events`` shaped by ``fit``; ``stop`` (the stream's cancel Event)
    is set when the answer should end, and the stream ends as stopped."""
    for ev in events:
        yield from _shaped(fit, ev, stop)


async def afitted(events, fit: EditorFit, stop):
    """Async :func:`fitted`; closing it closes ``events``."""
    try:
        async for ev in events:
            for out in _shaped(fit, ev, stop):
                yield out
    finally:
        await events.aclose()
