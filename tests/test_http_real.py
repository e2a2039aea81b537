"""The HTTP face on the catalog's default model (SmolLM2 135M Instruct),
pulled through the model manager: the official clients get real answers,
and a schema-constrained answer that a real model fills in sensibly."""

from __future__ import annotations

import json
import os

import jsonschema
import pytest
from served import start_http

pytestmark = [pytest.mark.real_model, pytest.mark.timeout(300)]

MODEL = "smollm2-135m-instruct"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture
def served(real_model_home):
    s = start_http(MODEL, "--parallel", "2", "--n-ctx", "2048", env={"EDGEINFER_HOME": os.environ["EDGEINFER_HOME"]})
    yield s
    assert s.stop() == 0


def test_the_official_clients_get_paris(served):
    r = served.openai().chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=40)
    assert "paris" in r.choices[0].message.content.lower()
    msg = served.anthropic().messages.create(model=MODEL, max_tokens=40, messages=QUESTION,
                                             extra_body={"temperature": 0})
    assert "paris" in msg.content[0].text.lower() and msg.stop_reason == "end_turn"
    streamed = "".join(c.choices[0].delta.content or "" for c in served.openai().chat.completions.create(
        model=MODEL, messages=QUESTION, temperature=0, max_tokens=40, stream=True) if c.choices)
    assert streamed == r.choices[0].message.content


def test_a_schema_answer_from_a_real_model(served):
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
              "required": ["city", "country"], "additionalProperties": False}
    r = served.openai().chat.completions.create(
        model=MODEL, temperature=0, max_tokens=80,
        messages=[{"role": "user", "content": "Give the capital of France as JSON with city and country."}],
        response_format={"type": "json_schema", "json_schema": {"name": "capital", "schema": schema}})
    answer = json.loads(r.choices[0].message.content)
    jsonschema.validate(answer, schema)
    assert "paris" in answer["city"].lower()
