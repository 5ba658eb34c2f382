"""Built-in datasets. Each is called as `Dataset(path=<cached file>, split="train" | "val")`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

SPLITS = ("train", "val")


class Digits(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """The 8x8 handwritten digits: 1 x 8 x 8 float images in [0, 1], integer labels 0-9.

    The file is an .npz with x_train/y_train/x_val/y_val (uint8); the split is fixed and stratified.
    """

    def __init__(self, path: str | Path, split: str = "train") -> None:
        if split not in SPLITS:
            raise ValueError(f"split={split!r} is not one of {SPLITS}")
        with np.load(path) as arrays:
            x = arrays[f"x_{split}"]
            y = arrays[f"y_{split}"]
        self.images = torch.from_numpy(x.astype(np.float32) / 16.0).unsqueeze(1)
        self.labels = torch.from_numpy(y.astype(np.int64))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.labels[index]
