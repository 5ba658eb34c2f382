"""The batch scripts themselves, without a cluster: they parse, they share one common part, and
each one asks for requeue and the preemption signal."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.slurm.conftest import SCRIPTS

SBATCH = sorted(SCRIPTS.glob("*.sbatch"))
COMMON = "# Common part: identical in every scripts/slurm/*.sbatch"


def common_part(path: Path) -> str:
    text = path.read_text()
    assert COMMON in text, f"{path.name} lacks the common part"
    return text[text.index(COMMON):]


def test_the_scripts_are_there() -> None:
    names = {p.name for p in SBATCH}
    assert {"cpu-srun.sbatch", "cpu-torchrun.sbatch", "gpu-srun.sbatch", "gpu-torchrun.sbatch",
            "gpu-srun-multinode.sbatch", "gpu-torchrun-multinode.sbatch"} <= names


@pytest.mark.parametrize("path", [*SBATCH, SCRIPTS / "cluster.sh", SCRIPTS / "lab.sh"], ids=lambda p: p.name)
def test_bash_parses_it(path: Path) -> None:
    proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr


def test_every_script_shares_one_common_part() -> None:
    parts = {p.name: common_part(p) for p in SBATCH}
    first = parts[SBATCH[0].name]
    assert all(part == first for part in parts.values()), [n for n, part in parts.items() if part != first]


@pytest.mark.parametrize("path", SBATCH, ids=lambda p: p.name)
def test_requeue_signal_and_shape(path: Path) -> None:
    text = path.read_text()
    directives = re.findall(r"^#SBATCH (\S+)", text, flags=re.M)
    assert "--requeue" in directives and "--open-mode=append" in directives
    assert "--no-kill" in directives  # a lost node fails the step; the script decides about a requeue
    assert any(re.fullmatch(r"--signal=USR2@\d+", d) for d in directives), directives
    assert "scontrol show" not in text  # the first node comes from the harness's hostlist parser
    if "torchrun" in path.name:
        assert "trap '' USR2; exec" in text and "--rdzv-id \"$SLURM_JOB_ID\"" in text
    else:
        assert "srun --kill-on-bad-exit=1 \"$PYTHON\" -u -m harness.train" in text
    if path.name.startswith("cpu-"):
        assert "device=cpu" in text
    if "multinode" in path.name:
        assert "--nodes=2" in directives
