"""What the peer loops share with bench/reference.py, written once: the same per-rank batches, lr
schedule, final evaluation pass and checkpoint, so that a peer does exactly the reference's work.

The expressions are the reference's own (bit for bit: the driver compares the final weights).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from bench.data import Synthetic
from bench.reference import parse_args

__all__ = ["parse_args", "check_args", "datasets", "epoch_order", "rank_batches", "lr_lambda", "evaluate", "save"]


def check_args(args: argparse.Namespace) -> None:
    """The peers train what the CPU bench trains: float32, contiguous, on the CPU."""
    if args.device != "cpu" or args.amp != "off" or args.channels_last or args.check_sync:
        raise SystemExit("bench/peers: CPU, float32, contiguous only (--device cpu --amp off, no --channels-last, "
                         "no --check-sync)")


def datasets(args: argparse.Namespace) -> tuple[Synthetic, Synthetic]:
    """The training set with the step clock (`--out`) and the validation set; build the training set
    after the process group is up: its clock names its file by the rank it sees then."""
    data = {"steps": args.steps, "batch": args.batch, "log_every": args.log_every, "seed": args.seed}
    return Synthetic(split="train", out=args.out, **data), Synthetic(split="val", **data)


def epoch_order(n: int, seed: int) -> list[int]:
    """The reference's seeded permutation of epoch 0."""
    g = torch.Generator().manual_seed(seed * 1_000_003)
    return torch.randperm(n, generator=g).tolist()


def rank_batches(order: list[int], batch: int, rank: int, world: int) -> list[list[int]]:
    """Global batches of `batch` consecutive indices of `order`, rank `rank`'s slice of each."""
    per_rank = batch // world
    starts = (s * batch + rank * per_rank for s in range(len(order) // batch))
    return [order[i:i + per_rank] for i in starts]


def lr_lambda(total: int, cosine: bool = True) -> Callable[[int], float]:
    """The reference's per-step factor: cosine to 0 over `total` optimizer steps, or flat."""
    return lambda s: 0.5 * (1.0 + math.cos(math.pi * min(s / total, 1.0))) if cosine else 1.0


@torch.no_grad()
def evaluate(model: nn.Module, val_set: Synthetic, rank: int, world: int, per_rank: int) -> float:
    """The reference's evaluation pass: every validation sample once over the ranks; the accuracy."""
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64)
    for x, y in DataLoader(val_set, sampler=range(rank, len(val_set), world), batch_size=per_rank):
        sums[0] += (model(x).argmax(1) == y).sum()
        sums[1] += y.numel()
    if world > 1:
        dist.all_reduce(sums)
    accuracy = sums[0].item() / sums[1].item()
    if rank == 0:
        print(f"val accuracy {accuracy:.4f}", flush=True)
    return accuracy


def save(model: nn.Module, path: str | None, rank: int) -> None:
    """Rank 0 writes {"model": state_dict}, the reference's checkpoint layout (bench.runs.same_weights)."""
    if path and rank == 0:
        torch.save({"model": model.state_dict()}, path)
