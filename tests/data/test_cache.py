"""harness.data.cache against a real HTTP server on 127.0.0.1: verify, cache, retry, resume, lock, offline."""

from __future__ import annotations

import hashlib
import io
import os
import sys
import threading
from pathlib import Path

import pytest

from harness.config import ConfigError, DataConfig
from harness.data import cache
from harness.data.cache import SourceError, fetch
from tests.data.conftest import HashCounter
from tests.data.httpd import Server

BODY = os.urandom(300_000)
SHA = hashlib.sha256(BODY).hexdigest()
FAST = {"backoff_s": 0.01, "timeout_s": 10.0}


def leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.rglob("*.part"))


def test_download_verifies_and_a_hit_requests_and_hashes_nothing(server: Server, tmp_path: Path,
                                                                 hashed: HashCounter) -> None:
    url = server.add("d/set.bin", BODY)
    path = fetch(url, SHA, tmp_path, **FAST)
    assert path == tmp_path / SHA[:16] / "set.bin" and path.read_bytes() == BODY
    assert len(server.requests()) == 1 and hashed.bytes == len(BODY)
    hashed.bytes = 0
    assert fetch(url, SHA, tmp_path, **FAST) == path
    assert len(server.requests()) == 1 and hashed.bytes == 0  # no request, no byte hashed
    assert not list(path.parent.glob(".*.part"))


def test_verify_full_rehashes_and_refetches_a_corrupt_entry(server: Server, tmp_path: Path,
                                                            hashed: HashCounter) -> None:
    url = server.add("f.bin", BODY)
    path = fetch(url, SHA, tmp_path, **FAST)
    hashed.bytes = 0
    fetch(url, SHA, tmp_path, verify="full", **FAST)
    assert hashed.bytes == len(BODY) and len(server.requests()) == 1  # re-hashed, not re-downloaded
    path.write_bytes(b"bit rot" + BODY[7:])
    assert fetch(url, SHA, tmp_path, verify="full", **FAST).read_bytes() == BODY
    assert len(server.requests()) == 2


def test_404_names_url_and_status_and_is_not_retried(server: Server, tmp_path: Path) -> None:
    url = server.url("missing.bin")
    with pytest.raises(SourceError, match=r"missing\.bin: HTTP 404"):
        fetch(url, SHA, tmp_path, **FAST)
    assert len(server.requests()) == 1 and leftovers(tmp_path) == []
    assert not (tmp_path / SHA[:16] / "missing.bin").exists()


def test_5xx_is_retried_with_backoff(server: Server, tmp_path: Path) -> None:
    url = server.add("flaky.bin", BODY, 500, 503)
    assert fetch(url, SHA, tmp_path, **FAST).read_bytes() == BODY
    assert [h.status for h in server.requests()] == [500, 503, 200]


def test_persistent_5xx_gives_up_naming_the_status(server: Server, tmp_path: Path) -> None:
    url = server.add("down.bin", BODY, *([500] * 10))
    with pytest.raises(SourceError, match=r"down\.bin: HTTP 500 .*gave up after 3 tries"):
        fetch(url, SHA, tmp_path, retries=2, **FAST)
    assert len(server.requests()) == 3 and leftovers(tmp_path) == []


@pytest.mark.parametrize("fault", ["reset", "truncate"])
def test_a_dropped_connection_resumes_with_range(server: Server, tmp_path: Path, fault: str) -> None:
    url = server.add("big.bin", BODY, fault)
    assert fetch(url, SHA, tmp_path, **FAST).read_bytes() == BODY
    first, second = server.requests()
    assert first.range is None and second.status == 206
    assert second.range is not None and 0 < int(second.range[len("bytes="):-1]) < len(BODY)


def test_a_server_without_range_support_is_read_again_from_the_start(server: Server, tmp_path: Path) -> None:
    url = server.add("norange.bin", BODY, "truncate", ranges=False)
    assert fetch(url, SHA, tmp_path, **FAST).read_bytes() == BODY
    assert [h.status for h in server.requests()] == [200, 200]


def test_a_crashed_download_is_absent_and_resumed_next_time(server: Server, tmp_path: Path) -> None:
    url = server.add("crash.bin", BODY)
    dest = cache.cache_path(tmp_path, url, SHA)
    dest.parent.mkdir(parents=True)
    (dest.parent / ".crash.bin.part").write_bytes(BODY[:100_000])  # what a killed process leaves
    assert fetch(url, SHA, tmp_path, **FAST).read_bytes() == BODY
    assert [h.range for h in server.requests()] == ["bytes=100000-"]


def test_a_stale_part_of_another_file_is_discarded(server: Server, tmp_path: Path) -> None:
    url = server.add("stale.bin", BODY)
    dest = cache.cache_path(tmp_path, url, SHA)
    dest.parent.mkdir(parents=True)
    (dest.parent / ".stale.bin.part").write_bytes(b"x" * 1000)
    assert fetch(url, SHA, tmp_path, **FAST).read_bytes() == BODY
    assert [h.range for h in server.requests()] == ["bytes=1000-", None]


def test_wrong_checksum_names_both_digests_and_removes_the_partial_file(server: Server, tmp_path: Path) -> None:
    url = server.add("evil.bin", b"not what was published")
    with pytest.raises(SourceError, match=f"evil.bin: sha256 mismatch: expected {SHA}, got [0-9a-f]{{64}}"):
        fetch(url, SHA, tmp_path, **FAST)
    assert leftovers(tmp_path) == [] and not cache.cache_path(tmp_path, url, SHA).exists()


def test_a_slow_body_is_waited_for(server: Server, tmp_path: Path) -> None:
    url = server.add("slow.bin", BODY, "slow", slow_s=0.1)
    assert fetch(url, SHA, tmp_path, timeout_s=5.0).read_bytes() == BODY
    assert len(server.requests()) == 1


def test_a_stalled_body_times_out_and_is_resumed(server: Server, tmp_path: Path) -> None:
    url = server.add("stall.bin", BODY, "slow", slow_s=1.0)
    assert fetch(url, SHA, tmp_path, timeout_s=0.3, backoff_s=0.01).read_bytes() == BODY
    assert len(server.requests()) == 2 and server.requests()[1].status == 206


def test_two_jobs_on_one_machine_download_once(server: Server, tmp_path: Path) -> None:
    url = server.add("shared.bin", BODY, "slow", slow_s=0.1)
    results: list[Path | BaseException] = []

    def job() -> None:
        try:
            results.append(fetch(url, SHA, tmp_path, **FAST))
        except BaseException as exc:
            results.append(exc)

    threads = [threading.Thread(target=job) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert all(isinstance(r, Path) and r.read_bytes() == BODY for r in results), results
    assert len(results) == 3 and len(server.requests()) == 1


def test_remote_without_sha256_is_refused_unless_opted_out(server: Server, tmp_path: Path,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    url = server.add("nosha.bin", BODY)
    with pytest.raises(SourceError, match="has no data.sha256.*allow_unverified"):
        fetch(url, "", tmp_path, **FAST)
    assert server.requests() == []
    with pytest.raises(ConfigError, match="data.sha256 is empty"):
        DataConfig(url=url, dataset={})
    path = fetch(url, "", tmp_path, allow_unverified=True, **FAST)
    assert path.read_bytes() == BODY and path.parent.name.startswith("unverified-")
    assert f"data.sha256={SHA}" in caplog.text


def test_offline_uses_the_cache_or_fails_clearly(server: Server, tmp_path: Path) -> None:
    url = server.add("off.bin", BODY)
    with pytest.raises(SourceError, match="not in the cache .*HARNESS_OFFLINE=1"):
        fetch(url, SHA, tmp_path, offline=True, **FAST)
    assert server.requests() == []
    fetch(url, SHA, tmp_path, **FAST)
    assert fetch(url, SHA, tmp_path, offline=True, verify="full", **FAST).read_bytes() == BODY
    assert len(server.requests()) == 1


def test_offline_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from omegaconf import OmegaConf

    monkeypatch.setenv("HARNESS_OFFLINE", "1")
    assert OmegaConf.to_object(OmegaConf.structured(DataConfig(dataset={}))).offline is True
    monkeypatch.delenv("HARNESS_OFFLINE")
    assert OmegaConf.to_object(OmegaConf.structured(DataConfig(dataset={}))).offline is False


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("tty,progress,shown", [(False, True, False), (True, True, True), (True, False, False)])
def test_progress_bar_only_for_the_master_on_a_terminal(server: Server, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        tty: bool, progress: bool, shown: bool) -> None:
    err = _Tty() if tty else io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    fetch(server.add("bar.bin", BODY), SHA, tmp_path, progress=progress, **FAST)
    assert ("bar.bin" in err.getvalue()) == shown, err.getvalue()


def test_a_set_of_files_under_one_base_url(server: Server, tmp_path: Path, hashed: HashCounter) -> None:
    a, b = b"first file", b"second file"
    server.add("mnist/a.gz", a)
    server.add("mnist/b.gz", b)
    files = {"a.gz": hashlib.sha256(a).hexdigest(), "b.gz": hashlib.sha256(b).hexdigest()}
    folder = fetch(server.url("mnist"), "", tmp_path, files=files, **FAST)
    assert (folder / "a.gz").read_bytes() == a and (folder / "b.gz").read_bytes() == b
    hashed.bytes = 0
    assert fetch(server.url("mnist/"), "", tmp_path, files=files, **FAST) == folder
    assert fetch(server.url("mirror/"), "", tmp_path, files=files, **FAST) == folder  # same digests: same set
    assert len(server.requests()) == 2 and hashed.bytes == 0
    with pytest.raises(SourceError, match=r"data.files\['c'\] has no sha256"):
        fetch(server.url("mnist"), "", tmp_path, files={"c": ""}, **FAST)


def test_local_files_and_directories(tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(BODY)
    path = fetch(src.as_uri(), SHA, tmp_path / "cache")
    assert path.read_bytes() == BODY and path != src
    assert fetch(src.as_uri(), "", tmp_path / "cache") == path  # hashed to find its entry
    with pytest.raises(SourceError, match="sha256 mismatch"):
        fetch(src.as_uri(), "0" * 64, tmp_path / "cache")
    with pytest.raises(SourceError, match="no such file"):
        fetch((tmp_path / "nope").as_uri(), SHA, tmp_path / "cache")
    assert fetch(tmp_path.as_uri(), "", tmp_path / "cache") == tmp_path  # a directory: in place
    with pytest.raises(SourceError, match="scheme 'ftp' is not supported"):
        fetch("ftp://127.0.0.1/x", SHA, tmp_path)
    with pytest.raises(SourceError, match="not 64 hexadecimal digits"):
        fetch("http://127.0.0.1:9/x", "abc", tmp_path)


FETCH = ("import sys; from pathlib import Path; from harness.data.cache import fetch; "
         "print(fetch(sys.argv[1], sys.argv[2], Path(sys.argv[3]), backoff_s=0.01, timeout_s=10.0))")


def test_the_lock_holder_killed_mid_download_leaves_the_file_to_the_other_process(server: Server,
                                                                                 tmp_path: Path) -> None:
    """Two processes (two jobs on one node) fetch one file; the one holding the lock is SIGKILLed with
    part of the body written. The kernel drops its lock; the other takes it, adopts the .part, asks
    for the rest (Range), verifies and puts the file in place: one entry, no partial file."""
    import signal
    import subprocess
    import time

    url = server.add("shared.bin", BODY, "slow", slow_s=1.0)  # the first request: 5 chunks, 1 s apart
    dest = cache.cache_path(tmp_path, url, SHA)
    part = dest.with_name(f".{dest.name}.part")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    cmd = [sys.executable, "-c", FETCH, url, SHA, str(tmp_path)]
    holder = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while not (part.is_file() and part.stat().st_size > 0) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert part.is_file(), holder.communicate(timeout=30)[0]
    other = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(0.5)  # the other is waiting for the lock now
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait(timeout=30)
    out, _ = other.communicate(timeout=60)
    assert other.returncode == 0, out
    assert Path(out.strip().splitlines()[-1]) == dest and dest.read_bytes() == BODY
    assert leftovers(tmp_path) == []
    assert sorted(p.name for p in dest.parent.iterdir() if not p.name.endswith(".lock")) == [dest.name]
    first, second = server.requests("shared.bin")
    assert first.range is None and second.range is not None and second.range != "bytes=0-", server.requests()
