"""Native settings: which of llama.cpp's CPU buffer types a model may use.

llama.cpp's CPU backend can keep weights in "extra" buffer types that hold
them in a faster layout: AMX (Intel's tile units) and CPU_REPACK (the
interleaved Q4_0, Q4_K, IQ4_NL ... kernels). On some machines one of them
takes the process down: on virtualised Sapphire and Granite Rapids Xeons
the AMX matmul dies with a general-protection fault on the first decode
(ggml-org/llama.cpp#20824, ollama/ollama#17249). A *setting* names what a
load may use, from fastest to safest:

    full     llama.cpp's own choice: every extra buffer type the build has
    no_amx   AMX skipped, CPU_REPACK kept: extra buffer types off, and the
             weights the repack kernels take pointed at CPU_REPACK through
             ``tensor_buft_overrides``; offered where the build has AMX
    plain    no extra buffer type: llama.cpp's plain CPU kernels

:mod:`edgeinfer.selftest` tries them in a child process, in that order,
and remembers the first that survives. This module only knows how to
apply a setting and how to tell one build and machine from another.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import functools
import hashlib
import json
import os
import re
import threading
from pathlib import Path

from . import hardware
from .errors import NativeSettingError

SETTINGS = ("full", "no_amx", "plain")
ENV = "EDGEINFER_NATIVE"  # force a setting: full, no_amx, plain (or auto)



class _OnFirstUse:
    """llama_cpp, imported when first used: the record and machine checks
    of the self-test import this module, and ``import edgeinfer`` must not
    load libllama."""

    def __getattr__(self, name: str):
        import llama_cpp

        return getattr(llama_cpp, name)


lc = _OnFirstUse()
_backend_lock = threading.Lock()
_backend_ready = False
_quiet_log = None   # the log callback, kept alive for as long as llama.cpp may call it


# llama.cpp's last few log lines, so that a load it refuses can say why
# (a missing or misnamed tensor, a wrong shape) without EDGEINFER_DEBUG.
recent_log: collections.deque[str] = collections.deque(maxlen=40)


def _log(level, text, user_data):  # llama.cpp logs to stderr unless told otherwise
    if os.environ.get("EDGEINFER_DEBUG") == "1":
        os.write(2, text or b"")
    if text:
        recent_log.append(text.decode("utf-8", "replace"))


def last_error() -> str:
    """What llama.cpp last logged as the reason of an error ('' if
    nothing), e.g. "tensor 'blk.0.attn_q.weight' not found": the text after
    its "error loading model:", else its last line that says error or failed."""
    lines = [line.strip() for line in recent_log]
    for line in reversed(lines):
        if "error loading model:" in line:
            return line.split("error loading model:", 1)[1].strip().removeprefix("check_tensor_dims: ")
    for line in reversed(lines):
        if "error" in line.lower() or "failed" in line.lower():
            return line.split(": ", 1)[-1]
    return ""


def init_backend() -> None:
    """Initialise llama.cpp once per process, with its log kept quiet."""
    global _backend_ready, _quiet_log
    with _backend_lock:
        if not _backend_ready:
            _quiet_log = lc.llama_log_callback(_log)
            lc.llama_log_set(_quiet_log, ctypes.c_void_p(0))
            lc.llama_backend_init()
            _backend_ready = True


def check_setting(name: str | None) -> str | None:
    """A setting name, or None for "let the self-test choose"."""
    if name is None or name == "" or name == "auto":
        return None
    if name not in SETTINGS:
        raise NativeSettingError(f"unknown native setting {name!r}",
                                 hint=f"use one of: auto, {', '.join(SETTINGS)} (in native= or ${ENV})")
    return name


def forced_setting(option: str | None = None) -> str | None:
    """The setting forced by a load() option, else by $EDGEINFER_NATIVE."""
    return check_setting(option if option is not None else os.environ.get(ENV))


# -- what this build has ------------------------------------------------------

@functools.cache
def system_info() -> str:
    return lc.llama_print_system_info().decode(errors="replace")


def build_features() -> dict[str, bool]:
    """The CPU features this llama.cpp build was compiled for ('AVX2': True ...)."""
    return {k: v == "1" for k, v in re.findall(r"(\w+) = (\d+)", system_info())}


@functools.cache
def loaded_library(stem: str) -> Path | None:
    """The file of ``stem`` (``libggml``, ``libggml-base``) that libllama
    itself loaded. A wheel keeps ``libggml.so``, ``libggml.so.0`` ... as
    separate copies (it holds no symlinks), and opening another copy
    than libllama's gives another device registry."""
    import re

    init_backend()
    soname = re.compile(re.escape(stem) + r"\.so\.\d+$")   # what libllama links by
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.rsplit(" ", 1)[-1].strip()
                if soname.match(Path(path).name):
                    return Path(path)
    except OSError:
        pass
    return None


@functools.cache
def libggml():
    """ggml as libllama uses it (ctypes), for its device registry."""
    from llama_cpp import _ggml

    path = loaded_library("libggml")
    return ctypes.CDLL(str(path)) if path is not None else _ggml.libggml


def extra_buffer_types() -> dict[str, int]:
    """The CPU backend's extra buffer types, name to ggml handle, in the
    order llama.cpp tries them (AMX before CPU_REPACK); found through ggml's
    device registry, the way llama.cpp itself finds them."""
    init_backend()
    try:
        g = libggml()
        for fn, res, args in (("ggml_backend_dev_by_type", ctypes.c_void_p, [ctypes.c_int]),
                              ("ggml_backend_dev_backend_reg", ctypes.c_void_p, [ctypes.c_void_p]),
                              ("ggml_backend_reg_get_proc_address", ctypes.c_void_p,
                               [ctypes.c_void_p, ctypes.c_char_p]),
                              ("ggml_backend_buft_name", ctypes.c_char_p, [ctypes.c_void_p])):
            getattr(g, fn).restype, getattr(g, fn).argtypes = res, args
        dev = g.ggml_backend_dev_by_type(0)  # GGML_BACKEND_DEVICE_TYPE_CPU
        reg = g.ggml_backend_dev_backend_reg(dev) if dev else None
        addr = g.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_dev_get_extra_bufts") if reg else None
    except (ImportError, AttributeError, OSError):
        return {}
    if not addr:
        return {}
    get = ctypes.CFUNCTYPE(ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p)(addr)
    arr = get(dev)
    out: dict[str, int] = {}
    i = 0
    while arr and arr[i] and i < 64:
        out[g.ggml_backend_buft_name(arr[i]).decode(errors="replace")] = arr[i]
        i += 1
    return out


def ladder() -> list[str]:
    """The settings that differ from each other on this build, fastest first."""
    bufts = extra_buffer_types()
    out = ["full"]
    if "AMX" in bufts and "CPU_REPACK" in bufts:
        out.append("no_amx")
    if bufts:
        out.append("plain")
    return out


def amx_on_cpu_and_build() -> bool:
    """True where the CPU reports AMX and the build compiled it in: the
    machines where the AMX crash is known."""
    return "amx_int8" in hardware.cpu_flags() and "AMX" in extra_buffer_types()


def _library_files() -> list[Path]:
    lib = Path(lc.__file__).parent / "lib"
    return sorted(p for p in lib.glob("*") if p.is_file() and p.suffix in (".so", ".dylib", ".dll"))


def build_id() -> dict:
    """What identifies this llama.cpp build: version, library files, system info."""
    files = []
    for p in _library_files():
        st = p.stat()
        files.append(f"{p.name}:{st.st_size}:{st.st_mtime_ns}")
    return {"llama_cpp_python": lc.__version__, "libraries": files, "system_info": system_info(),
            "extra_buffer_types": list(extra_buffer_types())}


@functools.cache
def machine() -> dict:
    """The CPU (model and flags) and the llama.cpp build: what a self-test
    result is valid for. Neither changes while a process runs, so it is
    read once (every load asks for it)."""
    return {"cpu_model": hardware.cpu_model(),
            "cpu_flags": hashlib.sha256(" ".join(sorted(hardware.cpu_flags())).encode()).hexdigest()[:16],
            "build": build_id()}


@functools.cache
def machine_id() -> str:
    return hashlib.sha256(json.dumps(machine(), sort_keys=True).encode()).hexdigest()[:16]


# -- applying a setting ---------------------------------------------------------

# Weights that only ever feed a matrix multiplication. token_embd is looked
# up by row (GET_ROWS), which a repacked layout cannot serve, so it is never
# moved.
_MATMUL_WEIGHT = re.compile(r"blk\.(\d+)\.(attn_q|attn_k|attn_v|attn_qkv|attn_output|"
                            r"ffn_up|ffn_down|ffn_gate|ffn_gate_up)\.weight")


def repack_tensors(info) -> list[str]:
    """The weights that ggml's x86 repack kernels take on this build
    (ggml-cpu/repack.cpp, ggml_repack_get_optimal_repack_type): Q4_0, Q4_K,
    IQ4_NL and MXFP4 with AVX2, Q2_K with AVX-512, in 2-D matrices whose
    row count is a multiple of 8. Should llama.cpp change those rules, a
    wrong guess crashes only the self-test child, which then falls back."""
    feats = build_features()
    types = set()
    if feats.get("AVX2"):
        types |= {"Q4_0", "Q4_K", "IQ4_NL", "MXFP4"}
    if feats.get("AVX512"):
        types.add("Q2_K")
    return [t.name for t in info.tensors
            if t.type_name in types and len(t.shape) == 2 and t.shape[1] % 8 == 0
            and _MATMUL_WEIGHT.fullmatch(t.name)]


def override_patterns(names: list[str]) -> list[str]:
    """Few regexes for many tensor names: llama.cpp compiles every pattern
    again for every tensor it loads, so one per weight kind, not per weight."""
    layers: dict[str, list[str]] = {}
    for n in names:
        m = _MATMUL_WEIGHT.fullmatch(n)
        if m:  # anything else is never moved
            layers.setdefault(m.group(2), []).append(m.group(1))
    return [rf"^blk\.(?:{'|'.join(ls)})\.{kind}\.weight$" for kind, ls in sorted(layers.items())]


class _Override(ctypes.Structure):  # struct llama_model_tensor_buft_override
    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


class ModelParams:
    """llama_model_params for a setting, with the memory they point to."""

    def __init__(self, setting: str, info=None, *, mmap: bool = True, mlock: bool = False,
                 vocab_only: bool = False, repack: list[str] | None = None, offload: bool = False):
        """``info`` (a GGUFInfo) or ``repack`` (its repack_tensors()) says
        which weights no_amx points at CPU_REPACK. ``offload``: every layer
        to the devices registered (RPC workers: edgeinfer.rpc), split by
        their free memory."""
        if setting not in SETTINGS:
            raise ValueError(f"unknown native setting {setting!r}")
        init_backend()
        p = lc.llama_model_default_params()
        p.n_gpu_layers = -1 if offload else 0   # -1: all of them
        if not offload:
            # No devices at all, not merely no layers on them: RPC workers
            # registered in this process for another model must not be
            # connected to (llama.cpp aborts when one is gone).
            self._no_devices = (ctypes.c_void_p * 1)(None)
            p.devices = ctypes.cast(self._no_devices, ctypes.c_void_p)
        p.vocab_only = vocab_only
        p.load_mode = (lc.LLAMA_LOAD_MODE_MMAP_MLOCK if mlock else lc.LLAMA_LOAD_MODE_MMAP) \
            if mmap else (lc.LLAMA_LOAD_MODE_MLOCK if mlock else lc.LLAMA_LOAD_MODE_NONE)
        self._overrides = None
        self.repacked = 0  # weights pointed at CPU_REPACK (no_amx only)
        if setting != "full":
            p.use_extra_bufts = False
        buft = extra_buffer_types().get("CPU_REPACK")
        if setting == "no_amx" and buft:
            names = repack if repack is not None else (repack_tensors(info) if info is not None else [])
            pats = override_patterns(names)
            if pats:
                arr = (_Override * (len(pats) + 1))()
                self._keep = [p_.encode() for p_ in pats]
                for i, pat in enumerate(self._keep):
                    arr[i].pattern, arr[i].buft = pat, buft
                arr[len(pats)].pattern, arr[len(pats)].buft = None, None
                self._overrides = arr
                p.tensor_buft_overrides = ctypes.cast(arr, ctypes.c_void_p)
                self.repacked = len(names)
        self.setting = setting
        self.params = p


@contextlib.contextmanager
def llama_defaults(setting: str, info=None):
    """Make llama-cpp-python's high-level ``Llama`` load with ``setting``:
    it builds its model parameters from ``llama_model_default_params()``,
    which is swapped for the duration. For benchmarks and tests that open
    ``Llama`` directly, which would otherwise crash where the engine does not."""
    mp = ModelParams(setting, info)
    import llama_cpp

    mod = llama_cpp.llama_cpp  # the submodule whose attribute Llama calls
    original = mod.llama_model_default_params

    def defaults():
        p = original()
        p.use_extra_bufts = mp.params.use_extra_bufts
        p.tensor_buft_overrides = mp.params.tensor_buft_overrides
        return p

    mod.llama_model_default_params = defaults
    try:
        yield mp
    finally:
        mod.llama_model_default_params = original
