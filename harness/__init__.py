"""harness: one launcher for PyTorch training on one CPU, many GPUs, and Slurm.

Command line: `python -m harness.train [overrides]` (see README). Python API, for your own script
(run it with `python`, `torchrun` or `srun`):

    import harness
    with harness.session(device="cpu") as s:
        model = MyNet().to(s.device)
        harness.fit(model=model, optimizer=..., loss_fn=..., metric=harness.Accuracy(),
                    train_set=..., val_set=..., batch=harness.plan_batch(64, s.world_size),
                    trainer=harness.TrainerConfig(epochs=3), device=s.device, run_dir=s.run_dir)
"""

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

# Loaded on first use, so `import harness.env` (batch scripts, the launcher's checks) does not pay
# for importing torch.
_EXPORTS = {
    "Accuracy": "harness.metrics", "BatchPlan": "harness.batching", "plan_batch": "harness.batching",
    "TrainerConfig": "harness.config", "FitResult": "harness.engine", "fit": "harness.engine",
    "Session": "harness.runtime", "session": "harness.runtime",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'harness' has no attribute {name!r}")
