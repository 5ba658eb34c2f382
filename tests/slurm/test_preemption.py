"""Preemption on a real Slurm controller: USR2 mid-training -> the workers save at a step boundary
and write PREEMPTED -> the batch script requeues the job -> the requeued job resumes from its newest checkpoint and
ends with the same weights as a run that was never interrupted. SIGTERM never requeues,
HARNESS_MAX_REQUEUES bounds the requeues, and a preempted point of a submitit sweep requeues itself."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness import checkpoint
from tests.conftest import clean_env, harness_cmd
from tests.runs import digests, epochs
from tests.slurm.conftest import assert_not_requeued, cancel, job_env, submit, unique_name, wait_for

pytestmark = pytest.mark.slurm
EPOCHS = 10
# small batches: 89 steps per epoch, so the signal lands inside an epoch, well before the end
JOB = ("model=mlp", f"trainer.epochs={EPOCHS}", "data.batch_size=16", "trainer.amp=off", "dist.backend=gloo")
TIMEOUT = 240  # a requeue waits cred_expire (10 s) + 1 s before the job starts again


def signal_when_training(jobs: dict[str, Path], signal: str, timeout: float = TIMEOUT, resumed: int = 0) -> None:
    """Signal each job's steps (scancel --signal) once its run's log shows training under way: epoch 1
    of the first attempt, or (resumed=N) the training steps after the N-th "resumed from"."""
    pending, deadline = dict(jobs), time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        for name, cwd in list(pending.items()):
            logs = list((cwd / "runs").glob("slurm-*/train.log"))
            text = logs[0].read_text() if logs else ""
            after = text.split("resumed from")
            if len(after) > resumed and re.search(r"epoch \d+/\d+ step" if resumed else "epoch 1/", after[resumed]):
                assert f"epoch {EPOCHS}/" not in text, f"{name} got too far before the signal:\n{text}"
                subprocess.run(["scancel", f"--signal={signal}", f"--name={name}"], env=job_env(), check=True,
                               timeout=30)
                del pending[name]
        time.sleep(0.1)
    if pending:
        pytest.fail(f"jobs {sorted(pending)} logged no training within {timeout} s")


@pytest.mark.timeout(TIMEOUT + 60)
def test_usr2_requeues_and_resumes_to_the_same_weights(tmp_path: Path, cache_dir: Path) -> None:
    """Both shapes side by side; the uninterrupted reference runs outside Slurm, through the launcher
    with the same world size (2) and threads per rank (1): the same run, as tests/test_train.py shows."""
    shapes = {"srun": "cpu-srun.sbatch", "torchrun": "cpu-torchrun.sbatch"}
    for shape in [*shapes, "whole"]:
        (tmp_path / shape).mkdir()
    jobs = {shape: submit(script, *JOB, cwd=tmp_path / shape, tag=f"preempt-{shape}")
            for shape, script in shapes.items()}
    reference = subprocess.Popen(harness_cmd(*JOB, "device=cpu", "dist.nproc=2"), cwd=tmp_path / "whole",
                                 env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + TIMEOUT
        signal_when_training({name: tmp_path / shape for shape, (_, name, _) in jobs.items()}, "USR2")
        done = {shape: wait_for(*job, max(deadline - time.monotonic(), 1)) for shape, job in jobs.items()}
        _, err = reference.communicate(timeout=max(deadline - time.monotonic(), 1))
    finally:
        reference.kill()
    assert reference.returncode == 0, err
    expected = digests(next((tmp_path / "whole" / "runs").iterdir()))
    assert set(expected) == {0, 1}

    for shape, job in done.items():
        log = job.log
        assert job.returncode == 0, log
        assert "harness: preempted; requeueing job" in log, log
        assert f"harness: job {job.id} attempt 1" in log and f"harness: job {job.id} attempt 2" in log, log
        assert "attempt 3" not in log, log
        runs = tmp_path / shape / "runs"
        assert [p.name for p in runs.iterdir()] == [f"slurm-{job.id}"]  # the requeued job found its own run
        run_dir = runs / f"slurm-{job.id}"
        assert "resumed from" in (run_dir / "train.log").read_text()
        assert not (run_dir / "PREEMPTED").exists()
        assert epochs(run_dir) == list(range(1, EPOCHS + 1)), shape  # every epoch exactly once
        assert checkpoint.load(run_dir)["progress"]["epoch"] == EPOCHS
        assert digests(run_dir) == expected, shape


@pytest.mark.timeout(TIMEOUT + 60)
def test_sigterm_stops_the_job_without_requeue(tmp_path: Path, cache_dir: Path) -> None:
    proc, name, output = submit("cpu-srun.sbatch", *JOB, cwd=tmp_path, tag="term")
    deadline = time.monotonic() + TIMEOUT
    signal_when_training({name: tmp_path}, "TERM")
    job = wait_for(proc, name, output, max(deadline - time.monotonic(), 1))
    assert job.returncode == 143, job.log  # the workers saved and exited 128 + SIGTERM
    assert "harness: preempted" not in job.log and "attempt 2" not in job.log, job.log
    run_dir = tmp_path / "runs" / f"slurm-{job.id}"
    assert not (run_dir / "PREEMPTED").exists()
    assert (run_dir / "checkpoints" / "latest").is_file()  # saved on the way out
    assert not (run_dir / "metrics.csv").exists() or len(epochs(run_dir)) < EPOCHS  # and stopped early
    assert_not_requeued(job)


@pytest.mark.timeout(TIMEOUT + 60)
def test_harness_max_requeues_bounds_the_requeues(tmp_path: Path, cache_dir: Path) -> None:
    """HARNESS_MAX_REQUEUES=1: the first preemption requeues the job; the second ends it with exit 3
    and the line that says why and how to go on; the job is not requeued again."""
    proc, name, output = submit("cpu-srun.sbatch", *JOB, cwd=tmp_path, tag="max-requeues", HARNESS_MAX_REQUEUES="1")
    deadline = time.monotonic() + TIMEOUT
    signal_when_training({name: tmp_path}, "USR2")
    signal_when_training({name: tmp_path}, "USR2", timeout=max(deadline - time.monotonic(), 1), resumed=1)
    job = wait_for(proc, name, output, max(deadline - time.monotonic(), 1))
    log, run_dir = job.log, tmp_path / "runs" / f"slurm-{job.id}"
    assert job.returncode == 3, log  # preempted, saved, not requeued
    assert log.count("harness: preempted; requeueing job") == 1, log
    assert (f"harness: preempted after 1 requeues already (HARNESS_MAX_REQUEUES=1); not requeueing; "
            f"resume it with trainer.resume=runs/slurm-{job.id}") in log, log
    assert f"harness: job {job.id} attempt 2" in log and "attempt 3" not in log, log
    assert (run_dir / "PREEMPTED").exists() and (run_dir / "checkpoints" / "latest").is_file()
    assert not (run_dir / "metrics.csv").exists() or len(epochs(run_dir)) < EPOCHS  # stopped, resumable
    assert_not_requeued(job)


SWEEP_TIMEOUT = 300  # no accounting database: submitit reads results from its files; a lost job would hang it


@pytest.mark.timeout(SWEEP_TIMEOUT + 30)
def test_usr2_in_a_submitit_sweep_requeues_that_point_and_it_resumes(tmp_path: Path, cache_dir: Path) -> None:
    """hydra/launcher=slurm: the point's launcher saves on USR2 and requeues its own job (harness.slurm.requeue);
    the requeued job reruns the same point, resumes from its checkpoint, and the sweep completes.
    The point trains EPOCHS epochs like the other tests here: with 3 (about 2 s of training on one rank) the
    signal once arrived, through slurmctld and slurmd, after the point had already finished."""
    name = unique_name("sweep-preempt")
    argv = [sys.executable, "-m", "harness.train", "-m", "hydra/launcher=slurm", f"hydra.launcher.name={name}",
            "hydra.launcher.cpus_per_task=1", *JOB, "device=cpu", "optim.lr=0.1"]
    sweep = subprocess.Popen(argv, cwd=tmp_path, env=job_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
    try:
        signal_when_training({name: tmp_path}, "USR2", timeout=SWEEP_TIMEOUT)
        out, _ = sweep.communicate(timeout=SWEEP_TIMEOUT)
    except subprocess.TimeoutExpired:
        sweep.kill()
        cancel(name)
        pytest.fail(f"the sweep did not finish within {SWEEP_TIMEOUT} s; its jobs were cancelled")
    assert sweep.returncode == 0, out
    runs = tmp_path / "runs"
    [run_dir] = [p for p in runs.iterdir() if p.is_dir() and not p.name.startswith(".")]
    job = re.fullmatch(r"slurm-(\d+(?:_0)?)-0", run_dir.name)  # one point: a plain job, not an array
    assert job, run_dir.name
    job_log = "".join(p.read_text() for p in runs.rglob("*_log.out"))  # submitit's logs of the job's attempts
    assert f"harness: preempted; requeueing job {job.group(1)}" in job_log, job_log[-3000:]
    train_log = (run_dir / "train.log").read_text()
    assert train_log.count("resumed from") == 1 and not (run_dir / "PREEMPTED").exists(), train_log
    assert epochs(run_dir) == list(range(1, EPOCHS + 1))  # every epoch once, across the two attempts
    assert checkpoint.load(run_dir)["progress"]["epoch"] == EPOCHS
