"""Read and validate GGUF headers without trusting them; report model facts.

Every GGUF file passes :func:`read_gguf` before llama.cpp opens it. GGUF v2/v3
(little-endian): "GGUF", u32 version, u64 tensor_count, u64 kv_count; then
kv_count x (string key, u32 value type, value); then tensor_count x (string
name, u32 n_dims, n_dims x u64 dims, u32 ggml type, u64 offset); padding to
general.alignment (default 32); tensor data, which the offsets count from.
A string is a u64 length and bytes; an array a u32 element type, a u64 length
and the elements.

Every one of those counts, lengths and offsets is attacker-controlled, and C
loaders that believed them paid for it: the 2024 Talos reports on ggml's
gguf_init_from_file (CVE-2024-21825, -21802, -21836, -23496, -23605: string,
array and count fields that sized heap buffers), CVE-2026-33298 (llama.cpp:
tensor sizes that overflowed and aliased a small buffer) and CVE-2026-7482
"Bleeding Llama" (Ollama: tensor offsets past EOF leaked heap memory). So:

- every length and count is checked against a fixed cap *and* against the
  bytes left in the file before anything is read, skipped or allocated;
- element counts and byte sizes are checked against 2**63 and the file size
  (Python ints do not overflow; the C that reads the file next does);
- every tensor's bytes must lie inside the file, aligned, overlapping no other;
- large metadata arrays (the vocabulary) are skipped and kept as
  :class:`ArrayInfo` placeholders, so memory stays small for any input.

The file is read through a 1 MiB buffer, never gguf-py's GGUFReader, which
memory-maps the file and trusts its counts.
"""

from __future__ import annotations

import os
import struct
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType, LlamaFileType

from .errors import GGUFError

__all__ = ["ArrayInfo", "GGUFInfo", "TensorInfo", "check_gguf", "read_gguf"]

# Caps. Real models are far inside them (the largest vocabularies are ~256k
# tokens; MoE models have a few thousand tensors); hostile files are not.
MAX_TENSORS = 65_536
MAX_KV = 65_536
MAX_KEY_BYTES = 65_535
MAX_STRING_BYTES = 16 << 20
MAX_ARRAY_LEN = 16 << 20
MAX_ARRAY_DEPTH = 3  # llama.cpp rejects nested arrays; gguf-py can write them
MAX_HEADER_ITEMS = 16 << 20  # strings + inner arrays walked in one header: bounds CPU time
MAX_KEPT_BYTES = 64 << 20  # decoded metadata held in memory
MAX_ALIGNMENT = 1 << 20
MAX_NAME_BYTES = 63  # GGML_MAX_NAME - 1; llama.cpp refuses longer tensor names
MAX_DIMS = 4  # GGML_MAX_DIMS
SMALL_ARRAY = 1024  # arrays up to this length are kept as lists
DEFAULT_ALIGNMENT = 32
_CHUNK = 1 << 20
_HEADER = struct.Struct("<4sIQQ")
_MIN_KV_BYTES = 8 + 4 + 1  # empty key, type, one-byte value
_MIN_TENSOR_BYTES = 8 + 4 + 8 + 4 + 8  # empty name, n_dims, one dim, type, offset
_STRING, _ARRAY = int(GGUFValueType.STRING), int(GGUFValueType.ARRAY)
# value type -> struct format of one element
_SCALAR_FMT = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?",
               10: "Q", 11: "q", 12: "d"}
_SCALAR = {t: struct.Struct("<" + f) for t, f in _SCALAR_FMT.items()}
_U64 = struct.Struct("<Q").unpack_from


@dataclass(frozen=True)
class ArrayInfo:
    """A metadata array too large to keep: its element type and length."""

    type: int
    length: int

    @property
    def type_name(self) -> str:
        return GGUFValueType(self.type).name


@dataclass(frozen=True, slots=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # GGUF order: shape[0] is the contiguous (row) dimension
    ggml_type: int
    type_name: str
    offset: int  # relative to GGUFInfo.data_offset
    n_elements: int
    nbytes: int


def _over(what: str, n: int, limit: int, unit: str) -> GGUFError:
    return GGUFError(f"{what} claims {n:,} {unit}, more than the limit of {limit:,}")


class _Reader:
    """Sequential reads from a file whose every read is checked against its size."""

    def __init__(self, f, size: int):
        self.f, self.size = f, size
        self.buf, self.base, self.pos = b"", 0, 0  # buf holds file bytes from `base`
        self.items = 0  # variable-size elements walked, for MAX_HEADER_ITEMS
        self.kept = 0  # bytes of metadata kept in memory, for MAX_KEPT_BYTES

    def tell(self) -> int:
        return self.base + self.pos

    def left(self) -> int:
        return self.size - self.base - self.pos

    def need(self, n: int, what: str) -> None:
        """Make buf[pos:pos+n] valid; n is checked against the file first."""
        if self.pos + n <= len(self.buf):
            return
        at = self.tell()
        if n > self.size - at:
            raise GGUFError(f"file is truncated: {what} at byte {at:,} needs {n:,} bytes, "
                            f"{self.size - at:,} remain")
        self.f.seek(at)
        self.buf, self.base, self.pos = self.f.read(max(n, _CHUNK)), at, 0
        if len(self.buf) < n:
            raise GGUFError(f"file shrank while being read (at byte {at:,})")

    def skip(self, n: int, what: str) -> None:
        if n > self.left():
            self.need(n, what)  # raises with the truncation message
        if self.pos + n <= len(self.buf):
            self.pos += n
        else:
            self.buf, self.base, self.pos = b"", self.tell() + n, 0

    def scalar(self, vtype: int, what: str):
        s = _SCALAR[vtype]
        self.need(s.size, what)
        (v,) = s.unpack_from(self.buf, self.pos)
        self.pos += s.size
        return v

    def u32(self, what: str) -> int:
        return self.scalar(4, what)  # GGUF value type 4 is uint32 ...

    def u64(self, what: str) -> int:
        return self.scalar(10, what)  # ... and 10 is uint64

    def string(self, limit: int, what: str) -> bytes:
        n = self.u64(f"length of {what}")
        if n > limit:
            raise _over(what, n, limit, "bytes")
        self.need(n, what)
        b = self.buf[self.pos : self.pos + n]
        self.pos += n
        return b

    def strings(self, count: int, what: str) -> Iterator[bytes]:
        """Read `count` strings one at a time: the hot loop for
        vocabularies and merges, kept tight (a refill only for a string
        that runs past the buffer)."""
        buf, pos, end = self.buf, self.pos, len(self.buf)
        for i in range(count):
            if pos + 8 > end:
                self.pos = pos
                self.need(8, f"length of {what}[{i}]")
                buf, pos, end = self.buf, self.pos, len(self.buf)
            (n,) = _U64(buf, pos)
            if n > MAX_STRING_BYTES:
                raise _over(f"{what}[{i}]", n, MAX_STRING_BYTES, "bytes")
            if pos + 8 + n > end:  # refill from the string's first byte
                self.pos = pos + 8
                self.need(n, f"{what}[{i}]")
                buf, pos, end = self.buf, self.pos - 8, len(self.buf)
            pos += 8 + n
            self.pos = pos
            yield buf[pos - n:pos]

    def charge(self, n_items: int, kept_bytes: int, what: str) -> None:
        self.items += n_items
        self.kept += kept_bytes
        if self.items > MAX_HEADER_ITEMS:
            raise GGUFError(f"metadata holds more than {MAX_HEADER_ITEMS:,} strings and arrays "
                            f"(at {what})")
        if self.kept > MAX_KEPT_BYTES:
            raise GGUFError(f"metadata values take more than {MAX_KEPT_BYTES:,} bytes (at {what})")


def _read_value(r: _Reader, vtype: int, what: str, depth: int = 0, keep: bool = True,
                each_string: Callable[[int, bytes], None] | None = None):
    """Read one value of `vtype`; keep=False skips it (None, or an ArrayInfo for arrays).
    With ``each_string`` the value must be an array of strings, and every
    element is passed to it (index, bytes), kept or not."""
    if each_string is not None and vtype != _ARRAY:
        raise GGUFError(f"{what} has value type {vtype}; it must be an array of strings")
    if vtype in _SCALAR:
        v = r.scalar(vtype, what)
        return v if keep else None
    if vtype == _STRING:
        b = r.string(MAX_STRING_BYTES, what)
        if keep:
            r.charge(0, len(b), what)
            return b.decode("utf-8", errors="replace")  # text, not an identifier
        return None
    if vtype != _ARRAY:
        raise GGUFError(f"{what} has unknown value type {vtype}")
    if depth >= MAX_ARRAY_DEPTH:
        raise GGUFError(f"{what} nests arrays more than {MAX_ARRAY_DEPTH} deep")
    etype = r.u32(f"element type of {what}")
    n = r.u64(f"length of {what}")
    if etype not in _SCALAR and etype not in (_STRING, _ARRAY):
        raise GGUFError(f"{what} is an array of unknown value type {etype}")
    if each_string is not None and etype != _STRING:
        raise GGUFError(f"{what} is an array of value type {etype}; it must be an array of strings")
    if n > MAX_ARRAY_LEN:
        raise _over(what, n, MAX_ARRAY_LEN, "elements")
    # Even the smallest elements take bytes: refuse counts the file cannot hold.
    min_size = _SCALAR[etype].size if etype in _SCALAR else (8 if etype == _STRING else 12)
    if n * min_size > r.left():
        raise GGUFError(f"{what} claims {n:,} elements ({n * min_size:,}+ bytes) but the file has "
                        f"{r.left():,} bytes left; it is truncated or damaged")
    keep = keep and n <= SMALL_ARRAY
    if etype in _SCALAR:
        size = n * _SCALAR[etype].size
        if not keep:
            r.skip(size, what)
            return ArrayInfo(etype, n)
        r.charge(0, 8 * n, what)
        r.need(size, what)
        values = list(struct.unpack_from(f"<{n}{_SCALAR_FMT[etype]}", r.buf, r.pos))
        r.pos += size
        return values
    r.charge(n, 8 * n if keep else 0, what)
    if etype == _STRING:
        kept = [] if keep else None
        for i, b in enumerate(r.strings(n, what)):
            if each_string is not None:
                each_string(i, b)
            if kept is not None:
                r.charge(0, len(b), what)
                kept.append(b.decode("utf-8", errors="replace"))  # text, not an identifier
        return kept if keep else ArrayInfo(etype, n)
    if keep:
        return [_read_value(r, etype, f"{what}[{i}]", depth + 1) for i in range(n)]
    for i in range(n):
        _read_value(r, _ARRAY, f"{what}[{i}]", depth + 1, keep=False)
    return ArrayInfo(etype, n)


def _read_kv(r: _Reader, n_kv: int) -> dict[str, Any]:
    metadata: dict[str, Any] = {}
    for i in range(n_kv):
        raw = r.string(MAX_KEY_BYTES, f"key #{i}")
        try:
            key = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise GGUFError(f"key #{i} is not valid UTF-8: {raw[:40]!r}") from None
        if key in metadata:
            raise GGUFError(f"key {key!r} appears twice")
        vtype = r.u32(f"value type of key {key!r}")
        # llama.cpp reads general.alignment with gguf_get_val_u32, which
        # aborts the process on any other type.
        if key == "general.alignment" and vtype != 4:
            raise GGUFError(f"general.alignment has value type {vtype}; it must be a uint32")
        metadata[key] = _read_value(r, vtype, f"key {key!r}",
                                    each_string=_vocab_check() if key == "tokenizer.ggml.tokens" else None)
    return metadata


def _vocab_check() -> Callable[[int, bytes], None]:
    """A check for each vocabulary token, refusing what makes llama.cpp abort.

    llama.cpp reads each token with gguf_get_arr_str, a C string, and maps
    text to id: a NUL byte cuts "e\0berg" to "e", two ids collapse into
    one and ``GGML_ASSERT(id_to_token.size() == token_to_id.size())`` kills
    the process (llama-vocab.cpp). A token array of another type trips the
    type assert in gguf_get_arr_str. So: strings only, no NUL, no two alike
    (an empty token is renamed "[EMPTY_i]" there, as here)."""
    seen: dict[bytes, int] = {}

    def check(i: int, b: bytes) -> None:
        if b"\0" in b:
            raise GGUFError(f"vocabulary token #{i} {b!r} contains a NUL byte; llama.cpp would "
                            "abort loading this file")
        j = seen.setdefault(b or f"[EMPTY_{i}]".encode(), i)
        if j != i:
            raise GGUFError(f"vocabulary tokens #{j} and #{i} are both {b.decode(errors='replace')!r}; "
                            "llama.cpp would abort loading this file")

    return check


def _read_tensor_info(r: _Reader, i: int, file_size: int) -> TensorInfo:
    raw = r.string(MAX_NAME_BYTES, f"name of tensor #{i}")
    try:
        name = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise GGUFError(f"name of tensor #{i} is not valid UTF-8: {raw!r}") from None
    n_dims = r.u32(f"n_dims of tensor {name!r}")
    if not 1 <= n_dims <= MAX_DIMS:
        raise GGUFError(f"tensor {name!r} has {n_dims} dimensions; GGUF allows 1 to {MAX_DIMS}")
    r.need(8 * n_dims, f"shape of tensor {name!r}")
    shape = struct.unpack_from(f"<{n_dims}Q", r.buf, r.pos)
    r.pos += 8 * n_dims
    n_elements = 1
    for d in shape:
        # A zero dimension is legal in ggml but no model llama.cpp runs has
        # one, and an empty tensor's offset can alias its neighbour's data:
        # treat it as damage. Dims are int64 in ggml: >= 2**63 is negative.
        if not 1 <= d < 2**63:
            raise GGUFError(f"tensor {name!r} has shape {list(shape)}; every dimension must be "
                            "from 1 to 2**63-1")
        n_elements *= d
    if n_elements >= 2**63:
        raise GGUFError(f"tensor {name!r} with shape {list(shape)} has {n_elements:,} elements, "
                        "more than 2**63")
    ggml_type = r.u32(f"type of tensor {name!r}")
    try:
        qtype = GGMLQuantizationType(ggml_type)
        block, type_size = GGML_QUANT_SIZES[qtype]
    except (ValueError, KeyError):
        raise GGUFError(f"tensor {name!r} has unknown ggml type {ggml_type}") from None
    if shape[0] % block:
        raise GGUFError(f"tensor {name!r} has rows of {shape[0]:,}, not a multiple of "
                        f"{qtype.name}'s block of {block}")
    nbytes = n_elements // block * type_size
    if nbytes > file_size:
        raise GGUFError(f"tensor {name!r} needs {nbytes:,} bytes but the file has "
                        f"{file_size:,} bytes")
    offset = r.u64(f"offset of tensor {name!r}")
    return TensorInfo(name, tuple(shape), ggml_type, qtype.name, offset, n_elements, nbytes)


def read_gguf(path: str | os.PathLike) -> GGUFInfo:
    """Validate a GGUF file's header and tensor layout; return its facts.

    Raises GGUFError, with a message that says what is wrong, for anything
    that is not a sound GGUF v2/v3 file; OSError if it cannot be opened.
    Reads only the header, in bounded chunks, however large or hostile the
    file is.
    """
    path = os.fspath(path)
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        r = _Reader(f, size)
        head = f.read(_HEADER.size)
        if head[:4] != b"GGUF":
            raise GGUFError(_bad_magic(head[:4]))
        if len(head) < _HEADER.size:
            raise GGUFError(f"file is {size:,} bytes, shorter than the 24-byte GGUF header")
        _, version, n_tensors, n_kv = _HEADER.unpack(head)
        r.base = _HEADER.size
        _check_version(version)
        if n_tensors > MAX_TENSORS:
            raise _over("header", n_tensors, MAX_TENSORS, "tensors")
        if n_kv > MAX_KV:
            raise _over("header", n_kv, MAX_KV, "metadata keys")
        if n_tensors * _MIN_TENSOR_BYTES + n_kv * _MIN_KV_BYTES > r.left():
            raise GGUFError(f"header claims {n_tensors:,} tensors and {n_kv:,} keys; "
                            f"a {size:,}-byte file cannot hold them")
        metadata = _read_kv(r, n_kv)
        alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not 1 <= alignment <= MAX_ALIGNMENT or alignment & (alignment - 1):
            raise GGUFError(f"general.alignment is {alignment}; it must be a power of two "
                            f"from 1 to {MAX_ALIGNMENT:,}")
        tensors = [_read_tensor_info(r, i, size) for i in range(n_tensors)]
        header_end = r.tell()
    data_offset = -(-header_end // alignment) * alignment
    # A file with no tensors (a vocabulary-only GGUF) may end before the padding.
    if tensors and data_offset > size:
        raise GGUFError(f"tensor data would start at byte {data_offset:,} but the file has "
                        f"{size:,} bytes")
    seen: set[str] = set()
    for t in tensors:
        if t.name in seen:
            raise GGUFError(f"tensor name {t.name!r} appears twice")
        seen.add(t.name)
        if t.offset % alignment:
            raise GGUFError(f"tensor {t.name!r} has offset {t.offset:,}, not a multiple of the "
                            f"alignment {alignment}")
        end = data_offset + t.offset + t.nbytes
        if end > size:  # the Bleeding Llama check (CVE-2026-7482): no read past EOF
            raise GGUFError(f"tensor {t.name!r} data ends at byte {end:,} but the file has "
                            f"{size:,} bytes")
    by_offset = sorted(tensors, key=lambda t: t.offset)
    for a, b in zip(by_offset, by_offset[1:]):
        if a.offset + a.nbytes > b.offset:
            raise GGUFError(f"tensors {a.name!r} and {b.name!r} overlap at offset {b.offset:,}")
    return GGUFInfo(path, size, version, alignment, data_offset, metadata, tensors)


check_gguf = read_gguf


_OTHER_MAGIC = {  # GGUF's predecessors store their magic as a little-endian uint32
    **dict.fromkeys((b"lmgg", b"fmgg", b"tjgg", b"algg"),
                    "file is in the old GGML format; convert it to GGUF"),
    b"PK\x03\x04": "file is a zip archive (a wheel?), not a GGUF file; extract the model first",
}


def _bad_magic(magic: bytes) -> str:
    if len(magic) < 4:
        return f"file is {len(magic)} bytes, too short to be GGUF"
    return _OTHER_MAGIC.get(magic, f"not a GGUF file: it starts with {magic!r}, not b'GGUF'")


def _check_version(version: int) -> None:
    if version in (2, 3):
        return
    if version == 1:
        raise GGUFError("GGUF version 1 is obsolete and no longer loads; convert the model again")
    # A big-endian v3 file reads as 0x03000000 here (llama.cpp tests the low 16 bits the same way).
    if not version & 0xFFFF and int.from_bytes(version.to_bytes(4, "little"), "big") in (1, 2, 3):
        raise GGUFError("file is a big-endian GGUF; only little-endian files are supported")
    raise GGUFError(f"GGUF version {version} is not supported (only versions 2 and 3)")


# Architectures llama.cpp runs as encoders only: they embed, never generate.
ENCODER_ARCHITECTURES = frozenset({"bert", "nomic-bert", "nomic-bert-moe", "jina-bert-v2", "jina-bert-v3",
                                   "neo-bert", "modern-bert", "eurobert"})


def _meta(key: str, doc: str) -> property:
    return property(lambda self: self._str(key), doc=doc)


def _arch_int(suffix: str, doc: str) -> property:
    return property(lambda self: self._arch(suffix), doc=doc)


@dataclass
class GGUFInfo:
    """What read_gguf learned. Facts are None when the file does not say."""

    path: str
    file_size: int
    version: int
    alignment: int
    data_offset: int  # absolute start of tensor data; TensorInfo.offset is relative to it
    metadata: dict[str, Any] = field(repr=False)
    tensors: list[TensorInfo] = field(repr=False)

    # Lookups tolerate missing and mistyped keys: a string where a number
    # belongs gives None, never an exception.
    def _str(self, key: str) -> str | None:
        v = self.metadata.get(key)
        return v if isinstance(v, str) else None

    def _arch(self, suffix: str) -> int | None:
        """An integer fact under the architecture's prefix; for a per-layer
        array (OpenELM's head counts), the largest value."""
        if not self.architecture:
            return None
        v = self.metadata.get(f"{self.architecture}.{suffix}")
        if isinstance(v, list) and v and all(type(x) is int for x in v):
            v = max(v)
        return v if type(v) is int else None  # `type() is`, so True is not 1

    architecture = _meta("general.architecture", "general.architecture, e.g. 'llama'")
    name = _meta("general.name", "general.name")
    chat_template = _meta("tokenizer.chat_template", "the Jinja chat template, if any")
    context_length = _arch_int("context_length", "the context the model was trained for")
    n_layer = _arch_int("block_count", "transformer blocks")
    n_embd = _arch_int("embedding_length", "embedding width")
    n_head = _arch_int("attention.head_count", "query heads")
    pooling_type = _arch_int("pooling_type", "how an embedding model pools its token vectors "
                                             "(llama.cpp's numbering: 1 mean, 2 cls, 3 last, 4 rank)")

    @property
    def is_embedding(self) -> bool:
        """An embedding model: an encoder (BERT and its kin), or a model
        that says how to pool its token vectors. It embeds; it does not chat."""
        return self.architecture in ENCODER_ARCHITECTURES or (self.pooling_type or 0) > 0

    @property
    def n_head_kv(self) -> int | None:
        n = self._arch("attention.head_count_kv")
        return n if n is not None else self.n_head

    @property
    def head_dim(self) -> int | None:
        k = self._arch("attention.key_length")
        if k is None and self.n_embd and self.n_head:
            k = self.n_embd // self.n_head
        return k

    @property
    def parameter_count(self) -> int:
        return sum(t.n_elements for t in self.tensors)

    @property
    def weights_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def vocab_size(self) -> int | None:
        tokens = self.metadata.get("tokenizer.ggml.tokens")
        if isinstance(tokens, ArrayInfo):
            return tokens.length
        return len(tokens) if isinstance(tokens, list) else self._arch("vocab_size")

    @property
    def quant_types(self) -> dict[str, int]:
        """Tensor count per ggml type name, most common first."""
        counts = Counter(t.type_name for t in self.tensors)
        return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))

    @property
    def file_type(self) -> str | None:
        """general.file_type as a name ('Q4_1', 'Q4_K_M'), else the dominant tensor type."""
        ft = self.metadata.get("general.file_type")
        if type(ft) is int and ft in set(LlamaFileType) - {LlamaFileType.GUESSED}:
            return LlamaFileType(ft).name.removeprefix("MOSTLY_").removeprefix("ALL_")
        # Dominant by weights held, not by tensor count: the small F32 norms
        # outnumber the quantized matrices.
        elements: Counter[str] = Counter()
        for t in self.tensors:
            elements[t.type_name] += t.n_elements
        return elements.most_common(1)[0][0] if elements else None

    def kv_cache_bytes(self, n_ctx: int, bytes_per_elem: float = 2.0) -> int:
        """K and V for n_ctx tokens: n_layer * n_ctx * n_head_kv * (key_len + value_len) * bytes.

        0 when the file lacks the facts (e.g. recurrent models, whose state
        is small and fixed). Per-layer head counts are summed over layers;
        sliding-window layers are counted at full size, an upper bound.
        """
        n_layer, k_len = self.n_layer, self.head_dim
        if not n_layer or not k_len:
            return 0
        v_len = self._arch("attention.value_length") or k_len
        per_layer = self.metadata.get(f"{self.architecture}.attention.head_count_kv")
        if isinstance(per_layer, list) and all(type(x) is int for x in per_layer):
            heads = sum(per_layer[:n_layer])
        else:
            heads = n_layer * (self.n_head_kv or 0)
        return int(heads * n_ctx * (k_len + v_len) * bytes_per_elem)

    def memory_estimate(self, n_ctx: int) -> int:
        """Bytes to run the model at n_ctx: weights + f16 KV cache + compute buffer.

        The compute allowance follows llama.cpp's CPU graph for a 512-token
        micro-batch, in f32: logits (n_vocab), attention scores
        (n_head * n_ctx) and a few activations (4 * n_embd) per token, plus
        16 MiB of slack: 16 MiB + 4 * 512 * (n_vocab + n_head * n_ctx + 4 * n_embd).
        """
        per_token = (self.vocab_size or 0) + (self.n_head or 0) * n_ctx + 4 * (self.n_embd or 0)
        compute = (16 << 20) + 4 * 512 * per_token
        return self.weights_bytes + self.kv_cache_bytes(n_ctx) + compute

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly facts, for `edgeinfer show` and the server."""
        keys = ("architecture", "name", "parameter_count", "context_length", "vocab_size")
        facts: dict[str, Any] = {k: getattr(self, k) for k in keys}
        facts["chat_template_present"] = self.chat_template is not None
        for k in ("quant_types", "file_type", "n_layer", "n_embd", "n_head", "n_head_kv",
                  "file_size", "version"):
            facts[k] = getattr(self, k)
        facts["tensor_count"] = len(self.tensors)
        return facts
