"""The batch scripts on a real 2-node Slurm cluster (scripts/slurm/lab.sh: one slurmd per emulated
host, real sockets between them): both shapes across two nodes train like one node with the same
number of ranks (issue 14 a), and an array of 2 tasks x 2 nodes runs side by side (d). Preemption and a
lost node: test_nodes_faults.py.

Each test asserts from the job's own output (its log, its rank logs) that its ranks ran on two
distinct hosts. `pytest -s` prints the timings.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.runs import digests, epochs
from tests.slurm.lab import Cluster, attempts, cache_fills, rank_starts

pytestmark = [pytest.mark.multinode, pytest.mark.slow, pytest.mark.timeout(400)]
JOB = ("model=mlp", "trainer.epochs=1", "dist.backend=gloo")  # global batch 64: 16 on each of 4 ranks
DIGITS = Path("0f03c9de50199cd2") / "digits.npz"  # the default dataset's cache entry
TIMEOUT = 300  # the four jobs of test a take turns on 2 nodes x 4 CPUs, on 2 real cores


def check_on_nodes(cluster: Cluster, run_dir: Path, log: str, nodes: list[str], per_node: int, cache: str) -> None:
    """One attempt; its ranks `per_node` to a node on exactly `nodes`; rank 0 on the job's first node
    (where the batch script ran); each node's cache (this job's own subdirectory) filled once, by that
    node's local rank 0."""
    [attempt] = attempts(log)
    assert attempt.nodes == nodes and attempt.batch_host == nodes[0], attempt
    starts = rank_starts(run_dir)
    world = len(nodes) * per_node
    assert sorted(r for r, *_ in starts) == list(range(world)) and {w for _, w, *_ in starts} == {world}, starts
    assert sorted(h for *_, h, _ in starts) == sorted(nodes * per_node), starts
    assert [h for r, *_, h, _ in starts if r == 0] == [nodes[0]], starts
    fills = cache_fills(run_dir)
    assert fills == {n: [0] for n in nodes}, fills
    for n in nodes:  # the files are in the node's own directory, under the job's cache path
        assert (cluster.local_dir(n) / cache / DIGITS).is_file(), n


def test_a_both_shapes_on_two_nodes_end_like_one_node(slurm_lab: Cluster, tmp_path: Path) -> None:
    """4 ranks: 2 nodes x 2 tasks (srun), 2 nodes x 1 agent x 2 workers (srun torchrun); the same on
    one node (4 tasks; 1 agent x 4 workers). All four end with the same weights."""
    cluster, t0 = slurm_lab, time.monotonic()
    runs = {  # shape -> (sbatch options, script, environment)
        "srun-2": (("--nodes=2",), "cpu-srun.sbatch", {}),
        "torchrun-2": (("--nodes=2",), "cpu-torchrun.sbatch", {"NPROC_PER_NODE": "2"}),
        "srun-1": (("--nodes=1", "--ntasks-per-node=4"), "cpu-srun.sbatch", {}),
        "torchrun-1": (("--nodes=1",), "cpu-torchrun.sbatch", {"NPROC_PER_NODE": "4"}),
    }
    jobs = {}
    for shape, (sbatch, script, env) in runs.items():
        # its own cache path (node-local on each host): every job prepares its caches itself
        jobs[shape] = cluster.submit(script, *JOB, cwd=tmp_path / shape, tag=shape, sbatch=sbatch,
                                     HARNESS_CACHE=str(cluster.cache / shape), **env)
    deadline = time.monotonic() + TIMEOUT
    codes = {shape: cluster.wait(job, deadline) for shape, job in jobs.items()}
    took = time.monotonic() - t0
    assert codes == dict.fromkeys(runs, 0), {s: jobs[s].log[-3000:] for s, c in codes.items() if c}

    run_dirs = {}
    for shape, job in jobs.items():
        [attempt] = attempts(job.log)
        run_dirs[shape] = job.cwd / attempt.run_dir
        mode = "slurm" if shape.startswith("srun") else "torchrun"
        assert f"({mode}, world size 4, backend gloo)" in (run_dirs[shape] / "train.log").read_text()
        assert epochs(run_dirs[shape]) == [1]
    for shape, job in jobs.items():
        nodes = ["node1", "node2"] if shape.endswith("-2") else attempts(job.log)[0].nodes
        check_on_nodes(cluster, run_dirs[shape], job.log, nodes, 4 // len(nodes), shape)
    assert list(cluster.cache.iterdir()) == []  # the machine's own view of the cache path: untouched

    d = {shape: digests(run_dir) for shape, run_dir in run_dirs.items()}
    assert all(set(v) == {0, 1, 2, 3} and len(set(v.values())) == 1 for v in d.values()), d
    assert len({v[0] for v in d.values()}) == 1, d  # two nodes end like one
    print(f"\n[slurm lab] a: 4 jobs (2 nodes and 1 node, both shapes, 4 ranks each) submitted -> all "
          f"finished with the same weights in {took:.1f}s")


def test_d_an_array_of_two_tasks_on_two_nodes_each_runs_side_by_side(slurm_lab: Cluster, tmp_path: Path) -> None:
    """Both tasks at once on the same 2 nodes (1 CPU of 4 on each): each its own run directory and port."""
    cluster, t0 = slurm_lab, time.monotonic()
    job = cluster.submit("cpu-srun.sbatch", *JOB, cwd=tmp_path, tag="array",
                         sbatch=("--array=0-1", "--nodes=2", "--ntasks-per-node=1"))
    deadline = time.monotonic() + TIMEOUT
    most = 0  # the most array tasks running at once, as squeue saw them
    while job.proc.poll() is None and time.monotonic() < deadline:
        states = cluster.cmd("squeue", "-h", f"--name={job.name}", "-o", "%T").stdout.split()
        most = max(most, states.count("RUNNING"))
        time.sleep(0.5)
    assert cluster.wait(job, deadline) == 0, [p.read_text()[-3000:] for p in tmp_path.glob(f"{job.name}-*.out")]
    took = time.monotonic() - t0
    assert most == 2, "the two array tasks never ran at the same time: nothing shows they do not collide"

    logs = {i: (tmp_path / f"{job.name}-{i}.out").read_text() for i in (0, 1)}
    seen = {i: attempts(log) for i, log in logs.items()}
    assert all(len(a) == 1 for a in seen.values()), logs
    (a0,), (a1,) = seen[0], seen[1]
    assert a0.job != a1.job and a0.port != a1.port, (a0, a1)  # each task its own job id, so its own port
    array_job = cluster.job_id(job)  # what sbatch printed: the array's id
    assert {a0.run_dir, a1.run_dir} == {f"runs/slurm-{array_job}_0", f"runs/slurm-{array_job}_1"}, (a0, a1)
    for a in (a0, a1):
        run_dir = tmp_path / a.run_dir
        assert a.nodes == ["node1", "node2"]
        starts = rank_starts(run_dir)
        assert sorted((r, h) for r, _, _, h, _ in starts) == [(0, "node1"), (1, "node2")], starts
        assert epochs(run_dir) == [1]
        d = digests(run_dir)
        assert set(d) == {0, 1} and d[0] == d[1], d
    assert digests(tmp_path / a0.run_dir) == digests(tmp_path / a1.run_dir)  # the same job, twice
    print(f"\n[slurm lab] d: array 2 tasks x 2 nodes (ports {a0.port}, {a1.port}), both running at once -> "
          f"both finished in {took:.1f}s")
