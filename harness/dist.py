"""The process group, rank helpers, and rank-0-first execution.

Owns: `init` / `teardown` of torch.distributed for the three worker shapes (torchrun's env://, a
Slurm step's tcp:// to rank 0), the rank helpers the rest of the code asks, and `zero_first`, the
context that lets one rank prepare (download, verify, cache) while the others wait.

`zero_first` never parks the waiters in a collective. The master publishes its outcome through the
process group's key-value store when it leaves the body (`ok`, or `error: <type>: <message>`) and
bumps a heartbeat while inside it; the waiters poll the store. So a master that raises stops every
rank at once with its message, a master that dies or freezes is noticed after `dead_after` seconds,
and a slow master with a live heartbeat is simply waited for.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Literal

import torch
import torch.distributed as dist

from harness.env import DistEnv

POLL_S = 0.01  # waiter's store poll: the release latency of zero_first
HEARTBEAT_S = 1.0  # master's heartbeat period
ACK_WAIT_S = 1.0  # how long a failed master waits for the others to read its error


class ZeroFirstError(RuntimeError):
    """Raised on a waiting rank when the master rank failed, died or stopped responding."""


_ENV: DistEnv = DistEnv("launcher")
_generations: Counter[str] = Counter()


def init(env: DistEnv, *, backend: str, timeout_s: float, cuda: bool) -> torch.device:
    """Pick this rank's device and, for world size > 1, join the process group."""
    global _ENV
    _ENV = env
    if cuda:
        # a task that sees one GPU (srun --gpus-per-task) uses it; else visible GPU LOCAL_RANK
        index = 0 if torch.cuda.device_count() == 1 else env.local_rank
        device = torch.device("cuda", index)
        torch.cuda.set_device(device)  # before init: NCCL binds the current device
    else:
        device = torch.device("cpu")
    if env.world_size > 1 and not dist.is_initialized():
        kwargs: dict = {"backend": backend, "timeout": timedelta(seconds=timeout_s)}
        if env.mode == "slurm":
            # rank 0 hosts the store on the first node; every task knows the address from the hostlist
            kwargs.update(init_method=f"tcp://{env.master_addr}:{env.master_port}",
                          rank=env.rank, world_size=env.world_size)
        if cuda:
            kwargs["device_id"] = device
        dist.init_process_group(**kwargs)
    return device


def teardown() -> None:
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


def _store() -> dist.Store:
    return dist.distributed_c10d._get_default_store()


def share_from_master(key: str, value: str | None) -> str:
    """Rank 0 publishes `value` under `key`; every rank returns it. Without a group, returns `value`."""
    if not dist.is_initialized():
        assert value is not None
        return value
    full = f"harness/share/{_ENV.restart_count}/{key}/{_next_generation('share:' + key)}"
    if is_master():
        assert value is not None
        _store().set(full, value)
        return value
    return _store().get(full).decode()


def _next_generation(name: str) -> int:
    _generations[name] += 1
    return _generations[name]


@contextmanager
def zero_first(
    name: str = "default",
    scope: Literal["local", "global"] = "local",
    dead_after: float = 30.0,
    timeout: float | None = None,
) -> Iterator[None]:
    """Run the body on the master first (local rank 0 per node, or rank 0), then on the others.

    The others wait outside any collective; if the master raises, dies, or stops its heartbeat for
    `dead_after` seconds, they raise ZeroFirstError carrying the reason instead of hanging. `timeout`
    bounds the total wait (None: wait as long as the master is alive). Without a process group the
    context does nothing.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        yield
        return
    if scope not in ("local", "global"):
        raise ValueError(f"zero_first scope={scope!r} is not 'local' or 'global'")
    me = dist.get_rank()
    if scope == "local":
        master = me - _ENV.local_rank
        group, waiters = f"node{_ENV.node_rank}", _ENV.local_world_size - 1
        is_master_here = _ENV.local_rank == 0
    else:
        master, group, waiters, is_master_here = 0, "all", dist.get_world_size() - 1, me == 0
    prefix = f"harness/zero_first/{name}/{_ENV.restart_count}/{_next_generation(name)}/{group}"
    store = _store()
    if is_master_here:
        with _heartbeat(store, prefix + "/hb"):
            try:
                yield
            except BaseException as exc:
                store.set(prefix + "/status", f"error: {type(exc).__name__}: {exc}")
                _wait_for_acks(store, prefix + "/ack", waiters)
                raise
        store.set(prefix + "/status", "ok")
    else:
        _wait_for_master(store, prefix, master, dead_after, timeout)
        yield


@contextmanager
def _heartbeat(store: dist.Store, key: str) -> Iterator[None]:
    stop = threading.Event()

    def beat() -> None:
        while True:
            try:
                store.add(key, 1)
            except Exception:  # the store went away: the waiters will notice on their own
                return
            if stop.wait(HEARTBEAT_S):
                return

    thread = threading.Thread(target=beat, name="zero_first-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _wait_for_acks(store: dist.Store, key: str, waiters: int) -> None:
    deadline = time.monotonic() + ACK_WAIT_S
    try:
        while time.monotonic() < deadline:
            if store.check([key]) and store.add(key, 0) >= waiters:
                return
            time.sleep(POLL_S)
    except Exception:
        return


def _wait_for_master(store: dist.Store, prefix: str, master: int, dead_after: float, timeout: float | None) -> None:
    status_key, hb_key = prefix + "/status", prefix + "/hb"
    start = last_change = time.monotonic()
    last_beat = -1
    try:
        while True:
            if store.check([status_key]):
                status = store.get(status_key).decode()
                if status == "ok":
                    return
                store.add(prefix + "/ack", 1)
                raise ZeroFirstError(f"rank {master} failed while preparing ({status.removeprefix('error: ')})")
            now = time.monotonic()
            beat = store.add(hb_key, 0)
            if beat != last_beat:
                last_beat, last_change = beat, now
            elif now - last_change > dead_after:
                raise ZeroFirstError(
                    f"rank {master} stopped responding: no heartbeat for {now - last_change:.1f}s "
                    f"(dead_after={dead_after}s) while it was preparing"
                )
            if timeout is not None and now - start > timeout:
                raise ZeroFirstError(f"rank {master} did not finish preparing within timeout={timeout}s")
            time.sleep(POLL_S)
    except ZeroFirstError:
        raise
    except Exception as exc:  # the store itself is gone: where rank 0 hosts it, rank 0 died
        raise ZeroFirstError(f"lost contact with rank {master} while it was preparing: "
                             f"{type(exc).__name__}: {exc}") from exc


@contextmanager
def torch_distributed_zero_first(local_rank: int) -> Iterator[None]:
    """YOLOv5's drop-in: local rank 0 of each node first, the others after; -1 means no group."""
    if local_rank == -1:
        yield
        return
    with zero_first("torch_distributed_zero_first", scope="local"):
        yield


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t

