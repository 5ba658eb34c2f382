"""Built-in models for the default job and the benchmarks. Users bring their own through `model._target_`."""

from __future__ import annotations

import torch
from torch import nn


def _conv_bn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SmallCNN(nn.Module):
    """Conv-BN-ReLU x3 with one 2x2 pool, global average pool, linear head; 56,554 parameters at width 32."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _conv_bn(in_channels, width),
            _conv_bn(width, 2 * width),
            nn.MaxPool2d(2),
            _conv_bn(2 * width, 2 * width),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class MLP(nn.Module):
    """Flatten -> Linear -> ReLU (-> Dropout) -> Linear: the tiny model the overhead benchmark uses.

    `dropout` > 0 makes training draw random numbers (the resume tests prove the RNG is restored);
    it shares the ReLU's slot, so the parameter names are the same with and without it.
    """

    def __init__(self, in_features: int = 64, hidden: int = 128, num_classes: int = 10, dropout: float = 0.0) -> None:
        super().__init__()
        act: nn.Module = nn.Sequential(nn.ReLU(), nn.Dropout(dropout)) if dropout else nn.ReLU()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(in_features, hidden), act, nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Tower(nn.Module):
    """Linear stem, `depth` residual blocks (Linear -> LayerNorm -> ReLU), linear head: about
    depth x width^2 parameters (12.7M at the defaults), for the sharded-training tests and bench."""

    def __init__(self, width: int = 1024, depth: int = 12, in_features: int = 64, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Linear(in_features, width)
        self.blocks = nn.Sequential(*[TowerBlock(width) for _ in range(depth)])
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x.flatten(1))))


class TowerBlock(nn.Module):
    """x + relu(norm(fc(x))): the unit `trainer.fsdp.wrap=[TowerBlock]` shards on its own."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc, self.norm = nn.Linear(width, width), nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.relu(self.norm(self.fc(x)))
