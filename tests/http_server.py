"""A fault-injecting HTTP server on loopback, for download tests.

It serves byte payloads registered at paths, honours ``Range`` (206 with
``Content-Range``, 416 past the end) and can misbehave on purpose, per path:

    server = start_server()
    server.add("/m.gguf", data, fault=Fault(cut_after=1000, times=1))
    ...                                # point the code under test at server.url("/m.gguf")
    assert server.requests_for("/m.gguf")[1].range == "bytes=1000-"
    server.stop()

Faults (each applies to the first ``times`` requests for the path, or to
every request when ``times`` is None):

- ``status=503``: answer with that status and no body;
- ``cut_after=N``: announce the full Content-Length, send N bytes, close;
- ``stall_after=N``: send N bytes, then go silent for ``stall_seconds``
  (or until the server stops), longer than any client timeout in the tests;
- ``wrong_bytes=True``: serve bytes of the same length that differ;
- ``ignore_range=True``: answer a Range request with 200 and the whole body;
- ``slow=bytes_per_sec``: throttle the body, so a test can interrupt it.

Every request is recorded (path, Range header, status, bytes sent) so tests
assert what was fetched, not just what came out. Nothing here is
pytest-specific; test modules wrap ``start_server()`` in a fixture.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
_PIECE = 16 * 1024  # write granularity for throttled and stalled bodies


@dataclass
class Fault:
    status: int | None = None
    cut_after: int | None = None
    stall_after: int | None = None
    stall_seconds: float = 30.0
    wrong_bytes: bool = False
    ignore_range: bool = False
    slow: int | None = None         # bytes per second
    times: int | None = None        # first K requests; None: every request


@dataclass
class Request:
    path: str
    range: str | None
    status: int = 0
    sent: int = 0                   # body bytes written to the socket


@dataclass
class _Route:
    data: bytes
    fault: Fault | None
    hits: int = 0


def corrupt(data: bytes) -> bytes:
    """Same length, different bytes: flip a run in the middle."""
    mid = len(data) // 2
    run = data[mid:mid + 64]
    return data[:mid] + bytes(b ^ 0xFF for b in run) + data[mid + len(run):]


@dataclass
class FaultServer:
    httpd: ThreadingHTTPServer
    thread: threading.Thread
    routes: dict[str, _Route] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    stopping: threading.Event = field(default_factory=threading.Event)

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def add(self, path: str, data: bytes, fault: Fault | None = None) -> str:
        """Serve ``data`` at ``path`` (replacing what was there); returns the URL."""
        with self.lock:
            self.routes[path] = _Route(bytes(data), fault)
        return self.url(path)

    def requests_for(self, path: str) -> list[Request]:
        with self.lock:
            return [r for r in self.requests if r.path == path]

    def bytes_sent(self, path: str) -> int:
        return sum(r.sent for r in self.requests_for(path))

    def clear(self) -> None:
        with self.lock:
            self.requests.clear()

    def stop(self) -> None:
        self.stopping.set()  # ends stalls and throttles at once
        self.httpd.shutdown()
        self.httpd.server_close()  # joins the handler threads
        self.thread.join(timeout=10)

    def __enter__(self) -> "FaultServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 30  # a client that stops reading cannot pin a handler thread forever
    server_version = "FaultServer/1"
    owner: FaultServer  # set per server in start_server()

    def log_message(self, format, *args):  # quiet
        pass

    def do_GET(self):
        owner = self.owner
        path = self.path.split("?", 1)[0]
        rng = self.headers.get("Range")
        rec = Request(path, rng)
        with owner.lock:
            owner.requests.append(rec)
            route = owner.routes.get(path)
            if route is not None:
                route.hits += 1
                fault = route.fault
                if fault is not None and fault.times is not None and route.hits > fault.times:
                    fault = None
        if route is None:
            return self._status(rec, 404)
        fault = fault or Fault()
        if fault.status is not None:
            return self._status(rec, fault.status)
        data = corrupt(route.data) if fault.wrong_bytes else route.data
        total = len(data)
        start, end, status = 0, total, 200
        if rng and not fault.ignore_range and _RANGE.match(rng.strip()):
            span = self._parse_range(rng, total)
            if span is None:
                rec.status = 416
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{total}")
                self.send_header("Content-Length", "0")
                self.send_header("Connection", "close")
                self.end_headers()
                return
            start, end, status = span[0], span[1], 206
        rec.status = status
        self.close_connection = True
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(end - start))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{total}")
        self.send_header("Connection", "close")
        self.end_headers()
        body = data[start:end]
        limit = len(body)
        for n in (fault.cut_after, fault.stall_after):
            if n is not None:
                limit = min(limit, n)
        try:
            self._send(rec, body[:limit], fault.slow)
            if fault.stall_after is not None and limit < len(body):
                self.wfile.flush()
                owner.stopping.wait(fault.stall_seconds)
                return
            # cut_after: the connection closes when the handler returns,
            # short of the Content-Length it announced.
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            pass  # the client went away (killed, or timed out): fine

    def _send(self, rec: Request, body: bytes, rate: int | None) -> None:
        if rate is None:
            self.wfile.write(body)
            rec.sent += len(body)
            return
        piece = max(1, min(_PIECE, rate // 10))
        for i in range(0, len(body), piece):
            if self.owner.stopping.is_set():
                return
            chunk = body[i:i + piece]
            self.wfile.write(chunk)
            self.wfile.flush()
            with self.owner.lock:
                rec.sent += len(chunk)
            self.owner.stopping.wait(len(chunk) / rate)

    def _status(self, rec: Request, code: int) -> None:
        rec.status = code
        self.close_connection = True
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.send_header("Connection", "close")
        self.end_headers()

    @staticmethod
    def _parse_range(header: str, total: int) -> tuple[int, int] | None:
        """(start, end) for a satisfiable ``bytes=a-b`` range, else None."""
        m = _RANGE.match(header.strip())
        if not m.group(1) and not m.group(2):
            return None
        if not m.group(1):  # suffix: the last N bytes
            n = int(m.group(2))
            return (max(total - n, 0), total) if n else None
        start = int(m.group(1))
        end = min(int(m.group(2)) + 1, total) if m.group(2) else total
        if start >= total or end <= start:
            return None
        return start, end


def start_server() -> FaultServer:
    """Start a server on 127.0.0.1 at an ephemeral port, in a daemon thread."""
    handler = type("Handler", (_Handler,), {})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                              name="fault-http-server", daemon=True)
    server = FaultServer(httpd, thread)
    handler.owner = server
    thread.start()
    return server
