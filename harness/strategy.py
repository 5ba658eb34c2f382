"""How the model is spread over the ranks: one choice per run, asked by the job and by the loop.

    none   the bare module (world size 1 with trainer.strategy auto or ddp: a one-rank DDP wrapper
           costs ~30% per step on small models, measured)
    ddp    DistributedDataParallel: every rank holds the whole model, optimizer state and gradients;
           gradients are all-reduced
    fsdp   FSDP2 (harness/fsdp.py): parameters, gradients and optimizer state sharded over the ranks;
           checkpoints are sharded (one file per rank, torch.distributed.checkpoint) and resume on
           any world size. At world size 1 the same code runs on a one-rank mesh: nothing is split,
           but the checkpoints are the sharded kind, so a run can move between 1 and N ranks.

Owns what differs between them: building the model, wrapping it for the forward, skipping the
gradient sync on non-final micro-steps, the EMA's kind, and the model's and optimizer's parts of a
checkpoint. Everything else in the loop is the same for all three.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from harness.config import STRATEGIES, ConfigError, FsdpConfig
from harness.utils.ema import ModelEMA, ShardEMA


@dataclass(frozen=True)
class Strategy:
    name: str  # none | ddp | fsdp
    fsdp: FsdpConfig
    bf16: bool = False  # trainer.amp=bf16: FSDP's mixed-precision policy (autocast is the loop's)

    @property
    def sharded(self) -> bool:
        """Every forward is a collective (parameters are gathered), and checkpoints are sharded."""
        return self.name == "fsdp"

    def build(self, make: Callable[[], nn.Module], device: torch.device) -> nn.Module:
        """The model on `device`, drawn from the current random state (the same weights for all three)."""
        if self.sharded:
            from harness import fsdp

            return fsdp.build(make, device=device, cfg=self.fsdp, bf16=self.bf16)
        return make().to(device)

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """What the loop calls forward on."""
        if self.name == "ddp":
            # gradients as views of DDP's all-reduce buckets: one copy of every gradient less per step
            return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None,
                                           gradient_as_bucket_view=True)
        if self.sharded:
            from torch.distributed.fsdp import FSDPModule

            if not isinstance(model, FSDPModule):
                raise ConfigError("trainer.strategy=fsdp: the model must be sharded before its optimizer is "
                                  "made; build it with harness.strategy.choose(...).build(make_model, device)")
        return model

    def no_sync(self, forward: nn.Module) -> AbstractContextManager[Any]:
        """Around a non-final micro-step: accumulate gradients locally, communicate nothing."""
        if isinstance(forward, DistributedDataParallel):
            return forward.no_sync()
        if self.sharded:
            return _fsdp_no_sync(forward)
        return nullcontext()

    def ema(self, model: nn.Module, decay: float, tau: float) -> ModelEMA | ShardEMA:
        return ShardEMA(model, decay=decay, tau=tau) if self.sharded else ModelEMA(model, decay=decay, tau=tau)

    def parts(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The model's and optimizer's checkpoint parts (`Stateful`)."""
        if self.sharded:
            from harness import fsdp

            return {"model": fsdp.ShardedModel(model), "optimizer": fsdp.ShardedOptimizer(model, optimizer)}
        return {"model": model, "optimizer": optimizer}


@contextmanager
def _fsdp_no_sync(forward: nn.Module) -> Any:
    forward.set_requires_gradient_sync(False)  # type: ignore[operator]
    try:
        yield
    finally:
        forward.set_requires_gradient_sync(True)  # type: ignore[operator]


def choose(name: str, world_size: int, fsdp: FsdpConfig | None = None, amp: str = "off") -> Strategy:
    """trainer.strategy (auto | ddp | fsdp) at this world size -> the strategy the run uses."""
    if name not in STRATEGIES:  # TrainerConfig checks it too; this is for a caller of the Python API
        raise ConfigError(f"trainer.strategy={name!r} is not one of {', '.join(STRATEGIES)}")
    resolved = "fsdp" if name == "fsdp" else ("ddp" if world_size > 1 else "none")
    return Strategy(resolved, fsdp or FsdpConfig(), bf16=amp == "bf16")
