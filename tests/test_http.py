"""`edgeinfer serve --http` as a real process on loopback, driven by the
official `openai` and `anthropic` packages, and by raw HTTP for every bad
input, on the tiny model."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import time

import anthropic
import jsonschema
import openai
import pytest
from served import Served, start_http

pytestmark = pytest.mark.timeout(300)

HELLO = [{"role": "user", "content": "Hello there"}]
TOKEN = "s3cret-s3cret-s3cret-s3cret"
CHOICES = {
    "type": "object",
    "properties": {
        "pet": {"enum": ["cat", "dog", "fish"]},
        "legs": {"type": "integer"},
        "tame": {"type": "boolean"},
        "colours": {"type": "array", "items": {"enum": ["red", "black", "white"]}, "maxItems": 3},
    },
    "required": ["pet", "legs", "tame"],
}


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    home = tmp_path_factory.mktemp("http-home")
    s = start_http(tiny_model, "--parallel", "4", "--n-ctx", "2048", "--max-body", "65536",
              env={"EDGEINFER_HOME": str(home), "EDGEINFER_TOKEN": ""})
    yield s
    assert s.stop() == 0


MODEL = "tiny.gguf"
ACTIVE = 'edgeinfer_active_sequences{model="tiny.gguf"}'   # each model's figures carry its name


# -- the openai package -------------------------------------------------------
def test_chat_completion_streaming_and_not(server):
    client = server.openai()
    r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=12, temperature=0)
    choice = r.choices[0]
    assert r.object == "chat.completion" and choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 12 and r.usage.prompt_tokens > 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens

    chunks = list(client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content  # greedy: the same answer either way
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [choice.finish_reason]
    # The usage chunk comes last, with no choices, and counts what was sent.
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == r.usage.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])
    # The second identical prompt reused the first one's KV.
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens > 0
    # max_completion_tokens, the newer name, wins over max_tokens.
    r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=12, max_completion_tokens=3,
                                       temperature=0, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"


def test_stream_without_usage_ends_with_done(server):
    status, headers, body = server.request("POST", "/v1/chat/completions",
                                           {"messages": HELLO, "max_tokens": 4, "stream": True})
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = [line[6:] for line in body.decode().split("\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert all("usage" not in json.loads(e) for e in events[:-1])


def test_completions(server):
    client = server.openai()
    r = client.completions.create(model=MODEL, prompt="The weather was", temperature=0)
    assert r.object == "text_completion" and r.choices[0].text
    assert r.usage.completion_tokens <= 16  # the API's default max_tokens
    chunks = list(client.completions.create(model=MODEL, prompt="The weather was", temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    # A list of token ids is a prompt too.
    r2 = client.completions.create(model=MODEL, prompt=[1, 2, 3, 4], max_tokens=3, temperature=0)
    assert r2.usage.prompt_tokens == 4


def test_stop_sequences(server):
    client = server.openai()
    ask = dict(model=MODEL, messages=HELLO, max_tokens=40, temperature=0, extra_body={"ignore_eos": True})
    full = client.chat.completions.create(**ask).choices[0].message.content
    stop = next(full[i:i + 3] for i in range(4, len(full) - 3) if full[i:i + 3].strip() == full[i:i + 3])
    cut = client.chat.completions.create(**{**ask, "stop": [stop, "zzzz-never"]})
    assert cut.choices[0].message.content == full[:full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = list(client.chat.completions.create(**{**ask, "stop": stop, "stream": True}))
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == full[:full.index(stop)]

    # This anthropic release no longer takes sampling arguments; the API does.
    msg = server.anthropic().messages.create(model=MODEL, max_tokens=40, messages=HELLO, stop_sequences=[stop],
                                             extra_body={"temperature": 0})
    assert msg.stop_reason == "stop_sequence" and msg.stop_sequence == stop
    assert msg.content[0].text == full[:full.index(stop)]


def test_a_json_schema_answer_validates(server):
    client = server.openai()
    for seed in (1, 2, 3):
        r = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "A pet as JSON"}], max_tokens=300, seed=seed,
            temperature=1.5, extra_body={"top_k": 0, "min_p": 0},
            response_format={"type": "json_schema", "json_schema": {"name": "pet", "schema": CHOICES}})
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content), CHOICES)
    r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=300, seed=4,
                                       response_format={"type": "json_object"})
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_a_schema_the_converter_cannot_handle_is_a_400(server):
    with pytest.raises(openai.BadRequestError) as info:
        server.openai().chat.completions.create(
            model=MODEL, messages=HELLO, response_format={"type": "json_schema", "json_schema": {
                "name": "n", "schema": {"type": "object", "properties": {"n": {"type": "number", "maximum": 3}}}}})
    assert "maximum" in info.value.message and info.value.body["param"] == "response_format"


# -- the anthropic package ----------------------------------------------------
def test_anthropic_messages(server):
    client = server.anthropic()
    msg = client.messages.create(model=MODEL, max_tokens=10, system="You are terse.", messages=HELLO,
                                 extra_body={"temperature": 0})
    assert msg.type == "message" and msg.role == "assistant" and msg.content[0].type == "text"
    assert msg.stop_reason in ("end_turn", "max_tokens") and msg.usage.output_tokens <= 10
    with client.messages.stream(model=MODEL, max_tokens=10, system="You are terse.", messages=HELLO,
                                extra_body={"temperature": 0}) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == msg.content[0].text
    assert final.stop_reason == msg.stop_reason and final.usage.output_tokens == msg.usage.output_tokens
    # Cached prompt tokens are counted apart, as Anthropic counts them.
    assert final.usage.cache_read_input_tokens > 0
    assert final.usage.input_tokens + final.usage.cache_read_input_tokens == \
        msg.usage.input_tokens + msg.usage.cache_read_input_tokens
    assert client.messages.count_tokens(model=MODEL, messages=HELLO, system="You are terse.").input_tokens == \
        msg.usage.input_tokens + msg.usage.cache_read_input_tokens


def test_anthropic_stream_event_sequence(server):
    status, headers, body = server.request("POST", "/v1/messages", {
        "model": MODEL, "max_tokens": 5, "stream": True, "messages": HELLO})
    assert status == 200
    names = re.findall(r"^event: (\S+)$", body.decode(), re.M)
    assert names[:2] == ["message_start", "content_block_start"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(names[2:-3]) <= {"content_block_delta", "ping"}


def test_anthropic_prefill_continues_the_assistant(server):
    client = server.anthropic()
    ask = dict(model=MODEL, max_tokens=6, extra_body={"temperature": 0})
    whole = client.messages.create(**ask, messages=HELLO).content[0].text
    first_word = whole.split(" ")[0]
    if first_word and first_word.strip():
        rest = client.messages.create(**ask, messages=HELLO + [{"role": "assistant", "content": first_word}])
        assert rest.content[0].text  # the continuation only, not the prefill again


def test_anthropic_structured_output(server):
    msg = server.anthropic().messages.create(
        model=MODEL, max_tokens=300, messages=[{"role": "user", "content": "A pet as JSON"}],
        output_config={"format": {"type": "json_schema", "schema": CHOICES}},
        extra_body={"temperature": 1.0, "top_k": 0, "seed": 5})
    assert msg.stop_reason == "end_turn"
    jsonschema.validate(json.loads(msg.content[0].text), CHOICES)


# -- security -----------------------------------------------------------------
def test_a_forged_host_header_is_refused(server):
    for host in ("evil.example", "attacker.test:8080", "127.0.0.1.nip.io", "[::1]evil.com", "[::1]:80evil",
                 "[::1", "localhost:x"):
        status, body = server.json("GET", "/v1/models", headers={"Host": host})
        assert status == 403 and body["error"]["type"] == "permission_error", host
    for host in (f"localhost:{server.port}", f"[::1]:{server.port}", "LOCALHOST", f"localhost.:{server.port}"):
        assert server.json("GET", "/v1/models", headers={"Host": host})[0] == 200, host


def test_a_browser_page_is_refused_without_cors(server):
    status, headers, _ = server.request("POST", "/v1/chat/completions", {"messages": HELLO, "max_tokens": 2},
                                        headers={"Origin": "http://evil.example"})
    assert status == 403 and "access-control-allow-origin" not in headers


def test_cors_allows_the_origin_given(tiny_model, tmp_path):
    s = start_http(tiny_model, "--cors", "http://localhost:3000", env={"EDGEINFER_HOME": str(tmp_path)})
    try:
        status, headers, _ = s.request("OPTIONS", "/v1/chat/completions", headers={
            "Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type,authorization"})
        assert status == 200 and headers["access-control-allow-origin"] == "http://localhost:3000"
        status, headers, _ = s.request("POST", "/v1/chat/completions", {"messages": HELLO, "max_tokens": 2},
                                       headers={"Origin": "http://localhost:3000"})
        assert status == 200 and headers["access-control-allow-origin"] == "http://localhost:3000"
        assert s.request("POST", "/v1/completions", {"prompt": "x", "max_tokens": 2},
                         headers={"Origin": "http://other.example"})[0] == 403
    finally:
        assert s.stop() == 0


def test_a_token_is_required_beyond_loopback_and_checked(tiny_model, tmp_path):
    env = {"EDGEINFER_HOME": str(tmp_path), "EDGEINFER_TOKEN": ""}
    refused = subprocess.run([sys.executable, "-m", "edgeinfer", "serve", str(tiny_model), "--no-jsonl",
                              "--http", "0", "--host", "0.0.0.0"],
                             capture_output=True, text=True, timeout=60, env={**os.environ, **env})
    assert refused.returncode != 0 and "token is required" in refused.stderr
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    s = start_http(tiny_model, "--token-file", str(token_file), env=env)
    try:
        with pytest.raises(openai.AuthenticationError):
            s.openai("wrong-wrong-wrong-wrong").chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
        with pytest.raises(anthropic.AuthenticationError):
            s.anthropic("wrong").messages.create(model=MODEL, messages=HELLO, max_tokens=2)
        status, body = s.json("GET", "/v1/models")
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
        assert s.openai(TOKEN).chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2).choices
        assert s.anthropic(TOKEN).messages.create(model=MODEL, messages=HELLO, max_tokens=2).content
        assert s.json("GET", "/health")[0] == 200  # a health check needs no token
    finally:
        assert s.stop() == 0


# -- bad input ----------------------------------------------------------------
BAD_OPENAI = [
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    ({"messages": "hi"}, 400, "messages"),
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400,
     "messages[0].content"),
    ({"messages": HELLO, "max_tokens": "ten"}, 400, "max_tokens"),
    ({"messages": HELLO, "max_tokens": 0}, 400, "max_tokens"),
    ({"messages": HELLO, "temperature": 9}, 400, "temperature"),
    ({"messages": HELLO, "top_p": "high"}, 400, "top_p"),
    ({"messages": HELLO, "presence_penalty": 3}, 400, "presence_penalty"),
    ({"messages": HELLO, "stop": [1]}, 400, "stop"),
    ({"messages": HELLO, "seed": "x"}, 400, "seed"),
    ({"messages": HELLO, "n": 0}, 400, "n"),
    ({"messages": HELLO, "n": 17}, 400, "n"),
    ({"messages": HELLO, "logprobs": "yes"}, 400, "logprobs"),
    ({"messages": HELLO, "top_logprobs": 21, "logprobs": True}, 400, "top_logprobs"),
    ({"messages": HELLO, "top_logprobs": 2}, 400, "top_logprobs"),
    ({"messages": HELLO, "logit_bias": {"1000000": 5}}, 400, "logit_bias"),
    ({"messages": HELLO, "logit_bias": {"5": -101}}, 400, "logit_bias"),
    ({"messages": HELLO, "tools": [{"type": "retrieval"}]}, 400, "tools[0]"),
    ({"messages": HELLO, "tools": [{"type": "function", "function": {"name": "f g"}}]}, 400, "tools[0].function.name"),
    ({"messages": HELLO, "tool_choice": "required"}, 400, "tool_choice"),
    ({"messages": HELLO, "tools": [{"type": "function", "function": {"name": "f"}}],
      "tool_choice": {"type": "function", "function": {"name": "g"}}}, 400, "tool_choice"),
    ({"messages": [{"role": "tool", "content": "21 C"}]}, 400, "messages[0].tool_call_id"),
    ({"messages": HELLO, "stream": "yes"}, 400, "stream"),
    ({"messages": HELLO, "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ({"messages": HELLO, "response_format": {"type": "xml"}}, 400, "response_format"),
    ({"messages": HELLO, "model": "gpt-4o"}, 404, "model"),
    ({"messages": HELLO, "guided_regex": "a+"}, 400, "guided_regex"),
    ({"messages": HELLO, "structured_outputs": {"regex": "a+"}}, 400, "structured_outputs"),
    ({"messages": HELLO, "guided_choice": []}, 400, "guided_choice"),
    ({"messages": HELLO, "guided_json": {"type": "object"}, "grammar": 'root ::= "x"'}, 400, "grammar"),
]


@pytest.mark.parametrize("body, status, param", BAD_OPENAI)
def test_bad_openai_requests(server, body, status, param):
    got, answer = server.json("POST", "/v1/chat/completions", body)
    assert got == status, answer
    err = answer["error"]
    assert err["message"] and err["type"] and err["param"] == param
    if param:
        assert param.split("[")[0] in err["message"]
    # and the server keeps serving
    assert server.json("POST", "/v1/chat/completions", {"messages": HELLO, "max_tokens": 1})[0] == 200


def test_context_overflow_says_so(server):
    status, body = server.json("POST", "/v1/completions", {"prompt": "word " * 2100})
    assert status == 400 and body["error"]["code"] == "context_length_exceeded"
    assert "2,048" in body["error"]["message"]
    status, body = server.json("POST", "/v1/messages", {"model": MODEL, "max_tokens": 4, "messages": [
        {"role": "user", "content": "word " * 2100}]})
    assert status == 400 and body["error"]["type"] == "invalid_request_error" and "context" in body["error"]["message"]


BAD_ANTHROPIC = [
    ({"model": MODEL, "messages": HELLO}, 400, "max_tokens"),
    ({"max_tokens": 5, "messages": HELLO}, 400, "model"),
    ({"model": MODEL, "max_tokens": 5, "messages": [{"role": "system", "content": "x"}]}, 400, "role"),
    ({"model": MODEL, "max_tokens": 5, "messages": HELLO, "temperature": 1.5}, 400, "temperature"),
    ({"model": MODEL, "max_tokens": 5, "messages": HELLO, "top_k": -1}, 400, "top_k"),
    ({"model": MODEL, "max_tokens": 5, "messages": HELLO, "stop_sequences": "x" * 300}, 400, "stop_sequences"),
    ({"model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "image"}]}]}, 400,
     "content"),
    ({"model": "claude-3-haiku", "max_tokens": 5, "messages": HELLO}, 404, "model"),
]


@pytest.mark.parametrize("body, status, words", BAD_ANTHROPIC)
def test_bad_anthropic_requests(server, body, status, words):
    got, answer = server.json("POST", "/v1/messages", body)
    assert got == status, answer
    assert answer["type"] == "error" and words in answer["error"]["message"]
    assert answer["error"]["type"] == ("not_found_error" if status == 404 else "invalid_request_error")


def test_anthropic_client_errors_are_typed(server):
    with pytest.raises(anthropic.NotFoundError):
        server.anthropic().messages.create(model="claude-x", max_tokens=3, messages=HELLO)
    with pytest.raises(anthropic.BadRequestError):
        server.anthropic().messages.create(model=MODEL, max_tokens=3, messages=HELLO, extra_body={"temperature": 3})


def test_a_body_over_the_limit_is_a_413(server):
    big = {"messages": [{"role": "user", "content": "x" * 70000}]}
    status, body = server.json("POST", "/v1/chat/completions", big)
    assert status == 413 and "65,536" in body["error"]["message"]
    status, body = server.json("POST", "/v1/messages", {"model": MODEL, "max_tokens": 1, **big})
    assert status == 413 and body["error"]["type"] == "request_too_large"
    # Without a Content-Length (chunked), the limit holds too.
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("POST", "/v1/chat/completions", body=iter([json.dumps(big).encode()]),
                 headers={"Content-Type": "application/json"}, encode_chunked=True)
    assert conn.getresponse().status == 413
    conn.close()


def test_wrong_content_type_route_and_method(server):
    status, body = server.json("POST", "/v1/chat/completions", b"messages=hi",
                               headers={"Content-Type": "text/plain"})
    assert status == 415 and "application/json" in body["error"]["message"]
    assert server.json("GET", "/v1/nothing")[0] == 404
    assert server.json("GET", "/v1/chat/completions")[0] == 405


def test_busy_is_a_429_with_retry_after(tiny_model, tmp_path):
    s = start_http(tiny_model, "--parallel", "1", "--queue", "0", env={"EDGEINFER_HOME": str(tmp_path)})
    try:
        conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=60)
        conn.request("POST", "/v1/completions", body=json.dumps({
            "prompt": "The weather was", "max_tokens": 1500, "ignore_eos": True, "stream": True}),
            headers={"Content-Type": "application/json"})
        long = conn.getresponse()
        assert long.status == 200 and long.readline().startswith(b"data: ")
        status, headers, body = s.request("POST", "/v1/chat/completions", {"messages": HELLO, "max_tokens": 2})
        assert status == 429 and headers["retry-after"].isdigit()
        assert json.loads(body)["error"]["type"] == "rate_limit_error"
        status, headers, body = s.request("POST", "/v1/messages",
                                          {"model": MODEL, "messages": HELLO, "max_tokens": 2})
        assert status == 429 and json.loads(body)["error"]["type"] == "rate_limit_error"
        conn.close()  # the client leaves mid-stream: its sequence is freed
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if s.metrics().get(ACTIVE, 1) == 0:
                break
            time.sleep(0.1)
        assert s.metrics()[ACTIVE] == 0
        assert s.json("POST", "/v1/chat/completions", {"messages": HELLO, "max_tokens": 2})[0] == 200
    finally:
        assert s.stop() == 0


# -- models, health, metrics -------------------------------------------------
def test_models_and_health(server):
    models = server.openai().models.list()
    assert models.data[0].id == MODEL
    assert server.openai().models.retrieve(MODEL).id == MODEL
    status, body = server.json("GET", "/health")
    assert status == 200 and body["status"] == "ok" and body["model"] == MODEL


def test_health_is_503_until_the_model_is_loaded(tiny_model):
    """The front opens before the engine exists (``serve`` loads the model
    after the port is up, as a Pi takes seconds to map a large one)."""
    import asyncio

    import edgeinfer
    from edgeinfer.server.http import HttpFront, HttpOptions

    async def main():
        front = HttpFront(None, HttpOptions(port=0))
        await front.start()
        s = Served(None, front.port)
        try:
            status, headers, body = await asyncio.to_thread(s.request, "GET", "/health")
            assert status == 503 and json.loads(body)["status"] == "loading" and "retry-after" in headers
            status, body = await asyncio.to_thread(s.json, "POST", "/v1/chat/completions",
                                                   {"messages": HELLO, "max_tokens": 2})
            assert status == 503 and "loading" in body["error"]["message"]
            metrics = await asyncio.to_thread(s.metrics)
            assert metrics["edgeinfer_model_loaded"] == 0
            engine = await asyncio.to_thread(edgeinfer.load, tiny_model, threads=1, n_ctx=512)
            front.engine = engine
            assert (await asyncio.to_thread(s.request, "GET", "/health"))[0] == 200
            status, body = await asyncio.to_thread(s.json, "POST", "/v1/chat/completions",
                                                   {"messages": HELLO, "max_tokens": 2})
            assert status == 200 and body["usage"]["completion_tokens"] <= 2
        finally:
            await front.stop()
            if front.engine is not None:
                engine.close()

    asyncio.run(main())


def test_metrics_move_by_the_right_amounts(server):
    before = server.metrics()
    client = server.openai()
    usage = []
    for i in range(3):
        r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"Count {i}"}],
                                           max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
        usage.append(r.usage)
    chunks = list(client.completions.create(model=MODEL, prompt="Once", max_tokens=5, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    usage.append(chunks[-1].usage)
    server.json("POST", "/v1/chat/completions", {"messages": HELLO, "n": 99})  # a 400
    after = server.metrics()

    def moved(name):
        return after.get(name, 0) - before.get(name, 0)

    assert moved('edgeinfer_requests_total{endpoint="/v1/chat/completions",status="200"}') == 3
    assert moved('edgeinfer_requests_total{endpoint="/v1/completions",status="200"}') == 1
    assert moved('edgeinfer_requests_total{endpoint="/v1/chat/completions",status="400"}') == 1
    assert moved("edgeinfer_generated_tokens_total") == sum(u.completion_tokens for u in usage) == 3 * 6 + 5
    assert moved("edgeinfer_prompt_tokens_total") == sum(u.prompt_tokens for u in usage)
    assert moved("edgeinfer_time_to_first_token_seconds_count") == 4
    # Every token after the first of each stream is one inter-token gap.
    assert moved("edgeinfer_inter_token_seconds_count") == sum(u.completion_tokens - 1 for u in usage)
    assert after["edgeinfer_model_loaded"] == 1 and after[ACTIVE] == 0
    assert after['edgeinfer_kv_cells{model="tiny.gguf"}'] == 2048
    assert after['edgeinfer_model_info{model="tiny.gguf",native="' +
                                                        next(k.split('native="')[1].split('"')[0] for k in after
                                                             if k.startswith("edgeinfer_model_info")) + '"}'] == 1


def test_sigterm_lets_a_stream_finish(tiny_model, tmp_path):
    s = start_http(tiny_model, env={"EDGEINFER_HOME": str(tmp_path)})
    conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=60)
    conn.request("POST", "/v1/completions", body=json.dumps({
        "prompt": "The weather was", "max_tokens": 300, "ignore_eos": True, "stream": True}),
        headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.readline().startswith(b"data: ")
    s.proc.send_signal(signal.SIGTERM)
    rest = r.read().decode()
    assert rest.rstrip().endswith("data: [DONE]")
    assert s.proc.wait(60) == 0


def test_a_client_that_hangs_up_frees_its_sequence(server):
    for stream in (False, True):
        before = server.metrics()
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        conn.request("POST", "/v1/chat/completions", body=json.dumps({
            "messages": HELLO, "max_tokens": 2000, "ignore_eos": True, "stream": stream}),
            headers={"Content-Type": "application/json"})
        deadline = time.monotonic() + 20
        while server.metrics().get(ACTIVE, 0) == 0:
            assert time.monotonic() < deadline, "the request never started"
            time.sleep(0.05)
        conn.close()
        while server.metrics()[ACTIVE] != 0:
            assert time.monotonic() < deadline, f"stream={stream}: the sequence was not freed"
            time.sleep(0.05)
        # It was cancelled, not run to the end: it never finished.
        after = server.metrics()
        key = "edgeinfer_time_to_first_token_seconds_count"
        assert after.get(key, 0) == before.get(key, 0), f"stream={stream}"
    assert server.json("POST", "/v1/chat/completions", {"messages": HELLO, "max_tokens": 2})[0] == 200


def test_speculative_per_request(server):
    client = server.openai()
    a = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=20, temperature=0,
                                       extra_body={"speculative": "off", "ignore_eos": True})
    b = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=20, temperature=0,
                                       extra_body={"speculative": "lookup", "ignore_eos": True})
    assert a.choices[0].message.content == b.choices[0].message.content
    status, body = server.json("POST", "/v1/chat/completions", {"messages": HELLO, "speculative": "always"})
    assert status == 400 and body["error"]["param"] == "speculative"
    status, body = server.json("POST", "/v1/chat/completions", {"messages": HELLO, "speculative": "draft"})
    assert status == 400 and "draft model" in body["error"]["message"]


# -- the fields clients send: logprobs, n, logit_bias, echo, other servers' constraints ------
def test_logprobs_n_and_logit_bias_through_the_openai_client(server, tiny_model):
    client = server.openai()
    r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=5, temperature=0, logprobs=True,
                                       top_logprobs=3, extra_body={"ignore_eos": True})
    entries = r.choices[0].logprobs.content
    assert len(entries) == r.usage.completion_tokens == 5
    assert "".join(e.token for e in entries) == r.choices[0].message.content
    for e in entries:   # greedy: the token drawn is the likeliest, and the alternatives come in order
        assert len(e.top_logprobs) == 3 and e.top_logprobs[0].token == e.token
        assert e.logprob == e.top_logprobs[0].logprob <= 0
        assert [a.logprob for a in e.top_logprobs] == sorted((a.logprob for a in e.top_logprobs), reverse=True)
    # Streamed, the same entries come with the chunks.
    chunks = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=5, temperature=0, logprobs=True,
                                            top_logprobs=3, stream=True, extra_body={"ignore_eos": True})
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, round(e.logprob, 4)) for e in streamed] == [(e.token, round(e.logprob, 4)) for e in entries]
    # n answers, each with its own seed: usage counts the prompt once.
    r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=4, n=3, temperature=1.0, seed=7,
                                       extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1, 2] and r.usage.completion_tokens == 12
    assert len({c.message.content for c in r.choices}) > 1
    # A bias of 100 makes one token the answer.
    from edgeinfer.engine import Engine

    with Engine(tiny_model, n_ctx=64, threads=1) as e:
        token = e.tokenize(" the", add_bos=False)[-1]
        text = e.detokenize([token])
    biased = client.completions.create(model=MODEL, prompt="Hello", max_tokens=3, temperature=0,
                                       logit_bias={str(token): 100}, extra_body={"ignore_eos": True})
    assert biased.choices[0].text == text * 3


def test_echo_scores_the_prompt_as_generation_would(server):
    client = server.openai()
    answer = client.completions.create(model=MODEL, prompt="Once upon", max_tokens=2, temperature=0, logprobs=2,
                                       extra_body={"ignore_eos": True})
    scored = client.completions.create(model=MODEL, prompt="Once upon" + answer.choices[0].text, max_tokens=0,
                                       echo=True, logprobs=2)
    lp = scored.choices[0].logprobs
    assert scored.choices[0].text == "Once upon" + answer.choices[0].text
    assert lp.token_logprobs[0] is None and "".join(lp.tokens) == scored.choices[0].text
    # The answer's tokens, scored as part of the prompt, have the log-probabilities they were drawn with.
    got = answer.choices[0].logprobs.token_logprobs
    assert lp.token_logprobs[-2:] == pytest.approx(got, abs=1e-3)


def test_other_servers_constraints_are_kept(server):
    client = server.openai()
    for seed in range(3):
        r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=8, temperature=1.0, seed=seed,
                                           extra_body={"guided_choice": ["yes", "no"]})
        assert r.choices[0].message.content in ("yes", "no")
        schema = {"type": "object", "properties": {"a": {"type": "boolean"}}, "required": ["a"]}
        r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=40, temperature=1.0, seed=seed,
                                           extra_body={"structured_outputs": {"json": schema}})
        if r.choices[0].finish_reason == "stop":
            assert isinstance(json.loads(r.choices[0].message.content)["a"], bool)
