"""`EarlyStopping`: stop when the fitness has not improved for `patience` epochs (YOLOv5's rule).

`mode="max"` (YOLOv5's, the default): higher is better, starting from 0 (`>=`, so a run whose
fitness is 0 in its first epochs starts); `mode="min"`: lower is better (a loss), starting from +inf.

Under DDP every rank calls it with its own fitness, but the decision must be the same everywhere
or ranks leave the loop at different epochs and the next collective hangs. So rank 0 decides and
broadcasts its whole state (stop, best epoch, best fitness): every rank ends with rank 0's answer.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from harness.utils.device import say


class EarlyStopping:
    def __init__(self, patience: int = 30, mode: str = "max") -> None:
        if mode not in ("max", "min"):
            raise ValueError(f"EarlyStopping mode={mode!r} is not one of max, min")
        self.mode = mode
        # YOLOv5 fitness is >= 0; the first epoch at or above it is the best so far
        self.best_fitness = 0.0 if mode == "max" else math.inf
        self.best_epoch = 0
        self.patience: float = patience or math.inf  # 0 = never stop
        self.possible_stop = False  # True when the next epoch without improvement would stop

    def __call__(self, epoch: int, fitness: float) -> bool:
        """Record this epoch's fitness; return True when training should stop (the same on every rank)."""
        better = fitness >= self.best_fitness if self.mode == "max" else fitness <= self.best_fitness
        if better:  # >= lets a run with fitness 0 in its first epochs start
            self.best_epoch = epoch
            self.best_fitness = float(fitness)
        delta = epoch - self.best_epoch
        self.possible_stop = delta >= (self.patience - 1)
        stop = delta >= self.patience
        stop = self._agree(stop)
        if stop:
            say(f"Stopping training early as no improvement observed in last {self.patience} epochs. "
                f"Best results observed at epoch {self.best_epoch}, best fitness {self.best_fitness:.6g}. "
                f"To change patience pass EarlyStopping(patience=N), e.g. patience=300, or 0 to disable.")
        return stop

    def state_dict(self) -> dict[str, float | int]:
        """For checkpoints: the best so far (`possible_stop` is recomputed by every call)."""
        return {"best_fitness": self.best_fitness, "best_epoch": self.best_epoch}

    def load_state_dict(self, state: dict[str, float | int]) -> None:
        self.best_fitness, self.best_epoch = float(state["best_fitness"]), int(state["best_epoch"])

    def _agree(self, stop: bool) -> bool:
        """Take rank 0's state on every rank; without a process group, keep ours."""
        if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
            return stop
        # NCCL only moves CUDA tensors; every other backend takes CPU ones
        nccl = "nccl" in str(dist.get_backend())
        device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        mine = [float(stop), float(self.possible_stop), float(self.best_epoch), self.best_fitness]
        state = torch.tensor(mine, dtype=torch.float64, device=device)
        dist.broadcast(state, src=0)
        stop_f, possible, best_epoch, best_fitness = state.tolist()
        self.possible_stop, self.best_epoch, self.best_fitness = bool(possible), int(best_epoch), best_fitness
        return bool(stop_f)
