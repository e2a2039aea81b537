"""A tight memory limit gets an answer or a clear refusal, never the OOM
killer: `edgeinfer serve` with the default model in a memory cgroup held
to what a 1 GB board leaves it, and the same model in one too small for it.

Real-model tier. The cgroup is made here (v1 or v2, which needs root);
where none can be made, the test skips and says why."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from served import start_http as start

pytestmark = [pytest.mark.real_model, pytest.mark.timeout(300)]

MODEL = "smollm2-135m-instruct"
ONE_GB_BOARD = 700 << 20   # a 1 GB Pi after the OS, its services and the page cache it needs
TOO_SMALL = 100 << 20      # the model's 98 MB of weights alone would not fit


class MemoryCgroup:
    """A memory cgroup of our own, v2 or v1, that a child joins at start."""

    def __init__(self, name: str, limit: int):
        root = Path("/sys/fs/cgroup")
        try:
            if (root / "cgroup.controllers").exists():          # v2
                if "memory" not in (root / "cgroup.subtree_control").read_text():
                    (root / "cgroup.subtree_control").write_text("+memory")
                self.dir = root / name
                self.dir.mkdir(exist_ok=True)
                (self.dir / "memory.max").write_text(str(limit))
                if (self.dir / "memory.swap.max").exists():
                    (self.dir / "memory.swap.max").write_text("0")
            else:                                               # v1
                self.dir = root / "memory" / name
                self.dir.mkdir(exist_ok=True)
                (self.dir / "memory.limit_in_bytes").write_text(str(limit))
        except OSError as e:
            pytest.skip(f"cannot make a memory cgroup here ({e.strerror}): run as root with cgroups mounted")
        self.limit = limit

    def set_limit(self, limit: int) -> None:
        name = "memory.max" if (self.dir / "memory.max").exists() else "memory.limit_in_bytes"
        (self.dir / name).write_text(str(limit))
        self.limit = limit

    def usage(self) -> int:
        name = "memory.current" if (self.dir / "memory.current").exists() else "memory.usage_in_bytes"
        return int((self.dir / name).read_text())

    def join(self) -> None:   # a preexec_fn: runs in the child before exec
        (self.dir / "cgroup.procs").write_text(str(os.getpid()))

    def close(self) -> None:
        try:
            self.dir.rmdir()
        except OSError:
            pass


@pytest.fixture
def cgroup(request):
    made = []

    def make(limit: int) -> MemoryCgroup:
        cg = MemoryCgroup(f"edgeinfer-test-{os.getpid()}-{len(made)}", limit)
        made.append(cg)
        return cg

    yield make
    for cg in made:
        cg.close()


def serve_in(cg: MemoryCgroup, monkeypatch, model: str | None = MODEL, *args):
    """The HTTP server (served.start_http), with its process put in ``cg``
    (the models' processes it starts are in it too)."""
    real_popen = subprocess.Popen
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: real_popen(*a, preexec_fn=cg.join, **k))
    try:
        return start(model, *args, env={"EDGEINFER_HOME": os.environ["EDGEINFER_HOME"]})
    finally:
        monkeypatch.setattr(subprocess, "Popen", real_popen)


def test_the_default_model_serves_within_a_1gb_boards_limit(real_model_home, cgroup, monkeypatch):
    cg = cgroup(ONE_GB_BOARD)
    s = serve_in(cg, monkeypatch)
    try:
        r = s.openai().chat.completions.create(model=MODEL, temperature=0, max_tokens=30,
                                               messages=[{"role": "user", "content": "What is the capital of France?"}])
        assert "paris" in r.choices[0].message.content.lower()
        metrics = s.metrics()
        # It saw the limit: the small-box defaults (one sequence, 1024 tokens at 700 MB).
        label = f'{{model="{MODEL}:q4_1"}}'
        assert metrics["edgeinfer_kv_cells" + label] == 1024 and metrics["edgeinfer_parallel_sequences" + label] == 1
    finally:
        assert s.stop() == 0


def test_a_model_too_large_for_the_limit_is_refused_not_killed(real_model_home, cgroup):
    cg = cgroup(TOO_SMALL)
    cmd = [sys.executable, "-m", "edgeinfer", "serve", MODEL, "--no-jsonl", "--http", "0", "--threads", "1"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, preexec_fn=cg.join,
                         env={**os.environ, "EDGEINFER_HOME": os.environ["EDGEINFER_HOME"]})
    assert out.returncode == 1, (out.returncode, out.stderr[-2000:])   # 137 would be the OOM killer
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("Error:") and MODEL in last and "GB is available" in last, last
    assert "does not fit" in last or "--n-ctx" in last


def test_two_models_that_fit_one_at_a_time_take_turns(real_model_home, cgroup, monkeypatch):
    """A cap that holds one model but not two, and requests alternating
    between them: each load unloads the idle one first, every request is
    answered, and the OOM killer never comes."""
    from edgeinfer.gguf_file import read_gguf
    from edgeinfer.pull import import_file
    from edgeinfer.store import ModelStore

    store = ModelStore()
    if store.get("smollm2-copy") is None:   # the same weights under a second name: a second model to load
        import_file(store.resolve(MODEL).path, "smollm2-copy:q4_1", store=store)
    cg = cgroup(ONE_GB_BOARD)
    s = serve_in(cg, monkeypatch, None)
    try:
        client = s.openai()
        # What the cgroup is charged for the server alone and with one model
        # (the model's file pages are charged to whoever read them first, so
        # this is measured, not assumed), and what the fit check counts
        # for a model: the cap is set between one model and two.
        alone = cg.usage()
        client.chat.completions.create(model=MODEL, max_tokens=1, messages=[{"role": "user", "content": "Hi"}])
        one = cg.usage()
        need = read_gguf(store.resolve(MODEL).path).memory_estimate(1024)   # the small-box context
        cg.set_limit(alone + need + (one - alone) // 2)
        answers: dict[str, set] = {}
        for _ in range(3):
            for name in (MODEL, "smollm2-copy"):
                r = client.chat.completions.create(model=name, temperature=0, max_tokens=12, messages=[
                    {"role": "user", "content": "What is the capital of France?"}])
                answers.setdefault(name, set()).add(r.choices[0].message.content)
                _, body = s.json("GET", "/v1/models")
                assert [c["id"] for c in body["data"] if c["loaded"]] == [r.model]   # one at a time
        # The same answer each time (the copy has no catalog system prompt, so its own).
        assert all(len(a) == 1 for a in answers.values()), answers
        assert "paris" in answers[MODEL].pop().lower()
        assert s.proc.poll() is None
        assert any("to make room for" in line for line in s.log)
    finally:
        assert s.stop() == 0
        store.remove("smollm2-copy:q4_1")   # the name only: its file is the other's too
