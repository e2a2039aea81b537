"""Both servers in-process against the scripted engine (tests/fakes.py):
the HTTP app through httpx's ASGI transport (and through uvicorn on a
loopback port where a stream must stay open), the JSON-lines server on a
loopback port. What a real model cannot be made to do on cue is tested
here: a failure after the response headers went out, a full queue, a
drain, the error table on each face."""

from __future__ import annotations

import asyncio
import contextlib
import json

import anthropic
import httpx2
import openai
import pytest
from fakes import Hold, ScriptedEngine
from test_generation import MEANINGS

from edgeinfer.errors import EngineBusyError, EngineError
from edgeinfer.server.http import HttpFront, HttpOptions
from edgeinfer.server.jsonl import Options, Server

pytestmark = pytest.mark.timeout(60)

HELLO = [{"role": "user", "content": "Hello there"}]
WAIT = 30   # seconds before a hang fails a test; nothing here should come near it


# -- harnesses ------------------------------------------------------------------
@contextlib.asynccontextmanager
async def http_app(engine):
    """An httpx client talking to the HTTP app in-process."""
    front = HttpFront(engine, HttpOptions(port=0))
    async with httpx2.AsyncClient(transport=httpx2.ASGITransport(front.app), base_url="http://127.0.0.1",
                                  timeout=WAIT) as client:
        yield client


def sse_data(body: str) -> list:
    return [line[6:] for line in body.split("\n") if line.startswith("data: ")]


class Lines:
    """A raw JSON-lines connection."""

    def __init__(self, reader, writer):
        self.reader, self.writer = reader, writer

    async def send(self, obj) -> None:
        self.writer.write((json.dumps(obj) + "\n").encode())
        await self.writer.drain()

    async def reply(self) -> dict:
        line = await asyncio.wait_for(self.reader.readline(), WAIT)
        assert line, "the server closed the connection"
        return json.loads(line)

    async def until_end(self, rid) -> list[dict]:
        out = []
        while True:
            r = await self.reply()
            if r.get("id") == rid:
                out.append(r)
                if r["event"] in ("done", "error", "result"):
                    return out

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


@contextlib.asynccontextmanager
async def jsonl_server(engine, **opts):
    server = Server(engine, Options(port=0, **opts))
    where = await server.start()
    port = int(where[0].rsplit(":", 1)[1])
    conn = Lines(*await asyncio.open_connection("127.0.0.1", port))
    try:
        yield server, conn
    finally:
        await conn.close()
        await server.stop()


# -- a failure after the headers ------------------------------------------------
def test_an_openai_stream_that_fails_midway_ends_with_an_error_event():
    engine = ScriptedEngine()
    engine.enqueue("Hel", "lo", EngineError("llama_decode failed"))
    engine.enqueue("Hel", EngineError("llama_decode failed"))

    async def main():
        async with http_app(engine) as client:
            r = await client.post("/v1/chat/completions", json={"messages": HELLO, "stream": True})
            assert r.status_code == 200   # the headers went out with the first event
            data = sse_data(r.text)
            assert [json.loads(d)["choices"][0]["delta"].get("content") for d in data[1:3]] == ["Hel", "lo"]
            assert json.loads(data[-2])["error"]["type"] == "server_error"
            assert "llama_decode failed" in json.loads(data[-2])["error"]["message"]
            assert data[-1] == "[DONE]"
            # The official client raises it rather than ending quietly.
            oa = openai.AsyncOpenAI(base_url="http://127.0.0.1/v1", api_key="x", http_client=client, max_retries=0)
            stream = await oa.chat.completions.create(model="fake-model", messages=HELLO, stream=True)
            with pytest.raises(openai.APIError, match="llama_decode failed"):
                async for _ in stream:
                    pass

    asyncio.run(main())


def test_an_anthropic_stream_that_fails_midway_ends_with_an_error_event():
    engine = ScriptedEngine()
    engine.enqueue("Hel", EngineBusyError("the queue was full"))
    engine.enqueue("Hel", EngineError("llama_decode failed"))

    async def main():
        async with http_app(engine) as client:
            r = await client.post("/v1/messages", json={"model": "fake-model", "max_tokens": 5, "stream": True,
                                                        "messages": HELLO})
            assert r.status_code == 200
            events = [line[7:] for line in r.text.split("\n") if line.startswith("event: ")]
            assert events == ["message_start", "content_block_start", "content_block_delta", "error"]
            assert json.loads(sse_data(r.text)[-1])["error"]["type"] == "rate_limit_error"
            ac = anthropic.AsyncAnthropic(base_url="http://127.0.0.1", api_key="x", http_client=client,
                                          max_retries=0)
            with pytest.raises(anthropic.APIError, match="llama_decode failed"):
                async with ac.messages.stream(model="fake-model", max_tokens=5, messages=HELLO) as stream:
                    async for _ in stream.text_stream:
                        pass

    asyncio.run(main())


def test_a_json_lines_stream_that_fails_midway_ends_with_an_error():
    engine = ScriptedEngine()
    engine.enqueue("Hel", EngineError("llama_decode failed"))

    async def main():
        async with jsonl_server(engine) as (_, conn):
            await conn.send({"id": "r", "op": "generate", "prompt": "hi"})
            replies = await conn.until_end("r")
            assert [r["event"] for r in replies] == ["token", "error"]
            assert replies[-1]["code"] == "internal" and "llama_decode failed" in replies[-1]["message"]
            await conn.send({"id": "after", "op": "generate", "prompt": "hi"})   # the connection lives on
            assert (await conn.until_end("after"))[-1]["event"] == "done"

    asyncio.run(main())


# -- the error table on both faces ---------------------------------------------
@pytest.mark.parametrize("exc, code, status, openai_type, anthropic_type", MEANINGS,
                         ids=[type(m[0]).__name__ for m in MEANINGS])
def test_one_failure_means_the_same_on_both_faces(exc, code, status, openai_type, anthropic_type):
    engine = ScriptedEngine()
    for _ in range(4):
        engine.enqueue(exc)

    async def main():
        async with http_app(engine) as client:
            for stream in (False, True):   # before the first event, so a status either way
                r = await client.post("/v1/chat/completions", json={"messages": HELLO, "stream": stream})
                assert (r.status_code, r.json()["error"]["type"]) == (status, openai_type)
                assert ("retry-after" in r.headers) == (status in (429, 503))
            r = await client.post("/v1/messages", json={"model": "fake-model", "max_tokens": 5, "messages": HELLO})
            assert (r.status_code, r.json()["error"]["type"]) == (status, anthropic_type)
        async with jsonl_server(engine) as (_, conn):
            await conn.send({"id": 1, "op": "chat", "messages": HELLO})
            r = await conn.reply()
            assert (r["event"], r["code"]) == ("error", code)

    asyncio.run(main())
    assert not engine._scripts   # every face ran it


# -- busy ------------------------------------------------------------------------
def test_busy_is_a_429_with_retry_after_and_busy_over_json_lines():
    engine = ScriptedEngine()
    for _ in range(3):
        engine.enqueue(EngineBusyError("every sequence is taken and the queue is full"))

    async def main():
        async with http_app(engine) as client:
            for path, body in (("/v1/completions", {"prompt": "hi"}),
                               ("/v1/messages", {"model": "fake-model", "max_tokens": 2, "messages": HELLO})):
                r = await client.post(path, json=body)
                assert r.status_code == 429 and r.headers["retry-after"].isdigit()
                assert "queue is full" in r.text
        async with jsonl_server(engine) as (_, conn):
            await conn.send({"id": 1, "op": "generate", "prompt": "hi"})
            assert (await conn.reply())["code"] == "busy"

    asyncio.run(main())


# -- draining --------------------------------------------------------------------
def test_json_lines_drains_on_stop():
    engine = ScriptedEngine()
    hold = Hold()
    engine.enqueue("a", hold, "b", finish="length")

    async def main():
        async with jsonl_server(engine) as (server, conn):
            await conn.send({"id": "long", "op": "generate", "prompt": "hi"})
            assert (await conn.reply())["text"] == "a"
            stopping = asyncio.ensure_future(server.stop())
            await conn.send({"id": "late", "op": "generate", "prompt": "hi"})
            late = await conn.until_end("late")
            assert late[-1]["code"] == "shutting_down"
            assert not stopping.done()   # still waiting for the request in flight
            hold.release()
            replies = await conn.until_end("long")
            assert [r.get("text") for r in replies] == ["b", None]
            assert replies[-1]["finish_reason"] == "length" and replies[-1]["stats"]["generated_tokens"] == 2
            await asyncio.wait_for(stopping, WAIT)

    asyncio.run(main())
    assert engine.closed_early == 0


def test_http_drains_a_stream_on_stop():
    engine = ScriptedEngine()
    hold = Hold()
    engine.enqueue("a", hold, "b")

    async def main():
        front = HttpFront(engine, HttpOptions(port=0, drain_timeout=WAIT))
        await front.start()
        stopping = None
        try:
            async with httpx2.AsyncClient(base_url=f"http://127.0.0.1:{front.port}", timeout=WAIT) as client:
                async with client.stream("POST", "/v1/completions",
                                         json={"prompt": "hi", "stream": True}) as r:
                    lines = r.aiter_lines()
                    first = await anext(lines)
                    assert json.loads(first[6:])["choices"][0]["text"] == "a"
                    stopping = asyncio.ensure_future(front.stop())
                    while not front.stopping:
                        await asyncio.sleep(0)
                    hold.release()
                    rest = [line async for line in lines]
            assert json.loads(sse_data("\n".join(rest))[0])["choices"][0]["text"] == "b"
            assert sse_data("\n".join(rest))[-1] == "[DONE]"
            await asyncio.wait_for(stopping, WAIT)
        finally:
            if stopping is None:
                await front.stop()
        # A stopped server takes nothing new.
        assert front.stopping
        async with httpx2.AsyncClient(transport=httpx2.ASGITransport(front.app), base_url="http://127.0.0.1") as c:
            r = await c.post("/v1/completions", json={"prompt": "hi"})
            assert r.status_code == 503 and "retry-after" in r.headers

    asyncio.run(main())
    assert engine.closed_early == 0


def test_a_cancelled_json_lines_request_closes_its_stream():
    engine = ScriptedEngine()
    engine.enqueue("a", Hold())

    async def main():
        async with jsonl_server(engine) as (_, conn):
            await conn.send({"id": "long", "op": "generate", "prompt": "hi"})
            assert (await conn.reply())["event"] == "token"
            await conn.send({"id": "c", "op": "cancel", "target": "long"})
            seen = []
            while {"long", "c"} - {r["id"] for r in seen if r["event"] in ("done", "result")}:
                seen.append(await conn.reply())
            assert next(r for r in seen if r["id"] == "long")["finish_reason"] == "cancelled"

    asyncio.run(main())
    assert engine.closed_early == 1


# -- one request model -----------------------------------------------------------
def test_both_faces_accept_the_model_name_without_its_tag():
    engine = ScriptedEngine(name="fake-model:q4_0")

    async def main():
        async with http_app(engine) as client:
            for model, status in (("fake-model", 200), ("fake-model:q4_0", 200), ("fake-model:q8_0", 404)):
                r = await client.post("/v1/chat/completions", json={"model": model, "messages": HELLO})
                assert r.status_code == status, (model, r.text)
                r = await client.post("/v1/messages", json={"model": model, "max_tokens": 3, "messages": HELLO})
                assert r.status_code == status, (model, r.text)
        async with jsonl_server(engine) as (_, conn):
            for model, event in (("fake-model", "done"), ("fake-model:q4_0", "done"), ("fake-model:q8_0", "error")):
                await conn.send({"id": model, "op": "generate", "prompt": "hi", "model": model})
                assert (await conn.until_end(model))[-1]["event"] == event, model

    asyncio.run(main())


def test_what_each_face_asks_of_the_engine():
    engine = ScriptedEngine(n_ctx=512, n_seq_max=2)

    async def main():
        async with http_app(engine) as client:
            await client.post("/v1/chat/completions", json={
                "messages": HELLO, "stop": "x", "seed": (1 << 32) + 5, "temperature": 0, "top_k": -1,
                "ignore_eos": True, "speculative": "off"})
            await client.post("/v1/completions", json={"prompt": "hi"})
            await client.post("/v1/messages", json={"model": "fake-model", "max_tokens": 100_000,
                                                    "messages": HELLO, "stop_sequences": ["y"], "top_k": 3})
        async with jsonl_server(engine) as (_, conn):
            await conn.send({"id": 1, "op": "generate", "prompt": "hi", "max_tokens": 512, "temperature": 0})
            await conn.until_end(1)

    asyncio.run(main())
    chat, completion, message, line = engine.calls
    assert (chat["stop"], chat["seed"], chat["temperature"], chat["top_k"], chat["ignore_eos"],
            chat["speculative"], chat["max_tokens"]) == (["x"], 5, 0.0, 0, True, "off", 256)
    assert completion["max_tokens"] == 16 and completion["stop"] == []
    assert message["max_tokens"] == 512 - len(message["tokens"]) and message["stop"] == ["y"]
    assert line["max_tokens"] == 512 - len(line["tokens"]) and line["temperature"] == 0.0


def test_unsupported_fields_are_refused_by_name():
    engine = ScriptedEngine()
    image = {"type": "image_url", "image_url": {"url": "data:,"}}

    async def main():
        async with http_app(engine) as client:
            for body, param in (({"n": 99}, "n"), ({"tools": [{"type": "function"}]}, "tools[0]"),
                                ({"top_logprobs": 2}, "top_logprobs"), ({"best_of": 2}, "best_of"),
                                ({"messages": [{"role": "user", "content": [image]}]}, "messages[0].content")):
                r = await client.post("/v1/chat/completions", json={"messages": HELLO, **body})
                assert (r.status_code, r.json()["error"]["param"]) == (400, param), r.text
            r = await client.post("/v1/completions", json={"prompt": "x", "suffix": "}"})
            assert (r.status_code, r.json()["error"]["param"]) == (400, "suffix")
            r = await client.post("/v1/messages", json={"model": "fake-model", "max_tokens": 3, "messages": [
                {"role": "user", "content": [{"type": "image", "source": {}}]}]})
            assert r.status_code == 400 and "images are not supported" in r.json()["error"]["message"]
        async with jsonl_server(engine) as (_, conn):
            await conn.send({"id": 1, "op": "generate", "prompt": "hi", "tools": []})
            r = await conn.reply()
            assert r["code"] == "bad_request" and "tools" in r["message"]

    asyncio.run(main())
    assert engine.calls == []   # none of them reached the engine


def test_the_stop_limit_reads_the_same_on_both_faces():
    engine = ScriptedEngine()
    too_many = ["s"] * 17

    async def main():
        async with http_app(engine) as client:
            r = await client.post("/v1/chat/completions", json={"messages": HELLO, "stop": too_many})
            http_message = r.json()["error"]["message"]
        async with jsonl_server(engine) as (_, conn):
            await conn.send({"id": 1, "op": "generate", "prompt": "hi", "stop": too_many})
            line_message = (await conn.reply())["message"]
        return http_message, line_message

    http_message, line_message = asyncio.run(main())
    assert http_message == line_message and "at most 16" in http_message


def test_a_request_that_never_finishes_arriving_is_disconnected():
    """Headers trickled one byte at a time, or a body shorter than its
    Content-Length: the connection is closed at the read deadline, and a
    whole request on another connection is answered meanwhile."""
    engine = ScriptedEngine()

    async def main():
        front = HttpFront(engine, HttpOptions(port=0, read_timeout=0.5))
        await front.start()
        try:
            slow_head = await asyncio.open_connection("127.0.0.1", front.port)
            slow_body = await asyncio.open_connection("127.0.0.1", front.port)
            slow_head[1].write(b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nX-A: ")
            slow_body[1].write(b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\n"
                               b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
            async with httpx2.AsyncClient(base_url=f"http://127.0.0.1:{front.port}", timeout=WAIT) as client:
                assert (await client.post("/v1/completions", json={"prompt": "hi"})).status_code == 200
            for reader, writer in (slow_head, slow_body):
                try:   # keep trickling: it is the deadline, not idleness, that ends it
                    for _ in range(10):
                        writer.write(b"a")
                        await writer.drain()
                        await asyncio.sleep(0.1)
                except ConnectionError:
                    pass
                try:   # closed by the server: an end of stream, or a reset (a hang fails at WAIT)
                    assert await asyncio.wait_for(reader.read(), WAIT) == b""
                except ConnectionError:
                    pass
                writer.close()
        finally:
            await front.stop()

    asyncio.run(main())
