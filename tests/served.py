"""`edgeinfer serve` as a real process on loopback, for the subprocess
tests of both servers: start it, talk to it, stop it.

``start(model, ...)`` runs the JSON-lines server; ``start_http(model,
...)`` the HTTP one alone. Either returns a :class:`Served` once the
server prints the line saying where it listens; the rest of its log is
read in a thread (so it never blocks on a full pipe) and kept in
``.log``.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

from edgeinfer import Client

START_TIMEOUT_S = 90


class Served:
    """A server process and what it printed."""

    def __init__(self, proc: subprocess.Popen | None, port: int | None, unix: str | None = None,
                 log: list[str] | None = None):
        self.proc, self.port, self.unix = proc, port, unix
        self.log = log if log is not None else []

    def stop(self) -> int:
        """SIGTERM, then the exit status (killed after 60 s)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()

    # -- JSON lines -------------------------------------------------------
    def client(self, **kw) -> Client:
        return Client(port=self.port, **kw) if self.port else Client(unix=self.unix, **kw)

    def raw(self) -> "Raw":
        return Raw(socket.create_connection(("127.0.0.1", self.port), timeout=30))

    # -- HTTP -----------------------------------------------------------------
    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def openai(self, key: str = "none"):
        import openai

        return openai.OpenAI(base_url=self.base + "/v1", api_key=key, max_retries=0, timeout=120)

    def anthropic(self, key: str = "none"):
        import anthropic

        return anthropic.Anthropic(base_url=self.base, api_key=key, max_retries=0, timeout=120)

    def request(self, method: str, path: str, body=None, headers=None) -> tuple[int, dict, bytes]:
        """One raw HTTP request: status, headers (lower-case), body."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
            hdrs = {"Content-Type": "application/json", **(headers or {})}
            conn.request(method, path, body=data, headers=hdrs)
            r = conn.getresponse()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
        finally:
            conn.close()

    def json(self, method: str, path: str, body=None, headers=None) -> tuple[int, dict]:
        status, _, data = self.request(method, path, body, headers)
        return status, json.loads(data)

    def metrics(self) -> dict[str, float]:
        status, _, data = self.request("GET", "/metrics")
        assert status == 200
        out = {}
        for line in data.decode().splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out


class Raw:
    """A JSON-lines connection, one object per line each way."""

    def __init__(self, sock: socket.socket):
        self.sock, self.f = sock, sock.makefile("rb")

    def send(self, obj) -> None:
        self.sock.sendall(obj if isinstance(obj, bytes) else (json.dumps(obj) + "\n").encode())

    def reply(self) -> dict:
        line = self.f.readline()
        assert line, "the server closed the connection"
        return json.loads(line)

    def until_end(self, rid) -> list[dict]:
        out = []
        while True:
            r = self.reply()
            if r.get("id") == rid:
                out.append(r)
                if r["event"] in ("done", "error", "result"):
                    return out

    def close(self) -> None:
        self.f.close()  # the file holds the socket open until it is closed too
        self.sock.close()


def _launch(cmd: list[str], env, where) -> Served:
    """Run ``cmd`` and wait for its 'Serving' line; ``where(line)`` gives
    (port, unix) from it, or None for a line that is not the one."""
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
    deadline = time.monotonic() + START_TIMEOUT_S
    seen: list[str] = []
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        seen.append(line)
        found = where(line)
        if found is not None:
            threading.Thread(target=lambda: seen.extend(proc.stderr), daemon=True).start()
            return Served(proc, *found, log=seen)
    proc.kill()
    raise AssertionError("the server did not start: " + "".join(seen)[-2000:])


def start(model, *args, env=None) -> Served:
    """``edgeinfer serve MODEL --port 0 ARGS``: the JSON-lines server
    (MODEL None: the store's models, on demand)."""
    def where(line: str):
        if not line.startswith("Serving "):
            return None
        m = re.search(r"127\.0\.0\.1:(\d+)", line)
        u = re.search(r"unix:(\S+?)[,:]", line)
        return int(m.group(1)) if m else None, u.group(1) if u else None

    return _launch([sys.executable, "-m", "edgeinfer", "serve", *_model(model), "--port", "0", "--threads", "1",
                    *args], env, where)


def start_http(model, *args, env=None) -> Served:
    """``edgeinfer serve MODEL --no-jsonl --http 0 ARGS``: HTTP alone."""
    def where(line: str):
        m = re.search(r"^Serving .* http://127\.0\.0\.1:(\d+)", line)
        return (int(m.group(1)), None) if m else None

    return _launch([sys.executable, "-m", "edgeinfer", "serve", *_model(model), "--no-jsonl", "--http", "0",
                    "--threads", "1", *args], env, where)


def _model(model) -> list[str]:
    """MODEL as serve's argument; None for none (every model in the store, on demand)."""
    return [] if model is None else [str(model)]
