"""Malformed numbers and text get a clear refusal that names them, on
every face, and leave the connection and the engine working."""

from __future__ import annotations

import json
import re

import pytest
from served import start

from edgeinfer import RequestError
from edgeinfer.engine import DoneEvent, Engine
from edgeinfer.sampling import OPTIONS, RANGES, check_options, check_value
from edgeinfer.server.generation import MAX_JSON_CONTAINERS, MAX_JSON_DEPTH, MAX_JSON_ITEMS, load_json

NOT_FINITE = [float("nan"), float("inf"), float("-inf")]


@pytest.mark.parametrize("name", OPTIONS)
def test_every_sampling_option_refuses_what_is_not_a_finite_number(name):
    lo, hi = RANGES[name]
    for v in [*NOT_FINITE, 10 ** 400, "1", True, None]:
        for check in (lambda v: check_options({name: v}), lambda v: check_value(name, v)):
            with pytest.raises(RequestError) as info:
                check(v)
            assert info.value.param == name and isinstance(info.value, ValueError)
    for v in (lo - 1, hi + 1):   # a request over the network stays in range; the Python API may go past
        with pytest.raises(RequestError, match=re.escape(f"from {lo:g} to {hi:g}")):
            check_value(name, v)
    assert check_value(name, hi) == OPTIONS[name][0](hi)


@pytest.mark.parametrize("data, why", [
    (b'{"top_k": NaN}', "NaN"), (b'{"top_k": Infinity}', "Infinity"), (b'{"top_k": -Infinity}', "Infinity"),
    (b'{"top_k": 1e999}', "too large"), (b'{"prompt": "\\ud800"}', "surrogate"),
    (b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1), "levels deep"),
    (b'{"prompt": "\xed\xa0\x80"}', "not UTF-8"),                 # a surrogate encoded as UTF-8 bytes
    (b'{"prompt": "\xff"}', "not UTF-8"),
    (b'{"x": 1' + b"0" * 400 + b'.5}', "too large"),                # 401 digits: past a float
    (b'{"x": [' + b",".join([b"[]"] * (MAX_JSON_CONTAINERS + 1)) + b"]}", "arrays and objects"),
    (b'{"x": [' + b",".join([b"1"] * (MAX_JSON_ITEMS + 1)) + b"]}", "values"),
])
def test_strict_json(data, why):
    with pytest.raises(ValueError, match=why):
        load_json(data)


def test_what_passes_the_limits_parses_as_json_does():
    """At the counts, with floats that cannot overflow (parsed natively) and
    escaped surrogate pairs (checked, and whole)."""
    body = {"x": [[1.5, -2.25e-3, 7e99, 3]] * (MAX_JSON_CONTAINERS - 2), "p": "\U0001f600 \u00e9"}
    data = json.dumps(body).encode()              # ensure_ascii: the emoji as a \ud83d\ude00 pair
    assert b"\\ud83d" in data
    assert load_json(data) == body
    assert load_json(b"[" + b",".join([b"1"] * (MAX_JSON_ITEMS + 1)) + b"]") == [1] * (MAX_JSON_ITEMS + 1)


def test_strings_that_look_like_nesting_are_not_nesting():
    text = b'{"prompt": "' + b"[{" * 5000 + b'\\"' + b'"}'
    assert load_json(text)["prompt"].startswith("[{[{")
    assert load_json(b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH)


def test_the_python_api_refuses_them_by_name(tiny_model):
    with Engine(tiny_model, n_ctx=512, threads=1, prompt_cache=False) as e:
        for opts in ({"temperature": float("nan")}, {"top_k": float("inf")}, {"repeat_last_n": 1e999},
                     {"seed": float("inf")}, {"seed": -1}, {"max_tokens": float("nan")}, {"max_tokens": True},
                     {"stop": [1]}, {"stop": [""]}):
            with pytest.raises(RequestError, match=next(iter(opts))):
                e.generate("Hi", **{"max_tokens": 2, **opts})
        with pytest.raises(RequestError, match="surrogate"):
            e.generate("Hi \ud800", max_tokens=2)
        with pytest.raises(RequestError, match="surrogate"):
            e.chat([{"role": "user", "content": "Hi \udfff"}], max_tokens=2)
        assert isinstance(list(e.stream("Hi", max_tokens=2))[-1], DoneEvent)


def test_json_lines_answers_each_and_keeps_the_connection(tiny_model, tmp_path):
    s = start(tiny_model, env={"EDGEINFER_HOME": str(tmp_path)})
    try:
        raw = s.raw()
        bad = [b'{"id": "a", "op": "generate", "prompt": "hi", "top_k": NaN}\n',
               b'{"id": "a", "op": "generate", "prompt": "hi", "repeat_last_n": Infinity}\n',
               b'{"id": "a", "op": "generate", "prompt": "hi", "dry_last_n": 1e999}\n',
               b'{"id": "a", "op": "generate", "prompt": "hi", "dry_allowed_length": -Infinity}\n',
               b'{"id": "a", "op": "generate", "prompt": "\\ud800"}\n',
               b'{"id": "a", "op": "chat", "messages": [{"role": "user", "content": "\\udc00"}]}\n',
               b"[" * 5000 + b"]" * 5000 + b"\n"]
        for line in bad:
            raw.send(line)
            r = raw.reply()
            assert r["event"] == "error" and r["code"] in ("bad_json", "bad_request"), (line[:60], r)
        raw.send({"id": "top", "op": "generate", "prompt": "hi", "max_tokens": 2, "top_k": 1e300})
        r = raw.reply()
        assert (r["id"], r["code"]) == ("top", "bad_request") and "top_k" in r["message"]
        raw.send({"id": "ok", "op": "generate", "prompt": "hi", "max_tokens": 2})
        assert raw.until_end("ok")[-1]["event"] == "done"
    finally:
        assert s.stop() == 0


def test_http_answers_each_with_a_400_in_the_apis_shape(tiny_model, tmp_path):
    import json
    import urllib.error
    import urllib.request

    from served import start_http

    h = start_http(tiny_model, env={"EDGEINFER_HOME": str(tmp_path)})
    url = f"http://127.0.0.1:{h.port}/v1/chat/completions"
    head = b'{"model": "tiny.gguf", "max_tokens": 2, '
    try:
        for body in (head + b'"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
                     head + b'"messages": [{"role": "user", "content": "\\ud800"}]}',
                     head + b'"messages": [{"role": "user", "content": "hi"}], "top_p": 1e999}',
                     b"[" * 5000 + b"]" * 5000,
                     # over 256 KiB: read in a worker thread, refused the same way
                     head + b'"messages": [{"role": "user", "content": "' + b"x" * 300_000 + b'"}], "top_p": NaN}'):
            req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
            with pytest.raises(urllib.error.HTTPError) as info:
                urllib.request.urlopen(req, timeout=30)
            assert info.value.code == 400
            assert json.loads(info.value.read())["error"]["type"] == "invalid_request_error"
        ok = h.openai().chat.completions.create(model="tiny.gguf", max_tokens=2,
                                                messages=[{"role": "user", "content": "Hi"}])
        assert ok.choices[0].finish_reason in ("stop", "length")
    finally:
        assert h.stop() == 0
