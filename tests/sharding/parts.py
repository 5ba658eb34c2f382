"""Parts for the sharded-training tests (tests/test_fsdp.py, tests/test_strategy.py).

Workers import them by `_target_` (the tests put the repository on PYTHONPATH).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from harness.data.datasets import Digits


class FewDigits(Digits):
    """The digits with only the first `val_samples` validation samples (a count that does not divide)."""

    def __init__(self, path: str | Path, split: str = "train", val_samples: int = 65) -> None:
        super().__init__(path, split)
        if split == "val":
            self.images, self.labels = self.images[:val_samples], self.labels[:val_samples]


class Scaled(nn.Module):
    """A model with a parameter of its own and no reset_parameters(): FSDP's meta build refuses it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 10)
        self.scale = nn.Parameter(torch.ones(10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1)) * self.scale


class ZeroHead(nn.Module):
    """Its constructor zeroes the head after the layers initialised themselves: lost on the meta device."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.head = nn.Linear(64, 32), nn.Linear(32, 10)
        nn.init.zeros_(self.head.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc(x.flatten(1))))
