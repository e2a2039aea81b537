"""Which model ``edgeinfer chat``, ``edgeinfer run`` and ``edgeinfer.load()``
start when none is named: the best catalog model this machine can run.

Candidates are the catalog entries with a ``quality`` score (from
scripts/quality_probe.py), best first. The first one is chosen that

- fits: the bytes it needs at the default context (the entry's ``memory``)
  plus a margin stay within the memory available to the process (cgroup
  limits included);
- is fast enough: at least MIN_DECODE_TPS tokens per second, from this
  machine's tuned profile for the model when there is one, else estimated
  from its weights and a measurement of this machine's memory bandwidth
  (decoding reads every weight once per token).

Else the floor, the entry marked ``default_model`` (SmolLM2 135M).
Embedding models (``embedding = true``) are never candidates: they cannot
chat.
``$EDGEINFER_MODEL``, ``default_model = "name:tag"`` in
``<config dir>/config.toml``, or a user catalog entry marked
``default_model`` pins a choice.
"""

from __future__ import annotations

import json
import os
import time
import tomllib
from dataclasses import dataclass, field

from . import catalog, hardware, paths
from .catalog import CatalogEntry
from .errors import CatalogError, ModelNotFoundError
from .names import parse_ref

MIN_DECODE_TPS = 8.0
ENV = "EDGEINFER_MODEL"
# Decode streams the weights once per token at about this fraction of the
# bandwidth a single numpy pass measures. On the 2-core Xeon where it was
# fitted (16.5 GB/s), Qwen2.5-Coder 0.5B decoded at 0.86-0.97x of the
# estimate and the 1.5B at 1.0-1.3x, so the estimate errs low for the
# model that decides the choice.
BANDWIDTH_USE = 0.8
MEMORY_MARGIN = 1.2              # need x this ...
MEMORY_SLACK = 256 * 2**20       # ... plus this, for the OS and the rest of the process


@dataclass
class Choice:
    entry: CatalogEntry
    reason: str                      # one line: why this one
    expected_tps: float | None = None
    pinned: bool = False
    passed_over: list[tuple[str, str]] = field(default_factory=list)  # (ref, why not)

    def line(self) -> str:
        speed = f", about {self.expected_tps:.0f} tok/s here" if self.expected_tps else ""
        return f"{self.entry.ref} ({self.entry.size / 1e9:.2f} GB{speed}): {self.reason}"


def config_file():
    return paths.config_dir() / "config.toml"


def _config() -> dict:
    path = config_file()
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise CatalogError(f"{path}: {e}", hint="fix or remove that file") from None


def aliases() -> dict[str, str]:
    """Names a server answers with other models, from config.toml's
    ``[aliases]`` table (``"gpt-4.1" = "smollm2-135m-instruct"``)."""
    table = _config().get("aliases", {})
    if not isinstance(table, dict) or not all(isinstance(k, str) and isinstance(v, str) and k and v
                                              for k, v in table.items()):
        raise CatalogError(f"{config_file()}: [aliases] must map names to model names, as in "
                           '"gpt-4.1" = "smollm2-135m-instruct"')
    return dict(table)


def pinned() -> tuple[str, str] | None:
    """(name, where it was pinned) from $EDGEINFER_MODEL or config.toml."""
    env = os.environ.get(ENV)
    if env:
        return env, f"${ENV}"
    path = config_file()
    v = _config().get("default_model")
    if v is None:
        return None
    if not isinstance(v, str) or not v:
        raise CatalogError(f"{path}: default_model must be a model name such as 'smollm2-135m-instruct'")
    return v, str(path)


def _bandwidth_path():
    return paths.home() / "profiles" / f"bandwidth-{hardware.fingerprint()}.json"


def measure_bandwidth() -> float:
    """Bytes per second one pass over a large array reads here; measured
    once per machine and remembered, so the choice does not flap."""
    path = _bandwidth_path()
    try:
        return float(json.loads(path.read_text())["bytes_per_s"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    import numpy as np

    n = int(min(256 * 2**20, max(16 * 2**20, hardware.available_memory() // 8)))
    a = np.ones(n // 4, dtype=np.float32)
    a.sum()  # touch every page first
    best = 0.0
    for _ in range(3):
        t0 = time.perf_counter()
        a.sum()
        best = max(best, a.nbytes / max(time.perf_counter() - t0, 1e-9))
    del a
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"bytes_per_s": best, "at": time.time()}))
    except OSError:
        pass
    return best


def expected_tps(entry: CatalogEntry, bandwidth: float | None = None) -> tuple[float, str]:
    """Decode tok/s expected here, and where the figure comes from."""
    from .tuning import load_profile

    profile = load_profile(entry.sha256)
    if profile is not None:
        tps = profile.at(profile.threads, "decode_tps")
        if tps:
            return tps, "measured by 'edgeinfer tune'"
    bw = bandwidth if bandwidth is not None else measure_bandwidth()
    return BANDWIDTH_USE * bw / entry.size, "estimated from its size and this machine's memory speed"


def needs(entry: CatalogEntry) -> int:
    """Bytes the entry needs with the margin: its ``memory``, or, when the
    catalog does not say, its file size plus a quarter."""
    base = entry.memory or int(entry.size * 1.25)
    return int(base * MEMORY_MARGIN) + MEMORY_SLACK


def choose(*, available: int | None = None, bandwidth: float | None = None) -> Choice:
    """The default model for this machine (see the module docstring)."""
    pin = pinned()
    if pin:
        name, where = pin
        entry = catalog.lookup(parse_ref(name))
        if entry is None:
            raise ModelNotFoundError(f"the default model '{name}' pinned in {where} is not in the catalog",
                                     hint="run 'edgeinfer list --catalog' for the names, or unpin it")
        if entry.embedding:
            raise CatalogError(f"the default model '{name}' pinned in {where} is an embedding model; "
                               "it cannot chat", hint="pin a chat model, or unpin it")
        return Choice(entry, f"pinned in {where}", pinned=True)
    entries = catalog.load_catalog()
    floor = catalog.default_entry(entries)
    if not floor.defined_in.startswith("catalog/"):  # the user's own default_model entry
        return Choice(floor, f"marked default_model in {floor.defined_in}", pinned=True)
    have = hardware.available_memory() if available is None else available
    ranked = sorted((e for e in entries.values() if e.quality is not None and not e.embedding),
                    key=lambda e: (-e.quality, e.size))
    passed: list[tuple[str, str]] = []
    for e in ranked:
        need = needs(e)
        if need > have:
            passed.append((e.ref, f"needs about {need / 1e9:.1f} GB with a margin, "
                                  f"{have / 1e9:.1f} GB is available"))
            continue
        tps, how = expected_tps(e, bandwidth)
        if tps < MIN_DECODE_TPS:
            passed.append((e.ref, f"about {tps:.1f} tok/s here ({how}), under {MIN_DECODE_TPS:.0f}"))
            continue
        return Choice(e, f"the best catalog model that fits in the {have / 1e9:.1f} GB available "
                         f"and decodes at {MIN_DECODE_TPS:.0f} tok/s or more here ({how})", tps, passed_over=passed)
    why = "; ".join(f"{r}: {w}" for r, w in passed)
    return Choice(floor, "the smallest catalog model" + (f", since nothing better fits here ({why})" if why else ""),
                  None, passed_over=passed)
