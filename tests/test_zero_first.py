"""harness.dist.zero_first: rank 0 first, and never a hung rank.

In-process checks of the pieces, then real processes with real gloo process groups in both launch
shapes: "srun" (plain processes with Slurm step variables; rank 0 hosts the store) and "torchrun"
(the elastic agent hosts it). Each rank runs tests/zero_first/worker.py, which records its outcome
and the wall time it knew it; the master records the moment it raised, froze or killed itself.
Printed `[zero_first]` lines give the measured latencies (pytest -s).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import psutil
import pytest
import torch.distributed as dist

from harness import zero_first as zf
from harness.health import Verdict
from harness.zero_first import ZeroFirstError, torch_distributed_zero_first, zero_first
from tests.conftest import REPO, clean_env

WORKER = REPO / "tests" / "zero_first" / "worker.py"
SHAPES = ["srun", "torchrun"]


# ---------------------------------------------------------------------------------------------
# in-process


def test_without_a_process_group_the_context_does_nothing() -> None:
    ran = []
    with zero_first("x"):
        ran.append(1)
    with torch_distributed_zero_first(-1):
        ran.append(2)
    with torch_distributed_zero_first(0):
        ran.append(3)
    assert ran == [1, 2, 3]
    with pytest.raises(ValueError, match="scope='node'"), zero_first("x", scope="node"):  # type: ignore[arg-type]
        pass


def test_the_error_text_carries_type_and_message() -> None:
    assert zf._describe(ValueError("disk full")) == "error: ValueError: disk full"
    assert zf._describe(KeyboardInterrupt()) == "error: KeyboardInterrupt"
    assert zf._describe(ZeroFirstError("x")) == "error: harness.zero_first.ZeroFirstError: x"
    assert zf._describe(OSError("y" * 10_000)).endswith(" [...]")


@pytest.fixture
def store() -> Iterator[dist.TCPStore]:
    s = dist.TCPStore("127.0.0.1", 0, 1, True, timedelta(seconds=30), wait_for_workers=False)
    yield s


class _Verdicts:
    """What _wait_for_master reads of the watchdog: its verdict (set by a test thread here)."""

    verdict: Verdict | None = None


def test_waiter_is_released_at_once_by_the_outcome(store: dist.TCPStore) -> None:
    master = dist.TCPStore("127.0.0.1", store.port, 1, False, timedelta(seconds=30))  # the master's own client
    threading.Timer(0.5, master.set, args=("p/status", "ok")).start()
    t0 = time.monotonic()
    zf._wait_for_master(store, "p", "rank 0", _Verdicts(), timeout=None)  # type: ignore[arg-type]
    assert 0.4 < time.monotonic() - t0 < 1.5


def test_waiter_raises_the_masters_error_on_timeout_and_on_a_verdict(store: dist.TCPStore) -> None:
    store.set("e/status", "error: ValueError: disk full")
    with pytest.raises(ZeroFirstError, match="rank 0 failed: ValueError: disk full"):
        zf._wait_for_master(store, "e", "rank 0", _Verdicts(), timeout=None)  # type: ignore[arg-type]
    assert store.add("e/acks", 0) == 1
    with pytest.raises(ZeroFirstError, match="did not finish within timeout=0.3s"):
        zf._wait_for_master(store, "q", "rank 0", _Verdicts(), timeout=0.3)  # type: ignore[arg-type]
    lost = _Verdicts()
    lost.verdict = Verdict("dead", {"rank": 0, "host": "h", "pid": 1, "start": 0.0, "step": 0, "phase": "zero_first:x"},
                           5.0, "no heartbeat for 5.0 s", 1, "a")
    with pytest.raises(ZeroFirstError, match=r"rank 0 stopped responding: rank 0 \(pid 1 on h\) lost"):
        zf._wait_for_master(store, "v", "rank 0", lost, timeout=None)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# real processes


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Run:
    """Processes of one launch (one per rank, or one torchrun agent per node) and their outputs."""

    def __init__(self, out: Path, procs: list[subprocess.Popen[bytes]]) -> None:
        self.out, self.procs = out, procs
        self.ended: dict[int, float] = {}  # launched process -> when it ended
        self.rank_ended: dict[int, float] = {}  # rank (seen in its result file) -> when its process ended

    def _watch_ranks(self) -> None:
        for f in self.out.glob("rank*-a0.json"):
            try:
                result = json.loads(f.read_text())
            except ValueError:
                continue  # being written
            if result["rank"] not in self.rank_ended and not _alive(result["pid"]):
                self.rank_ended[result["rank"]] = time.time()

    def wait(self, timeout: float = 90.0) -> list[int]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for i, p in enumerate(self.procs):
                if i not in self.ended and p.poll() is not None:
                    self.ended[i] = time.time()
            self._watch_ranks()
            if len(self.ended) == len(self.procs):
                return [p.returncode for p in self.procs]
            time.sleep(0.02)
        raise AssertionError(f"{self.out}: processes still running after {timeout}s\n{self.logs()}")

    def result(self, rank: int, attempt: int = 0) -> dict:
        return json.loads((self.out / f"rank{rank}-a{attempt}.json").read_text())

    def wait_for_results(self, ranks: list[int], timeout: float = 90.0) -> list[dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all((self.out / f"rank{r}-a0.json").exists() for r in ranks):
                time.sleep(0.05)  # written with write_text: give it a moment to be whole
                return [self.result(r) for r in ranks]
            time.sleep(0.05)
        raise AssertionError(f"no results from ranks {ranks} after {timeout}s\n{self.logs()}")

    def event(self, rank: int = 0) -> dict:
        return json.loads((self.out / f"event-{rank}.json").read_text())

    def bodies(self) -> list[tuple[str, int, int, str, float]]:
        """(scope and round, rank, node, start|end, time) for every body that ran."""
        lines = (self.out / "body.log").read_text().split()
        rows = [lines[i : i + 5] for i in range(0, len(lines), 5)]
        return [(tag, int(k), int(n), what, float(t)) for tag, k, n, what, t in rows]

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.out.glob("*.log")))


@pytest.fixture
def launched() -> Iterator[list[Run]]:
    """Every launch of a test; afterwards nothing of it may be left running: not the processes the
    test started, not their children, and no rank (an orphaned torchrun worker is nobody's child)."""
    runs: list[Run] = []
    yield runs
    ranks = set()
    for run in runs:
        for f in run.out.glob("*.json"):
            ranks.add(json.loads(f.read_text())["pid"])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(pid) for pid in ranks):
        time.sleep(0.05)
    leftovers = [p.pid for run in runs for p in run.procs if p.poll() is None]
    leftovers += [pid for pid in ranks if _alive(pid)]
    for pid in leftovers:  # clean up before failing
        with contextlib.suppress(psutil.NoSuchProcess):
            psutil.Process(pid).kill()
    for child in psutil.Process().children(recursive=True):
        child.kill()
    assert not leftovers, f"processes left running: {leftovers}"


def _env(**extra: str) -> dict[str, str]:
    env = clean_env(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    for key in ("TORCHELASTIC_USE_AGENT_STORE", "TORCHELASTIC_RESTART_COUNT", "GROUP_WORLD_SIZE"):
        env.pop(key, None)
    return {**env, **extra}


def popen(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as f:
        return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)


def start_srun(runs: list[Run], out: Path, n: int, args: list[str], **extra: str) -> Run:
    """n plain processes as one `srun` step would start them: rank 0 hosts the store."""
    out.mkdir(parents=True, exist_ok=True)
    port = str(free_port())
    procs = []
    for r in range(n):
        env = _env(SLURM_STEP_ID="0", SLURM_JOB_ID="42", SLURM_PROCID=str(r), SLURM_LOCALID=str(r),
                   SLURM_NTASKS=str(n), SLURM_NODEID="0", SLURM_NNODES="1", SLURM_STEP_TASKS_PER_NODE=str(n),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port, **extra)
        procs.append(popen([sys.executable, str(WORKER), "--out", str(out), *args], env, out / f"rank{r}.log"))
    runs.append(Run(out, procs))
    return runs[-1]


def start_torchrun(runs: list[Run], out: Path, nproc: int, args: list[str], *, nnodes: int = 1,
                   agent_env: list[dict[str, str]] | None = None, torchrun_args: tuple[str, ...] = ()) -> Run:
    """`torchrun` agents (one per "node", all on this machine) with a c10d rendezvous on 127.0.0.1."""
    out.mkdir(parents=True, exist_ok=True)
    endpoint = f"127.0.0.1:{free_port()}"
    procs = []
    for node in range(nnodes):
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--nproc-per-node={nproc}",
               "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", f"--rdzv-id=zf-{out.name}",
               "--monitor-interval=0.1", *torchrun_args, str(WORKER), "--out", str(out), *args]
        procs.append(popen(cmd, _env(**(agent_env[node] if agent_env else {})), out / f"agent{node}.log"))
    runs.append(Run(out, procs))
    return runs[-1]


def start(shape: str, runs: list[Run], out: Path, n: int, args: list[str]) -> Run:
    return start_srun(runs, out, n, args) if shape == "srun" else start_torchrun(runs, out, n, args)


def report(shape: str, what: str, seconds: list[float]) -> None:
    print(f"\n[zero_first] {shape:8s} {what}: " + ", ".join(f"{s:.3f}s" for s in seconds))


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("shape", SHAPES)
def test_a_master_that_raises_stops_every_rank_with_its_message(shape: str, tmp_path: Path,
                                                                 launched: list[Run]) -> None:
    run = start(shape, launched, tmp_path / "raise", 3, ["--scenario", "raise"])
    codes = run.wait()
    assert all(code != 0 for code in codes), (codes, run.logs())
    t0 = run.event()["t"]
    assert run.result(0)["outcome"] == "ValueError"
    waiters = [run.result(r) for r in (1, 2)]
    for w in waiters:
        assert w["outcome"] == "ZeroFirstError", w
        assert "rank 0 (preparing 'data-local') failed: ValueError: disk quota exceeded while preparing on rank 0" \
            in w["message"]
    raised = [w["t"] - t0 for w in waiters]
    exited = [run.rank_ended[r] - t0 for r in sorted(run.rank_ended)]
    report(shape, "master raised -> others raised", raised)
    report(shape, "master raised -> ranks 0, 1, 2 exited", exited)
    report(shape, "master raised -> launch ended", [max(run.ended.values()) - t0])
    assert max(raised) < 5
    # Exiting adds Python's and torch's own shutdown (1.5-3 s on a busy 2-core machine): bounded, not 5 s
    assert len(exited) == 3 and max(exited) < 20


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("shape", SHAPES)
def test_a_frozen_master_is_noticed_after_dead_after(shape: str, tmp_path: Path, launched: list[Run]) -> None:
    dead_after = 2.0
    run = start(shape, launched, tmp_path / "hang", 2, ["--scenario", "hang", "--dead-after", str(dead_after)])
    waiters = run.wait_for_results([1])
    t0, master = run.event()["t"], run.event()["pid"]
    # srun shape: the store froze with its host, so the waiter lost the store; torchrun: the heartbeat stopped
    why = "lost contact with the store" if shape == "srun" else f"pid {master} on "
    for w in waiters:
        assert w["outcome"] == "ZeroFirstError", w
        assert "rank 0 (preparing 'data-local') stopped responding: " in w["message"] and why in w["message"], w
        if shape == "torchrun":
            assert "in zero_first:data-local: no heartbeat for" in w["message"], w
    raised = [w["t"] - t0 for w in waiters]
    report(shape, f"master SIGSTOPped -> others raised (dead_after={dead_after}s)", raised)
    assert dead_after * 0.9 < min(raised) and max(raised) < dead_after + 5
    deadline = time.monotonic() + 10  # fenced by the waiter: it runs on the same host, and is frozen
    while _alive(master) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(master)
    codes = run.wait()
    assert all(code != 0 for code in codes), codes


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("shape", SHAPES)
def test_a_killed_master_gives_zero_first_errors_not_socket_errors(shape: str, tmp_path: Path,
                                                                   launched: list[Run]) -> None:
    run = start(shape, launched, tmp_path / "kill", 2, ["--scenario", "kill"])
    codes = run.wait()
    assert all(code != 0 for code in codes), codes
    t0 = run.event()["t"]
    waiters = [run.result(1)]
    # under torchrun the agent's SIGTERM and the watchdog (the master's process is gone) race
    expected = ("lost contact with rank 0",) if shape == "srun" else ("SIGTERM while waiting for rank 0",
                                                                        "its process is gone")
    for w in waiters:
        assert w["outcome"] == "ZeroFirstError" and any(e in w["message"] for e in expected), w
    raised = [w["t"] - t0 for w in waiters]
    report(shape, "master SIGKILLed -> others raised", raised)
    assert max(raised) < 5


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_slow_master_is_waited_for_and_the_name_can_be_used_again(tmp_path: Path, launched: list[Run]) -> None:
    """srun shape; under torchrun the two-node test below has a slow master and two rounds too."""
    dead_after, body_s = 1.0, 4.0
    run = start_srun(launched, tmp_path / "slow", 2,
                     ["--scenario", "slow", "--dead-after", str(dead_after), "--body-s", str(body_s), "--rounds", "2"])
    assert run.wait() == [0, 0], run.logs()
    assert [run.result(r)["outcome"] for r in (0, 1)] == ["ok", "ok"]
    rows = run.bodies()
    for tag in ("local0", "local1"):
        master_end = next(t for r, k, _, what, t in rows if r == tag and k == 0 and what == "end")
        other_start = next(t for r, k, _, what, t in rows if r == tag and k == 1 and what == "start")
        assert master_end <= other_start
    master = [t for r, k, _, _, t in rows if r == "local0" and k == 0]
    assert master[1] - master[0] >= body_s  # several dead_after long, heartbeat alive: no false alarm


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_after_an_elastic_restart_zero_first_works_again(tmp_path: Path, launched: list[Run]) -> None:
    """Attempt 0: the master raises and everything fails; torchrun restarts the group; attempt 1 succeeds.

    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: with torch 2.13's default (the agent's store shared with
    the workers across restarts) gloo's own init reads stale peer addresses after a restart and fails
    about half the time (pytorch/pytorch#135712); the next test covers a store that persists.
    """
    run = start_torchrun(launched, tmp_path / "restart", 2, ["--scenario", "restart"],
                         agent_env=[{"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}],
                         torchrun_args=("--max-restarts=1",))
    assert run.wait() == [0], run.logs()
    assert run.result(1, 0)["outcome"] == "ZeroFirstError"
    assert [run.result(r, 1)["outcome"] for r in (0, 1)] == ["ok", "ok"]


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_keys_carry_the_restart_count_in_a_store_that_outlives_the_workers(tmp_path: Path,
                                                                           launched: list[Run]) -> None:
    """The store is this test's (as the torchrun agent's is): attempt 0 leaves an `error` outcome in
    it under the same name and generation that attempt 1 uses, and both run with restart count 0
    (a membership change does not count as a restart): only the attempt id tells them apart."""
    store = dist.TCPStore("127.0.0.1", 0, 1, True, timedelta(seconds=60), wait_for_workers=False)
    out = tmp_path / "persist"
    for attempt in (0, 1):
        procs = []
        out.mkdir(exist_ok=True)
        for r in range(2):
            # no TORCHELASTIC_RUN_ID: there is no agent whose SIGTERM the others would wait for
            env = _env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(store.port), TORCHELASTIC_USE_AGENT_STORE="True",
                       TORCHELASTIC_RESTART_COUNT="0", ZF_ATTEMPT=str(attempt))
            cmd = [sys.executable, str(WORKER), "--out", str(out), "--scenario", "restart", "--body-s", "0.5"]
            procs.append(popen(cmd, env, out / f"attempt{attempt}-rank{r}.log"))
        launched.append(Run(out, procs))
        codes = launched[-1].wait()
        assert codes == ([1, 1] if attempt == 0 else [0, 0]), launched[-1].logs()
        if attempt == 0:
            assert [launched[-1].result(r)["outcome"] for r in (0, 1)] == ["ValueError", "ZeroFirstError"]
        for key in store.list_keys():  # as a fresh gloo group needs: drop the old group's own keys
            if "harness/" not in key:
                store.delete_key(key)
    stale = [k for k in store.list_keys() if re.search(r"harness/[^/]+/zero_first/data-local/1/node0/status$", k)]
    assert len(stale) == 2, stale  # one per attempt: the attempt id, not the restart count, tells them apart
    assert sorted(store.get(k).decode().split(":")[0] for k in stale) == ["error", "ok"]
    # attempt 0's master also told everyone it failed (the watchdog's verdict); attempt 1 never read it
    verdicts = [k for k in store.list_keys() if k.endswith("/verdict")]
    assert len(verdicts) == 1 and json.loads(store.get(verdicts[0]))["kind"] == "failed"
    assert [launched[-1].result(r, 1)["outcome"] for r in (0, 1)] == ["ok", "ok"]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_two_nodes_prepare_once_per_node_with_scope_local_and_once_in_all_with_global(tmp_path: Path,
                                                                                   launched: list[Run]) -> None:
    """Two torchrun agents on this machine play two nodes. Scope local fetches into each node's own cache
    directory (node-local disks), scope global into one shared directory (a shared file system). The
    bodies are real downloads that the server sends slowly (about 3 x dead_after, heartbeat alive), and
    a second round with the same name finds the cache."""
    from tests.data.httpd import serve

    payload = os.urandom(200_000)
    nodes, shared = [tmp_path / "node0", tmp_path / "node1"], tmp_path / "shared"
    with serve() as server:
        server.add("local.bin", payload, "slow", "slow", slow_s=0.8)
        server.add("global.bin", payload, "slow", slow_s=0.8)
        run = start_torchrun(launched, tmp_path / "nodes", 2,
                             ["--scenario", "nodes", "--url", server.url(""), "--rounds", "2", "--dead-after", "1.0",
                              "--sha256", hashlib.sha256(payload).hexdigest(), "--shared-cache", str(shared)],
                             nnodes=2, agent_env=[{"HARNESS_CACHE": str(c)} for c in nodes])
        assert run.wait(120) == [0, 0], run.logs()
        assert len(server.requests("local.bin")) == 2 and len(server.requests("global.bin")) == 1
    for cache in (*nodes, shared):
        assert [p.read_bytes() == payload for p in cache.rglob("*.bin")] == [True]
    rows = run.bodies()
    node_of = {k: n for _, k, n, _, _ in rows}
    assert sorted(node_of) == [0, 1, 2, 3] and sorted(node_of.values()) == [0, 0, 1, 1]

    def at(tag: str, rank: int, what: str) -> float:
        return next(t for r, k, _, w, t in rows if (r, k, w) == (tag, rank, what))

    for scope in ("local", "global"):
        for tag in (f"{scope}0", f"{scope}1"):
            for k, node in node_of.items():
                first = min(kk for kk, nn in node_of.items() if nn == node) if scope == "local" else 0
                if k != first:
                    assert at(tag, first, "end") <= at(tag, k, "start"), (tag, k, first)
        assert at(f"{scope}0", 0, "end") - at(f"{scope}0", 0, "start") > 3.0  # > 3 x dead_after
