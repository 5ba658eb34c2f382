"""Reading what a finished run left behind: its directory, metrics.csv, each rank's final digest."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import psutil


def only_run_dir(root: Path) -> Path:
    dirs = [p for p in root.iterdir() if p.is_dir()]
    assert len(dirs) == 1, dirs
    return dirs[0]


def metrics(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def epochs(run_dir: Path) -> list[int]:
    return [int(row["epoch"]) for row in metrics(run_dir)]


def digests(run_dir: Path) -> dict[int, str]:
    """Rank -> the final weights digest that rank logged in logs/rank<r>.log."""
    out = {}
    for log in sorted((run_dir / "logs").glob("rank*.log")):
        m = re.search(r"final weights digest (\w+) \(rank (\d+)\)", log.read_text())
        assert m, f"{log} has no digest"
        out[int(m.group(2))] = m.group(1)
    return out


def assert_no_process_left(marker: str) -> None:
    left = [p for p in psutil.process_iter(["cmdline"]) if marker in " ".join(p.info["cmdline"] or [])]
    assert not left, [p.info["cmdline"] for p in left]
