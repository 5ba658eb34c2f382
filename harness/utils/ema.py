"""`ModelEMA`: YOLOv5's exponential moving average of a model's weights, with a ramped decay.

The average starts close to the model and slows down as updates accumulate:
decay(k) = decay * (1 - exp(-k / tau)) after k updates, so early, badly initialised weights fade fast.
Floating-point parameters and buffers are averaged; integer buffers (BN's num_batches_tracked) keep
the copy's value. The training loop decides when to call `update` (after each optimizer step).

`ShardEMA` is the same average for a model that cannot be copied (an FSDP module: deepcopy raises):
it keeps its own copies of the model's floating-point tensors, for FSDP this rank's shards (DTensors,
1/N of the model), and swaps them into the model to evaluate it. Same decay, same arithmetic.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from harness.utils.modules import copy_attr, de_parallel


def ramped_decay(decay: float, tau: float, updates: int) -> float:
    return decay * (1 - math.exp(-updates / tau))


def _check(decay: float, tau: float) -> None:
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"ModelEMA decay={decay} must be in [0, 1)")
    if tau <= 0:
        raise ValueError(f"ModelEMA tau={tau} must be > 0 (updates over which the decay ramps up)")


class ModelEMA:
    """Keeps `self.ema`, an eval-mode copy of the model (unwrapped from DDP) without gradients."""

    def __init__(self, model: nn.Module, decay: float = 0.9999, tau: float = 2000, updates: int = 0) -> None:
        _check(decay, tau)
        self.ema = copy.deepcopy(de_parallel(model)).eval()
        self.updates = updates  # number of EMA updates so far
        self.decay_max = decay
        self.tau = tau
        for p in self.ema.parameters():
            p.requires_grad_(False)

    def decay(self, updates: int) -> float:
        """The decay used by update number `updates` (1-based)."""
        return ramped_decay(self.decay_max, self.tau, updates)

    @contextmanager
    def evaluated(self, model: nn.Module) -> Iterator[nn.Module]:
        """The module that carries the averaged weights: the copy."""
        yield self.ema

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


class ShardEMA:
    """An EMA of the model's own floating-point tensors (parameters and buffers, sharded or not)."""

    def __init__(self, model: nn.Module, decay: float = 0.9999, tau: float = 2000, updates: int = 0) -> None:
        _check(decay, tau)
        # the model's tensors themselves (FSDP keeps the same sharded parameters and buffers for the run)
        self.live = {k: v for k, v in model.state_dict(keep_vars=True).items() if v.dtype.is_floating_point}
        self.shadow = {k: v.detach().clone() for k, v in self.live.items()}
        self.updates, self.decay_max, self.tau = updates, decay, tau

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = ramped_decay(self.decay_max, self.tau, self.updates)
        for k, v in self.shadow.items():
            v *= d
            v += (1 - d) * self.live[k].detach()

    @contextmanager
    def evaluated(self, model: nn.Module) -> Iterator[nn.Module]:
        """`model` carrying the averaged weights for the duration (its own weights put back after)."""
        with torch.no_grad():
            kept = {k: v.detach().clone() for k, v in self.live.items()}
            for k, v in self.live.items():
                v.copy_(self.shadow[k])
        try:
            yield model
        finally:
            with torch.no_grad():
                for k, v in self.live.items():
                    v.copy_(kept[k])

    def state_dict(self) -> dict[str, Any]:
        """The averaged tensors under the model's state-dict keys, as ModelEMA's, and the update count."""
        return {"ema": self.shadow, "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            for k, v in self.shadow.items():
                if state["ema"][k] is not v:
                    v.copy_(state["ema"][k])
        self.updates = int(state["updates"])
