"""A Slurm cluster of 2 nodes on emulated hosts for one test (scripts/slurm/lab.sh), and reading what
its jobs leave behind: for the tests of the multi-node batch scripts (tests/slurm/test_nodes*.py).

The cluster lives under the test's tmp directory: hosts ctld (slurmctld, munged), node1 and node2
(one slurmd each), whose node-local directories are bound over the test's HARNESS_CACHE. The s*
commands run inside host ctld through the wrappers lab.sh writes (`Cluster.cmd`). Jobs are submitted
with `sbatch --wait` from a directory of the shared tmp dir; each job's output goes to a file there.

Tear-down, also when the test fails: `lab.sh stop` cancels the jobs and takes the hosts down with
every process on them; the lab is brought up with `--owner <pytest's pid>`, so a pytest killed
outright leaves no lab behind either.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from harness.env import parse_hostlist
from tests.conftest import REPO, clean_env

LAB_SH = REPO / "scripts" / "slurm" / "lab.sh"
SCRIPTS = REPO / "scripts" / "slurm"
HOSTS_SH = REPO / "scripts" / "hosts.sh"
# "harness: job 7 attempt 1 on node[1-2] (batch host node1, port 15007); run directory runs/slurm-7"
ATTEMPT = re.compile(r"^harness: job (\S+) attempt (\d+) on (\S+) \(batch host (\S+), port (\d+)\); "
                     r"run directory (\S+)$", re.M)
RANK = re.compile(r"rank (\d+)/(\d+) \(local (\d+), host (\S+), pid (\d+)\)")


@dataclass
class Submitted:
    proc: subprocess.Popen[str]
    name: str
    output: Path  # the job's log (an array: with %a in it)
    cwd: Path

    @property
    def log(self) -> str:
        return self.output.read_text() if self.output.exists() else ""


@dataclass
class Cluster:
    root: Path  # lab.sh's directory
    cache: Path  # the path every host binds its node-local directory over
    lab: str = ""
    jobs: list[Submitted] = field(default_factory=list)

    def cmd(self, name: str, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """An s* command against this cluster (run on host ctld)."""
        return subprocess.run([str(self.root / "bin" / name), *args], capture_output=True, text=True,
                              timeout=timeout, env=clean_env())

    def local_dir(self, host: str) -> Path:
        return self.root / "local" / host

    def env(self, **extra: str) -> dict[str, str]:
        """What a job inherits: this interpreter and checkout, one thread per rank (bitwise equal
        weights need equal thread counts; torchrun sets it only with --nproc-per-node > 1)."""
        return clean_env(**{"PYTHON": sys.executable, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
                            "HARNESS_CACHE": str(self.cache), **extra})

    def submit(self, script: str, *overrides: str, cwd: Path, tag: str, sbatch: tuple[str, ...] = (),
               **env: str) -> Submitted:
        """`sbatch --wait` in the background (its own output to a file: an unread pipe blocks)."""
        cwd.mkdir(parents=True, exist_ok=True)
        name = f"harness-test-{tag}-{uuid.uuid4().hex[:6]}"
        output = cwd / (f"{name}-%a.out" if any(a.startswith("--array") for a in sbatch) else f"{name}.out")
        argv = [str(self.root / "bin" / "sbatch"), "--parsable", "--wait", f"--job-name={name}",
                f"--output={output}", *sbatch, str(SCRIPTS / script), *overrides]
        with open(cwd / f"{name}.sbatch.log", "w") as f:
            proc = subprocess.Popen(argv, cwd=cwd, env=self.env(**env), stdout=f, stderr=subprocess.STDOUT, text=True)
        self.jobs.append(Submitted(proc, name, output, cwd))
        return self.jobs[-1]

    def wait(self, job: Submitted, deadline: float) -> int:
        """The job's exit code (`sbatch --wait`'s); on timeout fail with its log and the cluster's view."""
        try:
            return job.proc.wait(timeout=max(deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            view = self.cmd("squeue").stdout + self.cmd("sinfo", "-N").stdout
            pytest.fail(f"job {job.name} did not finish in time:\n{view}\n{job.log[-4000:]}")

    def job_id(self, job: Submitted) -> str:
        return (job.cwd / f"{job.name}.sbatch.log").read_text().split()[0].split(";")[0]

    def signal(self, job: Submitted, sig: str) -> None:
        proc = self.cmd("scancel", f"--signal={sig}", f"--name={job.name}")
        assert proc.returncode == 0, proc.stderr

    def node_states(self) -> dict[str, str]:
        out = self.cmd("sinfo", "-h", "-N", "-o", "%N %T").stdout
        return dict(line.split() for line in out.splitlines())

    def cut(self, host: str) -> None:
        subprocess.run(["bash", str(HOSTS_SH), "-n", self.lab, "cut", host], check=True, timeout=30)


def start(root: Path, cache: Path, nodes: int = 2) -> Cluster:
    proc = subprocess.run(["bash", str(LAB_SH), "start", str(root), str(nodes), "--owner", str(os.getpid())],
                          capture_output=True, text=True, timeout=300, env=clean_env(HARNESS_CACHE=str(cache)))
    if proc.returncode != 0:
        pytest.fail(f"scripts/slurm/lab.sh start exited {proc.returncode}:\n{proc.stderr}")
    lab = re.search(r"\(lab (\S+);", proc.stderr)
    assert lab, proc.stderr
    return Cluster(root, cache, lab.group(1))


def stop(cluster: Cluster) -> str:
    """Take the cluster down; '' or what went wrong."""
    proc = subprocess.run(["bash", str(LAB_SH), "stop", str(cluster.root)], capture_output=True, text=True,
                          timeout=120)
    for job in cluster.jobs:  # sbatch --wait ends once the controller is gone
        if job.proc.poll() is None:
            job.proc.kill()
        job.proc.wait()
    left = subprocess.run(["bash", str(HOSTS_SH), "list"], capture_output=True, text=True).stdout
    return "" if proc.returncode == 0 and cluster.lab not in left else f"{proc.stderr}\n{left}"


# ------------------------------------------------------------------------------------------------
# what a job left behind


@dataclass(frozen=True)
class Attempt:
    job: str
    number: int
    nodes: list[str]
    batch_host: str
    port: int
    run_dir: str


def attempts(log: str) -> list[Attempt]:
    return [Attempt(j, int(n), parse_hostlist(nodes), host, int(port), run)
            for j, n, nodes, host, port, run in ATTEMPT.findall(log)]


def rank_starts(run_dir: Path) -> list[tuple[int, int, int, str, int]]:
    """Every rank start in the rank logs, in log order: (rank, world size, local rank, host, pid)."""
    found = []
    for log in sorted((run_dir / "logs").glob("rank*.log")):
        found += [(int(r), int(w), int(lr), h, int(p)) for r, w, lr, h, p in RANK.findall(log.read_text())]
    return found


def cache_fills(run_dir: Path) -> dict[str, list[int]]:
    """Host -> the local ranks that filled the data cache there (the 'cached ... as' line)."""
    fills: dict[str, list[int]] = {}
    for log in sorted((run_dir / "logs").glob("rank*.log")):
        text = log.read_text()
        m = RANK.search(text)
        assert m, f"{log} names no rank and host"
        for _ in re.findall(r" cached file://\S+ as ", text):
            fills.setdefault(m.group(4), []).append(int(m.group(3)))
    return fills
