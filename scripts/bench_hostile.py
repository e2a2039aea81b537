#!/usr/bin/env python
"""What the worst requests cost `edgeinfer serve`: event-loop time and memory.

Starts a real `edgeinfer serve` (JSON lines and HTTP, on loopback) and,
while a probe sends a JSON-lines `health` op every 2 ms on a connection of
its own, sends each hostile request on a fresh connection and waits for
its answer. Every request is built at the limits the server's code sets
(the constants are imported from edgeinfer, not copied): a line at and
past --max-line, JSON nested to the depth limit and past it, a megabyte
of numbers, grammars and schemas at the counts, nesting and element
limits of grammar_cost and just past them, HTTP bodies at and past
--max-body and on either side of the size parsed on the event loop.

Per case:
- stall: the longest probe round trip that overlapped the case (from
  sending it to 150 ms after its answer) less the median round trip of the
  quiet 300 ms before it: how long the event loop every client shares was
  held up;
- RSS (VmRSS) of the server before and after, and how far its peak rose
  (VmHWM, reset to the current RSS before each case through
  /proc/PID/clear_refs so each case gets its own peak; where that is not
  allowed, the rise of the never-falling VmHWM, which hides a peak below an
  earlier one);
- the answer, which must be in the protocol's shape: an error event with a
  known code (never `internal`), a done event, an HTTP 4xx in the OpenAI
  error shape, or a normal completion. A case whose answer differs from the
  one expected is flagged too.

The target is at most 100 ms of event-loop stall and 100 MB of memory per
request (MB here: 2^20 bytes). Stalls are wall time on a shared machine:
other processes inflate them, so compare the median column over --repeat
runs, and the load average printed at the top and bottom.

By default it builds the tiny test model (scripts/build_tiny_model.py) in
a temporary EDGEINFER_HOME, which is removed at the end; --model serves a
store model (or a GGUF path) from the user's own store instead.

    python scripts/bench_hostile.py --repeat 3
    python scripts/bench_hostile.py --model smollm2-135m-instruct --only http --json
"""

from __future__ import annotations

import argparse
import bisect
import collections
import ctypes
import http.client
import importlib.util
import json
import os
import queue
import re
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from edgeinfer.grammar_cost import MAX_COUNT, MAX_ELEMENTS, MAX_NESTING
from edgeinfer.server.defaults import DEFAULT_MAX_BODY, DEFAULT_MAX_LINE
from edgeinfer.server.generation import MAX_JSON_CONTAINERS, MAX_JSON_DEPTH, MAX_JSON_ITEMS
from edgeinfer.server.protocol import CODES, MAX_MESSAGES

HERE = Path(__file__).resolve().parent
MB = 1 << 20

PROBE_INTERVAL_S = 0.002
QUIET_S = 0.3          # probes before each case: its baseline round trip
SETTLE_S = 0.15        # after the answer: frees and late work still count against the case
CASE_TIMEOUT_S = 120.0
START_TIMEOUT_S = 120.0
STALL_BOUND_MS = 100.0
MEMORY_BOUND_MB = 100.0
# edgeinfer/grammar.py _check_schema: a schema nested deeper than this is refused
# (a literal there, not a constant).
SCHEMA_DEPTH = 64
# Optional properties the schema converter still turns into a grammar: it
# recurses once per property and costs about 1.5 s of pure Python at 990
# here; 1,000 raise RecursionError (refused as bad_schema).
OPTIONAL_PROPERTIES = 960

FINISH_REASONS = ("stop", "length", "repetition", "cancelled")
GENERATED = ("done:length", "done:stop")     # a grammar may let the tiny model end after one token
COMPLETED = ("200 length", "200 stop")
TEXT = b"The sky is blue and the grass is green. "

log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731


def limits() -> dict:
    """Every limit the cases are built on, as the server's code sets it."""
    from edgeinfer.grammar import MAX_GRAMMAR_BYTES, MAX_SCHEMA_BYTES  # loads llama.cpp's bindings

    return {"max_line": DEFAULT_MAX_LINE, "max_body": DEFAULT_MAX_BODY,
            "max_containers": MAX_JSON_CONTAINERS, "max_items": MAX_JSON_ITEMS,
            "max_json_depth": MAX_JSON_DEPTH, "max_messages": MAX_MESSAGES, "max_count": MAX_COUNT,
            "max_nesting": MAX_NESTING, "max_elements": MAX_ELEMENTS, "max_schema_bytes": MAX_SCHEMA_BYTES,
            "max_grammar_bytes": MAX_GRAMMAR_BYTES, "schema_depth": SCHEMA_DEPTH}


# -- the cases ---------------------------------------------------------------------
@dataclass
class Case:
    """One hostile request: ``face`` is jsonl, http or http-chunked (an
    HTTP body without Content-Length); ``expect`` the answers it should get
    (labels as :func:`jsonl_answer` and :func:`http_answer` give them)."""

    name: str
    face: str
    build: Callable[[], bytes]     # the line (with its newline) or the body
    expect: tuple[str, ...]


def fit(head: bytes, unit: bytes, tail: bytes, size: int, sep: bytes = b",") -> bytes:
    """head, as many copies of unit (joined by sep) as fit, tail: at most
    ``size`` bytes in all."""
    room = size - len(head) - len(tail)
    n = max(0, (room + len(sep)) // (len(unit) + len(sep)))
    return head + sep.join([unit] * n) + tail


def exactly(head: bytes, unit: bytes, tail: bytes, size: int) -> bytes:
    """head, copies of unit, 'a's to make up the rest, tail: ``size`` bytes."""
    out = fit(head, unit, tail, size, b"")
    return out[:-len(tail)] + b"a" * (size - len(out)) + tail


def dumps(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def line(obj) -> bytes:
    return dumps(obj) + b"\n"


def padded(obj: dict, key: str, pad: str, size: int, newline: bool = True) -> bytes:
    """``obj`` with ``pad`` appended to ``obj[key]`` as often as fits in
    ``size`` bytes."""
    base = len(dumps(obj)) + newline
    k = max(0, (size - base) // (len(dumps(pad)) - 2))   # pad as JSON writes it, without its quotes
    return dumps({**obj, key: obj[key] + pad * k}) + (b"\n" if newline else b"")


def nested_arrays(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def nested_objects(depth: int) -> bytes:
    return b'{"a":' * (depth - 1) + b"{}" + b"}" * (depth - 1)


def nested_schema(depth: int) -> dict:
    """An array of arrays ``depth`` levels below the root."""
    node: dict = {"type": "integer"}
    for _ in range(depth):
        node = {"type": "array", "items": node}
    return node


def optional_properties(n: int) -> dict:
    return {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(n)}}


def enum_schema(size: int) -> dict:
    """An enum whose JSON, as the server measures it (json.dumps with its
    default separators), is as close to ``size`` bytes as the values allow."""
    values, total = [], len(json.dumps({"enum": []}))
    i = 0
    while True:
        v = f"v{i:06d}"
        if total + len(v) + 4 > size:          # '"v000001", '
            return {"enum": values}
        values.append(v)
        total += len(v) + 4
        i += 1


def cases(lim: dict) -> list[Case]:
    L, B = lim["max_line"], lim["max_body"]
    C, V = lim["max_containers"], lim["max_items"]
    D = lim["max_json_depth"]
    gen = {"id": "c", "op": "generate", "prompt": "Hi", "max_tokens": 2, "temperature": 0}
    gen_head = dumps(gen)[:-1] + b","          # '{"id":"c",...,"temperature":0,'
    prompt_head = b'{"id":"c","op":"generate","max_tokens":1,"prompt":"'

    def gen_with(**kw) -> bytes:
        return line({**gen, **kw})

    def jsonl_field(unit: bytes, size: int = L, sep: bytes = b",") -> bytes:
        """A generate line whose unknown field x holds copies of unit: all of
        it is parsed before the field is refused (bad_request)."""
        return fit(gen_head + b'"x":[', unit, b"]}\n", size, sep)

    # The request object is one level and x's list another, so groups of
    # D - 2 levels bring the line to exactly D.
    group_depth = D - 2
    out = [
        # -- JSON lines: size, nesting, numbers, messages ----------------------------
        # A line of L bytes with its newline is under the limit; L + 1 and a newline past it.
        Case(f"jsonl prompt text, line of {L:,} B", "jsonl", lambda: exactly(prompt_head, TEXT, b'"}\n', L),
             ("error:context_overflow",)),
        Case("jsonl prompt text, 1 B past the line limit", "jsonl",
             lambda: exactly(prompt_head, TEXT, b'"}\n', L + 2), ("error:line_too_long",)),
        Case("jsonl line 16x past the line limit", "jsonl",
             lambda: b'{"id":"c","op":"generate","prompt":"' + b"a" * (16 * L) + b'"}\n', ("error:line_too_long",)),
        Case("jsonl prompt of escaped quotes to 1 MiB", "jsonl",
             lambda: fit(prompt_head, b'\\"', b'"}\n', L, b""),
             ("error:context_overflow",)),
        Case(f"jsonl arrays nested {D} deep, repeated to 1 MiB", "jsonl",
             lambda: jsonl_field(nested_arrays(group_depth)), ("error:bad_json",)),
        Case(f"jsonl objects nested {D} deep, repeated to 1 MiB", "jsonl",
             lambda: jsonl_field(nested_objects(group_depth)), ("error:bad_json",)),
        Case("jsonl 1 MiB of small integers", "jsonl", lambda: jsonl_field(b"0"), ("error:bad_json",)),
        Case("jsonl 1 MiB of small floats", "jsonl", lambda: jsonl_field(b"0.5"), ("error:bad_json",)),
        Case(f"jsonl {V - 20:,} floats (the value limit)", "jsonl",
             lambda: jsonl_field(b"1.2345", 7 * (V - 20) + len(gen_head) + 8), ("error:bad_request",)),
        Case(f"jsonl {C - 10:,} arrays of 4 (the container limit)", "jsonl",
             lambda: jsonl_field(b"[1,2,3,4]", 10 * (C - 10) + len(gen_head) + 8), ("error:bad_request",)),
        Case(f"jsonl nested {D + 1} deep", "jsonl",
             lambda: gen_head + b'"x":' + nested_arrays(D) + b"}\n", ("error:bad_json",)),
        Case("jsonl 1 MiB of [", "jsonl", lambda: b"[" * (L - 1) + b"\n", ("error:bad_json",)),
        Case("jsonl 20,000 tiny messages", "jsonl",
             lambda: line({"id": "c", "op": "chat", "max_tokens": 1,
                           "messages": [{"role": "user", "content": "hi"}] * 20_000}), ("error:bad_json",)),
        Case(f"jsonl {MAX_MESSAGES:,} messages filling 1 MiB", "jsonl",
             lambda: _messages_line(L, MAX_MESSAGES), ("error:context_overflow",)),
        # -- grammars and schemas (JSON lines) -----------------------------------------
        Case(f"grammar of {MAX_ELEMENTS - 10:,} alternatives", "jsonl",
             lambda: gen_with(grammar="root ::= " + " | ".join(['"a"'] * (MAX_ELEMENTS - 10))), GENERATED),
        Case(f"grammar of {MAX_ELEMENTS + 1:,} alternatives", "jsonl",
             lambda: gen_with(grammar="root ::= " + " | ".join(['"a"'] * (MAX_ELEMENTS + 1))), ("error:bad_schema",)),
        Case(f"grammar of {MAX_ELEMENTS:,} elements by {{{MAX_COUNT}}}", "jsonl",
             lambda: gen_with(grammar=f'root ::= ("{"a" * (MAX_ELEMENTS // MAX_COUNT)}"){{{MAX_COUNT}}}'),
             GENERATED),
        Case(f"grammar repeating {{{MAX_COUNT + 1}}}", "jsonl",
             lambda: gen_with(grammar=f'root ::= "a"{{{MAX_COUNT + 1}}}'), ("error:bad_schema",)),
        Case(f"grammar of {MAX_NESTING:,} nested groups", "jsonl",
             lambda: gen_with(grammar="root ::= " + "(" * MAX_NESTING + '"a"' + ")" * MAX_NESTING),
             GENERATED),
        Case(f"grammar of {MAX_NESTING + 1:,} nested groups", "jsonl",
             lambda: gen_with(grammar="root ::= " + "(" * (MAX_NESTING + 1) + '"a"' + ")" * (MAX_NESTING + 1)),
             ("error:bad_schema",)),
        Case("grammar padded with spaces to 1 MiB", "jsonl",
             lambda: padded({**gen, "grammar": 'root ::= "a"'}, "grammar", " ", L), GENERATED),
        Case("grammar padded with comments to 1 MiB", "jsonl",
             lambda: padded({**gen, "grammar": 'root ::= "a"\n'}, "grammar", "#" + "x" * 70 + "\n", L),
             GENERATED),
        Case(f"schema maxLength {MAX_COUNT:,}", "jsonl",
             lambda: gen_with(json_schema={"type": "string", "maxLength": MAX_COUNT}), GENERATED),
        Case(f"schema maxLength {MAX_COUNT + 1:,}", "jsonl",
             lambda: gen_with(json_schema={"type": "string", "maxLength": MAX_COUNT + 1}), ("error:bad_schema",)),
        Case(f"schema {MAX_COUNT:,} strings of {MAX_COUNT:,} chars", "jsonl",
             lambda: gen_with(json_schema={"type": "array", "minItems": MAX_COUNT, "maxItems": MAX_COUNT,
                                           "items": {"type": "string", "minLength": MAX_COUNT,
                                                     "maxLength": MAX_COUNT}}), GENERATED),
        Case(f"schema pattern of {MAX_ELEMENTS:,} elements", "jsonl",
             lambda: gen_with(json_schema={"type": "string",
                                           "pattern": f"^(a{{{MAX_COUNT}}}){{{MAX_ELEMENTS // MAX_COUNT}}}$"}),
             GENERATED),
        Case(f"schema pattern of {MAX_ELEMENTS + MAX_COUNT:,} elements", "jsonl",
             lambda: gen_with(json_schema={"type": "string",
                                           "pattern": f"^(a{{{MAX_COUNT}}}){{{MAX_ELEMENTS // MAX_COUNT + 1}}}$"}),
             ("error:bad_schema",)),
        Case(f"schema nested {SCHEMA_DEPTH} deep", "jsonl",
             lambda: gen_with(json_schema=nested_schema(SCHEMA_DEPTH)), GENERATED),
        Case(f"schema nested {SCHEMA_DEPTH + 1} deep", "jsonl",
             lambda: gen_with(json_schema=nested_schema(SCHEMA_DEPTH + 1)), ("error:bad_schema",)),
        Case(f"schema of {OPTIONAL_PROPERTIES} optional properties", "jsonl",
             lambda: gen_with(json_schema=optional_properties(OPTIONAL_PROPERTIES)), GENERATED),
        Case(f"schema enum of {lim['max_schema_bytes']:,} B", "jsonl",
             lambda: gen_with(json_schema=enum_schema(lim["max_schema_bytes"])), ("error:bad_schema",)),
        Case("schema enum 1 B past the size limit", "jsonl",
             lambda: gen_with(json_schema=_past(enum_schema(lim["max_schema_bytes"]), lim["max_schema_bytes"])),
             ("error:bad_schema",)),
    ]

    # -- HTTP: POST /v1/chat/completions ------------------------------------------------
    chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1, "temperature": 0}
    chat_head = dumps(chat)[:-1] + b","

    def http_field(unit: bytes, size: int, sep: bytes = b",") -> bytes:
        """A chat body with an extra field x (ignored by the OpenAI face,
        but parsed) of copies of unit."""
        return fit(chat_head + b'"x":[', unit, b"]}", size, sep)

    def content(unit: bytes, size: int) -> bytes:
        """A chat body of ``size`` bytes, nearly all of it one message of
        units (escapes are whole: an odd 'a' fills the rest)."""
        return exactly(b'{"max_tokens":1,"messages":[{"role":"user","content":"', unit, b'"}]}', size)

    def rf(schema) -> bytes:
        return dumps({**chat, "response_format": {"type": "json_schema",
                                                  "json_schema": {"name": "x", "schema": schema}}})

    out += [
        Case(f"http prompt text, body of {B:,} B", "http", lambda: content(TEXT, B),
             ("400 context_length_exceeded",)),
        Case("http body 1 B past the limit", "http", lambda: content(TEXT, B + 1), ("413",)),
        Case("http body 1 B past the limit, chunked", "http-chunked", lambda: content(TEXT, B + 1), ("413",)),
        Case(f"http {V - 20:,} floats (the value limit)", "http",
             lambda: http_field(b"1.2345", 7 * (V - 20) + len(chat_head) + 8), COMPLETED),
        Case(f"http {C - 10:,} arrays of 4 (the container limit)", "http",
             lambda: http_field(b"[1,2,3,4]", 10 * (C - 10) + len(chat_head) + 8), COMPLETED),
        Case(f"http {B:,} B of small floats", "http", lambda: http_field(b"0.5", B), ("400 invalid_request_error",)),
        Case(f"http {B:,} B of small integers", "http", lambda: http_field(b"0", B), ("400 invalid_request_error",)),
        Case(f"http arrays nested {D} deep, repeated to {B // MB} MiB", "http",
             lambda: http_field(nested_arrays(group_depth), B), ("400 invalid_request_error",)),
        Case(f"http prompt of escaped quotes to {B // MB} MiB", "http", lambda: content(b'\\"', B),
             ("400 context_length_exceeded",)),
        Case(f"http nested {D + 1} deep", "http", lambda: chat_head + b'"x":' + nested_arrays(D) + b"}",
             ("400 invalid_request_error",)),
        Case(f"http {B // MB} MiB of [", "http", lambda: b"[" * B, ("400 invalid_request_error",)),
        Case(f"http tiny messages to {B // MB} MiB", "http",
             lambda: fit(b'{"max_tokens":1,"messages":[', b'{"role":"user","content":"hi"}', b"]}", B),
             ("400 invalid_request_error",)),
        Case(f"http schema maxLength {MAX_COUNT:,}", "http",
             lambda: rf({"type": "string", "maxLength": MAX_COUNT}), COMPLETED),
        Case(f"http schema maxLength {MAX_COUNT + 1:,}", "http",
             lambda: rf({"type": "string", "maxLength": MAX_COUNT + 1}), ("400 bad_schema",)),
        Case(f"http schema nested {SCHEMA_DEPTH} deep", "http", lambda: rf(nested_schema(SCHEMA_DEPTH)),
             COMPLETED),
        Case(f"http schema of {OPTIONAL_PROPERTIES} optional properties", "http",
             lambda: rf(optional_properties(OPTIONAL_PROPERTIES)), COMPLETED),
        Case(f"http schema enum of {lim['max_schema_bytes']:,} B", "http",
             lambda: rf(enum_schema(lim["max_schema_bytes"])), ("400 bad_schema",)),
    ]
    return out


def _messages_line(size: int, n: int) -> bytes:
    """A chat line of ``n`` user messages, their text filling ``size`` bytes."""
    empty = len(line({"id": "c", "op": "chat", "max_tokens": 1,
                      "messages": [{"role": "user", "content": ""}] * n}))
    per = (size - empty) // n
    text = (TEXT.decode() * (per // len(TEXT) + 1))[:per]
    return line({"id": "c", "op": "chat", "max_tokens": 1, "messages": [{"role": "user", "content": text}] * n})


def _past(schema: dict, size: int) -> dict:
    """``schema`` (an enum) grown until its JSON is past ``size`` bytes."""
    values = list(schema["enum"])
    while len(json.dumps({"enum": values})) <= size:
        values.append("v")
    return {"enum": values}


# -- the server ----------------------------------------------------------------------
def _die_with_parent() -> None:
    """In the server's child: SIGTERM it if this script dies, however it dies."""
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class Server:
    """`edgeinfer serve MODEL --port 0 --http 0` on loopback; its stderr is
    read all along (a full pipe would stall it) and its tail kept."""

    def __init__(self, model: str, threads: int, env: dict):
        self.cmd = [sys.executable, "-m", "edgeinfer", "serve", model, "--host", "127.0.0.1", "--port", "0",
                    "--http", "0", "--threads", str(threads)]
        self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True, errors="replace", env=env,
                                     start_new_session=True, preexec_fn=_die_with_parent)
        self.pid = self.proc.pid
        self.tail: collections.deque[str] = collections.deque(maxlen=40)
        self._lines: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._read, daemon=True).start()
        try:
            self.serving = self._wait_serving()
        except BaseException:
            self.stop()
            raise
        self.jsonl_port = int(re.search(r"(?<!//)127\.0\.0\.1:(\d+)", self.serving).group(1))
        self.http_port = int(re.search(r"http://127\.0\.0\.1:(\d+)", self.serving).group(1))

    def _read(self) -> None:
        for text in self.proc.stderr:
            self.tail.append(text.rstrip("\n"))
            self._lines.put(text)
        self._lines.put(None)

    def _wait_serving(self) -> str:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                text = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise SystemExit(f"the server did not start within {START_TIMEOUT_S:.0f} s:\n"
                                 + self.last_words()) from None
            if text is None:
                raise SystemExit(f"the server exited with {self.proc.wait()} before it served:\n" + self.last_words())
            if text.startswith("Serving "):
                return text.strip()

    def last_words(self) -> str:
        return "\n".join(self.tail)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def memory(self) -> dict[str, float]:
        """VmRSS and VmHWM in MB."""
        out = {}
        with open(f"/proc/{self.pid}/status") as f:
            for text in f:
                key, _, value = text.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    out[key] = int(value.split()[0]) / 1024
        return out

    def reset_peak(self) -> bool:
        """VmHWM back to the current RSS (Linux 4.0 and later)."""
        try:
            with open(f"/proc/{self.pid}/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(30)
            except subprocess.TimeoutExpired:
                log("warning: the server did not stop within 30 s of SIGTERM; killing it")
                self.proc.kill()
        return self.proc.wait()


class Probe:
    """A JSON-lines `health` op every PROBE_INTERVAL_S, one at a time, on a
    connection of its own; each round trip is kept as (sent, answered)."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=CASE_TIMEOUT_S)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.file = self.sock.makefile("rb")
        self.sent: list[float] = []
        self.answered: list[float] = []
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        n = 0
        try:
            while not self._stop.is_set():
                n += 1
                t0 = time.perf_counter()
                self.sock.sendall(b'{"id":%d,"op":"health"}\n' % n)
                while True:
                    text = self.file.readline()
                    if not text:
                        raise ConnectionError("the server closed the probe's connection")
                    r = json.loads(text)
                    if r.get("id") == n:
                        break
                t1 = time.perf_counter()
                if r.get("event") != "result" or r.get("status") != "ok":
                    raise ValueError(f"health answered {text[:200]!r}")
                self.answered.append(t1)   # answered first: a reader seeing a start sees its end
                self.sent.append(t0)
                time.sleep(max(0.0, t0 + PROBE_INTERVAL_S - time.perf_counter()))
        except Exception as e:
            if not self._stop.is_set():
                self.error = f"{type(e).__name__}: {e}"

    def rtts(self, start: float, end: float) -> list[float]:
        """Round trips (s) that overlapped [start, end]."""
        n = len(self.sent)
        sent, answered = self.sent[:n], self.answered[:n]
        hi = bisect.bisect_right(sent, end)
        lo = bisect.bisect_left(sent, start)
        while lo > 0 and answered[lo - 1] >= start:   # sent before start, answered after
            lo -= 1
        return [answered[i] - sent[i] for i in range(lo, hi)]

    def wait_past(self, t: float, timeout: float = CASE_TIMEOUT_S) -> bool:
        """Until a probe sent after ``t`` is answered: every one sent before is."""
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline and self.error is None:
            if self.sent and self.sent[-1] > t:
                return True
            time.sleep(0.001)
        return False

    def close(self) -> None:
        self._stop.set()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._thread.join(5)
        self.file.close()
        self.sock.close()


# -- sending a case ------------------------------------------------------------------
def jsonl_answer(sock: socket.socket) -> tuple[str, bool]:
    """The request's last event as a label, and whether it is in the
    protocol's shape (an internal error is not an answer to a request)."""
    f = sock.makefile("rb")
    try:
        while True:
            text = f.readline()
            if not text:
                return "NO ANSWER (closed)", False
            try:
                r = json.loads(text)
            except ValueError:
                return f"not JSON: {text[:60]!r}", False
            if not isinstance(r, dict) or "id" not in r:
                return f"bad shape: {text[:60]!r}", False
            ev = r.get("event")
            if ev == "token":
                continue
            if ev == "error":
                code = r.get("code")
                ok = code in CODES and code != "internal" and isinstance(r.get("message"), str) and r["message"]
                return f"error:{code}", bool(ok)
            if ev == "done":
                ok = r.get("finish_reason") in FINISH_REASONS and isinstance(r.get("stats"), dict)
                return f"done:{r.get('finish_reason')}", ok
            if ev == "result":
                return "result", True
            return f"event {ev!r}?", False
    finally:
        f.close()


def http_answer(sock: socket.socket) -> tuple[str, bool]:
    """The response as '<status> <error code, type or finish reason>', and
    whether it is in the OpenAI API's shape."""
    resp = http.client.HTTPResponse(sock, method="POST")
    resp.begin()
    data = resp.read()
    try:
        body = json.loads(data)
    except ValueError:
        return f"{resp.status} not JSON: {data[:60]!r}", False
    if resp.status == 200:
        choices = body.get("choices") if isinstance(body, dict) else None
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            return "200 without choices", False
        return f"200 {choices[0].get('finish_reason')}", "message" in choices[0]
    err = body.get("error") if isinstance(body, dict) else None
    if not isinstance(err, dict) or not isinstance(err.get("message"), str) or not isinstance(err.get("type"), str):
        return f"{resp.status} not an OpenAI error", False
    if resp.status == 413:
        return "413", True
    return f"{resp.status} {err.get('code') or err['type']}", resp.status < 500


def http_request(port: int, body: bytes, chunked: bool) -> bytes:
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            "Content-Type: application/json\r\nConnection: close\r\n")
    if not chunked:
        return (head + f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    step = 64 << 10
    parts = [b"%x\r\n%s\r\n" % (len(body[i:i + step]), body[i:i + step]) for i in range(0, len(body), step)]
    return (head + "Transfer-Encoding: chunked\r\n\r\n").encode() + b"".join(parts) + b"0\r\n\r\n"


def exchange(server: Server, face: str, data: bytes) -> tuple[str, bool]:
    """Send ``data`` on a new connection (from a thread, so a server that
    answers before reading it all cannot block us) and read the answer."""
    port = server.jsonl_port if face == "jsonl" else server.http_port
    if face != "jsonl":
        data = http_request(port, data, chunked=face == "http-chunked")
    sock = socket.create_connection(("127.0.0.1", port), timeout=CASE_TIMEOUT_S)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def send():
        try:
            sock.sendall(data)
        except OSError:
            pass   # the server answered and closed before reading it all

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    try:
        return (jsonl_answer if face == "jsonl" else http_answer)(sock)
    except (socket.timeout, TimeoutError):
        return f"NO ANSWER in {CASE_TIMEOUT_S:.0f} s", False
    except (OSError, http.client.HTTPException) as e:
        return f"NO ANSWER ({type(e).__name__})", False
    finally:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sender.join(5)
        sock.close()


# -- measuring -----------------------------------------------------------------------
@dataclass
class Run:
    answer: str
    shaped: bool
    stall_ms: float | None
    base_ms: float | None
    rss_before: float | None
    rss_after: float | None
    peak_rise: float | None
    wall_ms: float
    died: bool = False
    restarted: bool = False     # no answer in time: the server was replaced after it


@dataclass
class Result:
    case: Case
    size: int
    runs: list[Run] = field(default_factory=list)

    def row(self) -> dict:
        stalls = [r.stall_ms for r in self.runs if r.stall_ms is not None]
        peaks = [r.peak_rise for r in self.runs if r.peak_rise is not None]
        answers = sorted({r.answer for r in self.runs})
        flags = []
        if any(r.died for r in self.runs):
            flags.append("DIED")
        if any(r.restarted for r in self.runs):
            flags.append("restarted")
        if not all(r.shaped for r in self.runs):
            flags.append("bad answer")
        elif any(r.answer not in self.case.expect for r in self.runs):
            flags.append("unexpected answer")
        if stalls and max(stalls) > STALL_BOUND_MS:
            flags.append(f"stall>{STALL_BOUND_MS:g}ms")
        if peaks and max(peaks) > MEMORY_BOUND_MB:
            flags.append(f"memory>{MEMORY_BOUND_MB:g}MB")
        first, last = self.runs[0], self.runs[-1]
        return {"case": self.case.name, "face": self.case.face, "bytes": self.size, "answers": answers,
                "expected": list(self.case.expect),
                "stall_ms_max": _round(max(stalls) if stalls else None),
                "stall_ms_median": _round(statistics.median(stalls) if stalls else None),
                "probe_median_ms": _round(statistics.median([r.base_ms for r in self.runs if r.base_ms is not None]
                                                            or [0.0]), 3),
                "rss_before_mb": _round(first.rss_before), "rss_after_mb": _round(last.rss_after),
                "peak_rise_mb_max": _round(max(peaks) if peaks else None),
                "wall_ms_median": _round(statistics.median(r.wall_ms for r in self.runs)),
                "flags": flags,
                "runs": [vars(r) for r in self.runs]}


def _round(v, n: int = 1):
    return None if v is None else round(v, n)


class Bench:
    """The server, its probe, and what to do when the server dies."""

    def __init__(self, model: str, threads: int, env: dict):
        self.model, self.threads, self.env = model, threads, env
        self.server: Server | None = None
        self.probe: Probe | None = None
        self.peak_reset = True
        self.deaths: list[str] = []
        self.restarts: list[str] = []      # cases after which the server was restarted, still busy

    def start(self) -> None:
        self.server = Server(self.model, self.threads, self.env)
        self.probe = Probe(self.server.jsonl_port)
        self.peak_reset = self.server.reset_peak()

    def close(self) -> None:
        if self.probe is not None:
            self.probe.close()
            self.probe = None
        if self.server is not None:
            self.server.stop()
            self.server = None

    def run(self, case: Case, data: bytes) -> Run:
        server, probe = self.server, self.probe
        quiet = time.perf_counter()
        time.sleep(QUIET_S)
        base = probe.rtts(quiet, time.perf_counter())
        base_ms = statistics.median(base) * 1e3 if base else None
        self.peak_reset = server.reset_peak() and self.peak_reset
        before = server.memory()
        t0 = time.perf_counter()
        answer, shaped = exchange(server, case.face, data)
        t1 = time.perf_counter()
        time.sleep(SETTLE_S)
        t2 = time.perf_counter()
        probe.wait_past(t2)
        died = not server.alive()
        if died:
            self.deaths.append(f"{case.name}: exit {server.proc.returncode}\n{server.last_words()}")
            log(f"the server died on {case.name!r} (exit {server.proc.returncode}); restarting it")
            self.close()
            self.start()
            return Run(f"DIED ({answer})", False, None, base_ms, before["VmRSS"], None, None, (t1 - t0) * 1e3,
                       died=True)
        if probe.error:
            log(f"the probe failed: {probe.error}")
        after = server.memory()
        rtts = probe.rtts(t0, t2)
        stall = (max(rtts) * 1e3 - base_ms) if rtts and base_ms is not None else None
        floor = before["VmRSS"] if self.peak_reset else before["VmHWM"]
        run = Run(answer, shaped, None if stall is None else max(0.0, stall), base_ms, before["VmRSS"],
                  after["VmRSS"], max(0.0, after["VmHWM"] - floor), (t1 - t0) * 1e3)
        if answer.startswith("NO ANSWER in"):
            # It may still be working on the request: a fresh server keeps
            # that work out of the cases after this one.
            self.restarts.append(case.name)
            run.restarted = True
            log(f"no answer to {case.name!r}; restarting the server")
            self.close()
            self.start()
        return run


# -- output --------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for text in f:
                if text.startswith("model name"):
                    return text.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def table(rows: list[dict]) -> str:
    def num(v, fmt="{:.1f}"):
        return "-" if v is None else fmt.format(v)

    head = ("case", "bytes", "answer", "stall ms max", "median", "probe ms", "RSS MB before", "after",
            "peak +MB", "wall ms", "flags")
    body = [(r["case"], f"{r['bytes']:,}", ", ".join(r["answers"]), num(r["stall_ms_max"]),
             num(r["stall_ms_median"]), num(r["probe_median_ms"], "{:.2f}"), num(r["rss_before_mb"]),
             num(r["rss_after_mb"]), num(r["peak_rise_mb_max"]), num(r["wall_ms_median"], "{:.0f}"),
             " ".join(r["flags"])) for r in rows]
    widths = [max(len(str(x[i])) for x in (head, *body)) for i in range(len(head))]
    left = {0, 2, 10}

    def fmt(cols):
        return "  ".join(str(c).ljust(w) if i in left else str(c).rjust(w)
                         for i, (c, w) in enumerate(zip(cols, widths))).rstrip()

    return "\n".join([fmt(head), fmt(["-" * w for w in widths]), *(fmt(b) for b in body)])


def summary(rows: list[dict], deaths: list[str], restarts: list[str]) -> list[str]:
    out = []
    measured = [r for r in rows if r["stall_ms_max"] is not None]
    if measured:
        top = max(measured, key=lambda r: r["stall_ms_max"])
        out.append(f"most event-loop time: {top['case']} ({top['stall_ms_max']:.1f} ms max, "
                   f"{top['stall_ms_median']:.1f} ms median)")
    peaked = [r for r in rows if r["peak_rise_mb_max"] is not None]
    if peaked:
        top = max(peaked, key=lambda r: r["peak_rise_mb_max"])
        out.append(f"most memory: {top['case']} (peak +{top['peak_rise_mb_max']:.1f} MB)")
    flagged = [r for r in rows if r["flags"]]
    out.append(f"flagged: {len(flagged)} of {len(rows)} cases" + "".join(
        f"\n  {r['case']}: {' '.join(r['flags'])} ({', '.join(r['answers'])}; expected "
        f"{' or '.join(r['expected'])})" for r in flagged))
    for d in deaths:
        out.append("server died: " + d)
    for name in restarts:
        out.append(f"server restarted after {name!r}: no answer in {CASE_TIMEOUT_S:.0f} s")
    return out


# -- main ----------------------------------------------------------------------------
def tiny_model(where: Path) -> Path:
    spec = importlib.util.spec_from_file_location("build_tiny_model", HERE / "build_tiny_model.py")
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    return builder.build(where / "tiny.gguf")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", metavar="NAME_OR_PATH",
                    help="a model in the store (e.g. smollm2-135m-instruct) or a GGUF path; default: the tiny "
                         "test model, built in a temporary EDGEINFER_HOME")
    ap.add_argument("--repeat", type=int, default=1, metavar="N", help="runs of each case (default 1)")
    ap.add_argument("--threads", type=int, default=1, help="the server's --threads (default 1, as the tests)")
    ap.add_argument("--only", metavar="TEXT", help="only the cases whose name contains TEXT")
    ap.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    args = ap.parse_args()
    if args.repeat < 1:
        ap.error("--repeat must be 1 or more")
    # SIGTERM unwinds like Ctrl-C, so the server is stopped and the temporary home removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    lim = limits()
    chosen = [c for c in cases(lim) if not args.only or args.only in c.name]
    if not chosen:
        ap.error(f"no case name contains {args.only!r}")
    command = shlex.join([sys.executable, *sys.argv])
    load_before = loadavg()
    with tempfile.TemporaryDirectory(prefix="edgeinfer-hostile-") as tmp:
        env = dict(os.environ)
        if args.model is None:
            home = Path(tmp)
            env["EDGEINFER_HOME"], env["EDGEINFER_CONFIG"] = str(home / "home"), str(home / "config")
            model = str(tiny_model(home))
        else:
            model = args.model
        bench = Bench(model, args.threads, env)
        results: list[Result] = []
        try:
            log(f"starting the server on {model}")
            bench.start()
            log(bench.server.serving)
            for i, case in enumerate(chosen, 1):
                data = case.build()
                result = Result(case, len(data))
                log(f"[{i}/{len(chosen)}] {case.name} ({len(data):,} B)")
                for _ in range(args.repeat):
                    result.runs.append(bench.run(case, data))
                results.append(result)
                del data
            serving, cmd, peak_reset = bench.server.serving, bench.server.cmd, bench.peak_reset
            probe_error = bench.probe.error
        finally:
            bench.close()
    rows = [r.row() for r in results]
    report = {"command": command, "cpu": cpu_model(), "cores": os.cpu_count(), "server_command": shlex.join(cmd),
              "serving": serving, "loadavg_before": load_before, "loadavg_after": loadavg(),
              "peak": "VmHWM reset per case" if peak_reset else "VmHWM rise (not reset: clear_refs refused)",
              "probe_error": probe_error, "limits": lim, "repeat": args.repeat, "cases": rows,
              "summary": summary(rows, bench.deaths, bench.restarts)}
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    print(f"command: {command}")
    print(f"CPU: {report['cpu']} ({report['cores']} cores); load average {load_before} before, "
          f"{report['loadavg_after']} after")
    print(f"server: {report['server_command']}")
    print(f"        {serving}")
    print(f"limits: {', '.join(f'{k} {v:,}' for k, v in lim.items())}")
    print(f"each case {args.repeat} time(s); stall = longest probe round trip during the case less the "
          f"median of the {QUIET_S * 1e3:.0f} ms before it (probe ms); peak: {report['peak']}; "
          "MB = 2^20 bytes")
    if probe_error:
        print(f"probe failed: {probe_error}")
    print()
    print(table(rows))
    print()
    for text in report["summary"]:
        print(text)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        log("interrupted; the server is stopped")
        sys.exit(130)
