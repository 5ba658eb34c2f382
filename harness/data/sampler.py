"""Which samples each rank sees.

Training: `GlobalBatchSampler` shuffles the dataset with a seed that depends only on (seed, epoch),
cuts the permutation into global batches, and gives rank r the r-th slice of each. The global
batches are therefore the same for any world size, every rank runs the same number of steps, and a
sampler started at `start_step` continues an epoch exactly where a checkpoint left it. The tail that
does not fill a global batch is dropped (a different tail each epoch).

Checkpoints: the position (epoch, global batches of it already taken) is the loop's progress, since
only the loop knows which batches were consumed (a DataLoader draws ahead). The sampler's own state
says which sequence that position is in (dataset size, global batch, seed, shuffle): the same on any
world size, and `load_state_dict` refuses a checkpoint from another sequence instead of continuing
with samples the run never meant.

Evaluation: `ShardSampler` gives rank r the indices r, r + world, ... with no padding, so summed
metrics count every sample exactly once. With `pad` (sharded models, where every forward is a
collective) every rank gets as many indices: a short shard is topped up with sample 0 (at most once),
which comes last and which `real` leaves out (harness/evaluate.py masks them).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class GlobalBatchSampler(Sampler[list[int]]):
    def __init__(self, n: int, global_batch: int, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True) -> None:
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} is not divisible by world size {world_size}")
        if n < global_batch:
            raise ValueError(f"the dataset has {n} samples, fewer than one global batch of {global_batch}")
        self.n, self.global_batch, self.rank, self.world_size = n, global_batch, rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.epoch = 0
        self.start_step = 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def __len__(self) -> int:
        return self.n // self.global_batch - self.start_step

    @property
    def steps_per_epoch(self) -> int:
        return self.n // self.global_batch

    def state_dict(self) -> dict[str, int | bool]:
        return {"samples": self.n, "global_batch": self.global_batch, "seed": self.seed, "shuffle": self.shuffle}

    def load_state_dict(self, state: dict[str, int | bool]) -> None:
        changed = [f"{key} {state[key]} -> {value}" for key, value in self.state_dict().items() if state[key] != value]
        if changed:
            raise ValueError(f"the sequence of global batches changed ({', '.join(changed)}): the saved position "
                             f"would mean other samples; resume with the saved data.batch_size, dataset and seed")

    def __iter__(self) -> Iterator[list[int]]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        per_rank = self.global_batch // self.world_size
        for step in range(self.start_step, self.steps_per_epoch):
            start = step * self.global_batch + self.rank * per_rank
            yield order[start : start + per_rank]


class ShardSampler(Sampler[int]):
    def __init__(self, n: int, *, rank: int = 0, world_size: int = 1, pad: bool = False) -> None:
        self.n, self.rank, self.world_size, self.pad = n, rank, world_size, pad
        self.real = len(range(rank, n, world_size))  # this rank's own samples; the rest is padding

    def __len__(self) -> int:
        return -(-self.n // self.world_size) if self.pad else self.real

    def __iter__(self) -> Iterator[int]:
        return iter([*range(self.rank, self.n, self.world_size), *[0] * (len(self) - self.real)])
