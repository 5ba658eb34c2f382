"""Faults with real processes: preemption and requeue, a SIGKILLed worker under elastic restarts,
SIGTERM. Each interrupted run must end with the weights of the run that never stopped. Preemption
and the killed worker run for both strategies (ddp, fsdp: sharded checkpoints)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from harness import checkpoint
from tests.conftest import REPO, clean_env, harness_cmd
from tests.runs import assert_no_process_left, digests, metrics

pytestmark = pytest.mark.slow
JOB = ["device=cpu", "dist.nproc=2", "trainer.epochs=3", "trainer.log_every=1", "trainer.check_every=2"]
TIMEOUT = 240


def start(tmp: Path, run_id: str, *extra: str) -> subprocess.Popen[str]:
    env = clean_env(HARNESS_RUN_ID=run_id, HARNESS_CACHE=str(tmp / "cache"), PYTHONPATH=str(REPO))
    return subprocess.Popen(harness_cmd(*JOB, f"run_root={tmp}/runs", *extra), cwd=tmp, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def wait_for_step(log: Path, step: int, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        if log.is_file() and f" step {step} " in log.read_text():
            return
        assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before step {step}"
        time.sleep(0.02)
    raise AssertionError(f"no step {step} in {log}")


def finish(proc: subprocess.Popen[str]) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=TIMEOUT)
    return proc.returncode, out


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return checkpoint.load(run_dir)["model"]


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


@pytest.fixture(scope="module", params=["ddp", "fsdp"])
def strategy(request: pytest.FixtureRequest) -> str:
    return f"trainer.strategy={request.param}"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory, strategy: str) -> Path:
    tmp = tmp_path_factory.mktemp("uninterrupted")
    rc, out = finish(start(tmp, "ref", strategy))
    assert rc == 0, out
    return tmp / "runs" / "ref"


def test_preempted_run_requeues_and_ends_with_the_same_weights(tmp_path: Path, uninterrupted: Path,
                                                               strategy: str) -> None:
    run_dir = tmp_path / "runs" / "job"
    proc = start(tmp_path, "job", strategy)
    wait_for_step(run_dir / "train.log", 5, proc)
    proc.send_signal(signal.SIGUSR2)  # to the launcher only: it forwards to its workers
    rc, out = finish(proc)
    assert rc == 3, out  # preempted: the documented exit code that asks for a requeue
    assert (run_dir / "PREEMPTED").is_file()
    saved = checkpoint.load(run_dir)["progress"]
    assert 0 < saved["step"] < 66 and saved["step"] % 2 == 0  # at an agreed step boundary
    assert_no_process_left(str(tmp_path))

    rc, out = finish(start(tmp_path, "job", strategy))  # the requeued job: same run id, resume=auto
    assert rc == 0, out
    entry = run_dir / "checkpoints" / f"step-{saved['step']:08d}" / "state.pt"
    assert f"resumed from {entry}" in (run_dir / "train.log").read_text()
    assert not (run_dir / "PREEMPTED").exists()
    assert [int(r["epoch"]) for r in metrics(run_dir)] == [1, 2, 3]
    assert max_abs_diff(weights(run_dir), weights(uninterrupted)) <= 1e-6
    assert digests(run_dir) == digests(uninterrupted)


def test_killed_worker_is_restarted_and_resumes(tmp_path: Path, uninterrupted: Path, strategy: str) -> None:
    run_dir = tmp_path / "runs" / "job"
    proc = start(tmp_path, "job", strategy, "dist.max_restarts=1", "trainer.save_every_steps=5")
    wait_for_step(run_dir / "train.log", 12, proc)
    rank1 = (run_dir / "logs" / "rank1.log").read_text()
    pid = int(rank1.split(" pid ")[1].split(")")[0])
    os.kill(pid, signal.SIGKILL)
    rc, out = finish(proc)
    assert rc == 0, out
    logs = (run_dir / "logs" / "rank1.log").read_text()
    assert "resumed from" in logs and " step 10 " in logs.split("resumed from")[1].splitlines()[0]
    assert [int(r["epoch"]) for r in metrics(run_dir)] == [1, 2, 3]
    assert max_abs_diff(weights(run_dir), weights(uninterrupted)) <= 1e-6
    assert_no_process_left(str(tmp_path))


def test_sigterm_saves_and_does_not_ask_for_requeue(tmp_path: Path) -> None:
    env = clean_env(HARNESS_RUN_ID="job", HARNESS_CACHE=str(tmp_path / "cache"))
    proc = subprocess.Popen(harness_cmd("trainer.epochs=3", "trainer.log_every=1", "trainer.check_every=2",
                                        f"run_root={tmp_path}/runs"), cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    run_dir = tmp_path / "runs" / "job"
    wait_for_step(run_dir / "train.log", 5, proc)
    proc.send_signal(signal.SIGTERM)
    rc, out = finish(proc)
    assert rc == 143, out
    assert not (run_dir / "PREEMPTED").exists()
    assert checkpoint.load(run_dir)["progress"]["step"] >= 5
    assert "terminated: saved" in out and "not requeued" in out


def test_sigterm_to_the_multi_process_launcher_saves_and_exits_143(tmp_path: Path) -> None:
    """The agent passes SIGTERM on to its workers and waits for them: every rank stops at one step,
    rank 0 saves, the launcher exits 143 with one line naming the checkpoint; nothing is left."""
    run_dir = tmp_path / "runs" / "job"
    proc = start(tmp_path, "job")
    wait_for_step(run_dir / "train.log", 5, proc)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)  # the launcher only, as `kill <pid>` does
    rc, out = finish(proc)
    assert rc == 143, out
    saved = checkpoint.load(run_dir)["progress"]["step"]
    assert saved >= 5 and saved % 2 == 0, saved  # at an agreed step boundary (check_every=2)
    assert f"stopped by SIGTERM: last checkpoint {run_dir / 'checkpoints'}/step-{saved:08d};" in out, out
    assert "terminated: saved" in out and "Traceback" not in out and not (run_dir / "PREEMPTED").exists()
    for rank in (0, 1):
        assert f"terminated: saved at epoch 1 step {saved}" in (run_dir / "logs" / f"rank{rank}.log").read_text()
    print(f"\n[resilience] SIGTERM to the 2-rank launcher: exit 143 after {time.monotonic() - sent:.1f}s")
    assert_no_process_left(str(tmp_path))


def test_sigterm_to_torchrun_workers_save_and_exit_143(tmp_path: Path) -> None:
    """torchrun passes SIGTERM on; the workers save and exit 143; torchrun itself raises the agent's
    SignalException (a traceback) and exits 1, as the README says."""
    env = clean_env(HARNESS_CACHE=str(tmp_path / "cache"), PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    args = ["-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "harness.train", *JOB,
            f"run_root={tmp_path}/runs"]
    proc = subprocess.Popen([sys.executable, *args], cwd=tmp_path, env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    deadline = time.monotonic() + TIMEOUT
    while not (logs := list((tmp_path / "runs").glob("*/train.log"))) or " step 5 " not in logs[0].read_text():
        assert proc.poll() is None and time.monotonic() < deadline, "torchrun ended before step 5"
        time.sleep(0.02)
    run_dir = logs[0].parent
    proc.send_signal(signal.SIGTERM)
    rc, out = finish(proc)
    assert rc == 1 and "SignalException: Process" in out and "got signal: 15" in out, out
    saved = checkpoint.load(run_dir)["progress"]["step"]
    for rank in (0, 1):  # each worker saved and said so (torchrun does not print their exit codes: 143)
        assert f"terminated: saved at epoch 1 step {saved}" in (run_dir / "logs" / f"rank{rank}.log").read_text()
    assert_no_process_left(str(tmp_path))


def test_dist_timeout_ends_a_collective_that_never_completes(tmp_path: Path) -> None:
    """Rank 1 blocks for ever reading its dataset, alive and beating, and the watchdog only reports
    stalls (dist.on_stall=report, after 300 s): rank 0's all-reduce ends after dist.timeout, as the
    process group's bound on any collective, and then every process leaves with that error."""
    run_dir = tmp_path / "runs" / "job"
    started = time.monotonic()
    proc = start(tmp_path, "job", "data.dataset._target_=tests.liveness.parts.HazardDigits",
                 "+data.dataset.rank=1", "+data.dataset.block_after=320", "dist.timeout=5")
    rc, out = finish(proc)
    assert rc == 1, out
    assert re.search(r"error: worker\(s\) failed: rank 0 \(pid \d+ on \S+\) failed at step 9 in \w+: "
                     r"RuntimeError: .*(timeout|Timed out waiting 5000ms)", out), out  # gloo says it either way
    assert " step 10 " not in (run_dir / "train.log").read_text()  # rank 1 never finished its step 10
    print(f"\n[resilience] dist.timeout=5: the whole run, start to exit, {time.monotonic() - started:.1f}s")
    assert_no_process_left(str(tmp_path))
