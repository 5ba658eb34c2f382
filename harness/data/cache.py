"""Dataset sources -> whole, verified files in a cache directory.

Owns: the cache layout (`<root>/<sha256[:16]>/<file name>`), the atomic write (temporary name in the
same directory, fsync, verify, rename: an entry is whole or absent, also after a crash), and the
rule that a cache hit reads and hashes nothing. Callers run `fetch` inside `zero_first`, so one
process per node (or per job) fills the cache and the others find it ready.

Sources: `file://` today; remote schemes plug in at `_copy_from`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from urllib.parse import unquote, urlparse

CHUNK = 1 << 20


class SourceError(RuntimeError):
    """A source that cannot be fetched or verified; names the URL and what went wrong."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def cache_path(root: str | os.PathLike[str], url: str, sha256: str) -> Path:
    """Where `url` with digest `sha256` lives in the cache (a new digest gets a new entry)."""
    name = Path(unquote(urlparse(url).path)).name or "download"
    return Path(root).expanduser() / sha256[:16] / name


def _local_path(url: str) -> Path:
    parsed = urlparse(url)
    if parsed.scheme != "file":
        raise SourceError(f"data.url={url!r}: scheme {parsed.scheme!r} is not supported yet; use file://")
    if parsed.netloc not in ("", "localhost"):
        raise SourceError(f"data.url={url!r}: file:// URLs take no host; write file:///abs/path")
    return Path(unquote(parsed.path))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _copy_from(url: str, dest_tmp: Path) -> None:
    src = _local_path(url)
    if not src.is_file():
        raise SourceError(f"data.url={url!r}: no such file {src}")
    with open(src, "rb") as fin, open(dest_tmp, "wb") as fout:
        shutil.copyfileobj(fin, fout, CHUNK)
        fout.flush()
        os.fsync(fout.fileno())


def fetch(url: str, sha256: str, root: str | os.PathLike[str]) -> Path:
    """Return the cached, verified file for `url`; fetch it first when the cache lacks it."""
    sha256 = sha256.strip().lower()
    if not sha256:
        # local files may come without a digest: hash them once to name the cache entry
        sha256 = sha256_file(_local_path(url))
    dest = cache_path(root, url, sha256)
    if dest.is_file():
        return dest  # a cache entry is only ever created whole and verified: trust it
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    try:
        _copy_from(url, tmp)
        actual = sha256_file(tmp)
        if actual != sha256:
            raise SourceError(f"data.url={url!r}: sha256 mismatch, expected {sha256}, got {actual}")
        os.replace(tmp, dest)
        _fsync_dir(dest.parent)
    finally:
        tmp.unlink(missing_ok=True)
    return dest
