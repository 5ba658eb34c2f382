"""The user's dataset: interleaved noisy spirals, generated (so it needs no file: data.url is "")."""

import math

import torch
from torch.utils.data import TensorDataset


def spirals(path=None, split: str = "train", n_per_class: int = 400, classes: int = 3, seed: int = 0):
    """harness calls this as dataset(path=..., split=...); extra keys come from the config."""
    g = torch.Generator().manual_seed(seed + (0 if split == "train" else 1))
    xs, ys = [], []
    for c in range(classes):
        r = torch.linspace(0.05, 1.0, n_per_class)
        theta = r * 4.0 + c * 2 * math.pi / classes + 0.15 * torch.randn(n_per_class, generator=g)
        xs.append(torch.stack([r * torch.sin(theta), r * torch.cos(theta)], dim=1))
        ys.append(torch.full((n_per_class,), c))
    return TensorDataset(torch.cat(xs), torch.cat(ys))
