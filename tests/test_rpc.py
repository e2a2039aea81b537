"""Models split over llama.cpp's RPC backend, on loopback: the backend
library built from the installed llama.cpp's sources, workers started
with `edgeinfer rpc-worker`, a server with `edgeinfer serve --rpc`. The
answers match the model run locally, each worker holds its share of the
weights, and a worker lost mid-answer costs that answer only."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from edgeinfer.errors import RpcError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def rpc_env(tmp_path_factory):
    """A home where the RPC backend is built (once for the module)."""
    home = tmp_path_factory.mktemp("rpc-home")
    env = {**os.environ, "EDGEINFER_HOME": str(home), "EDGEINFER_TOKEN": ""}
    done = subprocess.run([sys.executable, "-c", "from edgeinfer import rpc; print(rpc.library())"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return env


class Worker:
    """`edgeinfer rpc-worker` on a loopback port, up once it answers."""

    def __init__(self, env, port: int | None = None, mem: str | None = None):
        from edgeinfer import rpc

        self.port = port or free_port()
        self.endpoint = f"127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "edgeinfer", "rpc-worker", "--port", str(self.port),
                                      "--threads", "1", *(["--mem", mem] if mem else [])], env=env,
                                     stderr=subprocess.PIPE, text=True)
        threading.Thread(target=lambda: self.proc.stderr.read(), daemon=True).start()
        deadline = time.monotonic() + 120
        while True:
            try:
                rpc.probe(self.endpoint, timeout=2)
                return
            except RpcError:
                assert self.proc.poll() is None and time.monotonic() < deadline, "the worker did not start"
                time.sleep(0.2)

    def rss(self) -> int:
        import psutil

        return psutil.Process(self.proc.pid).memory_info().rss

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()


def serve(model, workers: list[Worker], env):
    from served import start_http

    return start_http(model, "--rpc", ",".join(w.endpoint for w in workers), env=env)


def test_probe_says_what_is_wrong_before_llama_cpp_is_called(rpc_env):
    from edgeinfer import rpc

    with pytest.raises(RpcError, match="no RPC worker answers"):
        rpc.probe(f"127.0.0.1:{free_port()}", timeout=2)
    with socket.socket() as other:   # a listener that is no RPC worker
        other.bind(("127.0.0.1", 0))
        other.listen()
        stop = threading.Event()

        def answer():
            conn, _ = other.accept()
            conn.recv(64)
            conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
            stop.wait(5)
            conn.close()

        threading.Thread(target=answer, daemon=True).start()
        with pytest.raises(RpcError, match="not as an RPC worker"):
            rpc.probe(f"127.0.0.1:{other.getsockname()[1]}", timeout=2)
        stop.set()
    with pytest.raises(RpcError, match="not HOST:PORT"):
        rpc.check_endpoint("192.168.1.20")
    w = Worker(rpc_env)
    try:
        with socket.create_connection(("127.0.0.1", w.port)):   # another client holds it
            with pytest.raises(RpcError, match="busy with another"):
                rpc.probe(w.endpoint, timeout=1)
    finally:
        w.kill()


def test_a_worker_off_loopback_needs_a_flag_and_a_free_port(rpc_env):
    done = subprocess.run([sys.executable, "-m", "edgeinfer", "rpc-worker", "--host", "0.0.0.0", "--port",
                           str(free_port())], env=rpc_env, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "--allow-lan" in done.stderr and "authentication" in done.stderr
    with socket.socket() as holder:   # llama.cpp would abort on a taken port: refused before it starts
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        done = subprocess.run([sys.executable, "-m", "edgeinfer", "rpc-worker", "--port",
                               str(holder.getsockname()[1])], env=rpc_env, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "is taken" in done.stderr and "--port" in done.stderr, done.stderr


def test_a_model_split_over_workers_answers_as_it_does_locally(real_store, rpc_env):
    """SmolLM2 over one worker, over two, and over two offering 1 and 3 GB,
    greedy, beside the same model in this process; each worker holds its
    share of the weights, in proportion to what it offers."""
    import edgeinfer

    path = real_store.resolve("smollm2-135m-instruct").path
    prompt = "The capital of France is"
    with edgeinfer.Engine(path, n_ctx=512, threads=1, prompt_cache=False) as e:
        local = e.generate(prompt, max_tokens=16, temperature=0)
    weights = path.stat().st_size
    alone = None
    for mems in ((None,), (None, None), ("1G", "3G")):
        n = len(mems)
        workers = [Worker(rpc_env, mem=m) for m in mems]
        before = [w.rss() for w in workers]
        # EDGEINFER_DEBUG lets llama.cpp's log through: it names each layer's device.
        s = serve(str(path), workers, {**rpc_env, "EDGEINFER_DEBUG": "1"})
        try:
            r = s.openai().completions.create(model=path.name, prompt=prompt, max_tokens=16, temperature=0)
            assert r.choices[0].text == local, (n, r.choices[0].text, local)
            # Each holds its share of the weights (and of the KV cache and work buffers).
            grown = [w.rss() - b for w, b in zip(workers, before)]
            assert all(g > 0.3 * weights / n for g in grown), (n, grown, weights)
            if alone is None:
                alone = grown[0]
            else:
                assert all(g < 0.8 * alone for g in grown), (grown, alone)
            layers = [sum(f"assigned to device RPC{i}," in line for line in s.log) for i in range(n)]
            assert sum(layers) >= 30 and all(layers), layers   # SmolLM2's 30 layers, and the output's
            if mems[0]:   # offered 1 GB and 3 GB: layers split about 1:3
                assert 2 * layers[0] < layers[1], layers
        finally:
            assert s.stop() == 0
            for w in workers:
                w.kill()


def test_a_lost_worker_fails_its_answer_and_the_server_lives(tiny_model, rpc_env):
    import openai

    w = Worker(rpc_env)
    s = serve(tiny_model, [w], rpc_env)
    try:
        client = s.openai()
        stream = client.completions.create(model=os.path.basename(tiny_model), prompt="Once", max_tokens=3000,
                                           temperature=0, stream=True, extra_body={"ignore_eos": True})
        next(iter(stream))
        w.kill()
        with pytest.raises((openai.APIError, openai.APIConnectionError)):
            for _ in stream:
                pass
        assert s.json("GET", "/health")[0] == 200   # the server is alive
        w = Worker(rpc_env, port=w.port)             # the worker is back
        for _ in range(30):
            try:
                r = client.completions.create(model=os.path.basename(tiny_model), prompt="Once", max_tokens=4,
                                              temperature=0)
                break
            except openai.APIError:
                time.sleep(1)
        assert r.choices[0].finish_reason in ("length", "stop")
    finally:
        assert s.stop() == 0
        w.kill()
