"""The default job (`make train`) written by hand, as an expert would without a framework.

    python -m bench.by_hand --out /tmp/by-hand

The same work as `python -m harness.train` with its defaults (conf/): the 8x8 digits shipped in
the package, harness.models.SmallCNN seeded the same, SGD with conf/optim/sgd.yaml's values, a
cosine schedule per optimizer step, a global batch of 64 (the last partial batch dropped, as the
harness's sampler does), 10 epochs, each followed by an evaluation pass and one checkpoint
written atomically (a temporary file, then a rename). It reads the dataset file directly (no cache,
no digest) and writes no metrics file, plot or logs: everything the harness does beyond this is the
harness's cost, which bench/job.py measures.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from harness.models import SmallCNN

ASSET = Path(__file__).resolve().parents[1] / "harness" / "data" / "assets" / "digits.npz"
SGD = {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 0.0005}  # conf/optim/sgd.yaml


def split(arrays: np.lib.npyio.NpzFile, name: str) -> TensorDataset:
    x = torch.from_numpy(arrays[f"x_{name}"].astype(np.float32) / 16.0).unsqueeze(1)
    return TensorDataset(x, torch.from_numpy(arrays[f"y_{name}"].astype(np.int64)))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="directory for the checkpoint")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with np.load(ASSET) as arrays:
        train_set, val_set = split(arrays, "train"), split(arrays, "val")
    torch.manual_seed(args.seed)
    model = SmallCNN()
    optimizer = torch.optim.SGD(model.parameters(), **SGD)
    loader = DataLoader(train_set, batch_size=args.batch, shuffle=True, drop_last=True)
    total = args.epochs * len(loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1.0 + math.cos(math.pi * s / total)))
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(args.epochs):
        model.train()
        running = torch.zeros(())
        for x, y in loader:
            loss = loss_fn(model(x), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            running += loss.detach()
        model.eval()
        correct = seen = 0
        val_loss = 0.0
        with torch.no_grad():
            for x, y in DataLoader(val_set, batch_size=args.batch):
                logits = model(x)
                val_loss += loss_fn(logits, y).item() * len(y)
                correct += int((logits.argmax(1) == y).sum())
                seen += len(y)
        print(f"epoch {epoch + 1}/{args.epochs}: train_loss {running.item() / len(loader):.4f} "
              f"val_loss {val_loss / seen:.4f} val_accuracy {correct / seen:.4f}", flush=True)
        tmp = out / "last.pt.tmp"
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "epoch": epoch + 1}, tmp)
        os.replace(tmp, out / "last.pt")


if __name__ == "__main__":
    main()
