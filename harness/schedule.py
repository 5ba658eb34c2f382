"""Learning-rate schedules as pure functions of the optimizer step (wrapped in LambdaLR)."""

from __future__ import annotations

import math

import torch


def lr_factor(step: int, *, total: int, warmup: int = 0, kind: str = "cosine", min_ratio: float = 0.0) -> float:
    """The factor on the base lr for optimizer step `step` (0-based): linear warmup, then cosine or flat."""
    if step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, *, total: int, warmup: int, kind: str,
                    min_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total=total, warmup=warmup, kind=kind, min_ratio=min_ratio)
    )
