"""Tool calls in Llama 3.x's and Mistral's formats, on the tiny model with
their chat templates (compact copies of the published ones, keeping what
matters to tools): the family each template is read as, the prompt it
renders (Mistral's nine-letter call ids, its tojson output cut with
``[:-1]``), calls read out of text in each format however it is chunked,
and the grammar's promises in each."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from edgeinfer.engine import Engine
from edgeinfer.tool_calls import CallParser
from edgeinfer.tools import LLAMA3, MISTRAL, ToolChoice, call_grammar, check_tools, family_of

MISTRAL_TEMPLATE = """
{%- if messages[0]["role"] == "system" %}{%- set loop_messages = messages[1:] %}
{%- else %}{%- set loop_messages = messages %}{%- endif %}
{%- if not tools is defined %}{%- set tools = none %}{%- endif %}
{{- bos_token }}
{%- for message in loop_messages %}
    {%- if message["role"] == "user" %}
        {%- if tools is not none and loop.last %}
            {{- "[AVAILABLE_TOOLS] [" }}
            {%- for tool in tools %}{{- tool|tojson }}{%- if not loop.last %}{{- ", " }}{%- endif %}{%- endfor %}
            {{- "][/AVAILABLE_TOOLS]" }}
        {%- endif %}
        {{- "[INST] " + message["content"] + "[/INST]" }}
    {%- elif message.tool_calls is defined and message.tool_calls is not none %}
        {{- "[TOOL_CALLS] [" }}
        {%- for tool_call in message.tool_calls %}
            {%- set out = tool_call.function|tojson %}
            {{- out[:-1] }}
            {%- if not tool_call.id is defined or tool_call.id|length != 9 %}
                {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
            {%- endif %}
            {{- ', "id": "' + tool_call.id + '"}' }}
            {%- if not loop.last %}{{- ", " }}{%- else %}{{- "]" + eos_token }}{%- endif %}
        {%- endfor %}
    {%- elif message["role"] == "assistant" %}
        {{- " " + message["content"]|trim + eos_token }}
    {%- elif message["role"] == "tool" %}
        {{- '[TOOL_RESULTS] {"content": ' + message.content|string + ", " }}
        {%- if message.tool_call_id|length != 9 %}
            {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
        {%- endif %}
        {{- '"call_id": "' + message.tool_call_id + '"}[/TOOL_RESULTS]' }}
    {%- endif %}
{%- endfor %}
"""

LLAMA3_TEMPLATE = """
{{- bos_token }}
{%- if not tools is defined %}{%- set tools = none %}{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}{%- set messages = messages[1:] %}
{%- else %}{%- set system_message = "" %}{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if tools is not none %}{{- "Environment: ipython\\n" }}{%- endif %}
{{- system_message + "<|eot_id|>" }}
{%- if tools is not none %}
    {%- set first_user_message = messages[0]['content']|trim %}{%- set messages = messages[1:] %}
    {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\\n\\n" }}
    {%- for t in tools %}{{- t | tojson(indent=4) }}{{- "\\n\\n" }}{%- endfor %}
    {{- first_user_message + "<|eot_id|>" }}
{%- endif %}
{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}
        {{- message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" + "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}
        {%- if message.content is mapping or message.content is iterable %}{{- message.content | tojson }}
        {%- else %}{{- message.content }}{%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}
"""

WEATHER_PARAMS = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"]}
CLOCK_PARAMS = {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER_PARAMS}},
         {"type": "function", "function": {"name": "get_time", "parameters": CLOCK_PARAMS}}]
SCHEMAS = {"get_weather": WEATHER_PARAMS, "get_time": CLOCK_PARAMS}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
HISTORY = ASK + [
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_Xy12ab34cd56", "type": "function", "function": {"name": "get_weather",
                                                                     "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "tool_call_id": "call_Xy12ab34cd56", "content": "21 C"}]


@pytest.fixture(scope="module")
def engine(tiny_model):
    with Engine(tiny_model, n_ctx=2048, threads=1) as e:
        yield e


def parse(pieces, names, family):
    parser = CallParser(names, family)
    out = []
    for p in pieces:
        out += parser.feed(p)
    return parser, out + parser.finish()


def test_each_template_is_read_as_its_family():
    assert family_of(MISTRAL_TEMPLATE) is MISTRAL
    assert family_of(LLAMA3_TEMPLATE) is LLAMA3


def test_mistral_gets_nine_letter_ids_that_still_pair_call_and_result(engine, monkeypatch):
    monkeypatch.setattr(engine, "chat_template", MISTRAL_TEMPLATE)
    text = engine.detokenize(engine.chat_tokens(HISTORY, tools=TOOLS), special=True)
    (call_id,) = re.findall(r'"id": "(\w+)"', text)
    assert len(call_id) == 9 and call_id.isalnum()
    assert f'"call_id": "{call_id}"' in text   # the result names the same call
    # tojson's output cut with [:-1] and closed again, as the template writes it
    assert '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "' in text
    asked = engine.detokenize(engine.chat_tokens(ASK, tools=TOOLS), special=True)
    assert '[AVAILABLE_TOOLS] [{"type": "function", "function": {"name": "get_weather"' in asked


def test_llama3_renders_calls_with_parameters(engine, monkeypatch):
    monkeypatch.setattr(engine, "chat_template", LLAMA3_TEMPLATE)
    text = engine.detokenize(engine.chat_tokens(HISTORY, tools=TOOLS), special=True)
    assert '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>' in text
    assert 'ipython<|end_header_id|>\n\n"21 C"<|eot_id|>' in text
    assert '"name": "get_time"' in text and "Environment: ipython" in text


@pytest.mark.parametrize("size", [1, 2, 5, 1000])
def test_mistral_calls_are_read_from_the_array(size):
    text = ('[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}},\n'
            ' {"name": "get_time", "arguments": {"zone": "CET"}}]')
    parser, out = parse([text[i:i + size] for i in range(0, len(text), size)], list(SCHEMAS), MISTRAL)
    assert [(c["name"], json.loads(c["arguments"])) for c in parser.calls] == [
        ("get_weather", {"city": "Paris"}), ("get_time", {"zone": "CET"})]
    assert all(len(c["id"]) == 9 and c["id"].isalnum() for c in parser.calls)
    assert [p for p in out if isinstance(p, str)] == []


@pytest.mark.parametrize("size", [1, 3, 1000])
@pytest.mark.parametrize("text, calls, content", [
    ('{"name": "get_weather", "parameters": {"city": "Paris"}}', [("get_weather", {"city": "Paris"})], ""),
    ('  <|python_tag|>{"name": "get_time", "parameters": {"zone": "UTC"}}', [("get_time", {"zone": "UTC"})], ""),
    ('{"answer": 42}', [], '{"answer": 42}'),                                  # JSON, but no call
    ('Sure. {"name": "get_weather", "parameters": {"city": "Paris"}}', [],   # a call only opens the answer
     'Sure. {"name": "get_weather", "parameters": {"city": "Paris"}}'),
    ('{"name": "get_weather", "arguments": {"city": "Paris"}}', [],           # Llama's key is "parameters"
     '{"name": "get_weather", "arguments": {"city": "Paris"}}'),
])
def test_llama3_calls_open_the_answer(text, calls, content, size):
    parser, out = parse([text[i:i + size] for i in range(0, len(text), size)], list(SCHEMAS), LLAMA3)
    assert [(c["name"], json.loads(c["arguments"])) for c in parser.calls] == calls
    assert "".join(p for p in out if isinstance(p, str)) == content


@pytest.mark.parametrize("template, family", [(MISTRAL_TEMPLATE, MISTRAL), (LLAMA3_TEMPLATE, LLAMA3)])
def test_required_calls_in_each_format_follow_the_schema(engine, monkeypatch, template, family):
    monkeypatch.setattr(engine, "chat_template", template)
    for seed in range(4):
        reply = engine.chat(ASK, tools=TOOLS, tool_choice="required", temperature=1.0, seed=seed, max_tokens=300)
        assert reply.tool_calls and reply.finish_reason in ("tool_calls", "length")
        for call in reply.tool_calls:
            jsonschema.validate(call.arguments, SCHEMAS[call.name])
        if family is LLAMA3:
            assert len(reply.tool_calls) == 1 and reply.finish_reason == "tool_calls"   # one call a turn


def test_each_format_has_its_grammar():
    tools = check_tools(TOOLS)
    mistral = call_grammar(tools, ToolChoice("required"), True, MISTRAL).gbnf
    assert mistral.startswith('root ::= "[TOOL_CALLS]" ws "[" ws call (ws "," ws call)* ws "]"')
    llama = call_grammar(tools, ToolChoice("auto"), True, LLAMA3)
    assert llama.gbnf.startswith('root ::= ws ("<|python_tag|>" ws)? call')
    assert '"\\"parameters\\""' in llama.gbnf and llama.trigger.startswith(rb"\A")
