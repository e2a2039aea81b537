"""Tool calling as programs call it: the official `openai` and `anthropic`
packages, and JSON lines on a raw socket, against a real `edgeinfer serve`
on loopback.

The fast tier runs on the tiny model (random weights; its ChatML template
knows nothing of tools, so the tools go in a system message: the "generic"
family) and checks the mechanics only: what the grammar promises, what
streaming adds up to, what history is accepted, what is refused. The real
tier asks Qwen2.5-Coder 1.5B questions whose right answer is, or is not, a
call, and sends a result back for it to answer from.
"""

from __future__ import annotations

import json
import re

import jsonschema
import openai
import pytest
from served import Served, start, start_http

pytestmark = pytest.mark.timeout(300)

MODEL = "tiny.gguf"
WEATHER = {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
           "properties": {"city": {"enum": ["Paris", "Oslo", "Lima"]}, "unit": {"enum": ["celsius", "fahrenheit"]}}}
BOOK = {"type": "object", "additionalProperties": False, "required": ["seats", "window", "meals"],
        "properties": {"seats": {"type": "integer"}, "window": {"type": "boolean"},
                       "meals": {"type": "array", "items": {"enum": ["veg", "fish"]}, "maxItems": 2}}}
SCHEMAS = {"get_weather": WEATHER, "book_table": BOOK}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city now",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "book_table", "description": "Book a table",
                                           "parameters": BOOK}}]
A_TOOLS = [{"name": t["function"]["name"], "description": t["function"]["description"],
            "input_schema": t["function"]["parameters"]} for t in TOOLS]
ASK = [{"role": "user", "content": "What's the weather in Paris?"}]
BOOK_IT = {"type": "function", "function": {"name": "book_table"}}
# Greedy, the tiny model never draws the end: where it may call again, it
# calls until max_tokens. One call (the grammar lets it pad with whitespace)
# takes it up to about 350 tokens.
ONE_CALL = 500
# A seed at which, sampling at 0.8, it makes several calls and stops by itself.
SEED = 5


@pytest.fixture(scope="module")
def jsonl(tiny_model, tmp_path_factory):
    """One server for the fast tier: JSON lines, and HTTP beside it."""
    home = tmp_path_factory.mktemp("tools-home")
    s = start(tiny_model, "--http", "0", "--parallel", "2", "--n-ctx", "4096",
              env={"EDGEINFER_HOME": str(home), "EDGEINFER_TOKEN": ""})
    yield s
    assert s.stop() == 0


@pytest.fixture(scope="module")
def web(jsonl) -> Served:
    line = next(line for line in jsonl.log if line.startswith("Serving "))
    port = int(re.search(r"http://127\.0\.0\.1:(\d+)", line).group(1))
    assert port != jsonl.port
    return Served(jsonl.proc, port)


def valid(name: str, arguments) -> dict:
    """A call's arguments (JSON text or an object), checked against its tool's schema."""
    args = json.loads(arguments) if isinstance(arguments, str) else arguments
    jsonschema.validate(args, SCHEMAS[name])
    return args


def calls_of(message) -> list[tuple[str, dict]]:
    return [(c.function.name, valid(c.function.name, c.function.arguments)) for c in message.tool_calls or []]


def add_up(chunks) -> tuple[str, list[dict], list[str]]:
    """A stream of chat.completion.chunks joined as a client joins it:
    content, the calls (id, name and type in the first delta of each index,
    then arguments in fragments) and the finish reasons given."""
    content, calls, finish = [], {}, []
    for chunk in chunks:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        content.append(choice.delta.content or "")
        if choice.finish_reason:
            finish.append(choice.finish_reason)
        for d in choice.delta.tool_calls or []:
            if d.index not in calls:
                assert d.id and d.type == "function" and d.function.name, d
                calls[d.index] = {"id": d.id, "name": d.function.name, "arguments": d.function.arguments or ""}
            else:
                assert d.id is None and d.function.name is None, d   # said once, in the first delta
                calls[d.index]["arguments"] += d.function.arguments or ""
    assert sorted(calls) == list(range(len(calls)))
    return "".join(content), [calls[i] for i in range(len(calls))], finish


def blocks(message) -> list[tuple]:
    """An Anthropic message's content without ids: ("text", text) and ("tool_use", name, input)."""
    return [("text", b.text) if b.type == "text" else (b.type, b.name, b.input) for b in message.content]


# -- OpenAI chat completions ---------------------------------------------------
def test_required_and_a_named_function_give_calls_valid_against_their_schema(web):
    client = web.openai()
    for choice, name in (("required", "get_weather"), (BOOK_IT, "book_table")):
        r = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=choice,
                                           parallel_tool_calls=False, temperature=0, max_tokens=ONE_CALL)
        (c,) = r.choices
        assert c.finish_reason == "tool_calls" and c.message.content is None, c
        (call,) = c.message.tool_calls
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name == name   # the tiny model, left to choose, calls the first tool
        valid(name, call.function.arguments)


def test_parallel_tool_calls_false_gives_one_call(web):
    client = web.openai()
    ask = dict(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", temperature=0, max_tokens=900)
    several = client.chat.completions.create(**ask).choices[0]
    one = client.chat.completions.create(**ask, parallel_tool_calls=False).choices[0]
    assert len(calls_of(several.message)) >= 2   # the model would go on calling
    assert len(calls_of(one.message)) == 1 and one.finish_reason == "tool_calls"
    assert calls_of(one.message)[0] == calls_of(several.message)[0]


@pytest.mark.parametrize("how", [dict(parallel_tool_calls=False, temperature=0, seed=1),
                                 dict(temperature=0.8, seed=SEED)], ids=["one-greedy", "several-sampled"])
def test_streamed_deltas_add_up_to_the_whole_answer(web, how):
    client = web.openai()
    ask = dict(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=900, **how)
    whole = client.chat.completions.create(**ask).choices[0]
    content, calls, finish = add_up(client.chat.completions.create(**ask, stream=True))
    assert finish == [whole.finish_reason] == ["tool_calls"]
    assert content == "" and whole.message.content is None
    assert [(c["name"], valid(c["name"], c["arguments"])) for c in calls] == calls_of(whole.message)
    assert (len(calls) == 1) if "parallel_tool_calls" in how else (len(calls) >= 2)
    assert len({c["id"] for c in calls}) == len(calls)
    # The client's own helper adds the deltas up the same way.
    with client.chat.completions.stream(**ask) as s:
        helped = s.get_final_completion().choices[0]
    assert calls_of(helped.message) == calls_of(whole.message) and helped.finish_reason == "tool_calls"


def test_none_offers_no_tools_and_never_calls(web):
    client = web.openai()
    ask = dict(model=MODEL, messages=ASK, temperature=0, max_tokens=40)
    plain = client.chat.completions.create(**ask)
    none = client.chat.completions.create(**ask, tools=TOOLS, tool_choice="none")
    auto = client.chat.completions.create(**ask | {"max_tokens": 1}, tools=TOOLS, tool_choice="auto")
    # "none" leaves the tools out of the prompt; "auto" describes them.
    assert none.usage.prompt_tokens == plain.usage.prompt_tokens < auto.usage.prompt_tokens - 100
    assert none.choices[0].message.tool_calls is None and none.choices[0].finish_reason != "tool_calls"
    assert none.choices[0].message.content == plain.choices[0].message.content
    content, calls, finish = add_up(client.chat.completions.create(**ask, tools=TOOLS, tool_choice="none",
                                                                    stream=True))
    assert calls == [] and finish == [none.choices[0].finish_reason] and content == plain.choices[0].message.content


def test_a_second_turn_with_the_call_and_its_result(web):
    client = web.openai()
    first = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
                                           parallel_tool_calls=False, temperature=0, max_tokens=ONE_CALL)
    message = first.choices[0].message
    (call,) = message.tool_calls

    def turn(result: str, **kw):
        # As the cookbook does it: the assistant's message object itself, then the result.
        history = ASK + [message, {"role": "tool", "tool_call_id": call.id, "content": result}]
        return client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, temperature=0, **kw)

    short = turn('{"celsius": 17}', max_tokens=1)
    long = turn('{"celsius": 17, "sky": "' + "light rain and " * 30 + 'wind"}', max_tokens=1)
    # The call and its result are in the prompt: it grew by more than the call's
    # own arguments, and a longer result makes a longer one.
    assert short.usage.prompt_tokens > first.usage.prompt_tokens + 15
    assert long.usage.prompt_tokens - short.usage.prompt_tokens >= 60
    again = turn('{"celsius": 17}', tool_choice=BOOK_IT, parallel_tool_calls=False, max_tokens=ONE_CALL)
    assert again.choices[0].finish_reason == "tool_calls"
    assert [name for name, _ in calls_of(again.choices[0].message)] == ["book_table"]


def tool(name="f", params=None) -> dict:
    return {"type": "function", "function": {"name": name, **({"parameters": params} if params else {})}}


@pytest.mark.parametrize("fields, param", [
    ({"tools": [tool(params={"type": "array"})]}, "tools[0].function.parameters"),
    ({"tools": [tool(), tool()]}, "tools[1].function.name"),
    ({"tools": [tool()], "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": [tool()], "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ({"messages": ASK + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{not json"}}]}]},
     "messages[1].tool_calls[0].function.arguments"),
], ids=["parameters", "twice", "choice", "parallel", "arguments"])
def test_bad_tools_are_a_400_naming_the_param(web, fields, param):
    with pytest.raises(openai.BadRequestError) as info:
        web.openai().chat.completions.create(model=MODEL, max_tokens=2, **{"messages": ASK, **fields})
    assert info.value.body["param"] == param and param.split("[")[0] in info.value.message


def test_a_strict_tool_schema_the_grammar_cannot_keep_names_the_tool(web):
    bounded = {"type": "object", "properties": {"x": {"type": "number", "minimum": 1}, "n": {"type": "integer",
                                                                                          "minimum": 1}}}
    strict = {"type": "function", "function": {"name": "f", "parameters": bounded, "strict": True}}
    with pytest.raises(openai.BadRequestError) as info:
        web.openai().chat.completions.create(model=MODEL, messages=ASK, max_tokens=2, tools=[strict])
    assert "'minimum' at the tool f's parameters.properties.x" in info.value.message   # a number's bound, not n's
    assert info.value.body["param"].startswith("tools")
    # Not strict (as most clients send tools: Home Assistant's have bounds), the call is made; the
    # integer's bound is kept by the grammar, the number's is the caller's to check.
    r = web.openai().chat.completions.create(model=MODEL, messages=ASK, max_tokens=60, tools=[tool(params=bounded)],
                                             tool_choice="required", temperature=0)
    args = json.loads(r.choices[0].message.tool_calls[0].function.arguments)
    assert "n" not in args or args["n"] >= 1


# -- Anthropic messages -----------------------------------------------------------
def test_anthropic_any_and_a_named_tool_give_tool_use_blocks(web):
    client = web.anthropic()
    for choice, name in (({"type": "any", "disable_parallel_tool_use": True}, "get_weather"),
                         ({"type": "tool", "name": "book_table", "disable_parallel_tool_use": True}, "book_table")):
        m = client.messages.create(model=MODEL, max_tokens=ONE_CALL, messages=ASK, tools=A_TOOLS, tool_choice=choice,
                                   extra_body={"temperature": 0})
        assert m.stop_reason == "tool_use"
        (block,) = m.content
        assert block.type == "tool_use" and block.name == name and block.id
        valid(name, block.input)
    several = client.messages.create(model=MODEL, max_tokens=900, messages=ASK, tools=A_TOOLS,
                                     tool_choice={"type": "any"}, extra_body={"temperature": 0})
    assert [b.type for b in several.content].count("tool_use") >= 2


@pytest.mark.parametrize("choice, sampling", [
    ({"type": "any", "disable_parallel_tool_use": True}, {"temperature": 0}),
    ({"type": "any"}, {"temperature": 0.8, "seed": SEED})], ids=["one-greedy", "several-sampled"])
def test_anthropic_stream_helper_gives_the_same_blocks(web, choice, sampling):
    client = web.anthropic()
    ask = dict(model=MODEL, max_tokens=900, messages=ASK, tools=A_TOOLS, tool_choice=choice, extra_body=sampling)
    whole = client.messages.create(**ask)
    with client.messages.stream(**ask) as s:
        events = list(s)
        final = s.get_final_message()
    assert whole.stop_reason == final.stop_reason == "tool_use"
    assert blocks(final) == blocks(whole)
    assert (len(whole.content) >= 2) if "seed" in sampling else (len(whole.content) == 1)
    for b in whole.content:
        valid(b.name, b.input)
    starts = [e.content_block for e in events if e.type == "content_block_start"]
    assert [(b.type, b.name, b.input) for b in starts] == [("tool_use", b.name, {}) for b in whole.content]
    partial = [e.delta.partial_json for e in events if e.type == "content_block_delta"]
    assert len(partial) > 5 and all(e.delta.type == "input_json_delta" for e in events
                                    if e.type == "content_block_delta")


def test_anthropic_tool_result_in_the_next_turn(web):
    client = web.anthropic()
    first = client.messages.create(model=MODEL, max_tokens=ONE_CALL, messages=ASK, tools=A_TOOLS,
                                   tool_choice={"type": "any", "disable_parallel_tool_use": True},
                                   extra_body={"temperature": 0})
    (use,) = first.content

    def history(result, **block):
        return ASK + [{"role": "assistant", "content": first.content},
                      {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": result,
                                                    **block}]}]

    def count(result, **block):
        return client.messages.count_tokens(model=MODEL, messages=history(result, **block), tools=A_TOOLS).input_tokens

    short = count("17 degrees")
    assert count("17 degrees, " + "light rain and " * 30 + "wind") - short >= 60
    assert count("17 degrees", is_error=True) > short   # said to be an error
    assert count([{"type": "text", "text": "17 degrees"}]) == short   # the result as blocks reads the same
    book = {"type": "tool", "name": "book_table", "disable_parallel_tool_use": True}
    again = client.messages.create(model=MODEL, max_tokens=ONE_CALL, messages=history("17 degrees"), tools=A_TOOLS,
                                   tool_choice=book, extra_body={"temperature": 0})
    assert again.stop_reason == "tool_use" and [b.name for b in again.content] == ["book_table"]
    # A turn that may not call answers in text.
    text = client.messages.create(model=MODEL, max_tokens=8, messages=history("17 degrees"), tools=A_TOOLS,
                                  tool_choice={"type": "none"}, extra_body={"temperature": 0})
    assert [b.type for b in text.content] == ["text"] and text.stop_reason in ("end_turn", "max_tokens")


def test_anthropic_a_cut_answer_has_its_blocks_in_order_streamed_or_not(web):
    client = web.anthropic()
    ask = dict(model=MODEL, max_tokens=300, messages=ASK, tools=A_TOOLS, tool_choice={"type": "any"},
               extra_body={"temperature": 0})
    whole = client.messages.create(**ask)
    with client.messages.stream(**ask) as s:
        final = s.get_final_message()
    assert whole.stop_reason == final.stop_reason == "max_tokens"
    assert blocks(final) == blocks(whole)


# -- JSON lines -----------------------------------------------------------------------
def test_jsonl_chat_with_tools_streamed_and_whole(jsonl):
    raw = jsonl.raw()
    try:
        ask = {"op": "chat", "messages": ASK, "tools": TOOLS, "tool_choice": "required", "temperature": 0.8,
               "seed": SEED, "max_tokens": 900}
        raw.send({"id": "s", **ask})
        *pieces, done = raw.until_end("s")
        assert done["event"] == "done" and done["finish_reason"] == "tool_calls", done
        assert pieces and {p["event"] for p in pieces} == {"tool_call"}
        calls = []
        for p in pieces:
            if p.get("first"):
                assert p["index"] == len(calls) and p["arguments"] == "" and (not calls or calls[-1]["done"])
                calls.append({"id": p["call_id"], "name": p["name"], "arguments": "", "done": False})
            call = calls[p["index"]]
            assert (p["call_id"], p["name"]) == (call["id"], call["name"]) and not call["done"]
            call["arguments"] += p["arguments"]
            call["done"] = bool(p.get("done"))
        assert len(calls) >= 2 and all(c["done"] for c in calls)
        made = [(c["name"], valid(c["name"], c["arguments"])) for c in calls]

        raw.send({"id": "w", **ask, "stream": False})
        (whole,) = raw.until_end("w")
        assert whole["event"] == "done" and whole["finish_reason"] == "tool_calls" and whole["text"] == ""
        assert [(c["name"], valid(c["name"], c["arguments"])) for c in whole["tool_calls"]] == made
        assert all(c["id"].startswith("call_") for c in whole["tool_calls"])

        raw.send({"id": "1", **ask, "parallel_tool_calls": False, "stream": False})
        (one,) = raw.until_end("1")
        assert one["finish_reason"] == "tool_calls" and len(one["tool_calls"]) == 1
    finally:
        raw.close()


def test_jsonl_refuses_tools_it_cannot_use(jsonl):
    raw = jsonl.raw()
    try:
        for rid, bad, words in (("g", {"op": "generate", "prompt": "hi", "tools": TOOLS}, "op chat"),
                                ("c", {"op": "chat", "messages": ASK, "tool_choice": "required"}, "needs tools"),
                                ("n", {"op": "chat", "messages": ASK, "tools": TOOLS,
                                       "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "nope")):
            raw.send({"id": rid, **bad})
            (err,) = raw.until_end(rid)
            assert err["event"] == "error" and err["code"] == "bad_request" and words in err["message"], err
    finally:
        raw.close()


def test_the_client_hands_back_tool_calls(jsonl):
    from edgeinfer.events import DoneEvent, ToolCallEvent

    with jsonl.client(timeout=60) as c:
        events = list(c.stream(messages=ASK, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
                               temperature=0, max_tokens=ONE_CALL))
    assert isinstance(events[-1], DoneEvent) and events[-1].stats.finish_reason == "tool_calls"
    assert any(isinstance(e, ToolCallEvent) for e in events)


# -- a real model ------------------------------------------------------------------------
QWEN = "qwen2.5-coder-1.5b-instruct"
GET_WEATHER = {"type": "object", "required": ["city"],
               "properties": {"city": {"type": "string", "description": "The city's name"}}}
REAL_TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": GET_WEATHER,
                                                "description": "Get the current weather in a city"}}]
RESULT = {"city": "Paris", "temperature_c": 17, "sky": "light rain"}


@pytest.fixture(scope="module")
def qwen(qwen_store, shared_selftest):
    link = qwen_store.root / "selftest"   # as real_model_home does, for the module
    if not link.exists() and not link.is_symlink():
        link.symlink_to(shared_selftest, target_is_directory=True)
    s = start_http(QWEN, "--parallel", "1", "--n-ctx", "2048",
                   env={"EDGEINFER_HOME": str(qwen_store.root), "EDGEINFER_TOKEN": ""})
    yield s
    assert s.stop() == 0


@pytest.mark.real_model
def test_qwen_calls_the_weather_tool_and_answers_from_its_result(qwen):
    client = qwen.openai()
    messages = [{"role": "user", "content": "What's the weather in Paris?"}]
    ask = dict(model=QWEN, tools=REAL_TOOLS, tool_choice="auto", temperature=0, max_tokens=60)
    r = client.chat.completions.create(messages=messages, **ask)
    message = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls", message
    (call,) = message.tool_calls
    args = json.loads(call.function.arguments)
    assert call.function.name == "get_weather" and args["city"].strip().lower() == "paris"
    content, calls, finish = add_up(client.chat.completions.create(messages=messages, stream=True, **ask))
    assert finish == ["tool_calls"] and not content.strip()
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [("get_weather", args)]

    messages += [message, {"role": "tool", "tool_call_id": call.id, "content": json.dumps(RESULT)}]
    # "none": given the result, the 1.5B would rather ask for the weather again.
    answer = client.chat.completions.create(messages=messages, **ask | {"tool_choice": "none"})
    assert answer.choices[0].finish_reason == "stop" and not answer.choices[0].message.tool_calls
    assert "17" in answer.choices[0].message.content


@pytest.mark.real_model
def test_qwen_writes_a_haiku_without_a_call(qwen):
    r = qwen.openai().chat.completions.create(
        model=QWEN, messages=[{"role": "user", "content": "Write a haiku about the sea"}], tools=REAL_TOOLS,
        tool_choice="auto", temperature=0, max_tokens=60)
    (c,) = r.choices
    assert c.finish_reason == "stop" and not c.message.tool_calls
    assert len(c.message.content.split()) >= 5
    assert "get_weather" not in c.message.content and "<tool_call>" not in c.message.content


@pytest.mark.real_model
def test_qwen_anthropic_round_trip(qwen):
    client = qwen.anthropic()
    tools = [{"name": "get_weather", "description": "Get the current weather in a city", "input_schema": GET_WEATHER}]
    messages = [{"role": "user", "content": "What's the weather in Paris?"}]
    m = client.messages.create(model=QWEN, max_tokens=60, messages=messages, tools=tools,
                               extra_body={"temperature": 0})
    assert m.stop_reason == "tool_use"
    (use,) = [b for b in m.content if b.type == "tool_use"]
    assert use.name == "get_weather" and use.input["city"].strip().lower() == "paris"
    messages += [{"role": "assistant", "content": m.content},
                 {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                               "content": "17 °C and light rain"}]}]
    answer = client.messages.create(model=QWEN, max_tokens=60, messages=messages, tools=tools,
                                    tool_choice={"type": "none"}, extra_body={"temperature": 0})
    assert answer.stop_reason == "end_turn" and [b.type for b in answer.content] == ["text"]
    assert "17" in answer.content[0].text
