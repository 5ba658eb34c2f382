"""Training shards: same global batches for any world size, disjoint per rank; eval: each sample once."""

from __future__ import annotations

import pytest

from harness.data.sampler import GlobalBatchSampler, ShardSampler


def _global_batches(n: int, gb: int, world: int, epoch: int = 0) -> list[list[int]]:
    samplers = [GlobalBatchSampler(n, gb, rank=r, world_size=world, seed=3) for r in range(world)]
    for s in samplers:
        s.set_epoch(epoch)
    per_rank = [list(s) for s in samplers]
    return [sum((per_rank[r][step] for r in range(world)), []) for step in range(len(per_rank[0]))]


def test_global_batches_do_not_depend_on_world_size() -> None:
    one = _global_batches(1438, 64, 1)
    assert one == _global_batches(1438, 64, 2) == _global_batches(1438, 64, 4)
    assert len(one) == 1438 // 64
    flat = sum(one, [])
    assert len(flat) == len(set(flat)) == 22 * 64


def test_epochs_reshuffle_and_are_reproducible() -> None:
    assert _global_batches(100, 10, 2, epoch=0) != _global_batches(100, 10, 2, epoch=1)
    assert _global_batches(100, 10, 2, epoch=1) == _global_batches(100, 10, 2, epoch=1)


def test_resume_inside_an_epoch() -> None:
    s = GlobalBatchSampler(100, 10, rank=1, world_size=2, seed=0)
    s.set_epoch(4)
    full = list(s)
    s.set_epoch(4, start_step=6)
    assert list(s) == full[6:] and len(s) == 4


def test_errors() -> None:
    with pytest.raises(ValueError, match="not divisible"):
        GlobalBatchSampler(100, 10, world_size=3)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        GlobalBatchSampler(5, 10)


@pytest.mark.parametrize("world", [1, 2, 3, 4, 7])
def test_eval_shards_cover_each_sample_once(world: int) -> None:
    seen = sorted(i for r in range(world) for i in ShardSampler(359, rank=r, world_size=world))
    assert seen == list(range(359))
    assert sum(len(ShardSampler(359, rank=r, world_size=world)) for r in range(world)) == 359


def test_the_seed_sets_the_order() -> None:
    def order(seed: int) -> list[list[int]]:
        s = GlobalBatchSampler(100, 10, seed=seed)
        return list(s)

    assert order(0) == order(0) and order(0) != order(1)
