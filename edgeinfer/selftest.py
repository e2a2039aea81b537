"""Native code is tried in a child process before the caller trusts it.

The first time a model file is loaded on a machine (CPU model and flags,
llama.cpp build: :func:`edgeinfer.native.machine`), a child process loads
it with a native setting, prefills a few dozen tokens and decodes a few
greedy steps. If the child dies by a signal or hangs, the next safer
setting is tried (``full``, then ``no_amx``, then ``plain``). The first that
survives is remembered in ``$EDGEINFER_HOME/selftest/<machine>.json``, so
later loads of that file pay one small read.

A file that kills the child with every setting is refused with GGUFError
and remembered as refused: llama.cpp aborts the process on some damage
that a header check cannot see, and the caller's process must outlive it.

Where the CPU and the build both have AMX, ``full`` is skipped without
paying for a crash; a setting that crashed here once is skipped for later
models too. A setting forced with ``native=`` or ``$EDGEINFER_NATIVE`` wins
over the record; it is still tried in a child once per file.

Tests drive the fallback on any CPU with ``$EDGEINFER_SELFTEST_FAULT``:
``SETTING:KIND[,SETTING:KIND]`` makes the child die by ``segv`` or ``abort``,
or ``hang``, after its prefill when it runs that setting (``*`` for all).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from filelock import FileLock

from . import native, paths
from .errors import EngineError, GGUFError
from .processes import die_with_parent

RECORD_VERSION = 1
FAULT_ENV = "EDGEINFER_SELFTEST_FAULT"
TIMEOUT_ENV = "EDGEINFER_SELFTEST_TIMEOUT"
PROMPT = ("The quick brown fox jumps over the lazy dog. A journey of a thousand miles "
          "begins with a single step. To be, or not to be, that is the question.")
N_PREFILL = 32
N_DECODE = 4


@dataclass
class Trial:
    """One run of the child with one setting."""

    setting: str
    outcome: str           # ok, signal, hang, error (llama.cpp refused cleanly), skipped
    seconds: float = 0.0
    signal: str | None = None
    stage: str = ""        # the last stage the child reached: started, loaded, prefilled, decoded
    detail: str = ""       # the child's last words, or why the setting was skipped

    @property
    def crashed(self) -> bool:
        return self.outcome in ("signal", "hang")

    def why(self) -> str:
        if self.outcome == "signal":
            what = f"died by {self.signal}"
        elif self.outcome == "hang":
            what = f"hung for {self.seconds:.0f} s"
        elif self.outcome == "skipped":
            return f"skipped: {self.detail}"
        else:
            what = self.outcome
        where = f" after stage '{self.stage}'" if self.stage else ""
        return what + where + (f" ({self.detail})" if self.detail else "")


@dataclass
class Verdict:
    """The setting a load uses, and how it was decided."""

    setting: str
    source: str                     # self-test (ran now), record (remembered), forced
    trials: list[Trial] = field(default_factory=list)
    seconds: float = 0.0            # what deciding cost this load

    @property
    def turned_off(self) -> list[Trial]:
        return [t for t in self.trials if t.outcome != "ok" and t.setting != self.setting]

    def describe(self) -> str:
        """The setting, where it came from, and what was turned off and why."""
        off = "".join(f"; {t.setting} {t.why()}" for t in self.turned_off)
        return f"{self.setting} ({self.source}{off})"

    def summary(self) -> str:
        """The setting, how long its test took, and what was turned off and why."""
        ok = next((t for t in self.trials if t.outcome == "ok" and t.setting == self.setting), None)
        off = "".join(f"; {t.setting} {t.why()}" for t in self.turned_off)
        return self.setting + (f" (passed in {ok.seconds:.1f} s)" if ok else "") + off

    def to_dict(self) -> dict:
        return {"setting": self.setting, "source": self.source, "seconds": round(self.seconds, 3),
                "trials": [asdict(t) for t in self.trials]}


# -- the record -----------------------------------------------------------------

def record_dir() -> Path:
    return paths.home() / "selftest"


def record_path() -> Path:
    return record_dir() / f"{native.machine_id()}.json"


def _empty_record() -> dict:
    return {"version": RECORD_VERSION, "machine": native.machine(), "models": {}, "refused": {},
            "crashed": {}}


def load_record() -> dict:
    """This machine's record; a missing, damaged or stale one counts as empty."""
    try:
        rec = json.loads(record_path().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return _empty_record()
    if not (isinstance(rec, dict) and rec.get("version") == RECORD_VERSION
            and rec.get("machine") == native.machine()
            and all(isinstance(rec.get(k), dict) for k in ("models", "refused", "crashed"))):
        return _empty_record()
    # Drop entries that do not have the shape this code writes.
    rec["models"] = {k: v for k, v in rec["models"].items()
                     if isinstance(v, dict) and isinstance(v.get("passed"), list)
                     and v.get("setting") in (None, *native.SETTINGS)}
    rec["crashed"] = {k: v for k, v in rec["crashed"].items() if k in native.SETTINGS and isinstance(v, dict)}
    return rec


MAX_ENTRIES = 256  # models remembered per machine; the oldest go first


def _current(key: str) -> bool:
    """False for a bare file's entry once the file is gone or has changed."""
    if not key.startswith("file:"):
        return True
    name, size, mtime = key[5:].rsplit(":", 2)
    try:
        st = os.stat(name)
    except OSError:
        return False
    return f"{st.st_size}:{st.st_mtime_ns}" == f"{size}:{mtime}"


def save_record(rec: dict) -> None:
    """Write the record; a store that cannot be written only costs the
    next load another test."""
    try:
        _write_record(rec)
    except OSError:
        pass


def _write_record(rec: dict) -> None:
    for part in ("models", "refused"):
        kept = sorted(((k, v) for k, v in rec[part].items() if _current(k)),
                      key=lambda kv: kv[1].get("at", 0), reverse=True)[:MAX_ENTRIES]
        rec[part] = dict(kept)
    path = record_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(rec, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _lock():
    """Serialises tests of one machine's record across processes; a
    read-only store gets no lock (it tests every time, remembers nothing)."""
    d = record_dir()
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError:
        pass
    if not os.access(d, os.W_OK):
        return contextlib.nullcontext()
    return FileLock(str(d / ".lock"))


def model_key(path: str | os.PathLike, sha256: str | None) -> str:
    """A blob by its sha256; a bare file by its path, size and time."""
    if sha256:
        return f"sha256:{sha256}"
    p = Path(path).resolve()
    st = p.stat()
    return f"file:{p}:{st.st_size}:{st.st_mtime_ns}"


def forget(sha256: str | None = None, path: str | os.PathLike | None = None) -> None:
    """Drop what is remembered about one model, or (no arguments) everything."""
    with _lock():
        rec = load_record()
        if sha256 is None and path is None:
            rec = _empty_record()
        else:
            key = model_key(path, sha256)
            rec["models"].pop(key, None)
            rec["refused"].pop(key, None)
        save_record(rec)


def trials_of(entry: dict) -> list[Trial]:
    out = []
    for t in entry.get("trials", []):
        try:
            out.append(Trial(**t))
        except TypeError:
            continue
    return out


# -- deciding ---------------------------------------------------------------------

def candidates(rec: dict | None = None) -> list[tuple[str, str | None]]:
    """The settings to try here, in order, each with a reason to skip it
    (None: try it). The safest is never skipped."""
    rec = rec if rec is not None else load_record()
    ladder = native.ladder()
    out = []
    for s in ladder:
        reason = None
        if s != ladder[-1]:
            if s == "full" and "no_amx" in ladder and native.amx_on_cpu_and_build():
                reason = ("AMX on this CPU and in this build, whose matmul is known to crash "
                          "on virtualised Xeons (ggml-org/llama.cpp#20824)")
            elif s in rec["crashed"]:
                c = rec["crashed"][s]
                reason = f"it crashed here before ({c.get('why', 'crashed')}, with {c.get('model', 'a model')})"
        out.append((s, reason))
    return out


def ensure(path: str | os.PathLike, info=None, *, sha256: str | None = None, name: str | None = None,
           forced: str | None = None, threads: int = 1, threads_batch: int | None = None,
           mmap: bool = True, rerun: bool = False) -> Verdict:
    """The native setting to load ``path`` with, testing it in a child first
    if this machine has not seen this file. ``info`` is its GGUFInfo (read
    here if not given). Raises GGUFError for a file that crashes llama.cpp
    with every setting, EngineError for a forced setting that crashes."""
    from .gguf_file import read_gguf

    t0 = time.perf_counter()
    key = model_key(path, sha256)
    label = name or Path(path).name
    info = info if info is not None else read_gguf(path)
    run = dict(threads=threads, threads_batch=threads_batch or threads, mmap=mmap,
               timeout=_timeout(info.file_size), repack=native.repack_tensors(info))
    with _lock():
        rec = load_record()
        entry = rec["models"].get(key)
        if forced:
            if not rerun and entry and forced in entry["passed"]:
                return Verdict(forced, "forced", trials_of(entry), time.perf_counter() - t0)
            trial = run_trial(path, forced, **run)
            if trial.crashed:
                raise EngineError(
                    f"the native setting '{forced}' that was forced crashed a test process loading "
                    f"{label}: it {trial.why()}",
                    hint=f"unset {native.ENV} (or pass native='auto') to let the self-test choose, "
                         "or force 'plain'")
            if trial.outcome == "ok":
                _remember(rec, key, label, None, [trial])
                save_record(rec)
            return Verdict(forced, "forced", [trial], time.perf_counter() - t0)
        if not rerun:
            if key in rec["refused"]:
                raise _refusal(label, trials_of(rec["refused"][key]), remembered=True)
            if entry and entry.get("setting") in native.ladder():
                return Verdict(entry["setting"], "record", trials_of(entry), time.perf_counter() - t0)
        trials: list[Trial] = []
        for setting, skip in candidates(rec):
            if skip:
                trials.append(Trial(setting, "skipped", detail=skip))
                continue
            trial = run_trial(path, setting, **run)
            trials.append(trial)
            if trial.outcome == "error":
                # llama.cpp refused the file cleanly; the load in this process
                # will raise with its reason. Nothing to remember.
                return Verdict(setting, "self-test", trials, time.perf_counter() - t0)
            if trial.outcome == "ok":
                _remember(rec, key, label, setting, trials)
                rec["refused"].pop(key, None)
                save_record(rec)
                return Verdict(setting, "self-test", trials, time.perf_counter() - t0)
        rec["refused"][key] = {"name": label, "trials": [asdict(t) for t in trials], "at": time.time()}
        rec["models"].pop(key, None)
        save_record(rec)
        raise _refusal(label, trials)


def _remember(rec: dict, key: str, label: str, setting: str | None, trials: list[Trial]) -> None:
    entry = rec["models"].setdefault(key, {"name": label, "passed": []})
    entry["name"] = label
    entry["at"] = time.time()
    if setting is not None:
        entry["setting"] = setting
        entry["trials"] = [asdict(t) for t in trials]
    passed = [t.setting for t in trials if t.outcome == "ok"]
    entry["passed"] = sorted(set(entry["passed"]) | set(passed))
    # A setting that crashed where a later one passed is the machine's
    # fault, not the file's: later models skip it.
    if any(t.outcome == "ok" for t in trials):
        for t in trials:
            if t.crashed:
                rec["crashed"][t.setting] = {"why": t.why(), "model": label, "at": time.time()}


def _refusal(label: str, trials: list[Trial], remembered: bool = False) -> GGUFError:
    tried = [t for t in trials if t.outcome != "skipped"]
    how = "; ".join(f"{t.setting}: {t.why()}" for t in tried)
    when = "in an earlier test process" if remembered else "in a test process"
    return GGUFError(
        f"llama.cpp crashed loading {label} {when}, with every native setting it was tried with "
        f"({how}); the file is damaged or this llama.cpp cannot run it",
        hint="pull the model again, or after updating llama-cpp-python run 'edgeinfer doctor --selftest'")


def _timeout(size: int) -> float:
    env = os.environ.get(TIMEOUT_ENV)
    if env:
        try:
            return max(0.1, float(env))
        except ValueError:
            pass
    # Loading pages the weights in: allow a slow SD card (20 MB/s) on top
    # of a minute for the few dozen tokens a Pi evaluates slowly.
    return 60.0 + size / 20e6


def check_file(path: str | os.PathLike, name: str | None = None) -> Trial:
    """Load the model in a child, without a context: the check for a file
    that has not been loaded yet (an import, a pull by URL), so that one
    llama.cpp cannot load never enters the store. The weights are mapped,
    not read, so this costs little more than reading the header. Raises
    GGUFError, with llama.cpp's reason, if the child crashes or refuses."""
    size = Path(path).stat().st_size
    label = name or Path(path).name
    trial = run_trial(path, "plain", timeout=_timeout(size), mode="load")
    if trial.crashed:
        raise GGUFError(f"llama.cpp crashed loading {label} in a test process: it {trial.why()}",
                        hint="the file is damaged or not a model this llama.cpp can run; "
                             "download it again")
    if trial.outcome == "error":
        why = trial.detail.removeprefix("error: ")
        raise GGUFError(f"{label}: {why}", hint="the file is damaged or made for another llama.cpp; "
                                                "download it again, or update edgeinfer")
    return trial


# -- the parent's side of a trial ---------------------------------------------------

def run_trial(path: str | os.PathLike, setting: str, *, threads: int = 1, threads_batch: int | None = None,
              mmap: bool = True, timeout: float = 120.0, mode: str = "decode",
              repack: list[str] | None = None) -> Trial:
    """Run the child once with ``setting``; never raises for what the child
    does. The child trusts nothing it reads itself: ``repack`` (the weights
    no_amx moves) comes from the parent's own checked header."""
    args = {"path": str(path), "setting": setting, "threads": int(threads),
            "threads_batch": int(threads_batch or threads), "mmap": bool(mmap), "mode": mode,
            "repack": list(repack or [])}
    env = dict(os.environ, GGML_NO_BACKTRACE="1")  # ggml would attach gdb to print one
    cmd = [sys.executable, "-m", "edgeinfer.selftest", json.dumps(args)]
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL)
        out, err, rc = p.stdout, p.stderr, p.returncode
    except subprocess.TimeoutExpired as e:  # run() has killed the child
        return Trial(setting, "hang", time.perf_counter() - t0, stage=_stage(e.stdout),
                     detail=f"no answer within {timeout:.0f} s")
    seconds = time.perf_counter() - t0
    stage = _stage(out)
    if rc == 0 and b"\nOK" in b"\n" + (out or b""):
        return Trial(setting, "ok", seconds, stage=stage)
    detail = _last_words(err)
    if rc < 0:
        try:
            name = signal.Signals(-rc).name
        except ValueError:
            name = f"signal {-rc}"
        return Trial(setting, "signal", seconds, signal=name, stage=stage, detail=detail)
    return Trial(setting, "error", seconds, stage=stage, detail=detail or f"exit status {rc}")


def _stage(out) -> str:
    if isinstance(out, str):
        out = out.encode()
    stages = [ln.split(None, 1)[1].decode(errors="replace").strip()
              for ln in (out or b"").splitlines() if ln.startswith(b"STAGE ")]
    return stages[-1] if stages else ""


def _last_words(err: bytes | None) -> str:
    """The line that says what went wrong, out of the child's stderr."""
    lines = [ln.strip() for ln in (err or b"").decode(errors="replace").splitlines() if ln.strip()]
    for marker in ("GGML_ASSERT", "GGML_ABORT", "error", "Error", "Fatal Python error"):
        hit = [ln for ln in lines if marker in ln]
        if hit:
            return hit[0][:300]
    return lines[-1][:300] if lines else ""


# -- the child ------------------------------------------------------------------------

def _say(what: str) -> None:
    os.write(1, f"STAGE {what}\n".encode())


def _fault_for(setting: str) -> str | None:
    for item in os.environ.get(FAULT_ENV, "").split(","):
        s, _, kind = item.strip().partition(":")
        if kind and s in (setting, "*"):
            return kind
    return None


def _fault(kind: str | None) -> None:
    if kind == "segv":
        os.kill(os.getpid(), signal.SIGSEGV)
    elif kind == "abort":
        os.abort()
    elif kind == "hang":
        time.sleep(3600)


def _child(raw: str) -> int:
    import faulthandler

    import llama_cpp as lc
    import numpy as np

    faulthandler.enable()  # a crash names its frame on stderr, which the parent keeps
    a = json.loads(raw)
    die_with_parent()  # a killed caller leaves no test running
    fault = _fault_for(a["setting"])
    _say("started")
    mp = native.ModelParams(a["setting"], mmap=a["mmap"], vocab_only=a["mode"] == "vocab",
                            repack=a["repack"])
    model = lc.llama_model_load_from_file(a["path"].encode(), mp.params)
    if not model:
        why = native.last_error()
        print("error: llama.cpp could not load the model" + (f": {why}" if why else ""), file=sys.stderr)
        return 3
    _say("loaded")
    if a["mode"] in ("vocab", "load"):
        print("OK", flush=True)
        return 0
    cp = lc.llama_context_default_params()
    cp.n_ctx = 256
    cp.n_batch = cp.n_ubatch = 64
    cp.n_threads, cp.n_threads_batch = a["threads"], a["threads_batch"]
    cp.no_perf = True
    # An embedding model (an encoder, or one that pools) is tried the way
    # it runs: one batch, then its pooled vector, which must be finite.
    embedding = not lc.llama_model_has_decoder(model) or _pools(lc, model)
    cp.embeddings = embedding
    ctx = lc.llama_init_from_model(model, cp)
    if not ctx:
        print("error: llama.cpp could not create a context", file=sys.stderr)
        return 3
    vocab = lc.llama_model_get_vocab(model)
    n_vocab = lc.llama_vocab_n_tokens(vocab)
    data = PROMPT.encode()
    buf = (lc.llama_token * (len(data) + 8))()
    n = lc.llama_tokenize(vocab, data, len(data), buf, len(buf), True, False)
    tokens = list(buf[:max(n, 0)])[:N_PREFILL] or [0]
    batch = lc.llama_batch_init(64, 0, 1)

    def decode(toks: list[int], pos0: int) -> None:
        for i, t in enumerate(toks):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = t, pos0 + i, 1, 0
            batch.seq_id[i][0] = 0
        batch.logits[len(toks) - 1] = 1
        batch.n_tokens = len(toks)
        rc = lc.llama_decode(ctx, batch)
        if rc != 0:
            print(f"error: llama_decode returned {rc}", file=sys.stderr)
            sys.exit(3)

    def argmax() -> int:
        row = np.ctypeslib.as_array(lc.llama_get_logits_ith(ctx, -1), shape=(n_vocab,))
        if not np.isfinite(row).all():
            print("error: the logits are not finite numbers", file=sys.stderr)
            sys.exit(4)
        return int(row.argmax())

    if embedding:
        for i, t in enumerate(tokens):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = t, i, 1, 1
            batch.seq_id[i][0] = 0
        batch.n_tokens = len(tokens)
        encode = lc.llama_decode if lc.llama_model_has_decoder(model) else lc.llama_encode
        rc = encode(ctx, batch)
        if rc != 0:
            print(f"error: llama.cpp returned {rc} evaluating the input", file=sys.stderr)
            return 3
        _say("prefilled")
        _fault(fault)
        ptr = lc.llama_get_embeddings_seq(ctx, 0)
        vec = np.ctypeslib.as_array(ptr, shape=(lc.llama_model_n_embd(model),)) if ptr else None
        if vec is None or not np.isfinite(vec).all():
            print("error: the embedding is missing or not finite", file=sys.stderr)
            return 4
        _say("decoded")
        print("OK " + json.dumps({"tokens": [], "repacked": mp.repacked}), flush=True)
        return 0
    decode(tokens, 0)
    _say("prefilled")
    _fault(fault)
    pos = len(tokens)
    out = []
    for _ in range(N_DECODE):
        tok = argmax()
        out.append(tok)
        decode([tok], pos)
        pos += 1
    _say("decoded")
    print("OK " + json.dumps({"tokens": out, "repacked": mp.repacked}), flush=True)
    lc.llama_batch_free(batch)
    lc.llama_free(ctx)
    lc.llama_model_free(model)
    return 0


def _pools(lc, model) -> bool:
    """Whether the model's GGUF names a pooling type (an embedding model
    built on a decoder)."""
    buf = ctypes.create_string_buffer(64)
    if lc.llama_model_meta_val_str(model, b"general.architecture", buf, len(buf)) < 0:
        return False
    key = buf.value + b".pooling_type"
    return lc.llama_model_meta_val_str(model, key, buf, len(buf)) >= 0 and buf.value not in (b"", b"0")


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1]))
