"""Environment readers (pure): torchrun, Slurm job steps, the batch shell, hostlists, run ids."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.env import EnvError, detect, expand_tasks_per_node, parse_hostlist, run_id

VECTORS = Path(__file__).resolve().parents[2] / "shared" / "slurm" / "hostlist-vectors.json"
LOCAL_VECTORS = Path(__file__).resolve().parent / "data_files" / "hostlist-vectors.json"


def _vectors() -> list[dict]:
    path = VECTORS if VECTORS.is_file() else LOCAL_VECTORS
    return json.loads(path.read_text())["cases"]


@pytest.mark.parametrize("case", _vectors(), ids=lambda c: c["hostlist"])
def test_hostlist_matches_real_scontrol(case: dict) -> None:
    assert parse_hostlist(case["hostlist"]) == case["hosts"]


@pytest.mark.parametrize("bad", ["n[1-", "n]1[", "n[a-b]", "n[3-1]"])
def test_bad_hostlists(bad: str) -> None:
    with pytest.raises(EnvError, match="hostlist"):
        parse_hostlist(bad)


def test_tasks_per_node() -> None:
    assert expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert expand_tasks_per_node("8") == [8]
    with pytest.raises(EnvError):
        expand_tasks_per_node("2(x)")


def test_plain_shell_is_launcher() -> None:
    assert detect({}).mode == "launcher"


def test_torchrun_worker() -> None:
    env = detect({"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4", "GROUP_RANK": "1",
                  "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500", "TORCHELASTIC_RUN_ID": "abc",
                  "TORCHELASTIC_RESTART_COUNT": "2"})
    assert (env.mode, env.rank, env.local_rank, env.world_size, env.local_world_size, env.node_rank, env.nnodes,
            env.master_addr, env.master_port, env.restart_count) == (
        "torchrun", 5, 1, 8, 4, 1, 2, "10.0.0.1", 29500, 2)


def test_torchrun_wins_over_slurm() -> None:
    env = detect({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "SLURM_STEP_ID": "0", "SLURM_PROCID": "0",
                  "SLURM_NTASKS": "1"})
    assert env.mode == "torchrun"


def _slurm(**kv: str) -> dict[str, str]:
    base = {"SLURM_JOB_ID": "12345", "SLURM_STEP_ID": "0", "SLURM_JOB_NODELIST": "vm", "SLURM_NNODES": "1"}
    base.update(kv)
    return base


def test_slurm_one_node_two_tasks() -> None:
    env = detect(_slurm(SLURM_PROCID="1", SLURM_LOCALID="1", SLURM_NTASKS="2", SLURM_NODEID="0",
                        SLURM_TASKS_PER_NODE="2"))
    assert (env.mode, env.rank, env.local_rank, env.world_size, env.local_world_size, env.node_rank,
            env.master_addr, env.master_port) == ("slurm", 1, 1, 2, 2, 0, "vm", 15000 + 12345 % 20000)


def test_slurm_four_nodes_eight_tasks_each() -> None:
    env = detect(_slurm(SLURM_PROCID="27", SLURM_LOCALID="3", SLURM_NTASKS="32", SLURM_NODEID="3",
                        SLURM_NNODES="4", SLURM_JOB_NODELIST="gpu[07-09,11]", SLURM_TASKS_PER_NODE="8(x4)",
                        SLURM_JOB_ID="987654"))
    assert (env.rank, env.local_rank, env.world_size, env.local_world_size, env.node_rank, env.nnodes,
            env.master_addr, env.master_port) == (27, 3, 32, 8, 3, 4, "gpu07", 15000 + 987654 % 20000)


def test_slurm_step_nodelist_preferred_and_master_port_override() -> None:
    env = detect(_slurm(SLURM_PROCID="0", SLURM_NTASKS="4", SLURM_JOB_NODELIST="n[1-4]",
                        SLURM_STEP_NODELIST="n[3-4]", MASTER_PORT="29999"))
    assert (env.master_addr, env.master_port) == ("n3", 29999)


def test_batch_shell_is_not_a_worker() -> None:
    # the sbatch shell has SLURM_NTASKS and SLURM_PROCID=0 but no SLURM_STEP_ID
    env = detect({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2", "SLURM_PROCID": "0", "SLURM_JOB_NODELIST": "vm"})
    assert env.mode == "launcher"


def test_one_task_step_starts_its_own_workers() -> None:
    assert detect(_slurm(SLURM_PROCID="0", SLURM_NTASKS="1")).mode == "launcher"


def test_requeued_launcher_knows_restart_count() -> None:
    assert detect({"SLURM_JOB_ID": "7", "SLURM_RESTART_COUNT": "2"}).restart_count == 2


def test_inconsistent_torchrun_env() -> None:
    with pytest.raises(EnvError, match="RANK=4 is outside WORLD_SIZE=2"):
        detect({"RANK": "4", "LOCAL_RANK": "0", "WORLD_SIZE": "2"})
    with pytest.raises(EnvError, match="not an integer"):
        detect({"RANK": "x", "LOCAL_RANK": "0", "WORLD_SIZE": "2"})


def test_run_id_rule() -> None:
    assert run_id({}) is None
    assert run_id({"TORCHELASTIC_RUN_ID": "none"}) is None
    assert run_id({"TORCHELASTIC_RUN_ID": "exp1"}) == "elastic-exp1"
    assert run_id({"SLURM_JOB_ID": "42", "TORCHELASTIC_RUN_ID": "exp1"}) == "slurm-42"
    assert run_id({"SLURM_JOB_ID": "43", "SLURM_ARRAY_JOB_ID": "3", "SLURM_ARRAY_TASK_ID": "1"}) == "slurm-3_1"
    assert run_id({"SLURM_JOB_ID": "42"}, job_num=2) == "slurm-42-2"
    assert run_id({"HARNESS_RUN_ID": "mine", "SLURM_JOB_ID": "42"}) == "mine"
