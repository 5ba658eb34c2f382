"""harness.data.archive: good archives unpack whole; malicious ones fail and write nothing anywhere."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import zipfile
from pathlib import Path

import pytest

from harness.data import archive
from harness.data.archive import ArchiveError
from harness.data.cache import SourceError, fetch
from tests.data.httpd import Server


def make_tar(path: Path, members: list[tuple[str, str, bytes | str]], mode: str = "w:gz") -> Path:
    """members: (name, kind, payload); kind is file, dir, sym (payload = target), hard (payload = target), fifo."""
    with tarfile.open(path, mode) as tar:
        for name, kind, payload in members:
            info = tarfile.TarInfo(name)
            data = None
            if kind == "file":
                assert isinstance(payload, bytes)
                info.size, data = len(payload), io.BytesIO(payload)
            elif kind == "dir":
                info.type = tarfile.DIRTYPE
            elif kind == "sym":
                info.type, info.linkname = tarfile.SYMTYPE, str(payload)
            elif kind == "hard":
                info.type, info.linkname = tarfile.LNKTYPE, str(payload)
            elif kind == "fifo":
                info.type = tarfile.FIFOTYPE
            tar.addfile(info, data)
    return path


def make_zip(path: Path, members: list[tuple[str, bytes]], symlink: str | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, payload in members:
            zf.writestr(name, payload)
        if symlink:
            info = zipfile.ZipInfo("link")
            info.external_attr = (0o120777 << 16)
            zf.writestr(info, symlink)
    return path


def snapshot(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


GOOD = [("pets/", "dir", b""), ("pets/cat/1.txt", "file", b"meow"), ("pets/dog/1.txt", "file", b"woof"),
        ("pets/latest", "sym", "cat/1.txt"), ("pets/copy.txt", "hard", "pets/dog/1.txt")]


@pytest.mark.parametrize("name,mode", [("a.tar.gz", "w:gz"), ("a.tgz", "w:gz"), ("a.tar", "w"),
                                       ("a.tar.xz", "w:xz")])
def test_tar_unpacks_whole(tmp_path: Path, name: str, mode: str) -> None:
    src = make_tar(tmp_path / name, GOOD, mode)
    assert archive.stem(name) == "a"
    out = archive.extract(src, tmp_path / "out")
    assert (out / "pets/cat/1.txt").read_bytes() == b"meow"
    assert (out / "pets/latest").read_bytes() == b"meow" and (out / "pets/copy.txt").read_bytes() == b"woof"
    assert snapshot(tmp_path) == {name, "out", *(f"out/{p}" for p in snapshot(out))}


def test_zip_unpacks_whole(tmp_path: Path) -> None:
    src = make_zip(tmp_path / "a.zip", [("pets/cat/1.txt", b"meow"), ("pets/dog/", b"")])
    out = archive.extract(src, tmp_path / "out")
    assert (out / "pets/cat/1.txt").read_bytes() == b"meow" and (out / "pets/dog").is_dir()


EVIL_TARS = {
    "absolute path": ([("/tmp/evil.txt", "file", b"x")], "absolute path"),
    "dot dot": ([("ok/../../evil.txt", "file", b"x")], r"contains '\.\.'"),
    "symlink to an absolute path": ([("link", "sym", "/etc")], "absolute path"),
    "symlink out": ([("a/link", "sym", "../../outside")], "outside the target"),
    "file through a symlink": ([("link", "sym", "."), ("link/evil.txt", "file", b"x")], "beyond the link"),
    "symlink chain out": ([("x", "sym", "."), ("y", "sym", "x/../evil")], "goes through the link"),
    "symlink chain, link defined later": ([("y", "sym", "x/../evil"), ("x", "sym", ".")], "goes through the link"),
    "hard link out": ([("hard", "hard", "../outside.txt")], r"hard link to .\.\./outside.txt.: .*contains"),
    "hard link to nothing": ([("hard", "hard", "etc/passwd")], "not a file earlier"),
    "fifo": ([("pipe", "fifo", b"")], "device, fifo"),
}


@pytest.mark.parametrize("case", sorted(EVIL_TARS))
def test_malicious_tar_fails_and_writes_nothing(tmp_path: Path, case: str) -> None:
    members, message = EVIL_TARS[case]
    work = tmp_path / "work"
    work.mkdir()
    src = make_tar(work / "evil.tar.gz", [("fine.txt", "file", b"fine"), *members])
    before_work, before_top = snapshot(work), snapshot(tmp_path)
    with pytest.raises(ArchiveError, match=message):
        archive.extract(src, work / "out")
    assert snapshot(work) == before_work and snapshot(tmp_path) == before_top  # not even a temp dir


@pytest.mark.parametrize("members,symlink,message", [
    ([("../evil.txt", b"x")], None, r"contains '\.\.'"),
    ([("/abs.txt", b"x")], None, "absolute path"),
    ([("C:/windows.txt", b"x")], None, "absolute path"),
    ([("ok\\..\\..\\evil.txt", b"x")], None, r"contains '\.\.'"),
    ([("fine.txt", b"x")], "/etc/passwd", "link or special file"),
])
def test_malicious_zip_fails_and_writes_nothing(tmp_path: Path, members: list[tuple[str, bytes]],
                                                symlink: str | None, message: str) -> None:
    src = make_zip(tmp_path / "evil.zip", members, symlink)
    before = snapshot(tmp_path)
    with pytest.raises(ArchiveError, match=message):
        archive.extract(src, tmp_path / "out")
    assert snapshot(tmp_path) == before


def test_not_an_archive_and_a_corrupt_one(tmp_path: Path) -> None:
    (tmp_path / "x.bin").write_bytes(b"data")
    with pytest.raises(ArchiveError, match="not an archive"):
        archive.extract(tmp_path / "x.bin", tmp_path / "out")
    (tmp_path / "bad.tar.gz").write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(ArchiveError, match="bad.tar.gz"):
        archive.extract(tmp_path / "bad.tar.gz", tmp_path / "out")
    assert snapshot(tmp_path) == {"x.bin", "bad.tar.gz"}


def test_fetch_extracts_once_and_refuses_a_malicious_download(server: Server, tmp_path: Path) -> None:
    good = make_tar(tmp_path / "pets.tgz", GOOD).read_bytes()
    evil = make_tar(tmp_path / "evil.tgz", [("a/link", "sym", "../../../home")]).read_bytes()
    url = server.add("pets.tgz", good)
    folder = fetch(url, hashlib.sha256(good).hexdigest(), tmp_path / "cache", extract=True)
    assert folder.name == "pets" and (folder / "pets/dog/1.txt").read_bytes() == b"woof"
    mtime = os.stat(folder).st_mtime_ns
    assert fetch(url, hashlib.sha256(good).hexdigest(), tmp_path / "cache", extract=True) == folder
    assert os.stat(folder).st_mtime_ns == mtime and len(server.requests()) == 1
    bad = server.add("evil.tgz", evil)
    with pytest.raises(SourceError, match="evil.tgz: member 'a/link' is a link to '../../../home', outside"):
        fetch(bad, hashlib.sha256(evil).hexdigest(), tmp_path / "cache", extract=True)
    entry = tmp_path / "cache" / hashlib.sha256(evil).hexdigest()[:16]
    assert {p.name for p in entry.iterdir() if not p.name.startswith(".")} == {"evil.tgz"}  # no evil/
    with pytest.raises(SourceError, match="not an archive"):
        fetch(server.add("plain.bin", b"x"), hashlib.sha256(b"x").hexdigest(), tmp_path / "cache", extract=True)
