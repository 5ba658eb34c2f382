"""The bench's dataset: digits-shaped synthetic samples that also time the step loop from inside.

Both sides of `make bench` (the harness job, through `data.dataset._target_=bench.data.Synthetic`,
and bench/reference.py) read batches of this dataset through a DataLoader. A DataLoader calls
`__getitems__` once per batch, at the top of each step, so its timestamps are the step boundaries
of whichever loop runs it: measured the same way for both sides, without touching harness code.
Timestamps are `time.monotonic()` (CLOCK_MONOTONIC on Linux: one clock for every process on the
machine, so the driver can subtract its own start time), with the process's CPU time next to each
(on a shared machine CPU time per step is far steadier than wall time). At exit each rank writes them, with its
peak memory, to `<out>/rank<r>.json`.

`check_sync=True` (CUDA) runs every step but the first, the last and the logging steps under
`torch.cuda.set_sync_debug_mode("error")`: a host-device sync anywhere else in the loop raises
where it happens. The first step may initialise lazily; the last one is followed by evaluation.
"""

from __future__ import annotations

import atexit
import gc
import json
import os
import resource
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import Dataset

SHAPE = (1, 8, 8)  # as the shipped digits, so harness.models.MLP / SmallCNN take them unchanged
CLASSES = 10
DISTINCT = 2048  # distinct samples held in memory; longer datasets cycle, so RSS stays the runtime's


def _current_rss_mib() -> float | None:
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def sync_mode(fetch: int, steps: int, log_every: int) -> str:
    """The sync-debug mode for the step that starts with batch `fetch` (0-based) of `steps`.

    The step that starts with batch k ends with optimizer step k + 1, which logs (one allowed sync)
    when (k + 1) % log_every == 0.
    """
    if fetch == 0 or fetch >= steps - 1 or (fetch + 1) % log_every == 0:
        return "default"
    return "error"


class StepClock:
    """Timestamps of batch fetches in one rank, written to `<out>/rank<r>.json` at exit."""

    def __init__(self, out: str | os.PathLike[str], steps: int, log_every: int, check_sync: bool,
                 set_sync_mode: Callable[[str], None] | None = None) -> None:
        self.out = Path(out)
        self.steps, self.log_every, self.check_sync = steps, log_every, check_sync
        self.rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        self.times: list[float] = []
        self.cpu_times: list[float] = []  # this process's CPU time: less disturbed by a busy machine
        self.modes: dict[str, int] = {}
        self.gc_s = 0.0  # time in Python's cyclic garbage collector so far: it grows with the heap
        self.gc_times: list[float] = []  # gc_s at each fetch
        self.gc_counts = [0, 0, 0]  # collections per generation
        self._gc_t0 = 0.0
        self.loop_rss_mib: float | None = None
        gc.callbacks.append(self._on_gc)
        self._set_mode = set_sync_mode or torch.cuda.set_sync_debug_mode
        atexit.register(self.write)

    def tick(self) -> None:
        fetch = len(self.times)
        self.times.append(time.monotonic())
        self.cpu_times.append(time.process_time())
        self.gc_times.append(self.gc_s)
        if fetch == self.steps - 1:  # the last step: the loop's own footprint, before evaluation and exit
            self.loop_rss_mib = _current_rss_mib()
        if self.check_sync:
            mode = sync_mode(fetch, self.steps, self.log_every)
            self.modes[mode] = self.modes.get(mode, 0) + 1
            self._set_mode(mode)

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._gc_t0 = time.perf_counter()
        else:
            self.gc_s += time.perf_counter() - self._gc_t0
            self.gc_counts[info["generation"]] += 1

    def record(self) -> dict[str, object]:
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        return {
            "rank": self.rank, "world_size": self.world, "pid": os.getpid(),
            "fetch_times": self.times, "fetch_cpu_times": self.cpu_times, "fetch_gc_times": self.gc_times,
            "gc_collections": self.gc_counts, "gc_objects": len(gc.get_objects()),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # KiB on Linux
            "loop_rss_mib": self.loop_rss_mib,
            "cuda_max_allocated_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
            "threads": torch.get_num_threads(),
            "sync_modes": self.modes,
        }

    def write(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        tmp = self.out / f".rank{self.rank}.json.tmp"
        tmp.write_text(json.dumps(self.record()))
        tmp.rename(self.out / f"rank{self.rank}.json")


class Synthetic(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """`steps` global batches of `batch` samples for split="train", one for "val".

    Called as the harness calls any dataset, `Synthetic(path=None, split=...)`, plus the bench's keys.
    `out` set (train split only): time every batch fetch (see the module docstring).
    """

    def __init__(self, path: str | None = None, split: str = "train", *, steps: int = 64, batch: int = 64,
                 log_every: int = 20, out: str | None = None, check_sync: bool = False, seed: int = 0) -> None:
        if split not in ("train", "val"):
            raise ValueError(f"split={split!r} is not 'train' or 'val'")
        self.n = steps * batch if split == "train" else batch
        g = torch.Generator().manual_seed(seed * 2 + (split == "val"))
        m = min(self.n, DISTINCT)
        self.images = torch.rand((m, *SHAPE), generator=g)
        self.labels = torch.randint(0, CLASSES, (m,), generator=g)
        self.clock = StepClock(out, steps, log_every, check_sync) if out and split == "train" else None

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        j = index % len(self.labels)
        return self.images[j], self.labels[j]

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if self.clock is not None:
            self.clock.tick()
        return [self[i] for i in indices]
