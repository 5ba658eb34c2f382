"""Dataset sources -> whole, verified files (or extracted directories) in a cache directory.

Owns: the cache layout, the atomic write (a `.part` file in the entry's directory, verified, then
published by `harness.atomic`: fsync, rename, fsync the directory; an entry is whole or absent, also
after a crash), the download (http/https with retries and
backoff on 5xx and dropped connections, resume with HTTP Range), the file lock that makes two jobs on
one machine download once, the offline rule, and the rule that a cache hit reads, hashes and
requests nothing (unless `verify="full"`). Callers run `fetch` inside `zero_first`, so one process
per node (or per job) fills the cache and the others find it ready. Safe extraction lives in
`archive.py`; reading the files is `datasets.py`'s job.

Layout under `root`:
    <sha256[:16]>/<name>              one file, named by its digest
    <sha256[:16]>/<stem>/             its extracted contents, when it is an archive and extract=True
    set-<sha256(names, digests)[:16]>/<name>...  several files (`files`: name -> sha256 under a base URL)
    unverified-<sha256(url)[:16]>/    a remote file fetched without a digest (allow_unverified)
    .../.<name>.part, .<name>.lock    a download in progress (resumed by the next try) and its lock
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import shutil
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urljoin, urlparse

from filelock import FileLock
from tqdm import tqdm

from harness import atomic
from harness.config import DataConfig
from harness.data import archive

CHUNK = 1 << 20
RETRIES = 5  # further tries after a 5xx, 408/429 or a dropped connection
BACKOFF_S = 1.0  # wait before the first retry; doubles each time
BACKOFF_MAX_S = 30.0
TIMEOUT_S = 60.0  # socket timeout: connect, and each read
USER_AGENT = "harness-data/0.1"
REMOTE = ("http", "https")
VERIFY_MODES = ("fast", "full")

log = logging.getLogger("harness")


class SourceError(RuntimeError):
    """A source that cannot be fetched or verified; names the URL and what went wrong."""


class _Retryable(Exception):
    """A failure worth another try: 5xx, 408, 429, a refused or dropped connection, a timeout."""


def _hasher() -> Any:
    """The digest every byte goes through (tests count bytes hashed by replacing this)."""
    return hashlib.sha256()


def sha256_file(path: Path) -> str:
    digest = _hasher()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _name(url: str) -> str:
    return Path(unquote(urlparse(url).path)).name or "download"


def cache_path(root: str | os.PathLike[str], url: str, sha256: str) -> Path:
    """Where `url` with digest `sha256` lives in the cache (a new digest gets a new entry)."""
    return Path(root).expanduser() / sha256[:16] / _name(url)


def _local_path(url: str) -> Path:
    parsed = urlparse(url)
    if parsed.netloc not in ("", "localhost"):
        raise SourceError(f"data.url={url!r}: file:// URLs take no host; write file:///abs/path")
    return Path(unquote(parsed.path))


def fetch(
    url: str,
    sha256: str = "",
    root: str | os.PathLike[str] = "~/.cache/harness",
    *,
    files: Mapping[str, str] | None = None,
    extract: bool = False,
    verify: str = "fast",
    allow_unverified: bool = False,
    offline: bool = False,
    progress: bool = True,
    retries: int = RETRIES,
    backoff_s: float = BACKOFF_S,
    timeout_s: float = TIMEOUT_S,
) -> Path:
    """Return the cached, verified file for `url` (a directory for `files` or `extract`), fetching it
    first when the cache lacks it.

    `files`: name -> sha256 of several files under the base URL `url` (MNIST's four); `extract`: unpack
    an archive next to it and return that directory; `verify="full"`: re-hash cached files on every
    call (a mismatch refetches); `allow_unverified`: accept a remote URL without a digest; `offline`:
    never touch the network (a miss is an error); `progress`: a tqdm bar, shown only when stderr is a
    terminal. A file:// URL naming a directory is used in place.
    """
    if verify not in VERIFY_MODES:
        raise SourceError(f"data.verify={verify!r} is not one of {', '.join(VERIFY_MODES)}")
    scheme = urlparse(url).scheme
    if scheme not in ("file", *REMOTE):
        raise SourceError(f"data.url={url!r}: scheme {scheme!r} is not supported; use https://, http:// or file://")
    root = Path(root).expanduser()
    opts: dict[str, Any] = {"verify": verify, "offline": offline, "progress": progress, "retries": retries,
            "backoff_s": backoff_s, "timeout_s": timeout_s}
    if files:
        if sha256:
            raise SourceError(f"data.url={url!r}: give data.sha256 or data.files, not both")
        return _fetch_set(url, files, root, allow_unverified=allow_unverified, **opts)
    sha256 = sha256.strip().lower()
    if scheme == "file" and _local_path(url).is_dir():
        if sha256:
            raise SourceError(f"data.url={url!r} is a directory: it has no sha256; leave data.sha256 empty")
        return _local_path(url)
    if scheme == "file" and not sha256:
        # a local file may come without a digest: hash it to name the cache entry (pin it to skip this)
        src = _local_path(url)
        if not src.is_file():
            raise SourceError(f"data.url={url!r}: no such file {src}")
        sha256 = sha256_file(src)
        log.info(f"{url} has sha256 {sha256}; set data.sha256 to skip hashing it on every run")
    if not sha256:
        if not allow_unverified:
            raise SourceError(f"data.url={url!r} has no data.sha256: a download must be verified; give the "
                              f"file's published sha256, or set data.allow_unverified=true to skip the check")
        dest = root / f"unverified-{hashlib.sha256(url.encode()).hexdigest()[:16]}" / _name(url)
    else:
        _check_digest(url, sha256)
        dest = cache_path(root, url, sha256)
    _ensure_file(url, sha256, dest, **opts)
    if not extract:
        return dest
    return _ensure_extracted(dest)


def _check_digest(url: str, sha256: str) -> None:
    if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
        raise SourceError(f"{url}: sha256 {sha256!r} is not 64 hexadecimal digits")


def _fetch_set(base: str, files: Mapping[str, str], root: Path, *, allow_unverified: bool, **opts: Any) -> Path:
    if not base.endswith("/"):
        base += "/"
    for name, digest in files.items():
        if not digest and not allow_unverified:
            raise SourceError(f"data.files[{name!r}] has no sha256: give the file's published digest, or "
                              f"set data.allow_unverified=true to skip the check")
        if "/" in name or name in ("", ".", ".."):
            raise SourceError(f"data.files: {name!r} is not a plain file name")
    manifest = "\n".join(f"{name} {files[name].strip().lower()}" for name in sorted(files))
    if not all(files.values()):
        manifest = base + "\n" + manifest  # unverified: only the URL says what it is
    folder = root / f"set-{hashlib.sha256(manifest.encode()).hexdigest()[:16]}"  # a mirror finds the same set
    for name in sorted(files):
        digest = files[name].strip().lower()
        if digest:
            _check_digest(base + name, digest)
        _ensure_file(urljoin(base, name), digest, folder / name, **opts)
    return folder


def _ensure_file(url: str, sha256: str, dest: Path, *, verify: str, offline: bool, progress: bool,
                 retries: int, backoff_s: float, timeout_s: float) -> None:
    if dest.is_file() and verify == "fast":
        return  # a cache entry is only ever created whole and verified: trust it, read nothing
    dest.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(dest.parent / f".{dest.name}.lock")):
        if dest.is_file():  # another process may have finished it while we waited for the lock
            if verify == "fast" or not sha256:
                return
            actual = sha256_file(dest)
            if actual == sha256:
                return
            log.warning(f"cache entry {dest} is corrupt (sha256 {actual}, expected {sha256}); fetching it again")
            dest.unlink()
            extracted = archive.stem(dest.name)
            if extracted is not None:
                shutil.rmtree(dest.parent / extracted, ignore_errors=True)
        if offline and urlparse(url).scheme in REMOTE:
            raise SourceError(f"{url} is not in the cache ({dest}) and HARNESS_OFFLINE=1 (data.offline) forbids "
                              f"downloading it; run once with network access, or put the file there")
        _download(url, sha256, dest, progress=progress, retries=retries, backoff_s=backoff_s,
                  timeout_s=timeout_s)


class _Part:
    """The `.part` file being written and the digest of what it holds so far."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.digest = _hasher()
        self.size = 0

    def resume(self) -> bool:
        """Adopt a `.part` left by an earlier try or a crashed process; True when there was one."""
        if not self.path.is_file():
            return False
        with open(self.path, "rb") as f:
            while chunk := f.read(CHUNK):
                self.digest.update(chunk)
                self.size += len(chunk)
        return self.size > 0

    def restart(self) -> None:
        self.path.unlink(missing_ok=True)
        self.digest, self.size = _hasher(), 0


def _download(url: str, sha256: str, dest: Path, *, progress: bool, retries: int, backoff_s: float,
              timeout_s: float) -> None:
    part = _Part(dest.with_name(f".{dest.name}.part"))
    remote = urlparse(url).scheme in REMOTE
    try:
        resumed = part.resume() if remote else False
        if not remote:
            part.restart()
        while True:
            _transfer(url, part, progress=progress, retries=retries, backoff_s=backoff_s, timeout_s=timeout_s)
            actual = part.digest.hexdigest()
            if not sha256 or actual == sha256:
                break
            if resumed:  # the old .part may hold another file's bytes: one fresh try before giving up
                log.warning(f"{url}: the resumed download does not match its sha256; downloading it again")
                part.restart()
                resumed = False
                continue
            raise SourceError(f"{url}: sha256 mismatch: expected {sha256}, got {actual} ({part.size} bytes); "
                              f"the partial file was removed")
        if not sha256:
            log.warning(f"{url} was not verified (allow_unverified); its sha256 is {actual}: pin it with "
                        f"data.sha256={actual}")
        atomic.publish(part.path, dest)
        # one line per fill, in the filling rank's log: says which rank of which node prepared the cache
        log.info(f"cached {url} as {dest} ({part.size} bytes, {'verified' if sha256 else 'unverified'})")
    except BaseException:
        part.path.unlink(missing_ok=True)
        raise


def _transfer(url: str, part: _Part, *, progress: bool, retries: int, backoff_s: float, timeout_s: float) -> None:
    """Fill `part` with the whole body, retrying with backoff (and resuming) after transient failures."""
    tries = 0
    while True:
        try:
            if urlparse(url).scheme == "file":
                _copy_local(url, part)
            else:
                _http_get(url, part, progress=progress, timeout_s=timeout_s)
            return
        except _Retryable as exc:
            tries += 1
            if tries > retries:
                raise SourceError(f"cannot fetch {url}: {exc} (gave up after {tries} tries)") from None
            delay = min(backoff_s * 2 ** (tries - 1), BACKOFF_MAX_S)
            log.warning(f"fetching {url}: {exc}; try {tries + 1} of {retries + 1} in {delay:.1f}s")
            time.sleep(delay)


def _copy_local(url: str, part: _Part) -> None:
    src = _local_path(url)
    if not src.is_file():
        raise SourceError(f"data.url={url!r}: no such file {src}")
    with open(src, "rb") as fin, open(part.path, "wb") as fout:
        while chunk := fin.read(CHUNK):
            fout.write(chunk)
            part.digest.update(chunk)
            part.size += len(chunk)


def _http_get(url: str, part: _Part, *, progress: bool, timeout_s: float) -> None:
    """One request; appends to `part` (Range) or rewrites it. Raises _Retryable or SourceError."""
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if part.size:
        headers["Range"] = f"bytes={part.size}-"
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout_s)
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code == 416 and part.size:  # our .part is not a prefix the server recognises: start over
            part.restart()
            raise _Retryable(f"HTTP 416 for a resumed download at byte {part.size}") from None
        if exc.code >= 500 or exc.code in (408, 429):
            raise _Retryable(f"HTTP {exc.code} {exc.reason}") from None
        raise SourceError(f"cannot fetch {url}: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        raise _Retryable(f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}") from None
    with response:
        start, total = _start_and_total(response, part)
        if start == 0 and part.size:
            part.restart()  # the server ignored Range: take the whole body again
        bar = tqdm(total=total, initial=part.size, unit="B", unit_scale=True, unit_divisor=1024,
                   desc=_name(url), file=sys.stderr, disable=not (progress and sys.stderr.isatty()))
        try:
            with open(part.path, "ab") as f:
                while True:
                    try:
                        chunk = response.read1(CHUNK)  # what has arrived: a drop loses nothing
                    except (OSError, http.client.HTTPException) as exc:
                        raise _Retryable(f"connection dropped after {part.size} bytes "
                                         f"({type(exc).__name__})") from None
                    if not chunk:
                        break
                    f.write(chunk)
                    part.digest.update(chunk)
                    part.size += len(chunk)
                    bar.update(len(chunk))
        finally:
            bar.close()
    if total is not None and part.size < total:
        raise _Retryable(f"connection closed after {part.size} of {total} bytes")


def _start_and_total(response: Any, part: _Part) -> tuple[int, int | None]:
    """Where the body starts in the file and the file's full size (None when the server won't say)."""
    length = response.headers.get("Content-Length")
    if response.status == 206:
        content_range = response.headers.get("Content-Range", "")  # bytes 100-199/200
        try:
            span, size = content_range.split(" ", 1)[1].split("/")
            first = int(span.split("-")[0])
        except (IndexError, ValueError):
            raise _Retryable(f"unreadable Content-Range {content_range!r}") from None
        if first != part.size:
            part.restart()
            raise _Retryable(f"server resumed at byte {first}, not {part.size}")
        return first, int(size) if size != "*" else None
    return 0, int(length) if length is not None and length.isdigit() else None


def _ensure_extracted(file: Path) -> Path:
    stem = archive.stem(file.name)
    if stem is None:
        raise SourceError(f"{file.name}: data.extract=true, but this is not an archive "
                          f"({', '.join(archive.SUFFIXES)})")
    target = file.parent / stem
    if target.is_dir():
        return target  # renamed into place whole: trust it, like a cached file
    with FileLock(str(file.parent / f".{stem}.extract.lock")):
        if not target.is_dir():
            try:
                archive.extract(file, target)
            except archive.ArchiveError as exc:
                raise SourceError(f"{file}: {exc}") from exc
    return target


def fetch_configured(data: DataConfig, *, progress: bool = False) -> str | None:
    """`fetch` with the keys of a `data:` config; None when the dataset needs no file (`data.url` empty)."""
    if not data.url:
        return None
    return str(fetch(data.url, data.sha256, data.root, files=data.files, extract=data.extract, verify=data.verify,
                     offline=data.offline, allow_unverified=data.allow_unverified, progress=progress))
