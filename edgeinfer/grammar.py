"""Constrained generation: JSON schemas and GBNF grammars.

A schema becomes a GBNF grammar through llama-cpp-python's converter (the
port of llama.cpp's own ``json_schema_to_grammar``); llama.cpp's grammar
sampler then masks every token that would leave the grammar, so the
answer parses by construction. It can still be cut short by max_tokens:
``finish_reason`` is then "length".
"""

from __future__ import annotations

import ctypes
import json
import math
import re

import llama_cpp as lc
import numpy as np
from llama_cpp import llama_grammar

from .errors import GrammarError
from .grammar_cost import check_gbnf, check_schema_counts
from .llama import TOKEN_DATA, token_data_array

MAX_SCHEMA_BYTES = 256 * 1024   # a schema past this is almost surely a mistake
MAX_GRAMMAR_BYTES = 1 << 20


# Any JSON object: OpenAI's response_format {"type": "json_object"}.
JSON_OBJECT_GBNF = llama_grammar.JSON_GBNF


def schema_grammar(schema) -> str:
    """The GBNF grammar for a JSON schema (a dict, or its JSON text).

    Raises GrammarError naming what the converter could not handle."""
    if isinstance(schema, (bytes, str)):
        text = schema.decode() if isinstance(schema, bytes) else schema
        try:
            schema = json.loads(text)
        except ValueError as e:
            raise GrammarError(f"the JSON schema is not JSON: {e}", hint="") from None
    check_schema(schema)
    return schema_rules(schema, "")


def check_schema(schema, where: str = "the schema", *, strict: bool = True) -> None:
    """GrammarError for a schema the grammar cannot hold an answer to:
    not an object, too large, a reference outside it, or (``strict``) a
    keyword in UNENFORCED, bar an integer's bounds, which it keeps."""
    if not isinstance(schema, dict):
        raise GrammarError(f"a JSON schema is an object, not {type(schema).__name__}")
    size = len(json.dumps(schema))
    if size > MAX_SCHEMA_BYTES:
        raise GrammarError(f"{where} is {size:,} bytes of JSON schema; at most {MAX_SCHEMA_BYTES:,} are accepted")
    _check_schema(schema, where, strict=strict)


INT_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
MAX_INT_DIGITS = 16        # as llama.cpp's integer rule: an unbounded side has at most this many digits


def int_bounds(node: dict) -> tuple[int | None, int | None]:
    """The smallest and largest integer an integer schema allows (None:
    no bound on that side)."""
    lo = hi = None
    for key, value in node.items():
        if key not in INT_BOUNDS or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if key == "minimum":
            v = math.ceil(value)
        elif key == "exclusiveMinimum":
            v = math.floor(value) + 1
        elif key == "maximum":
            v = math.floor(value)
        else:
            v = math.ceil(value) - 1
        if key.endswith("inimum"):
            lo = v if lo is None else max(lo, v)
        else:
            hi = v if hi is None else min(hi, v)
    return lo, hi


def _digits_between(lo: str, hi: str) -> str:
    """GBNF for the digit strings from ``lo`` to ``hi``, both of one length."""
    if lo == hi:
        return f'"{lo}"'
    if len(lo) == 1:
        return f"[{lo}-{hi}]"
    rest = len(lo) - 1
    if lo[0] == hi[0]:
        return f'"{lo[0]}" ({_digits_between(lo[1:], hi[1:])})'
    parts = []
    low_start, high_start = lo[0], hi[0]
    if lo[1:] != "0" * rest:    # the first digit's numbers from lo up
        parts.append(f'"{lo[0]}" ({_digits_between(lo[1:], "9" * rest)})')
        low_start = str(int(lo[0]) + 1)
    if hi[1:] != "9" * rest:    # the last digit's numbers up to hi
        parts.append(f'"{hi[0]}" ({_digits_between("0" * rest, hi[1:])})')
        high_start = str(int(hi[0]) - 1)
    if low_start <= high_start:   # whole runs of first digits in between
        parts.insert(1 if lo[1:] != "0" * rest else 0, f"[{low_start}-{high_start}] [0-9]{{{rest}}}")
    return " | ".join(parts)


def _naturals(lo: int, hi: int | None) -> list[str]:
    """GBNF alternatives for the whole numbers from ``lo`` (>= 0) to ``hi``
    (None: as many digits as MAX_INT_DIGITS)."""
    out = []
    top = MAX_INT_DIGITS if hi is None else len(str(hi))
    for n in range(len(str(lo)), top + 1):
        first = 0 if n == 1 else 10 ** (n - 1)
        a, b = max(lo, first), 10 ** n - 1 if hi is None else min(hi, 10 ** n - 1)
        if a <= b:
            out.append(_digits_between(str(a), str(b)))
    return out


def int_range(lo: int | None, hi: int | None) -> str:
    """GBNF for the JSON integers from ``lo`` to ``hi`` (None: unbounded),
    written as JSON writes them (no leading zeros, no "-0")."""
    if lo is not None and hi is not None and lo > hi:
        raise GrammarError(f"no integer is at least {lo} and at most {hi}")
    alts = []
    if lo is None or lo < 0:   # the negative ones, as "-" and their magnitude
        smallest = 1 if hi is None or hi >= 0 else -hi
        alts += [f'"-" ({a})' for a in _naturals(smallest, None if lo is None else -lo)]
    if hi is None or hi >= 0:
        alts += [f"({a})" for a in _naturals(max(0, lo or 0), hi)]
    return " | ".join(alts)


class _Converter(llama_grammar.SchemaConverter):
    """llama.cpp's converter, which reads past an integer's bounds; here
    they are kept (minimum, maximum and their exclusive forms)."""

    def visit(self, schema, name):
        if isinstance(schema, dict) and schema.get("type") == "integer" and any(k in schema for k in INT_BOUNDS):
            rule_name = name + "-" if name in llama_grammar.RESERVED_NAMES else name or "root"
            return self._add_rule(rule_name, f"({int_range(*int_bounds(schema))}) space")
        return super().visit(schema, name)


def schema_rules(schema: dict, name: str, prop_order: list[str] | None = None, *, loose: bool = False) -> str:
    """GBNF rules for a checked ``schema``, its top rule named ``name``
    ("" for ``root``) and the rest prefixed with it; ``prop_order`` puts
    those properties first, in that order. ``loose``: between tokens the
    JSON may have a new line and indentation too, as models write JSON
    they were not held to (a lazy grammar must accept what came before
    its trigger)."""
    converter = _Converter(prop_order={p: i for i, p in enumerate(prop_order or [])},
                           allow_fetch=False, dotall=False, raw_pattern=False)
    try:
        converter.visit(converter.resolve_refs(schema, "request"), name)
        gbnf = converter.format_grammar()
    except RecursionError:
        raise GrammarError("the JSON schema nests too deeply to convert") from None
    except Exception as e:  # the converter reports what it cannot handle by assertion
        detail = str(e) or type(e).__name__
        raise GrammarError(f"the JSON schema cannot be turned into a grammar: {detail[:300]}") from None
    # This converter lets a string hold raw control characters, which JSON
    # forbids (they must be escaped); llama.cpp's own grammar excludes them.
    gbnf = gbnf.replace(_LOOSE_CHAR, _STRICT_CHAR)
    if not loose:
        return gbnf
    # The converter puts no space after an enum or a constant: allow it
    # before the comma or bracket that follows, as before any other value's.
    for mark in ('","', '"}"', '"]"'):
        gbnf = gbnf.replace(f"{mark} space", f"space {mark} space")
    return gbnf.replace(_TIGHT_SPACE, _LOOSE_SPACE)


_TIGHT_SPACE = 'space ::= " "?'
_LOOSE_SPACE = 'space ::= | " " | "\\n" [ \\t]{0,20}'
_LOOSE_CHAR = 'char ::= [^"\\\\]'
_STRICT_CHAR = 'char ::= [^"\\\\\\x7F\\x00-\\x1F]'


# Keywords the converter reads past without enforcing them: an answer
# could break them, so a schema that uses one is refused rather than
# trusted. (format is an annotation in JSON Schema; it stays allowed.)
UNENFORCED = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf", "uniqueItems",
              "patternProperties", "propertyNames", "minProperties", "maxProperties", "contains",
              "minContains", "maxContains", "dependentRequired", "dependentSchemas", "dependencies",
              "if", "then", "else", "not", "unevaluatedProperties", "unevaluatedItems")
_SUBSCHEMA_MAPS = ("properties", "$defs", "definitions")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")


def _check_schema(node, where: str = "the schema", depth: int = 0, *, strict: bool = True) -> None:
    """Refuse what would be followed badly: a reference that is not local
    (a server must never fetch a URL because a request's schema names one),
    and the keywords in UNENFORCED."""
    if depth > 64:
        raise GrammarError("the JSON schema nests more than 64 levels deep")
    if not isinstance(node, dict):
        return
    check_schema_counts(node, where)   # before the converter writes them out
    ref = node.get("$ref")
    if ref is not None and not (isinstance(ref, str) and ref.startswith("#")):
        raise GrammarError(f"$ref {str(ref)[:80]!r} at {where} is not local; only references inside the "
                           'schema ("#/$defs/...") are followed')
    if node.get("type") == "integer":
        lo, hi = int_bounds(node)
        if lo is not None and hi is not None and lo > hi:
            raise GrammarError(f"no integer at {where} is at least {lo} and at most {hi}")
    for key in UNENFORCED if strict else ():
        if key in node and not (key in INT_BOUNDS and node.get("type") == "integer"):
            raise GrammarError(f"'{key}' at {where} cannot be enforced by the grammar, so the answer could "
                               f"break it", hint=f"drop '{key}' from the schema and check that part yourself")
    for key in _SUBSCHEMA_MAPS:
        if isinstance(node.get(key), dict):
            for name, sub in node[key].items():
                _check_schema(sub, f"{where}.{key}.{name}"[:200], depth + 1, strict=strict)
    for key in _SUBSCHEMA_LISTS:
        if isinstance(node.get(key), list):
            for i, sub in enumerate(node[key]):
                _check_schema(sub, f"{where}.{key}[{i}]"[:200], depth + 1, strict=strict)
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), dict):
            _check_schema(node[key], f"{where}.{key}"[:200], depth + 1, strict=strict)


def check_cost(gbnf: str, what: str = "the grammar") -> None:
    """GrammarError for a grammar too large or too costly to run."""
    _check_text(gbnf)
    check_gbnf(gbnf, what)


def _check_text(gbnf) -> None:
    if not isinstance(gbnf, str) or not gbnf.strip():
        raise GrammarError("a grammar is a non-empty GBNF string with a 'root' rule")
    try:
        size = len(gbnf.encode("utf-8"))
    except UnicodeEncodeError:
        raise GrammarError("the grammar holds a lone UTF-16 surrogate, which is not text") from None
    if size > MAX_GRAMMAR_BYTES:
        raise GrammarError(f"the grammar is {size:,} bytes; at most {MAX_GRAMMAR_BYTES:,} are accepted")


class CompiledGrammar:
    """A grammar llama.cpp has parsed, for one request: built once, in the
    caller's thread (never on an event loop or the scheduler's thread, so a
    large grammar stalls nobody else), then handed to the request's
    GrammarGate. Freed by whoever holds it last."""

    def __init__(self, vocab, gbnf: str, trigger: bytes | None = None):
        self.gbnf, self.vocab = gbnf, vocab
        self.trigger = None if trigger is None else re.compile(trigger)
        self.sampler = self.fresh()

    def fresh(self):
        """A new llama.cpp sampler of this grammar (the caller's to free)."""
        sampler = lc.llama_sampler_init_grammar(self.vocab, self.gbnf.encode("utf-8"), b"root")
        if not sampler:
            raise GrammarError("llama.cpp could not parse the grammar (its log says where); "
                               "it must be GBNF with a 'root' rule", hint="")
        return sampler

    def take(self):
        """The sampler, now the caller's to free."""
        sampler, self.sampler = self.sampler, None
        return sampler

    def __del__(self):   # a request that never started
        if getattr(self, "sampler", None):
            lc.llama_sampler_free(self.sampler)
            self.sampler = None


def compile_grammar(vocab, gbnf) -> CompiledGrammar:
    """Parse ``gbnf`` as :func:`resolve` returned it (its cost already
    checked), or a tools.CallGrammar, with llama.cpp. Raises GrammarError;
    parsing takes a millisecond or so for an ordinary grammar, and done
    here it fails in the caller's thread rather than mid-step."""
    if isinstance(gbnf, str):
        return CompiledGrammar(vocab, gbnf)
    return CompiledGrammar(vocab, gbnf.gbnf, gbnf.trigger)


def resolve(json_schema=None, grammar: str | None = None) -> str | None:
    """The grammar a request asks for: ``json_schema`` (a schema, or
    ``"json"`` for any JSON object) or raw GBNF ``grammar``; not both.
    What the grammar will cost is checked here, before anything builds it."""
    if json_schema is not None and grammar is not None:
        raise GrammarError("give json_schema or grammar, not both")
    if hasattr(grammar, "gbnf"):   # a tools.CallGrammar, checked as it was built
        return grammar
    if grammar is not None:
        _check_text(grammar)
        check_gbnf(grammar)
        return grammar
    if json_schema is None:
        return None
    if json_schema == "json":
        return JSON_OBJECT_GBNF
    gbnf = schema_grammar(json_schema)
    check_cost(gbnf, "the schema's grammar")
    return gbnf


MAX_REDRAWS = 8        # tokens refused in a row before a lazy grammar gives up on a step
GREEDY_TRIES = 64      # next-likeliest tokens checked before the whole vocabulary is masked
TRIGGER_TAIL = 256     # bytes of text kept to find a trigger in (longer than any trigger)


class GrammarGate:
    """Grammar-constrained sampling that costs little while the model
    already follows the grammar.

    Masking the whole vocabulary through the grammar at every token costs
    about 40 % of decode speed here (SmolLM2, 49k tokens). So, as
    llama.cpp's own common sampler does, the token is drawn from the
    plain chain first and only that one token is checked; when the
    grammar refuses it, the whole vocabulary is masked and the token is
    drawn again. A token is kept with probability p(t), or drawn again
    from the masked distribution, so each allowed token ends up with
    p(t) / P(allowed): the constrained distribution, exactly. At
    temperature 0 the answer is the masked argmax either way, and the
    next likeliest tokens are checked one by one before masking, which
    finds that argmax for far less."""

    check_first = True   # False masks at every token (the tests compare both)

    def __init__(self, grammar: CompiledGrammar, n_vocab: int, vocab=None, greedy: bool = False):
        self.sampler = grammar.take()
        self.greedy = greedy   # the chain takes the likeliest token: refusals can be skipped one by one
        if not self.sampler:
            raise GrammarError("this grammar was used by another request already", hint="")
        self.n_vocab = n_vocab
        self.ids = np.arange(n_vocab, dtype=np.int32)
        self.cand = np.zeros(n_vocab, dtype=TOKEN_DATA)
        self.one = np.zeros(1, dtype=TOKEN_DATA)
        self.masked = 0      # tokens the grammar refused, so that the whole vocabulary was masked
        self.arr = token_data_array(self.cand)
        self.one_arr = token_data_array(self.one)
        # A lazy grammar (tool calls under "auto") waits for its trigger in
        # the text; llama.cpp's own lazy grammar aborts the process when
        # the text its trigger caught does not parse, so it is done here.
        self.grammar, self.vocab = grammar, vocab
        self.waiting = grammar.trigger is not None
        self.tail = b""      # the end of the text so far, where a trigger is looked for
        self.seen = 0        # bytes of text so far
        # A trigger anchored at the answer's start can only match while the tail holds the start.
        self.anchored = self.waiting and grammar.trigger.pattern.startswith(rb"\A")

    def _fill(self, ctx, idx: int):
        logits = ctx.logits(idx)
        self.cand["id"] = self.ids
        self.cand["logit"] = logits
        self.cand["p"] = 0.0
        arr = self.arr
        arr.data = self.cand.ctypes.data_as(ctypes.POINTER(lc.llama_token_data))
        arr.size, arr.selected, arr.sorted = self.n_vocab, -1, False
        return arr

    def sample(self, chain, ctx, idx: int, is_eog) -> int:
        """Draw the next token at batch row ``idx`` of ``ctx`` (a
        llama.Context) and advance both the
        chain and the grammar with it; -1 when the grammar allows no token
        at all (a dead end: the caller ends the answer).

        llama.cpp aborts the process when its grammar accepts a token it
        does not allow, or an end-of-generation token before the grammar
        is complete, so no such token ever reaches accept."""
        if self.waiting:
            return self._sample_waiting(chain, ctx, idx, is_eog)
        arr = self._fill(ctx, idx)
        lc.llama_sampler_apply(chain, ctypes.byref(arr))
        tok = int(arr.data[arr.selected].id)
        allowed = self.check_first and self._allows(tok)
        if not allowed and self.check_first and self.greedy:
            nxt = self._next_allowed(tok)
            allowed, tok = nxt is not None, tok if nxt is None else nxt
        if not allowed:
            self.masked += 1
            arr = self._fill(ctx, idx)
            lc.llama_sampler_apply(self.sampler, ctypes.byref(arr))
            lc.llama_sampler_apply(chain, ctypes.byref(arr))
            if arr.selected < 0 or not np.isfinite(arr.data[arr.selected].logit):
                return -1
            tok = arr.data[arr.selected].id
        if not is_eog(tok):  # the answer ends there: the grammar need not move
            lc.llama_sampler_accept(self.sampler, tok)
        lc.llama_sampler_accept(chain, tok)
        return int(tok)

    def _next_allowed(self, refused: int) -> int | None:
        """Greedy: the likeliest token the grammar allows among the
        GREEDY_TRIES likeliest, from the logits the chain just saw (bias
        and all), each checked alone: a few microseconds each, where the
        whole vocabulary through the grammar costs ~5 ms with 49k tokens.
        None when none of them is allowed."""
        logits = self.cand["logit"]
        k = min(GREEDY_TRIES, len(logits) - 1)
        top = np.argpartition(-logits, k)[:k]
        for i in top[np.argsort(-logits[top], kind="stable")]:
            if not np.isfinite(logits[i]):
                return None
            tok = int(self.cand["id"][i])
            if tok != refused and self._allows(tok):
                return tok
        return None

    def _allows(self, tok: int) -> bool:
        """Whether the grammar, as it stands, allows ``tok`` next."""
        self.one[0] = (tok, 1.0, 0.0)
        one = self.one_arr
        one.size, one.selected, one.sorted = 1, -1, False
        lc.llama_sampler_apply(self.sampler, ctypes.byref(one))
        return bool(np.isfinite(self.one["logit"][0]))

    def _sample_waiting(self, chain, ctx, idx: int, is_eog) -> int:
        """Draw freely; a token that completes the trigger starts the
        grammar with the text the trigger caught, and one whose text the
        grammar could not follow is not drawn."""
        banned: list[int] = []
        for _ in range(MAX_REDRAWS):
            arr = self._fill(ctx, idx)
            if banned:
                self.cand["logit"][banned] = -np.inf
            lc.llama_sampler_apply(chain, ctypes.byref(arr))
            if arr.selected < 0 or not np.isfinite(arr.data[arr.selected].logit):
                return -1
            tok = int(arr.data[arr.selected].id)
            if is_eog(tok):
                break
            piece = self.vocab.token_bytes(tok, True)
            text = self.tail + piece
            m = None if self.anchored and self.seen + len(piece) > TRIGGER_TAIL else self.grammar.trigger.search(text)
            if m is None or self._start(text[m.start():]):
                self.tail = text[-TRIGGER_TAIL:]
                self.seen += len(piece)
                break
            banned.append(tok)
        else:
            return -1
        lc.llama_sampler_accept(chain, tok)
        return tok

    def _start(self, caught: bytes) -> bool:
        """Feed the grammar the text its trigger caught; False (and a fresh
        grammar) when it does not parse."""
        text = caught.decode("utf-8", errors="ignore")
        for t in self.vocab.tokenize(text, add_bos=False, special=False):
            if not self._allows(t):
                lc.llama_sampler_free(self.sampler)
                self.sampler = self.grammar.fresh()
                return False
            lc.llama_sampler_accept(self.sampler, t)
        self.waiting = False
        return True

    def free(self) -> None:
        if self.sampler:
            lc.llama_sampler_free(self.sampler)
            self.sampler = None
