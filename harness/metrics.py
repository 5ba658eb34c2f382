"""Metrics as (sum, count) pairs, so evaluation over ranks is exact: all-reduce both, then divide.

A user metric is any callable `metric(outputs, targets) -> (sum: Tensor, count: int | Tensor)` with an
optional `name` attribute (the column in metrics.csv). No `.item()` here: sums stay on the device.
"""

from __future__ import annotations

import torch


class Accuracy:
    """Top-k classification accuracy."""

    def __init__(self, top_k: int = 1) -> None:
        self.top_k = top_k
        self.name = "accuracy" if top_k == 1 else f"top{top_k}_accuracy"

    def __call__(self, outputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, int]:
        top = outputs.topk(self.top_k, dim=1).indices
        correct = (top == targets.unsqueeze(1)).any(dim=1)
        return correct.sum(), targets.numel()
