"""Ollama's API as its users call it: the official `ollama` Python client
(and raw HTTP for what a client would not send) against a real
`edgeinfer serve --http` on loopback, serving a store of tiny models
(a chat model, one with fill-in-the-middle tokens, a BERT) on demand,
with a catalog entry that pulls from a loopback HTTP server.

Also here: the Content-Type rule every route follows (a body without
application/json is read when no web page can have sent it), and
`edgeinfer serve --ollama` on Ollama's own port.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import math
import os
import socket
import subprocess
import sys
import time

import jsonschema
import ollama
import pytest
import served
from conftest import import_into, load_script
from http_server import start_server
from served import start_http

pytestmark = pytest.mark.timeout(300)

ALLOWED = "http://localhost:3000"    # the one web origin the server is started with (--cors)
ASK = [{"role": "user", "content": "What's the weather in Paris?"}]
GREEDY = {"temperature": 0, "num_predict": 12}
WEATHER = {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
           "properties": {"city": {"enum": ["Paris", "Oslo"]}, "unit": {"enum": ["celsius", "fahrenheit"]}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city now",
                                           "parameters": WEATHER}}]
PET = {"type": "object", "required": ["pet", "legs"], "additionalProperties": False,
       "properties": {"pet": {"enum": ["cat", "dog"]}, "legs": {"type": "integer"}}}


def sha256(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture(scope="module")
def files(tiny_model, tiny_fim_model, tiny_bert) -> dict:
    return {"tiny-chat:f16": tiny_model, "tiny-fim:f16": tiny_fim_model, "tiny-bert:f16": tiny_bert}


@pytest.fixture(scope="module")
def pullable(tmp_path_factory):
    """A tiny model the store does not hold (other weights, another sha256)."""
    return load_script("build_tiny_model").build(tmp_path_factory.mktemp("tiny-pull") / "tiny.gguf", seed=1)


@pytest.fixture(scope="module")
def loopback(pullable):
    """That model's bytes on a loopback HTTP server, for the catalog."""
    server = start_server()
    server.add("/tiny.gguf", pullable.read_bytes())
    yield server
    server.stop()


@pytest.fixture(scope="module")
def server(files, loopback, pullable, tmp_path_factory):
    home = import_into(tmp_path_factory.mktemp("ollama-home"), files)
    config = tmp_path_factory.mktemp("ollama-config")
    payload = pullable.read_bytes()
    (config / "models").mkdir()
    (config / "models" / "tiny-pull.toml").write_text(
        'name = "tiny-pull"\ntag = "test"\ndefault_tag = true\nfile = "tiny.gguf"\n'
        f'size = {len(payload)}\nsha256 = "{hashlib.sha256(payload).hexdigest()}"\nlicense = "Apache-2.0"\n\n'
        f'[[sources]]\nkind = "https"\nurl = "{loopback.url("/tiny.gguf")}"\n')
    s = start_http(None, "--cors", ALLOWED, "--n-ctx", "2048",
                   env={"EDGEINFER_HOME": str(home), "EDGEINFER_CONFIG": str(config), "EDGEINFER_TOKEN": ""})
    yield s
    assert s.stop() == 0


@pytest.fixture
def client(server) -> ollama.Client:
    return ollama.Client(host=server.base, timeout=120)


def post(port: int, path: str, data: bytes, headers: dict, method: str = "POST") -> tuple[int, bytes]:
    """A request with exactly these headers (no Content-Type unless given)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request(method, path, body=data, headers=headers)
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


# -- models --------------------------------------------------------------------
def test_list_show_and_version(client, server, files):
    listed = {m.model: m for m in client.list().models}
    assert set(listed) == set(files)
    for name, path in files.items():
        m = listed[name]
        assert m.digest == sha256(path) and m.size == os.path.getsize(path) and m.details.format == "gguf"
    chat = listed["tiny-chat:f16"].details
    assert chat.family == "llama" and chat.quantization_level == "F16" and chat.parameter_size.endswith("M")
    assert listed["tiny-bert:f16"].details.family == "bert"

    shown = client.show("tiny-chat")
    assert shown.capabilities == ["completion", "tools"]
    assert "im_start" in shown.template and shown.details.family == "llama"
    assert shown.modelinfo["general.architecture"] == "llama" and shown.modelinfo["llama.context_length"] > 0
    assert shown.modelinfo["tokenizer.ggml.tokens"] == []     # the vocabulary only with verbose
    assert "FROM tiny-chat:f16" in shown.modelfile
    assert client.show("tiny-fim:f16").capabilities == ["completion", "tools", "insert"]
    assert client.show("tiny-bert").capabilities == ["embedding"]
    assert client.show("tiny-chat:latest").capabilities == ["completion", "tools"]   # :latest is the bare name

    status, body = server.json("GET", "/api/version")
    assert status == 200 and all(part.isdigit() for part in body["version"].split("."))
    with pytest.raises(ollama.ResponseError) as e:
        client.show("llama3.2")
    assert e.value.status_code == 404 and "llama3.2" in e.value.error and "edgeinfer pull" in e.value.error


# -- chat and generate ------------------------------------------------------------
def test_chat_whole_and_streamed(client):
    whole = client.chat(model="tiny-chat", messages=ASK, options={**GREEDY, "seed": 1})
    assert whole.done and whole.message.role == "assistant" and whole.message.content
    assert whole.done_reason == "length" and whole.eval_count == 12 and whole.prompt_eval_count > 5
    assert whole.total_duration >= whole.eval_duration > 0 and whole.prompt_eval_duration > 0
    assert whole.model == "tiny-chat"
    chunks = list(client.chat(model="tiny-chat", messages=ASK, options={**GREEDY, "seed": 1}, stream=True))
    assert all(not c.done for c in chunks[:-1]) and chunks[-1].done and len(chunks) > 2
    assert "".join(c.message.content for c in chunks) == whole.message.content
    last = chunks[-1]
    assert last.eval_count == 12 and last.done_reason == "length" and last.message.content == ""
    # A conversation with an earlier answer and a system message; think and
    # unknown options are ignored (as Ollama does), a stop string is honoured.
    history = [{"role": "system", "content": "Be brief."}, *ASK, {"role": "assistant", "content": "Sunny."},
               {"role": "user", "content": "And tomorrow?"}]
    r = client.chat(model="tiny-chat", messages=history, think=False,
                    options={"num_predict": 4, "mirostat": 2, "num_ctx": 8192, "typical_p": 0.5})
    assert r.done and r.eval_count <= 4 and r.prompt_eval_count > whole.prompt_eval_count
    # A last answer of the assistant's is continued, not closed as a turn of its own.
    go_on = client.chat(model="tiny-chat", messages=[*ASK, {"role": "assistant", "content": "It is"}],
                        options={"num_predict": 2})
    assert 0 < go_on.prompt_eval_count - whole.prompt_eval_count <= 3


def test_generate_templated_raw_and_options(client):
    templated = client.generate(model="tiny-chat", prompt="Hello", system="Be brief.", options=GREEDY)
    raw = client.generate(model="tiny-chat", prompt="Hello", raw=True, options=GREEDY)
    # The template wraps the prompt (and the system message) in its turns; raw is the text alone.
    assert templated.prompt_eval_count > raw.prompt_eval_count + 5 and raw.response
    streamed = list(client.generate(model="tiny-chat", prompt="Hello", raw=True, options=GREEDY, stream=True))
    assert "".join(c.response for c in streamed) == raw.response and streamed[-1].done
    capped = client.generate(model="tiny-chat", prompt="Hello", raw=True,
                             options={"num_predict": 3, "top_k": 5, "top_p": 0.9, "min_p": 0.1, "seed": 7,
                                      "repeat_penalty": 1.1, "repeat_last_n": 16, "presence_penalty": 0.5,
                                      "frequency_penalty": 0.5, "temperature": 0.7})
    assert capped.eval_count == 3 and capped.done_reason == "length"
    again = client.generate(model="tiny-chat", prompt="Hello", raw=True,
                            options={"num_predict": 3, "seed": 7, "temperature": 0.7, "top_k": 5, "top_p": 0.9,
                                     "min_p": 0.1, "repeat_penalty": 1.1, "repeat_last_n": 16,
                                     "presence_penalty": 0.5, "frequency_penalty": 0.5})
    assert again.response == capped.response   # the seed is honoured


def test_format_json_and_schema(client):
    r = client.generate(model="tiny-chat", prompt="A JSON object please", format="json",
                        options={"num_predict": 200, "seed": 3})
    assert isinstance(json.loads(r.response), dict)
    r = client.chat(model="tiny-chat", messages=[{"role": "user", "content": "A pet?"}], format=PET,
                    options={"num_predict": 200, "seed": 3})
    jsonschema.validate(json.loads(r.message.content), PET)


def test_tools_are_offered_and_a_calls_history_is_read(client, server):
    """The mechanics on the tiny model (whose random weights never choose
    to call; the real tier below makes calls): the tools reach the prompt,
    and a conversation holding a call, its arguments as an object, and the
    tool's answer named by tool_name, is read."""
    bare = client.chat(model="tiny-chat", messages=ASK, options={"num_predict": 1})
    offered = client.chat(model="tiny-chat", messages=ASK, tools=TOOLS, options={"num_predict": 1})
    assert offered.prompt_eval_count > bare.prompt_eval_count + 20
    history = [*ASK, {"role": "assistant", "content": "", "tool_calls": [
                   {"function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}}]},
               {"role": "tool", "tool_name": "get_weather", "content": "18 degrees, sunny"}]
    r = client.chat(model="tiny-chat", messages=history, tools=TOOLS, options={"num_predict": 2})
    assert r.done and r.prompt_eval_count > offered.prompt_eval_count
    status, body = server.json("POST", "/api/chat", {"model": "tiny-chat", "messages": ASK,
                                                     "tools": [{"type": "function", "function": {"name": 3}}]})
    assert status == 400 and "tools" in body["error"]


@pytest.fixture(scope="module")
def qwen(qwen_store, shared_selftest):
    link = qwen_store.root / "selftest"
    if not link.exists() and not link.is_symlink():
        link.symlink_to(shared_selftest, target_is_directory=True)
    s = start_http(None, env={"EDGEINFER_HOME": str(qwen_store.root), "EDGEINFER_TOKEN": ""})
    yield ollama.Client(host=s.base, timeout=300)
    assert s.stop() == 0


@pytest.mark.real_model
@pytest.mark.slow
def test_qwen_calls_a_tool_whole_and_streamed_and_answers_from_its_result(qwen):
    model = "qwen2.5-coder:1.5b"   # Ollama's name for the catalog's Qwen2.5-Coder 1.5B Instruct
    r = qwen.chat(model=model, messages=ASK, tools=TOOLS, options={"temperature": 0})
    assert r.model == model and r.done_reason == "stop" and len(r.message.tool_calls) == 1
    call = r.message.tool_calls[0]
    assert call.function.name == "get_weather" and dict(call.function.arguments) == {"city": "Paris",
                                                                                     "unit": "celsius"}
    chunks = list(qwen.chat(model=model, messages=ASK, tools=TOOLS, options={"temperature": 0}, stream=True))
    streamed = [c for ch in chunks for c in ch.message.tool_calls or []]
    assert [(c.function.name, dict(c.function.arguments)) for c in streamed] == [("get_weather", dict(
        call.function.arguments))] and chunks[-1].done
    history = [*ASK, {"role": "assistant", "content": "", "tool_calls": [call.model_dump(exclude_none=True)]},
               {"role": "tool", "tool_name": "get_weather", "content": '{"temperature": 18, "sky": "sunny"}'}]
    # Without the tools this turn: with them, the 1.5B would rather ask for the weather again.
    answer = qwen.chat(model=model, messages=history, options={"temperature": 0, "num_predict": 60})
    assert not answer.message.tool_calls and "18" in answer.message.content


def test_suffix_fills_in_the_middle(client):
    r = client.generate(model="tiny-fim", prompt="def add(a, b):\n    ", suffix="\n\nprint(add(1, 2))\n",
                        options={"temperature": 0, "num_predict": 8})
    assert r.done and r.prompt_eval_count > 10
    with pytest.raises(ollama.ResponseError) as e:
        client.generate(model="tiny-chat", prompt="def add(a, b):", suffix="\n", options={"num_predict": 4})
    assert e.value.status_code == 400 and "fill-in-the-middle" in e.value.error and "edgeinfer pull" in e.value.error
    # An empty suffix is no suffix, as Ollama reads it: any model completes the prompt.
    assert client.generate(model="tiny-chat", prompt="def add(a, b):", suffix="", options={"num_predict": 2}).done


# -- embeddings -----------------------------------------------------------------
def test_embed_and_the_older_route(client):
    r = client.embed(model="tiny-bert", input=["the cat sat", "a dog ran"])
    assert len(r.embeddings) == 2 and r.embeddings[0] != r.embeddings[1]
    assert all(abs(math.sqrt(sum(x * x for x in v)) - 1) < 1e-3 for v in r.embeddings)
    assert r.prompt_eval_count > 4 and r.model == "tiny-bert"
    one = client.embed(model="tiny-bert", input="the cat sat").embeddings[0]
    assert max(abs(a - b) for a, b in zip(one, r.embeddings[0])) < 2e-4
    old = client.embeddings(model="tiny-bert", prompt="the cat sat").embedding
    assert max(abs(a - b) for a, b in zip(old, one)) < 2e-4
    with pytest.raises(ollama.ResponseError) as e:
        client.embed(model="tiny-chat", input="hi")
    assert e.value.status_code == 400 and "does not embed" in e.value.error


# -- loaded models and keep_alive ------------------------------------------------------
def test_ps_load_and_unload_with_keep_alive(client):
    loaded = client.generate(model="tiny-chat", keep_alive=-1)   # an empty prompt loads
    assert loaded.done and loaded.done_reason == "load" and loaded.response == ""
    ps = {m.model: m for m in client.ps().models}
    assert "tiny-chat:f16" in ps and ps["tiny-chat:f16"].expires_at.year == 9999
    assert ps["tiny-chat:f16"].context_length == 2048 and ps["tiny-chat:f16"].size > 0
    assert client.chat(model="tiny-chat", messages=ASK, options={"num_predict": 2}, keep_alive="10m").done
    ps = {m.model: m for m in client.ps().models}
    assert 590 < ps["tiny-chat:f16"].expires_at.timestamp() - time.time() <= 600
    gone = client.generate(model="tiny-chat", keep_alive=0)   # an empty prompt with keep_alive 0 unloads
    assert gone.done_reason == "unload"
    assert "tiny-chat:f16" not in {m.model for m in client.ps().models}
    loaded = client.chat(model="tiny-chat", messages=[])
    assert loaded.done_reason == "load" and loaded.message.content == ""
    assert client.chat(model="tiny-chat", messages=[], keep_alive=0).done_reason == "unload"
    assert "tiny-chat:f16" not in {m.model for m in client.ps().models}


# -- pull, copy, delete -----------------------------------------------------------
def test_pull_from_the_catalog_copy_and_delete(client, loopback, pullable):
    progress = list(client.pull("tiny-pull:test", stream=True))
    assert progress[0].status == "pulling manifest" and progress[-1].status == "success"
    moving = [p for p in progress if p.total]
    assert moving and moving[-1].completed == moving[-1].total == os.path.getsize(pullable)
    assert moving[-1].digest == "sha256:" + sha256(pullable)
    assert [r.path for r in loopback.requests_for("/tiny.gguf")] == ["/tiny.gguf"]
    listed = {m.model: m for m in client.list().models}
    assert listed["tiny-pull:test"].digest == sha256(pullable)
    assert client.pull("tiny-pull").status == "success"     # there already: nothing fetched
    assert len(loopback.requests_for("/tiny.gguf")) == 1
    with pytest.raises(ollama.ResponseError) as e:
        client.pull("llama3.2")
    assert e.value.status_code == 404 and "edgeinfer list --catalog" in e.value.error
    # A copy is a second name for the same blob; deleting one leaves the other.
    assert client.copy("tiny-pull:test", "mine").status == "success"
    listed = {m.model: m for m in client.list().models}
    assert listed["mine:latest"].digest == listed["tiny-pull:test"].digest
    assert client.chat(model="mine", messages=ASK, options={"num_predict": 2}).done
    assert client.delete("mine").status == "success"
    assert client.delete("tiny-pull:test").status == "success"
    assert not {"mine:latest", "tiny-pull:test"} & {m.model for m in client.list().models}
    with pytest.raises(ollama.ResponseError) as e:
        client.delete("tiny-pull:test")
    assert e.value.status_code == 404


# -- the ollama npm client ---------------------------------------------------------
CHAT_STREAM_JS = """
import { Ollama } from 'ollama'
const client = new Ollama({ host: process.argv[2] })
const stream = await client.chat({ model: 'tiny-chat', stream: true, messages: JSON.parse(process.argv[3]),
                                   options: { temperature: 0, num_predict: 12 } })
const parts = []
let last
for await (const part of stream) { parts.push(part.message.content); last = part }
console.log(JSON.stringify({ content: parts.join(''), chunks: parts.length, done: last.done,
                             done_reason: last.done_reason, eval_count: last.eval_count }))
"""


@pytest.fixture(scope="module")
def npm_ollama(request) -> str:
    """A folder with the `ollama` npm package installed (once, in pytest's
    cache), holding the script that drives it; the registry is npm's own
    setting."""
    import shutil

    npm, node = shutil.which("npm"), shutil.which("node")
    if npm is None or node is None:
        pytest.skip("npm and node are not installed: the ollama npm client cannot be tested")
    where = request.config.cache.mkdir("npm-ollama")
    if not (where / "node_modules" / "ollama" / "package.json").exists():
        r = subprocess.run([npm, "install", "--no-audit", "--no-fund", "--loglevel=error", "--prefix", str(where),
                            "ollama@0.6"], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, f"npm install ollama failed: {r.stderr[-2000:]}"
    (where / "chat_stream.mjs").write_text(CHAT_STREAM_JS)
    return str(where)


def test_npm_client_streams_a_chat(npm_ollama, server, client):
    want = client.chat(model="tiny-chat", messages=ASK, options={"temperature": 0, "num_predict": 12})
    r = subprocess.run(["node", os.path.join(npm_ollama, "chat_stream.mjs"), server.base, json.dumps(ASK)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout)
    assert got["done"] and got["done_reason"] == "length" and got["eval_count"] == 12 and got["chunks"] > 2
    assert got["content"] == want.message.content


# -- refusals, in Ollama's error shape ----------------------------------------------------
@pytest.mark.parametrize("path,body,status,words", [
    ("/api/chat", {"model": "nothing-here", "messages": ASK}, 404, "nothing-here"),
    ("/api/chat", {"messages": ASK}, 400, "model"),
    ("/api/chat", {"model": "tiny-chat", "messages": ASK, "options": {"temperature": "hot"}}, 400,
     "options.temperature"),
    ("/api/chat", {"model": "tiny-chat", "messages": ASK, "options": {"num_predict": 0}}, 400, "num_predict"),
    ("/api/chat", {"model": "tiny-chat", "messages": [{"role": "user", "content": "hi", "images": ["aGk="]}]},
     400, "messages[0].images"),
    ("/api/chat", {"model": "tiny-chat", "messages": ASK, "format": "yaml"}, 400, "format"),
    ("/api/chat", {"model": "tiny-chat", "messages": ASK, "keep_alive": "soon"}, 400, "keep_alive"),
    ("/api/chat", {"model": "tiny-chat", "messages": ASK, "truncate": True}, 400, "truncate"),
    ("/api/generate", {"model": "tiny-chat", "prompt": "hi", "images": ["aGk="]}, 400, "images"),
    ("/api/generate", {"model": "tiny-chat", "prompt": "hi", "template": "{{ .Prompt }}"}, 400, "template"),
    ("/api/generate", {"model": "tiny-chat", "prompt": "hi", "context": [1, 2]}, 400, "context"),
    ("/api/create", {"model": "mario", "from": "tiny-chat"}, 400, "Modelfile"),
    ("/api/push", {"model": "tiny-chat"}, 400, "registry"),
    ("/api/copy", {"source": "tiny-chat", "destination": "../x"}, 400, "destination"),
    ("/api/nothing", {}, 404, "/api/nothing"),
])
def test_refusals_say_what_is_wrong(server, path, body, status, words):
    got, data = server.json("POST", path, body)
    assert got == status and set(data) == {"error"} and words in data["error"], data


def test_a_failure_mid_stream_is_an_error_line(client):
    """The client raises what a stream's error line says."""
    with pytest.raises(ollama.ResponseError, match="context"):
        list(client.chat(model="tiny-chat", messages=[{"role": "user", "content": "word " * 3000}], stream=True))


# -- the Content-Type rule, on every face ---------------------------------------------
@pytest.mark.parametrize("path,body", [
    ("/api/generate", {"model": "tiny-chat", "prompt": "hi", "stream": False, "options": {"num_predict": 2}}),
    ("/v1/chat/completions", {"model": "tiny-chat", "messages": ASK, "max_tokens": 2}),
    ("/v1/messages", {"model": "tiny-chat", "messages": ASK, "max_tokens": 2}),
])
def test_a_body_without_json_type_is_read_only_from_programs(server, path, body):
    data = json.dumps(body).encode()
    # curl -d, and clients that send no type: no Origin, so no web page sent it.
    assert post(server.port, path, data, {})[0] == 200
    assert post(server.port, path, data, {"Content-Type": "application/x-www-form-urlencoded"})[0] == 200
    # A page of an allowed origin must send JSON as JSON: a form post needs no preflight.
    status, reply = post(server.port, path, data, {"Origin": ALLOWED,
                                                   "Content-Type": "application/x-www-form-urlencoded"})
    assert status == 415 and b"application/json" in reply
    assert post(server.port, path, data, {"Origin": ALLOWED})[0] == 415
    assert post(server.port, path, data, {"Origin": ALLOWED, "Content-Type": "application/json"})[0] == 200
    # Any other origin is refused whatever it sends.
    for ctype in ("application/json", "application/x-www-form-urlencoded", "text/plain"):
        assert post(server.port, path, data, {"Origin": "http://evil.example", "Content-Type": ctype})[0] == 403
    # Other types stay refused even from programs.
    assert post(server.port, path, data, {"Content-Type": "text/plain"})[0] == 415


# -- edgeinfer serve --ollama ---------------------------------------------------------
def test_serve_ollama_refuses_a_taken_port(tiny_model, tmp_path):
    holder = socket.socket()
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        holder.bind(("127.0.0.1", 11434))
        holder.listen()
    except OSError:
        holder.close()
        holder = None   # something (an Ollama?) holds it already: the refusal is the same
    try:
        r = subprocess.run([sys.executable, "-m", "edgeinfer", "serve", str(tiny_model), "--ollama", "--no-jsonl"],
                           capture_output=True, text=True, timeout=60,
                           env={**os.environ, "EDGEINFER_HOME": str(tmp_path), "EDGEINFER_TOKEN": ""})
        assert r.returncode != 0 and "11434" in r.stderr and "Ollama" in r.stderr, r.stderr
    finally:
        if holder is not None:
            holder.close()


def test_serve_ollama_needs_no_client_setting(files, tmp_path):
    probe = socket.socket()
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # a recent run's closed connections do not count
    try:
        probe.bind(("127.0.0.1", 11434))
        probe.listen()
    except OSError:
        pytest.skip("port 11434 is in use on this machine")
    finally:
        probe.close()
    home = import_into(tmp_path / "home", {"tiny-chat:f16": files["tiny-chat:f16"]})
    s = served._launch([sys.executable, "-m", "edgeinfer", "serve", "--ollama", "--no-jsonl", "--threads", "1"],
                       {"EDGEINFER_HOME": str(home), "EDGEINFER_TOKEN": ""},
                       lambda line: (11434, None) if "Serving " in line and ":11434" in line else None)
    try:
        assert s.port == 11434
        c = ollama.Client(timeout=60)   # the client's own default address
        assert [m.model for m in c.list().models] == ["tiny-chat:f16"]
        assert c.chat(model="tiny-chat", messages=ASK, options={"num_predict": 2}).done
    finally:
        assert s.stop() == 0
