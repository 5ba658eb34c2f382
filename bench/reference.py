"""The hand-written loop the harness is measured against: what an expert writes without a framework.

    python -m bench.reference --steps 301                              # one process
    torchrun --standalone --nproc-per-node 2 -m bench.reference ...    # DDP over gloo (or NCCL on CUDA)

The same work as the harness job `bench/runs.py` builds for the same options: the same model
(harness.models, seeded the same; optionally channels_last and bf16 autocast, as trainer.amp and
trainer.channels_last do), the same data (bench.data.Synthetic, read through a DataLoader),
the same global batch cut into per-rank slices of one seeded permutation, SGD with
conf/optim/sgd.yaml's values and the same per-step lr schedule, the loss read only every
`--log-every` steps, DDP only when the world size is > 1; then one evaluation pass and a checkpoint
from rank 0. Threads come from OMP_NUM_THREADS,
as for the harness. The driver checks that both end with the same weights.
"""

from __future__ import annotations

import argparse
import math
import os
from contextlib import nullcontext
from functools import partial

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from bench.data import Synthetic
from harness.models import MLP, SmallCNN

ARCHS = {"mlp": MLP, "cnn": SmallCNN}  # with their default sizes, as conf/model/{mlp,small_cnn}.yaml

SGD = {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 0.0005}  # conf/optim/sgd.yaml


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="mlp", choices=["mlp", "cnn"])
    p.add_argument("--steps", type=int, default=64, help="optimizer steps (one epoch)")
    p.add_argument("--batch", type=int, default=64, help="global batch")
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--schedule", default="cosine", choices=["cosine", "constant"],
                   help="lr per optimizer step: cosine to 0 over the run (the harness's default), or flat")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--amp", default="off", choices=["off", "bf16"], help="autocast around forward and loss")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--check-sync", action="store_true", help="sync-debug 'error' outside logging steps")
    p.add_argument("--out", default=None, help="directory for the step clock's rank<r>.json")
    p.add_argument("--save", default=None, help="rank 0 saves the final state here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    if args.device == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        train(args, rank, world, device)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def train(args: argparse.Namespace, rank: int, world: int, device: torch.device) -> tuple[nn.Module, Synthetic]:
    """The loop; returns the trained model and the training set (its step clock: bench/inproc.py)."""
    cuda = device.type == "cuda"
    data = {"steps": args.steps, "batch": args.batch, "log_every": args.log_every, "seed": args.seed}
    train_set = Synthetic(split="train", out=args.out, check_sync=args.check_sync, **data)
    val_set = Synthetic(split="val", **data)
    torch.manual_seed(args.seed)
    model = ARCHS[args.arch]().to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    autocast = partial(torch.autocast, device.type, dtype=torch.bfloat16) if args.amp == "bf16" else nullcontext
    net = DistributedDataParallel(model, device_ids=[device] if cuda else None) if world > 1 else model
    optimizer = torch.optim.SGD(model.parameters(), **SGD)
    total = args.steps
    cosine = args.schedule == "cosine"
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1.0 + math.cos(math.pi * min(s / total, 1.0))) if cosine else 1.0)
    loss_fn = nn.CrossEntropyLoss()

    per_rank = args.batch // world
    g = torch.Generator().manual_seed(args.seed * 1_000_003)  # epoch 0
    order = torch.randperm(len(train_set), generator=g).tolist()
    starts = (s * args.batch + rank * per_rank for s in range(len(train_set) // args.batch))
    batches = [order[i:i + per_rank] for i in starts]
    loader = DataLoader(train_set, batch_sampler=batches, pin_memory=cuda)

    net.train()
    running = torch.zeros((), device=device)
    for step, (x, y) in enumerate(loader, 1):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast():
            loss = loss_fn(net(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        running += loss.detach()
        if step % args.log_every == 0:
            if rank == 0:
                print(f"step {step} loss {running.item() / args.log_every:.4f}", flush=True)
            running.zero_()

    model.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    with torch.no_grad():
        shard = range(rank, len(val_set), world)  # every sample once over the ranks
        for x, y in DataLoader(val_set, sampler=shard, batch_size=per_rank, pin_memory=cuda):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if args.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast():
                sums[0] += (model(x).argmax(1) == y).sum()
            sums[1] += y.numel()
    if world > 1:
        dist.all_reduce(sums)
    if rank == 0:
        print(f"val accuracy {sums[0].item() / sums[1].item():.4f}", flush=True)
        if args.save:
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, args.save)
    return model, train_set


if __name__ == "__main__":
    main()
