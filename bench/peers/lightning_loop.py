"""bench/reference.py's work as a LightningModule under Lightning's Trainer, for `python -m bench.peers`.

    torchrun --standalone --nproc-per-node 2 -m bench.peers.lightning_loop --arch cnn --steps 241 ...

Takes the reference's arguments. The same model class, seeded the same just before it is built;
the same Synthetic training set (its step clock, `--out`) cut into the same per-rank batches (the
reference's seeded permutation as the DataLoader's batch_sampler, `use_distributed_sampler=False`);
SGD with the same values and the same per-step LambdaLR (interval "step"); the loss read every
`--log-every` steps. Trainer(accelerator="cpu", devices=<torchrun's LOCAL_WORLD_SIZE>,
strategy="ddp" when more than one process, barebones=True): no checkpointing, logger, progress
bar, model summary or sanity validation; max_steps = --steps. Then, outside the Trainer, the
reference's evaluation pass and rank 0's {"model": state_dict} to --save.

Lightning's data fetcher reads no batch ahead here: the DataLoader has a length (its
_PrefetchDataFetcher prefetches only for iterables without one), so the step clock ticks at the
same points of the loop as the reference's.
"""

from __future__ import annotations

import argparse
import os
import warnings

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader

from bench.peers.common import check_args, datasets, epoch_order, evaluate, lr_lambda, parse_args, rank_batches, save
from bench.reference import ARCHS, SGD


class Module(L.LightningModule):
    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__()
        self.args = args
        torch.manual_seed(args.seed)
        self.model = ARCHS[args.arch]()
        self.loss_fn = nn.CrossEntropyLoss()
        self.running = torch.zeros(())

    def setup(self, stage: str) -> None:  # after the process group is up: the step clock's rank
        self.train_set, self.val_set = datasets(self.args)

    def train_dataloader(self) -> DataLoader:
        order = epoch_order(len(self.train_set), self.args.seed)
        batches = rank_batches(order, self.args.batch, self.global_rank, self.trainer.world_size)
        return DataLoader(self.train_set, batch_sampler=batches)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = self.loss_fn(self.model(x), y)
        self.running += loss.detach()
        step = batch_idx + 1
        if step % self.args.log_every == 0:
            if self.global_rank == 0:
                print(f"step {step} loss {self.running.item() / self.args.log_every:.4f}", flush=True)
            self.running.zero_()
        return loss

    def configure_optimizers(self) -> dict:
        optimizer = torch.optim.SGD(self.model.parameters(), **SGD)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(self.args.steps,
                                                                           self.args.schedule == "cosine"))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    check_args(args)
    devices = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    module = Module(args)
    # the reference runs 0 DataLoader workers; Lightning would suggest more on every run
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
                        max_steps=args.steps, barebones=True, use_distributed_sampler=False)
    trainer.fit(module)
    rank, world = trainer.global_rank, trainer.world_size
    evaluate(module.model, module.val_set, rank, world, args.batch // world)
    save(module.model, args.save, rank)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
