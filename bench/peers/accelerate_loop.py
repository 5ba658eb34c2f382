"""bench/reference.py's work under Hugging Face Accelerate, for `python -m bench.peers`.

    torchrun --standalone --nproc-per-node 2 -m bench.peers.accelerate_loop --arch cnn --steps 241 ...

Takes the reference's arguments. Accelerator() picks the distributed setting up from torchrun's
environment (gloo on the CPU); accelerator.prepare(model, optimizer, dataloader, scheduler). The
DataLoader is Accelerate's to shard: one DataLoader of global batches in the reference's seeded
order, `split_batches=True`, so Accelerate's BatchSamplerShard hands rank r slice r of every global
batch: the reference's per-rank batches. (With the default split_batches=False each rank would
take whole batches in turn, and the prepared scheduler would step once per process per step.)
The same model class seeded the same, SGD and per-step LambdaLR; accelerator.backward; the loss
read every `--log-every` steps; then the reference's evaluation pass on the unwrapped model and
rank 0's {"model": state_dict} to --save.

Accelerate's DataLoaderShard reads one batch ahead (to know which batch is the last), so each step
clock tick comes one step early: the steady window still spans 2N steps, and exit time counts
one more step than the reference's.
"""

from __future__ import annotations

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration
from torch import nn
from torch.utils.data import DataLoader

from bench.peers.common import check_args, datasets, epoch_order, evaluate, lr_lambda, parse_args, save
from bench.reference import ARCHS, SGD


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    check_args(args)
    accelerator = Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(split_batches=True))
    rank, world = accelerator.process_index, accelerator.num_processes
    train_set, val_set = datasets(args)  # after Accelerator(): the process group is up
    torch.manual_seed(args.seed)
    model = ARCHS[args.arch]()
    optimizer = torch.optim.SGD(model.parameters(), **SGD)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args.steps, args.schedule == "cosine"))
    loader = DataLoader(train_set, sampler=epoch_order(len(train_set), args.seed), batch_size=args.batch)
    net, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    loss_fn = nn.CrossEntropyLoss()

    net.train()
    running = torch.zeros(())
    for step, (x, y) in enumerate(loader, 1):
        loss = loss_fn(net(x), y)
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        running += loss.detach()
        if step % args.log_every == 0:
            if rank == 0:
                print(f"step {step} loss {running.item() / args.log_every:.4f}", flush=True)
            running.zero_()

    model = accelerator.unwrap_model(net)
    evaluate(model, val_set, rank, world, args.batch // world)
    save(model, args.save, rank)
    accelerator.end_training()  # destroys the process group


if __name__ == "__main__":
    main()
