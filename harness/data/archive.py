"""Safe extraction of dataset archives: .tar, .tar.gz / .tgz (also .tar.bz2, .tar.xz) and .zip.

Owns the member checks and the all-or-nothing extraction. Every member is checked before anything
is written: no absolute path, no `..`, no device or fifo, symbolic and hard links only to places
inside the target, and no member or link that goes through another link (a chain of links, each
harmless on its own, could otherwise lead out). The archive is unpacked into a temporary sibling of
the target (with tarfile's `data` filter as a second line), the result's links are resolved once
more, and the directory is renamed into place: the target is whole or absent, and on any error
nothing is left behind. Where archives come from and where they go is `cache.py`'s business.
"""

from __future__ import annotations

import os
import re
import shutil
import tarfile
import zipfile
from pathlib import Path, PurePosixPath

from harness import atomic

SUFFIXES = (".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".tar", ".zip")


class ArchiveError(ValueError):
    """An archive that is unreadable or would write outside its target; names the member."""


def stem(name: str) -> str | None:
    """The directory name an archive extracts to ('cifar-10-python.tar.gz' -> 'cifar-10-python');
    None when `name` is not an archive we extract."""
    lower = name.lower()
    for suffix in SUFFIXES:
        if lower.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return None


def _member_path(name: str) -> PurePosixPath | None:
    """The member's path relative to the target; None for the root itself ('.', './')."""
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        raise ArchiveError(f"member {name!r} has an absolute path")
    parts = [p for p in re.split(r"[/\\]", name) if p not in ("", ".")]
    if ".." in parts:
        raise ArchiveError(f"member {name!r} contains '..'")
    return PurePosixPath(*parts) if parts else None


def _through_link(path: PurePosixPath, links: set[PurePosixPath]) -> PurePosixPath | None:
    """The first proper ancestor of `path` that is a symbolic link member, if any."""
    for ancestor in reversed(path.parents):
        if ancestor in links:
            return ancestor
    return None


def _link_target(member: str, where: PurePosixPath, target: str, links: set[PurePosixPath]) -> None:
    """A symbolic link at `where` pointing to `target` must resolve inside, through no other link."""
    if target.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", target):
        raise ArchiveError(f"member {member!r} is a link to the absolute path {target!r}")
    current: list[str] = list(where.parent.parts)
    steps = [p for p in re.split(r"[/\\]", target) if p not in ("", ".")]
    for i, step in enumerate(steps):
        if step == "..":
            if not current:
                raise ArchiveError(f"member {member!r} is a link to {target!r}, outside the target")
            current.pop()
            continue
        current.append(step)
        if i < len(steps) - 1 and PurePosixPath(*current) in links:
            raise ArchiveError(f"member {member!r} is a link to {target!r}, which goes through the link "
                               f"{'/'.join(current)!r}")


def _check_tar(tar: tarfile.TarFile) -> None:
    members = tar.getmembers()
    links = {p for m in members if m.issym() and (p := _member_path(m.name)) is not None}
    regular: set[PurePosixPath] = set()
    for m in members:
        path = _member_path(m.name)
        if path is None:
            if not m.isdir():
                raise ArchiveError(f"member {m.name!r} has no name")
            continue
        if not (m.isdir() or m.isreg() or m.issym() or m.islnk()):
            raise ArchiveError(f"member {m.name!r} is a device, fifo or other special file")
        via = _through_link(path, links)
        if via is not None:
            raise ArchiveError(f"member {m.name!r} lies beyond the link {str(via)!r}")
        if m.issym():
            _link_target(m.name, path, m.linkname, links)
        elif m.islnk():
            try:
                to = _member_path(m.linkname)
            except ArchiveError as exc:
                raise ArchiveError(f"member {m.name!r} is a hard link to {m.linkname!r}: {exc}") from None
            if to is None or to not in regular:
                raise ArchiveError(f"member {m.name!r} is a hard link to {m.linkname!r}, which is not a file "
                                   f"earlier in the archive")
        if m.isreg() or m.islnk():
            regular.add(path)


def _check_zip(zf: zipfile.ZipFile) -> None:
    for info in zf.infolist():
        _member_path(info.filename)
        mode = info.external_attr >> 16
        if mode and (mode & 0o170000) not in (0, 0o100000, 0o040000):
            # zipfile would write a link as a plain file holding its target; refuse the ambiguity
            raise ArchiveError(f"member {info.filename!r} is a link or special file")


def _check_result(tmp: Path) -> None:
    """Second line: after extraction, every link must still resolve inside."""
    inside = tmp.resolve()
    for dirpath, dirnames, filenames in os.walk(tmp):
        for entry in dirnames + filenames:
            path = Path(dirpath) / entry
            if path.is_symlink():
                real = path.resolve()
                if real != inside and inside not in real.parents:
                    raise ArchiveError(f"member {str(path.relative_to(tmp))!r} resolves outside the target")


def extract(archive: Path, target: Path) -> Path:
    """Unpack `archive` into the new directory `target`, whole or not at all."""
    archive, target = Path(archive), Path(target)
    if target.exists():
        raise ArchiveError(f"{target} already exists")
    name = archive.name.lower()
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if name.endswith(".zip"):
            with zipfile.ZipFile(archive) as zf:
                _check_zip(zf)
                tmp.mkdir(parents=True)
                zf.extractall(tmp)
        elif stem(archive.name) is not None:
            with tarfile.open(archive) as tar:
                _check_tar(tar)
                tmp.mkdir(parents=True)
                tar.extractall(tmp, filter="data")
        else:
            raise ArchiveError(f"{archive.name}: not an archive we extract ({', '.join(SUFFIXES)})")
        _check_result(tmp)
        os.replace(tmp, target)
        atomic.fsync_dir(target.parent)  # the rename itself survives a crash
    except (tarfile.TarError, zipfile.BadZipFile, EOFError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ArchiveError(f"{archive.name}: {exc}") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
