"""The request model every face shares (edgeinfer/server/generation.py),
without a model: limits, the model-name check, the error table, and run()
against the scripted engine."""

from __future__ import annotations

import ast
import asyncio
from pathlib import Path

import pytest
from fakes import ScriptedEngine

from edgeinfer import errors
from edgeinfer.events import DoneEvent, TextEvent
from edgeinfer.server import api, generation, protocol
from edgeinfer.server.generation import (
    MAX_STOP_CHARS,
    MAX_STOPS,
    GenerationRequest,
    ModelNotServedError,
    RequestError,
    StoppingError,
)

# What each exception must mean, written out here rather than read from
# the table, so a wrong row fails: (JSON-lines code, HTTP status, OpenAI
# type, Anthropic type).
MEANINGS = [
    (errors.EngineError("llama_decode failed"), "internal", 500, "server_error", "api_error"),
    (errors.ContextOverflowError("too long"), "context_overflow", 400, "invalid_request_error",
     "invalid_request_error"),
    (errors.EngineBusyError("queue full"), "busy", 429, "rate_limit_error", "rate_limit_error"),
    (errors.ServerBusyError("queue full", "busy"), "busy", 429, "rate_limit_error", "rate_limit_error"),
    (errors.GrammarError("no maximum"), "bad_schema", 400, "invalid_request_error", "invalid_request_error"),
    (errors.TemplateError("hostile template"), "bad_request", 400, "invalid_request_error",
     "invalid_request_error"),
    (errors.SpeculativeError("needs a draft model"), "bad_request", 400, "invalid_request_error",
     "invalid_request_error"),
    (errors.NativeSettingError("no such setting"), "internal", 500, "server_error", "api_error"),
    (errors.EdgeinferError("refused"), "bad_request", 400, "invalid_request_error", "invalid_request_error"),
    (RequestError("stop", "stop: too many"), "bad_request", 400, "invalid_request_error", "invalid_request_error"),
    (ModelNotServedError("not this one"), "not_found", 404, "not_found_error", "not_found_error"),
    (StoppingError("stopping"), "shutting_down", 503, "server_error", "overloaded_error"),
    (RuntimeError("a bug"), "internal", 500, "server_error", "api_error"),
]


@pytest.mark.parametrize("exc, code, status, openai_type, anthropic_type", MEANINGS,
                         ids=[type(m[0]).__name__ for m in MEANINGS])
def test_each_exception_means_one_thing_on_every_face(exc, code, status, openai_type, anthropic_type):
    m = generation.meaning(exc)
    assert m.code == code and m.code in protocol.CODES
    err = api.api_error_from(exc)
    assert err.status == status
    assert err.openai_body()["error"]["type"] == openai_type
    assert err.anthropic_body()["error"]["type"] == anthropic_type
    assert generation.message(exc) in str(err)
    assert bool(err.headers().get("Retry-After")) == (status in (429, 503))


def test_the_table_reads_most_specific_first():
    # No row is hidden behind an earlier row for one of its base classes.
    classes = [cls for cls, _ in generation.ERRORS]
    for i, cls in enumerate(classes):
        assert not any(issubclass(cls, earlier) for earlier in classes[:i]), cls
    assert generation.meaning(RequestError("top_p", "top_p: out of range")).param == "top_p"
    assert generation.meaning(errors.ContextOverflowError("x")).api_code == "context_length_exceeded"


def test_stop_limits_are_one_rule():
    assert generation.check_stops(None) == [] and generation.check_stops("x") == ["x"]
    assert generation.check_stops(["a"] * MAX_STOPS) == ["a"] * MAX_STOPS
    for bad in (["a"] * (MAX_STOPS + 1), ["x" * (MAX_STOP_CHARS + 1)], [""], [1], {"a": 1}):
        with pytest.raises(RequestError) as info:
            generation.check_stops(bad, "stop_sequences")
        assert info.value.param == "stop_sequences" and "stop_sequences" in str(info.value)


def test_a_model_is_named_with_or_without_its_tag():
    generation.check_model("smollm2-135m-instruct:q4_1", "smollm2-135m-instruct:q4_1")
    generation.check_model("smollm2-135m-instruct:q4_1", "smollm2-135m-instruct")
    generation.check_model("tiny.gguf", None)
    for other in ("smollm2-135m-instruct:q8_0", "smollm2", "gpt-4o"):
        with pytest.raises(ModelNotServedError):
            generation.check_model("smollm2-135m-instruct:q4_1", other)
    with pytest.raises(RequestError, match="model is required"):
        generation.check_model("tiny.gguf", None, required=True)
    with pytest.raises(RequestError, match="must be a string"):
        generation.check_model("tiny.gguf", 5)


class _Store:
    def __init__(self, refs=(), fail=False):
        self.refs, self.fail = refs, fail

    def list(self):
        if self.fail:
            raise errors.StoreError("unreadable")
        return [type("M", (), {"ref": r}) for r in self.refs]


def test_the_model_list_is_the_served_one_then_the_store():
    assert generation.model_names("a:q4", _Store(["b:q8", "a:q4", "c:q4"])) == ["a:q4", "b:q8", "c:q4"]
    assert generation.model_names("a:q4", _Store(fail=True)) == ["a:q4"]
    assert generation.model_names("a:q4", None) == ["a:q4"]


def test_a_request_has_one_prompt_and_refuses_what_is_not_supported():
    with pytest.raises(TypeError):
        GenerationRequest()
    with pytest.raises(TypeError):
        GenerationRequest(prompt="x", tokens=[1])
    GenerationRequest(prompt="x").refuse_unsupported()
    for name, value in (("n", 2), ("images", [{"type": "image"}])):
        req = GenerationRequest(prompt="x", **{name: value})
        with pytest.raises(RequestError) as info:
            req.refuse_unsupported({"images": "messages[0].content"})
        assert info.value.param == ("messages[0].content" if name == "images" else name)
        assert str(info.value).startswith(info.value.param + ":")
    # run() refuses it too, so a face that forgot still never ignores one.
    with pytest.raises(RequestError):
        asyncio.run(generation.run(ScriptedEngine(), GenerationRequest(prompt="x", n=3)))


async def _events(engine, req):
    run = await generation.run(engine, req)
    return run, [ev async for ev in run]


def test_run_renders_fits_and_streams():
    engine = ScriptedEngine(n_ctx=512, n_seq_max=4)
    engine.enqueue("Hel", "lo", finish="length")
    run, events = asyncio.run(_events(engine, GenerationRequest(
        messages=[{"role": "user", "content": "hi"}], prefill="Sure", max_tokens=10_000, stop=["\n"], seed=7,
        sampling={"temperature": 0.0}, speculative="off", ignore_eos=True)))
    assert [type(e) for e in events] == [TextEvent, TextEvent, DoneEvent]
    assert "".join(e.text for e in events) == "Hello" and events[-1].stats.finish_reason == "length"
    call = engine.calls[0]
    # The template's tokens, then the prefill's without a BOS.
    assert call["tokens"] == engine.chat_tokens([{"role": "user", "content": "hi"}]) + \
        engine.tokenize("Sure", add_bos=False) == run.tokens
    assert call["max_tokens"] == 512 - len(run.tokens) == run.max_tokens   # what the context has left
    assert (call["stop"], call["seed"], call["temperature"], call["speculative"], call["ignore_eos"],
            call["grammar"]) == (["\n"], 7, 0.0, "off", True, None)


def test_an_unset_max_tokens_is_a_fair_share_of_the_context():
    big, small = ScriptedEngine(n_ctx=4096, n_seq_max=4), ScriptedEngine(n_ctx=512, n_seq_max=4)
    for engine in (big, small):
        asyncio.run(_events(engine, GenerationRequest(prompt="hi")))
    assert big.calls[0]["max_tokens"] == 4096 // 4
    assert small.calls[0]["max_tokens"] == 256   # never less than 256, where the context has room


def test_token_ids_out_of_the_vocabulary_are_a_bad_request():
    engine = ScriptedEngine(n_vocab=100)
    with pytest.raises(RequestError) as info:
        asyncio.run(_events(engine, GenerationRequest(tokens=[1, 100])))
    assert info.value.param == "prompt" and "0 to 99" in str(info.value)
    assert engine.calls == []


def test_the_server_modules_import_one_way():
    """No import circle among edgeinfer/server's modules (lazy imports
    inside functions count too)."""
    root = Path(generation.__file__).parent
    deps = {}
    for path in root.glob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                names |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
        deps[path.stem] = names & {p.stem for p in root.glob("*.py")}

    def reach(mod, path):
        for d in deps[mod]:
            assert d not in path, f"import circle: {' -> '.join([*path, d])}"
            reach(d, [*path, d])

    for mod in deps:
        reach(mod, [mod])
    assert deps["generation"] == set()   # the request model needs no face
    assert "http" not in deps["api"] | deps["openai_api"] | deps["anthropic_api"] | deps["fields"]
