"""Helpers for the tests that submit real jobs to a Slurm controller (`make slurm-up` starts one).

Jobs are submitted with `sbatch --wait` from the test's tmp directory (so `runs/` lands there), with
a unique job name: a test that runs out of time cancels its job by that name instead of leaving it
queued. Each job's output goes to `<tmp>/<name>.out`.

`slurm_lab` is another cluster: 2 nodes on emulated hosts, one per test that asks for it (tests/slurm/lab.py;
the tests marked `multinode`), independent of the one above and of SLURM_CONF.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO, clean_env
from tests.slurm import lab

SCRIPTS = REPO / "scripts" / "slurm"
JOB_TIMEOUT = 180  # seconds one job may take, queueing included: 2-epoch CPU jobs take ~20 s


@dataclass(frozen=True)
class Job:
    id: str
    name: str
    returncode: int
    output: Path

    @property
    def log(self) -> str:
        return self.output.read_text() if self.output.exists() else ""


def job_env(**extra: str) -> dict[str, str]:
    """The test's environment minus inherited job variables, plus what a batch job needs."""
    return clean_env(SLURM_CONF=os.environ["SLURM_CONF"], PYTHON=sys.executable, **extra)


def sbatch_argv(script: str, *overrides: str, cwd: Path, name: str) -> list[str]:
    return ["sbatch", "--parsable", "--wait", f"--job-name={name}", f"--output={cwd / name}.out",
            str(SCRIPTS / script), *overrides]


_SUBMITTED: list[str] = []  # job names the running test submitted: cancelled when it ends


def unique_name(tag: str) -> str:
    name = f"harness-test-{tag}-{uuid.uuid4().hex[:8]}"
    _SUBMITTED.append(name)
    return name


@pytest.fixture(autouse=True)
def _cancel_leftover_jobs():
    """A test that fails or times out (pytest-timeout) leaves no job behind in the queue."""
    _SUBMITTED.clear()
    yield
    for name in _SUBMITTED:
        cancel(name)
    _SUBMITTED.clear()


def cancel(name: str) -> None:
    subprocess.run(["scancel", f"--name={name}"], env=job_env(), capture_output=True, timeout=30)


def wait_for(proc: subprocess.Popen[str], name: str, output: Path, timeout: float) -> Job:
    """Wait for an `sbatch --wait` process; on timeout cancel the job and fail with its log."""
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        cancel(name)
        log = output.read_text() if output.exists() else "(no output)"
        pytest.fail(f"job {name} did not finish within {timeout} s; cancelled. Its log:\n{log}")
    job_id = stdout.strip().split(";")[0]
    assert job_id.isdigit(), f"sbatch printed {stdout!r}, stderr {stderr!r}"
    return Job(job_id, name, proc.returncode, output)


def submit(script: str, *overrides: str, cwd: Path, tag: str, **env: str) -> tuple[subprocess.Popen[str], str, Path]:
    """Start `sbatch --wait` in the background (the job inherits `env` too); returns (process, job name,
    output file)."""
    name = unique_name(tag)
    proc = subprocess.Popen(sbatch_argv(script, *overrides, cwd=cwd, name=name),
                            cwd=cwd, env=job_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, name, cwd / f"{name}.out"


def run_job(script: str, *overrides: str, cwd: Path, tag: str, timeout: float = JOB_TIMEOUT) -> Job:
    """Submit, wait, return the job (its exit code is `sbatch --wait`'s)."""
    proc, name, output = submit(script, *overrides, cwd=cwd, tag=tag)
    return wait_for(proc, name, output, timeout)


def job_state(job_id: str) -> str:
    """squeue's state for the job; '' once it has left the queue (MinJobAge seconds after the end)."""
    proc = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], env=job_env(), capture_output=True,
                          text=True, timeout=30)
    return proc.stdout.strip() if proc.returncode == 0 else ""


def assert_not_requeued(job: Job, watch_s: float = 3.0) -> None:
    """A finished job stays finished: not pending or running again within `watch_s` seconds."""
    deadline = time.monotonic() + watch_s
    while time.monotonic() < deadline:
        state = job_state(job.id)
        assert state not in ("PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED"), (
            f"job {job.id} is {state} again after it failed:\n{job.log}")
        time.sleep(0.5)


@pytest.fixture
def slurm_lab(tmp_path: Path, cache_dir: Path) -> Iterator[lab.Cluster]:
    """A 2-node Slurm cluster on emulated hosts for this test (tests/slurm/lab.py), taken down after it."""
    cluster = lab.start(tmp_path / "slurm", cache_dir)
    yield cluster
    problem = lab.stop(cluster)
    assert not problem, f"the lab cluster did not come down cleanly: {problem}"
