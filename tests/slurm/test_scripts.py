"""The batch scripts themselves, without a cluster: they parse, they share one common part (a few
lines; the rest is harness/slurm.py, run here as the scripts run it), and each one asks for requeue
and the preemption signal."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from harness import incidents
from harness.health import Verdict
from harness.slurm import decide, in_sweep_job, job_spec
from tests.conftest import REPO, clean_env
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


# The scripts' shared code (harness/slurm.py), run as the scripts run it, without a cluster.
JOB_ENV = {"SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "node[3-4]", "SLURM_RESTART_COUNT": "2"}


def prelude(cwd: Path, *overrides: str, **env: str) -> subprocess.CompletedProcess[str]:
    """The script's two lines: the prelude's output eval'd by bash, then what the step would see."""
    script = ('prelude=$("$PYTHON" -m harness.slurm prelude "$@") || exit; eval "$prelude"; '
              'echo "vars $RUN_DIR $FIRST_NODE $PORT"; bash -c \'echo "exported $FIRST_NODE $PORT"\'')
    return subprocess.run(["bash", "-c", script, "prelude", *overrides], cwd=cwd, capture_output=True, text=True,
                          env=clean_env(PYTHON=sys.executable, PYTHONPATH=str(REPO), **{**JOB_ENV, **env}),
                          timeout=60)


def test_the_prelude_sets_what_the_step_needs_and_clears_the_last_attempts_marker(tmp_path: Path) -> None:
    (tmp_path / "r" / "slurm-7").mkdir(parents=True)
    (tmp_path / "r" / "slurm-7" / "PREEMPTED").write_text("epoch 1 step 40\n")
    proc = prelude(tmp_path, "model=mlp", "run_root=r")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert re.fullmatch(r"harness: job 7 attempt 3 on node\[3-4\] \(batch host \S+, port 15007\); "
                        r"run directory r/slurm-7", lines[0]), lines
    assert lines[1:] == ["vars r/slurm-7 node3 15007", "exported node3 15007"]
    assert not (tmp_path / "r" / "slurm-7" / "PREEMPTED").exists()


@pytest.mark.parametrize(("overrides", "env", "words"), [
    (("trainer.foo=1",), {}, "Key 'foo' not in 'TrainerConfig'"),  # Hydra's words, from compose
    (("trainer.epochs=0",), {}, "trainer.epochs=0 must be >= 1"),  # the schema's checks, before any srun
    ((), {"HARNESS_MAX_REQUEUES": "lots"}, "HARNESS_MAX_REQUEUES='lots' is not a whole number >= 0"),
])
def test_the_prelude_ends_the_script_with_exit_2_on_a_bad_config(
        tmp_path: Path, overrides: tuple[str, ...], env: dict[str, str], words: str) -> None:
    proc = prelude(tmp_path, *overrides, **env)
    assert proc.returncode == 2 and proc.stdout == "", (proc.stdout, proc.stderr)
    assert proc.stderr.startswith("error: ") and words in proc.stderr, proc.stderr
    assert not (tmp_path / "runs").exists()


def test_what_requeues_and_with_which_exit_code() -> None:
    assert decide(0, terminated=False, preempted=True, lost="") == ("preempted", 3)
    assert decide(4, terminated=False, preempted=False, lost="rank 1 lost") == ("a peer was lost", 4)
    assert decide(0, terminated=False, preempted=False, lost="") is None  # finished
    assert decide(2, terminated=False, preempted=False, lost="") is None  # a rank raised: it would again
    assert decide(143, terminated=True, preempted=True, lost="rank 1 lost") is None  # SIGTERM: never


def test_which_job_scontrol_is_told_to_requeue() -> None:
    assert job_spec({"SLURM_JOB_ID": "7"}) == "7"
    assert job_spec({"SLURM_JOB_ID": "3", "SLURM_ARRAY_JOB_ID": "3", "SLURM_ARRAY_TASK_ID": "1"}) == "3_1"
    assert in_sweep_job({"SLURM_JOB_ID": "3", "SUBMITIT_EXECUTOR": "slurm"})
    assert not in_sweep_job({"SLURM_JOB_ID": "3"}) and not in_sweep_job({"SUBMITIT_EXECUTOR": "slurm"})


def epilogue(run_dir: Path, rc: int, since: float, **env: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "harness.slurm", "epilogue", "--rc", str(rc), "--run-dir", str(run_dir),
            "--since", str(since)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60,
                          env=clean_env(PYTHONPATH=str(REPO), **{**JOB_ENV, **env}))


def _incident(run_dir: Path, kind: str, at: float) -> None:
    subject = {"rank": 1, "pid": 42, "host": "node4", "step": 26, "phase": "backward"}
    incidents.append(run_dir, Verdict(kind, subject, 4.8, "no heartbeat for 4.8 s", 0, "a1", time=at))


def test_the_epilogue_refuses_a_requeue_beyond_harness_max_requeues(tmp_path: Path) -> None:
    """Requeued twice already (SLURM_RESTART_COUNT=2), at most 2 allowed: exit 3, one line why, no
    scontrol (none is reachable here: a requeue attempt would print that Slurm refused)."""
    (tmp_path / "PREEMPTED").write_text("epoch 3 step 12\n")
    proc = epilogue(tmp_path, 0, 0.0, HARNESS_MAX_REQUEUES="2")
    assert proc.returncode == 3, proc.stderr
    assert proc.stderr.strip() == (f"harness: preempted after 2 requeues already (HARNESS_MAX_REQUEUES=2); not "
                                   f"requeueing; resume it with trainer.resume={tmp_path}"), proc.stderr
    assert "requeueing job" not in proc.stdout and "Slurm refused" not in proc.stderr


def test_the_epilogue_requeues_only_for_this_attempts_losses(tmp_path: Path) -> None:
    """A loss before this attempt began, or a rank's own failure, leaves the step's exit code alone."""
    _incident(tmp_path, "dead", at=100.0)
    _incident(tmp_path, "failed", at=300.0)
    proc = epilogue(tmp_path, 1, 200.0, HARNESS_MAX_REQUEUES="0")
    assert (proc.returncode, proc.stdout, proc.stderr) == (1, "", "")
    _incident(tmp_path, "dead", at=400.0)
    proc = epilogue(tmp_path, 1, 200.0, HARNESS_MAX_REQUEUES="0")
    assert proc.returncode == 4, proc.stderr
    assert proc.stdout == "harness: a peer was lost: rank 1 (pid 42 on node4) lost at step 26 in backward: " \
                          "no heartbeat for 4.8 s\n", proc.stdout
    assert "a peer was lost after 0 requeues already" in proc.stderr
