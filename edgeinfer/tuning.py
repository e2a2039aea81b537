"""Thread profiles: measure this machine, save what is fastest, use it.

``sweep()`` times prefill and decode across candidate thread counts on a
loaded engine (warm-up, then the median of several short runs); the best
counts are saved as a profile keyed by the machine's fingerprint (CPU
model, core layout, affinity) and the model's sha256. ``Engine`` and
``edgeinfer.load`` pick the profile up on their own; explicit ``threads``
/ ``threads_batch`` still win.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from . import hardware, paths

# Within this fraction of the best, prefer fewer threads: less heat and
# power (a Pi throttles when hot), and cores left for the rest of the box.
TIE = 0.02


@dataclass
class Measurement:
    threads: int
    prefill_tps: float
    decode_tps: float
    prefill_runs: list[float] = field(default_factory=list)
    decode_runs: list[float] = field(default_factory=list)


@dataclass
class Profile:
    fingerprint: str
    sha256: str
    model: str
    threads: int            # decode
    threads_batch: int      # prompt processing
    default_threads: int
    measurements: list[Measurement]
    created: float = field(default_factory=time.time)
    cpu_model: str = ""

    def best(self, key: str) -> float:
        return max(getattr(m, key) for m in self.measurements)

    def at(self, threads: int, key: str) -> float | None:
        return next((getattr(m, key) for m in self.measurements if m.threads == threads), None)

    def gaps(self) -> dict:
        """How far the chosen and the default settings are from the best
        measured, as fractions (0.03 = 3 % slower than the best)."""
        out = {}
        for key, chosen in (("decode_tps", self.threads), ("prefill_tps", self.threads_batch)):
            best = self.best(key)
            c = self.at(chosen, key) or 0.0
            d = self.at(self.default_threads, key)
            out[key] = {"best": best, "chosen": c, "chosen_gap": 1 - c / best if best else 0.0,
                        "default": d, "default_gap": (1 - d / best) if (best and d is not None) else None}
        return out

    def to_json(self) -> dict:
        d = asdict(self)
        d["gaps"] = self.gaps()
        return d


def candidates() -> list[int]:
    """1 … usable physical cores, plus the big-core count and the logical
    count where those differ."""
    usable = hardware.usable_cores()
    cands = set(range(1, usable + 1))
    cands.add(hardware.default_threads())
    logical = len(hardware.affinity_cpus())
    quota = hardware.cgroup_cpu_quota()
    if logical > usable and (quota is None or quota >= logical):
        cands.add(logical)
    return sorted(cands)


def choose(ms: list[Measurement], key: str) -> int:
    best = max(getattr(m, key) for m in ms)
    return min(m.threads for m in ms if getattr(m, key) >= best * (1 - TIE))


def measure(engine, n_prompt: int, n_gen: int, reps: int, on_rep: Callable[[], None] | None = None
            ) -> tuple[list[float], list[float]]:
    """A warm-up, then ``reps`` llama-bench-style runs: (prefill tok/s,
    decode tok/s) of each run. ``on_rep`` is called after every run,
    warm-up included."""
    engine.benchmark(min(n_prompt, 32), min(n_gen, 4))  # warm-up: caches, thread pool
    if on_rep:
        on_rep()
    pre, dec = [], []
    for _ in range(reps):
        p_s, d_s = engine.benchmark(n_prompt, n_gen)
        pre.append(n_prompt / p_s)
        dec.append(n_gen / d_s)
        if on_rep:
            on_rep()
    return pre, dec


def sweep(engine, *, threads: list[int] | None = None, n_prompt: int = 128, n_gen: int = 32,
          reps: int = 3, on_step: Callable[[int, int, int], None] | None = None) -> list[Measurement]:
    """Measure prefill and decode tok/s at each thread count on ``engine``.
    ``on_step(done, total, threads)`` reports progress."""
    threads = threads or candidates()
    saved = (engine.threads, engine.threads_batch)
    out = []
    total = len(threads) * (reps + 1)
    done = 0
    try:
        for t in threads:
            engine.set_threads(t, t)

            def step(t=t):
                nonlocal done
                done += 1
                if on_step:
                    on_step(done, total, t)

            pre, dec = measure(engine, n_prompt, n_gen, reps, on_rep=step)
            out.append(Measurement(t, statistics.median(pre), statistics.median(dec), pre, dec))
    finally:
        engine.set_threads(*saved)
    return out


def make_profile(engine, ms: list[Measurement]) -> Profile:
    return Profile(fingerprint=hardware.fingerprint(), sha256=engine.sha256 or "", model=engine.name,
                   threads=choose(ms, "decode_tps"), threads_batch=choose(ms, "prefill_tps"),
                   default_threads=hardware.default_threads(), measurements=ms,
                   cpu_model=hardware.cpu_model())


def profiles_dir() -> Path:
    return paths.home() / "profiles"


def _profile_path(fingerprint: str, sha256: str) -> Path:
    return profiles_dir() / f"{fingerprint}-{sha256[:16]}.json"


def save_profile(p: Profile) -> Path:
    path = _profile_path(p.fingerprint, p.sha256)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(p.to_json(), indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def _from_json(d: dict) -> Profile:
    d = dict(d)
    d.pop("gaps", None)
    d["measurements"] = [Measurement(**m) for m in d["measurements"]]
    for key in ("threads", "threads_batch", "default_threads"):
        v = d.get(key)
        # A hand-edited or damaged profile must not reach llama.cpp.
        if type(v) is not int or not 1 <= v <= 1024:
            raise ValueError(f"{key} {v!r} is not a thread count")
    return Profile(**d)


def load_profile(sha256: str | None, fingerprint: str | None = None) -> Profile | None:
    """The saved profile for this machine and model, if any (a damaged
    file counts as none)."""
    if not sha256:
        return None
    path = _profile_path(fingerprint or hardware.fingerprint(), sha256)
    try:
        return _from_json(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError, KeyError):
        return None


def list_profiles() -> list[Profile]:
    out = []
    for p in sorted(profiles_dir().glob("*.json")):
        try:
            out.append(_from_json(json.loads(p.read_text(encoding="utf-8"))))
        except (OSError, ValueError, TypeError, KeyError):
            continue
    return out
