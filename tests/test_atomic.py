"""The one atomic-write helper, and the files it serves outside checkpoints (metrics.csv, config.yaml)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from harness import atomic, rundir
from harness.logs import MetricsWriter


def test_write_replaces_whole_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "f.txt"
    atomic.write_text(path, "one")
    atomic.write_bytes(path, b"two")
    assert path.read_bytes() == b"two"
    assert os.listdir(path.parent) == ["f.txt"]


def test_a_failed_write_keeps_the_old_content(tmp_path: Path) -> None:
    path = tmp_path / "f.txt"
    atomic.write_text(path, "old")
    with pytest.raises(RuntimeError, match="midway"):
        with atomic.open_atomic(path, "w") as f:
            f.write("half of the new")
            raise RuntimeError("midway")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["f.txt"]


def test_the_next_write_sweeps_temporaries_of_killed_writes(tmp_path: Path) -> None:
    path = tmp_path / "f.txt"
    (tmp_path / ".f.txt.tmp-12345").write_text("a write killed midway")
    atomic.write_text(path, "new")
    assert os.listdir(tmp_path) == ["f.txt"]


def test_publish_moves_a_filled_temporary_into_place(tmp_path: Path) -> None:
    part = tmp_path / ".data.part"
    part.write_bytes(b"downloaded")
    atomic.publish(part, tmp_path / "data")
    assert (tmp_path / "data").read_bytes() == b"downloaded" and not part.exists()


def test_only_replacing_modes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="mode='a'"):
        with atomic.open_atomic(tmp_path / "f", "a"):
            pass


def test_metrics_rows_survive_truncate_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "metrics.csv"
    writer = MetricsWriter(path)
    for epoch in (1, 2, 3):
        writer.write({"epoch": epoch, "loss": 1.0 / epoch})
    resumed = MetricsWriter(path)  # a resumed run: redoes epoch 3
    resumed.truncate(after_epoch=2)
    resumed.write({"epoch": 3, "loss": 0.25, "unknown": "dropped"})
    assert path.read_text().splitlines() == ["epoch,loss", "1,1.0", "2,0.5", "3,0.25"]
    assert os.listdir(tmp_path) == ["metrics.csv"]


def test_config_yaml_is_written_atomically(tmp_path: Path) -> None:
    rundir.write_config(tmp_path, "seed: 0\n")
    rundir.write_config(tmp_path, "seed: 1\n")
    assert (tmp_path / "config.yaml").read_text() == "seed: 1\n" and os.listdir(tmp_path) == ["config.yaml"]


def test_nothing_in_harness_replaces_a_file_except_through_this_module() -> None:
    """A whole-file write anywhere else (write_text, write_bytes, open(..., "w"), savefig to a path,
    torch.save to a path) could be left half-written by a crash. Appends (logs, incidents.jsonl,
    metrics rows) and the cache's resumable .part ("ab") are not replacements."""
    import re

    import harness

    root = Path(harness.__file__).parent
    pattern = re.compile(r"(?<!atomic)\.write_(text|bytes)\(|open\([^)]*[\"']wb?[\"']|savefig\((?!f\b)|"
                         r"torch\.save\((?![^,]+, f\))")
    found = [f"{p.relative_to(root)}:{i}: {line.strip()}"
             for p in sorted(root.rglob("*.py")) if p.name != "atomic.py"
             for i, line in enumerate(p.read_text().splitlines(), 1)
             if pattern.search(line) and "part.path" not in line]  # the cache's .part: atomic.publish puts it
    assert found == [], found
