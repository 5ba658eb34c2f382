"""harness/errors.py: one wrapper turns a user error into one `error:` line and exit 2, and Ctrl-C
into one line and exit 130, in every entry point and on every rank; real processes, outputs in files."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from hydra.errors import InstantiationException

from harness import errors, failures
from harness.checkpoint.format import CheckpointError
from harness.data.cache import SourceError
from harness.health import Identity, Verdict
from tests.conftest import REPO, clean_env, harness_cmd
from tests.runs import assert_no_process_left, metrics

TIMEOUT = 240


def test_what_crosses_the_store_is_recognised_as_a_user_error() -> None:
    assert failures.is_user_error(SourceError("x")) and not failures.is_user_error(ValueError("x"))
    assert failures.names_user_error("SourceError: data.url='file:///x': no such file")  # a verdict's cause
    assert failures.names_user_error("error: harness.checkpoint.format.CheckpointError: bad")  # zero_first's
    assert not failures.names_user_error("ValueError: SourceError: in the message only")
    assert not failures.is_user_error(InstantiationException("a bug in the user's constructor"))  # traceback
    assert errors.message(CheckpointError("no checkpoint")) == "error: no checkpoint"


def test_a_failed_verdict_carries_the_kind_to_the_peers() -> None:
    """A peer's user error makes the others leave with 2, a peer's Ctrl-C with 130, anything else 4;
    the kind survives the store (JSON)."""
    me = Identity(1, "nodeb", 4242, 0.0)
    cases = [(SourceError("bad url"), 2, "SourceError: bad url"), (KeyboardInterrupt(), 130, "interrupted (SIGINT)"),
             (ValueError("a bug"), 4, "ValueError: a bug"), (InstantiationException("a bug"), 4, "Instantiation")]
    for exc, code, cause in cases:
        verdict = Verdict.from_json(failures.failed(exc, me, 60, "forward", "a1", 0.0).to_json())
        assert failures.exit_code(verdict) == code and verdict.cause.startswith(cause), verdict
        assert verdict.line().startswith("rank 1 (pid 4242 on nodeb) failed at step 60 in forward: ")
        assert failures.report(verdict)[0] == (logging.INFO if code == 130 else logging.ERROR)


def test_entry_point_returns_the_code_and_says_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    @errors.entry_point(also=(FileNotFoundError,))
    def main(kind: str) -> int:
        raise {"user": SourceError("bad url"), "own": FileNotFoundError("no such run"),
               "ctrl-c": KeyboardInterrupt()}[kind]

    assert main("user") == 2 and capsys.readouterr().err == "error: bad url\n"
    assert main("own") == 2 and capsys.readouterr().err == "error: no such run\n"
    assert main("ctrl-c") == 130 and capsys.readouterr().err == "interrupted\n"


@pytest.mark.slow
@pytest.mark.parametrize("override", ["trainer.foo=1", "trainer.epochs=abc", "model=no_such_model"])
def test_a_composition_error_in_launcher_mode_exits_2(tmp_path: Path, override: str) -> None:
    """Hydra says it in its own words (no traceback) and would exit 1: a user error is 2 in every mode."""
    rc, out, err = _run(tmp_path, override)
    assert rc == 2 and "Traceback" not in err and override.split("=")[0].split(".")[-1] in err, err
    assert not (tmp_path / "runs").exists()


def _run(tmp: Path, *args: str) -> tuple[int, str, str]:
    out, err = tmp / "stdout.txt", tmp / "stderr.txt"
    with open(out, "w") as o, open(err, "w") as e:
        proc = subprocess.run(harness_cmd(*args), cwd=tmp, stdout=o, stderr=e, timeout=TIMEOUT,
                              env=clean_env(PYTHONPATH=str(REPO), HARNESS_CACHE=str(tmp / "cache")))
    return proc.returncode, out.read_text(), err.read_text()


@pytest.mark.slow
@pytest.mark.parametrize("watchdog", ["true", "false"])
def test_bad_url_under_two_ranks_is_one_error_line_and_exit_2(tmp_path: Path, watchdog: str) -> None:
    """Rank 0 fails inside zero_first; rank 1, waiting for it, says so in one line (its watchdog's
    report; without one, zero_first's error): no traceback, no 'worker(s) failed' summary, no agent
    lines, exit 2 from the launcher and from both workers."""
    started = time.monotonic()
    rc, out, err = _run(tmp_path, "device=cpu", "dist.nproc=2", "data.url=file:///nonexistent/x.npz",
                        f"dist.watchdog={watchdog}", f"run_root={tmp_path}/runs")
    both = out + err
    assert rc == 2, both
    assert [line for line in both.splitlines() if line.startswith("error:")] == \
        ["error: data.url='file:///nonexistent/x.npz': no such file /nonexistent/x.npz"], both
    said = "[rank 1] ERROR rank 0 (pid" if watchdog == "true" else "stopped: rank 0 (preparing 'data') failed: "
    rank1 = [line for line in both.splitlines() if line.startswith(said)]
    assert len(rank1) == 1 and "SourceError: data.url=" in rank1[0], both
    assert not [line for line in both.splitlines() if line.startswith("[rank 1]") and line not in rank1], both
    assert "Traceback" not in both and "worker(s) failed" not in both and "exitcode" not in both, both
    print(f"\n[errors] bad data.url, 2 ranks, dist.watchdog={watchdog}: exit 2 after {time.monotonic() - started:.1f}s")
    assert_no_process_left(str(tmp_path))


@pytest.mark.slow
def test_bad_checkpoint_choice_every_rank_one_line(tmp_path: Path) -> None:
    """trainer.resume names no checkpoint: rank 0 decides, every rank hears it through the broadcast,
    each says it in one line (no traceback), and the launcher exits 2."""
    rc, out, err = _run(tmp_path, "device=cpu", "dist.nproc=2", f"trainer.resume={tmp_path}/none.pt",
                        f"run_root={tmp_path}/runs")
    both = out + err
    assert rc == 2, both
    lines = [line for line in both.splitlines() if line.startswith("error:")]
    assert lines and all("no such checkpoint" in line for line in lines), both
    assert "Traceback" not in both and "worker(s) failed" not in both, both


def _start(tmp: Path, run_id: str, epochs: int) -> tuple[subprocess.Popen[bytes], Path, Path]:
    out, err = tmp / f"{run_id}.out", tmp / f"{run_id}.err"
    env = clean_env(HARNESS_RUN_ID=run_id, HARNESS_CACHE=str(tmp / "cache"), PYTHONPATH=str(REPO))
    with open(out, "w") as o, open(err, "w") as e:
        proc = subprocess.Popen(harness_cmd("device=cpu", "dist.nproc=2", f"trainer.epochs={epochs}",
                                            f"run_root={tmp}/runs"), cwd=tmp, env=env, stdout=o, stderr=e,
                                start_new_session=True)  # as a terminal's shell starts a job: its own group
    return proc, out, err


def _wait_for_step(log: Path, step: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not (log.is_file() and f" step {step} " in log.read_text()):
        assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before step {step}"
        assert time.monotonic() < deadline, f"no step {step} in {log}"
        time.sleep(0.02)


@pytest.mark.slow
def test_ctrl_c_of_a_two_rank_run_is_one_line_and_a_rerun_resumes(tmp_path: Path) -> None:
    """SIGINT to the launcher's whole process group (what Ctrl-C does; the agent's workers have
    sessions of their own, so it passes the signal on): every rank stops at one step and saves, no
    KeyboardInterrupt traceback, no incident, exit 130; the same run id resumes from that checkpoint."""
    run_dir = tmp_path / "runs" / "job"
    proc, out, err = _start(tmp_path, "job", epochs=6)
    _wait_for_step(run_dir / "train.log", 40, proc)
    sent = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)
    rc = proc.wait(timeout=TIMEOUT)
    took = time.monotonic() - sent
    stdout, stderr = out.read_text(), err.read_text()
    assert rc == 130, stdout + stderr
    assert "Traceback" not in stdout + stderr and "KeyboardInterrupt" not in stdout + stderr, stdout + stderr
    assert "death signal" not in stderr and "closing signal" not in stderr, stderr  # the agent's, restated
    said = [line for line in stderr.splitlines() if line.strip()]
    assert len(said) == 1 and said[0].startswith("interrupted: last checkpoint "), stderr
    entry = Path(said[0].split("last checkpoint ")[1].split(";")[0])
    assert entry.parent == run_dir / "checkpoints" and "HARNESS_RUN_ID=job" in said[0], said
    assert not (run_dir / "incidents.jsonl").exists()  # all ranks interrupted together: no failure
    assert not (run_dir / "PREEMPTED").exists()
    assert_no_process_left(str(tmp_path))
    print(f"\n[errors] Ctrl-C of a 2-rank launcher run: exit 130 after {took:.1f}s, saved {entry.name}")

    proc, out, err = _start(tmp_path, "job", epochs=6)  # the rerun
    assert proc.wait(timeout=TIMEOUT) == 0, out.read_text() + err.read_text()
    assert f"resumed from {entry / 'state.pt'}" in (run_dir / "train.log").read_text()
    assert [int(r["epoch"]) for r in metrics(run_dir)] == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
def test_ctrl_c_before_training_is_one_line_and_quick(tmp_path: Path) -> None:
    """Ctrl-C while the ranks set up (rank 0 fetching in zero_first, rank 1 waiting for it): no
    traceback, no failure incident, exit 130 within a few seconds (a waiter once sat 10 s in fail(),
    its store connection held by zero_first's helper thread, until the watchdog's os._exit)."""
    run_dir = tmp_path / "runs" / "early"
    proc, out, err = _start(tmp_path, "early", epochs=2)
    deadline = time.monotonic() + TIMEOUT
    while not ((run_dir / "train.log").is_file() and "run directory" in (run_dir / "train.log").read_text()):
        assert proc.poll() is None and time.monotonic() < deadline, out.read_text() + err.read_text()
        time.sleep(0.005)
    sent = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)
    rc = proc.wait(timeout=TIMEOUT)
    took = time.monotonic() - sent
    both = out.read_text() + err.read_text()
    assert rc == 130, both
    assert "Traceback" not in both and "KeyboardInterrupt" not in both and "ERROR" not in both, both
    said = [line for line in err.read_text().splitlines() if line.strip()]
    assert len(said) == 1 and said[0].startswith("interrupted: ") and "HARNESS_RUN_ID=early" in said[0], both
    assert not (run_dir / "incidents.jsonl").exists()
    assert took < 9, f"{took:.1f}s"
    print(f"\n[errors] Ctrl-C during set-up: exit 130 after {took:.1f}s")
    assert_no_process_left(str(tmp_path))
