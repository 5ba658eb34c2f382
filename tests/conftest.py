"""Shared test fixtures and the markers' skip rules.

Markers (pyproject.toml, --strict-markers): `slow` real multi-process runs; `gpu` needs CUDA
(skipped without it); `slurm` needs a Slurm controller (skipped without one, FAILS under CI=true);
`multinode` needs emulated hosts, scripts/hosts.sh (root: skipped without, FAILS under CI=true).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def _slurm_answers() -> bool:
    if shutil.which("sinfo") is None or not os.environ.get("SLURM_CONF"):
        return False
    try:
        return subprocess.run(["sinfo", "-h"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _hosts_missing() -> str | None:
    """Why emulated hosts cannot be made here (`scripts/hosts.sh check`); None when they can."""
    try:
        proc = subprocess.run(["bash", str(REPO / "scripts" / "hosts.sh"), "check"], capture_output=True, text=True,
                              timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        return str(exc)
    return None if proc.returncode == 0 else (proc.stderr.strip().splitlines() or ["hosts.sh check failed"])[-1]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    cuda = _cuda_available()
    slurm = None
    hosts: list[str | None] = []  # [why not], once asked
    for item in items:
        # markers, not keywords: a parametrize id like test_x[gpu] must not count as the marker
        if item.get_closest_marker("gpu") is not None and not cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device (none visible)"))
        if item.get_closest_marker("slurm") is not None:
            if slurm is None:
                slurm = _slurm_answers()
            if not slurm and os.environ.get("CI") != "true":
                item.add_marker(pytest.mark.skip(
                    reason="no Slurm controller answers `sinfo` (start one: scripts/slurm/cluster.sh start)"))
        if item.get_closest_marker("multinode") is not None:
            if not hosts:
                hosts.append(_hosts_missing())
            if hosts[0] is not None and os.environ.get("CI") != "true":
                item.add_marker(pytest.mark.skip(reason=f"no emulated hosts here: {hosts[0]}"))


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private dataset cache; subprocesses inherit it through HARNESS_CACHE."""
    d = tmp_path / "cache"
    monkeypatch.setenv("HARNESS_CACHE", str(d))
    return d


def harness_cmd(*args: str) -> list[str]:
    """`python -m harness.train ...` with this interpreter."""
    return [sys.executable, "-m", "harness.train", *args]


def clean_env(**extra: str) -> dict[str, str]:
    """The test's environment without any distributed or Slurm variables it may have inherited."""
    drop = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
            "TORCHELASTIC_RUN_ID", "HARNESS_RUN_ID", "HARNESS_LAUNCHED", "GROUP_RANK")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("SLURM_")}
    env.update(extra)
    return env
