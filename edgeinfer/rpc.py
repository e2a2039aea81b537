"""Models bigger than one board: llama.cpp's RPC backend.

A worker (``edgeinfer rpc-worker``) lends its memory and cores: it runs
llama.cpp's RPC server, which holds the tensors a client sends and
computes on them. A server (``edgeinfer serve MODEL --rpc HOST:PORT,...``)
registers each worker as a device and offloads the model's layers to
them, in proportion to their free memory. It buys memory, not speed: a
model that fits one box runs slower split.

The backend is a library of its own, ``libggml-rpc.so``. A llama-cpp-python
built with ``-DGGML_RPC=ON`` ships it; otherwise :func:`library` builds it
here, once per llama.cpp version, from the same version's sources (pip
downloads them; a C++ compiler compiles two files in seconds), so the
install needs no rebuild of llama.cpp and pip's wheel cache (keyed by
version, not build flags) is never in the way.

The RPC protocol has no authentication: a worker must only listen where
every machine that can reach it is trusted. A lost worker makes llama.cpp
abort the process that uses it, which is why a server runs each model in a
process of its own (edgeinfer.pool): the model's requests fail, the server
lives. Before any call into C, :func:`probe` checks that a worker answers,
speaks this build's protocol and is free (a worker serves one client).
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
import shutil
import socket
import struct
import subprocess
import sys
import tarfile
import tempfile
import threading
from importlib import metadata
from pathlib import Path

from . import paths
from .errors import RpcError

DEFAULT_PORT = 50052
PROTO_MAJOR = 7           # RPC_PROTO_MAJOR_VERSION of the llama.cpp this release pins
_HELLO = 14               # RPC_CMD_HELLO
_CAPS = 24                # RPC_CONN_CAPS_SIZE: the hello's capability bytes
PROBE_TIMEOUT_S = 5.0
UPSTREAM_WARNING = ("llama.cpp's RPC server has no authentication: never expose it on an open network, "
                    "only on a LAN whose machines you trust")

_lock = threading.Lock()
_reg = None               # the RPC backend's registry entry, once loaded in this process


def llama_cpp_version() -> str:
    return metadata.version("llama-cpp-python")


def _lib_dir() -> Path:
    import llama_cpp

    return Path(llama_cpp.__file__).parent / "lib"


def library(*, build: bool = True, quiet: bool = True) -> Path:
    """The RPC backend library for the installed llama.cpp: the one its
    wheel ships, else one built here (when ``build``), else RpcError."""
    shipped = _lib_dir() / "libggml-rpc.so"
    if shipped.exists():
        return shipped
    ours = paths.home() / "native" / f"libggml-rpc-{llama_cpp_version()}-{platform.machine()}.so"
    if ours.exists():
        return ours
    if not build:
        raise RpcError("the RPC backend is not built on this machine yet",
                       hint="'edgeinfer rpc-worker' builds it on first use (a C++ compiler is needed)")
    return build_library(ours, quiet=quiet)


def status() -> dict:
    """What ``edgeinfer doctor`` says of RPC, building nothing: the backend
    library if it is here, else whether it can be built."""
    try:
        return {"ready": True, "library": str(library(build=False))}
    except RpcError:
        cxx = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
        return {"ready": False, "library": None, "compiler": cxx}


def build_library(out: Path, *, quiet: bool = True) -> Path:
    """Compile ``libggml-rpc.so`` from the installed llama-cpp-python
    version's sources into ``out``, against the ggml it installed."""
    cxx = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    if cxx is None:
        raise RpcError("building the RPC backend needs a C++ compiler, and none was found",
                       hint="install one (Debian, Raspberry Pi OS: sudo apt install g++), or set CXX")
    version = llama_cpp_version()
    with tempfile.TemporaryDirectory(prefix="edgeinfer-rpc-") as tmp:
        work = Path(tmp)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-python",
               "--dest", str(work), f"llama-cpp-python=={version}"]
        if not quiet:
            print(f"Building llama.cpp's RPC backend for llama-cpp-python {version} (once) ...", file=sys.stderr)
        done = subprocess.run(cmd, capture_output=True, text=True)
        archives = list(work.glob("llama_cpp_python-*.tar.gz"))
        if done.returncode != 0 or not archives:
            raise RpcError(f"could not fetch the sources of llama-cpp-python {version}: "
                           f"{(done.stderr or done.stdout).strip()[-300:]}",
                           hint="check that pip can reach its index, or install a llama-cpp-python built with "
                                "RPC: CMAKE_ARGS=-DGGML_RPC=ON pip install --force-reinstall --no-cache-dir "
                                f"--no-deps llama-cpp-python=={version}")
        ggml = _extract_ggml(archives[0], work / "src")
        rpc = ggml / "src" / "ggml-rpc"
        lib = _lib_dir()
        from .native import loaded_library

        # Linked to the very file libllama loaded (a wheel's copies are
        # separate files, and another copy would be another ggml).
        loaded = loaded_library("libggml-base")
        base = loaded.name if loaded is not None else "libggml-base.so.0"
        part = out.with_name(f".{out.name}.{os.getpid()}.part")
        out.parent.mkdir(parents=True, exist_ok=True)
        compile_cmd = [cxx, "-O2", "-std=c++17", "-fPIC", "-shared", "-DGGML_BACKEND_DL", "-DGGML_BACKEND_BUILD",
                       "-DGGML_BACKEND_SHARED", "-DGGML_SHARED", f"-I{ggml / 'include'}", f"-I{ggml / 'src'}",
                       f"-I{rpc}", str(rpc / "ggml-rpc.cpp"), str(rpc / "transport.cpp"), f"-L{lib}",
                       f"-l:{base}", f"-Wl,-rpath,{lib}", "-o", str(part)]
        done = subprocess.run(compile_cmd, capture_output=True, text=True)
        if done.returncode != 0:
            part.unlink(missing_ok=True)
            raise RpcError(f"compiling the RPC backend failed: {done.stderr.strip()[-400:]}",
                           hint="install a llama-cpp-python built with RPC instead: CMAKE_ARGS=-DGGML_RPC=ON "
                                f"pip install --force-reinstall --no-cache-dir --no-deps llama-cpp-python=={version}")
        os.replace(part, out)
    return out


def _extract_ggml(archive: Path, dest: Path) -> Path:
    """ggml's headers and the RPC backend's sources out of an sdist: the
    directory holding ``include`` and ``src``."""
    wanted = ("/vendor/llama.cpp/ggml/include/", "/vendor/llama.cpp/ggml/src/ggml-rpc/")
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.isfile() and (
            any(w in m.name for w in wanted)
            or (m.name.count("/vendor/llama.cpp/ggml/src/") and m.name.rsplit("/", 2)[-2] == "src"
                and m.name.endswith(".h")))]
        if not members:
            raise RpcError(f"{archive.name} does not hold llama.cpp's RPC backend sources")
        tar.extractall(dest, members=members, filter="data")
    top = members[0].name.split("/vendor/")[0]
    return dest / top / "vendor" / "llama.cpp" / "ggml"


# -- the backend in this process -------------------------------------------------
@functools.cache
def _ggml():
    from .native import libggml

    g = libggml()
    for fn, res, args in (("ggml_backend_load", ctypes.c_void_p, [ctypes.c_char_p]),
                          ("ggml_backend_reg_get_proc_address", ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_char_p]),
                          ("ggml_backend_register", None, [ctypes.c_void_p]),
                          ("ggml_backend_dev_by_type", ctypes.c_void_p, [ctypes.c_int])):
        getattr(g, fn).restype, getattr(g, fn).argtypes = res, args
    return g


def _backend():
    """The RPC backend's registry entry, loaded once per process."""
    global _reg
    with _lock:
        if _reg is None:
            from .native import init_backend

            init_backend()
            reg = _ggml().ggml_backend_load(str(library()).encode())
            if not reg:
                raise RpcError(f"llama.cpp could not load its RPC backend from {library()}",
                               hint="remove that file and run 'edgeinfer rpc-worker' again to rebuild it")
            _reg = reg
        return _reg


def _proc(name: str, signature):
    addr = _ggml().ggml_backend_reg_get_proc_address(_backend(), name.encode())
    if not addr:
        raise RpcError(f"the RPC backend has no {name}")
    return signature(addr)


def check_endpoint(text: str) -> tuple[str, int]:
    """``HOST:PORT`` as (host, port); RpcError for anything else."""
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise RpcError(f"{text[:80]!r} is not HOST:PORT", hint="for example 192.168.1.20:50052")
    return host.strip("[]"), int(port)


def probe(endpoint: str, timeout: float = PROBE_TIMEOUT_S) -> tuple[int, int, int]:
    """The protocol version a worker at ``endpoint`` speaks, checked
    before llama.cpp connects (which aborts the process on any failure):
    RpcError when it does not answer, is busy with another client, or
    speaks another major version."""
    host, port = check_endpoint(endpoint)
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.settimeout(timeout)
            s.sendall(bytes([_HELLO]) + struct.pack("<Q", _CAPS) + bytes(_CAPS))
            size = struct.unpack("<Q", _recv(s, 8))[0]
            if size != 4 + _CAPS:
                raise RpcError(f"{endpoint} answered, but not as an RPC worker of this llama.cpp")
            major, minor, patch = _recv(s, size)[:3]
    except socket.timeout:
        raise RpcError(f"the RPC worker at {endpoint} did not answer within {timeout:g} s: it serves one "
                       "client at a time, and may be busy with another") from None
    except OSError as e:
        raise RpcError(f"no RPC worker answers at {endpoint}: {e.strerror or e}") from None
    if major != PROTO_MAJOR:
        raise RpcError(f"the RPC worker at {endpoint} speaks protocol {major}.{minor}.{patch}, this server "
                       f"{PROTO_MAJOR}.x", hint="run the same edgeinfer and llama-cpp-python release on every box")
    return major, minor, patch


def _recv(s: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            raise RpcError("the RPC worker closed the connection during its hello")
        data += chunk
    return data


def connect(endpoints: list[str]) -> int:
    """Register each worker at ``endpoints`` as a device for the models
    this process loads next (probed first); returns how many."""
    add = _proc("ggml_backend_rpc_add_server", ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_char_p))
    g = _ggml()
    for endpoint in endpoints:
        probe(endpoint)
        reg = add(endpoint.encode())
        if not reg:
            raise RpcError(f"llama.cpp could not add the RPC worker at {endpoint}")
        g.ggml_backend_register(reg)
    return len(endpoints)


# ggml's device and backend structs as the pinned llama.cpp lays them out
# (ggml-backend-impl.h): a device is 15 function pointers (get_memory the
# third, init_backend the sixth), reg and context; a backend is its guid,
# 16 function pointers, its device and context. They are internal to
# ggml, so a memory cap is offered only on a release where they were checked.
_DEVICE_FIELDS = 17
_GET_MEMORY, _INIT_BACKEND = 2, 5
_BACKEND_DEVICE = 17
_CAP_CHECKED = ("0.3.36",)
_GetMemory = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(ctypes.c_size_t))
_InitBackend = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_char_p)


def parse_size(text: str) -> int:
    """"4G", "512M", "1.5GiB" or a number of bytes, as bytes."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    units = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    try:
        n = float(t[:-1]) * units[t[-1]] if t and t[-1] in units else float(t)
    except ValueError:
        n = -1
    if not n > 0 or n != n:
        raise RpcError(f"{text[:40]!r} is not a size", hint="for example 4G or 512M")
    return int(n)


def _capped(cpu: int, cap: int):
    """A copy of the CPU device whose memory reads at most ``cap`` bytes,
    the figure a server splits the layers by; the backends it starts name
    the copy as their device, since the RPC server asks a backend for its
    device's memory. (The copy and its callbacks must outlive the server:
    the caller keeps them.)"""
    if llama_cpp_version() not in _CAP_CHECKED:
        raise RpcError(f"a memory cap is not offered with llama-cpp-python {llama_cpp_version()}: the device layout "
                       "it relies on was checked on " + ", ".join(_CAP_CHECKED), hint="leave out --mem")
    fields = (ctypes.c_void_p * _DEVICE_FIELDS).from_address(cpu)
    real_memory, real_init = _GetMemory(fields[_GET_MEMORY]), _InitBackend(fields[_INIT_BACKEND])
    proxy = (ctypes.c_void_p * _DEVICE_FIELDS)(*fields)

    def get_memory(_dev, free, total):
        real_memory(cpu, free, total)
        free[0], total[0] = min(free[0], cap), min(total[0], cap)

    def init_backend(_dev, params):
        backend = real_init(cpu, params)
        if backend:
            (ctypes.c_void_p * (_BACKEND_DEVICE + 1)).from_address(backend)[_BACKEND_DEVICE] = ctypes.addressof(proxy)
        return backend

    callbacks = (_GetMemory(get_memory), _InitBackend(init_backend))
    proxy[_GET_MEMORY] = ctypes.cast(callbacks[0], ctypes.c_void_p).value
    proxy[_INIT_BACKEND] = ctypes.cast(callbacks[1], ctypes.c_void_p).value
    return proxy, callbacks


def serve_forever(endpoint: str, *, cache_dir: str | None = None, threads: int = 1, mem: int | None = None) -> None:
    """Run llama.cpp's RPC server on this process's CPU at ``endpoint``
    (it never returns: run it in a process of its own). ``cache_dir``
    keeps large tensors, so a model's second load sends only their hashes;
    ``mem`` caps the memory it reports, which a server splits a model's
    layers by."""
    start = _proc("ggml_backend_rpc_start_server",
                  ctypes.CFUNCTYPE(None, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_size_t,
                                   ctypes.POINTER(ctypes.c_void_p)))
    cpu = _ggml().ggml_backend_dev_by_type(0)   # GGML_BACKEND_DEVICE_TYPE_CPU
    keep = _capped(cpu, mem) if mem else None
    devices = (ctypes.c_void_p * 1)(ctypes.addressof(keep[0]) if keep else cpu)
    start(endpoint.encode(), cache_dir.encode() if cache_dir else None, threads, 1, devices)
