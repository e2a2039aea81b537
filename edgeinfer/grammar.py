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

import llama_cpp as lc
import numpy as np
from llama_cpp import llama_grammar

from .errors import GrammarError
from .grammar_cost import check_gbnf, check_schema_counts

MAX_SCHEMA_BYTES = 256 * 1024   # a schema past this is almost surely a mistake
MAX_GRAMMAR_BYTES = 1 << 20

# llama_token_data as numpy sees it: id, logit, p.
_TOKEN_DATA = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])
assert _TOKEN_DATA.itemsize == ctypes.sizeof(lc.llama_token_data)

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
    if not isinstance(schema, dict):
        raise GrammarError(f"a JSON schema is an object, not {type(schema).__name__}")
    text = json.dumps(schema)
    if len(text) > MAX_SCHEMA_BYTES:
        raise GrammarError(f"the JSON schema is {len(text):,} bytes; at most {MAX_SCHEMA_BYTES:,} are accepted")
    _check_schema(schema)
    try:
        gbnf = llama_grammar.json_schema_to_gbnf(text)
    except RecursionError:
        raise GrammarError("the JSON schema nests too deeply to convert") from None
    except Exception as e:  # the converter reports what it cannot handle by assertion
        detail = str(e) or type(e).__name__
        raise GrammarError(f"the JSON schema cannot be turned into a grammar: {detail[:300]}") from None
    # This converter lets a string hold raw control characters, which JSON
    # forbids (they must be escaped); llama.cpp's own grammar excludes them.
    return gbnf.replace(_LOOSE_CHAR, _STRICT_CHAR)


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


def _check_schema(node, where: str = "the schema", depth: int = 0) -> None:
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
    for key in UNENFORCED:
        if key in node:
            raise GrammarError(f"'{key}' at {where} cannot be enforced by the grammar, so the answer could "
                               f"break it", hint=f"drop '{key}' from the schema and check that part yourself")
    for key in _SUBSCHEMA_MAPS:
        if isinstance(node.get(key), dict):
            for name, sub in node[key].items():
                _check_schema(sub, f"{where}.{key}.{name}"[:200], depth + 1)
    for key in _SUBSCHEMA_LISTS:
        if isinstance(node.get(key), list):
            for i, sub in enumerate(node[key]):
                _check_schema(sub, f"{where}.{key}[{i}]"[:200], depth + 1)
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), dict):
            _check_schema(node[key], f"{where}.{key}"[:200], depth + 1)


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

    def __init__(self, vocab, gbnf: str):
        self.gbnf = gbnf
        self.sampler = lc.llama_sampler_init_grammar(vocab, gbnf.encode("utf-8"), b"root")
        if not self.sampler:
            raise GrammarError("llama.cpp could not parse the grammar (its log says where); "
                               "it must be GBNF with a 'root' rule", hint="")

    def take(self):
        """The sampler, now the caller's to free."""
        sampler, self.sampler = self.sampler, None
        return sampler

    def __del__(self):   # a request that never started
        if getattr(self, "sampler", None):
            lc.llama_sampler_free(self.sampler)
            self.sampler = None


def compile_grammar(vocab, gbnf: str) -> CompiledGrammar:
    """Parse ``gbnf`` as :func:`resolve` returned it (its cost already
    checked) with llama.cpp. Raises GrammarError; parsing takes a
    millisecond or so for an ordinary grammar, and done here it fails in
    the caller's thread rather than mid-step."""
    return CompiledGrammar(vocab, gbnf)


def resolve(json_schema=None, grammar: str | None = None) -> str | None:
    """The grammar a request asks for: ``json_schema`` (a schema, or
    ``"json"`` for any JSON object) or raw GBNF ``grammar``; not both.
    What the grammar will cost is checked here, before anything builds it."""
    if json_schema is not None and grammar is not None:
        raise GrammarError("give json_schema or grammar, not both")
    if grammar is not None:
        _check_text(grammar)
        check_gbnf(grammar)
        return grammar
    if json_schema is None:
        return None
    if json_schema == "json":
        return JSON_OBJECT_GBNF
    gbnf = schema_grammar(json_schema)
    _check_text(gbnf)
    check_gbnf(gbnf, "the schema's grammar")
    return gbnf


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
    temperature 0 the answer is the masked argmax either way."""

    check_first = True   # False masks at every token (the tests compare both)

    def __init__(self, grammar: CompiledGrammar, n_vocab: int):
        self.sampler = grammar.take()
        if not self.sampler:
            raise GrammarError("this grammar was used by another request already", hint="")
        self.n_vocab = n_vocab
        self.ids = np.arange(n_vocab, dtype=np.int32)
        self.cand = np.zeros(n_vocab, dtype=_TOKEN_DATA)
        self.one = np.zeros(1, dtype=_TOKEN_DATA)
        self.masked = 0      # tokens the grammar refused, so that the whole vocabulary was masked
        self.arr = self._array(self.cand)
        self.one_arr = self._array(self.one)

    @staticmethod
    def _array(buf: np.ndarray):
        return lc.llama_token_data_array(buf.ctypes.data_as(ctypes.POINTER(lc.llama_token_data)),
                                         len(buf), -1, False)

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
        arr = self._fill(ctx, idx)
        lc.llama_sampler_apply(chain, ctypes.byref(arr))
        tok = arr.data[arr.selected].id
        self.one[0] = (tok, 1.0, 0.0)
        one = self.one_arr
        one.size, one.selected, one.sorted = 1, -1, False
        lc.llama_sampler_apply(self.sampler, ctypes.byref(one))
        if not (self.check_first and np.isfinite(self.one["logit"][0])):
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

    def free(self) -> None:
        if self.sampler:
            lc.llama_sampler_free(self.sampler)
            self.sampler = None
