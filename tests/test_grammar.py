"""Structured output on the tiny model: JSON schemas and GBNF grammars
through llama.cpp's grammar sampler.

The tiny model's weights are random, so whatever it writes under a
grammar is what the grammar alone made of noise: if that parses and
validates, the constraint did the work."""

from __future__ import annotations

import json
import threading

import jsonschema
import pytest

import edgeinfer
from edgeinfer.errors import GrammarError
from edgeinfer.grammar import GrammarGate, schema_grammar

GREEDY = dict(temperature=0)
WILD = dict(temperature=1.5, top_k=0, top_p=1.0, min_p=0.0)
ASK = [{"role": "user", "content": "Describe a person as JSON."}]
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer"},
        "role": {"enum": ["admin", "user", "guest"]},
        "active": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
    },
    "required": ["name", "age", "role", "active"],
    "additionalProperties": False,
}
# For sampling from the whole distribution: the tiny model's random byte
# tokens make invalid UTF-8, each byte of which Python decodes to one
# U+FFFD, so a maxLength on free text would count differently. Enums and
# numbers have no such ambiguity.
CHOICES = {
    "type": "object",
    "properties": {
        "pet": {"enum": ["cat", "dog", "fish"]},
        "legs": {"type": "integer"},
        "weight": {"type": "number"},
        "tame": {"type": "boolean"},
        "colours": {"type": "array", "items": {"enum": ["red", "black", "white"]}, "maxItems": 3},
        "note": {"type": "null"},
    },
    "required": ["pet", "legs", "tame"],
}


@pytest.fixture(scope="module")
def engine(tiny_model, tmp_path_factory):
    with edgeinfer.load(tiny_model, n_ctx=2048, threads=1, n_seq_max=4) as e:
        yield e


def answer(engine, **kw) -> tuple[str, edgeinfer.Stats]:
    events = list(engine.stream_chat(ASK, **{"max_tokens": 400, **kw}))
    return "".join(e.text for e in events), events[-1].stats


def test_a_schema_answer_parses_and_validates(engine):
    text, stats = answer(engine, json_schema=PERSON, **GREEDY)
    assert stats.finish_reason == "stop", text
    jsonschema.validate(json.loads(text), PERSON)


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
def test_sampled_answers_validate_too(engine, seed):
    # Sampling from the whole distribution: most draws are refused by the
    # grammar and drawn again from the masked vocabulary.
    text, stats = answer(engine, json_schema=CHOICES, seed=seed, **WILD)
    assert stats.finish_reason == "stop", text
    jsonschema.validate(json.loads(text), CHOICES)


def test_any_json_object(engine):
    text, stats = answer(engine, json_schema="json", seed=7, **WILD)
    if stats.finish_reason == "stop":
        assert isinstance(json.loads(text), dict)
    else:  # cut off by max_tokens: still a prefix of an object
        assert stats.finish_reason == "length" and text.lstrip().startswith("{")


def test_checking_the_drawn_token_first_changes_nothing(engine, monkeypatch):
    """The fast path (check the token drawn, mask only when refused) gives
    the same greedy answer as masking the whole vocabulary every time."""
    fast = [answer(engine, json_schema=PERSON, **GREEDY)[0],
            answer(engine, grammar='root ::= ("yes" | "no" | "maybe") " " [a-z]{1,8} "."', **GREEDY)[0]]
    monkeypatch.setattr(GrammarGate, "check_first", False)
    slow = [answer(engine, json_schema=PERSON, **GREEDY)[0],
            answer(engine, grammar='root ::= ("yes" | "no" | "maybe") " " [a-z]{1,8} "."', **GREEDY)[0]]
    assert fast == slow


def test_a_gbnf_grammar(engine):
    for seed in range(3):
        text, stats = answer(engine, grammar='root ::= ("yes" | "no") "!"', seed=seed, **WILD)
        assert text in ("yes!", "no!") and stats.finish_reason == "stop"


def test_constrained_and_plain_streams_share_steps(engine):
    plain_alone = answer(engine, **GREEDY)[0]
    results: dict = {}

    def run(key, **kw):
        results[key] = answer(engine, **kw)

    threads = [threading.Thread(target=run, args=(f"schema{i}",), kwargs=dict(json_schema=CHOICES, seed=i, **WILD))
               for i in range(3)] + [threading.Thread(target=run, args=("plain",), kwargs=GREEDY)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for i in range(3):
        text, stats = results[f"schema{i}"]
        jsonschema.validate(json.loads(text), CHOICES)
    assert engine.status()["max_sequences_in_step"] >= 2
    # A plain greedy stream beside constrained ones says what it says alone
    # (within batching's rounding, which the scheduler tests bound).
    assert results["plain"][0][:20] == plain_alone[:20]


def test_an_integers_bounds_are_kept(engine):
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": -12, "exclusiveMaximum": 31},
                                               "m": {"type": "integer", "minimum": 100}},
              "required": ["n", "m"]}
    for seed in range(8):
        text, _ = answer(engine, json_schema=schema, seed=seed, max_tokens=40, **WILD)
        jsonschema.validate(json.loads(text), schema)


@pytest.mark.parametrize("lo, hi", [(0, 100), (-5, 5), (-100, -3), (15, 1234), (None, 10), (-20, None),
                                    (1, 65535), (7, 7)])
def test_integer_ranges_are_written_exactly(lo, hi):
    import re

    from edgeinfer.grammar import int_range

    # The rule's few constructs ("x", [a-b], [0-9]{n}, |, parentheses) read as a regular expression.
    pattern = re.compile("(?:" + int_range(lo, hi).replace('"', "").replace(" ", "") + ")$")
    for n in range(-3000 if lo is None else lo - 40, (3000 if hi is None else hi + 40) + 1):
        assert bool(pattern.match(str(n))) == ((lo is None or n >= lo) and (hi is None or n <= hi)), n
    assert not any(pattern.match(t) for t in ("-0", "007", "01", ""))


def test_max_tokens_still_applies(engine):
    text, stats = answer(engine, json_schema={"type": "array", "items": {"type": "integer"}}, seed=3,
                         max_tokens=5, **WILD)
    assert stats.finish_reason in ("length", "stop") and stats.generated_tokens <= 5
    assert text.startswith("[")


@pytest.mark.parametrize("schema, words", [
    ({"type": "strange"}, "Unrecognized schema"),
    ({"$ref": "https://example.invalid/s.json"}, "not local"),
    ('{"type": ', "not JSON"),
    ([1, 2], "is an object"),
    # The converter reads past a number's bounds (an integer's are kept).
    ({"type": "object", "properties": {"age": {"type": "number", "maximum": 150}}},
     "'maximum' at the schema.properties.age"),
    ({"type": "integer", "minimum": 5, "exclusiveMaximum": 5}, "no integer at the schema is at least 5"),
    ({"type": "array", "items": {"not": {"type": "string"}}}, "'not' at the schema.items"),
])
def test_a_schema_the_converter_cannot_handle_is_refused(engine, schema, words):
    with pytest.raises(GrammarError, match=words):
        answer(engine, json_schema=schema)
    assert answer(engine, max_tokens=3, **GREEDY)[1].finish_reason  # still serving


def test_a_bad_grammar_and_bad_combinations(engine):
    with pytest.raises(GrammarError, match="could not parse"):
        answer(engine, grammar="root ::= [")
    with pytest.raises(GrammarError, match="not both"):
        answer(engine, grammar='root ::= "a"', json_schema=PERSON)
    with pytest.raises(GrammarError, match="ignore_eos"):
        answer(engine, json_schema=PERSON, ignore_eos=True)
    assert engine.status()["active_sequences"] == 0


def test_schema_grammar_is_gbnf():
    g = schema_grammar({"type": "object", "properties": {"a": {"type": "boolean"}}, "required": ["a"]})
    assert "root ::=" in g and '"true"' in g


def test_stop_sequence_is_reported(engine):
    text, stats = answer(engine, grammar='root ::= "alpha beta gamma"', stop=["beta"], **GREEDY)
    assert text == "alpha " and stats.stop_sequence == "beta" and stats.finish_reason == "stop"
    text, stats = answer(engine, grammar='root ::= "alpha"', **GREEDY)
    assert stats.stop_sequence is None
