"""edgeinfer: run GGUF language models on CPUs.

The public API is flat::

    import edgeinfer

    engine = edgeinfer.load("smollm2-135m-instruct", n_ctx=2048)
    print(engine.chat([{"role": "user", "content": "Hello!"}], temperature=0))

    for event in engine.stream("Once upon a time", max_tokens=40):
        print(event.text, end="", flush=True)
    print(event.stats.decode_tps)
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from .catalog import CatalogEntry, default_entry, load_catalog
from .cores import CoreShare, share_cores
from .errors import (
    AllSourcesFailedError,
    AuthError,
    CatalogError,
    ChecksumError,
    CompareError,
    ConnectionLostError,
    ContextOverflowError,
    ConvertError,
    DiskSpaceError,
    DownloadError,
    EdgeinferError,
    EngineBusyError,
    EngineError,
    FimUnsupportedError,
    GGUFError,
    GrammarError,
    InvalidNameError,
    MemoryFitError,
    ModelNotFoundError,
    ModelNotServedError,
    NativeSettingError,
    QuantizeError,
    RequestError,
    RpcError,
    ServerBusyError,
    ServerConfigError,
    ServerError,
    SpeculativeError,
    StoppingError,
    StoreError,
    TemplateError,
    VocabularyMismatchError,
)
from .events import DoneEvent, Stats, TextEvent, ToolCallEvent
from .gguf_file import GGUFInfo, read_gguf
from .pull import import_file, pull
from .server.client import AsyncClient, Client
from .store import Manifest, ModelStore, resolve_model

if TYPE_CHECKING:
    from .chat import ChatSession
    from .engine import Engine

__version__ = "0.1.0"

__all__ = [
    "load", "default_model", "pull", "import_file", "read_gguf", "default_entry", "load_catalog",
    "Engine", "ChatSession", "TextEvent", "DoneEvent", "ToolCallEvent", "Stats", "ModelStore", "Manifest",
    "CatalogEntry", "GGUFInfo", "Client", "AsyncClient", "share_cores", "CoreShare",
    "EdgeinferError", "InvalidNameError", "ModelNotFoundError", "CatalogError", "GGUFError",
    "StoreError", "DiskSpaceError", "MemoryFitError", "DownloadError", "ChecksumError",
    "AllSourcesFailedError", "EngineError", "ContextOverflowError", "EngineBusyError", "NativeSettingError",
    "TemplateError", "GrammarError", "FimUnsupportedError", "VocabularyMismatchError", "RpcError", "SpeculativeError",
    "QuantizeError", "ConvertError",
    "CompareError",
    "ServerConfigError", "ServerError", "RequestError", "ModelNotServedError", "StoppingError",
    "ServerBusyError", "AuthError", "ConnectionLostError",
]


def __getattr__(name: str):
    # The Engine (and with it llama.cpp's library) loads on first use, so
    # that `import edgeinfer` and commands such as `edgeinfer list` stay light.
    if name == "Engine":
        from .engine import Engine

        return Engine
    if name == "ChatSession":
        from .chat import ChatSession

        return ChatSession
    raise AttributeError(f"module 'edgeinfer' has no attribute {name!r}")


def default_model():
    """The model chosen for this machine when none is named (a
    ``default_model.Choice``: ``.entry``, ``.reason``, ``.expected_tps``);
    see edgeinfer/model_choice.py."""
    from . import model_choice

    return model_choice.choose()


def load(name_or_path: str | os.PathLike | None = None, **options) -> "Engine":
    """Load a model from the store (by ``name[:tag]``) or from a GGUF path;
    with none, the default model for this machine (:func:`default_model`),
    which must be in the store.

    Options: ``n_ctx``, ``threads``, ``threads_batch``, ``n_batch``,
    ``seed``, ``mmap``, ``mlock``, ``chat_template``, ``system_prompt``
    (used when a chat has no system message), ``sampling`` (default
    temperature, top_p, ... for this model), ``lock_timeout``,
    ``prompt_cache`` (False: no KV reuse at all), ``cache_disk`` (False:
    memory only), ``cache_memory_budget`` / ``cache_disk_budget`` (bytes;
    defaults: an eighth of RAM up to 4 GiB, and 1 GiB), ``flash_attn`` (off by
    default so prompt-cache hits are bit-exact; on is a few % faster),
    ``native`` (force a native setting, "full", "no_amx" or "plain",
    instead of the one the self-test chose; also ``$EDGEINFER_NATIVE``).
    The first load of a file on a machine tests it in a child process
    first (see ``edgeinfer doctor``); a file that crashes llama.cpp there
    raises GGUFError instead of taking this process down.
    A name that is not in the store raises ModelNotFoundError whose hint
    says to run ``edgeinfer pull NAME``.

    >>> engine = edgeinfer.load("smollm2-135m-instruct", n_ctx=2048)  # doctest: +SKIP
    """
    if name_or_path is None:
        name_or_path = default_model().entry.ref
    path, manifest = resolve_model(name_or_path)
    if manifest is not None:
        options.setdefault("name", manifest.ref)
        options.setdefault("sha256", manifest.sha256)
        if manifest.system:
            options.setdefault("system_prompt", manifest.system)
        if manifest.sampling:
            options.setdefault("sampling", manifest.sampling)
    from .engine import Engine

    return Engine(path, **options)
