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

from harness.batching import BatchPlan, plan_batch
from harness.config import TrainerConfig
from harness.engine import FitResult, fit
from harness.metrics import Accuracy
from harness.session import Session, session

__version__ = "0.1.0"
__all__ = ["Accuracy", "BatchPlan", "FitResult", "Session", "TrainerConfig", "fit", "plan_batch", "session"]
