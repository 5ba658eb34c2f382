"""Real jobs on a real Slurm controller: both batch-script shapes train to completion, a bad
override fails without a requeue, and a Hydra sweep through submitit completes every point.

Needs `make slurm-up` (or scripts/slurm/cluster.sh start) and SLURM_CONF; skipped without a
controller, failed instead under CI=true (tests/conftest.py).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.runs import digests, epochs
from tests.slurm.conftest import JOB_TIMEOUT, Job, assert_not_requeued, cancel, job_env, run_job, unique_name

pytestmark = pytest.mark.slurm
JOB = ("model=mlp", "trainer.epochs=2", "dist.backend=gloo")




def check_two_rank_run(job: Job, root: Path, mode: str, n_epochs: int) -> None:
    assert job.returncode == 0, job.log
    assert f"harness: job {job.id} attempt 1" in job.log and "attempt 2" not in job.log, job.log
    run_id = f"slurm-{job.id}"
    assert [p.name for p in root.iterdir()] == [run_id], job.log  # one run directory, named by the job id
    run_dir = root / run_id
    train_log = (run_dir / "train.log").read_text()
    assert f"({mode}, world size 2, backend gloo)" in train_log, train_log
    assert epochs(run_dir) == list(range(1, n_epochs + 1)), train_log
    assert (run_dir / "checkpoints" / "latest").is_file() and not (run_dir / "PREEMPTED").exists()
    d = digests(run_dir)
    assert set(d) == {0, 1} and d[0] == d[1], d


@pytest.mark.timeout(JOB_TIMEOUT + 30)
def test_srun_two_tasks_train_to_completion(tmp_path: Path, cache_dir: Path) -> None:
    job = run_job("cpu-srun.sbatch", *JOB, cwd=tmp_path, tag="srun")
    check_two_rank_run(job, tmp_path / "runs", "slurm", 2)


@pytest.mark.timeout(JOB_TIMEOUT + 30)
def test_srun_torchrun_one_task_two_workers(tmp_path: Path, cache_dir: Path) -> None:
    job = run_job("cpu-torchrun.sbatch", *JOB, cwd=tmp_path, tag="torchrun")
    check_two_rank_run(job, tmp_path / "runs", "torchrun", 2)


@pytest.mark.timeout(JOB_TIMEOUT + 30)
def test_bad_override_fails_with_the_error_in_the_log_and_no_requeue(tmp_path: Path, cache_dir: Path) -> None:
    job = run_job("cpu-srun.sbatch", "model=mlp", "trainer.foo=1", cwd=tmp_path, tag="bad")
    assert job.returncode == 2, job.log
    assert "Key 'foo' not in 'TrainerConfig'" in job.log and "trainer.foo" in job.log
    assert not (tmp_path / "runs").exists()  # it stopped before any worker started
    assert_not_requeued(job)


@pytest.mark.timeout(JOB_TIMEOUT + 30)
def test_failing_workers_end_the_job_without_requeue(tmp_path: Path, cache_dir: Path) -> None:
    """An error inside the step (here the batch check, which needs the world size) ends every rank."""
    job = run_job("cpu-srun.sbatch", "model=mlp", "data.batch_size=63", cwd=tmp_path, tag="fail")
    assert job.returncode != 0, job.log  # 2 from the ranks, or 143 if srun stopped a rank before it exited
    assert "data.batch_size=63 (the global batch) is not divisible by world size 2" in job.log
    assert "requeue" not in job.log
    assert_not_requeued(job)


SWEEP_TIMEOUT = 240  # no accounting database: submitit reads results from its files; a lost job would hang it


@pytest.mark.timeout(SWEEP_TIMEOUT + 30)
def test_submitit_sweep_runs_every_point(tmp_path: Path, cache_dir: Path) -> None:
    name = unique_name("sweep")
    argv = [sys.executable, "-m", "harness.train", "-m", "hydra/launcher=slurm", f"hydra.launcher.name={name}",
            "hydra.launcher.cpus_per_task=1", "model=mlp", "trainer.epochs=1", "device=cpu", "optim.lr=0.1,0.01"]
    try:
        proc = subprocess.run(argv, cwd=tmp_path, env=job_env(), capture_output=True, text=True,
                              timeout=SWEEP_TIMEOUT)
    except subprocess.TimeoutExpired:
        cancel(name)
        pytest.fail(f"the sweep did not finish within {SWEEP_TIMEOUT} s; its jobs were cancelled")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    runs = tmp_path / "runs"
    dirs = sorted(p for p in runs.iterdir() if p.is_dir() and not p.name.startswith("."))
    # one job array: slurm-<array job>_<task>-<Hydra job number>
    assert [re.sub(r"^slurm-\d+_", "slurm-A_", p.name) for p in dirs] == ["slurm-A_0-0", "slurm-A_1-1"], dirs
    for run_dir, lr in zip(dirs, ("0.1", "0.01"), strict=True):
        assert epochs(run_dir) == [1]
        assert re.search(rf"^  lr: {lr}$", (run_dir / "config.yaml").read_text(), flags=re.M)
