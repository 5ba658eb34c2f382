"""harness.rundir: the run directory, and the check that every rank sees the same one.

The pieces of the check without processes here; all ranks refusing together, with real processes, in
tests/multinode/test_hosts.py (a node-local run directory on emulated hosts) and below (two torchrun
agents on this machine given different run roots, which is the same thing as far as the ranks see).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness import rundir
from tests.conftest import clean_env
from tests.runs import assert_no_process_left


def test_a_rank_sees_the_mark_of_this_start_only(tmp_path: Path) -> None:
    old = rundir.mark_shared(tmp_path, "aaaa", "node1")
    assert old.read_text() == f"node1\n{tmp_path}\n"
    new = rundir.mark_shared(tmp_path, "bbbb", "node1")  # a restart: the old mark goes
    assert not old.exists() and new.name == ".shared-bbbb"
    assert rundir.sees_mark(tmp_path, "bbbb", wait_s=0)
    t0 = time.monotonic()
    assert not rundir.sees_mark(tmp_path, "aaaa", wait_s=0.2)  # a stale start's nonce is not this one
    assert time.monotonic() - t0 >= 0.2
    assert not rundir.sees_mark(tmp_path / "elsewhere", "bbbb", wait_s=0)


def test_the_error_names_the_hosts_and_paths_of_the_ranks_that_do_not_see_it() -> None:
    views = [("node1", "/shared/runs/x", True), ("node1", "/shared/runs/x", True),
             ("node2", "/local/runs/x", False), ("node2", "/local/runs/x", False)]
    assert rundir.unshared_error(views[:2], "ab") is None
    error = rundir.unshared_error(views, "ab")
    assert error is not None
    assert error.startswith("the run directory is not shared: rank 0 on node1 wrote /shared/runs/x/.shared-ab, "
                            "and 2 of 4 ranks do not see it in their run directory: "
                            "rank 2 on node2 (/local/runs/x); rank 3 on node2 (/local/runs/x). ")
    assert "put run_root on a file system every node mounts" in error
    many = rundir.unshared_error([("a", "/r", True)] + [("b", "/l", False)] * 20, "ab")
    assert many is not None and "rank 8 on b" in many and "rank 9 on" not in many and "and 12 more" in many


def test_without_a_process_group_the_check_does_nothing(tmp_path: Path) -> None:
    rundir.check_shared(tmp_path, 0)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_ranks_with_different_run_roots_refuse_before_training(tmp_path: Path, cache_dir: Path) -> None:
    """Two torchrun agents on this machine, each given its own run_root: every rank exits 2 with the
    error, before any training, and nothing is left running."""
    from tests.test_zero_first import free_port

    endpoint = f"127.0.0.1:{free_port()}"
    procs = []
    for node in ("a", "b"):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
               "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", "--rdzv-id=unshared", "-m", "harness.train",
               "device=cpu", "model=mlp", f"run_root={tmp_path / node / 'runs'}"]
        procs.append(subprocess.Popen(cmd, cwd=tmp_path, env=clean_env(OMP_NUM_THREADS="1"), text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    outs = [p.communicate(timeout=100)[0] for p in procs]
    assert [p.returncode for p in procs] == [1, 1], outs  # torchrun's code for failed workers (they exit 2)
    # An agent whose rendezvous host has already left may crash (RendezvousConnectionError) and take its
    # worker with it before that worker prints: torchrun's own race. At least one side prints the error.
    errors = [next((line for line in out.splitlines() if line.startswith("error: ")), None) for out in outs]
    assert any(errors), outs
    for out, error in zip(outs, errors, strict=True):
        if error is None:
            assert "RendezvousConnectionError" in out, out
            continue
        # which agent's worker becomes rank 0 is the rendezvous's choice: the other one is the rank that is blind
        zero = "a" if f"wrote {tmp_path / 'a' / 'runs' / 'elastic-unshared'}/.shared-" in error else "b"
        other = {"a": "b", "b": "a"}[zero]
        assert error.startswith("error: the run directory is not shared: rank 0 on "), error
        assert "1 of 2 ranks do not see it in their run directory: rank 1 on " in error, error
        assert f"({tmp_path / other / 'runs' / 'elastic-unshared'})." in error, error
        assert "exitcode  : 2" in out, out
    for node in ("a", "b"):
        run_dir = tmp_path / node / "runs" / "elastic-unshared"
        assert run_dir.is_dir() and not (run_dir / "metrics.csv").exists() and not (run_dir / "checkpoints").exists()
    assert_no_process_left(str(tmp_path))


@pytest.mark.slow
def test_workers_whose_agents_counted_restarts_differently_still_start_together(tmp_path: Path,
                                                                                cache_dir: Path) -> None:
    """A torchrun agent restarts its workers for a membership change without counting it: after a lost
    node, one agent's workers may start with TORCHELASTIC_RESTART_COUNT=1 (its worker failed) and the
    other's with 0 (it saw the first one waiting). Both ranks of that new group must still agree on the
    run directory (tests/multinode/test_lost_node.py is where it happened)."""
    from tests.test_zero_first import free_port

    port = str(free_port())
    procs = []
    for rank in (0, 1):
        env = clean_env(OMP_NUM_THREADS="1", RANK=str(rank), LOCAL_RANK="0", WORLD_SIZE="2", LOCAL_WORLD_SIZE="1",
                        GROUP_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=port, TORCHELASTIC_RUN_ID="mixed",
                        TORCHELASTIC_RESTART_COUNT=str(1 - rank))
        cmd = [sys.executable, "-m", "harness.train", "device=cpu", "model=mlp", "trainer.epochs=1", "dist.timeout=30",
               f"run_root={tmp_path / 'runs'}"]
        procs.append(subprocess.Popen(cmd, cwd=tmp_path, env=env, text=True, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT))
    outs = [p.communicate(timeout=100)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert "epoch 1/1" in (tmp_path / "runs" / "elastic-mixed" / "train.log").read_text()
    assert_no_process_left(str(tmp_path))
