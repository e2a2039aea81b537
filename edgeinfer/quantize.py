"""Make new blobs from a stored model: quantize with llama.cpp, or convert
(dequantize) to full precision with gguf-py.

llama.cpp's quantizer runs in a child process: ``llama_model_quantize`` is
one long C call that Ctrl-C cannot interrupt, so the parent waits on the
child, kills it on Ctrl-C, and removes the half-written output. Output is
written in the store's scratch dir, validated, hashed and published like a
download; nothing half-written ever reaches ``blobs/``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from collections import deque
from pathlib import Path

from . import hardware
from .errors import MemoryFitError, QuantizeError
from .gguf_file import GGUFInfo, read_gguf
from .names import ModelRef, check_part, parse_ref
from .processes import die_with_parent
from .progress import Progress, make_progress
from .store import Manifest, ModelStore


# Type name -> llama_ftype value. Types that llama.cpp will only make with
# an importance matrix (IQ1_*, IQ2_XXS/XS/S, Q2_K_S) are left out.
def _ftypes() -> dict[str, int]:
    import llama_cpp as lc

    names = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L",
             "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K", "IQ2_M", "IQ3_XXS", "IQ3_XS", "IQ3_S",
             "IQ3_M", "IQ4_NL", "IQ4_XS", "F16", "BF16"]
    out = {n: getattr(lc, f"LLAMA_FTYPE_MOSTLY_{n}") for n in names if hasattr(lc, f"LLAMA_FTYPE_MOSTLY_{n}")}
    out["F32"] = lc.LLAMA_FTYPE_ALL_F32
    return out


FULL_PRECISION = {"F32", "F16", "BF16"}


def quant_types() -> list[str]:
    return list(_ftypes())


def parse_type(name: str) -> str:
    """Case-insensitive type name -> canonical name, or a QuantizeError
    listing the valid ones."""
    t = name.strip().upper()
    if t not in _ftypes():
        raise QuantizeError(f"unknown quant type {name!r}",
                            hint="use one of " + ", ".join(t.lower() for t in quant_types()))
    return t


def is_quantized(info: GGUFInfo) -> bool:
    """True when any weight matrix is stored in a quantized type."""
    return any(t.type_name not in FULL_PRECISION for t in info.tensors if len(t.shape) >= 2)


def llama_build() -> str:
    import llama_cpp as lc

    return f"llama-cpp-python {lc.__version__}"


def _target_ref(store: ModelStore, parent: Manifest, to: str, name: str | None) -> ModelRef:
    """Where the result goes; never over a model that is already there."""
    if name:
        ref = parse_ref(name)
        ref = ref if ref.tag else ModelRef(ref.name, check_part(to.lower(), "tag"))
    else:
        ref = ModelRef(parent.name, check_part(to.lower(), "tag"))
    if store.get(ref) is not None:
        raise QuantizeError(f"{ref} is already in the store",
                            hint=f"pick another --name, or remove it first with 'edgeinfer rm {ref}'")
    return ref


def _check_resources(store: ModelStore, out_bytes: int, mem_bytes: int) -> None:
    from .pull import check_disk

    check_disk(store, out_bytes)
    have = hardware.available_memory()
    if mem_bytes > have:
        raise MemoryFitError(f"this needs about {mem_bytes / 1e9:.1f} GB of memory, {have / 1e9:.1f} GB is available",
                             hint="close other programs or work on a smaller model")


def _publish(store: ModelStore, tmp: Path, ref: ModelRef, parent: Manifest, options: dict,
             source: str) -> Manifest:
    from .pull import import_file

    try:
        m = import_file(tmp, str(ref), store=store, parent=parent.sha256, options=options, source=source)
    finally:
        tmp.unlink(missing_ok=True)
    if (parent.system and not m.system) or (parent.sampling and not m.sampling):
        m.system, m.sampling = m.system or parent.system, m.sampling or parent.sampling
        store.put(m)
    return m


def quantize(model: str, to: str, *, name: str | None = None, threads: int | None = None,
             pure: bool = False, output_tensor_type: str | None = None,
             leave_output_tensor: bool = False, allow_requantize: bool = False,
             store: ModelStore | None = None, progress: Progress | None = None,
             log=None) -> Manifest:
    """Quantize a stored model to ``to`` (e.g. ``"q4_k_m"``) as a new blob.

    Refuses a model that is already quantized unless ``allow_requantize``
    (each round of quantization compounds the loss).
    """
    store = store or ModelStore()
    log = log or (lambda _m: None)
    progress = progress or make_progress(True)
    qtype = parse_type(to)
    parent = store.resolve(model)
    info = read_gguf(parent.path)
    if is_quantized(info) and not allow_requantize:
        raise QuantizeError(
            f"{parent.ref} is already quantized ({info.file_type}); quantizing it again compounds the loss",
            hint=f"quantize from a full-precision master: 'edgeinfer convert {parent.ref} --to f16', "
                 f"or pass --allow-requantize")
    if is_quantized(info):
        log(f"warning: requantizing {info.file_type} to {qtype} compounds quality loss")
    out_type = None
    if output_tensor_type:
        import gguf

        try:
            out_type = int(gguf.GGMLQuantizationType[output_tensor_type.strip().upper()])
        except KeyError:
            raise QuantizeError(f"unknown tensor type {output_tensor_type!r}",
                                hint="use a ggml type name such as q8_0, q6_k or f16") from None
    ref = _target_ref(store, parent, qtype, name)
    bits = 32 if qtype == "F32" else 16 if qtype in ("F16", "BF16") else 9
    _check_resources(store, max(parent.size, info.parameter_count * bits // 8),
                     parent.size + info.parameter_count * bits // 8 // 4)
    store.ensure_dirs()
    store.clean_scratch()
    tmp = store.scratch / f"{ref.name}-{ref.tag}.gguf.tmp-{os.getpid()}"
    options = {"type": qtype, "threads": threads or hardware.default_threads(), "pure": pure,
               "output_tensor_type": output_tensor_type, "leave_output_tensor": leave_output_tensor,
               "allow_requantize": allow_requantize, "llama_cpp": llama_build()}
    args = {"src": str(parent.path), "dst": str(tmp), "ftype": _ftypes()[qtype], "nthread": options["threads"],
            "pure": pure, "allow_requantize": allow_requantize, "quantize_output_tensor": not leave_output_tensor,
            "output_tensor_type": out_type}
    log(f"quantizing {parent.ref} to {qtype} with {options['threads']} threads")
    _run_child(args, tmp, progress, f"{ref}")
    return _publish(store, tmp, ref, parent, options, f"quantize {parent.ref} --to {qtype.lower()}")


def _run_child(args: dict, tmp: Path, progress: Progress, desc: str) -> None:
    cmd = [sys.executable, "-m", "edgeinfer.quantize", json.dumps(args)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # stderr is drained on its own thread: llama.cpp can log more than a
    # pipe holds, and a full pipe would block the child forever.
    err_tail: deque[str] = deque(maxlen=3)
    drain = threading.Thread(target=lambda: err_tail.extend(proc.stderr), daemon=True)
    drain.start()
    try:
        started = False
        for line in proc.stdout:
            m = re.match(r"PROGRESS (\d+) (\d+)", line)
            if m:
                total = int(m.group(2))
                if not started:
                    progress.start(total, desc, unit="tensors")
                    started = True
                progress.update(1)
        progress.close()
        rc = proc.wait()
        drain.join()
    except BaseException:  # Ctrl-C or anything else: stop the child, leave nothing behind
        proc.kill()
        proc.wait()
        tmp.unlink(missing_ok=True)
        raise
    if rc != 0 or not tmp.exists():
        tmp.unlink(missing_ok=True)
        detail = " ".join(line.strip() for line in err_tail) or f"exit status {rc}"
        raise QuantizeError(f"llama.cpp's quantizer failed: {detail}",
                            hint="run with EDGEINFER_DEBUG=1 to see llama.cpp's log")


def _child_main(raw: str) -> int:
    """In the child: run llama_model_quantize and report per-tensor progress."""
    import ctypes

    import llama_cpp as lc

    a = json.loads(raw)
    debug = os.environ.get("EDGEINFER_DEBUG") == "1"
    # A killed `edgeinfer quantize` must not leave an orphan quantizing into scratch.
    die_with_parent()
    if sys.platform.startswith("linux") and os.getppid() == 1:
        return 1

    @lc.llama_log_callback
    def on_log(level, text, _data):
        s = (text or b"").decode(errors="replace")
        m = re.search(r"\[\s*(\d+)/\s*(\d+)\]", s)
        try:
            if m:
                print(f"PROGRESS {m.group(1)} {m.group(2)}", flush=True)
            if debug or level == 4:  # GGML_LOG_LEVEL_ERROR
                sys.stderr.write(s)
        except BrokenPipeError:  # the parent is gone
            os._exit(1)

    lc.llama_log_set(on_log, ctypes.c_void_p(0))
    lc.llama_backend_init()
    p = lc.llama_model_quantize_default_params()
    p.nthread = int(a["nthread"])
    p.ftype = int(a["ftype"])
    p.pure = bool(a["pure"])
    p.allow_requantize = bool(a["allow_requantize"])
    p.quantize_output_tensor = bool(a["quantize_output_tensor"])
    if a.get("output_tensor_type") is not None:
        p.output_tensor_type = int(a["output_tensor_type"])
    rc = lc.llama_model_quantize(a["src"].encode(), a["dst"].encode(), ctypes.byref(p))
    return 0 if rc == 0 else 1


# -- convert: dequantize to a full-precision master ------------------------

def convert(model: str, to: str = "f16", *, name: str | None = None, store: ModelStore | None = None,
            progress: Progress | None = None, log=None) -> Manifest:
    """Dequantize a stored model to F32, F16 or BF16 with gguf-py.

    For models that ship only quantized: the result is a master to
    quantize from, but its precision is bounded by the parent's (recorded
    in the manifest as ``precision_bound_by``).
    """
    import numpy as np
    from gguf import GGMLQuantizationType as T
    from gguf import GGUFReader, GGUFValueType, GGUFWriter, LlamaFileType
    from gguf.quants import dequantize
    from gguf.quants import quantize as gquantize

    store = store or ModelStore()
    log = log or (lambda _m: None)
    progress = progress or make_progress(True)
    target = to.strip().upper()
    if target not in FULL_PRECISION:
        raise QuantizeError(f"convert makes full-precision models, not {to!r}",
                            hint="use --to f16, f32 or bf16 (and 'edgeinfer quantize' for quantized types)")
    parent = store.resolve(model)
    info = read_gguf(parent.path)  # bounds-checked before gguf-py memory-maps it
    ref = _target_ref(store, parent, target, name)
    bpe = 4 if target == "F32" else 2
    _check_resources(store, info.parameter_count * bpe, parent.size + 2 * info.parameter_count * bpe)
    store.ensure_dirs()
    store.clean_scratch()
    tmp = store.scratch / f"{ref.name}-{ref.tag}.gguf.tmp-{os.getpid()}"
    reader = GGUFReader(str(parent.path))
    ftype = {"F32": LlamaFileType.ALL_F32, "F16": LlamaFileType.MOSTLY_F16, "BF16": LlamaFileType.MOSTLY_BF16}[target]
    try:
        writer = GGUFWriter(str(tmp), arch=info.architecture or "llama")
        for field in reader.fields.values():
            if field.name.startswith("GGUF.") or field.name in ("general.architecture", "general.file_type"):
                continue
            vtype = GGUFValueType(field.types[0])
            sub = GGUFValueType(field.types[-1]) if vtype == GGUFValueType.ARRAY and len(field.types) > 1 else None
            writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub)
        writer.add_file_type(int(ftype))
        progress.start(len(reader.tensors), str(ref), unit="tensors")
        for t in reader.tensors:
            data = dequantize(t.data, T(t.tensor_type)).astype(np.float32, copy=False)
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))
            data = data.reshape(shape)
            if len(shape) == 1 or target == "F32":
                writer.add_tensor(t.name, data)  # norms and biases stay F32, as llama.cpp expects
            elif target == "F16":
                writer.add_tensor(t.name, data.astype(np.float16))
            else:
                writer.add_tensor(t.name, gquantize(data, T.BF16), raw_dtype=T.BF16)
            progress.update(1)
        progress.close()
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        del reader
    options = {"type": target, "converted_from": info.file_type, "precision_bound_by": info.file_type,
               "tool": "gguf-py"}
    log(f"converted {parent.ref} ({info.file_type}) to {target}; precision stays bounded by {info.file_type}")
    return _publish(store, tmp, ref, parent, options, f"convert {parent.ref} --to {target.lower()}")


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1]))
