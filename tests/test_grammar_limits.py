"""Grammars and schemas are judged by what they will cost before anything
builds them: a request that would overflow llama.cpp's parser, make it
allocate without bound, or make the converter write out gigabytes is a
bad_schema / 400 naming the limit, and the server lives on."""

from __future__ import annotations

import asyncio
import json
import threading

import openai
import pytest
from served import start, start_http

from edgeinfer import grammar, grammar_cost
from edgeinfer.engine import DoneEvent, Engine
from edgeinfer.errors import GrammarError
from edgeinfer.grammar_cost import MAX_COUNT, MAX_NESTING, check_gbnf, check_pattern

NESTED = "root ::= " + "(" * 20_000 + '"a"' + ")" * 20_000     # overflowed llama.cpp's stack
BOMBS = {
    "a schema's maxLength of 20,000": dict(json_schema={"type": "string", "maxLength": 20_000}),
    "minItems of a billion": dict(json_schema={"type": "array", "items": {"type": "integer"},
                                               "minItems": 1_000_000_000}),
    "a pattern's {n}": dict(json_schema={"type": "string", "pattern": "^(a{900}){900}$"}),
    "20,000 nested groups": dict(grammar=NESTED),
    "{1,0}": dict(grammar='root ::= "a"{1,0}'),
    "{100000}": dict(grammar='root ::= "a"{100000}'),
    "50,000 alternatives": dict(grammar="root ::= " + " | ".join(f'"w{i}"' for i in range(50_000))),
}


@pytest.mark.parametrize("name", BOMBS)
def test_every_bomb_is_refused_before_llama_cpp_or_the_converter_sees_it(name, monkeypatch):
    def never(*a, **k):
        raise AssertionError("reached the converter or llama.cpp")

    monkeypatch.setattr(grammar.llama_grammar, "json_schema_to_gbnf", never)
    monkeypatch.setattr(grammar.lc, "llama_sampler_init_grammar", never)
    with pytest.raises(GrammarError):
        grammar.resolve(**BOMBS[name])


def test_what_ordinary_grammars_cost_is_well_within_the_limits():
    assert check_gbnf(grammar.JSON_OBJECT_GBNF) < 1000
    near = grammar.resolve(json_schema={"type": "string", "maxLength": MAX_COUNT})   # nests MAX_COUNT deep
    assert near.count("(") >= MAX_COUNT and MAX_COUNT < MAX_NESTING
    assert check_pattern(r"^[a-z]{1,64}@[a-z]{1,255}\.[a-z]{2,10}$", "email") < 400
    assert check_pattern(r"^\d{4}-\d{2}-\d{2}$", "date") == 10
    people = {"type": "array", "minItems": 2, "maxItems": 10,
              "items": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 40}},
                        "required": ["name"]}}
    assert grammar.resolve(json_schema=people)


def test_the_refusal_names_the_limit():
    with pytest.raises(GrammarError, match="'maxLength' at the schema is 20,000; at most 1,000"):
        grammar.resolve(**BOMBS["a schema's maxLength of 20,000"])
    with pytest.raises(GrammarError, match="upper bound is below its lower one"):
        grammar.resolve(**BOMBS["{1,0}"])
    with pytest.raises(GrammarError, match="nests groups more than 1,200 deep"):
        grammar.resolve(**BOMBS["20,000 nested groups"])
    with pytest.raises(GrammarError, match="'minLength' at the schema.properties.x must be a whole number"):
        grammar.resolve(json_schema={"type": "object", "properties": {"x": {"type": "string", "minLength": -1}}})


def test_a_grammar_is_parsed_once_off_the_event_loop_and_every_bomb_leaves_the_engine_working(tiny_model,
                                                                                             monkeypatch):
    builds: list[threading.Thread] = []
    real = grammar.CompiledGrammar.__init__

    def counted(self, vocab, gbnf):
        builds.append(threading.current_thread())
        real(self, vocab, gbnf)

    monkeypatch.setattr(grammar.CompiledGrammar, "__init__", counted)
    with Engine(tiny_model, n_ctx=1024, threads=1, prompt_cache=False) as e:
        for bomb in BOMBS.values():
            with pytest.raises(GrammarError):
                e.generate("Hi", max_tokens=4, **bomb)
        assert builds == []            # refused before llama.cpp parsed anything

        async def one():
            async for ev in e.astream_tokens(e.tokenize("Hi"), max_tokens=8, json_schema={"type": "integer"}):
                last = ev
            return last, threading.current_thread()

        done, loop_thread = asyncio.run(one())
        assert isinstance(done, DoneEvent)
        assert len(builds) == 1 and builds[0] is not loop_thread   # once, and in a worker thread
        last = list(e.stream("The weather", max_tokens=4, temperature=0))[-1]
        assert isinstance(last, DoneEvent) and last.stats.finish_reason in ("stop", "length")


def test_the_servers_answer_every_bomb_and_live_on(tiny_model, tmp_path):
    env = {"EDGEINFER_HOME": str(tmp_path)}
    s = start(tiny_model, env=env)
    try:
        raw = s.raw()
        for i, bomb in enumerate(BOMBS.values()):
            fields = {"json_schema": bomb["json_schema"]} if "json_schema" in bomb else {"grammar": bomb["grammar"]}
            raw.send({"id": f"b{i}", "op": "generate", "prompt": "Hi", "max_tokens": 4, **fields})
            r = raw.reply()
            assert (r["id"], r["event"], r["code"]) == (f"b{i}", "error", "bad_schema"), r
        raw.send({"id": "ok", "op": "generate", "prompt": "Hi", "max_tokens": 2})
        assert raw.until_end("ok")[-1]["event"] == "done"
    finally:
        assert s.stop() == 0
    h = start_http(tiny_model, env=env)
    hi = [{"role": "user", "content": "Hi"}]
    try:
        client = h.openai()
        for name in ("a schema's maxLength of 20,000", "minItems of a billion", "a pattern's {n}"):
            schema = {"name": "x", "schema": BOMBS[name]["json_schema"]}
            with pytest.raises(openai.BadRequestError) as info:
                client.chat.completions.create(model="tiny.gguf", max_tokens=4, messages=hi,
                                               response_format={"type": "json_schema", "json_schema": schema})
            assert info.value.body["param"] == "response_format", json.dumps(info.value.body)
        ok = client.chat.completions.create(model="tiny.gguf", max_tokens=2, messages=hi)
        assert ok.choices[0].finish_reason in ("stop", "length")
    finally:
        assert h.stop() == 0


def test_the_limits_are_what_the_docs_say():
    assert (grammar_cost.MAX_NESTING, grammar_cost.MAX_COUNT, grammar_cost.MAX_ELEMENTS) == (1200, 1000, 20_000)


def test_a_lone_surrogate_in_a_grammar_is_a_grammar_error(tiny_model):
    """(Found by the fuzz suite: it was a bare UnicodeEncodeError. In a
    schema it is written as an escape, and the grammar holds no surrogate.)"""
    with Engine(tiny_model, n_ctx=512, threads=1, prompt_cache=False) as e:
        with pytest.raises(GrammarError, match="surrogate"):
            e.generate("Hi", max_tokens=2, grammar="root ::= \"\ud800\"")
        assert isinstance(list(e.stream("Hi", max_tokens=2, json_schema={"enum": ["\udc00"]}))[-1], DoneEvent)
