"""The two sides' commands for one bench setting, running one of them, and reading what its ranks wrote.

A run is one command started from a clean environment (no inherited rank or Slurm variables) with
OMP_NUM_THREADS set the same way for both sides. Its ranks write their step clocks
(bench/data.py) to a fresh directory; `Run` turns those into the numbers the table reports.
Step counts: one epoch of `3N + 1` steps, so the fetches of batches N and 3N (both right after a
logging step, where the loss is read back: on CUDA the queue is drained there) bound 2N whole steps.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DROP_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "MASTER_ADDR",
            "MASTER_PORT", "TORCHELASTIC_RUN_ID", "HARNESS_RUN_ID", "HARNESS_LAUNCHED", "CUDA_LAUNCH_BLOCKING")


class RunFailed(RuntimeError):
    """A command exited non-zero or left no step clock; carries the tail of its output."""


@dataclass(frozen=True)
class Spec:
    """One bench setting: what both sides train and how."""

    arch: str = "mlp"  # mlp | cnn: harness.models.MLP | SmallCNN, default sizes
    world: int = 1  # processes
    n: int = 200  # steady state is measured over steps N .. 3N
    batch: int = 64  # global batch
    log_every: int = 20  # must divide N (see the module docstring)
    threads: int = 1  # OMP_NUM_THREADS for every process of both sides
    device: str = "cpu"  # cpu | cuda (one GPU per process)
    amp: str = "off"  # off | bf16: trainer.amp, and autocast around forward + loss in the reference
    channels_last: bool = False  # trainer.channels_last, and the same by hand in the reference
    check_sync: bool = False  # CUDA: sync-debug "error" outside logging steps (bench/data.py)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n % self.log_every:
            near = max(self.n // self.log_every, 1) * self.log_every
            raise ValueError(f"N={self.n} must be a multiple of log_every={self.log_every}, so that steps N and "
                             f"3N follow a logging step; nearest: {near}")
        if self.check_sync and self.device != "cuda":
            raise ValueError("check_sync needs device=cuda (torch.cuda.set_sync_debug_mode)")
        if self.batch % self.world:
            raise ValueError(f"global batch {self.batch} is not divisible by world size {self.world}")

    @property
    def steps(self) -> int:
        return 3 * self.n + 1

    def short(self, n: int) -> Spec:
        """The same setting with fewer steps (time to first step only)."""
        return dataclasses.replace(self, n=n)


def cosine_schedule(root: Path = REPO) -> bool:
    """Whether the harness under `root` has `trainer.lr_schedule` (default cosine, which the reference
    copies); read from the source, not imported, so it answers for a snapshot too."""
    text = (root / "harness" / "config.py").read_text()
    return re.search(r"^\s+lr_schedule\s*:", text, flags=re.M) is not None


def snapshot(dest: Path) -> Path:
    """Copy harness/, conf/ and bench/ to `dest`: every run of one bench then measures the same code,
    even while someone edits the checkout. Commands run with `dest` as their working directory, which
    comes first on sys.path (before the editable install)."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "results")
    for name in ("harness", "conf", "bench"):
        shutil.copytree(REPO / name, dest / name, ignore=ignore)
    return dest


def source_digest(root: Path) -> str:
    """sha256 over the harness's and conf's files: which code a result measured."""
    h = hashlib.sha256()
    for path in sorted([*(root / "harness").rglob("*.py"), *(root / "conf").rglob("*.yaml")]):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def _dataset_overrides(spec: Spec, out: Path) -> list[str]:
    return ["data.url=''", "data.dataset._target_=bench.data.Synthetic", f"+data.dataset.steps={spec.steps}",
            f"+data.dataset.batch={spec.batch}", f"+data.dataset.log_every={spec.log_every}",
            f"+data.dataset.out={out}", f"+data.dataset.check_sync={str(spec.check_sync).lower()}",
            f"+data.dataset.seed={spec.seed}"]


CONFIG_GROUP = {"mlp": "mlp", "cnn": "small_cnn"}  # conf/model/<group>.yaml of each arch


def harness_overrides(spec: Spec, out: Path, run_root: Path, root: Path = REPO) -> list[str]:
    device = "cpu" if spec.device == "cpu" else ",".join(str(i) for i in range(spec.world))
    o = [f"device={device}", f"model={CONFIG_GROUP[spec.arch]}", f"data.batch_size={spec.batch}",
         "trainer.epochs=1", f"trainer.log_every={spec.log_every}", f"seed={spec.seed}", f"run_root={run_root}",
         *_dataset_overrides(spec, out)]
    if spec.device == "cpu":
        o.append(f"dist.nproc={spec.world}")
    if spec.amp != "off":
        o.append(f"trainer.amp={spec.amp}")
    if spec.channels_last:
        o.append("trainer.channels_last=true")
    if cosine_schedule(root):
        o.append("trainer.lr_schedule=cosine")  # the default, pinned: the reference does the same
    return o


def torchrun(world: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}"]


def harness_cmd(spec: Spec, out: Path, run_root: Path, *, under_torchrun: bool = False, root: Path = REPO) -> list[str]:
    """`python -m harness.train` (its own launcher), or the same job under torchrun."""
    overrides = harness_overrides(spec, out, run_root, root)
    if under_torchrun:
        return [*torchrun(spec.world), "-m", "harness.train", *[o for o in overrides if not o.startswith("dist.")]]
    return [sys.executable, "-m", "harness.train", *overrides]


def reference_cmd(spec: Spec, out: Path, save: Path, root: Path = REPO, loop: str = "bench.reference") -> list[str]:
    """`python -m bench.reference` for one process, torchrun for several (as one would by hand);
    `loop`: another module that takes the reference's arguments (bench/peers/)."""
    args = ["-m", loop, f"--arch={spec.arch}", f"--steps={spec.steps}", f"--batch={spec.batch}",
            f"--log-every={spec.log_every}", f"--seed={spec.seed}", f"--device={spec.device}", f"--amp={spec.amp}",
            f"--schedule={'cosine' if cosine_schedule(root) else 'constant'}", f"--out={out}", f"--save={save}"]
    if spec.channels_last:
        args.append("--channels-last")
    if spec.check_sync:
        args.append("--check-sync")
    return [*torchrun(spec.world), *args] if spec.world > 1 else [sys.executable, *args]


def clean_env(spec: Spec, root: Path = REPO) -> dict[str, str]:
    return worker_env(spec.threads, root)


def worker_env(threads: int, root: Path = REPO) -> dict[str, str]:
    """This environment without rank or Slurm variables, `threads` per process, `root` first on the path."""
    env = {k: v for k, v in os.environ.items() if k not in DROP_ENV and not k.startswith("SLURM_")}
    # bytecode cached as on a user's machine (this sandbox sets PYTHONDONTWRITEBYTECODE): else every
    # command compiles the harness's modules anew, 65 ms of its start-up that no user pays
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env.update(OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1", HYDRA_FULL_ERROR="1")
    env["PYTHONPATH"] = os.pathsep.join([str(root), *filter(None, [env.get("PYTHONPATH")])])
    return env


@dataclass
class Run:
    """One finished command: its start and end (monotonic), and each rank's step clock record."""

    side: str  # reference | harness | harness-torchrun
    spec: Spec
    cmd: list[str]
    start: float
    end: float
    ranks: list[dict] = field(default_factory=list)
    checkpoint: str | None = None  # the final model state, for the weights comparison

    @property
    def wall_s(self) -> float:
        return self.end - self.start

    @property
    def first_step_s(self) -> float:
        """From the command's start until the last rank fetched its first batch (step 1 can run)."""
        return max(r["fetch_times"][0] for r in self.ranks) - self.start

    @property
    def exit_s(self) -> float:
        """From the last rank's last batch fetch (its last step starts) until the command exited:
        the last step, evaluation, the final checkpoint and tear-down."""
        return self.end - max(r["fetch_times"][-1] for r in self.ranks)

    @property
    def steady_ms(self) -> float:
        """(T(3N) - T(N)) / 2N on rank 0, in ms: whole steps only, start-up and tear-down cancel."""
        t, n = self.ranks[0]["fetch_times"], self.spec.n
        return (t[3 * n] - t[n]) / (2 * n) * 1e3

    @property
    def steady_cpu_ms(self) -> float:
        """The same window in rank 0's CPU time (all its threads), in ms per step."""
        t, n = self.ranks[0]["fetch_cpu_times"], self.spec.n
        return (t[3 * n] - t[n]) / (2 * n) * 1e3

    @property
    def peak_rss_mib(self) -> list[float]:
        return [r["peak_rss_mib"] for r in self.ranks]

    def summary(self) -> dict:
        return {"side": self.side, "cmd": self.cmd, "wall_s": self.wall_s, "first_step_s": self.first_step_s,
                "exit_s": self.exit_s, "steady_ms": self.steady_ms, "steady_cpu_ms": self.steady_cpu_ms,
                "peak_rss_mib": self.peak_rss_mib, "loop_rss_mib": [r["loop_rss_mib"] for r in self.ranks],
                "window_gc_ms": (self.ranks[0]["fetch_gc_times"][3 * self.spec.n]
                                 - self.ranks[0]["fetch_gc_times"][self.spec.n]) * 1e3,
                "cuda_max_allocated_mib": [r["cuda_max_allocated_mib"] for r in self.ranks],
                "threads": [r["threads"] for r in self.ranks], "sync_modes": [r["sync_modes"] for r in self.ranks]}


def execute(side: str, spec: Spec, workdir: Path, timeout_s: float = 300.0, root: Path = REPO,
            loop: str | None = None) -> Run:
    """Run one side once from `root` (the checkout or a snapshot), its files in `workdir` (emptied
    first); raises RunFailed with the output's tail. `loop`: a module taking the reference's
    arguments, run as the reference is (a peer framework's loop, bench/peers/)."""
    shutil.rmtree(workdir, ignore_errors=True)
    out, run_root = workdir / "clock", workdir / "runs"
    out.mkdir(parents=True)
    save = workdir / "reference.pt"
    if side == "reference" or loop:
        cmd = reference_cmd(spec, out, save, root, loop or "bench.reference")
    else:
        cmd = harness_cmd(spec, out, run_root, under_torchrun=side == "harness-torchrun", root=root)
    log = workdir / "output.log"
    with open(log, "wb") as f:
        start = time.monotonic()
        try:
            rc = subprocess.run(cmd, cwd=root, env=clean_env(spec, root), stdout=f, stderr=subprocess.STDOUT,
                                timeout=timeout_s).returncode
        except subprocess.TimeoutExpired:
            rc = None
        end = time.monotonic()
    tail = log.read_text(errors="replace")[-3000:]
    if rc != 0:
        raise RunFailed(f"{side} ({'timed out' if rc is None else f'exit {rc}'}): {' '.join(cmd)}\n{tail}")
    files = sorted(out.glob("rank*.json"))
    if len(files) != spec.world:
        raise RunFailed(f"{side}: {len(files)} step clocks for world size {spec.world} in {out}\n{tail}")
    ranks = sorted((json.loads(p.read_text()) for p in files), key=lambda r: r["rank"])
    if len(ranks[0]["fetch_times"]) != spec.steps:
        raise RunFailed(f"{side}: {len(ranks[0]['fetch_times'])} batches fetched, expected {spec.steps}\n{tail}")
    if spec.check_sync and not all(r["sync_modes"].get("error") for r in ranks):
        raise RunFailed(f"{side}: --check-sync, but no step ran under sync-debug 'error': "
                        f"{[r['sync_modes'] for r in ranks]}\n{tail}")
    ckpt = save if side == "reference" or loop else _newest_checkpoint(run_root)
    return Run(side, spec, cmd, start, end, ranks, str(ckpt) if ckpt and Path(ckpt).is_file() else None)


def _newest_checkpoint(run_root: Path) -> str | None:
    """The state file of the harness run's newest checkpoint (its model is under "model")."""
    from harness.checkpoint import resolve

    files = [f for run_dir in run_root.iterdir() if run_dir.is_dir() for f in resolve(run_dir)]
    return str(files[0]) if files else None


def same_weights(a: str | None, b: str | None) -> float | None:
    """Largest absolute difference between two checkpoints' model tensors (0.0: bitwise equal);
    None when either is missing; inf when their keys or shapes differ."""
    if a is None or b is None:
        return None
    import torch

    sa = torch.load(a, map_location="cpu", weights_only=True)["model"]
    sb = torch.load(b, map_location="cpu", weights_only=True)["model"]
    if sa.keys() != sb.keys() or any(sa[k].shape != sb[k].shape for k in sa):
        return float("inf")
    return max(((sa[k].double() - sb[k].double()).abs().max().item() for k in sa if sa[k].numel()), default=0.0)


def scratch(prefix: str = "harness-bench-") -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix))
