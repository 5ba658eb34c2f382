"""The one run directory: `<run_root>/<run id>`.

Owns its creation and the resolved `config.yaml` in it. The id comes from `env.run_id` (Slurm job,
elastic run id, or what the launcher chose); without one, a timestamp, made unique by creating the
directory exclusively, so two runs started in the same second never share a directory.
"""

from __future__ import annotations

import time
from pathlib import Path

from harness import atomic


def timestamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


def create_unique(root: Path, stem: str | None = None) -> Path:
    """A new directory named `stem` or the current time (with -1, -2, ... on collision)."""
    root.mkdir(parents=True, exist_ok=True)
    stamp = stem or timestamp()
    for n in range(1000):
        path = root / (stamp if n == 0 else f"{stamp}-{n}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise RuntimeError(f"could not create a unique run directory under {root}")


def ensure(root: Path, run_id: str) -> Path:
    """The directory for a known run id; reused when it exists (a requeued or restarted job)."""
    path = root / run_id
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_config(run_dir: Path, config_yaml: str) -> None:
    """The resolved config.yaml, replaced atomically (a rerun of the same run id rewrites it)."""
    atomic.write_text(run_dir / "config.yaml", config_yaml)
