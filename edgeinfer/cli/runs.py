"""Notice a run that never finished.

A command that runs llama.cpp leaves a small marker in
``$EDGEINFER_HOME/runs/`` while it runs and removes it on every way out
that Python sees (return, error, Ctrl-C). A native crash (or ``kill -9``)
skips that, so the next start of the CLI finds a marker whose process is
gone and says what to do, instead of leaving the user with a bare
"Segmentation fault".
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import psutil

from .. import paths


def runs_dir() -> Path:
    return paths.home() / "runs"


def _started(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except (psutil.Error, OSError):
        return None


def begin(argv: list[str]) -> Path | None:
    """Write this process's marker; None if the store cannot be written."""
    path = runs_dir() / f"{os.getpid()}.json"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"pid": os.getpid(), "created": _started(os.getpid()),
                                    "argv": argv, "started": time.time()}), encoding="utf-8")
    except OSError:
        return None
    return path


def end(path: Path | None) -> None:
    if path is not None:
        try:
            path.unlink()
        except OSError:
            pass


def unfinished() -> list[dict]:
    """Markers of runs whose process is gone (a reused pid does not count
    as alive); each is removed once reported."""
    out = []
    try:
        markers = list(runs_dir().glob("*.json"))
    except OSError:
        return out
    for p in markers:
        try:
            m = json.loads(p.read_text(encoding="utf-8"))
            pid = int(m["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            m, pid = {"argv": []}, -1
        alive = pid > 0 and _started(pid) is not None and (
            m.get("created") is None or abs(_started(pid) - m["created"]) < 1)
        if not alive:
            out.append(m)
            try:
                p.unlink()
            except OSError:
                pass
    return out


def warning(m: dict) -> str:
    argv = m.get("argv") or []
    cmd = " ".join(["edgeinfer", *argv[1:3]]) if argv else "edgeinfer"
    when = time.strftime("%H:%M:%S", time.localtime(m["started"])) if m.get("started") else "earlier"
    return (f"warning: the last '{cmd}' (pid {m.get('pid', '?')}, started {when}) ended without "
            "finishing: it crashed or was killed. If it crashed inside llama.cpp ('Segmentation "
            "fault'), run 'edgeinfer doctor --selftest' to test this machine's native settings again.")
