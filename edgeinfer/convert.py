"""Hugging Face safetensors folders to GGUF, for the families the catalog
needs, with ``gguf`` and numpy only (no torch, no transformers: neither
belongs on a Pi).

Today that is one family: BERT, as sentence-transformers saves it
(all-MiniLM-L6-v2, bge-small ...): ``config.json``, ``tokenizer.json`` (or
``vocab.txt``), ``model.safetensors``, and where the model pools,
``modules.json`` and ``1_Pooling/config.json``. The result is what
llama.cpp loads as arch ``bert``: a WordPiece vocabulary in llama.cpp's
"phantom space" form, the pooling type, bidirectional attention.

The output is deterministic: the same folder and type give the same bytes
on every machine (tensors in a fixed order, no timestamps, IEEE rounding
only), so the catalog can pin the sha256 of a model it converts on the
user's machine. Files are written beside their destination and renamed
into place, so a half-written model never appears.

    convert_folder(Path("all-MiniLM-L6-v2"), Path("minilm.f16.gguf"), to="f16")
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from .catalog import CONVERT_TYPES as TYPES
from .errors import ConvertError

SUPPORTED = ("BertModel", "BertForMaskedLM")
_Q = gguf.GGMLQuantizationType
_TARGET = {"f16": (_Q.F16, gguf.LlamaFileType.MOSTLY_F16), "q8_0": (_Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0)}
_DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"), "I64": np.dtype("<i8")}
_MAX_HEADER = 100 * 2**20   # a safetensors header is a few kB per tensor; refuse absurd ones
# Tensors llama.cpp's BERT graph does not use: the pooler (sentence models
# pool in 1_Pooling instead), the masked-LM head, the position id buffer.
_SKIP = re.compile(r"^(embeddings\.position_ids|pooler\..*|cls\..*)$")
# The files a folder may hold that conversion reads; extraction from a zip
# takes these and nothing else.
FOLDER_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                "vocab.txt", "modules.json", "model.safetensors")
_SPECIALS = {"unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]", "pad": "[PAD]", "mask": "[MASK]"}


@dataclass(frozen=True)
class BertConfig:
    """The hyperparameters a BERT GGUF needs, checked."""

    architecture: str
    n_layer: int
    n_embd: int
    n_head: int
    n_ff: int
    n_ctx: int
    n_vocab: int
    n_token_types: int
    eps: float


@dataclass(frozen=True)
class Vocab:
    tokens: list[str]       # already in llama.cpp's phantom-space form
    types: list[int]        # gguf.TokenType values
    special: dict[str, int]  # unk, cls, sep, pad, mask -> id
    lowercase: bool
    strip_accents: bool | None   # None: follow lowercase, as HF's BertNormalizer does


@dataclass(frozen=True)
class ConvertResult:
    path: Path
    sha256: str
    size: int
    type: str


def _read_json(path: Path, what: str):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConvertError(f"{path.parent}: no {path.name} ({what})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConvertError(f"{path}: cannot read it as JSON: {e}") from None


def read_config(folder: Path) -> BertConfig:
    """config.json's hyperparameters, or ConvertError naming what is not a
    BERT the converter knows."""
    cfg = _read_json(folder / "config.json", "the model's configuration")
    if not isinstance(cfg, dict):
        raise ConvertError(f"{folder / 'config.json'}: not a JSON object")
    archs = cfg.get("architectures") or []
    arch = archs[0] if isinstance(archs, list) and archs else None
    if arch not in SUPPORTED or cfg.get("model_type", "bert") != "bert":
        raise ConvertError(f"{folder}: architecture {arch or cfg.get('model_type') or 'unknown'!r} "
                           f"is not one the converter knows (it converts {', '.join(SUPPORTED)})")
    if cfg.get("position_embedding_type", "absolute") != "absolute":
        raise ConvertError(f"{folder}: position_embedding_type {cfg['position_embedding_type']!r}; "
                           "llama.cpp's BERT has absolute positions only")
    if cfg.get("hidden_act", "gelu") != "gelu":
        raise ConvertError(f"{folder}: hidden_act {cfg['hidden_act']!r}; llama.cpp's BERT uses gelu")

    def num(key: str, default=None, kind=int):
        v = cfg.get(key, default)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0 or (kind is int and v != int(v)):
            raise ConvertError(f"{folder / 'config.json'}: {key} must be a positive number, not {v!r}")
        return kind(v)

    c = BertConfig(arch, num("num_hidden_layers"), num("hidden_size"), num("num_attention_heads"),
                   num("intermediate_size"), num("max_position_embeddings"), num("vocab_size"),
                   num("type_vocab_size", 2), num("layer_norm_eps", 1e-12, float))
    if c.n_embd % c.n_head:
        raise ConvertError(f"{folder}: hidden_size {c.n_embd} is not a multiple of {c.n_head} heads")
    return c


def read_pooling(folder: Path) -> gguf.PoolingType | None:
    """The sentence-transformers pooling (mean, cls, last token), from the
    Pooling module that modules.json names, else ``1_Pooling``; None when
    the folder has none (llama.cpp then returns one vector per token)."""
    path = None
    mods = folder / "modules.json"
    if mods.is_file():
        for m in _read_json(mods, "sentence-transformers modules") or []:
            if isinstance(m, dict) and str(m.get("type", "")).endswith("Pooling"):
                path = folder / str(m.get("path", "")) / "config.json"
                break
    if path is None:
        path = folder / "1_Pooling" / "config.json"
        if not path.is_file():
            return None
    if not path.resolve().is_relative_to(folder.resolve()):
        raise ConvertError(f"{mods}: the Pooling module's path leaves the folder")
    p = _read_json(path, "the Pooling module's configuration")
    modes = {"mean": gguf.PoolingType.MEAN, "cls": gguf.PoolingType.CLS, "lasttoken": gguf.PoolingType.LAST}
    for flag, mode in (("pooling_mode_mean_tokens", "mean"), ("pooling_mode_cls_token", "cls"),
                       ("pooling_mode_lasttoken", "lasttoken")):
        if p.get(flag):
            return modes[mode]
    if p.get("pooling_mode") in modes:
        return modes[p["pooling_mode"]]
    raise ConvertError(f"{path}: pooling {p!r} is not mean, cls or last token, the ones llama.cpp has")


def read_vocab(folder: Path, n_vocab: int) -> Vocab:
    """The WordPiece vocabulary, from tokenizer.json or else vocab.txt,
    turned into llama.cpp's form: a word-initial piece gets a leading
    U+2581 (the "phantom space" its WPM tokenizer prepends to each word),
    a ``##`` continuation loses its ``##``, control tokens stay as they are."""
    tj = folder / "tokenizer.json"
    pieces: dict[int, str] = {}
    special: set[int] = set()
    user: set[int] = set()
    lowercase, strip = True, None
    if tj.is_file():
        tok = _read_json(tj, "the tokenizer")
        model = tok.get("model") or {}
        if model.get("type") != "WordPiece" or not isinstance(model.get("vocab"), dict):
            raise ConvertError(f"{tj}: the tokenizer is {model.get('type')!r}, not WordPiece; "
                               "a BERT GGUF needs a WordPiece vocabulary")
        pieces = {int(i): str(t) for t, i in model["vocab"].items()}
        for a in tok.get("added_tokens") or []:
            pieces[int(a["id"])] = str(a["content"])
            (special if a.get("special") else user).add(int(a["id"]))
        norm = tok.get("normalizer") or {}
        for n in norm.get("normalizers", [norm]):
            if n.get("type") == "BertNormalizer":
                lowercase = bool(n.get("lowercase", True))
                strip = n.get("strip_accents")
            elif n.get("type") == "Lowercase":
                lowercase = True
    elif (folder / "vocab.txt").is_file():
        lines = (folder / "vocab.txt").read_text(encoding="utf-8").splitlines()
        pieces = dict(enumerate(lines))
        special = {i for i, t in pieces.items() if t in _SPECIALS.values()}
        tc = folder / "tokenizer_config.json"
        if tc.is_file():
            lowercase = bool(_read_json(tc, "the tokenizer's configuration").get("do_lower_case", True))
    else:
        raise ConvertError(f"{folder}: no tokenizer.json or vocab.txt (the WordPiece vocabulary)")
    if not pieces or min(pieces) < 0 or max(pieces) >= n_vocab:
        raise ConvertError(f"{folder}: the vocabulary's ids do not fit config.json's vocab_size {n_vocab}")
    names = _special_names(folder)
    ids = {v: k for k, v in pieces.items()}
    found = {kind: ids[name] for kind, name in names.items() if name in ids}
    for kind in ("unk", "cls", "sep"):
        if kind not in found:
            raise ConvertError(f"{folder}: the vocabulary has no {names[kind]} token; a BERT needs it")
    T = gguf.TokenType
    tokens, types = [], []
    for i in range(n_vocab):
        t = pieces.get(i)
        if t is None:
            tokens.append(f"\u2581[PAD{i}]")
            types.append(T.UNUSED)
        elif i in special or i in found.values():
            tokens.append(t)
            types.append(T.CONTROL)
        else:
            tokens.append(t[2:] if t.startswith("##") else "\u2581" + t)
            types.append(T.USER_DEFINED if i in user else T.NORMAL)
    return Vocab(tokens, [int(x) for x in types], found, lowercase, None if strip is None else bool(strip))


def _special_names(folder: Path) -> dict[str, str]:
    names = dict(_SPECIALS)
    for f in ("special_tokens_map.json", "tokenizer_config.json"):
        p = folder / f
        if p.is_file():
            data = _read_json(p, "special tokens")
            for kind in names:
                v = data.get(f"{kind}_token") if isinstance(data, dict) else None
                v = v.get("content") if isinstance(v, dict) else v
                if isinstance(v, str) and v:
                    names[kind] = v
    return names


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a ``.safetensors`` file, as read-only views of a
    memory map (float32 for BF16, which numpy lacks).

    The format: a little-endian u64 header length, that many bytes of JSON
    (name -> dtype, shape, [begin, end) in the data that follows), then the
    data. Every length and offset is checked against the file before a
    byte is viewed."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 2 <= n <= min(_MAX_HEADER, size - 8):
            raise ConvertError(f"{path}: not a safetensors file (header length {n}, file {size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConvertError(f"{path}: damaged safetensors header: {e}") from None
    if not isinstance(header, dict):
        raise ConvertError(f"{path}: damaged safetensors header")
    # (np.memmap refuses a zero-length map: a file of no tensors.)
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n, shape=(size - 8 - n,)) \
        if size > 8 + n else np.zeros(0, np.uint8)
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _DTYPES[t["dtype"]]
            shape = tuple(int(d) for d in t["shape"])
            begin, end = (int(x) for x in t["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ConvertError(f"{path}: tensor {name!r}: dtype {t.get('dtype')!r} or its shape or "
                               "offsets cannot be read (F32, F16, BF16 are converted)") from None
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if min(shape, default=0) < 0 or not 0 <= begin <= end <= data.size or end - begin != count * dtype.itemsize:
            raise ConvertError(f"{path}: tensor {name!r} lies outside the file or has the wrong length")
        arr = data[begin:end].view(dtype).reshape(shape)
        if t["dtype"] == "BF16":
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        out[name] = arr
    return out


def _gguf_name(name: str, names: gguf.TensorNameMap) -> str | None:
    """The GGUF name of a checkpoint tensor; None for one llama.cpp does
    not use. Old TF-ported checkpoints say gamma/beta for LayerNorm and
    BertForMaskedLM prefixes ``bert.``."""
    name = name.removeprefix("bert.")
    name = re.sub(r"\.gamma$", ".weight", re.sub(r"\.beta$", ".bias", name))
    if _SKIP.match(name):
        return None
    return names.get_name(name, try_suffixes=(".weight", ".bias"))


def _block(name: str) -> int:
    m = re.match(r"blk\.(\d+)\.", name)
    return int(m.group(1)) if m else -1


def _encode(gname: str, data: np.ndarray, target: gguf.GGMLQuantizationType):
    """The bytes of one tensor. As llama.cpp's own converter does: vectors,
    norms, the position and token-type tables stay F32 (its kernels want
    them so, and they are small); Q8_0 rows that are no multiple of 32
    fall back to F16."""
    data = np.ascontiguousarray(data, dtype=np.float32)
    keep = gname.startswith(("position_embd.", "token_types.")) or gname.endswith("_norm.weight")
    if data.ndim <= 1 or keep or not gname.endswith(".weight"):
        return data, _Q.F32
    if target == _Q.Q8_0 and data.shape[-1] % 32 == 0:
        return gguf.quants.quantize(data, _Q.Q8_0), _Q.Q8_0
    return data.astype(np.float16), _Q.F16


def convert_folder(folder: str | os.PathLike, dest: str | os.PathLike, *, to: str = "f16",
                   name: str | None = None, tmp_dir: str | os.PathLike | None = None) -> ConvertResult:
    """Convert a BERT folder to a GGUF at ``dest`` (``to``: f16 or q8_0).

    ``name`` goes into ``general.name`` (default: the folder's name); the
    catalog passes one so that where the folder was unpacked does not
    change the bytes. The file is written in ``tmp_dir`` (default: beside
    ``dest``; on the same filesystem) and renamed to ``dest``. Raises
    ConvertError for anything but a BERT."""
    folder, dest = Path(folder), Path(dest)
    if to not in TYPES:
        raise ConvertError(f"cannot convert to {to!r}", hint=f"choose one of {', '.join(TYPES)}")
    if not folder.is_dir():
        raise ConvertError(f"{folder}: not a folder", hint="pass the folder that holds config.json")
    cfg = read_config(folder)
    vocab = read_vocab(folder, cfg.n_vocab)
    pooling = read_pooling(folder)
    st = folder / "model.safetensors"
    if not st.is_file():
        raise ConvertError(f"{folder}: no model.safetensors (pytorch_model.bin is not read: "
                           "it is a pickle, and unpickling runs code)")
    weights = read_safetensors(st)
    tensors = _map_tensors(weights, cfg, st)
    target, ftype = _TARGET[to]

    dest.parent.mkdir(parents=True, exist_ok=True)
    # The pid in the name lets the store's clean_scratch() remove what a
    # killed conversion left.
    fd, tmp = tempfile.mkstemp(dir=tmp_dir or dest.parent, prefix=f".{dest.name}.", suffix=f".tmp-{os.getpid()}")
    os.close(fd)
    try:
        w = gguf.GGUFWriter(tmp, arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.BERT])
        _add_metadata(w, cfg, vocab, pooling, ftype, name or folder.resolve().name)
        for gname, data in tensors:
            arr, qtype = _encode(gname, data, target)
            w.add_tensor(gname, arr, raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        h = hashlib.sha256()
        with open(tmp, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return ConvertResult(dest, h.hexdigest(), dest.stat().st_size, to)


def _map_tensors(weights: dict[str, np.ndarray], cfg: BertConfig, where: Path) -> list[tuple[str, np.ndarray]]:
    """(GGUF name, array) in a fixed order: the embeddings, then block by
    block, each sorted by name; never the file's own order."""
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.BERT, cfg.n_layer)
    out = {}
    for key, arr in weights.items():
        if _SKIP.match(key.removeprefix("bert.")):
            continue
        gname = _gguf_name(key, names)
        if gname is None:
            raise ConvertError(f"{where}: tensor {key!r} is not part of a BERT the converter knows")
        if gname in out:
            raise ConvertError(f"{where}: two tensors map to {gname}")
        if arr.dtype == np.int64:
            raise ConvertError(f"{where}: tensor {key!r} holds integers, not weights")
        out[gname] = arr
    expect = {"token_embd.weight": (cfg.n_vocab, cfg.n_embd), "position_embd.weight": (cfg.n_ctx, cfg.n_embd),
              "token_embd_norm.weight": (cfg.n_embd,), "token_embd_norm.bias": (cfg.n_embd,)}
    for b in range(cfg.n_layer):
        for part, shape in (("attn_q", (cfg.n_embd, cfg.n_embd)), ("attn_k", (cfg.n_embd, cfg.n_embd)),
                            ("attn_v", (cfg.n_embd, cfg.n_embd)), ("attn_output", (cfg.n_embd, cfg.n_embd)),
                            ("ffn_up", (cfg.n_ff, cfg.n_embd)), ("ffn_down", (cfg.n_embd, cfg.n_ff))):
            expect[f"blk.{b}.{part}.weight"] = shape
        for norm in ("attn_output_norm", "layer_output_norm"):
            expect[f"blk.{b}.{norm}.weight"] = expect[f"blk.{b}.{norm}.bias"] = (cfg.n_embd,)
    for gname, shape in expect.items():
        if gname not in out:
            raise ConvertError(f"{where}: no tensor for {gname}; the checkpoint is incomplete")
        if out[gname].shape != shape:
            raise ConvertError(f"{where}: {gname} has shape {out[gname].shape}, config.json says {shape}")
    if "token_types.weight" in out and out["token_types.weight"].shape != (cfg.n_token_types, cfg.n_embd):
        raise ConvertError(f"{where}: the token type table does not match type_vocab_size {cfg.n_token_types}")
    return sorted(out.items(), key=lambda kv: (_block(kv[0]), kv[0]))


def _add_metadata(w: gguf.GGUFWriter, cfg: BertConfig, vocab: Vocab, pooling, ftype, name: str) -> None:
    w.add_name(name)
    w.add_context_length(cfg.n_ctx)
    w.add_embedding_length(cfg.n_embd)
    w.add_feed_forward_length(cfg.n_ff)
    w.add_head_count(cfg.n_head)
    w.add_block_count(cfg.n_layer)
    w.add_layer_norm_eps(cfg.eps)
    w.add_causal_attention(False)   # BERT attends both ways
    if pooling is not None:
        w.add_pooling_type(pooling)
    w.add_file_type(ftype)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_token_type_count(cfg.n_token_types)
    w.add_tokenizer_model("bert")
    # The pre-tokenizer name only steers BPE vocabularies; llama.cpp's WPM
    # tokenizer splits words itself.
    w.add_tokenizer_pre("default")
    w.add_token_list(vocab.tokens)
    w.add_token_types(vocab.types)
    s = vocab.special
    # llama.cpp's WPM tokenizer starts a text with BOS and ends it with
    # SEP; in BERT those are [CLS] and [SEP].
    w.add_bos_token_id(s["cls"])
    w.add_eos_token_id(s["sep"])
    w.add_unk_token_id(s["unk"])
    w.add_sep_token_id(s["sep"])
    if "pad" in s:
        w.add_pad_token_id(s["pad"])
    if "mask" in s:
        w.add_mask_token_id(s["mask"])
    w.add_add_bos_token(True)
    w.add_add_eos_token(True)
    # Keys this gguf package has no helper for; llama.cpp reads them
    # (absent, it lowercases and strips accents: right for uncased models
    # only).
    w.add_bool("tokenizer.ggml.normalizer.lowercase", vocab.lowercase)
    if vocab.strip_accents is not None:
        w.add_bool("tokenizer.ggml.normalizer.strip_accents", vocab.strip_accents)


def extract_folder(archive: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Unpack the files conversion reads from a zip of a model folder (at
    its top or inside one folder) into ``dest``; returns the folder. Only
    known names are written, each under ``dest``: a hostile member name
    can neither escape nor fill the disk with things nobody reads."""
    dest = Path(dest)
    try:
        with zipfile.ZipFile(archive) as zf:
            names = zf.namelist()
            configs = sorted((n for n in names if n.rsplit("/", 1)[-1] == "config.json"
                              and n.count("/") <= 1 and "1_Pooling" not in n), key=len)
            if not configs:
                raise ConvertError(f"{archive}: no config.json at the top of the archive")
            prefix = configs[0][: -len("config.json")]
            wanted = list(FOLDER_FILES) + ["1_Pooling/config.json"]
            if prefix + "modules.json" in names:
                with zf.open(prefix + "modules.json") as f:
                    try:
                        mods = json.load(f)
                    except (UnicodeDecodeError, json.JSONDecodeError) as e:
                        raise ConvertError(f"{archive}: modules.json: {e}") from None
                for m in mods if isinstance(mods, list) else []:
                    if not isinstance(m, dict) or not str(m.get("type", "")).endswith("Pooling"):
                        continue
                    p = str(m.get("path", ""))
                    if re.fullmatch(r"[\w.-]+", p) and ".." not in p:
                        wanted.append(f"{p}/config.json")
            for rel in wanted:
                if prefix + rel in names:
                    out = dest / rel
                    out.parent.mkdir(parents=True, exist_ok=True)
                    with zf.open(prefix + rel) as src, open(out, "wb") as f:
                        while chunk := src.read(1 << 20):
                            f.write(chunk)
    except (zipfile.BadZipFile, zipfile.LargeZipFile) as e:
        raise ConvertError(f"{archive}: damaged zip: {e}") from None
    return dest


def convert_zip(archive: str | os.PathLike, dest: str | os.PathLike, *, to: str = "f16",
                name: str | None = None, scratch: str | os.PathLike | None = None) -> ConvertResult:
    """Convert a zipped model folder (as a wheel carries one); the folder is
    unpacked into a temporary directory under ``scratch`` and removed."""
    with tempfile.TemporaryDirectory(prefix="convert-", suffix=f".tmp-{os.getpid()}", dir=scratch) as tmp:
        folder = extract_folder(archive, Path(tmp) / "model")
        return convert_folder(folder, dest, to=to, name=name, tmp_dir=scratch)
