"""llama-server's ``POST /infill`` as editors send it, a newer request
from the same editor ending the one it has running, and the cancel that
ends a request between steps. The tiny model with Qwen2.5-Coder's FIM
tokens, served by a real process on loopback."""

from __future__ import annotations

import json
import threading
import time

import pytest

from edgeinfer.engine import Engine
from edgeinfer.fim import EditorFit
from edgeinfer.sequence import BetweenSteps
from edgeinfer.server.infill_api import parse, picked

PREFIX = "import math\n\n\ndef area(r):\n"
LINE = "    return math."
SUFFIX = "\n\n\nprint(area(2))\n"
EXTRA = [{"filename": "util.py", "text": "def double(x):\n    return 2 * x\n", "time": 12.5}]


@pytest.fixture(scope="module")
def server(tiny_fim_model, tiny_model, tmp_path_factory):
    from served import start_http

    home = tmp_path_factory.mktemp("infill-home")
    s = start_http(tiny_fim_model, "--n-ctx", "8192", "--model", str(tiny_model),
                   env={"EDGEINFER_HOME": str(home), "EDGEINFER_TOKEN": ""})
    yield s
    assert s.stop() == 0


def infill(server, body: dict, headers=None) -> tuple[int, dict]:
    return server.json("POST", "/infill", {"model": "tiny-fim.gguf", **body}, headers)


def test_llama_vims_request_is_answered_in_llama_servers_shape(server, tiny_fim_model):
    fields = ["content", "timings/prompt_n", "timings/prompt_ms", "timings/predicted_n", "tokens_cached",
              "truncated"]
    status, out = infill(server, {
        "input_prefix": PREFIX, "input_suffix": SUFFIX, "input_extra": EXTRA, "prompt": LINE, "n_predict": 16,
        "n_indent": 4, "top_k": 40, "top_p": 0.99, "stream": False, "samplers": ["top_k", "top_p", "infill"],
        "cache_prompt": True, "t_max_prompt_ms": 60_000, "t_max_predict_ms": 60_000, "response_fields": fields})
    assert status == 200, out
    assert set(out) == set(fields) and isinstance(out["content"], str)
    assert out["timings/prompt_n"] > 0 and out["tokens_cached"] >= out["timings/prompt_n"]

    # Greedy, the answer is the engine's own for the same parts.
    body = {"input_prefix": PREFIX, "input_suffix": SUFFIX, "input_extra": EXTRA, "prompt": LINE, "n_predict": 12,
            "samplers": ["temperature"], "temperature": 0}
    status, out = infill(server, body)
    assert status == 200 and out["stop"] is True and out["stop_type"] in ("eos", "limit")
    with Engine(tiny_fim_model, n_ctx=8192, threads=1) as e:
        want = e.infill(PREFIX, SUFFIX, extra=[("util.py", EXTRA[0]["text"])], middle=LINE, max_tokens=12,
                        temperature=0)
    assert out["content"] == want
    assert out["tokens_evaluated"] > out["timings"]["prompt_n"]   # the parts read a moment ago were reused

    # Streamed: the same text in pieces, then a last object with the figures.
    status, _, data = server.request("POST", "/infill", {"model": "tiny-fim.gguf", **body, "stream": True})
    events = [json.loads(line[6:]) for line in data.decode().splitlines() if line.startswith("data: ")]
    assert status == 200 and events[-1]["stop"] is True and "timings" in events[-1]
    assert "".join(e["content"] for e in events) == want


def test_warming_with_other_files_makes_the_next_request_read_only_its_own_part(server):
    extra = [{"filename": f"m{i}.py", "text": f"def f{i}(x):\n    return x + {i}\n" * 20} for i in range(4)]
    status, out = infill(server, {"input_prefix": "", "input_suffix": "", "input_extra": extra, "prompt": "",
                                  "n_predict": 0, "temperature": 0.0, "samplers": [], "t_max_prompt_ms": 1,
                                  "t_max_predict_ms": 1, "response_fields": [""]})
    assert (status, out) == (200, {})
    status, out = infill(server, {"input_prefix": "", "input_suffix": "x", "input_extra": extra,
                                  "prompt": "def g(", "n_predict": 2})
    assert status == 200, out
    assert out["timings"]["cache_n"] > 400 and out["timings"]["prompt_n"] < 40, out


def test_a_prompt_slower_than_t_max_prompt_ms_answers_empty_and_is_still_read(server):
    long_prefix = "".join(f"value_{i} = compute({i}, scale=0.5)\n" for i in range(300))
    body = {"input_prefix": long_prefix, "input_suffix": SUFFIX, "prompt": "res", "n_predict": 4}
    status, out = infill(server, {**body, "t_max_prompt_ms": 1})
    assert status == 200 and out["content"] == "" and out["stop_type"] == "none", out
    for _ in range(50):   # the prompt is read in the background, then kept
        status, out = infill(server, body)
        if out["timings"]["cache_n"] > 2000:
            break
        time.sleep(0.1)
    assert out["timings"]["cache_n"] > 2000, out


def test_a_newer_request_from_the_same_editor_ends_the_one_it_has_running(server):
    """The first request reads a long prompt; the second, from the same
    editor, comes while it does. The first reads its prompt to the end,
    then ends without a token; the second finds that prompt in the
    slot. A request from another editor ends nothing."""
    import concurrent.futures

    prefix = "".join(f"item_{i} = make({i}, kind='plain')\n" for i in range(700))

    def pair(agents: tuple[str, str]) -> tuple[dict, dict]:
        body = {"input_prefix": prefix, "input_suffix": SUFFIX, "prompt": "it", "n_predict": 4,
                "samplers": ["temperature"], "temperature": 0}
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            first = pool.submit(infill, server, body, {"User-Agent": agents[0]})
            time.sleep(0.05)
            second = infill(server, {**body, "prompt": "ite"}, {"User-Agent": agents[1]})
            return first.result()[1], second[1]

    first, second = pair(("editor-a", "editor-a"))
    assert first["stop_type"] == "none" and first["tokens_predicted"] == 0, first
    assert second["stop_type"] in ("eos", "limit") and second["timings"]["cache_n"] > 5000, second
    first, second = pair(("editor-c", "editor-d"))
    assert first["stop_type"] in ("eos", "limit") and second["stop_type"] in ("eos", "limit")


@pytest.mark.parametrize("body, param", [
    ({"mirostat": 2}, "mirostat"),
    ({"n_probs": 5}, "n_probs"),
    ({"id_slot": 1}, "id_slot"),
    ({"cache_prompt": False}, "cache_prompt"),
    ({"samplers": ["top_k", "xtc"]}, "samplers"),
    ({"samplers": ["temperature", "top_k"]}, "samplers"),
    ({"prompt": [1, 2, 3]}, "prompt"),
    ({"input_extra": [{"filename": "a.py"}]}, "input_extra[0]"),
    ({"n_indent": -1}, "n_indent"),
])
def test_what_this_server_does_not_do_is_refused_by_name(server, body, param):
    status, out = infill(server, {"input_prefix": PREFIX, "input_suffix": SUFFIX, **body})
    assert status == 400 and out["error"]["param"] == param, out
    assert param.split("[")[0] in out["error"]["message"]


def test_a_model_without_fim_tokens_says_which_to_use(server):
    status, out = server.json("POST", "/infill", {"model": "tiny.gguf", "input_prefix": PREFIX})
    assert status == 400 and "fill-in-the-middle" in out["error"]["message"], out


def test_samplers_choose_which_of_the_chain_run():
    req, _ = parse({"samplers": ["top_k", "top_p", "infill"], "top_k": 40, "top_p": 0.99, "min_p": 0.3,
                    "temperature": 0.2, "seed": -1})
    assert req.sampling == {"top_k": 40, "top_p": 0.99, "min_p": 0.0, "temperature": 1.0, "infill": 1,
                            "repeat_penalty": 1.0, "frequency_penalty": 0.0, "presence_penalty": 0.0,
                            "dry_multiplier": 0.0}
    assert req.seed is None   # -1: any seed, as llama-server reads it
    req, opts = parse({"input_prefix": "a", "prompt": "b", "n_indent": 4, "t_max_predict_ms": 250,
                       "t_max_prompt_ms": 500, "n_predict": -1})
    assert req.fit == {"indent": 4, "time_limit": 0.25} and opts["prompt_s"] == 0.5 and req.max_tokens is None
    assert req.fim_middle == "b" and req.sampling == {}


def test_response_fields_pick_paths_as_flat_keys():
    obj = {"content": "x", "timings": {"prompt_n": 3}, "stop": True}
    assert picked(obj, ["content", "timings/prompt_n", "timings/nope", ""]) == {"content": "x",
                                                                                "timings/prompt_n": 3}
    assert picked(obj, None) is obj


def test_n_indent_and_a_time_limit_end_the_answer_at_a_line():
    fit = EditorFit("    if x:\n", "", indent=8)
    given = fit.feed("        a = 1\n        b = 2\n    c = 3\n")[0]
    assert given + fit.finish() == "        a = 1\n        b = 2\n"
    now = [0.0]
    fit = EditorFit("", "", time_limit=0.5, clock=lambda: now[0])
    assert fit.feed("a = 1\nb = ") == ("a = 1", False)     # within the time: on
    now[0] = 1.0
    assert fit.feed("2") == ("", False)                     # the line is not whole yet
    assert fit.feed("\nc = 3\n") == ("\nb = 2", True)       # ended with the line being written
    assert fit.finish() == "\n"                              # the suffix has no new line of its own


def test_a_cancel_between_steps_lets_the_prompt_be_read_and_kept(tiny_model):
    with Engine(tiny_model, n_ctx=4096, n_batch=32, threads=1) as e:
        tokens = e.tokenize("one two three four five six seven eight nine ten " * 60)
        cancel = BetweenSteps()
        counters = e._scheduler.counters

        def set_when_reading():
            while counters["prefilled"] == 0:
                time.sleep(0.0005)
            cancel.set()

        watcher = threading.Thread(target=set_when_reading)
        watcher.start()
        events = list(e.stream_tokens(tokens, max_tokens=50, cancel=cancel))
        watcher.join()
        st = events[-1].stats
        assert st.finish_reason == "cancelled" and st.generated_tokens == 0
        again = list(e.stream_tokens(tokens, max_tokens=1))[-1].stats
        assert again.cached_tokens == len(tokens), again   # all was read and kept, with its last logits
