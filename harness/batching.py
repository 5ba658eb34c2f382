"""Global batch -> per-rank and per-micro-step batch.

Owns the one rule users trip over: `data.batch_size` is the GLOBAL batch, split evenly over
`world_size` ranks and `trainer.accumulate` micro-steps. A batch that does not divide fails before
training, with the numbers and the nearest sizes that would. Pure; no torch.
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
        raise BatchSizeError(
            f"data.batch_size={global_batch} (the global batch) is not divisible by world size "
            f"{world_size} x trainer.accumulate {accumulate} = {divisor}; nearest valid: {options}"
        )
    return BatchPlan(global_batch, world_size, accumulate)
