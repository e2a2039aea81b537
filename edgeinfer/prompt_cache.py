"""A prompt cache: KV state of token prefixes, in memory and on disk.

When a request shares a token prefix with something seen before (a system
prompt, the earlier turns of a chat, a few-shot preamble), the engine
restores that prefix's KV state for its sequence and prefills only the
rest. States are per sequence (``llama_state_seq_get_data`` /
``set_data``), a few milliseconds for thousands of tokens, not
whole-context snapshots.

* Memory: an LRU of entries under a byte budget (default: an eighth of
  this machine's memory, at most 4 GiB).
* Disk: entries of at least ``disk_min_tokens`` tokens are also written,
  atomically and off the request's path, under
  ``$EDGEINFER_HOME/cache/prompt/<namespace>/``, where the namespace is a
  hash of everything that makes a state valid: model sha256, context
  size, KV types, llama.cpp build. A disk budget (default 1 GiB) is kept
  LRU by file time. A file that is corrupt, truncated, crafted (absurd
  sizes or token ids, a header nested too deep) or from another
  namespace is deleted and ignored; it never changes output and never
  fails a request. Temporary files a killed writer left are removed when
  the cache first looks at its directory, and count in the budget until
  then.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
import threading
import time
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from . import hardware, paths
from .processes import pid_alive

MAGIC = b"EIPC1\n"
PRELOAD_BYTES = 128 << 20   # read from disk into memory at load (PromptCache.preload): a few recent prompts
DEFAULT_DISK_BUDGET = 1 << 30
DEFAULT_DISK_MIN_TOKENS = 128
DISK_DELAY_S = 1.0      # a prompt's state goes to disk once no newer one has replaced it for this long
SAME_SHARE = 0.9        # a newer prompt sharing this much of a pending one's tokens replaces it
BUSY_DEFER_S = 30.0     # a due write waits this long at most for the model to be idle (PromptCache.busy)
BUSY_RECHECK_S = 0.05


def default_memory_budget() -> int:
    return min(hardware.total_memory() // 8, 4 << 30)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


@dataclass
class CacheEntry:
    tokens: tuple[int, ...]
    state: bytes | None          # None: only on disk so far (loaded on demand)
    path: Path | None = None
    # The logits the prompt's last token gave (float32, as llama.cpp wrote
    # them), so that a request for exactly this prompt draws its first
    # token from them instead of evaluating tokens again. None: not kept.
    logits: bytes | None = None

    @property
    def nbytes(self) -> int:
        return (len(self.state) if self.state is not None else 0) + len(self.logits or b"")


class PromptCache:
    """Prefix → KV state, LRU in memory with a disk tier.

    ``namespace`` must change whenever a saved state would no longer be
    valid (another model, context size, KV type or llama.cpp build).
    """

    def __init__(self, namespace: str, *, memory_budget: int | None = None,
                 disk: bool = True, disk_budget: int = DEFAULT_DISK_BUDGET,
                 disk_min_tokens: int = DEFAULT_DISK_MIN_TOKENS, root: Path | None = None):
        self.namespace = namespace
        self.memory_budget = default_memory_budget() if memory_budget is None else memory_budget
        self.disk_budget = disk_budget
        self.disk_min_tokens = disk_min_tokens
        self.dir = (root or paths.home() / "cache" / "prompt") / namespace if disk else None
        self._mem: OrderedDict[tuple[int, ...], CacheEntry] = OrderedDict()
        self._disk: dict[tuple[int, ...], Path] | None = None
        self._disk_logits: set[tuple[int, ...]] = set()   # the files that keep their prompt's logits
        self._lock = threading.Lock()
        self._writers: list[threading.Thread] = []     # a preload
        # disk writes: key -> (state, logits, when due)
        self._pending: dict[tuple, tuple[bytes, bytes | None, float]] = {}
        self._writer: threading.Thread | None = None
        self._wake = threading.Event()
        self._flushing = False
        # Whether the model is working (set by its engine): a due write
        # then waits for a gap, up to BUSY_DEFER_S. Writing 28 MB (a
        # 1,000-token prompt of a 1.5B model) beside a prefill slowed its
        # first token by about 10 % on a 2-core box.
        self.busy: Callable[[], bool] | None = None

    # -- lookup ------------------------------------------------------------
    def nearest(self, tokens: Sequence[int], at_least: int = 0) -> tuple[int, CacheEntry] | None:
        """The entry sharing the longest prefix with ``tokens`` (more than
        ``at_least`` tokens), as ``(shared length, entry)``; its state is
        loaded from disk if needed. None when nothing beats ``at_least``."""
        best_n, best_key, on_disk = at_least, None, False
        with self._lock:
            for key in self._mem:
                n = common_prefix(key, tokens)
                if n > best_n:
                    best_n, best_key = n, key
            for key in self._disk_index():
                n = common_prefix(key, tokens)
                if n > best_n:
                    best_n, best_key, on_disk = n, key, True
            if best_key is None:
                return None
            if not on_disk:
                self._mem.move_to_end(best_key)
                return best_n, self._mem[best_key]
            path = self._disk[best_key]
        entry = self._load(path, best_key)
        return None if entry is None else (best_n, entry)

    def exact(self, tokens: Sequence[int]) -> CacheEntry | None:
        """The entry of exactly ``tokens`` if it kept its logits (from
        memory, else read from disk), else None."""
        key = tuple(tokens)
        with self._lock:
            entry = self._mem.get(key)
            if entry is not None:
                self._mem.move_to_end(key)
                return entry if entry.logits is not None else None
            path = self._disk_index().get(key)
        entry = None if path is None else self._load(path, key)
        return entry if entry is not None and entry.logits is not None else None

    def _load(self, path: Path, key: tuple[int, ...]) -> CacheEntry | None:
        """The entry in the file at ``path``, now also in memory; None if
        the file is not sound."""
        read = self._read_file(path, key)
        if read is None:
            return None
        entry = CacheEntry(key, read[0], path, read[1])
        self._remember(entry)
        return entry

    def holds(self, tokens: Sequence[int], logits: bool = False) -> bool:
        """Whether an entry of exactly ``tokens`` is kept, in memory or on
        disk (with its logits, if ``logits``)."""
        key = tuple(tokens)
        with self._lock:
            entry = self._mem.get(key)
            if entry is not None and (entry.logits is not None or not logits):
                return True
            return key in self._disk_index() and (key in self._disk_logits or not logits)

    # -- storing -----------------------------------------------------------
    def put(self, tokens: Sequence[int], state: bytes, logits: bytes | None = None) -> None:
        """Remember the KV state of exactly ``tokens`` (and the logits its
        last token gave, if known)."""
        key = tuple(tokens)
        with self._lock:
            # An entry that extends another serves every lookup the shorter
            # one would (lookups match on shared prefixes), so drop those.
            for k in [k for k in self._mem if len(k) < len(key) and key[:len(k)] == k]:
                del self._mem[k]
        self._remember(CacheEntry(key, state, logits=logits))
        if self.dir is not None and len(key) >= self.disk_min_tokens:
            with self._lock:
                if key in self._disk_index() and (key in self._disk_logits or logits is None):
                    return
                # A newer prompt sharing most of a pending one's tokens (the
                # same file typed on, the same chat a turn on) is written in
                # its place: one write per burst, not one per keystroke. What
                # is lost is at most a tenth of that prompt, to read again.
                for k in [k for k in self._pending if common_prefix(k, key) >= SAME_SHARE * len(k)]:
                    del self._pending[k]
                self._pending[key] = (state, logits, time.monotonic() + DISK_DELAY_S)
                if self._writer is None:
                    self._writer = threading.Thread(target=self._write_pending, daemon=True,
                                                    name="edgeinfer-cache-write")
                    self._writer.start()
            self._wake.set()

    def _write_pending(self) -> None:
        """The writer thread: each pending entry once it is due (at once
        when flushing), at the lowest priority: on a machine whose cores
        all decode, a write at normal priority stalls llama.cpp's thread
        team (a code completion's first token went from 65 to 640 ms on 2
        cores with one write per keystroke)."""
        with contextlib.suppress(AttributeError, OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        while True:
            with self._lock:
                if not self._pending:
                    self._writer = None
                    return
                key, (state, logits, due) = min(self._pending.items(), key=lambda kv: kv[1][2])
                now = time.monotonic()
                wait = 0.0 if self._flushing else due - now
                if wait <= 0 and not self._flushing and now < due + BUSY_DEFER_S and self.busy is not None \
                        and self.busy():
                    wait = BUSY_RECHECK_S
                if wait <= 0:
                    del self._pending[key]
            if wait > 0:
                self._wake.wait(wait)
                self._wake.clear()
                continue
            self._write_file(key, state, logits)

    def _remember(self, entry: CacheEntry) -> None:
        if entry.nbytes > self.memory_budget:
            return
        with self._lock:
            self._mem.pop(entry.tokens, None)
            self._mem[entry.tokens] = entry
            used = sum(e.nbytes for e in self._mem.values())
            while used > self.memory_budget and self._mem:
                _, old = self._mem.popitem(last=False)
                used -= old.nbytes

    def forget(self, tokens: Sequence[int]) -> None:
        """Drop an entry whose state llama.cpp refused."""
        key = tuple(tokens)
        with self._lock:
            self._mem.pop(key, None)
            path = (self._disk or {}).pop(key, None)
        if path is not None:
            path.unlink(missing_ok=True)

    def flush(self) -> None:
        """Write what is pending now, and wait for it and a preload (tests,
        benchmarks, shutdown)."""
        with self._lock:
            writer, self._flushing = self._writer, True
        try:
            self._wake.set()
            if writer is not None:
                writer.join()
        finally:
            self._flushing = False
        for t in self._writers:
            t.join()
        self._writers.clear()

    def preload(self, most: int = PRELOAD_BYTES) -> threading.Thread | None:
        """Read the most recently used entries on disk into memory, up to
        ``most`` bytes and half the memory budget, in a thread of their own; returns
        it (:meth:`flush` waits for it too). After a restart the first
        request that repeats a recent prefix is then restored from memory
        (3 ms for 1,100 tokens of SmolLM2) rather than read from disk first
        (18 ms more, and the index of every file's header, 6 ms)."""
        if self.dir is None:
            return None

        def run() -> None:
            with self._lock:
                index = dict(self._disk_index())
            newest = []
            for key, path in index.items():
                try:
                    newest.append((path.stat().st_mtime, key, path))
                except OSError:
                    pass
            room = min(most, self.memory_budget // 2) - self.memory_bytes
            for _, key, path in sorted(newest, reverse=True):
                with self._lock:
                    if key in self._mem:
                        continue
                try:
                    size = path.stat().st_size
                except OSError:
                    continue
                if size > room:
                    continue
                read = self._read_file(path, key, touch=False)   # a preload is not a use
                if read is None:
                    continue
                room -= size
                with self._lock:
                    if key in self._mem:   # a request put or loaded it meanwhile
                        continue
                    self._mem[key] = CacheEntry(key, read[0], path, read[1])
                    self._mem.move_to_end(key, last=False)   # the least recent of memory: requests come first

        t = threading.Thread(target=run, daemon=True, name="edgeinfer-cache-preload")
        self._writers.append(t)
        t.start()
        return t

    @property
    def memory_bytes(self) -> int:
        return sum(e.nbytes for e in self._mem.values())

    def __len__(self) -> int:
        return len(self._mem)

    # -- disk format: MAGIC, u32 header length, JSON header, state bytes, then
    # -- the logits' bytes if the header counts any ("logits") ---------------
    def _disk_index(self) -> dict[tuple[int, ...], Path]:
        """Token prefixes of the files on disk, read once (headers only)."""
        if self._disk is None:
            self._disk = {}
            if self.dir is not None and self.dir.is_dir():
                _remove_stale_temporaries(self.dir)
                for p in self.dir.glob("*.kv"):
                    head = _read_header(p)
                    if head is None or head.get("namespace") != self.namespace:
                        _remove(p)
                        continue
                    self._disk[tuple(head["tokens"])] = p
                    if head["logits"]:
                        self._disk_logits.add(tuple(head["tokens"]))
        return self._disk

    def _write_file(self, key: tuple[int, ...], state: bytes, logits: bytes | None = None) -> None:
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            name = hashlib.sha256(struct.pack(f"<{len(key)}i", *key)).hexdigest()[:32]
            path = self.dir / f"{name}.kv"
            logits = logits or b""
            head = json.dumps({"namespace": self.namespace, "tokens": list(key), "size": len(state),
                               "logits": len(logits), "crc32": _checksum(key, state, logits)}).encode()
            tmp = path.with_name(f".{name}.{os.getpid()}.{threading.get_ident()}.tmp")
            with open(tmp, "wb") as f:
                f.write(MAGIC + struct.pack("<I", len(head)) + head)
                f.write(state)
                f.write(logits)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            with self._lock:
                self._disk_index()[key] = path
                (self._disk_logits.add if logits else self._disk_logits.discard)(key)
            self._enforce_disk_budget()
        except OSError:
            pass  # a cache that cannot write is just a smaller cache

    def _read_file(self, path: Path, key: tuple[int, ...], touch: bool = True) -> tuple[bytes, bytes | None] | None:
        """(state, logits or None) of the file at ``path``; None (and the
        file gone) if it is not sound."""
        try:
            with open(path, "rb") as f:
                head = _parse_header(f, os.fstat(f.fileno()).st_size)
                if head is None or tuple(head["tokens"]) != key or head["namespace"] != self.namespace:
                    raise ValueError("header")
                state = f.read(head["size"])
                logits = f.read(head["logits"] + 1)
            if len(state) != head["size"] or len(logits) != head["logits"] or \
                    _checksum(key, state, logits) != head["crc32"]:
                raise ValueError("body")
            if touch:
                os.utime(path)  # LRU by file time
            return state, logits or None
        except (OSError, ValueError, KeyError, TypeError, OverflowError, MemoryError, struct.error):
            with self._lock:
                (self._disk or {}).pop(key, None)
            _remove(path)
            return None

    def _enforce_disk_budget(self) -> None:
        files = []
        for p in self.dir.parent.glob("*/*.kv"):  # the budget covers every namespace
            try:
                st = p.stat()
                files.append((st.st_mtime, st.st_size, p))
            except OSError:
                pass
        total = sum(s for _, s, _ in files)
        for p in self.dir.parent.glob("*/.*.tmp"):   # writes under way count, and are left to finish
            try:
                total += p.stat().st_size
            except OSError:
                pass
        for _, size, p in sorted(files):
            if total <= self.disk_budget:
                break
            p.unlink(missing_ok=True)
            total -= size
            with self._lock:
                if self._disk:
                    for k, v in list(self._disk.items()):
                        if v == p:
                            del self._disk[k]


def _checksum(tokens: tuple[int, ...], state, logits: bytes = b"") -> int:
    """crc32 over the token ids, the state and the logits: a damaged token
    id in the header must not pass the state off as another prefix's."""
    return zlib.crc32(logits, zlib.crc32(state, zlib.crc32(struct.pack(f"<{len(tokens)}i", *tokens))))


def _parse_header(f, file_size: int | None = None) -> dict | None:
    """The header of a cache file, or None unless every field is sound:
    a file on disk is input like any other (a crafted one must not make
    a read allocate without bound or a token id overflow)."""
    if f.read(len(MAGIC)) != MAGIC:
        return None
    raw = f.read(4)
    if len(raw) != 4:
        return None
    (n,) = struct.unpack("<I", raw)
    if n > 64 << 20 or (file_size is not None and n > file_size):
        return None
    data = f.read(n)
    if len(data) != n:
        return None
    try:
        head = json.loads(data)
    except (ValueError, RecursionError):
        return None
    if not isinstance(head, dict) or not isinstance(head.get("namespace"), str):
        return None
    tokens, size, crc = head.get("tokens"), head.get("size"), head.get("crc32")
    if not isinstance(tokens, list) or not all(type(t) is int and 0 <= t < 2 ** 31 for t in tokens):
        return None
    if type(size) is not int or size < 0 or (file_size is not None and size > file_size):
        return None
    logits = head.setdefault("logits", 0)   # files written before logits were kept have none
    if type(logits) is not int or logits < 0 or logits % 4 or (file_size is not None and size + logits > file_size):
        return None
    if type(crc) is not int or not 0 <= crc < 2 ** 32:
        return None
    return head


def _read_header(path: Path) -> dict | None:
    try:
        with open(path, "rb") as f:
            return _parse_header(f, os.fstat(f.fileno()).st_size)
    except (OSError, ValueError, MemoryError):
        return None


def _remove(path: Path) -> None:
    """Delete a cache entry that must not be used; something else under
    its name (a directory) is left alone, and skipped because it is not a
    file."""
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


def _remove_stale_temporaries(directory: Path) -> None:
    """``.<name>.<pid>.<thread>.tmp`` files whose writer is gone (killed
    mid-write)."""
    for p in directory.glob(".*.tmp"):
        parts = p.name.split(".")
        pid = int(parts[2]) if len(parts) > 3 and parts[2].isdigit() else None
        if pid is None or not pid_alive(pid):
            _remove(p)


def disk_entries(root: Path | None = None) -> list[dict]:
    """Every cache file on disk: namespace, tokens, bytes, path (for the CLI)."""
    base = root or paths.home() / "cache" / "prompt"
    out = []
    for p in sorted(base.glob("*/*.kv")):
        head = _read_header(p)
        if head is None:
            continue
        st = p.stat()
        out.append({"namespace": p.parent.name, "tokens": len(head["tokens"]), "bytes": st.st_size,
                    "modified": st.st_mtime, "path": str(p)})
    return out


def clear_disk(root: Path | None = None) -> int:
    """Delete every cache file; returns how many bytes were freed."""
    base = root or paths.home() / "cache" / "prompt"
    freed = 0
    for p in base.glob("*/*"):
        try:
            freed += p.stat().st_size
            p.unlink()
        except OSError:
            pass
    return freed
