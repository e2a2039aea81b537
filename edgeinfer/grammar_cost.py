"""What a grammar or a schema will cost before anything builds it.

A few bytes of grammar can cost without bound further on: llama.cpp's
grammar parser recurses once per nested group (20,000 levels overflowed
its stack and killed the process), expands ``x{m,n}`` into copies of
``x`` (and ``{1,0}`` made it allocate gigabytes), and the schema
converter writes ``minItems``, ``maxLength`` and a pattern's ``{n}`` out
as text before anything can measure it. So a request's grammar is judged
by what it will cost, not by its length: its nesting depth and the
number of elements it expands to, with the repetition counts inside it.
Pure Python, no llama.cpp: it runs before llama.cpp sees the text.
"""

from __future__ import annotations

import re

from .errors import GrammarError

# 5,000 nested groups parsed and 20,000 crashed (2-core x86 box, 8 MiB
# thread stacks); a schema's maxLength of 1,000 nests 1,000 deep.
MAX_NESTING = 1200
# A count in a repetition or a schema (maxLength, minItems, ...).
MAX_COUNT = 1000
# Elements a grammar or a pattern expands to: 20,000 parse in well under a
# second here; 50,000 alternatives took two.
MAX_ELEMENTS = 20_000

_REPEAT = re.compile(r"\{\s*(\d*)\s*(,?)\s*(\d*)\s*\}")


class _Tally:
    """Elements counted through nested groups; a repetition multiplies the
    element (or group) just before it. ``total`` is kept as it goes, so
    counting is linear in the text."""

    def __init__(self, what: str):
        self.what = what
        self.frames = [[0, 0]]     # per open group: [elements so far, elements of the last one]
        self.depth = 0
        self.total = 0             # over every open group

    def element(self, n: int = 1) -> None:
        frame = self.frames[-1]
        frame[0] += n
        frame[1] = n
        self._add(n)

    def open(self) -> None:
        self.frames.append([0, 0])
        self.depth = max(self.depth, len(self.frames) - 1)
        if self.depth > MAX_NESTING:
            raise GrammarError(f"{self.what} nests groups more than {MAX_NESTING:,} deep",
                               hint="flatten it, or use a shorter maxLength / maxItems")

    def close(self) -> None:
        if len(self.frames) > 1:
            inner = self.frames.pop()[0]
            self.total -= inner
            self.element(inner)

    def repeat(self, times: int) -> None:
        frame = self.frames[-1]
        extra = frame[1] * (times - 1)
        frame[0] += extra
        frame[1] *= times
        self._add(extra)

    def _add(self, n: int) -> None:
        self.total += n
        if self.total > MAX_ELEMENTS:
            raise GrammarError(f"{self.what} expands to more than {MAX_ELEMENTS:,} elements",
                               hint="use smaller repetition counts (maxLength, minItems, {n} ...)")


def _counts(text: str, at: int, what: str) -> tuple[int, int]:
    """The ``{m,n}`` at ``at``: the times the element is written out, and
    where the repetition ends. Refuses a count past MAX_COUNT and m > n."""
    m = _REPEAT.match(text, at)
    if not m:
        raise GrammarError(f"{what} has an unreadable repetition at {text[at:at + 20]!r}")
    lo, comma, hi = m.group(1), m.group(2), m.group(3)
    low = int(lo) if lo else 0
    high = int(hi) if hi else None
    for n in (low, high):
        if n is not None and n > MAX_COUNT:
            raise GrammarError(f"{what} repeats something {n:,} times; at most {MAX_COUNT:,} are accepted")
    if high is not None and high < low:
        raise GrammarError(f"{what} has the repetition {m.group(0)}, whose upper bound is below its lower one")
    times = low if not comma else (high if high is not None else low + 1)
    return max(times, 1), m.end()


def check_gbnf(gbnf: str, what: str = "the grammar") -> int:
    """Raise GrammarError if ``gbnf`` nests too deeply, repeats too often
    or expands to too many elements; returns the element count."""
    t = _Tally(what)
    i, n = 0, len(gbnf)
    while i < n:
        c = gbnf[i]
        if c == "#":                                   # a comment, to the end of the line
            j = gbnf.find("\n", i)
            i = n if j < 0 else j + 1
        elif c == '"':                                 # a literal: an element per character
            j, chars = i + 1, 0
            while j < n and gbnf[j] != '"':
                j += 2 if gbnf[j] == "\\" else 1
                chars += 1
            t.element(max(chars, 1))
            i = j + 1
        elif c == "[":                                 # a character class
            t.element()
            i = _after_class(gbnf, i)
        elif c == "(":
            t.open()
            i += 1
        elif c == ")":
            t.close()
            i += 1
        elif c == "{":
            times, i = _counts(gbnf, i, what)
            t.repeat(times)
        elif c == "+":                                 # x+ is x x*
            t.repeat(2)
            i += 1
        elif c.isalnum() or c in "-_":                 # a rule's name
            j = i
            while j < n and (gbnf[j].isalnum() or gbnf[j] in "-_"):
                j += 1
            if not gbnf.startswith("::=", _skip_space(gbnf, j)):
                t.element()
            i = j
        else:                                          # space, |, *, ?, ::=, a dot
            i += 1
    return t.total


def _after_class(text: str, i: int, leading_bracket: bool = False) -> int:
    """Where the character class opening at ``i`` ends (past its ``]``);
    ``leading_bracket``: a ``]`` right after ``[`` is a member (regex)."""
    j = i + 1
    if leading_bracket and j < len(text) and text[j] == "]":
        j += 1
    while j < len(text) and text[j] != "]":
        j += 2 if text[j] == "\\" else 1
    return j + 1


def _skip_space(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t":
        i += 1
    return i


def check_pattern(pattern: str, where: str) -> int:
    """The same limits for a schema's regular expression, which the
    converter writes out as grammar text (``a{3}`` becomes ``"aaa"``)."""
    what = f"the pattern at {where}"
    t = _Tally(what)
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "\\":
            t.element()
            i += 2
        elif c == "[":
            t.element()
            i = _after_class(pattern, i, leading_bracket=True)
        elif c == "(":
            t.open()
            i += 3 if pattern.startswith("(?:", i) else 1
        elif c == ")":
            t.close()
            i += 1
        elif c == "{" and _REPEAT.match(pattern, i):
            times, i = _counts(pattern, i, what)
            t.repeat(times)
        elif c in "|^$*?":
            i += 1
        elif c == "+":
            t.repeat(2)
            i += 1
        else:
            t.element()
            i += 1
    return t.total


# Schema keywords that the converter writes out as many copies.
COUNTS = ("minLength", "maxLength", "minItems", "maxItems")


def check_schema_counts(node: dict, where: str) -> None:
    """Refuse counts past MAX_COUNT and patterns that expand too far, in
    one schema node (the caller walks the tree)."""
    for key in COUNTS:
        v = node.get(key)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise GrammarError(f"'{key}' at {where} must be a whole number of 0 or more")
        if v > MAX_COUNT:
            raise GrammarError(f"'{key}' at {where} is {v:,}; at most {MAX_COUNT:,} can be enforced by a grammar",
                               hint=f"use {MAX_COUNT:,} or less, or drop '{key}' and check the length yourself")
    pattern = node.get("pattern")
    if isinstance(pattern, str):
        check_pattern(pattern, where)
