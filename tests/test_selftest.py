"""The native self-test: native code is tried in a child before it is trusted.

Faults are injected into the real child process with
EDGEINFER_SELFTEST_FAULT (it kills itself with SIGSEGV or SIGABRT, or hangs,
after its prefill), so the fallback is driven on any CPU; the NUL-token
files abort the real llama.cpp.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import gguf
import pytest
from click.testing import CliRunner

import edgeinfer
from edgeinfer import gguf_file, native, selftest
from edgeinfer.cli import cli
from edgeinfer.engine import Engine
from edgeinfer.errors import EngineError, GGUFError, NativeSettingError

pytestmark = pytest.mark.usefixtures("fresh_selftest")


def tried() -> list[str]:
    """The settings the self-test would actually run here, in order."""
    return [s for s, skip in selftest.candidates() if skip is None]


def two_settings() -> list[str]:
    cands = tried()
    if len(cands) < 2:
        pytest.skip(f"this llama.cpp build offers one native setting only ({cands}): nothing to fall back to")
    return cands


def nul_token_copy(src: Path, dst: Path) -> tuple[Path, str]:
    """A copy of ``src`` where one vocabulary token gets a NUL byte that
    makes it collide with another ("ab..." becomes "a\\0..."), as the
    mutation fuzz found in the default model."""
    reader = gguf.GGUFReader(src)
    field = reader.fields["tokenizer.ggml.tokens"]
    tokens = [bytes(field.parts[i]) for i in field.data]
    present = set(tokens)
    data = bytearray(src.read_bytes())
    for tok in tokens:
        if len(tok) >= 3 and tok[:1] in present and tok.isascii() and tok.isalpha():
            needle = struct.pack("<Q", len(tok)) + tok
            at = data.find(needle)
            if at >= 0 and data.find(needle, at + 1) < 0:
                data[at + 9] = 0
                dst.write_bytes(bytes(data))
                return dst, tok.decode()
    raise AssertionError("no token to damage in the tiny vocabulary")


# -- the first load, and the record -------------------------------------------------

def test_first_load_runs_the_child_then_the_record_makes_loads_free(tiny_model, monkeypatch):
    with Engine(tiny_model, threads=1, prompt_cache=False) as e:
        first = e.native
        assert first.source == "self-test"
        assert first.setting == tried()[0]
        assert [t.outcome for t in first.trials if t.outcome != "skipped"] == ["ok"]
        assert first.trials[-1].stage == "decoded"
        e.generate("Hello", max_tokens=3, temperature=0)
        assert e.last_stats.generated_tokens > 0 and e.last_stats.native == first.setting
    monkeypatch.setenv(selftest.FAULT_ENV, "*:segv")  # any child would now die: none runs
    with Engine(tiny_model, threads=1, prompt_cache=False) as e:
        assert e.native.source == "record" and e.native.setting == first.setting
    rec = json.loads(selftest.record_path().read_text())
    assert rec["machine"]["build"]["system_info"] == native.system_info()


def test_a_segfaulting_setting_is_turned_off_remembered_and_reported(tiny_model, monkeypatch):
    first, second = two_settings()[:2]
    monkeypatch.setenv(selftest.FAULT_ENV, f"{first}:segv")
    with Engine(tiny_model, threads=1, prompt_cache=False) as e:
        assert e.native.setting == second and e.native.source == "self-test"
        crash = next(t for t in e.native.trials if t.setting == first)
        assert crash.outcome == "signal" and crash.signal == "SIGSEGV" and crash.stage == "prefilled"
        assert "Segmentation fault" in crash.detail  # faulthandler's words from the child
        events = list(e.stream("Once upon a time", max_tokens=4, temperature=0))
        assert events[-1].stats.generated_tokens > 0 and events[-1].stats.native == second

    # Remembered: a later load runs no child at all, so a fault in every
    # setting cannot touch it.
    monkeypatch.setenv(selftest.FAULT_ENV, "*:segv")
    with Engine(tiny_model, threads=1, prompt_cache=False) as e:
        assert e.native.setting == second and e.native.source == "record"

    monkeypatch.delenv(selftest.FAULT_ENV)
    out = CliRunner().invoke(cli, ["doctor"])
    assert out.exit_code == 0, out.output
    assert f"{first} died by SIGSEGV" in out.output
    d = json.loads(CliRunner().invoke(cli, ["doctor", "--json"]).output)["native"]
    assert first in d["crashed"] and d["models"][0]["setting"] == second


def test_a_crashed_setting_is_skipped_for_the_next_model(tiny_model, tmp_path, monkeypatch):
    first, second = two_settings()[:2]
    other = edgeinfer_tiny_copy(tiny_model, tmp_path / "other.gguf")
    monkeypatch.setenv(selftest.FAULT_ENV, f"{first}:segv")
    Engine(tiny_model, threads=1, prompt_cache=False).close()
    monkeypatch.delenv(selftest.FAULT_ENV)
    with Engine(other, threads=1, prompt_cache=False) as e:
        skipped = next(t for t in e.native.trials if t.setting == first)
        assert skipped.outcome == "skipped" and "crashed here before" in skipped.detail
        assert e.native.setting == second


def edgeinfer_tiny_copy(src: Path, dst: Path) -> Path:
    dst.write_bytes(src.read_bytes())
    return dst


def test_a_hang_is_cut_off_by_the_timeout(tiny_model, monkeypatch):
    first, second = two_settings()[:2]
    monkeypatch.setenv(selftest.FAULT_ENV, f"{first}:hang")
    monkeypatch.setenv(selftest.TIMEOUT_ENV, "8")
    t0 = time.monotonic()
    with Engine(tiny_model, threads=1, prompt_cache=False) as e:
        assert e.native.setting == second
        hang = next(t for t in e.native.trials if t.setting == first)
        assert hang.outcome == "hang" and 7 < hang.seconds < 20
    assert time.monotonic() - t0 < 40


def test_a_file_that_crashes_every_setting_is_refused_and_remembered(tiny_model, monkeypatch):
    monkeypatch.setenv(selftest.FAULT_ENV, "*:abort")
    with pytest.raises(GGUFError) as e:
        edgeinfer.load(tiny_model)
    assert "SIGABRT" in str(e.value) and "every native setting" in str(e.value)
    assert "edgeinfer doctor --selftest" in e.value.hint
    monkeypatch.delenv(selftest.FAULT_ENV)
    with pytest.raises(GGUFError, match="earlier test process"):
        edgeinfer.load(tiny_model)  # remembered: no child, the same answer
    out = CliRunner().invoke(cli, ["doctor"])
    assert "refused" in out.output and "SIGABRT" in out.output
    # doctor --selftest forgets and tests again; now the file passes
    out = CliRunner().invoke(cli, ["doctor", "--selftest", str(tiny_model)])
    assert out.exit_code == 0, out.output
    assert "refused" not in out.output
    with edgeinfer.load(tiny_model, threads=1, prompt_cache=False) as engine:
        assert engine.native.source == "record"


@pytest.mark.parametrize("damage", ["garbage", "wrong machine", "wrong shape", "old version"])
def test_a_damaged_or_stale_record_is_ignored(tiny_model, damage):
    Engine(tiny_model, threads=1, prompt_cache=False).close()
    path = selftest.record_path()
    rec = json.loads(path.read_text())
    if damage == "garbage":
        path.write_bytes(b"\x00{not json")
    elif damage == "wrong machine":
        rec["machine"]["cpu_model"] = "another CPU"
        path.write_text(json.dumps(rec))
    elif damage == "wrong shape":
        for v in rec["models"].values():
            v["passed"] = "yes"
        path.write_text(json.dumps(rec))
    else:
        rec["version"] = 0
        path.write_text(json.dumps(rec))
    with Engine(tiny_model, threads=1, prompt_cache=False) as e:
        assert e.native.source == "self-test"
    assert json.loads(path.read_text())["version"] == selftest.RECORD_VERSION


def test_a_forced_setting_wins_over_the_record(tiny_model, monkeypatch):
    with Engine(tiny_model, threads=1, prompt_cache=False) as e:
        chosen = e.native.setting
    forced = next(s for s in native.ladder()[::-1] if s != chosen) if len(native.ladder()) > 1 else chosen
    with Engine(tiny_model, threads=1, prompt_cache=False, native=forced) as e:
        assert (e.native.setting, e.native.source) == (forced, "forced")
        e.generate("Hi", max_tokens=2, temperature=0)
        assert e.last_stats.generated_tokens > 0 and e.last_stats.native == forced
    monkeypatch.setenv(native.ENV, forced)
    with edgeinfer.load(tiny_model, threads=1, prompt_cache=False) as e:
        assert (e.native.setting, e.native.source) == (forced, "forced")
    monkeypatch.setenv(native.ENV, "auto")
    with edgeinfer.load(tiny_model, threads=1, prompt_cache=False) as e:
        assert (e.native.setting, e.native.source) == (chosen, "record")
    monkeypatch.setenv(native.ENV, "fastest")
    with pytest.raises(NativeSettingError) as err:
        edgeinfer.load(tiny_model)
    assert isinstance(err.value, ValueError) and "plain" in err.value.hint


def test_a_forced_setting_that_crashes_is_an_error_that_says_what_to_do(tiny_model, monkeypatch):
    setting = native.ladder()[0]
    monkeypatch.setenv(selftest.FAULT_ENV, f"{setting}:segv")
    with pytest.raises(EngineError) as e:
        Engine(tiny_model, threads=1, native=setting)
    assert "forced" in str(e.value) and "SIGSEGV" in str(e.value)
    assert native.ENV in e.value.hint


# -- files that abort llama.cpp -------------------------------------------------------

def test_a_nul_in_a_token_is_refused_by_import_run_and_load(tiny_model, tmp_path):
    bad, token = nul_token_copy(tiny_model, tmp_path / "nul.gguf")
    with pytest.raises(GGUFError, match="NUL byte"):
        edgeinfer.load(bad)
    r = CliRunner().invoke(cli, ["import", str(bad), "--name", "bad"])
    assert r.exit_code == 1 and "NUL byte" in r.output
    assert edgeinfer.ModelStore().list() == []
    r = CliRunner().invoke(cli, ["run", str(bad), "hi"])
    assert r.exit_code == 1 and "NUL byte" in r.output


def test_duplicate_tokens_are_refused(tiny_model, tmp_path):
    reader = gguf.GGUFReader(tiny_model)
    field = reader.fields["tokenizer.ggml.tokens"]
    tokens = [bytes(field.parts[i]) for i in field.data]
    a, b = next((x, y) for x in tokens for y in tokens if x != y and len(x) == len(y) >= 3 and x.isalpha())
    data = tiny_model.read_bytes()
    needle = struct.pack("<Q", len(b)) + b
    dup = tmp_path / "dup.gguf"
    dup.write_bytes(data.replace(needle, struct.pack("<Q", len(a)) + a, 1))
    with pytest.raises(GGUFError, match="are both"):
        edgeinfer.read_gguf(dup)


def test_the_child_guard_catches_what_the_header_check_misses(tiny_model, tmp_path, monkeypatch):
    # Pretend read_gguf had no vocabulary check: llama.cpp itself now
    # aborts on the file, in the child, with every setting.
    bad, _ = nul_token_copy(tiny_model, tmp_path / "nul.gguf")
    monkeypatch.setattr(gguf_file, "_vocab_check", lambda: lambda i, b: None)
    with pytest.raises(GGUFError) as e:
        Engine(bad, threads=1)
    assert "SIGABRT" in str(e.value)
    assert "GGML_ASSERT" in str(e.value)  # llama.cpp's own words, from the child's stderr
    # the vocabulary-only check that import runs sees the same
    with pytest.raises(GGUFError, match="SIGABRT"):
        selftest.check_file(bad)


_FUZZ = r"""
import json, random, sys, time
from pathlib import Path
import edgeinfer
from edgeinfer.errors import EdgeinferError

src, out_dir, seed, budget = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
data = src.read_bytes()
header_end = edgeinfer.read_gguf(src).data_offset
rng = random.Random(seed)
counts = {"rejected by read_gguf": 0, "refused by llama.cpp or the self-test": 0, "ran": 0}
t0, i = time.monotonic(), 0
while time.monotonic() - t0 < budget:
    i += 1
    buf = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        buf[rng.randrange(24, header_end)] = rng.randrange(256)
    path = out_dir / f"mutant-{i}.gguf"
    path.write_bytes(bytes(buf))
    print("TRY", path, flush=True)
    try:
        edgeinfer.read_gguf(path)
    except EdgeinferError:
        counts["rejected by read_gguf"] += 1
        path.unlink()
        continue
    try:
        with edgeinfer.load(path, threads=1, n_ctx=256, prompt_cache=False, check_memory=False) as e:
            e.generate("Hello", max_tokens=2, temperature=0)
        counts["ran"] += 1
    except EdgeinferError:
        counts["refused by llama.cpp or the self-test"] += 1
    path.unlink()
print(json.dumps(counts))
"""


def fuzz(model: Path, tmp_path: Path, seed: int, budget: float) -> dict:
    """Mutate 1-8 bytes of the header, metadata and tensor infos, again and
    again for ``budget`` seconds, and load each copy that passes read_gguf
    in a caller process: that process must survive every one."""
    p = subprocess.run([sys.executable, "-c", _FUZZ, str(model), str(tmp_path), str(seed), str(budget)],
                       capture_output=True, text=True, timeout=budget + 300)
    tries = [ln.split(" ", 1)[1] for ln in p.stdout.splitlines() if ln.startswith("TRY ")]
    assert p.returncode == 0, (f"the caller died (status {p.returncode}) on {tries[-1] if tries else '?'}: "
                               f"{p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_mutated_headers_never_kill_the_caller(tiny_model, tmp_path):
    counts = fuzz(tiny_model, tmp_path, seed=8, budget=40)
    assert sum(counts.values()) >= 20, counts


@pytest.mark.real_model
@pytest.mark.slow
def test_mutated_headers_of_the_real_model_never_kill_the_caller(real_model_home, tmp_path):
    model = edgeinfer.ModelStore().resolve(edgeinfer.default_entry().ref).path
    counts = fuzz(model, tmp_path, seed=400, budget=90)
    assert sum(counts.values()) >= 40, counts


# -- the settings themselves ------------------------------------------------------------

def test_no_amx_points_only_matmul_weights_at_cpu_repack(tiny_model, tmp_path):
    if "no_amx" not in native.ladder():
        pytest.skip("this build has no AMX buffer type, so no no_amx setting")
    from edgeinfer.quantize import quantize

    assert CliRunner().invoke(cli, ["import", str(tiny_model), "--name", "tiny:f32"]).exit_code == 0
    m = quantize("tiny:f32", "q4_0")
    info = edgeinfer.read_gguf(m.path)
    names = native.repack_tensors(info)
    assert names and all(n.startswith("blk.") and n.endswith(".weight") for n in names)
    assert "token_embd.weight" not in names
    params = native.ModelParams("no_amx", info)
    assert params.repacked == len(names) and not params.params.use_extra_bufts
    with edgeinfer.load("tiny:q4_0", threads=1, prompt_cache=False, native="no_amx") as e:
        assert e.native.setting == "no_amx" and e.native.trials[-1].outcome == "ok"
        e.generate("Hello there", max_tokens=4, temperature=0)
        assert e.last_stats.generated_tokens > 0


def test_override_patterns_group_weights_by_kind():
    names = [f"blk.{i}.ffn_up.weight" for i in range(3)] + ["blk.1.attn_q.weight", "output.weight"]
    assert native.override_patterns(names) == [r"^blk\.(?:1)\.attn_q\.weight$",
                                               r"^blk\.(?:0|1|2)\.ffn_up\.weight$"]


def test_the_ladder_runs_from_fastest_to_safest():
    ladder = native.ladder()
    assert ladder[0] == "full"
    assert ladder == [s for s in native.SETTINGS if s in ladder]
    if native.extra_buffer_types():
        assert ladder[-1] == "plain"


# -- a crash that still happens gets a message --------------------------------------------

_CRASH_IN_CLI = r"""
import ctypes, sys
import edgeinfer.engine as engine
def crash(self, *args, **kwargs):
    ctypes.string_at(0)  # a native crash inside a load
engine.Engine.__init__ = crash
sys.argv = ["edgeinfer", "run", sys.argv[1], "hi"]
from edgeinfer.cli import main
main()
"""


def test_a_native_crash_in_the_cli_names_its_frame_and_the_next_run_says_what_to_do(tiny_model):
    env = {**os.environ, "GGML_NO_BACKTRACE": "1"}
    p = subprocess.run([sys.executable, "-c", _CRASH_IN_CLI, str(tiny_model)], capture_output=True,
                       text=True, timeout=60, env=env)
    assert p.returncode == -signal.SIGSEGV
    assert "Fatal Python error: Segmentation fault" in p.stderr and "in crash" in p.stderr
    p = subprocess.run([sys.executable, "-m", "edgeinfer", "list"], capture_output=True, text=True,
                       timeout=60, env=env)
    assert p.returncode == 0
    assert "ended without finishing" in p.stderr and "edgeinfer doctor --selftest" in p.stderr
    assert "'edgeinfer run" in p.stderr
    # said once: the marker is gone
    p = subprocess.run([sys.executable, "-m", "edgeinfer", "list"], capture_output=True, text=True,
                       timeout=60, env=env)
    assert "ended without finishing" not in p.stderr


def test_a_run_that_finishes_leaves_no_marker(tiny_model):
    p = subprocess.run([sys.executable, "-m", "edgeinfer", "run", str(tiny_model), "hi", "--max-tokens", "2"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert list((edgeinfer.paths.home() / "runs").glob("*.json")) == []
