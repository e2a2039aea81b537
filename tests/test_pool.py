"""Several models from one `edgeinfer serve`, each in a process of its own:
loaded when a request names them, unloaded when idle, a crash kept to
its model. Real server processes on loopback, with three tiny models
(different weights) in a store of the test's own."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import openai
import psutil
import pytest
from conftest import import_into, load_script
from served import start, start_http

pytestmark = pytest.mark.timeout(240)

NAMES = ("tiny-a:f16", "tiny-b:f16", "tiny-c:f16")
HELLO = [{"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """An EDGEINFER_HOME whose store holds three tiny models."""
    home = tmp_path_factory.mktemp("pool-home")
    builder = load_script("build_tiny_model")
    return import_into(home, {name: builder.build(home / f"src-{seed}.gguf", seed=seed)
                              for seed, name in enumerate(NAMES)})


@pytest.fixture(scope="module")
def server(home):
    s = start_http(None, "--n-ctx", "1024", "--parallel", "2", "--keep-alive", "10m",
                   env={"EDGEINFER_HOME": str(home), "EDGEINFER_TOKEN": ""})
    yield s
    assert s.stop() == 0


def cards(s) -> dict[str, dict]:
    status, body = s.json("GET", "/v1/models")
    assert status == 200
    return {c["id"]: c for c in body["data"]}


def ask(client, model: str, n: int = 6, **extra) -> str:
    r = client.chat.completions.create(model=model, messages=HELLO, max_tokens=n, temperature=0,
                                       extra_body={"ignore_eos": True, **extra})
    assert r.usage.completion_tokens == n and r.model == model.split(":")[0] + ":f16"
    return r.choices[0].message.content


def test_three_models_answer_in_any_order(server):
    client = server.openai()
    assert not any(c["loaded"] for c in cards(server).values())   # nothing loads before it is asked for
    first = {name: ask(client, name) for name in ("tiny-b", "tiny-a:f16", "tiny-c")}
    again = {name: ask(client, name) for name in ("tiny-c", "tiny-b", "tiny-a:f16")}
    assert first == again                          # each name reaches the same model every time
    assert len(set(first.values())) == 3           # and three different models answer
    listed = cards(server)
    assert set(listed) >= set(NAMES) and all(listed[n]["loaded"] for n in NAMES)
    pids = {listed[n]["edgeinfer"]["pid"] for n in NAMES}
    assert len(pids) == 3 and server.proc.pid not in pids and all(psutil.pid_exists(p) for p in pids)
    assert all(listed[n]["edgeinfer"]["memory_bytes"] > 0 for n in NAMES)
    # Anthropic's face and count_tokens reach the model named too.
    msg = server.anthropic().messages.create(model="tiny-a", max_tokens=4, messages=HELLO)
    assert msg.model == "tiny-a:f16" and msg.usage.output_tokens <= 4
    assert server.anthropic().messages.count_tokens(model="tiny-b", messages=HELLO).input_tokens > 3
    # edgeinfer ps asks the running server.
    out = subprocess.run([sys.executable, "-m", "edgeinfer", "ps", "--http", server.base], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    rows = {line.split()[0]: line.split() for line in out.stdout.splitlines()[1:]}
    assert set(rows) == set(NAMES) and all(r[1] == "idle" for r in rows.values()), out.stdout
    assert "in 600 s" in out.stdout or "in 599 s" in out.stdout


def test_an_unknown_model_is_a_404_naming_the_command(server):
    with pytest.raises(openai.NotFoundError) as e:
        server.openai().chat.completions.create(model="gpt-4.1", messages=HELLO, max_tokens=2)
    assert "gpt-4.1" in str(e.value) and "edgeinfer list" in str(e.value)
    status, body = server.json("GET", "/v1/models/nothing-here")
    assert status == 404
    # Several models: a request must say which.
    with pytest.raises(openai.BadRequestError, match="model is required"):
        server.openai().completions.create(model="", prompt="Hi", max_tokens=2)


def test_keep_alive_zero_unloads_and_its_memory_leaves(server):
    client = server.openai()
    ask(client, "tiny-c")
    card = cards(server)["tiny-c:f16"]["edgeinfer"]
    pid, rss = card["pid"], card["memory_bytes"]
    assert rss > 10 << 20
    ask(client, "tiny-c", keep_alive=0)
    assert not cards(server)["tiny-c:f16"]["loaded"]
    # Its process is gone: all of its memory left with it.
    deadline = time.monotonic() + 10
    while psutil.pid_exists(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    ask(client, "tiny-c")                                           # and it loads again when asked for
    assert cards(server)["tiny-c:f16"]["edgeinfer"]["loads"] == 2


def test_a_model_whose_process_dies_fails_its_request_only(server):
    client = server.openai()
    ask(client, "tiny-a")
    ask(client, "tiny-b")
    pid = cards(server)["tiny-a:f16"]["edgeinfer"]["pid"]
    other: dict = {}

    def stream_b():
        try:
            chunks = list(client.completions.create(model="tiny-b", prompt="Once", max_tokens=300, stream=True,
                                                    temperature=0, stream_options={"include_usage": True},
                                                    extra_body={"ignore_eos": True}))
            other["tokens"] = chunks[-1].usage.completion_tokens
        except Exception as e:   # noqa: BLE001 - the assertion below says what happened
            other["error"] = e

    t = threading.Thread(target=stream_b)
    t.start()
    stream = client.completions.create(model="tiny-a", prompt="Once", max_tokens=900, stream=True,
                                       extra_body={"ignore_eos": True})
    got, error = 0, None
    try:
        for _ in stream:
            got += 1
            if got == 5:
                os.kill(pid, signal.SIGKILL)   # a native crash, as far as the server can tell
    except openai.APIError as e:
        error = e
    t.join(120)
    assert error is not None and "process ended" in str(error), (got, error)
    assert got < 900
    assert other.get("tokens") == 300, other                       # the other model never noticed
    assert ask(client, "tiny-a")                                   # loaded again on the next request
    assert cards(server)["tiny-a:f16"]["edgeinfer"]["pid"] != pid


def test_busy_models_share_the_cores(home):
    """Two models busy at once each decode with half the threads; one
    busy alone gets them all back."""
    s = start_http(None, "--n-ctx", "2048", "--threads", "2", env={"EDGEINFER_HOME": str(home)})
    try:
        client = s.openai()
        ask(client, "tiny-a")
        ask(client, "tiny-b")
        seen = []

        def long(model):
            list(client.completions.create(model=model, prompt="Once", max_tokens=1500, stream=True,
                                           extra_body={"ignore_eos": True}))

        threads = [threading.Thread(target=long, args=(m,)) for m in ("tiny-a", "tiny-b")]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(t.is_alive() for t in threads):
            metrics = s.metrics()   # each model's process says what its decodes use
            seen.append(tuple(metrics.get(f'edgeinfer_model_threads{{model="{n}"}}') for n in NAMES[:2]))
            time.sleep(0.05)
        for t in threads:
            t.join(120)
        assert (1, 1) in seen, seen
        ask(client, "tiny-a")
        assert s.metrics()['edgeinfer_model_threads{model="tiny-a:f16"}'] == 2
    finally:
        assert s.stop() == 0


def test_json_lines_name_the_model_and_report_each(home):
    s = start(None, "--n-ctx", "1024", "--keep-alive", "1s", env={"EDGEINFER_HOME": str(home)})
    try:
        with s.client() as c:
            a = c.generate("Once", model="tiny-a", max_tokens=5, temperature=0, ignore_eos=True)
            b = c.generate("Once", model="tiny-b:f16", max_tokens=5, temperature=0, ignore_eos=True)
            assert a and b and a != b
            stats = c.stats()
            assert {m["name"] for m in stats["models"]} >= {"tiny-a:f16", "tiny-b:f16"}
            out = subprocess.run([sys.executable, "-m", "edgeinfer", "ps", "--port", str(s.port), "--json"],
                                 capture_output=True, text=True, timeout=60)
            assert out.returncode == 0 and {m["name"] for m in json.loads(out.stdout)} <= {"tiny-a:f16", "tiny-b:f16"}
            listed = {m["name"]: m for m in c.models()["models"]}
            assert listed["tiny-a:f16"]["loaded"] and not listed["tiny-c:f16"]["loaded"]
            with pytest.raises(Exception, match="no model named"):
                c.generate("Once", model="missing", max_tokens=2)
            # A keep-alive of 1 s: both unload soon after.
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and any(m["loaded"] for m in c.models()["models"]):
                time.sleep(0.2)
            assert not any(m["loaded"] for m in c.models()["models"])
    finally:
        assert s.stop() == 0


def test_aliases_and_any_name(home, tiny_model, tmp_path):
    (tmp_path / "config.toml").write_text('[aliases]\n"claude-3-haiku" = "tiny-c"\n"gpt-4.1" = "tiny-a"\n')
    s = start_http(tiny_model, "--alias", "gpt-4.1=tiny-b", "--any-name",
                   env={"EDGEINFER_HOME": str(home), "EDGEINFER_CONFIG": str(tmp_path)})
    try:
        client = s.openai()
        r = client.chat.completions.create(model="claude-3-haiku", messages=HELLO, max_tokens=3, temperature=0)
        assert r.model == "tiny-c:f16"                        # an alias from config.toml
        r = client.chat.completions.create(model="gpt-4.1", messages=HELLO, max_tokens=3, temperature=0)
        assert r.model == "tiny-b:f16"                        # --alias, over config.toml's
        r = client.chat.completions.create(model="davinci-002", messages=HELLO, max_tokens=3, temperature=0)
        assert r.model == "tiny.gguf"                         # any other name: the one model given
        assert json.dumps(cards(s)["gpt-4.1"]["edgeinfer"]["alias_of"]) == '"tiny-b"'
    finally:
        assert s.stop() == 0


@pytest.mark.parametrize("value, seconds", [("5m", 300.0), ("30s", 30.0), ("250ms", 0.25), ("1h", 3600.0), (0, 0.0),
                                            ("0", 0.0), (2.5, 2.5), (-1, None), ("-1", None), ("forever", None)])
def test_keep_alive_durations(value, seconds):
    from edgeinfer.server.generation import parse_keep_alive

    assert parse_keep_alive(value) == seconds


@pytest.mark.parametrize("value", ["soon", "5d", True, "1e999s", "", [5]])
def test_keep_alive_refuses_what_is_not_a_duration(value):
    from edgeinfer.errors import RequestError
    from edgeinfer.server.generation import parse_keep_alive

    with pytest.raises(RequestError, match="keep_alive must be a duration"):
        parse_keep_alive(value)


def test_a_model_that_stops_making_progress_is_ended_and_loaded_again(home):
    """A hang (here: the model's process stopped by SIGSTOP, so it neither
    steps nor answers) fails its request after the hang timeout, and the
    next request gets the model loaded afresh."""
    s = start_http(None, "--hang-timeout", "3", env={"EDGEINFER_HOME": str(home)})
    try:
        client = s.openai()
        ask(client, "tiny-b")
        pid = cards(s)["tiny-b:f16"]["edgeinfer"]["pid"]
        stream = client.completions.create(model="tiny-b", prompt="Once", max_tokens=1500, stream=True,
                                           extra_body={"ignore_eos": True})
        t0 = time.monotonic()
        with pytest.raises(openai.APIError, match="stopped making progress"):
            for i, _ in enumerate(stream):
                if i == 3:
                    os.kill(pid, signal.SIGSTOP)
        assert 3 <= time.monotonic() - t0 < 30
        assert ask(client, "tiny-b") and cards(s)["tiny-b:f16"]["edgeinfer"]["pid"] != pid
        assert any("made no progress" in line for line in s.log)
    finally:
        assert s.stop() == 0
