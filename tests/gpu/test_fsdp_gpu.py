"""`trainer.strategy=fsdp` on CUDA: a cuda device mesh (one rank, NCCL), FSDP's bf16 policy with
fp32 norms, sharded checkpoints written and resumed. Skipped without CUDA (tests/conftest.py); run
by scripts/gpu_check.sh. The same job without fsdp (the bare module at one process, bf16 autocast)
must end with weights within bf16's tolerance."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

from harness import checkpoint
from tests.conftest import REPO, clean_env, harness_cmd

pytestmark = pytest.mark.gpu
JOB = ["device=0", "model=tower", "model.width=512", "model.depth=4", "trainer.amp=bf16", "trainer.epochs=2",
       "trainer.fsdp.wrap=[TowerBlock]", "optim=adamw"]


def train(tmp: Path, run_id: str, *overrides: str) -> Path:
    env = clean_env(HARNESS_RUN_ID=run_id, HARNESS_CACHE=str(tmp / "cache"), PYTHONPATH=str(REPO))
    proc = subprocess.run(harness_cmd(*JOB, f"run_root={tmp}/runs", *overrides), cwd=tmp, env=env, text=True,
                          capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return tmp / "runs" / run_id


def test_fsdp_bf16_on_a_cuda_mesh_trains_saves_sharded_and_resumes(tmp_path: Path) -> None:
    sharded = train(tmp_path, "fsdp", "trainer.strategy=fsdp")
    whole = train(tmp_path, "whole", "trainer.strategy=auto")
    a, b = checkpoint.load(sharded), checkpoint.load(whole)
    assert a["meta"]["sharded"] == ["model", "optimizer"] and not b["meta"]["sharded"]
    for k in b["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=2e-2, atol=2e-3)
    log = (sharded / "train.log").read_text()
    assert "backend nccl" in log and "on cuda:0" in log, log[-2000:]
    resumed = train(tmp_path, "fsdp", "trainer.strategy=fsdp", "trainer.epochs=3")  # one epoch more, resumed
    assert "resumed from" in (resumed / "train.log").read_text()
