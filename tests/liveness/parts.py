"""Datasets and a model with hazards on one rank, for the liveness tests (tests/test_watchdog.py).

Workers import them by `_target_` (the tests put the repository on PYTHONPATH). `rank` is the
global rank the hazard applies to, read from RANK (torchrun, our launcher) or SLURM_PROCID.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import torch

from harness.data.datasets import Digits
from harness.models import SmallCNN


def _my_rank() -> int:
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


class HazardDigits(Digits):
    """The digits, where rank `rank` blocks for ever after `block_after` training samples, sleeps
    `item_s` per training sample (a slow rank), and `eval_s` once, on its first validation sample."""

    def __init__(self, path: str | Path, split: str = "train", rank: int = -1, block_after: int = -1,
                 item_s: float = 0.0, eval_s: float = 0.0) -> None:
        super().__init__(path, split)
        on = rank == _my_rank()
        self.split, self.block_after = split, block_after if on else -1
        self.item_s, self.eval_s = (item_s, eval_s) if on else (0.0, 0.0)
        self.served = 0

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.split == "train":
            self.served += 1
            if self.served == self.block_after:
                threading.Event().wait()  # a read that never returns (a hung file system, a dead mount)
            if self.item_s:
                time.sleep(self.item_s)
        elif self.eval_s:
            time.sleep(self.eval_s)  # a long evaluation, once
            self.eval_s = 0.0
        return super().__getitem__(index)


class HazardCNN(SmallCNN):
    """SmallCNN whose first forward on rank `rank` takes `first_s` longer (a slow first step: compile,
    warm-up), and whose first state_dict there takes `save_s` longer (a slow checkpoint write)."""

    def __init__(self, rank: int = -1, first_s: float = 0.0, save_s: float = 0.0, **kwargs: int) -> None:
        super().__init__(**kwargs)
        on = rank == _my_rank()
        self.first_s, self.save_s = (first_s, save_s) if on else (0.0, 0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.first_s:
            time.sleep(self.first_s)
            self.first_s = 0.0
        return super().forward(x)

    def state_dict(self, *args, **kwargs):  # type: ignore[no-untyped-def, override]
        if self.save_s:
            time.sleep(self.save_s)
            self.save_s = 0.0
        return super().state_dict(*args, **kwargs)
