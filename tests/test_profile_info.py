"""`python -m harness.profile` and `python -m harness.info`: one real run of each, the rest in-process."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from harness import info
from harness import profile as hprofile

REPO = Path(__file__).resolve().parents[1]
DIST_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
             "TORCHELASTIC_RUN_ID", "HARNESS_RUN_ID", "HARNESS_LAUNCHED", "GROUP_RANK")


def command_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS and not k.startswith("SLURM_")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **extra)
    return env


@pytest.fixture
def quiet_logger():
    """No handlers on the `harness` logger, so summaries are printed (and captured)."""
    log = logging.getLogger("harness")
    saved = log.handlers[:], log.propagate
    log.handlers, log.propagate = [], False
    yield
    log.handlers, log.propagate = saved


def test_profile_command_mlp(tmp_path):
    cfg = hprofile.compose(["model=mlp"])
    m = cfg.model
    hand = m.in_features * m.hidden + m.hidden + m.hidden * m.num_classes + m.num_classes
    env = command_env(HARNESS_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, "-m", "harness.profile", "model=mlp", "-n", "2"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert f"MLP summary: 6 layers, {hand} parameters, {hand} gradients" in out
    assert "GFLOPs" in out and "forward (ms)" in out
    batch = cfg.data.batch_size  # one CPU process, no accumulation: the micro-batch is the global batch
    row = out.splitlines()[-1].split()
    assert row[0] == str(hand) and f"({batch}, 1, 8, 8)" in out and f"({batch}, 10)" in out
    flops = 2 * batch * (m.in_features * m.hidden + m.hidden * m.num_classes)
    assert float(row[1]) * 1e9 == pytest.approx(flops, rel=1e-3)  # printed with 4 significant digits


def test_profile_main_with_shape_and_micro_batch(quiet_logger, capsys):
    # 64 global / (2 processes x 2 accumulation) = 16 per forward; --shape: no dataset is read
    args = ["--shape", "1,8,8", "-n", "1", "device=cpu", "dist.nproc=2", "trainer.accumulate=2"]
    code = hprofile.main(args)
    out = capsys.readouterr().out
    assert code == 0, out
    assert "SmallCNN summary" in out and "(16, 1, 8, 8)" in out and "(16, 10)" in out
    assert hprofile.main(["--shape", "1x12x12", "--batch", "3", "-n", "1", "--verbose", "device=cpu"]) == 0
    out = capsys.readouterr().out
    assert "(3, 1, 12, 12)" in out and "features.0.0.weight" in out


@pytest.mark.parametrize("args,message", [
    (["device=0"] if not torch.cuda.is_available() else ["device=99"], "device="),
    (["data.batch_size=30", "dist.nproc=4", "--shape", "1,8,8"], "nearest valid: 28 or 32"),
    (["model=no_such_model"], "no_such_model"),
])
def test_profile_user_errors(args, message, capsys):
    assert hprofile.main(args) == hprofile.EXIT_USER_ERROR
    assert message in capsys.readouterr().err


def test_profile_bad_shape():
    with pytest.raises(SystemExit):
        hprofile.main(["--shape", "1,0,8"])


def test_info_command():
    env = command_env(SLURM_JOB_ID="77", SLURM_NTASKS="1", NCCL_DEBUG="INFO", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-m", "harness.info"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.startswith("harness ") and f"torch {torch.__version__}" in out.splitlines()[0]
    for needle in ("python ", "CUDA        available", "backends    gloo True", "nccl ", "CPU ", "RAM ",
                   "GPUs        0 visible (CUDA_VISIBLE_DEVICES='')", "SLURM_JOB_ID=77", "NCCL_DEBUG=INFO",
                   "launcher variables (mode: launcher)"):
        assert needle in out, needle


def test_launcher_section_is_pure():
    lines = info.launcher_section({"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "MASTER_PORT": "29500",
                                   "TORCHELASTIC_RUN_ID": "abc", "PATH": "/bin"})
    assert lines[0] == "launcher variables (mode: torchrun (rank 1 of 2)):"
    assert lines[1:] == ["  RANK=1", "  LOCAL_RANK=1", "  WORLD_SIZE=2", "  MASTER_PORT=29500",
                         "  TORCHELASTIC_RUN_ID=abc"]
    assert info.launcher_section({}) == ["launcher variables (mode: launcher):", "  (none set)"]
    bad = info.launcher_section({"RANK": "5", "LOCAL_RANK": "0", "WORLD_SIZE": "2"})
    assert "inconsistent: RANK=5 is outside WORLD_SIZE=2" in bad[0]
