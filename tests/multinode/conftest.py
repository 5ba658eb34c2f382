"""Emulated hosts for the tests marked `multinode` (scripts/hosts.sh; the skip rule is in tests/conftest.py).

`lab(2)` brings up a lab of hosts node1, node2 with a name unique to this test, whose node-local
directories (`Lab.local_dir(host)`) are bound over the test's HARNESS_CACHE; the test's tmp
directory stays shared, as a cluster file system would be. Commands run on a host through
`Lab.popen` (`hosts.sh exec`, which execs: the Popen's pid is the command's own).

Tear-down, also when the test fails: the processes the test started get SIGTERM (SIGKILL after a
grace), then `hosts.sh down` ends whatever still runs on the hosts, then the test fails if anything
of the lab is left: a holder, its state directory, a process in one of its namespaces, an interface
in the machine's namespace. The lab is brought up with `--owner <pytest's pid>`, so a pytest killed
outright (SIGKILL, a timeout in thread mode) takes its labs down within a second or two.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from tests.conftest import REPO, clean_env

SCRIPT = REPO / "scripts" / "hosts.sh"
STATE_ROOT = Path(os.environ.get("HARNESS_HOSTS_STATE", "/run/harness-hosts"))
STOP_GRACE_S = 10.0  # how long a test's own processes get after SIGTERM


def hosts_sh(*args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        pytest.fail(f"scripts/hosts.sh {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}")
    return proc


def _namespaces(pid: int) -> set[str]:
    return {os.readlink(f"/proc/{pid}/ns/{kind}") for kind in ("net", "mnt")}


def root_links() -> list[str]:
    """The interface names in the machine's own network namespace."""
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
    return sorted(line.split(":")[1].strip().split("@")[0] for line in out.splitlines())


@dataclass
class Lab:
    name: str
    addrs: dict[str, str]  # host -> address, in the order of `up`
    local: Path  # the node-local directories: local/<host>
    cache: Path  # the path each host's node-local directory is bound over
    namespaces: set[str]  # the hosts' own network and mount namespaces ("net:[...]")
    procs: list[subprocess.Popen[str]] = field(default_factory=list)

    @property
    def hosts(self) -> list[str]:
        return list(self.addrs)

    def local_dir(self, host: str) -> Path:
        return self.local / host

    def env(self, **extra: str) -> dict[str, str]:
        """The environment every host gets: this checkout first on the path, one thread per worker,
        the test's cache path (node-local on each host)."""
        return clean_env(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", HARNESS_CACHE=str(self.cache), **extra)

    def popen(self, host: str, cmd: list[str], *, log: Path, cwd: Path, env: dict[str, str] | None = None
              ) -> subprocess.Popen[str]:
        """Start `cmd` on `host`, stdout and stderr to `log`."""
        with open(log, "w") as f:
            proc = subprocess.Popen(["bash", str(SCRIPT), "-n", self.name, "exec", host, *cmd], cwd=cwd,
                                    env=env or self.env(), stdout=f, stderr=subprocess.STDOUT, text=True)
        self.procs.append(proc)
        return proc

    def run(self, host: str, cmd: list[str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["bash", str(SCRIPT), "-n", self.name, "exec", host, *cmd], cwd=REPO, env=self.env(),
                              capture_output=True, text=True, timeout=timeout)

    def cut(self, host: str) -> None:
        hosts_sh("-n", self.name, "cut", host)

    def mend(self, host: str) -> None:
        hosts_sh("-n", self.name, "mend", host)

    def stop(self) -> None:
        """SIGTERM to the test's processes still running, SIGKILL after STOP_GRACE_S."""
        running = [p for p in self.procs if p.poll() is None]
        for p in running:
            p.terminate()
        deadline = time.monotonic() + STOP_GRACE_S
        for p in running:
            try:
                p.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def leftovers(self) -> list[str]:
        """What of the lab is still there (after `down`): nothing, or a description of each thing."""
        found = []
        for p in psutil.process_iter(["pid", "cmdline"]):
            cmdline = p.info["cmdline"] or []
            if cmdline and cmdline[0].startswith(f"harness-hosts:{self.name}:"):
                found.append(f"holder {p.info['pid']} {cmdline[0]}")
                continue
            with contextlib.suppress(OSError):
                if _namespaces(p.info["pid"]) & self.namespaces:
                    found.append(f"process {p.info['pid']} on a host: {' '.join(cmdline)}")
        if (STATE_ROOT / self.name).exists():
            found.append(f"state directory {STATE_ROOT / self.name}")
        return found


def _holder_namespaces(name: str, hosts: list[str]) -> set[str]:
    found = set()
    for host in hosts:
        pid = int((STATE_ROOT / name / f"{host}.pid").read_text())
        found |= _namespaces(pid)
    return found - _namespaces(os.getpid())


@pytest.fixture
def lab(tmp_path: Path, cache_dir: Path) -> Iterator[Callable[..., Lab]]:
    """`lab(2)` or `lab("alpha", "beta")`: a lab of emulated hosts for this test, taken down after it."""
    made: list[Lab] = []
    links = root_links()

    def up(*hosts: int | str) -> Lab:
        name = f"t{uuid.uuid4().hex[:10]}"
        local = tmp_path / f"local-{name}"
        out = hosts_sh("-n", name, "up", *map(str, hosts), "--cache", str(cache_dir), "--local", str(local),
                       "--owner", str(os.getpid())).stdout
        addrs = {host: addr for _, host, addr in (line.split() for line in out.splitlines())}
        made.append(Lab(name, addrs, local, cache_dir, _holder_namespaces(name, list(addrs))))
        return made[-1]

    yield up
    problems = []
    for one in made:
        one.stop()
        down = hosts_sh("-n", one.name, "down", check=False)
        if down.returncode != 0:
            problems.append(f"hosts.sh down exited {down.returncode}: {down.stderr}")
        problems += one.leftovers()
    if root_links() != links:
        problems.append(f"the machine's interfaces changed: {links} -> {root_links()}")
    assert not problems, problems
