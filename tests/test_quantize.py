"""quantize, convert and compare on the tiny model: what lands in the store,
which tensor types the new GGUF really holds, the refusals, a Ctrl-C or a
kill in the middle, and the quality figures that compare reports.

The tiny model has random weights, so its figures are not a real model's;
what holds for it (and is checked here) is the ordering: a model against
itself has KL 0, Q8_0 is much closer to the F16 master than Q4_0.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import gguf
import llama_cpp
import numpy as np
import psutil
import pytest
from click.testing import CliRunner, Result

import edgeinfer
from edgeinfer.cli import cli
from edgeinfer.engine import DoneEvent
from edgeinfer.errors import DiskSpaceError, GGUFError, QuantizeError
from edgeinfer.gguf_file import read_gguf
from edgeinfer.quality import compare
from edgeinfer.quantize import convert, is_quantized, parse_type, quant_types, quantize
from edgeinfer.store import ModelStore

ROOT = Path(__file__).resolve().parent.parent

# -- helpers ------------------------------------------------------------------


def run(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args))


def assert_one_line_error(result: Result, *needles: str) -> str:
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), f"the error escaped as {result.exception!r}"
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert result.stdout == ""
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def store_files(root: Path) -> list[Path]:
    if not root.exists():
        return []
    return sorted(p for p in root.rglob("*") if p.is_file() and p.parent.name != "locks")


def weight_types(path: Path) -> dict[str, str]:
    """Tensor name -> ggml type name, for the matrices (2-D tensors)."""
    return {t.name: t.type_name for t in read_gguf(path).tensors if len(t.shape) >= 2}


def vector_types(path: Path) -> set[str]:
    return {t.type_name for t in read_gguf(path).tensors if len(t.shape) == 1}


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def generate(ref: str, prompt: str = "The weather was") -> tuple[str, DoneEvent]:
    with edgeinfer.load(ref, n_ctx=256, prompt_cache=False) as engine:
        events = list(engine.stream(prompt, max_tokens=8, temperature=0))
    return "".join(e.text for e in events), events[-1]


def assert_generates(ref: str) -> None:
    text, done = generate(ref)
    assert isinstance(done, DoneEvent)
    assert done.stats.generated_tokens > 0 and text, (text, done.stats)


def build_variant(path: Path, **constants) -> Path:
    """The tiny model's builder with some of its size constants changed."""
    spec = importlib.util.spec_from_file_location("build_tiny_model_variant",
                                                  ROOT / "scripts" / "build_tiny_model.py")
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)  # a fresh module: its constants are ours to change
    for key, value in constants.items():
        setattr(builder, key, value)
    builder.HEAD_DIM = builder.N_EMBD // builder.N_HEAD
    return builder.build(path)


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.005)
    pytest.fail(f"timed out after {timeout}s waiting for {what}")


# -- fixtures -----------------------------------------------------------------


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """Engines and in-process quantizes use one thread: the test machine is
    shared, and llama.cpp's spinning threads crawl when oversubscribed
    (8 tokens of the tiny model: 3 s with 2 threads, 2 ms with 1)."""
    import edgeinfer.hardware

    monkeypatch.setattr(edgeinfer.hardware, "default_threads", lambda: 1)


@pytest.fixture
def store() -> ModelStore:
    return ModelStore()


@pytest.fixture
def tiny(tiny_model):
    """tiny:f16 in this test's store: a full-precision master."""
    return edgeinfer.import_file(tiny_model, "tiny:f16")


@pytest.fixture
def tiny_q8(tiny):
    return quantize("tiny:f16", "q8_0")


@pytest.fixture(scope="module")
def other_vocab_model(tmp_path_factory) -> Path:
    """Same architecture as the tiny model, a smaller BPE vocabulary (512)."""
    return build_variant(tmp_path_factory.mktemp("other-vocab") / "other.gguf", VOCAB_SIZE=512)


@pytest.fixture(scope="module")
def big_model(tmp_path_factory):
    """A 254 MB F16 model: llama.cpp needs a couple of seconds to quantize
    it, long enough to interrupt it while the output is being written."""
    path = build_variant(tmp_path_factory.mktemp("big") / "big.gguf", N_EMBD=1024, N_FF=4096, N_LAYER=8)
    yield path
    path.unlink(missing_ok=True)


@pytest.fixture
def big(big_model, store):
    m = edgeinfer.import_file(big_model, "big:f16")
    yield m
    shutil.rmtree(store.root, ignore_errors=True)  # 400 MB per test is too much to keep around


# -- quantize: the ordinary paths ---------------------------------------------


@pytest.mark.parametrize("to, tag, main_type, also", [
    ("q8_0", "q8_0", "Q8_0", set()),
    ("Q4_0", "q4_0", "Q4_0", {"Q6_K"}),            # llama.cpp keeps output.weight at Q6_K
    ("Q4_K_M", "q4_k_m", "Q4_K", {"Q6_K"}),        # the _M mix: some tensors Q6_K
    ("q4_k_m", "q4_k_m", "Q4_K", {"Q6_K"}),
    ("iq4_nl", "iq4_nl", "IQ4_NL", {"Q6_K"}),      # an IQ type that needs no imatrix
])
def test_quantize_makes_a_child_model_with_the_target_types(tiny, store, to, tag, main_type, also):
    m = quantize("tiny:f16", to)

    assert m.ref == f"tiny:{tag}"
    stored = store.get(m.ref)  # read back from disk, not the object quantize returned
    assert stored.sha256 == m.sha256 == sha256_of(stored.path)
    assert stored.parent == tiny.sha256
    assert stored.options["type"] == parse_type(to)
    assert stored.options["llama_cpp"] == f"llama-cpp-python {llama_cpp.__version__}"
    assert stored.options["pure"] is False and stored.options["allow_requantize"] is False
    assert stored.source == f"quantize tiny:f16 --to {tag}"
    assert stored.facts["quant"] == parse_type(to)

    types = weight_types(stored.path)
    assert set(types.values()) <= {main_type} | also, types
    assert sum(t == main_type for t in types.values()) > len(types) / 2
    assert types["blk.0.ffn_up.weight"] == main_type
    assert vector_types(stored.path) == {"F32"}  # norms stay F32
    info = read_gguf(stored.path)
    assert is_quantized(info) and info.file_type == parse_type(to)
    assert stored.size < tiny.size
    assert_generates(m.ref)


def test_type_names_are_case_insensitive():
    assert parse_type("Q4_K_M") == parse_type("q4_k_m") == parse_type(" q4_K_m ") == "Q4_K_M"
    assert {"Q8_0", "Q4_0", "Q4_K_M", "IQ4_NL", "F16", "BF16", "F32"} <= set(quant_types())
    # types llama.cpp only makes with an importance matrix are not offered
    assert "IQ2_XXS" not in quant_types() and "IQ1_S" not in quant_types()


def test_smaller_types_make_smaller_files(tiny):
    sizes = {t: quantize("tiny:f16", t).size for t in ("q8_0", "q4_0")}
    assert sizes["q4_0"] < sizes["q8_0"] < tiny.size


def test_cli_quantize_to_a_name_and_a_tag(tiny, store):
    result = run("quantize", "tiny:f16", "--to", "Q8_0", "--name", "mine", "--threads", "1", "-q")
    assert result.exit_code == 0, result.output
    m = store.get("mine:q8_0")
    assert result.stdout.startswith("mine:q8_0 made from tiny:f16 (") and m.sha256[:12] in result.stdout
    assert result.stderr == ""  # -q: no progress, no log
    assert m.parent == tiny.sha256 and m.options["threads"] == 1
    assert store.get("tiny:q8_0") is None

    result = run("quantize", "tiny:f16", "--to", "q4_0", "--name", "mine:small", "-q")
    assert result.exit_code == 0, result.output
    m = store.get("mine:small")
    assert m.options["type"] == "Q4_0" and "Q4_0" in weight_types(m.path).values()
    assert_generates("mine:small")


@pytest.mark.parametrize("flags, output_type, option", [
    ([], "Q6_K", {}),
    (["--pure"], "Q4_0", {"pure": True}),
    (["--leave-output-tensor"], "F16", {"leave_output_tensor": True}),
    (["--output-tensor-type", "q8_0"], "Q8_0", {"output_tensor_type": "q8_0"}),
], ids=["default", "pure", "leave-output-tensor", "output-tensor-type"])
def test_output_tensor_flags(tiny, store, flags, output_type, option):
    result = run("quantize", "tiny:f16", "--to", "q4_0", "--name", "t:out", "-q", *flags)
    assert result.exit_code == 0, result.output
    m = store.get("t:out")
    types = weight_types(m.path)
    assert types["output.weight"] == output_type
    others = {t for name, t in types.items() if name != "output.weight"}
    assert others == {"Q4_0"}, types
    for key, value in option.items():
        assert m.options[key] == value
    assert_generates("t:out")


def test_unknown_output_tensor_type_is_refused(tiny, store):
    before = store_files(store.root)
    with pytest.raises(QuantizeError, match="q9_9"):
        quantize("tiny:f16", "q4_0", output_tensor_type="q9_9")
    assert store_files(store.root) == before


@pytest.mark.parametrize("to, weight_type", [("bf16", "BF16"), ("F32", "F32")])
def test_quantize_to_full_precision(tiny, store, to, weight_type):
    m = quantize("tiny:f16", to)
    assert m.ref == f"tiny:{to.lower()}" and m.parent == tiny.sha256
    assert set(weight_types(m.path).values()) == {weight_type}
    assert not is_quantized(read_gguf(m.path))
    assert_generates(m.ref)


# -- refusals -----------------------------------------------------------------


def test_unknown_type_lists_the_valid_ones(tiny, store):
    before = store_files(store.root)
    with pytest.raises(QuantizeError) as err:
        quantize("tiny:f16", "q9_9")
    assert "q9_9" in str(err.value)
    for t in ("q4_0", "q4_k_m", "q8_0", "iq4_nl", "f16"):
        assert t in err.value.hint

    line = assert_one_line_error(run("quantize", "tiny:f16", "--to", "q9_9"), "q9_9", "q4_k_m", "q8_0")
    assert "use one of" in line
    assert store_files(store.root) == before


def test_quantize_needs_to_or_ladder(tiny):
    result = run("quantize", "tiny:f16")
    assert result.exit_code == 2 and "--to" in result.stderr and "q4_k_m" in result.stderr


def test_requantizing_is_refused_with_what_to_do(tiny_q8, store):
    before = store_files(store.root)
    with pytest.raises(QuantizeError) as err:
        quantize("tiny:q8_0", "q4_0")
    one = err.value.one_line()
    assert "already quantized" in one and "Q8_0" in one
    assert "--allow-requantize" in one and "edgeinfer convert tiny:q8_0 --to f16" in one

    assert_one_line_error(run("quantize", "tiny:q8_0", "--to", "q4_0"),
                          "already quantized", "--allow-requantize", "convert")
    assert store_files(store.root) == before
    assert store.get("tiny:q4_0") is None


def test_requantizing_with_allow_requantize_works_and_warns(tiny_q8, store):
    logged: list[str] = []
    m = quantize("tiny:q8_0", "q4_0", name="re:lib", allow_requantize=True, log=logged.append)
    assert any(line.startswith("warning: requantizing Q8_0 to Q4_0") for line in logged), logged
    assert m.parent == tiny_q8.sha256 and m.options["allow_requantize"] is True

    result = run("quantize", "tiny:q8_0", "--to", "q4_0", "--allow-requantize", "--name", "re:cli")
    assert result.exit_code == 0, result.output
    assert "warning: requantizing Q8_0 to Q4_0 compounds quality loss" in result.stderr
    assert result.stdout.startswith("re:cli made from tiny:q8_0")
    assert "Q4_0" in weight_types(store.get("re:cli").path).values()
    assert_generates("re:cli")


def test_not_enough_disk_is_refused_before_anything_is_written(tiny, store, monkeypatch):
    import edgeinfer.download

    monkeypatch.setattr(edgeinfer.download, "free_bytes", lambda _path: 1_000_000)
    before = store_files(store.root)
    with pytest.raises(DiskSpaceError, match="GB is free"):
        quantize("tiny:f16", "q8_0")
    with pytest.raises(DiskSpaceError):
        convert("tiny:f16", "f32")
    assert_one_line_error(run("quantize", "tiny:f16", "--to", "q8_0"), "GB is free", "free some space")
    assert store_files(store.root) == before
    assert not any(store.scratch.iterdir())


# -- interrupted and killed quantizations ------------------------------------


def start_cli_quantize(*args: str) -> subprocess.Popen:
    # Its own session, so a signal to its group reaches it and its child,
    # as Ctrl-C in a terminal reaches the whole foreground group.
    return subprocess.Popen([sys.executable, "-m", "edgeinfer", "quantize", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def wait_until_writing(proc: subprocess.Popen, store: ModelStore) -> tuple[Path, psutil.Process]:
    """Wait until llama.cpp has started writing the output; return the
    scratch file and the quantizer child."""
    def scratch_file():
        assert proc.poll() is None, f"quantize ended early: {proc.communicate()}"
        files = list(store.scratch.glob("*.tmp-*")) if store.scratch.is_dir() else []
        return next((f for f in files if f.exists() and f.stat().st_size > 0), None)

    tmp = wait_for(scratch_file, 120, "the quantizer to start writing")
    children = psutil.Process(proc.pid).children()
    assert len(children) == 1 and "edgeinfer.quantize" in " ".join(children[0].cmdline())
    return tmp, children[0]


@pytest.mark.slow
@pytest.mark.parametrize("target", ["group", "parent"])
def test_ctrl_c_mid_quantize_leaves_nothing_behind(big, store, target):
    before = store_files(store.root)
    proc = start_cli_quantize("big:f16", "--to", "q8_0")
    tmp, child = wait_until_writing(proc, store)
    assert tmp.name == f"big-q8_0.gguf.tmp-{proc.pid}"
    if target == "group":
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    else:
        os.kill(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=60)

    assert proc.returncode != 0
    assert "Aborted" in err and "Traceback" not in err, err
    assert "made from" not in out
    with contextlib.suppress(psutil.NoSuchProcess):
        child.wait(timeout=10)
    assert not child.is_running()  # the quantizer did not outlive the command
    assert store_files(store.root) == before  # no manifest, no blob, no scratch file
    assert list(store.scratch.glob("*.tmp-*")) == []
    assert list(store.blobs.glob("*.partial")) == []
    assert store.get("big:q8_0") is None


def kill_mid_quantize(store: ModelStore) -> tuple[int, Path, psutil.Process]:
    proc = start_cli_quantize("big:f16", "--to", "q8_0")
    tmp, child = wait_until_writing(proc, store)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    return proc.pid, tmp, child


@pytest.mark.slow
def test_next_quantize_cleans_the_scratch_file_of_a_killed_one(big, tiny, store):
    dead_pid, tmp, child = kill_mid_quantize(store)
    with contextlib.suppress(psutil.NoSuchProcess):
        child.wait(timeout=120)  # whatever the orphaned child still does, let it end
    assert tmp.name.endswith(f".tmp-{dead_pid}")
    if not tmp.exists():  # a quantizer that removed its own output when orphaned
        tmp.write_bytes(b"left by a killed quantize")
    assert not psutil.pid_exists(dead_pid)
    assert store.get("big:q8_0") is None

    # A scratch file of a live process is someone else's quantize in progress.
    live = store.scratch / f"other-q4_0.gguf.tmp-{os.getppid()}"
    live.write_bytes(b"in progress")
    quantize("tiny:f16", "q4_0")
    assert not tmp.exists()
    assert live.exists()
    assert list(store.scratch.glob("tiny-*")) == []


@pytest.mark.slow
def test_quantizer_child_stops_when_the_parent_is_killed(big, store):
    _, tmp, child = kill_mid_quantize(store)
    with contextlib.suppress(psutil.NoSuchProcess):
        child.wait(timeout=120)
    # A child that stopped with its parent leaves at most a partial file.
    try:
        finished = set(weight_types(tmp).values()) == {"Q8_0"}
    except (GGUFError, OSError):  # truncated, or removed
        finished = False
    assert not finished, "the orphaned quantizer wrote the whole model after its parent died"


@pytest.mark.slow
def test_quantizing_a_model_with_many_tensors_does_not_hang(tmp_path, store):
    many = build_variant(tmp_path / "many.gguf", N_LAYER=80)  # 723 tensors, 91 MB
    edgeinfer.import_file(many, "many:f16")
    many.unlink()
    proc = start_cli_quantize("many:f16", "--to", "q8_0", "-q")
    try:
        out, _ = proc.communicate(timeout=15)  # about 2 s when it works
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("quantize hung")
    finally:
        shutil.rmtree(store.root / "blobs", ignore_errors=True)
    assert proc.returncode == 0 and "many:q8_0 made from many:f16" in out


def test_quantize_progress_counts_tensors_not_bytes(tiny):
    result = run("quantize", "tiny:f16", "--to", "q8_0")  # not a tty: one line every 2 s and at the end
    assert result.exit_code == 0, result.output
    assert "tiny:q8_0: starting" in result.stderr
    assert not re.search(r"\d B / \d+ B", result.stderr), result.stderr


# -- convert ------------------------------------------------------------------


def tensors_as_float32(path: Path) -> dict[str, np.ndarray]:
    from gguf.quants import dequantize

    reader = gguf.GGUFReader(str(path))
    out = {t.name: dequantize(t.data, gguf.GGMLQuantizationType(t.tensor_type)).astype(np.float32)
           .reshape(tuple(int(d) for d in reversed(t.shape.tolist())))
           for t in reader.tensors}
    del reader
    return out


@pytest.mark.parametrize("to", ["f16", "f32", "bf16"])
def test_convert_a_quant_back_to_full_precision(tiny_q8, store, to):
    m = convert("tiny:q8_0", to, name="tinyish")
    assert m.ref == f"tinyish:{to}"
    stored = store.get(m.ref)
    assert stored.parent == tiny_q8.sha256
    assert stored.options["precision_bound_by"] == "Q8_0"
    assert stored.options["converted_from"] == "Q8_0" and stored.options["type"] == to.upper()
    assert stored.source == f"convert tiny:q8_0 --to {to}"

    info, parent_info = read_gguf(stored.path), read_gguf(tiny_q8.path)
    assert not is_quantized(info) and info.file_type == to.upper()
    assert set(weight_types(stored.path).values()) == {to.upper()}
    assert vector_types(stored.path) == {"F32"}
    meta = {k: v for k, v in info.metadata.items() if k != "general.file_type"}
    assert meta == {k: v for k, v in parent_info.metadata.items() if k != "general.file_type"}
    assert [(t.name, t.shape) for t in info.tensors] == [(t.name, t.shape) for t in parent_info.tensors]

    # The weights are the Q8_0 weights, dequantized: exactly in F32, up to
    # the target's rounding otherwise.
    mine, theirs = tensors_as_float32(stored.path), tensors_as_float32(tiny_q8.path)
    assert mine.keys() == theirs.keys()
    for name, w in theirs.items():
        if to == "f32":
            np.testing.assert_array_equal(mine[name], w, err_msg=name)
        elif to == "f16" or w.ndim == 1:  # 1-D tensors (norms) stay F32
            np.testing.assert_array_equal(mine[name], w.astype(np.float16).astype(np.float32), err_msg=name)
        else:
            np.testing.assert_allclose(mine[name], w, rtol=2 ** -8, err_msg=name)
    assert_generates(m.ref)


def test_a_converted_master_quantizes_without_allow_requantize(tiny_q8, store):
    result = run("convert", "tiny:q8_0", "--to", "f16", "--name", "tinyish", "-q")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("tinyish:f16 made from tiny:q8_0")
    master = store.get("tinyish:f16")
    q = quantize("tinyish:f16", "q4_0")
    assert q.ref == "tinyish:q4_0" and q.parent == master.sha256 and master.parent == tiny_q8.sha256
    assert_generates(q.ref)


def test_convert_to_a_quantized_type_is_refused(tiny_q8, store):
    before = store_files(store.root)
    with pytest.raises(QuantizeError) as err:
        convert("tiny:q8_0", "q4_0")
    assert "edgeinfer quantize" in err.value.hint and "f16" in err.value.hint
    assert_one_line_error(run("convert", "tiny:q8_0", "--to", "q4_0"), "q4_0", "edgeinfer quantize")
    assert store_files(store.root) == before


def test_convert_does_not_replace_an_existing_master(tiny, tiny_q8, store):
    with contextlib.suppress(QuantizeError):  # refusing is fine; replacing is not
        convert("tiny:q8_0", "f16")
    assert store.get("tiny:f16").sha256 == tiny.sha256


# -- compare ------------------------------------------------------------------


def load_for_compare(ref: str):
    return edgeinfer.load(ref, n_ctx=1024, n_batch=512, prompt_cache=False)


def test_a_model_compared_with_itself(tiny):
    with load_for_compare("tiny:f16") as a, load_for_compare("tiny:f16") as b:
        (ra, rb), meta = compare([a, b], max_chunks=2, speed=False)
    assert rb.kl_divergence == pytest.approx(0, abs=1e-9)
    assert rb.top1_agreement == 1.0 and ra.top1_agreement == 1.0
    assert rb.perplexity == ra.perplexity
    assert 1 < ra.perplexity < 640 * 2  # a random model: near the vocabulary size
    assert ra.tokens_scored == rb.tokens_scored == meta["scored"] == 2 * 255
    assert meta["reference"] == "tiny:f16" and meta["tokens"] == 1024
    assert re.fullmatch(r"[0-9a-f]{64}", meta["eval_text_sha256"])


def test_q8_0_is_closer_to_the_master_than_q4_0(tiny):
    for t in ("q8_0", "q4_0"):
        quantize("tiny:f16", t)
    with load_for_compare("tiny:f16") as f16, load_for_compare("tiny:q8_0") as q8, \
            load_for_compare("tiny:q4_0") as q4:
        (r16, r8, r4), _ = compare([f16, q8, q4], max_chunks=3, speed=False)
    # measured: KL 1.4e-5 / 2.0e-3, top-1 97 % / 69 %, ppl within 0.1 % / 1.2 % of the master
    assert 0 < r8.kl_divergence < 1e-3
    assert r4.kl_divergence > 10 * r8.kl_divergence
    assert r8.top1_agreement > 0.9 and r8.top1_agreement > r4.top1_agreement
    assert abs(r8.perplexity / r16.perplexity - 1) < 0.01
    assert (r8.quant, r4.quant) == ("Q8_0", "Q4_0") and r4.size < r8.size < r16.size


def test_compare_refuses_a_different_vocabulary(tiny, other_vocab_model):
    edgeinfer.import_file(other_vocab_model, "other:f16")
    with load_for_compare("tiny:f16") as a, load_for_compare("other:f16") as b, \
            pytest.raises(ValueError, match="other:f16 has a different vocabulary from tiny:f16"):
        compare([a, b], max_chunks=1, speed=False)


def test_cli_compare_refuses_a_different_vocabulary_in_one_line(tiny, other_vocab_model):
    edgeinfer.import_file(other_vocab_model, "other:f16")
    assert_one_line_error(run("compare", "tiny:f16", "other:f16", "--chunks", "1"), "different vocabulary")


def test_cli_compare_json(tiny):
    quantize("tiny:f16", "q8_0")
    result = run("compare", "tiny:f16", "tiny:q8_0", "--chunks", "1", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert set(data) == {"meta", "models", "max_kl", "recommendation"}
    assert set(data["meta"]) == {"eval_text_sha256", "tokens", "scored", "chunk", "reference"}
    assert [m["model"] for m in data["models"]] == ["tiny:f16", "tiny:q8_0"]
    assert set(data["models"][0]) == {"model", "size", "quant", "tokens_scored", "perplexity",
                                      "kl_divergence", "top1_agreement", "prefill_tps", "decode_tps"}
    ref, q8 = data["models"]
    assert ref["kl_divergence"] == 0 and ref["top1_agreement"] == 1
    assert 0 < q8["kl_divergence"] < 1e-3 and q8["prefill_tps"] > 0 and q8["decode_tps"] > 0
    assert data["max_kl"] == 0.1 and data["recommendation"] == "tiny:q8_0"


def test_ladder_makes_each_quant_then_reuses_them(tiny, store, monkeypatch):
    result = run("quantize", "tiny:f16", "--ladder", "q4_0,Q8_0", "-q")
    assert result.exit_code == 0, result.output
    made = {t: store.get(f"tiny:{t}") for t in ("q4_0", "q8_0")}
    for t, m in made.items():
        assert m.parent == tiny.sha256 and m.options["type"] == t.upper()
    lines = result.stdout.strip().splitlines()
    assert lines[0].split() == ["model", "size", "ppl", "KL", "vs", "ref", "top-1", "prefill", "t/s",
                                "decode", "t/s"]
    assert [line.split()[0] for line in lines[1:4]] == ["tiny:f16", "tiny:q4_0", "tiny:q8_0"]
    assert lines[4].startswith("reference: tiny:f16; 2040 tokens scored")  # 8 chunks of 255
    assert re.fullmatch(r"recommended here: tiny:q(4|8)_0 - the fastest within KL <= 0\.1 that fits in memory",
                        lines[5])

    # Second run: the quants are there, made from this parent: nothing is quantized again.
    import edgeinfer.cli.quant as quant_cli

    def no_quantize(*args, **kwargs):
        raise AssertionError("the ladder quantized again")

    monkeypatch.setattr(quant_cli, "quantize", no_quantize)
    stamps = {p: p.stat().st_mtime_ns for p in store_files(store.root)}
    result = run("quantize", "tiny:f16", "--ladder", "q4_0,q8_0", "--max-kl", "0", "-q")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines()[-1] == (
        "no candidate is within KL <= 0.0; raise --max-kl or use a larger quant")
    assert {p: p.stat().st_mtime_ns for p in store_files(store.root)} == stamps
    assert {t: store.get(f"tiny:{t}") for t in made} == made


def test_ladder_with_an_unknown_type_is_refused_before_any_work(tiny, store):
    before = store_files(store.root)
    assert_one_line_error(run("quantize", "tiny:f16", "--ladder", "q4_0,q9_9"), "q9_9")
    assert store_files(store.root) == before
