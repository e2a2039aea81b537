"""Where edgeinfer keeps things. Every function reads the environment when
called, never at import, so tests can point EDGEINFER_HOME at a tmp dir."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def home() -> Path:
    """The store root: ``$EDGEINFER_HOME``, else the per-user data dir."""
    env = os.environ.get("EDGEINFER_HOME")
    if env:
        return Path(env).expanduser()
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "edgeinfer"
    if os.name == "nt":
        base = os.environ.get("LOCALAPPDATA") or str(Path.home() / "AppData" / "Local")
        return Path(base) / "edgeinfer"
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "edgeinfer"


def config_dir() -> Path:
    """User configuration: ``$EDGEINFER_CONFIG``, else XDG config dir.

    A ``models/`` folder here holds the user's own catalog entries.
    """
    env = os.environ.get("EDGEINFER_CONFIG")
    if env:
        return Path(env).expanduser()
    if sys.platform == "darwin" or os.name == "nt":
        return home() / "config"
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "edgeinfer"


def blobs_dir() -> Path:
    return home() / "blobs"


def manifests_dir() -> Path:
    return home() / "manifests"


def locks_dir() -> Path:
    return home() / "locks"


def tmp_dir() -> Path:
    """Scratch space inside the store, on the same filesystem as the blobs
    so a finished file can be published with an atomic rename."""
    return home() / "tmp"


def cache_dir() -> Path:
    return home() / "cache"
