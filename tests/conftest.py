"""Shared fixtures.

Every test gets its own store (EDGEINFER_HOME) and config dir, so nothing
touches the user's real models. The tiny model is built once per session
by scripts/build_tiny_model.py; the real default model is pulled once per
session through the model manager itself.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Debug checks on in every test (and in the servers they start): after each
# step the KV ledgers must hold exactly what llama.cpp holds, and a context
# is only ever decoded on one thread.
os.environ.setdefault("EDGEINFER_CHECKS", "1")

from edgeinfer import hardware as _hardware  # noqa: E402

real_busy_cores = _hardware.busy_cores  # before edgeinfer_home() replaces it for each test


def load_script(name: str):
    """Import scripts/<name>.py (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def import_into(home: Path, models: dict) -> Path:
    """A store under EDGEINFER_HOME ``home`` holding ``models`` (name:tag →
    GGUF path), imported as a user would (each file checked in a child,
    whose record goes under that home too)."""
    from edgeinfer.pull import import_file
    from edgeinfer.store import ModelStore

    old = os.environ.get("EDGEINFER_HOME")
    os.environ["EDGEINFER_HOME"] = str(home)
    try:
        for name, path in models.items():
            import_file(path, name, store=ModelStore())
    finally:
        if old is None:
            del os.environ["EDGEINFER_HOME"]
        else:
            os.environ["EDGEINFER_HOME"] = old
    return home


@pytest.fixture(scope="session")
def shared_selftest(tmp_path_factory) -> Path:
    """One native self-test record for the whole session: each model file
    is tested in a child once per run rather than once per test. Tests of
    the self-test itself use a home of their own (``fresh_selftest``)."""
    return tmp_path_factory.mktemp("selftest")


@pytest.fixture(autouse=True)
def edgeinfer_home(tmp_path, monkeypatch, shared_selftest) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    (home / "selftest").symlink_to(shared_selftest, target_is_directory=True)
    monkeypatch.setenv("EDGEINFER_HOME", str(home))
    monkeypatch.setenv("EDGEINFER_CONFIG", str(tmp_path / "config"))
    monkeypatch.delenv("EDGEINFER_DEBUG", raising=False)
    monkeypatch.delenv("EDGEINFER_NATIVE", raising=False)
    monkeypatch.delenv("EDGEINFER_SELFTEST_FAULT", raising=False)
    # The engine caps its default threads by what other work keeps busy;
    # in-process tests see a quiet box unless they say otherwise.
    from edgeinfer import hardware

    monkeypatch.setattr(hardware, "busy_cores", lambda sample=0.25: 0.0)
    return home


@pytest.fixture
def fresh_selftest(edgeinfer_home) -> Path:
    """A self-test record of this test's own, empty."""
    link = edgeinfer_home / "selftest"
    link.unlink()
    link.mkdir()
    return link


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """Path to the tiny llama GGUF (random weights, real BPE vocab, ChatML)."""
    builder = load_script("build_tiny_model")
    return builder.build(tmp_path_factory.mktemp("tiny") / "tiny.gguf")


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> str:
    """A tiny BERT embedding model the suite builds, converted to GGUF (F16)."""
    from edgeinfer.convert import convert_folder

    where = tmp_path_factory.mktemp("tiny-bert")
    folder = load_script("build_tiny_bert").build(where / "hf")
    return str(convert_folder(folder, where / "tiny-bert.gguf").path)


@pytest.fixture(scope="session")
def tiny_fim_model(tmp_path_factory) -> Path:
    """The tiny model with Qwen2.5-Coder's fill-in-the-middle tokens."""
    builder = load_script("build_tiny_model")
    return builder.build(tmp_path_factory.mktemp("tiny-fim") / "tiny-fim.gguf", fim=True)


@pytest.fixture(scope="session")
def real_store(tmp_path_factory):
    """A store holding SmolLM2 135M Instruct (the catalog's floor model),
    pulled by name through pull().

    EDGEINFER_TEST_STORE reuses a store between runs on a developer's
    machine; CI pulls afresh.
    """
    from edgeinfer.pull import pull
    from edgeinfer.store import ModelStore

    root = os.environ.get("EDGEINFER_TEST_STORE") or tmp_path_factory.mktemp("real-store")
    store = ModelStore(root)
    pull("smollm2-135m-instruct", store=store, quiet=True)
    return store


QWEN_PAIR = ("qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct")


@pytest.fixture(scope="session")
def qwen_store(real_store):
    """The real store with the Qwen2.5-Coder 0.5B / 1.5B pair pulled too,
    where the machine has the disk and memory (else the test skips)."""
    from edgeinfer import catalog, hardware
    from edgeinfer.download import free_bytes
    from edgeinfer.names import parse_ref
    from edgeinfer.pull import pull

    entries = [catalog.lookup(parse_ref(n)) for n in QWEN_PAIR]
    missing = sum(e.size for e in entries if real_store.get(e.ref) is None)
    if free_bytes(real_store.root) < missing + 2 * 10**9:
        pytest.skip(f"the Qwen pair needs {missing / 1e9:.1f} GB of disk and 2 GB to spare")
    if hardware.available_memory() < 4 * 10**9:
        pytest.skip("the Qwen pair needs 4 GB of free memory")
    for e in entries:
        pull(e.ref, store=real_store, quiet=True)
    return real_store


@pytest.fixture
def real_model_home(real_store, monkeypatch, shared_selftest) -> Path:
    """Point EDGEINFER_HOME at the store that holds the real default model."""
    link = real_store.root / "selftest"
    if not link.exists() and not link.is_symlink():
        link.symlink_to(shared_selftest, target_is_directory=True)
    monkeypatch.setenv("EDGEINFER_HOME", str(real_store.root))
    return real_store.root
