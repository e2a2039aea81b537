"""edgeinfer.gguf_file: facts from sound GGUF files, GGUFError for broken ones.

Sound files come from gguf-py's GGUFWriter and are cross-checked against
gguf-py's GGUFReader. Broken files are spliced by hand (tests/gguf_samples.py)
so that each one breaks exactly one thing, and each must fail fast with a
GGUFError that names the problem - never MemoryError, struct.error or a hang.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gguf_samples as gs  # noqa: E402

from edgeinfer import gguf_file  # noqa: E402
from edgeinfer.errors import EdgeinferError, GGUFError  # noqa: E402
from edgeinfer.gguf_file import ArrayInfo, GGUFInfo, check_gguf, read_gguf  # noqa: E402

# Seconds a malformed header may cost: a bounded reader takes microseconds,
# one that walks a forged count of 2^60 entries would take hours, so the
# bound is generous enough for a loaded 2-core box and still catches that.
QUICK = 5.0


def write(tmp_path: Path, data: bytes, name: str = "m.gguf") -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


def read_quickly(path: Path) -> GGUFInfo:
    t = time.perf_counter()
    try:
        return read_gguf(path)
    finally:
        assert time.perf_counter() - t < QUICK


# -- sound files --------------------------------------------------------------

def write_with_gguf_py(path: Path, *, n_tokens: int = 6, template: str = "{{ bos_token }}",
                       file_type: int | None = gguf.LlamaFileType.MOSTLY_Q8_0) -> Path:
    w = gguf.GGUFWriter(path, "llama")
    w.add_name("Tiny Test")
    w.add_context_length(4096)
    w.add_block_count(2)
    w.add_embedding_length(64)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_key_length(16)
    w.add_value_length(8)
    w.add_token_list([f"tok{i}" for i in range(n_tokens)])
    w.add_token_scores([float(-i) for i in range(n_tokens)])
    w.add_array("general.tags", ["tiny", "test", "edge"])
    w.add_chat_template(template)
    if file_type is not None:
        w.add_file_type(file_type)
    w.add_tensor("token_embd.weight", np.ones((n_tokens, 64), dtype=np.float32))
    w.add_tensor("output_norm.weight", np.ones(64, dtype=np.float32))
    w.add_tensor("blk.0.attn_q.weight", np.ones((64, 64), dtype=np.float16))
    # Q8_0 handed over raw: 64 rows of 2 blocks of 34 bytes = 64 x 64 elements.
    w.add_tensor("blk.0.ffn_up.weight", np.zeros((64, 2 * 34), dtype=np.uint8),
                 raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_facts_from_a_gguf_py_file(tmp_path):
    p = write_with_gguf_py(tmp_path / "tiny.gguf")
    info = read_quickly(p)
    assert (info.architecture, info.name, info.version) == ("llama", "Tiny Test", 3)
    assert info.context_length == 4096 and info.vocab_size == 6
    assert (info.n_layer, info.n_embd, info.n_head, info.n_head_kv, info.head_dim) == (2, 64, 4, 2, 16)
    assert info.chat_template == "{{ bos_token }}"
    assert info.metadata["general.tags"] == ["tiny", "test", "edge"]
    assert info.metadata["tokenizer.ggml.tokens"] == [f"tok{i}" for i in range(6)]
    assert info.parameter_count == 6 * 64 + 64 + 64 * 64 + 64 * 64
    assert info.quant_types == {"F32": 2, "F16": 1, "Q8_0": 1}
    assert info.file_type == "Q8_0"
    q8 = next(t for t in info.tensors if t.type_name == "Q8_0")
    assert (q8.shape, q8.n_elements, q8.nbytes) == ((64, 64), 4096, 128 * 34)
    # K and V separately: 2 layers x 2 kv heads x (16 + 8) dims x 2 bytes per token.
    assert info.kv_cache_bytes(100) == 2 * 2 * (16 + 8) * 2 * 100
    assert info.kv_cache_bytes(100, bytes_per_elem=1.0) == 2 * 2 * (16 + 8) * 100
    weights = sum(t.nbytes for t in info.tensors)
    assert info.memory_estimate(100) > weights + info.kv_cache_bytes(100)
    assert info.memory_estimate(4096) > info.memory_estimate(100)
    facts = json.loads(json.dumps(info.to_dict()))
    assert facts["chat_template_present"] is True and facts["tensor_count"] == 4
    assert facts["file_size"] == p.stat().st_size and facts["vocab_size"] == 6
    assert check_gguf(p).to_dict() == facts


@pytest.mark.parametrize("chunk", [37, 4096])
def test_layout_agrees_with_gguf_py_reader_across_buffer_refills(tmp_path, monkeypatch, chunk):
    # A small read buffer makes strings straddle refills, and the 10 kB
    # template is longer than a whole buffer.
    monkeypatch.setattr(gguf_file, "_CHUNK", chunk)
    p = write_with_gguf_py(tmp_path / "big.gguf", n_tokens=3000, template="x" * 10_000)
    info = read_quickly(p)
    ref = gguf.GGUFReader(p)
    assert info.data_offset == ref.data_offset
    assert info.vocab_size == 3000 == len(ref.fields["tokenizer.ggml.tokens"].data)
    assert info.metadata["tokenizer.ggml.tokens"] == ArrayInfo(gs.STRING, 3000)
    assert info.metadata["tokenizer.ggml.scores"] == ArrayInfo(gs.F32, 3000)
    assert info.chat_template == "x" * 10_000
    assert [(t.name, t.shape, t.ggml_type, info.data_offset + t.offset, t.n_elements, t.nbytes)
            for t in info.tensors] == [
        (t.name, tuple(int(d) for d in t.shape), int(t.tensor_type), t.data_offset, t.n_elements,
         t.n_bytes) for t in ref.tensors]


def test_hand_made_sample_is_sound(tmp_path):
    s = gs.sample()
    info = read_quickly(write(tmp_path, s.data))
    assert info.data_offset == s.data_offset and len(info.tensors) == 3
    assert info.metadata["test.nested"] == [[1, 2], [3]]
    assert info.metadata["tokenizer.ggml.add_bos_token"] is True
    assert info.file_type == "Q8_0"
    assert info.head_dim == 4 and info.kv_cache_bytes(10) == 1 * 1 * (4 + 4) * 2 * 10


def test_file_type_falls_back_to_the_type_holding_most_weights(tmp_path):
    info = read_quickly(write_with_gguf_py(tmp_path / "t.gguf", file_type=None))
    # F32 has the most tensors (2), F16 and Q8_0 hold the most weights (4096 each).
    assert info.quant_types["F32"] == 2
    assert info.file_type in ("F16", "Q8_0")


def test_per_layer_kv_heads_are_summed(tmp_path):
    kvs = [gs.kv("general.architecture", gs.STRING, "openelm"),
           gs.kv("openelm.block_count", gs.U32, 3),
           gs.kv("openelm.attention.head_count", gs.ARRAY, (gs.I32, [4, 4, 8])),
           gs.kv("openelm.attention.head_count_kv", gs.ARRAY, (gs.I32, [1, 2, 3])),
           gs.kv("openelm.attention.key_length", gs.U32, 16),
           gs.kv("openelm.attention.value_length", gs.U32, 16)]
    info = read_quickly(write(tmp_path, gs.assemble(kvs, [], b"")))
    assert info.n_head == 8 and info.n_head_kv == 3
    assert info.kv_cache_bytes(10) == (1 + 2 + 3) * 10 * 32 * 2
    assert info.tensors == [] and info.parameter_count == 0 and info.file_type is None


def test_mistyped_facts_read_as_unknown(tmp_path):
    kvs = [gs.kv("general.architecture", gs.STRING, "llama"),
           gs.kv("llama.context_length", gs.STRING, "4096"),
           gs.kv("llama.block_count", gs.BOOL, True),
           gs.kv("general.file_type", gs.STRING, "Q4_0"),
           gs.kv("general.name", gs.U32, 7)]
    info = read_quickly(write(tmp_path, gs.assemble(kvs, [], b"")))
    assert (info.context_length, info.n_layer, info.name, info.file_type) == (None, None, None, None)
    assert info.kv_cache_bytes(100) == 0


def test_sparse_multi_gigabyte_file_reads_only_its_header(tmp_path):
    infos = [gs.tensor_info("huge.weight", (1 << 20, 1 << 10), gs.GGML_F32, 0)]  # 4 GiB
    head = gs.assemble([gs.kv("general.architecture", gs.STRING, "llama")], infos, b"")
    p = write(tmp_path, head)
    with open(p, "r+b") as f:
        f.truncate(len(head) + (4 << 30))
    info = read_quickly(p)
    assert info.tensors[0].nbytes == 4 << 30 and info.parameter_count == 1 << 30


def test_gguf_error_is_a_value_error_and_an_edgeinfer_error(tmp_path):
    with pytest.raises(ValueError) as e:
        read_gguf(write(tmp_path, b"nope" * 10))
    assert isinstance(e.value, EdgeinferError) and e.value.hint


def test_missing_file_is_an_os_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_gguf(tmp_path / "absent.gguf")


# -- broken files -------------------------------------------------------------

S = gs.sample()
ARCH = gs.kv("general.architecture", gs.STRING, "llama")


def one_tensor(shape=(8,), ggml_type=gs.GGML_F32, offset=0, data_len=None, kvs=(), alignment=32,
               name="w") -> bytes:
    """A file with a single tensor and exactly enough data, unless told otherwise."""
    nbytes = 4 * int(np.prod(shape)) if data_len is None else data_len
    return gs.assemble([ARCH, *kvs], [gs.tensor_info(name, shape, ggml_type, offset)],
                       b"\1" * nbytes, alignment=alignment)


def replace(data: bytes, at: int, new: bytes) -> bytes:
    return data[:at] + new + data[at + len(new):]


def tensor_field(name: str, field: str) -> int:
    """Byte offset of n_dims / dims / type / offset in the sample's tensor info."""
    nd = len(next(shape for n, shape, *_ in gs.TENSORS if n == name))
    start = S.at["tensor." + name] + 8 + len(name)
    return start + {"n_dims": 0, "dims": 4, "type": 4 + 8 * nd, "offset": 8 + 8 * nd}[field]


KV_TOKENS = S.at["kv.tokens"]
NESTED_4 = (gs.ARRAY, [(gs.ARRAY, [(gs.ARRAY, [(gs.U8, [1])])])])  # array of array of array of array
Q8 = "blk.0.ffn_up.weight"

BROKEN = {
    # header
    "empty file": (b"", "0 bytes, too short"),
    "cut at 3": (S.data[:3], "too short"),
    "cut at 4": (S.data[:4], "shorter than the 24-byte GGUF header"),
    "cut at 12": (S.data[:12], "shorter than the 24-byte"),
    "cut at 23": (S.data[:23], "shorter than the 24-byte"),
    "cut inside a key": (S.data[:S.at["kv.file_type"] + 12], "file is truncated: key #14 at byte"),
    "cut inside the vocabulary": (S.data[:KV_TOKENS + 50], "claims 5 elements (40+ bytes) but the file has 5"),
    "cut inside tensor infos": (S.data[:S.at["tensor." + Q8] + 20], "truncated"),
    "bad magic": (b"GGUX" + S.data[4:], "not a GGUF file"),
    "old ggml magic": (b"tjgg" + S.data[4:], "old GGML format"),
    "zip instead of gguf": (b"PK\x03\x04" + S.data[4:], "zip archive"),
    "version 4": (replace(S.data, 4, gs.u32(4)), "version 4 is not supported"),
    "version 1": (replace(S.data, 4, gs.u32(1)), "version 1 is obsolete"),
    "version 0": (replace(S.data, 4, gs.u32(0)), "version 0 is not supported"),
    "big-endian version": (replace(S.data, 4, (3).to_bytes(4, "big")), "big-endian"),
    "tensor_count 2**64-1": (replace(S.data, 8, gs.u64(2**64 - 1)), "more than the limit of 65,536"),
    "tensor_count too many for the file": (replace(S.data, 8, gs.u64(60_000)), "cannot hold"),
    "kv_count 2**63": (replace(S.data, 16, gs.u64(2**63)), "metadata keys, more than the limit"),
    "kv_count too many for the file": (replace(S.data, 16, gs.u64(50_000)), "cannot hold"),
    # strings
    "key length past EOF": (replace(S.data, S.at["kv.arch"], gs.u64(len(S.data))), "truncated"),
    "key length 2**63": (replace(S.data, S.at["kv.arch"], gs.u64(2**63)), "more than the limit of 65,535"),
    "value length 2**63": (gs.assemble([gs.string("k") + gs.u32(gs.STRING) + gs.u64(2**63)], [], b""),
                           "more than the limit of 16,777,216"),
    "value length past EOF": (gs.assemble([gs.string("k") + gs.u32(gs.STRING) + gs.u64(10_000) + b"abc"],
                                          [], b""), "needs 10,000 bytes"),
    "key not utf-8": (gs.assemble([gs.kv(b"\xff\xfe", gs.U8, 1)], [], b""), "not valid UTF-8"),
    "duplicate key": (gs.assemble([ARCH, ARCH], [], b""), "appears twice"),
    # values and arrays
    "unknown value type": (gs.assemble([gs.string("k") + gs.u32(13) + gs.u64(0)], [], b""),
                           "unknown value type 13"),
    "unknown array element type": (gs.assemble([gs.string("k") + gs.u32(gs.ARRAY) + gs.u32(99) + gs.u64(1)],
                                               [], b""), "array of unknown value type 99"),
    "array length 2**62": (replace(S.data, KV_TOKENS + 8 + len("tokenizer.ggml.tokens") + 8, gs.u64(2**62)),
                           "more than the limit of 16,777,216"),
    "array of u32 past EOF": (gs.assemble([gs.string("k") + gs.u32(gs.ARRAY) + gs.u32(gs.U32) + gs.u64(1 << 20)],
                                          [], b""), "truncated or damaged"),
    "array of strings past EOF": (gs.assemble([gs.string("k") + gs.u32(gs.ARRAY) + gs.u32(gs.STRING)
                                               + gs.u64(16 << 20)], [], b""), "truncated or damaged"),
    "arrays nested 4 deep": (gs.assemble([gs.kv("k", gs.ARRAY, NESTED_4)], [], b""), "nests arrays more than 3 deep"),
    # tensor infos
    "n_dims 0": (replace(S.data, tensor_field(Q8, "n_dims"), gs.u32(0)), "0 dimensions"),
    "n_dims 5": (replace(S.data, tensor_field(Q8, "n_dims"), gs.u32(5)), "5 dimensions"),
    "n_dims 2**32-1": (replace(S.data, tensor_field(Q8, "n_dims"), gs.u32(2**32 - 1)), "dimensions; GGUF allows"),
    "dim 0": (replace(S.data, tensor_field(Q8, "dims") + 8, gs.u64(0)), "every dimension must be"),
    "dim 2**63": (one_tensor(shape=(2**63,), data_len=8), "every dimension must be"),
    "dims overflow 2**64": (one_tensor(shape=(2**32, 2**32), data_len=8), "more than 2**63"),
    "dims overflow 2**63": (one_tensor(shape=(2**31, 2**31, 2), data_len=8), "more than 2**63"),
    "tensor larger than the file": (one_tensor(shape=(1 << 20, 1 << 20), data_len=8), "needs 4,398,046,511,104"),
    "unknown ggml type 4": (replace(S.data, tensor_field(Q8, "type"), gs.u32(4)), "unknown ggml type 4"),
    "unknown ggml type 2**31": (replace(S.data, tensor_field(Q8, "type"), gs.u32(2**31)), "unknown ggml type"),
    "row not a multiple of the block": (one_tensor(shape=(33, 2), ggml_type=gs.GGML_Q8_0, data_len=68),
                                        "not a multiple of Q8_0's block of 32"),
    "tensor name too long": (one_tensor(name="w" * 64), "more than the limit of 63"),
    "duplicate tensor names": (gs.assemble([ARCH], [gs.tensor_info("w", (8,), 0, 0), gs.tensor_info("w", (8,), 0, 32)],
                                           b"\1" * 64), "tensor name 'w' appears twice"),
    # layout
    "tensor offset past EOF": (replace(S.data, tensor_field(Q8, "offset"), gs.u64(1 << 40)),
                               "data ends at byte 1,099,511,628,804 but the file has 1,284 bytes"),
    "offset 2**64-32": (replace(S.data, tensor_field(Q8, "offset"), gs.u64(2**64 - 32)), "data ends at byte"),
    "data one byte short": (S.data[:-1], "data ends at byte 1,284 but the file has 1,283 bytes"),
    "data cut short": (S.data[:S.data_offset + 100],
                       "'token_embd.weight' data ends at byte 1,088 but the file has 1,060"),
    "file ends before the data section": (S.data[:S.data_offset - 5], "tensor data would start at byte"),
    "misaligned offset": (replace(S.data, tensor_field(Q8, "offset"), gs.u64(257)),
                          "offset 257, not a multiple of the alignment 32"),
    "overlapping tensors": (replace(S.data, tensor_field(Q8, "offset"), gs.u64(128)), "overlap at offset 128"),
    "alignment 48": (replace(S.data, S.at["kv.alignment"] + 8 + 17 + 4, gs.u32(48)), "general.alignment is 48"),
    "alignment 0": (replace(S.data, S.at["kv.alignment"] + 8 + 17 + 4, gs.u32(0)), "general.alignment is 0"),
    "alignment 2**21": (one_tensor(kvs=[gs.kv("general.alignment", gs.U32, 1 << 21)]), "power of two from 1 to"),
    "alignment as u64": (one_tensor(kvs=[gs.kv("general.alignment", gs.U64, 32)]), "must be a uint32"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_file_raises_gguf_error(tmp_path, case):
    data, message = BROKEN[case]
    with pytest.raises(GGUFError) as e:
        read_quickly(write(tmp_path, data))
    assert message in str(e.value)


def test_one_key_too_many_reads_a_tensor_name_as_a_key(tmp_path):
    n_kv = sum(k.startswith("kv.") for k in S.at)
    with pytest.raises(GGUFError):
        read_quickly(write(tmp_path, replace(S.data, 16, gs.u64(n_kv + 1))))


def test_big_endian_file_from_gguf_py(tmp_path):
    w = gguf.GGUFWriter(tmp_path / "be.gguf", "llama", endianess=gguf.GGUFEndian.BIG)
    w.add_tensor("w", np.ones(8, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(GGUFError, match="big-endian"):
        read_quickly(tmp_path / "be.gguf")


def test_limits_on_kept_metadata_and_walked_strings(tmp_path, monkeypatch):
    p = write(tmp_path, S.data)
    monkeypatch.setattr(gguf_file, "MAX_KEPT_BYTES", 40)
    with pytest.raises(GGUFError, match="metadata values take more than 40 bytes"):
        read_gguf(p)
    monkeypatch.setattr(gguf_file, "MAX_KEPT_BYTES", 64 << 20)
    monkeypatch.setattr(gguf_file, "MAX_HEADER_ITEMS", 3)
    with pytest.raises(GGUFError, match="more than 3 strings and arrays"):
        read_gguf(p)


# -- fuzz ---------------------------------------------------------------------

u64s = st.one_of(st.sampled_from([0, 1, 31, 32, 33, 2**31, 2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1,
                                  len(S.data), len(S.data) - S.data_offset]),
                 st.integers(0, 2**64 - 1), st.integers(0, 4 * len(S.data)))
edits = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, S.data_offset - 1), st.integers(1, 255)),
    st.tuples(st.just("u64"), st.integers(0, S.data_offset - 1), u64s),
    st.tuples(st.just("u32"), st.integers(0, S.data_offset - 1), st.integers(0, 2**32 - 1)),
    st.tuples(st.just("cut"), st.integers(0, len(S.data)), st.just(0)),
)


def mutate(data: bytes, ops) -> bytes:
    b = bytearray(data)
    for op, at, v in ops:
        if op == "flip" and at < len(b):
            b[at] ^= v
        elif op in ("u64", "u32"):
            n = 8 if op == "u64" else 4
            b[at:at + n] = v.to_bytes(n, "little")
        elif op == "cut":
            del b[at:]
    return bytes(b)


@settings(max_examples=300, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(edits, min_size=1, max_size=4))
def test_fuzzed_headers_give_info_or_gguf_error(tmp_path, ops):
    p = write(tmp_path, mutate(S.data, ops), "fuzz.gguf")
    t = time.perf_counter()
    try:
        info = read_gguf(p)
    except GGUFError:
        pass
    else:
        assert isinstance(info, GGUFInfo)
        json.dumps(info.to_dict())  # the facts of any accepted file are usable
        assert all(info.data_offset + t.offset + t.nbytes <= info.file_size for t in info.tensors)
    assert time.perf_counter() - t < QUICK
