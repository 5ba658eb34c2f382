"""The process group and the rank helpers.

Owns: `init` / `teardown` of torch.distributed for the three worker shapes (torchrun's env://, a
Slurm step's tcp:// to rank 0), the final barrier (`meet`), the store, and the rank helpers the
rest of the code asks. Liveness is harness/health.py and harness/watchdog.py; rank-0-first is
harness/zero_first.py.
"""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist

from harness.env import DistEnv

_ENV: DistEnv = DistEnv("launcher")


def init(env: DistEnv, *, backend: str, timeout_s: float, gpu: int | None) -> torch.device:
    """Use visible GPU `gpu` (None: the CPU; which one is devices.place's decision) and, for world
    size > 1, join the process group."""
    global _ENV
    _ENV = env
    device = torch.device("cpu") if gpu is None else torch.device("cuda", gpu)
    if gpu is not None:
        torch.cuda.set_device(device)  # before init: NCCL binds the current device
    if env.world_size > 1 and not dist.is_initialized():
        kwargs: dict = {"backend": backend, "timeout": timedelta(seconds=timeout_s)}
        if env.mode == "slurm":
            # rank 0 hosts the store on the first node; every task knows the address from the hostlist
            kwargs.update(init_method=f"tcp://{env.master_addr}:{env.master_port}",
                          rank=env.rank, world_size=env.world_size)
        if gpu is not None:
            kwargs["device_id"] = device
        dist.init_process_group(**kwargs)
    return device


def ensure_group(device: torch.device) -> None:
    """A one-rank process group where there is none (world size 1), for code that needs a group
    whatever the world size (FSDP's device mesh); `teardown` ends it as it ends any other."""
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                                world_size=1)


def meet() -> None:
    """Every rank got here without an error: meet at a barrier before leaving, so no rank tears its
    connections down while a peer still uses them (seen: a gloo rank aborting with 'terminate called
    without an active exception' when its peer left first)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def teardown() -> None:
    """Leave the process group and forget this process's environment: a second session starts clean."""
    global _ENV
    _ENV = DistEnv("launcher")
    if dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_master() -> bool:
    return rank() == 0


def env() -> DistEnv:
    """The environment this process was initialised with."""
    return _ENV


def store() -> dist.Store:
    """The default process group's key-value store (the main thread's connection to it)."""
    return dist.distributed_c10d._get_default_store()


def share_from_master(value: str | None) -> str:
    """Rank 0's `value` on every rank (a collective: every rank calls it). Without a group, `value`.

    A broadcast rather than a store key: no key can outlive its group (the agent's store does, across
    restarts) or be named differently on two ranks of one group (an agent restarts its workers for a
    membership change without counting it, so after a lost node one group can mix
    TORCHELASTIC_RESTART_COUNT 0 and 1: tests/multinode/test_lost_node.py)."""
    if not dist.is_initialized():
        assert value is not None
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    assert box[0] is not None
    return box[0]


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t

