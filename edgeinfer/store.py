"""The content-addressed model store.

Layout under the root (``EDGEINFER_HOME`` or the per-user data dir)::

    blobs/sha256-<hex>            one file per distinct GGUF, named by hash
    blobs/sha256-<hex>.partial    a transfer in progress (kept across crashes)
    manifests/<name>/<tag>.json   name:tag -> blob, with provenance
    locks/                        one lock file per blob being fetched
    tmp/                          scratch on the same filesystem

A blob appears only by atomic rename after its hash is checked. Every path
is built from validated names and hex digests, never from what a catalog
file or a server says, so nothing is written outside the root.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import catalog, paths
from .errors import InvalidNameError, ModelNotFoundError, StoreError
from .names import ModelRef, check_part, parse_ref
from .processes import pid_alive

_HEX = re.compile(r"^[0-9a-f]{64}$")


@dataclass
class Manifest:
    """What a name:tag points to, and where it came from."""

    name: str
    tag: str
    sha256: str
    size: int
    file: str = ""
    source: str = ""
    created: float = field(default_factory=time.time)
    license: str = ""
    parent: str | None = None       # sha256 of the model this one was made from
    options: dict | None = None     # how it was made (quant type, flags, llama.cpp build)
    facts: dict | None = None       # GGUF facts read at publish time, for `list`
    system: str = ""                # default system prompt for chats
    sampling: dict | None = None    # default sampling options (temperature, top_p, ...)
    path: Path | None = field(default=None, compare=False)

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.tag}"

    def to_json(self) -> dict:
        d = asdict(self)
        d["path"] = str(self.path) if self.path else None
        return d


def pull_hint(name: str) -> str:
    """What to run for a model that is not in the store: the pull, when
    the catalog knows the name; else where to find the names it knows."""
    from . import catalog
    from .errors import EdgeinferError
    from .names import parse_ref

    try:
        known = catalog.lookup(parse_ref(name)) is not None
    except EdgeinferError:
        known = False
    if known:
        return f"run 'edgeinfer pull {name}'"
    return ("it is not in the catalog either: run 'edgeinfer list --catalog' to see what can be "
            "pulled by name, or pull a URL or file")


class ModelStore:
    """Blobs by sha256 and manifests by name:tag under one root."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root) if root is not None else paths.home()

    # -- paths -------------------------------------------------------------
    @property
    def blobs(self) -> Path:
        return self.root / "blobs"

    @property
    def manifests(self) -> Path:
        return self.root / "manifests"

    @property
    def locks(self) -> Path:
        return self.root / "locks"

    @property
    def scratch(self) -> Path:
        return self.root / "tmp"

    def blob_path(self, sha256: str) -> Path:
        sha = sha256.lower()
        if not _HEX.match(sha):
            raise StoreError(f"not a sha256 digest: {sha256!r}")
        return self.blobs / f"sha256-{sha}"

    def clean_scratch(self) -> int:
        """Remove what a process that died left in scratch: names that carry
        its pid (``wheel-PID-*`` of a pull, ``*.tmp-PID`` of a quantize).
        Returns how many entries went. Partial downloads are kept: they
        resume."""
        import re
        import shutil

        gone = 0
        try:
            entries = list(self.scratch.iterdir())
        except OSError:
            return 0
        for p in entries:
            m = re.match(r"wheel-(\d+)-", p.name) or re.search(r"\.tmp-(\d+)$", p.name)
            if not m or pid_alive(int(m.group(1))):
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            gone += 1
        return gone

    def partial_path(self, key: str) -> Path:
        if not re.match(r"^[0-9a-z-]{8,80}$", key):
            raise StoreError(f"bad partial key {key!r}")
        return self.blobs / f"{key}.partial"

    def _manifest_path(self, name: str, tag: str) -> Path:
        return self.manifests / check_part(name) / f"{check_part(tag, 'tag')}.json"

    def ensure_dirs(self) -> None:
        for d in (self.blobs, self.manifests, self.locks, self.scratch):
            d.mkdir(parents=True, exist_ok=True)

    # -- manifests ---------------------------------------------------------
    def _read_manifest(self, path: Path) -> Manifest | None:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(data, dict):
                return None
            known = Manifest.__dataclass_fields__.keys() - {"path"}
            # Keys from a newer edgeinfer are ignored rather than hiding the model.
            m = Manifest(**{k: v for k, v in data.items() if k in known})
            m.name, m.tag = check_part(m.name), check_part(m.tag, "tag")
            # A manifest answers only for the name its place in the tree
            # gives it; a copied or edited file cannot speak for another.
            if (m.name, m.tag) != (path.parent.name, path.stem):
                return None
            m.path = self.blob_path(m.sha256)
        except (OSError, ValueError, TypeError, StoreError, InvalidNameError):
            return None  # a damaged manifest is treated as absent, never followed
        return m

    def list(self) -> list[Manifest]:
        out = []
        if self.manifests.is_dir():
            for f in sorted(self.manifests.glob("*/*.json")):
                m = self._read_manifest(f)
                if m is not None:
                    out.append(m)
        return out

    def tags_of(self, name: str) -> list[Manifest]:
        return [m for m in self.list() if m.name == name]

    def get(self, ref: ModelRef | str) -> Manifest | None:
        """The manifest for ``ref``, or None. A bare name picks the catalog's
        default tag if present, else the only tag stored under that name."""
        ref = parse_ref(ref) if isinstance(ref, str) else ref
        if ref.tag:
            m = self._read_manifest(self._manifest_path(ref.name, ref.tag))
            return m
        tags = self.tags_of(ref.name)
        if not tags:
            return None
        entry = catalog.lookup(ref)
        if entry:
            for m in tags:
                if m.tag == entry.tag:
                    return m
        if len(tags) == 1:
            return tags[0]
        raise InvalidNameError(
            f"'{ref.name}' has several tags in the store: {', '.join(m.tag for m in tags)}",
            hint=f"name one, as in '{ref.name}:{tags[0].tag}'")

    def resolve(self, ref: ModelRef | str) -> Manifest:
        """Like get(), but raises ModelNotFoundError with the command to run."""
        m = self.get(ref)
        if m is None or not m.path or not m.path.exists():
            raise ModelNotFoundError(f"model '{ref}' is not in the store", hint=pull_hint(str(ref)))
        return m

    def put(self, m: Manifest) -> Manifest:
        """Write a manifest atomically; its blob must already exist."""
        blob = self.blob_path(m.sha256)
        if not blob.exists():
            raise StoreError(f"blob {m.sha256} is missing")
        target = self._manifest_path(m.name, m.tag)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        m.path = None
        tmp.write_text(json.dumps(m.to_json(), indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, target)
        m.path = blob
        return m

    # -- blobs -------------------------------------------------------------
    def publish(self, partial: Path, sha256: str) -> Path:
        """Move a verified partial into place as the blob for ``sha256``."""
        blob = self.blob_path(sha256)
        if blob.exists():
            partial.unlink(missing_ok=True)
        else:
            os.replace(partial, blob)
        return blob

    def remove(self, ref: ModelRef | str) -> tuple[Manifest, bool]:
        """Delete a name:tag; its blob goes when no other manifest points to it.
        Returns the manifest and whether the blob was deleted."""
        m = self.get(ref)
        if m is None:
            raise ModelNotFoundError(f"model '{ref}' is not in the store",
                                     hint="run 'edgeinfer list' to see what is")
        self._manifest_path(m.name, m.tag).unlink(missing_ok=True)
        try:
            self._manifest_path(m.name, m.tag).parent.rmdir()
        except OSError:
            pass
        if any(o.sha256 == m.sha256 for o in self.list()):
            return m, False
        self.blob_path(m.sha256).unlink(missing_ok=True)
        return m, True


def resolve_model(name_or_path: str | os.PathLike, store: ModelStore | None = None) -> tuple[Path, Manifest | None]:
    """A GGUF path for a store name (``name[:tag]``) or a file path, with
    the store's manifest for a name."""
    text = os.fspath(name_or_path)
    p = Path(text).expanduser()
    if p.is_file():
        return p, None
    if text.endswith(".gguf") or os.sep in text:
        raise ModelNotFoundError(f"{text}: no such file", hint="check the path")
    m = (store or ModelStore()).resolve(text)
    return m.path, m
