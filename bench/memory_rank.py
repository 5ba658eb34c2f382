"""One rank of the memory bench (bench/memory.py): build, train a few steps, count, time a checkpoint.

    python -m bench.memory_rank --strategy fsdp --out DIR ...                          # world size 1
    python -m torch.distributed.run --standalone --nproc-per-node 2 -m bench.memory_rank ...

Builds harness.models.Tower through harness.strategy (`choose(...).build(make, device)`, then
`.wrap`) from the seed, as harness/job.py does, with AdamW; takes `--warmup` + 1 + `--steps` optimizer
steps on synthetic data (this rank's slice of a fixed global batch); then writes `<out>/rank<r>.json`:

    param_bytes     this rank's parameters (a DTensor counts its local shard, `to_local()`)
    param_storage   the bytes behind them: FSDP keeps each shard in padded storage (dim 0 rounded up
                    to a multiple of the world size), so this is what the rank really holds
    grad_bytes      the gradients after the last backward (local shards under fsdp)
    optim_bytes     AdamW's state (exp_avg, exp_avg_sq: local shards; `step`: one 0-dim tensor per
                    parameter, which every rank keeps whole: optim_scalar_bytes says how much of it)
    build_peak      the resident-set high-water mark while `build` ran, over the resident set just
                    before it (Linux: VmHWM, reset through /proc/self/clear_refs right before the
                    build; elsewhere ru_maxrss, which cannot be reset: then a lifetime peak). A
                    tiny Tower is built and dropped first, so that what any first build pays once
                    (imports, the process group, caches) is in the baseline, not in the figure
    build_held      what stays resident after the build, over the same baseline
    train_peak      the high-water mark over the build, the wrap and the --warmup steps, same baseline
    step_ms         each of --steps steps (forward, backward, optimizer step) after those, wall clock
    step_cpu_ms     the same steps' CPU time, all of the process's threads (gloo's too): steadier on a
                    shared machine, but blind to time spent waiting for a peer
    save_s/load_s   a Checkpointer (harness.checkpoint) save and restore of model, optimizer and
                    counters, between barriers, so each is the slowest rank's time

What the numbers mean and how they compare is the driver's (bench/memory.py).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import re
import resource
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from harness import dist as hdist
from harness import strategy
from harness.checkpoint import Checkpointer, Store
from harness.config import FsdpConfig
from harness.env import detect
from harness.models import Tower

CLEAR_REFS = Path("/proc/self/clear_refs")
STATUS = Path("/proc/self/status")
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters (malloc.h)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--strategy", required=True, choices=["ddp", "fsdp"])
    p.add_argument("--width", type=int, default=0, help="Tower width; 0 = Tower's default")
    p.add_argument("--depth", type=int, default=0, help="Tower depth; 0 = Tower's default")
    p.add_argument("--wrap", default="TowerBlock", help="trainer.fsdp.wrap, comma-separated; '' = size policy")
    p.add_argument("--batch", type=int, default=64, help="global batch (split over the ranks)")
    p.add_argument("--warmup", type=int, default=2, help="steps counted in train_peak, before the timed ones")
    p.add_argument("--steps", type=int, default=6, help="measured steps")
    p.add_argument("--ckpt-rounds", type=int, default=2, help="checkpoint saves and loads timed (0 = none)")
    p.add_argument("--ckpt-dir", default="", help="where the checkpoints go; required with --ckpt-rounds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="directory for rank<r>.json")
    return p.parse_args(argv)


def _status_kib(key: str) -> int:
    m = re.search(rf"^{key}:\s+(\d+) kB", STATUS.read_text(), flags=re.M)
    assert m is not None, key
    return int(m.group(1))


class Resident:
    """This process's resident set and its high-water mark, in bytes, and glibc's malloc settings.

    The resident set counts what malloc took from the kernel, not the tensors alive: glibc serves
    an allocation above its mmap threshold with mmap and unmaps it on free, but raises that
    threshold to the size of each such block freed (up to 32 MiB), after which blocks of that size
    come from the heap and stay mapped when freed. So by default a freed 4 MiB buffer stays in the
    resident set, and peaks measure fragmentation as much as tensors. `exact()` pins the threshold
    at 128 KiB (glibc's starting value): every tensor above it is mapped while alive and gone after,
    so the peak is the live tensors' peak plus small change. Those page faults slow every step,
    so `steady()` sets what glibc's own adjustment would reach (32 MiB; trim at 64 MiB) before steps
    are timed."""

    def __init__(self) -> None:
        # the kernel's VmHWM can be reset (clear_refs "5", Linux >= 4.0): a peak of one phase alone
        self.resettable = CLEAR_REFS.exists() and STATUS.exists()
        self.method = "VmHWM after clear_refs" if self.resettable else "ru_maxrss (lifetime peak)"
        try:
            libc: Any = ctypes.CDLL("libc.so.6")
        except OSError:
            libc = None
        # not glibc: the resident set as the allocator leaves it
        self.libc = libc if hasattr(libc, "mallopt") else None
        self.malloc = "default"

    def _mallopt(self, mmap_threshold: int, trim_threshold: int, name: str) -> None:
        if self.libc is not None and self.libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold) \
                and self.libc.mallopt(M_TRIM_THRESHOLD, trim_threshold):
            self.malloc = name

    def exact(self) -> None:
        self._mallopt(128 * 1024, 128 * 1024, "mmap above 128 KiB")

    def steady(self) -> None:
        self._mallopt(32 * 2**20, 64 * 2**20, "mmap above 32 MiB")

    def now(self) -> int:
        if STATUS.exists():
            return _status_kib("VmRSS") * 1024
        import psutil

        return int(psutil.Process().memory_info().rss)

    def peak(self) -> int:
        if self.resettable:
            return _status_kib("VmHWM") * 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def reset_peak(self) -> None:
        if self.resettable:
            CLEAR_REFS.write_text("5")


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def tensor_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """This rank's bytes of parameters (and the storage behind them), gradients and optimizer state."""
    params = [local(p) for p in model.parameters()]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in params}
    grads = [local(p.grad) for p in model.parameters() if p.grad is not None]
    state = [local(v) for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    return {"param_bytes": sum(map(nbytes, params)), "param_storage": sum(storages.values()),
            "param_count": sum(t.numel() for t in params),
            "buffer_bytes": sum(nbytes(local(b)) for b in model.buffers()),
            "grad_bytes": sum(map(nbytes, grads)), "optim_bytes": sum(map(nbytes, state)),
            "optim_scalar_bytes": sum(nbytes(t) for t in state if t.dim() == 0)}


class Counters:
    """The checkpoint's required `progress` and `scheduler` parts, for a loop that has neither."""

    def __init__(self, step: int) -> None:
        self.state = {"epoch": 0, "step_in_epoch": step, "step": step, "epoch_loss": 0.0, "best": 0.0}

    def state_dict(self) -> dict[str, Any]:
        return dict(self.state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = dict(state)


def time_checkpoints(how: strategy.Strategy, model: nn.Module, optimizer: torch.optim.Optimizer, directory: Path,
                     rounds: int, step: int) -> dict[str, Any]:
    """Save and restore `rounds` times through harness.checkpoint, the way the loop does."""
    parts = {**how.parts(model, optimizer), "scheduler": Counters(0), "progress": Counters(step)}
    ckpt = Checkpointer(parts, directory=directory, rank=hdist.rank(), world_size=hdist.world_size(), keep=1,
                        config="", device=torch.device("cpu"), sharded=("model", "optimizer") if how.sharded else ())
    save_s, load_s = [], []
    for _ in range(rounds):  # hdist.meet: a barrier at world size > 1
        hdist.meet()
        t0 = time.perf_counter()
        ckpt.save(best=False, metrics={})
        hdist.meet()  # a save is done when every rank's files are
        save_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        ckpt.restore(str(directory))
        hdist.meet()
        load_s.append(time.perf_counter() - t0)
    entries = Store(directory).entries()
    files = [f for f in entries[-1].rglob("*") if f.is_file()] if entries else []
    return {"save_s": save_s, "load_s": load_s, "ckpt_bytes": sum(f.stat().st_size for f in files),
            "ckpt_files": len(files)}


def warm_up(how: strategy.Strategy, device: torch.device) -> None:
    """One step of a tiny Tower, dropped: the lazy imports, the one-rank group, the mesh, autograd's and
    the dispatcher's caches that any first build and step pay (~40 MiB under fsdp, measured) go into
    the baseline instead of the figures, which then scale with the model."""
    tiny = how.build(lambda: Tower(width=8, depth=1), device)
    optimizer = torch.optim.AdamW(tiny.parameters())
    how.wrap(tiny, device)(torch.zeros(2, tiny.stem.in_features)).sum().backward()
    optimizer.step()


def train(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    rank, world = hdist.rank(), hdist.world_size()
    shape = {k: v for k, v in (("width", args.width), ("depth", args.depth)) if v}
    wrap = [w for w in args.wrap.split(",") if w]
    how = strategy.choose(args.strategy, world, FsdpConfig(wrap=wrap))
    resident = Resident()
    warm_up(how, device)
    resident.exact()
    peaks_malloc = resident.malloc
    torch.manual_seed(args.seed)  # the same initial weights on every rank and for both strategies
    gc.collect()
    base = resident.now()
    resident.reset_peak()
    model = how.build(lambda: Tower(**shape), device)
    build_peak, build_held = resident.peak() - base, resident.now() - base
    forward = how.wrap(model, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    per_rank = args.batch // world
    g = torch.Generator().manual_seed(args.seed + 1)  # one global batch; each rank takes its slice
    x = torch.randn(args.batch, model.stem.in_features, generator=g)[rank * per_rank:(rank + 1) * per_rank]
    y = torch.randint(0, model.head.out_features, (args.batch,), generator=g)[rank * per_rank:(rank + 1) * per_rank]

    def step() -> tuple[float, float]:
        t0, c0 = time.perf_counter(), time.process_time()
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(forward(x), y).backward()
        optimizer.step()
        return (time.perf_counter() - t0) * 1e3, (time.process_time() - c0) * 1e3

    for _ in range(args.warmup):
        step()
    train_peak = resident.peak() - base
    resident.steady()
    step()  # the heap grows to the steps' working set once, untimed
    step_ms, step_cpu_ms = zip(*[step() for _ in range(args.steps)], strict=True)
    record: dict[str, Any] = {
        "rank": rank, "world": world, "strategy": args.strategy, "resolved": how.name, "model": shape,
        "wrap": wrap, "batch": args.batch, **tensor_bytes(model, optimizer), "build_peak": build_peak,
        "build_held": build_held, "train_peak": train_peak, "baseline_rss": base, "rss_method": resident.method,
        "malloc": {"peaks": peaks_malloc, "steps": resident.malloc},
        "step_ms": list(step_ms), "step_cpu_ms": list(step_cpu_ms), "threads": torch.get_num_threads()}
    if args.ckpt_rounds:
        record.update(time_checkpoints(how, model, optimizer, Path(args.ckpt_dir), args.ckpt_rounds,
                                       args.warmup + 1 + args.steps))
    return record


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.ckpt_rounds and not args.ckpt_dir:
        raise SystemExit("--ckpt-rounds needs --ckpt-dir")
    env = detect(os.environ)
    if args.batch % env.world_size:
        raise SystemExit(f"global batch {args.batch} is not divisible by world size {env.world_size}")
    device = hdist.init(env, backend="gloo", timeout_s=300.0, gpu=None)
    try:
        record = train(args, device)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"rank{record['rank']}.json").write_text(json.dumps(record))
        hdist.meet()
    finally:
        hdist.teardown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
