"""`ModelEMA`: YOLOv5's exponential moving average of a model's weights, with a ramped decay.

The average starts close to the model and slows down as updates accumulate:
decay(k) = decay * (1 - exp(-k / tau)) after k updates, so early, badly initialised weights fade fast.
Floating-point parameters and buffers are averaged; integer buffers (BN's num_batches_tracked) keep
the copy's value. The training loop decides when to call `update` (after each optimizer step).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from harness.utils.modules import copy_attr, de_parallel


class ModelEMA:
    """Keeps `self.ema`, an eval-mode copy of the model (unwrapped from DDP) without gradients."""

    def __init__(self, model: nn.Module, decay: float = 0.9999, tau: float = 2000, updates: int = 0) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ModelEMA decay={decay} must be in [0, 1)")
        if tau <= 0:
            raise ValueError(f"ModelEMA tau={tau} must be > 0 (updates over which the decay ramps up)")
        self.ema = copy.deepcopy(de_parallel(model)).eval()
        self.updates = updates  # number of EMA updates so far
        self.decay_max = decay
        self.tau = tau
        for p in self.ema.parameters():
            p.requires_grad_(False)

    def decay(self, updates: int) -> float:
        """The decay used by update number `updates` (1-based)."""
        return self.decay_max * (1 - math.exp(-updates / self.tau))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """ema = d * ema + (1 - d) * model for every floating-point entry of the state dict."""
        self.updates += 1
        d = self.decay(self.updates)
        msd = de_parallel(model).state_dict()
        for k, v in self.ema.state_dict().items():
            if v.dtype.is_floating_point:
                v *= d
                v += (1 - d) * msd[k].detach()

    def update_attr(self, model: nn.Module, include: Iterable[str] = (),
                    exclude: Iterable[str] = ("process_group", "reducer")) -> None:
        """Copy the model's public attributes (class names, strides, hyperparameters) onto the EMA."""
        copy_attr(self.ema, model, include, exclude)

    def state_dict(self) -> dict[str, Any]:
        """For checkpoints: the averaged weights and the update count (the decay ramp resumes from it)."""
        return {"ema": self.ema.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ema.load_state_dict(state["ema"])
        self.updates = int(state["updates"])
