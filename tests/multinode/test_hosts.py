"""Several hosts on one machine (scripts/hosts.sh): the hosts themselves, then real `torchrun --nnodes 2`
runs between them with real gloo sockets (tests a and e of issue 11; the ones that lose a host come
with the liveness watchdog)."""

from __future__ import annotations

import contextlib
import errno
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from harness import checkpoint
from tests.conftest import REPO, clean_env, harness_cmd
from tests.multinode.conftest import STATE_ROOT, Lab, hosts_sh
from tests.runs import digests

pytestmark = pytest.mark.multinode
PROBE = [sys.executable, str(REPO / "tests" / "multinode" / "probe.py")]
DIGITS = Path("0f03c9de50199cd2") / "digits.npz"  # the default dataset's cache entry
RDZV_PORT = 29400  # any port: a lab's network holds nothing but the test's own processes
JOB = ["device=cpu", "model=mlp", "trainer.epochs=1"]
RUN_TIMEOUT = 120


def probe(lab: Lab, host: str, *args: str) -> dict:
    proc = lab.run(host, [*PROBE, *args])
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_each_host_has_its_own_name_address_and_cache_and_reaches_only_the_others(
        lab, tmp_path: Path, cache_dir: Path) -> None:
    hosts = lab(2)
    assert hosts.addrs == {"node1": "198.18.0.1", "node2": "198.18.0.2"}
    for host in hosts.hosts:
        seen = probe(hosts, host, "look", "node1", "node2", "localhost")
        assert seen["hostname"] == host and seen["fqdn"] == host
        # its own name is its bench address, not loopback (Debian's 127.0.1.1 line would make gloo advertise that)
        assert seen["resolved"] == {"node1": ["198.18.0.1"], "node2": ["198.18.0.2"], "localhost": ["127.0.0.1"]}
        assert seen["interfaces"] == ["eth0", "lo"]
        # the cache path is the host's own directory; the rest (here the test's tmp dir) is shared
        marker = f"written on {host}"
        assert hosts.run(host, ["sh", "-c", f"echo '{marker}' > {cache_dir}/who && echo x > {tmp_path}/{host}"]
                         ).returncode == 0
        assert (hosts.local_dir(host) / "who").read_text().strip() == marker
        assert (tmp_path / host).is_file()
        # nothing outside the lab: no route (a public address, the machine's DNS server), no DNS
        for outside in ("8.8.8.8", "192.0.2.1"):
            assert probe(hosts, host, "connect", outside, "53", "2")["errno"] == errno.ENETUNREACH
        assert "gaierror" in str(probe(hosts, host, "look", "example.com")["resolved"]["example.com"])
    assert list(cache_dir.iterdir()) == []  # the machine's own view of the cache path is untouched

    server = hosts.popen("node2", [*PROBE, "serve", "5000"], log=tmp_path / "serve.log", cwd=tmp_path)
    _wait_for_line(tmp_path / "serve.log", "listening", server)
    assert probe(hosts, "node1", "connect", "node2", "5000", "5")["result"] == "ok"
    assert server.wait(timeout=10) == 0
    assert '"peer": "198.18.0.1"' in (tmp_path / "serve.log").read_text()  # from node1's own address

    hosts.cut("node2")
    assert "cut" in hosts_sh("list").stdout
    t0 = time.monotonic()
    assert probe(hosts, "node1", "connect", "node2", "5000", "1")["result"] in ("TimeoutError", "OSError")
    assert time.monotonic() - t0 >= 0.9  # dropped, not refused: a pulled cable answers nothing
    hosts.mend("node2")
    assert probe(hosts, "node1", "connect", "node2", "5000", "5")["result"] == "ConnectionRefusedError"  # back


def test_a_lab_whose_owner_ends_is_taken_down(tmp_path: Path, cache_dir: Path) -> None:
    """`up --owner PID`: what a pytest killed with SIGKILL relies on."""
    owner = subprocess.Popen(["sleep", "60"])
    name = f"t{owner.pid}owner"
    hosts_sh("-n", name, "up", "1", "--cache", str(cache_dir), "--local", str(tmp_path / "local"),
             "--owner", str(owner.pid))
    try:
        holder = int((STATE_ROOT / name / "node1.pid").read_text())
        owner.kill()
        owner.wait()
        deadline = time.monotonic() + 10
        while (STATE_ROOT / name).exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not (STATE_ROOT / name).exists()
        with contextlib.suppress(psutil.NoSuchProcess):  # a zombie for a moment, until init reaps it
            assert psutil.Process(holder).status() == psutil.STATUS_ZOMBIE
    finally:
        hosts_sh("-n", name, "down", check=False)


def torchrun(hosts: Lab, *args: str, rdzv_id: str, nnodes: str = "", rdzv_conf: str = "join_timeout=60",
             flags: tuple[str, ...] = ()) -> list[str]:
    """One host's agent of a run with 1 worker per host and its rendezvous on the lab's first host;
    `nnodes` (default: every host of the lab) may be MIN:MAX."""
    return [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes or len(hosts.hosts)}",
            "--nproc-per-node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint={hosts.addrs[hosts.hosts[0]]}:{RDZV_PORT}",
            f"--rdzv-id={rdzv_id}", f"--rdzv-conf={rdzv_conf}", *flags, "-m", "harness.train", *args]


def run_on_every_host(hosts: Lab, tmp_path: Path, *args: str, rdzv_id: str) -> tuple[list[int], str]:
    """The same torchrun command on each host (the run directory on the shared tmp dir); their exit
    codes and logs."""
    agents = [hosts.popen(h, torchrun(hosts, *args, rdzv_id=rdzv_id), log=tmp_path / f"agent-{h}.log", cwd=tmp_path)
              for h in hosts.hosts]
    deadline = time.monotonic() + RUN_TIMEOUT
    for agent in agents:
        try:
            agent.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            pytest.fail(f"the agents did not end within {RUN_TIMEOUT} s:\n{agent_logs(hosts, tmp_path)}")
    return [a.returncode for a in agents], agent_logs(hosts, tmp_path)


def agent_logs(hosts: Lab, tmp_path: Path) -> str:
    return "\n".join(f"--- {h}\n{(tmp_path / f'agent-{h}.log').read_text()[-4000:]}" for h in hosts.hosts)


def rank_lines(run_dir: Path) -> dict[int, tuple[int, str]]:
    """Rank -> (local rank, host), from the line each rank logs when it starts."""
    found = {}
    for log in sorted((run_dir / "logs").glob("rank*.log")):
        m = re.search(r"rank (\d+)/\d+ \(local (\d+), host (\S+), pid \d+\)", log.read_text())
        assert m, f"{log} names no rank and host"
        found[int(m.group(1))] = (int(m.group(2)), m.group(3))
    return found


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_two_hosts_with_one_worker_each_train_like_one_host_with_two(lab, tmp_path: Path, cache_dir: Path) -> None:
    hosts = lab(2)
    t0 = time.monotonic()
    # OMP_NUM_THREADS=1 on the hosts (Lab.env), as our launcher gives its 2 workers: torchrun sets it only
    # with --nproc-per-node > 1, and bitwise equal weights need equal thread counts
    codes, logs = run_on_every_host(hosts, tmp_path, *JOB, f"run_root={tmp_path}/runs", rdzv_id="two-hosts")
    took = time.monotonic() - t0
    assert codes == [0, 0], logs
    run_dir = tmp_path / "runs" / "elastic-two-hosts"  # one run directory, shared
    assert "(torchrun, world size 2, backend gloo)" in (run_dir / "train.log").read_text()
    ranks = rank_lines(run_dir)
    assert sorted(host for _, host in ranks.values()) == ["node1", "node2"], ranks  # two hosts, one rank each

    # each host's cache filled once, on that host, by its local rank 0; the machine's own view untouched
    for host in hosts.hosts:
        assert (hosts.local_dir(host) / DIGITS).is_file()
        fills = [(rank, local) for rank, (local, h) in ranks.items() if h == host
                 for _ in re.findall(r" cached file://\S+digits\.npz as ", (run_dir / "logs" / f"rank{rank}.log")
                                     .read_text())]
        assert [local for _, local in fills] == [0], (host, fills)
    assert list(cache_dir.iterdir()) == []

    # the same job as one host with two workers (our launcher on this machine): the same final weights
    one = subprocess.run(harness_cmd(*JOB, "dist.nproc=2", f"run_root={tmp_path}/one"), cwd=tmp_path, text=True,
                         env=clean_env(HARNESS_RUN_ID="one", HARNESS_CACHE=str(tmp_path / "one-cache")),
                         capture_output=True, timeout=RUN_TIMEOUT)
    assert one.returncode == 0, one.stderr
    one_dir = tmp_path / "one" / "one"
    assert digests(run_dir) == digests(one_dir) and len(set(digests(run_dir).values())) == 1
    a, b = (checkpoint.load(d)["model"] for d in (run_dir, one_dir))
    assert all(torch.equal(a[k], b[k]) for k in a)
    print(f"\n[multinode] 2 hosts x 1 worker, {JOB}: agents started -> both exited 0 in {took:.1f}s")


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_run_directory_that_is_not_shared_is_refused_before_training(lab, tmp_path: Path,
                                                                       cache_dir: Path) -> None:
    """run_root on a node-local disk: the same path on both hosts, a different directory on each."""
    hosts = lab(2)
    t0 = time.monotonic()
    codes, logs = run_on_every_host(hosts, tmp_path, *JOB, f"run_root={cache_dir}/runs", rdzv_id="local")
    took = time.monotonic() - t0
    assert codes == [1, 1], logs  # torchrun's code when its workers failed; theirs is 2, a user error
    assert logs.count("exitcode  : 2") == 2, logs
    errors = re.findall(r"^error: .*$", logs, re.MULTILINE)
    assert len(errors) == 2, logs
    for error in errors:
        m = re.match(rf"error: the run directory is not shared: rank 0 on (node\d) wrote {cache_dir}/runs/"
                     rf"elastic-local/\.shared-[0-9a-f]+, and 1 of 2 ranks do not see it in their run directory: "
                     rf"rank 1 on (node\d) \({cache_dir}/runs/elastic-local\)\. ", error)
        assert m and {m.group(1), m.group(2)} == {"node1", "node2"}, error
    # before any training: rank 0's directory holds its mark and nothing else, the other's nothing at all
    contents = sorted(sorted(p.name for p in (hosts.local_dir(h) / "runs" / "elastic-local").iterdir())
                      for h in hosts.hosts)
    assert len(contents) == 2 and contents[0] == [] and len(contents[1]) == 1, contents
    assert contents[1][0].startswith(".shared-")
    assert "epoch" not in logs and not (tmp_path / "runs").exists()
    print(f"\n[multinode] node-local run directory: agents started -> both refused and exited in {took:.1f}s")


def _wait_for_line(log: Path, text: str, proc: subprocess.Popen[str], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.is_file() and text in log.read_text():
            return
        assert proc.poll() is None, log.read_text()
        time.sleep(0.05)
    raise AssertionError(f"no {text!r} in {log}")
