"""The Python API: your own script, your own loop set-up; harness does devices, ranks, run dir, loop.

    python train_spirals.py                      # one process
    torchrun --nproc-per-node 2 train_spirals.py # two gloo ranks on the CPU
"""

import torch
from spirals.data import spirals
from spirals.models import SpiralNet

import harness


def main() -> None:
    with harness.session(device="cpu", run_root="runs") as s:
        torch.manual_seed(0)  # same initial weights on every rank
        model = SpiralNet().to(s.device)
        result = harness.fit(
            model=model,
            optimizer=torch.optim.AdamW(model.parameters(), lr=0.01),
            loss_fn=torch.nn.CrossEntropyLoss(),
            metric=harness.Accuracy(),
            train_set=spirals(split="train"),
            val_set=spirals(split="val"),
            batch=harness.plan_batch(60, s.world_size),
            trainer=harness.TrainerConfig(epochs=30, log_every=50),
            device=s.device,
            run_dir=s.run_dir,
        )
        if s.is_master:
            print(f"val accuracy {result.last['val_accuracy']:.3f} after {result.epochs} epochs")


if __name__ == "__main__":
    main()
