"""Every rank's random generators as one checkpoint part.

Saving gathers each rank's torch CPU, CUDA, numpy and Python generator states to rank 0 (a
collective: every rank calls `state_dict`). Loading keeps this rank's own states for later: the loop
applies them once the epoch's data iterator exists, as the uninterrupted run did (`pending`). On
another world size there is no "own" state (rank r of 3 had no counterpart among 2 ranks), so the
streams restart from the seed and rank 0 says so once, naming them.
"""

from __future__ import annotations

import math
import random
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from harness.logs import get_logger

STREAMS = ("torch (CPU)", "CUDA", "numpy", "python")


def rng_state() -> dict[str, Any]:
    """This process's random generators, as tensors and numbers (so weights_only loads them)."""
    _, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)  # the MT19937 tuple (not a dict)
    assert isinstance(keys, np.ndarray)
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        "numpy": {"keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached": float(cached)},
        "python": {"version": int(version), "state": torch.tensor(internal, dtype=torch.int64),
                   "gauss_next": float("nan") if gauss_next is None else float(gauss_next)},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype("uint32"), n["pos"], n["has_gauss"], n["cached"]))
    p = state["python"]
    gauss = None if math.isnan(p["gauss_next"]) else p["gauss_next"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), gauss))


class RankStreams:
    """The `rng` part: {"world_size": W, "ranks": [rank 0's states, ..., rank W-1's]}."""

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size = rank, world_size
        self.pending: dict[str, Any] | None = None  # this rank's restored states, not yet applied

    def state_dict(self) -> dict[str, Any]:
        mine = rng_state()
        ranks: list[Any] = [mine]
        if self.world_size > 1:
            ranks = [None] * self.world_size
            dist.all_gather_object(ranks, mine)
        return {"world_size": self.world_size, "ranks": ranks}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = int(state["world_size"])
        if saved == self.world_size:
            self.pending = state["ranks"][self.rank]
            return
        self.pending = None
        if self.rank == 0:
            get_logger().warning(
                f"resuming on {self.world_size} rank(s) from a checkpoint saved on {saved}: the global batches "
                f"continue as before, but these random streams restart from the seed on every rank: "
                f"{', '.join(STREAMS)} (dropout, augmentation and other random draws differ from the "
                f"uninterrupted run)")
