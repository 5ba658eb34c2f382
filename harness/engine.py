"""The training loop.

Owns: DDP wrapping (only when world size > 1), the step loop with gradient accumulation (`no_sync`
on the non-final micro-steps) and clipping, exact evaluation over ranks, the per-epoch metrics row
and checkpoint, and the final weights digest each rank logs. It knows nothing of Hydra or of how the
process was started: it gets built components, a batch plan, a device and a run directory.

No host-device sync in the step loop except at `trainer.log_every` steps: losses accumulate on the
device and are read once per logging interval and once per epoch.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset

from harness import checkpoint
from harness import dist as hdist
from harness.batching import BatchPlan
from harness.config import TrainerConfig
from harness.data.sampler import GlobalBatchSampler, ShardSampler
from harness.logs import MetricsWriter, get_logger

Metric = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, Any]]


@dataclass
class FitResult:
    epochs: int
    steps: int
    history: list[dict[str, float]] = field(default_factory=list)
    digest: str = ""

    @property
    def last(self) -> dict[str, float]:
        return self.history[-1] if self.history else {}


def weights_digest(model: nn.Module) -> str:
    """sha256 over parameters and buffers, in state_dict order: equal on every rank after a DDP run."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _sync_buffers(model: nn.Module) -> None:
    """DDP broadcasts buffers at the start of each forward, then each rank updates its own BN
    statistics: make them rank 0's before evaluating and saving so every rank holds the same model."""
    if hdist.world_size() > 1:
        for buf in model.buffers():
            dist.broadcast(buf, src=0)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, loss_fn: Callable, metric: Metric,
             device: torch.device) -> dict[str, float]:
    """Loss and metric over the whole validation set, each sample counted once across ranks."""
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, metric sum, samples
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        out = model(x)
        m_sum, m_count = metric(out, y)
        sums[0] += loss_fn(out, y).double() * y.shape[0]
        sums[1] += torch.as_tensor(m_sum, dtype=torch.float64, device=device)
        sums[2] += float(m_count) if not torch.is_tensor(m_count) else m_count.double()
    hdist.all_reduce_sum(sums)
    loss_sum, metric_sum, count = sums.tolist()
    return {"val_loss": loss_sum / max(count, 1), "val_metric": metric_sum / max(count, 1), "val_samples": count}


def fit(
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    metric: Metric,
    train_set: Dataset,
    val_set: Dataset,
    batch: BatchPlan,
    trainer: TrainerConfig,
    device: torch.device,
    run_dir: Path | None = None,
    seed: int = 0,
    num_workers: int = 0,
    config_yaml: str = "",
) -> FitResult:
    """Train for `trainer.epochs` epochs; rank 0 writes metrics.csv and checkpoints under `run_dir`."""
    log = get_logger()
    rank, world = hdist.rank(), hdist.world_size()
    cuda = device.type == "cuda"
    metric_name = getattr(metric, "name", "metric")
    ddp: nn.Module = model
    if world > 1:
        ddp = DistributedDataParallel(model, device_ids=[device] if cuda else None)

    sampler = GlobalBatchSampler(len(train_set), batch.global_batch, rank=rank, world_size=world, seed=seed)
    loader = DataLoader(train_set, batch_sampler=sampler, num_workers=num_workers, pin_memory=cuda,
                        persistent_workers=num_workers > 0)
    val_loader = DataLoader(val_set, sampler=ShardSampler(len(val_set), rank=rank, world_size=world),
                            batch_size=max(batch.per_rank, 1), num_workers=num_workers, pin_memory=cuda)
    log.info(f"data: {len(train_set)} train / {len(val_set)} val samples; {batch.describe()}; "
             f"{sampler.steps_per_epoch} steps per epoch")

    metrics = MetricsWriter(run_dir / "metrics.csv") if run_dir is not None and rank == 0 else None
    result = FitResult(epochs=0, steps=0)
    best = float("-inf")
    for epoch in range(trainer.epochs):
        t0 = time.perf_counter()
        sampler.set_epoch(epoch)
        ddp.train()
        epoch_loss = torch.zeros((), device=device)
        window_loss = torch.zeros((), device=device)
        steps = 0
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            for i, (xm, ym) in enumerate(zip(x.chunk(batch.accumulate), y.chunk(batch.accumulate), strict=True)):
                last = i == batch.accumulate - 1
                sync = nullcontext() if last or world == 1 else ddp.no_sync()  # type: ignore[operator]
                with sync:
                    loss = loss_fn(ddp(xm), ym) / batch.accumulate
                    loss.backward()
                window_loss += loss.detach()
            if trainer.grad_clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), trainer.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            steps += 1
            result.steps += 1
            if result.steps % trainer.log_every == 0:
                epoch_loss += window_loss
                log.info(f"epoch {epoch + 1}/{trainer.epochs} step {result.steps} "
                         f"loss {window_loss.item() / trainer.log_every:.4f}")  # the logging sync
                window_loss.zero_()
        epoch_loss += window_loss
        _sync_buffers(model)
        val = evaluate(model, val_loader, loss_fn, metric, device)
        train_loss = hdist.all_reduce_sum(epoch_loss.detach().clone()).item() / max(steps * world, 1)
        seconds = time.perf_counter() - t0
        row = {"epoch": epoch + 1, "step": result.steps, "train_loss": train_loss, "val_loss": val["val_loss"],
               f"val_{metric_name}": val["val_metric"], "val_samples": int(val["val_samples"]),
               "lr": optimizer.param_groups[0]["lr"], "epoch_time": seconds,
               "samples_per_s": steps * batch.global_batch / max(seconds, 1e-9)}
        result.history.append(row)
        result.epochs = epoch + 1
        log.info(f"epoch {epoch + 1}/{trainer.epochs}: train_loss {train_loss:.4f} val_loss {val['val_loss']:.4f} "
                 f"val_{metric_name} {val['val_metric']:.4f} ({int(val['val_samples'])} samples) {seconds:.2f}s")
        if metrics is not None and run_dir is not None:
            metrics.write(row)
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch + 1,
                     "step": result.steps, "config": config_yaml, "metrics": row}
            checkpoint.save(state, run_dir / "checkpoints" / "last.pt")
            if val["val_metric"] > best:
                best = val["val_metric"]
                checkpoint.save(state, run_dir / "checkpoints" / "best.pt")
    result.digest = weights_digest(model)
    log.info(f"final weights digest {result.digest} (rank {rank})")
    return result
