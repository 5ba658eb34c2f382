"""Evaluation over ranks, and what every rank must agree on about the model before it is used.

Owns: `evaluate` (loss and metric over the whole validation set, each sample counted once across
ranks, over a ShardSampler's shard), `sync_buffers` (rank 0's BatchNorm
statistics on every rank) and `weights_digest`.

Under a sharded strategy every forward is a collective (FSDP gathers the parameters), so every rank
must run the same number of forwards even when the sample count does not divide: the validation
shard is padded to equal length with sample 0 (harness/data/sampler.py), and `evaluate` leaves the
padding out of the sums (`real` counts the rank's own samples; the padding comes last).
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from harness import dist as hdist
from harness.data.sampler import ShardSampler

Metric = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, Any]]


def to_device(x: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, loss_fn: Callable, metric: Metric, device: torch.device,
             autocast: Callable[[], Any] = nullcontext, channels_last: bool = False) -> dict[str, float]:
    """Loss and metric over the whole validation set, each sample counted once across ranks."""
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, metric sum, samples
    sampler = loader.sampler
    left = sampler.real if isinstance(sampler, ShardSampler) else len(sampler)  # type: ignore[arg-type]
    for x, y in loader:
        x, y = to_device(x, device, channels_last), y.to(device, non_blocking=True)
        with autocast():
            out = model(x)  # also for a batch of padding only: the other ranks' forwards wait for it
        keep = min(left, y.shape[0])
        left -= keep
        if keep == 0:
            continue
        if keep < y.shape[0]:
            out, y = out[:keep], y[:keep]
        with autocast():
            loss = loss_fn(out, y)
        m_sum, m_count = metric(out, y)
        sums[0] += loss.double() * y.shape[0]
        sums[1] += torch.as_tensor(m_sum, dtype=torch.float64, device=device)
        sums[2] += m_count.double() if torch.is_tensor(m_count) else float(m_count)
    hdist.all_reduce_sum(sums)
    loss_sum, metric_sum, count = sums.tolist()
    return {"val_loss": loss_sum / max(count, 1), "val_metric": metric_sum / max(count, 1), "val_samples": count}


def sync_buffers(model: nn.Module) -> None:
    """DDP broadcasts buffers at the start of each forward, FSDP never does, and each rank updates its
    own BN statistics: make them rank 0's before evaluating and saving so every rank holds one model."""
    if hdist.world_size() > 1:
        for buf in model.buffers():
            dist.broadcast(buf, src=0)


def weights_digest(model: nn.Module) -> str:
    """sha256 over parameters and buffers, in state_dict order: equal on every rank after a DDP run.
    Sharded parameters are gathered one at a time (a collective: every rank calls this)."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        full = t.full_tensor() if _is_dtensor(t) else t
        h.update(name.encode())
        h.update(full.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _is_dtensor(t: torch.Tensor) -> bool:
    """Without importing torch.distributed.tensor (about 0.8 s, with sympy) when nothing has: a
    DTensor can only exist once its module is loaded."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)
