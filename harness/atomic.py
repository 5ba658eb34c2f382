"""Atomic file writes: a file is either its old content or its new content, also after a crash.

Owns the one way harness replaces a file (checkpoints, the data cache, `config.yaml`, `metrics.csv`,
`results.png`, the PREEMPTED marker, torchrun's error file):
write a temporary file in the same directory (a rename is atomic only within one file system), flush
and fsync it (else a crash after the rename can leave a renamed but empty file), rename it over the
target, then fsync the directory (else the rename itself may be lost). Pure standard library.

`publish` is the last three steps alone, for a caller that fills its temporary file itself (the
cache's resumable `.part` downloads); `open_atomic` and `write_text` / `write_bytes` do all four.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

TMP_TAG = ".tmp-"  # temporaries are named .<name>.tmp-<pid>: hidden, and swept by the next write


def tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}{TMP_TAG}{os.getpid()}")


def fsync_dir(path: Path) -> None:
    """Make the directory's entries (a rename, a new file) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sweep(path: Path) -> None:
    """Remove the temporaries that writes of `path` killed midway left behind."""
    for stale in path.parent.glob(f".{path.name}{TMP_TAG}*"):
        if stale.is_file():
            stale.unlink(missing_ok=True)


def publish(tmp: Path, path: Path) -> None:
    """fsync the finished `tmp`, rename it over `path`, fsync the directory."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


@contextmanager
def open_atomic(path: Path, mode: str = "wb", *, sync_dir: bool = True, **kwargs: Any) -> Iterator[IO[Any]]:
    """`with open_atomic(p, "w") as f: ...`: `p` gets what was written when the block ends without
    an exception; otherwise `p` is untouched and the temporary is gone. `sync_dir=False` leaves the
    directory's fsync to a caller that renames more in it and syncs once, after the last rename."""
    if mode not in ("w", "wb"):
        raise ValueError(f"open_atomic mode={mode!r}: only 'w' and 'wb' replace a file")
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep(path)
    tmp = tmp_path(path)
    try:
        with open(tmp, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        if sync_dir:
            fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: Path, text: str, *, sync_dir: bool = True) -> None:
    with open_atomic(path, "w", sync_dir=sync_dir, encoding="utf-8") as f:
        f.write(text)


def write_bytes(path: Path, data: bytes) -> None:
    with open_atomic(path, "wb") as f:
        f.write(data)
