"""Hand-made GGUF bytes for tests: every field written explicitly with struct.

gguf-py's GGUFWriter only writes sound files, so the malformed cases in
test_gguf_validation.py are spliced from these pieces instead. `sample()`
returns a small valid file plus the byte offsets of its fields, so a test
can break exactly one of them.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

# GGUF value types
U8, I8, U16, I16, U32, I32, F32, BOOL, STRING, ARRAY, U64, I64, F64 = range(13)
# ggml tensor types used here
GGML_F32, GGML_F16, GGML_Q8_0 = 0, 1, 8

_FMT = {U8: "B", I8: "b", U16: "H", I16: "h", U32: "I", I32: "i", F32: "f", BOOL: "?",
        U64: "Q", I64: "q", F64: "d"}


def u32(v: int) -> bytes:
    return struct.pack("<I", v)


def u64(v: int) -> bytes:
    return struct.pack("<Q", v)


def string(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return u64(len(b)) + b


def value(vtype: int, v) -> bytes:
    """The bytes of one value (without its type tag)."""
    if vtype == STRING:
        return string(v)
    if vtype == ARRAY:
        etype, items = v
        return u32(etype) + u64(len(items)) + b"".join(value(etype, x) for x in items)
    return struct.pack("<" + _FMT[vtype], v)


def kv(key: str | bytes, vtype: int, v) -> bytes:
    return string(key) + u32(vtype) + value(vtype, v)


def tensor_info(name: str | bytes, shape: tuple[int, ...], ggml_type: int, offset: int) -> bytes:
    return string(name) + u32(len(shape)) + b"".join(u64(d) for d in shape) + u32(ggml_type) + u64(offset)


def header(n_tensors: int, n_kv: int, version: int = 3, magic: bytes = b"GGUF") -> bytes:
    return magic + u32(version) + u64(n_tensors) + u64(n_kv)


def assemble(kvs: list[bytes], infos: list[bytes], data: bytes, *, alignment: int = 32,
             n_tensors: int | None = None, n_kv: int | None = None, version: int = 3) -> bytes:
    """header + kvs + tensor infos, padded to `alignment`, then `data`."""
    head = header(len(infos) if n_tensors is None else n_tensors,
                  len(kvs) if n_kv is None else n_kv, version)
    head += b"".join(kvs) + b"".join(infos)
    return head + b"\0" * (-len(head) % alignment) + data


@dataclass
class Sample:
    data: bytes
    data_offset: int  # where tensor data starts
    at: dict[str, int] = field(default_factory=dict)  # field name -> byte offset


# The valid sample: a llama-shaped header with scalar, string, array and
# nested-array metadata and three tensors (F32, F16, Q8_0) laid out the way
# llama.cpp lays them out (each one padded to the alignment).
TENSORS = [  # name, shape (GGUF order), type, nbytes
    ("token_embd.weight", (8, 4), GGML_F32, 8 * 4 * 4),
    ("blk.0.attn_q.weight", (8, 8), GGML_F16, 8 * 8 * 2),
    ("blk.0.ffn_up.weight", (32, 2), GGML_Q8_0, 2 * 34),
]


def sample() -> Sample:
    at: dict[str, int] = {}
    parts: list[bytes] = [header(len(TENSORS), 0)]  # kv count patched below
    pos = len(parts[0])

    def add(name: str, b: bytes) -> None:
        nonlocal pos
        at[name] = pos
        parts.append(b)
        pos += len(b)

    kvs = [
        ("arch", kv("general.architecture", STRING, "llama")),
        ("name", kv("general.name", STRING, "Sample")),
        ("alignment", kv("general.alignment", U32, 32)),
        ("context", kv("llama.context_length", U32, 256)),
        ("layers", kv("llama.block_count", U32, 1)),
        ("embd", kv("llama.embedding_length", U32, 8)),
        ("heads", kv("llama.attention.head_count", U32, 2)),
        ("heads_kv", kv("llama.attention.head_count_kv", U32, 1)),
        ("eps", kv("llama.attention.layer_norm_rms_epsilon", F32, 1e-5)),
        ("bool", kv("tokenizer.ggml.add_bos_token", BOOL, True)),
        ("tokens", kv("tokenizer.ggml.tokens", ARRAY, (STRING, ["<s>", "</s>", "a", "b", "ab"]))),
        ("scores", kv("tokenizer.ggml.scores", ARRAY, (F32, [0.0, 0.0, -1.0, -1.0, -2.0]))),
        ("nested", kv("test.nested", ARRAY, (ARRAY, [(U8, [1, 2]), (U8, [3])]))),
        ("template", kv("tokenizer.chat_template", STRING, "{{ messages[0]['content'] }}")),
        ("file_type", kv("general.file_type", U32, 7)),  # MOSTLY_Q8_0
    ]
    for name, b in kvs:
        add("kv." + name, b)
    offsets = []
    offset = 0
    for name, shape, ggml_type, nbytes in TENSORS:
        offsets.append(offset)
        add("tensor." + name, tensor_info(name, shape, ggml_type, offset))
        offset += nbytes + (-nbytes % 32)
    head = b"".join(parts)
    head = head[:16] + u64(len(kvs)) + head[24:]
    data_offset = len(head) + (-len(head) % 32)
    # The last tensor ends the file (no trailing padding), so "one byte
    # short" means exactly that.
    data = bytes(i * 7 % 251 for i in range(offsets[-1] + TENSORS[-1][3]))
    return Sample(head + b"\0" * (data_offset - len(head)) + data, data_offset, at)
