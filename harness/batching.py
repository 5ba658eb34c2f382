"""Global batch -> per-rank and per-micro-step batch.

Owns the one rule users trip over: `data.batch_size` is the GLOBAL batch, split evenly over
`world_size` ranks and `trainer.accumulate` micro-steps. A batch that does not divide fails before
training, with the numbers, the nearest batch sizes that would, and the world sizes that would keep
this batch (a resumed run continues the same sequence of global batches, so only those can resume it). Pure; no torch.
"""

from __future__ import annotations

from dataclasses import dataclass


class BatchSizeError(ValueError):
    """A global batch that cannot be split; the message carries the numbers."""


@dataclass(frozen=True)
class BatchPlan:
    global_batch: int
    world_size: int
    accumulate: int

    @property
    def per_rank(self) -> int:
        """Samples each rank consumes per optimizer step."""
        return self.global_batch // self.world_size

    @property
    def micro(self) -> int:
        """Samples in one forward/backward pass on one rank."""
        return self.per_rank // self.accumulate

    def describe(self) -> str:
        return (
            f"global batch {self.global_batch} = {self.world_size} rank(s) x {self.accumulate} "
            f"micro-step(s) x {self.micro} samples (per-rank batch {self.per_rank})"
        )


def nearest_valid(global_batch: int, divisor: int) -> list[int]:
    """The multiples of `divisor` just below and above `global_batch` (positive ones only)."""
    below = (global_batch // divisor) * divisor
    above = below + divisor
    return [b for b in (below, above) if b > 0]


def valid_world_sizes(global_batch: int, accumulate: int = 1, near: int = 1, most: int = 12) -> list[int]:
    """World sizes that split `global_batch` into `accumulate` micro-steps per rank (the `most` of
    them nearest to `near`, ascending): what a resumed run, whose global batch is fixed, may use."""
    sizes = [w for w in range(1, global_batch + 1) if global_batch % (w * accumulate) == 0]
    return sorted(sorted(sizes, key=lambda w: (abs(w - near), w))[:most])


def plan_batch(global_batch: int, world_size: int, accumulate: int = 1) -> BatchPlan:
    """Check that the global batch splits evenly; return the plan or raise BatchSizeError."""
    if world_size < 1:
        raise BatchSizeError(f"world size {world_size} must be >= 1")
    if accumulate < 1:
        raise BatchSizeError(f"trainer.accumulate={accumulate} must be >= 1")
    divisor = world_size * accumulate
    if global_batch < 1:
        raise BatchSizeError(f"data.batch_size={global_batch} must be >= 1 (it is the global batch)")
    if global_batch % divisor:
        options = " or ".join(str(b) for b in nearest_valid(global_batch, divisor))
        worlds = valid_world_sizes(global_batch, accumulate, near=world_size)
        keep = (f"world sizes that keep it (as resuming a run must): {', '.join(map(str, worlds))}" if worlds else
                f"no world size keeps it with trainer.accumulate {accumulate}")
        raise BatchSizeError(
            f"data.batch_size={global_batch} (the global batch) is not divisible by world size "
            f"{world_size} x trainer.accumulate {accumulate} = {divisor}; nearest valid: {options}; {keep}"
        )
    return BatchPlan(global_batch, world_size, accumulate)
