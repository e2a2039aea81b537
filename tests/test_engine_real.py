"""The engine on the catalog's default model, SmolLM2 135M Instruct (Q4_1),
pulled through the real model manager: real answers, greedy determinism,
and a prompt cache that never changes what the model says."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

import edgeinfer
from edgeinfer.engine import DoneEvent

pytestmark = pytest.mark.real_model

MODEL = "smollm2-135m-instruct"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture
def engine(real_model_home):
    with edgeinfer.load(MODEL, n_ctx=2048, threads=1) as e:
        yield e


def cold(**options):
    """The default model with no KV reuse at all: every request from scratch."""
    return edgeinfer.load(MODEL, n_ctx=2048, threads=1, prompt_cache=False, **options)


def test_the_default_model_knows_paris(real_model_home):
    with edgeinfer.load(MODEL) as engine:
        answer = engine.chat(QUESTION, temperature=0)
    assert "Paris" in answer
    assert engine.last_stats.finish_reason == "stop"  # the model ended its turn itself


def test_cli_run_answers_paris(real_model_home):
    from edgeinfer.cli import cli

    if "run" not in cli.commands:
        pytest.skip("the 'edgeinfer run' command does not exist yet")
    result = CliRunner().invoke(cli, ["run", MODEL, "What is the capital of France?", "--temperature", "0"])
    assert result.exit_code == 0, result.output
    assert "Paris" in result.output


def test_greedy_is_deterministic(real_model_home):
    prompt = "The three primary colours are"
    with cold() as engine:
        first = list(engine.stream(prompt, max_tokens=40, temperature=0))
        second = list(engine.stream(prompt, max_tokens=40, temperature=0))
        assert second[-1].stats.cached_tokens == 0
        chats = [engine.chat(QUESTION, temperature=0) for _ in range(2)]
    assert [(e.text, e.tokens) for e in first] == [(e.text, e.tokens) for e in second]
    assert isinstance(first[-1], DoneEvent) and first[-1].stats.generated_tokens > 10
    assert chats[0] == chats[1]


def test_second_turn_from_the_cache_matches_a_fresh_engine(engine, real_model_home):
    answer = engine.chat(QUESTION, temperature=0)
    first_turn = len(engine.chat_tokens(QUESTION))
    second = [*QUESTION, {"role": "assistant", "content": answer},
              {"role": "user", "content": "And what is the capital of Germany?"}]

    cached = engine.chat(second, temperature=0, max_tokens=64)
    stats = engine.last_stats
    assert stats.cached_tokens >= first_turn - 1  # the first turn was not evaluated again

    with cold() as fresh:
        uncached = fresh.chat(second, temperature=0, max_tokens=64)
        assert fresh.last_stats.cached_tokens == 0
    assert cached == uncached
    assert "Berlin" in cached


def test_a_json_schema_answer_validates(engine):
    import json

    import jsonschema

    schema = {"type": "object", "properties": {"city": {"type": "string"}, "country": {"type": "string"},
                                                "population_millions": {"type": "number"}},
              "required": ["city", "country", "population_millions"]}
    events = list(engine.stream_chat([{"role": "user", "content": "Give the capital of France as JSON."}],
                                     json_schema=schema, temperature=0, max_tokens=120))
    text, stats = "".join(e.text for e in events), events[-1].stats
    assert stats.finish_reason == "stop", text
    answer = json.loads(text)
    jsonschema.validate(answer, schema)
    assert "paris" in answer["city"].lower()
