"""`edgeinfer serve` as a real process on loopback, driven by raw sockets
and by edgeinfer's own Client and AsyncClient, on the tiny model."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
from served import start

from edgeinfer import AsyncClient, Client
from edgeinfer.errors import AuthError, ConnectionLostError, ServerBusyError, ServerError
from edgeinfer.events import DoneEvent

pytestmark = pytest.mark.timeout(240)

HELLO = [{"role": "user", "content": "Hello there"}]


def answers(c: Client, prompt: str = "hi", n: int = 2) -> str:
    """A short request that runs to its end: n tokens of text, then the
    figures (a server that only did not raise would fail here)."""
    events = list(c.stream(prompt, max_tokens=n, temperature=0, ignore_eos=True))
    done = events[-1]
    assert isinstance(done, DoneEvent), events
    assert (done.stats.finish_reason, done.stats.generated_tokens) == ("length", n)
    assert all(isinstance(e.text, str) for e in events) and len(events) >= 2
    return "".join(e.text for e in events)


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    home = tmp_path_factory.mktemp("serve-home")
    s = start(tiny_model, "--parallel", "4", "--max-line", "4096", "--n-ctx", "4096",
              env={"EDGEINFER_HOME": str(home)})
    yield s
    assert s.stop() == 0


def test_streaming_generate_and_chat(server):
    with server.client() as c:
        events = list(c.stream("The weather was", max_tokens=12, temperature=0))
        assert isinstance(events[-1], DoneEvent)
        assert events[-1].stats.finish_reason == "length" and events[-1].stats.generated_tokens == 12
        text = "".join(e.text for e in events)
        assert text and text == c.generate("The weather was", max_tokens=12, temperature=0)
        reply = c.chat(HELLO, max_tokens=8, temperature=0)
        assert reply
        assert c.health()["status"] == "ok"
        assert c.models()["loaded"] == c.models()["models"][0]["name"]


def test_several_requests_in_flight_on_one_connection(server):
    prompts = ["The weather was", "We walked to the market", "A small computer", "Quantization makes"]

    async def main():
        async with AsyncClient(port=server.port) as c:
            alone = [await c.generate(p, max_tokens=30, temperature=0) for p in prompts]
            before = (await c.stats())["steps_by_sequences"]
            together = await asyncio.gather(*(c.generate(p, max_tokens=30, temperature=0) for p in prompts))
            after = (await c.stats())["steps_by_sequences"]
            return alone, together, before, after

    alone, together, before, after = asyncio.run(main())
    assert all(together) and len(together) == 4
    multi = lambda steps: sum(n for k, n in steps.items() if int(k) >= 2)  # noqa: E731
    assert multi(after) - multi(before) >= 20  # they shared decode steps
    assert sum(a == b for a, b in zip(alone, together)) >= 1


def test_cancel_by_id_and_the_connection_goes_on(server):
    raw = server.raw()
    raw.send({"id": "long", "op": "generate", "prompt": "The weather was", "max_tokens": 3000, "ignore_eos": True})
    assert raw.reply()["event"] == "token"
    raw.send({"id": "c", "op": "cancel", "target": "long"})
    seen = []
    while not ({"long", "c"} <= {r["id"] for r in seen if r["event"] in ("done", "result")}):
        seen.append(raw.reply())
    done = next(r for r in seen if r["id"] == "long" and r["event"] == "done")
    assert done["finish_reason"] == "cancelled"
    assert next(r for r in seen if r["id"] == "c")["cancelled"] is True
    raw.send({"id": "after", "op": "generate", "prompt": "hi", "max_tokens": 3})
    assert raw.until_end("after")[-1]["event"] == "done"
    raw.close()


def test_a_client_that_disconnects_mid_stream_frees_its_sequence(tiny_model, tmp_path):
    s = start(tiny_model, "--parallel", "1", "--queue", "0", env={"EDGEINFER_HOME": str(tmp_path)})
    try:
        raw = s.raw()
        raw.send({"id": 1, "op": "generate", "prompt": "The weather was", "max_tokens": 4000, "ignore_eos": True})
        assert raw.reply()["event"] == "token"
        with s.client() as c:
            generated_at_close = c.stats()["generated_tokens"]
            raw.close()
            deadline = time.monotonic() + 60   # a guard against a hang, not a speed check
            while c.stats()["active_sequences"]:
                assert time.monotonic() < deadline, "the sequence was not freed"
                time.sleep(0.01)
            # Freed within a few steps of the hang-up, not after its 4000 tokens.
            assert c.stats()["generated_tokens"] - generated_at_close < 400
            answers(c)
    finally:
        assert s.stop() == 0


BAD = [
    (b"this is not json\n", "bad_json"),
    (b"[1, 2, 3]\n", "bad_json"),
    (b'{"id": "a", "op": "dance"}\n', "unknown_op"),
    (b'{"id": "a"}\n', "bad_request"),
    (b'{"op": "generate", "prompt": "hi"}\n', "bad_request"),
    (b'{"id": "a", "op": "generate"}\n', "bad_request"),
    (b'{"id": "a", "op": "generate", "prompt": 5}\n', "bad_request"),
    (b'{"id": "a", "op": "generate", "prompt": "hi", "max_tokens": -1}\n', "bad_request"),
    (b'{"id": "a", "op": "generate", "prompt": "hi", "max_tokens": 10000000000}\n', "bad_request"),
    (b'{"id": "a", "op": "generate", "prompt": "hi", "max_tokens": "ten"}\n', "bad_request"),
    (b'{"id": "a", "op": "generate", "prompt": "hi", "temperature": 1e308}\n', "bad_request"),
    (b'{"id": "a", "op": "generate", "prompt": "hi", "top_p": -0.5}\n', "bad_request"),
    (b'{"id": "a", "op": "generate", "prompt": "hi", "stop": [1]}\n', "bad_request"),
    (b'{"id": "a", "op": "generate", "prompt": "hi", "ignore_eos": "yes"}\n', "bad_request"),
    (b'{"id": "a", "op": "generate", "prompt": "hi", "path": "/etc/passwd"}\n', "bad_request"),
    (b'{"id": "a", "op": "chat", "messages": [{"role": "wizard", "content": "x"}]}\n', "bad_request"),
    (b'{"id": "a", "op": "chat", "messages": "hello"}\n', "bad_request"),
    (b'{"id": "a", "op": "cancel"}\n', "bad_request"),
    (b'{"id": "a", "op": "generate", "prompt": "hi", "model": "other:q8_0"}\n', "not_found"),
    (b'{"id": "a", "op": "generate", "prompt": "' + b"word " * 900 + b'"}\n', "line_too_long"),
    (b'\xff\xfe{"id": 1}\n', "bad_json"),
]


def test_every_bad_input_gets_an_error_and_the_connection_lives_on(server):
    raw = server.raw()
    for line, code in BAD:
        raw.send(line)
        r = raw.reply()
        assert (r["event"], r["code"]) == ("error", code), (line[:80], r)
        assert r["message"]
    raw.send({"id": "ok", "op": "generate", "prompt": "hi", "max_tokens": 2})
    assert raw.until_end("ok")[-1]["event"] == "done"
    raw.close()


def test_a_prompt_over_the_context_is_refused(tiny_model, tmp_path):
    s = start(tiny_model, "--n-ctx", "128", env={"EDGEINFER_HOME": str(tmp_path)})
    try:
        with s.client() as c:
            with pytest.raises(ServerError) as info:
                c.generate("the weather was mild " * 60, max_tokens=4)
            assert info.value.code == "context_overflow"
            answers(c)
    finally:
        assert s.stop() == 0


def test_http_to_the_json_lines_port_gets_one_error_line(server):
    raw = server.raw()
    raw.send(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    r = raw.reply()
    assert (r["event"], r["code"]) == ("error", "http")
    assert raw.f.readline() == b""  # and the connection is closed
    raw.close()


def test_a_token_is_required_when_set_and_beyond_loopback(tiny_model, tmp_path):
    env = {"EDGEINFER_HOME": str(tmp_path), "EDGEINFER_TOKEN": ""}
    refused = subprocess.run([sys.executable, "-m", "edgeinfer", "serve", str(tiny_model), "--host", "0.0.0.0"],
                             capture_output=True, text=True, timeout=60, env={**os.environ, **env})
    assert refused.returncode != 0
    assert "token is required" in refused.stderr and "--token-file" in refused.stderr
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-s3cret-s3cret-s3cret\n")
    token_file.chmod(0o600)
    s = start(tiny_model, "--token-file", str(token_file), env=env)
    try:
        with s.client() as c:
            with pytest.raises(AuthError):
                c.generate("hi", max_tokens=2)
        with s.client(token="wrong-wrong-wrong-wrong") as c:
            with pytest.raises(AuthError):
                c.stats()
        with s.client(token="s3cret-s3cret-s3cret-s3cret") as c:
            answers(c)
    finally:
        assert s.stop() == 0


def test_busy_when_every_sequence_and_the_queue_are_taken(tiny_model, tmp_path):
    s = start(tiny_model, "--parallel", "1", "--queue", "0", env={"EDGEINFER_HOME": str(tmp_path)})
    try:
        raw = s.raw()
        raw.send({"id": 1, "op": "generate", "prompt": "The weather was", "max_tokens": 4000, "ignore_eos": True})
        assert raw.reply()["event"] == "token"
        with s.client() as c:
            with pytest.raises(ServerBusyError) as info:
                c.generate("hi", max_tokens=2)
            assert info.value.code == "busy"
        raw.close()
    finally:
        assert s.stop() == 0


def test_sigterm_drains_what_is_in_flight_and_exits_0(tiny_model, tmp_path):
    s = start(tiny_model, env={"EDGEINFER_HOME": str(tmp_path)})
    raw = s.raw()
    raw.send({"id": 1, "op": "generate", "prompt": "The weather was", "max_tokens": 300,
              "ignore_eos": True})
    assert raw.reply()["event"] == "token"
    s.proc.send_signal(signal.SIGTERM)
    replies = raw.until_end(1)
    assert replies[-1]["event"] == "done"
    assert replies[-1]["finish_reason"] == "length"
    assert replies[-1]["stats"]["generated_tokens"] == 300  # finished, not cut off
    assert s.proc.wait(30) == 0
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", s.port), timeout=2)
    raw.close()


def test_idle_connections_time_out_and_unix_sockets_work(tiny_model, tmp_path):
    path = str(tmp_path / "ei.sock")
    s = start(tiny_model, "--host", "", "--unix", path, "--idle-timeout", "1",
              env={"EDGEINFER_HOME": str(tmp_path)})
    try:
        assert s.unix == path and oct(os.stat(path).st_mode & 0o777) == "0o600"
        with Client(unix=path) as c:
            answers(c)
            time.sleep(1.5)
            with pytest.raises(ConnectionLostError):
                c.health()
    finally:
        assert s.stop() == 0
    assert not os.path.exists(path)


def test_32_concurrent_clients_are_answered_or_told_busy(tiny_model, tmp_path):
    script = os.path.join(os.path.dirname(__file__), "..", "scripts", "load_test.py")
    proc = subprocess.run([sys.executable, script, "--model", str(tiny_model), "--clients", "32",
                           "--requests", "160", "--duration", "60", "--max-tokens", "24", "--queue", "8",
                           "--json"], capture_output=True, text=True, timeout=200,
                          env={**os.environ, "EDGEINFER_HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["requests"] == 160
    assert report["answered"] + report["errors"].get("busy", 0) == 160, report
    assert report["answered"] >= 12  # at least the sequences plus the queue were served
    assert set(report["errors"]) <= {"busy"}, report
    assert report["hung"] == 0


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_the_printed_systemd_unit_verifies(tmp_path):
    token = tmp_path / "token"
    token.write_text("x" * 32)
    for extra in ([], ["--host", "0.0.0.0", "--token-file", str(token)]):
        out = subprocess.run([sys.executable, "-m", "edgeinfer", "serve", "smollm2-135m-instruct",
                              "--print-systemd-unit", "--parallel", "2", *extra],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        unit = tmp_path / "edgeinfer.service"
        unit.write_text(out.stdout)
        assert "Restart=on-failure" in out.stdout and "MemoryMax=" in out.stdout
        assert "x" * 32 not in out.stdout  # the secret stays in its file
        check = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True,
                               timeout=60)
        problems = [line for line in check.stderr.splitlines()
                    if "edgeinfer.service" in line and "User" not in line]
        assert check.returncode == 0 and not problems, check.stderr
    refused = subprocess.run([sys.executable, "-m", "edgeinfer", "serve", "--print-systemd-unit", "--host",
                              "0.0.0.0"], capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "token" in refused.stderr


def test_a_soak_of_hundreds_of_requests_does_not_grow_the_server(tiny_model, tmp_path):
    script = os.path.join(os.path.dirname(__file__), "..", "scripts", "load_test.py")
    proc = subprocess.run([sys.executable, script, "--model", str(tiny_model), "--clients", "8",
                           "--requests", "400", "--duration", "120", "--max-tokens", "16", "--soak", "--json"],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "EDGEINFER_HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["answered"] == 400 and report["hung"] == 0, report
    assert report["rss_growth_mb"] < 16, report   # after a warm-up of 40 requests


def test_json_schema_and_grammar_over_json_lines(server):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer"}},
              "required": ["ok", "n"]}
    with server.client() as c:
        for seed in (1, 2):
            text = c.chat(HELLO, max_tokens=200, seed=seed, temperature=1.0, json_schema=schema)
            answer = json.loads(text)
            assert set(answer) == {"ok", "n"} and isinstance(answer["ok"], bool)
        assert c.generate("Answer:", max_tokens=10, grammar='root ::= "yes" | "no"') in ("yes", "no")
    raw = server.raw()
    raw.send({"id": "s", "op": "chat", "messages": HELLO, "json_schema": {"type": "number", "maximum": 3}})
    r = raw.reply()
    assert (r["event"], r["code"]) == ("error", "bad_schema") and "maximum" in r["message"]
    raw.send({"id": "g", "op": "generate", "prompt": "x", "grammar": "root ::= ["})
    assert raw.reply()["code"] == "bad_schema"
    raw.send({"id": "both", "op": "generate", "prompt": "x", "grammar": "root ::= \"a\"", "json_schema": "json"})
    assert raw.reply()["code"] == "bad_request"
    raw.send({"id": "after", "op": "generate", "prompt": "hi", "max_tokens": 2})
    assert raw.until_end("after")[-1]["event"] == "done"
    raw.close()
