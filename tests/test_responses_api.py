"""The Responses API (``POST /v1/responses``) through the official
`openai` package, against `edgeinfer serve --http` on the tiny model:
text, streaming events, function calls and their outputs, text.format,
and the fields a stateless server refuses by name."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
from served import start_http

pytestmark = pytest.mark.timeout(300)

MODEL = "tiny.gguf"
WEATHER = {"type": "function", "name": "get_weather", "description": "The weather now in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
                          "required": ["city"]}}
NO_EOS = {"ignore_eos": True}


@pytest.fixture(scope="module")
def client(tiny_model, tmp_path_factory):
    home = tmp_path_factory.mktemp("responses-home")
    s = start_http(tiny_model, "--parallel", "2", "--n-ctx", "2048",
                   env={"EDGEINFER_HOME": str(home), "EDGEINFER_TOKEN": ""})
    yield s.openai()
    assert s.stop() == 0


def test_text_in_and_out(client):
    r = client.responses.create(model=MODEL, instructions="Be brief.", input="Hello", max_output_tokens=6,
                                temperature=0)
    assert r.object == "response" and r.output[0].type == "message"
    assert r.output_text == r.output[0].content[0].text
    assert r.usage.output_tokens <= 6 and r.usage.input_tokens > 0
    # Items in, the same conversation: the same greedy answer.
    same = client.responses.create(model=MODEL, max_output_tokens=6, temperature=0, input=[
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "input_text", "text": "Hello"}]}])
    assert same.output_text == r.output_text


def test_cut_by_max_output_tokens_is_incomplete(client):
    r = client.responses.create(model=MODEL, input="Hello", max_output_tokens=3, extra_body=NO_EOS)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"


def test_streamed_events_add_up_to_the_response(client):
    events = list(client.responses.create(model=MODEL, input="Hello", max_output_tokens=8, temperature=0,
                                          stream=True, extra_body=NO_EOS))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.incomplete"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == events[-1].response.output[0].content[0].text == \
        client.responses.create(model=MODEL, input="Hello", max_output_tokens=8, temperature=0,
                                extra_body=NO_EOS).output_text


def test_function_calls_and_their_outputs(client):
    for seed in range(3):
        r = client.responses.create(model=MODEL, input="Weather in Paris?", tools=[WEATHER], tool_choice="required",
                                    temperature=1.0, max_output_tokens=200, parallel_tool_calls=False,
                                    extra_body={"seed": seed})
        (call,) = [o for o in r.output if o.type == "function_call"]
        assert call.name == "get_weather" and r.status == "completed"
        jsonschema.validate(json.loads(call.arguments), WEATHER["parameters"])
    # Streamed: the argument deltas join into the call's arguments.
    with client.responses.stream(model=MODEL, input="Weather in Paris?", tools=[WEATHER], temperature=1.0,
                                 extra_body={"seed": 1},
                                 tool_choice={"type": "function", "name": "get_weather"}, parallel_tool_calls=False,
                                 max_output_tokens=200) as stream:
        deltas = "".join(e.delta for e in stream if e.type == "response.function_call_arguments.delta")
        final = stream.get_final_response()
    (call,) = [o for o in final.output if o.type == "function_call"]
    assert json.loads(deltas) == json.loads(call.arguments)
    # The call and its output go back in; "none" answers in text.
    r = client.responses.create(model=MODEL, tools=[WEATHER], tool_choice="none", max_output_tokens=5, input=[
        {"role": "user", "content": "Weather in Paris?"},
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "21 C, sunny"}])
    assert [o.type for o in r.output] == ["message"]


def test_text_format_json_schema(client):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    r = client.responses.create(model=MODEL, input="Answer", max_output_tokens=30, temperature=1.0,
                                extra_body={"seed": 3},
                                text={"format": {"type": "json_schema", "name": "answer", "schema": schema}})
    if r.status == "completed":
        jsonschema.validate(json.loads(r.output_text), schema)


@pytest.mark.parametrize("extra, param", [
    ({"previous_response_id": "resp_1"}, "previous_response_id"),
    ({"conversation": "conv_1"}, "conversation"),
    ({"background": True}, "background"),
    ({"tools": [{"type": "web_search"}]}, "tools[0]"),
    ({"reasoning": {"effort": "high"}}, "reasoning"),
    ({"input": [{"type": "item_reference", "id": "x"}]}, "input[0].type"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input[0].content[0]"),
    ({"tool_choice": "required"}, "tool_choice"),
])
def test_what_a_stateless_server_refuses_is_named(client, extra, param):
    body = {"model": MODEL, "input": "Hello", **extra}
    with pytest.raises(openai.BadRequestError) as info:
        client.post("/responses", body=body, cast_to=object)
    assert info.value.body["param"] == param
