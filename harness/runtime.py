"""One process's runtime in a run: its device, its process group, the run directory, its logs.

Owns the worker-side start-up that every way of starting shares (in-process launcher, torchrun,
srun, a user's own script): read the environment, pick and pin the device before CUDA starts,
join the process group, agree on the run directory, open the logs, print the banner; and tear it
all down in `finally`. This is also the Python API for people who write their own training script:

    with harness.session(device="cpu", seed=0) as s:
        model = MyNet().to(s.device)
        harness.fit(model=model, ..., device=s.device, run_dir=s.run_dir)
"""

from __future__ import annotations

import os
import random
import socket
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from harness import dist as hdist
from harness import logs, rundir, watchdog
from harness.devices import Placement, count_visible_gpus, parse_device, place
from harness.env import DistEnv, detect, run_id
from harness.utils.device import banner_for


@dataclass(frozen=True)
class Session:
    env: DistEnv
    device: torch.device
    run_dir: Path

    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def world_size(self) -> int:
        return self.env.world_size

    @property
    def is_master(self) -> bool:
        return self.env.rank == 0


def _placement(device: object, env: DistEnv, environ: Mapping[str, str]) -> Placement:
    """This process's devices (devices.place), from the facts here; pins its mask before CUDA starts.

    Our own launcher already set the mask for its workers (HARNESS_LAUNCHED marks them); under plain
    torchrun or srun, or a script of one's own, `device=2,3` becomes CUDA_VISIBLE_DEVICES=2,3 here."""
    current = environ.get("CUDA_VISIBLE_DEVICES")
    visible = 0 if parse_device(device).kind == "cpu" else count_visible_gpus()  # NVML only when asked
    placement = place(device, shape="launched" if "HARNESS_LAUNCHED" in environ else "worker",
                      visible_gpus=visible, current_mask=current, cuda_initialized=torch.cuda.is_initialized(),
                      local_rank=env.local_rank, local_world_size=env.local_world_size)
    if placement.mask is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = placement.mask
    return placement


def _deterministic(on: bool) -> Callable[[], None]:
    """Deterministic algorithms for this session (process-wide in torch); returns what puts back the
    settings it found, so that a second session in the same process starts as the first did."""
    if not on:
        return lambda: None
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark,
              os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False

    def restore() -> None:
        torch.use_deterministic_algorithms(before[0])
        torch.backends.cudnn.benchmark = before[1]
        if before[2] is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)

    return restore


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


@contextmanager
def session(
    *,
    device: object = "",
    backend: str = "auto",
    timeout_s: float = 600.0,
    run_root: str | os.PathLike[str] = "runs",
    run_id_override: str | None = None,
    deterministic: bool = False,
    liveness: watchdog.WatchdogConfig | None = watchdog.WatchdogConfig(),  # noqa: B008 (frozen)
    environ: Mapping[str, str] | None = None,
) -> Iterator[Session]:
    """Start this process's part of a run (see module docstring); always tears down.

    `liveness`: the watchdog's bounds (None: no watchdog). With more than one rank it runs for the
    whole session; a lost peer ends the session with watchdog.PeerLostError on every survivor."""
    environ = os.environ if environ is None else environ
    env = detect(environ)
    if env.mode == "launcher":
        env = DistEnv("launcher", restart_count=env.restart_count)  # one process: rank 0 of 1
    placement = _placement(device, env, environ)
    restore = _deterministic(deterministic)
    chosen = backend if backend != "auto" else ("nccl" if placement.cuda else "gloo")
    log = logs.setup_console(env.rank)
    try:
        dev = hdist.init(env, backend=chosen, timeout_s=timeout_s, gpu=placement.index)
        with watchdog.watching(liveness) as wd:
            root = Path(run_root)
            rid = run_id_override or run_id(environ)
            if rid is None:  # torchrun without --rdzv-id: rank 0 picks a fresh timestamp and shares it
                rid = hdist.share_from_master(rundir.create_unique(root).name if env.rank == 0 else None)
            run_dir = rundir.ensure(root, rid)
            rundir.check_shared(run_dir, env.rank)  # all ranks see rank 0's directory, or all refuse
            logs.setup_files(run_dir, env.rank)
            if wd is not None:
                wd.run_dir = run_dir
            if env.rank == 0:
                log.info(banner_for([dev.index or 0] if dev.type == "cuda" else []))
                log.info(f"run directory {run_dir} ({env.mode}, world size {env.world_size}, backend {chosen})")
            log.info(f"rank {env.rank}/{env.world_size} (local {env.local_rank}, host {socket.gethostname()}, "
                     f"pid {os.getpid()}) on {dev}; "
                     f"torch threads {torch.get_num_threads()}, OMP_NUM_THREADS={environ.get('OMP_NUM_THREADS')}, "
                     f"CUDA_VISIBLE_DEVICES={environ.get('CUDA_VISIBLE_DEVICES')}")
            yield Session(env, dev, run_dir)
    finally:
        logs.close()
        hdist.teardown()
        restore()
