"""The Ollama face's model management: names, ``/api/tags``, ``/api/show``,
``/api/ps``, ``/api/delete`` and ``/api/copy`` (``/api/pull`` is in
:mod:`.ollama_pull`).

Names: a request may use a store name as it is (``smollm2-135m-instruct``,
with or without its tag), or the Ollama name of a catalog model where
that name means the same weights (:data:`OLLAMA_NAMES`, the table in
docs/ollama.md). A ``:latest`` tag, which Ollama's clients add to a bare
name, means the bare name.

Models are listed under the store's own names, with the store's sha256
as their digest; a model the server was started with from a file is
listed under its file name.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import time
from datetime import datetime, timezone
from functools import lru_cache

from starlette.responses import JSONResponse, Response

from ..errors import EdgeinferError, InvalidNameError, RequestError
from .api import ApiError
from .fields import Fields

log = logging.getLogger("edgeinfer.http")

# Ollama's names for the catalog's models, where one names the same model
# (the same weights; the quantization may differ). Names Ollama gives to
# something else are left out: its bare "qwen2.5-coder" is the 7B,
# "smollm2" the 1.7B, and "gemma3:270m" the instruction-tuned Gemma, where
# the catalog has the base model.
OLLAMA_NAMES: dict[str, str] = {
    "smollm2:135m": "smollm2-135m-instruct",
    "smollm2:135m-instruct": "smollm2-135m-instruct",
    "qwen2.5-coder:0.5b": "qwen2.5-coder-0.5b-instruct",
    "qwen2.5-coder:0.5b-instruct": "qwen2.5-coder-0.5b-instruct",
    "qwen2.5-coder:1.5b": "qwen2.5-coder-1.5b-instruct",
    "qwen2.5-coder:1.5b-instruct": "qwen2.5-coder-1.5b-instruct",
    "all-minilm": "all-minilm-l6-v2:f16",
    "all-minilm:22m": "all-minilm-l6-v2:f16",
    "all-minilm:l6-v2": "all-minilm-l6-v2:f16",
}

FOREVER = "9999-12-31T23:59:59Z"   # an expiry for a model that never unloads


def our_name(name: str) -> str:
    """The name edgeinfer knows a requested model by."""
    key = name.strip().lower()
    key = OLLAMA_NAMES.get(key, key)
    if key.endswith(":latest"):
        key = key[: -len(":latest")]
        key = OLLAMA_NAMES.get(key, key)
    return key


def model_field(f: Fields, name: str = "model") -> str:
    """The request's model name (Ollama's older clients call it ``name``),
    required."""
    value = f.body.get(name)
    if value is None and name == "model":
        value = f.body.get("name")
    if not isinstance(value, str) or not value.strip():
        raise f.bad(name, "is required: a model name, as GET /api/tags lists them")
    return value


def ndjson(obj: dict) -> bytes:
    """One object of a newline-delimited JSON stream, as Ollama streams."""
    return (json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat().replace("+00:00", "Z")


def parameter_size(n: int | None) -> str:
    """135M, 1.5B, as Ollama writes a parameter count."""
    if not n:
        return ""
    if n >= 1e9:
        return f"{n / 1e9:.1f}B"
    if n >= 1e6:
        return f"{n / 1e6:.0f}M"
    return f"{n / 1e3:.0f}K"


def details(facts: dict) -> dict:
    arch = facts.get("architecture") or ""
    return {"parent_model": "", "format": "gguf", "family": arch, "families": [arch] if arch else None,
            "parameter_size": parameter_size(facts.get("parameter_count")),
            "quantization_level": facts.get("quant") or ""}


@lru_cache(maxsize=64)
def _file_sha256(path: str, size: int, mtime: float) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_sha256(path: str) -> str:
    """A file's sha256, computed once per version of the file."""
    st = os.stat(path)
    return _file_sha256(path, st.st_size, st.st_mtime)


class Model:
    """What the Ollama face says about one model: from its manifest (a
    store model) or its file (a model the server was started with)."""

    def __init__(self, name: str, path: str, manifest=None):
        self.name, self.path, self.manifest = name, path, manifest
        self._info = None

    @property
    def info(self):
        """The GGUF header (read on first use)."""
        if self._info is None:
            from ..gguf_file import read_gguf

            self._info = read_gguf(self.path)
        return self._info

    def facts(self) -> dict:
        if self.manifest is not None and self.manifest.facts:
            return self.manifest.facts
        from ..pull import list_facts

        return list_facts(self.info)

    @property
    def digest(self) -> str:
        return self.manifest.sha256 if self.manifest is not None else file_sha256(self.path)

    @property
    def size(self) -> int:
        return self.manifest.size if self.manifest is not None else os.path.getsize(self.path)

    @property
    def modified(self) -> float:
        return self.manifest.created if self.manifest is not None else os.path.getmtime(self.path)

    def tag(self) -> dict:
        """The model as /api/tags lists it."""
        return {"name": self.name, "model": self.name, "modified_at": iso(self.modified), "size": self.size,
                "digest": self.digest, "details": details(self.facts())}


def files_served(pool) -> dict[str, str]:
    """Models the server was started with from a file: name → path."""
    return {slot.name: slot.ref for slot in pool.slots.values() if os.sep in slot.ref}


def find(pool, name: str) -> Model:
    """The model a request's name means (blocking: reads the store).
    ModelNotServedError (a 404) when there is none."""
    ref = pool.resolve(our_name(name))
    if os.sep in ref:
        return Model(os.path.basename(ref), ref)
    m = pool.store.resolve(ref)
    return Model(m.ref, str(m.path), m)


def local_models(pool) -> list[Model]:
    """The store's models, then the files the server was started with."""
    out = []
    if pool.store is not None:
        try:
            out = [Model(m.ref, str(m.path), m) for m in pool.store.list() if m.path and m.path.exists()]
        except EdgeinferError:
            pass   # an unreadable store: the files still list
    return out + [Model(name, path) for name, path in files_served(pool).items()]


# -- GET /api/tags, POST /api/show, GET /api/ps --------------------------------------
async def tags(front, request) -> Response:
    pool = front.require_pool()
    models = await asyncio.to_thread(lambda: [m.tag() for m in local_models(pool)])
    front.metrics.count("/api/tags", 200)
    return JSONResponse({"models": models})


# The token texts llama.cpp takes as fill-in-the-middle tokens when the
# file does not name them (prefix, suffix, middle; from its vocabulary
# loader): Qwen2.5-Coder, StarCoder, DeepSeek Coder, CodeLlama, CodeGemma.
FIM_TEXTS = (("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"),
             ("<fim-prefix>", "<fim-suffix>", "<fim-middle>"),
             ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"),
             ("<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"),
             ("<PRE>", "<SUF>", "<MID>"))
FIM_KEYS = (("tokenizer.ggml.fim_pre_token_id", "tokenizer.ggml.fim_suf_token_id", "tokenizer.ggml.fim_mid_token_id"),
            ("tokenizer.ggml.prefix_token_id", "tokenizer.ggml.suffix_token_id", "tokenizer.ggml.middle_token_id"))
MAX_HEADER_SCAN = 64 << 20


def fills_in_the_middle(model: Model) -> bool:
    """Whether the model has the three fill-in-the-middle tokens: named in
    its metadata, or found by their text in its vocabulary (the header's
    bytes: the token list is not kept when the header is read)."""
    meta = model.info.metadata
    if any(all(type(meta.get(k)) is int for k in keys) for keys in FIM_KEYS):
        return True
    with open(model.path, "rb") as f:
        head = f.read(min(model.info.data_offset, MAX_HEADER_SCAN))
    return any(all(t.encode() in head for t in texts) for texts in FIM_TEXTS)


def capabilities(model: Model) -> list[str]:
    """What clients may ask of the model: an embedding model embeds; any
    other completes, calls tools when it has a chat template (a template
    that knows nothing of tools gets them in its system message), and
    inserts (fill-in-the-middle) when it has the tokens for it."""
    info = model.info
    if info.is_embedding:
        return ["embedding"]
    caps = ["completion"]
    if info.chat_template:
        caps.append("tools")
    if fills_in_the_middle(model):
        caps.append("insert")
    return caps


def model_info(info, verbose: bool) -> dict:
    """The GGUF's metadata, as Ollama's ``model_info``: arrays (the
    vocabulary) empty unless ``verbose`` (and then only those small enough
    to have been kept); the chat template goes in ``template`` instead."""
    out = {}
    for key, value in info.metadata.items():
        if key == "tokenizer.chat_template" or key.startswith("tokenizer.chat_template."):
            continue
        if isinstance(value, list):
            out[key] = value if verbose else []
        elif isinstance(value, (str, int, float, bool)):
            out[key] = value
        else:   # an array too large to have been kept
            out[key] = []
    out.setdefault("general.parameter_count", info.parameter_count)
    return out


def _parameters(manifest) -> str:
    sampling = (manifest.sampling if manifest is not None else None) or {}
    return "\n".join(f"{k:<30} {v}" for k, v in sampling.items())


def _modelfile(model: Model, template: str | None, parameters: str) -> str:
    lines = ["# What edgeinfer knows of this model, in a Modelfile's words (for reading:",
             "# edgeinfer does not create models from Modelfiles)", f"FROM {model.name}"]
    if template:
        lines.append(f'TEMPLATE """{template}"""')
    system = model.manifest.system if model.manifest is not None else ""
    if system:
        lines.append(f'SYSTEM """{system}"""')
    for line in parameters.splitlines():
        name, _, value = line.partition(" ")
        lines.append(f"PARAMETER {name} {value.strip()}")
    if model.manifest is not None and model.manifest.license:
        lines.append(f'LICENSE """{model.manifest.license}"""')
    return "\n".join(lines) + "\n"


async def show(front, body: dict, request) -> Response:
    f = Fields(body)
    name = model_field(f)
    verbose = f.boolean("verbose")
    pool = front.require_pool()

    def work() -> dict:
        model = find(pool, name)
        info = model.info
        parameters = _parameters(model.manifest)
        out = {"license": model.manifest.license if model.manifest is not None else "",
               "modelfile": _modelfile(model, info.chat_template, parameters),
               "parameters": parameters, "template": info.chat_template or "",
               "details": details(model.facts()), "model_info": model_info(info, verbose),
               "capabilities": capabilities(model), "modified_at": iso(model.modified)}
        if model.manifest is not None and model.manifest.system:
            out["system"] = model.manifest.system
        return out

    return JSONResponse(await asyncio.to_thread(work))


async def ps(front, request) -> Response:
    pool = front.require_pool()

    def work() -> list[dict]:
        out = []
        now, mono = time.time(), time.monotonic()
        for slot in list(pool.slots.values()):
            m = slot.model
            if m is None or not m.alive:
                continue
            try:
                model = find(pool, slot.name if os.sep in slot.ref else slot.ref)
                listed = model.tag()
            except EdgeinferError:
                listed = {"name": slot.name, "model": slot.name, "digest": "", "details": {}}
            keep = pool.opts.keep_alive
            if slot.busy and not slot.pinned and keep is not None:
                expires = iso(now + keep)   # busy: the keep-alive starts when its requests end
            elif slot.expires is not None:
                expires = iso(now + max(0.0, slot.expires - mono))
            else:
                expires = FOREVER
            out.append({**listed, "size": m.rss() or listed.get("size", 0), "size_vram": 0,
                        "expires_at": expires, "context_length": m.n_ctx})
        return out

    models = await asyncio.to_thread(work)
    front.metrics.count("/api/ps", 200)
    return JSONResponse({"models": models})


# -- DELETE /api/delete, POST /api/copy ------------------------------------------------
def _stored(pool, name: str):
    """The store's manifest for a request's name; a 404 when it has none."""
    if pool.store is None:
        raise ApiError("invalid_request", "this server has no model store")
    if name in files_served(pool):
        raise RequestError("model", f"{name} is a file the server was started with, not a model in the store")
    try:
        m = pool.store.get(our_name(name))
    except InvalidNameError as e:
        raise RequestError("model", e.one_line()) from None
    if m is None:
        raise ApiError("not_found", f"model {name[:100]!r} is not in the store; GET /api/tags lists what is")
    return m


async def delete(front, body: dict, request) -> Response:
    f = Fields(body)
    name = model_field(f)
    pool = front.require_pool()
    m = await asyncio.to_thread(_stored, pool, name)
    slot = pool.slots.get(m.ref)
    if slot is not None and slot.pinned:
        raise RequestError("model", f"{m.ref} was named when the server started and stays loaded; "
                                    "restart the server without it to delete it")
    if slot is not None:
        await pool.unload(m.ref)   # its requests finish first
        if not slot.busy and slot.model is None:
            pool.slots.pop(m.ref, None)
    await asyncio.to_thread(pool.store.remove, m.ref)
    log.info("deleted %s (asked for as %s)", m.ref, name)
    return Response(status_code=200)


async def copy(front, body: dict, request) -> Response:
    """A second name for a stored model: a manifest pointing to the same
    blob (the store is content-addressed, so this copies no bytes, and
    deleting either name leaves the other)."""
    import dataclasses

    from ..names import parse_ref

    f = Fields(body)
    source = model_field(f, "source")
    destination = model_field(f, "destination")
    pool = front.require_pool()
    m = await asyncio.to_thread(_stored, pool, source)
    try:
        ref = parse_ref(destination.strip())
    except InvalidNameError as e:
        raise RequestError("destination", f"destination: {e.one_line()} (letters, digits, '.', '_' and '-', "
                                          "with an optional :tag)") from None
    copied = dataclasses.replace(m, name=ref.name, tag=ref.tag or "latest", created=time.time(), path=None)
    await asyncio.to_thread(pool.store.put, copied)
    log.info("copied %s to %s", m.ref, copied.ref)
    return Response(status_code=200)


async def refused(front, body: dict, request) -> Response:
    """``/api/create`` and ``/api/push``: not this server's work."""
    what = request.url.path.rsplit("/", 1)[-1]
    if what == "create":
        raise ApiError("invalid_request", "edgeinfer does not create models from Modelfiles: import a GGUF with "
                                          "'edgeinfer pull FILE --name NAME', quantize with 'edgeinfer quantize', "
                                          "and give a default system prompt and sampling in a catalog entry "
                                          "(docs/models.md)")
    raise ApiError("invalid_request", "edgeinfer does not push models to a registry; 'edgeinfer show NAME' "
                                      "says where a stored model's GGUF file is")
