"""Global batch splitting and its error message."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from harness.batching import BatchSizeError, nearest_valid, plan_batch


def test_plan() -> None:
    plan = plan_batch(64, 2, 4)
    assert (plan.per_rank, plan.micro) == (32, 8)
    assert "global batch 64 = 2 rank(s) x 4 micro-step(s) x 8 samples (per-rank batch 32)" == plan.describe()


def test_message_has_the_numbers_and_nearest_sizes() -> None:
    with pytest.raises(BatchSizeError) as err:
        plan_batch(30, 4, 1)
    assert str(err.value) == (
        "data.batch_size=30 (the global batch) is not divisible by world size 4 x "
        "trainer.accumulate 1 = 4; nearest valid: 28 or 32; world sizes that keep it (as resuming a run must): "
        "1, 2, 3, 5, 6, 10, 15, 30"
    )


def test_resume_on_a_world_size_that_does_not_divide_names_the_valid_ones() -> None:
    with pytest.raises(BatchSizeError, match=r"world sizes that keep it .*: 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 96$"):
        plan_batch(96, 5, 1)
    with pytest.raises(BatchSizeError, match=r"keep it .*: 1, 2, 3, 4, 6, 8, 12, 16, 24, 48$"):
        plan_batch(96, 5, 2)
    with pytest.raises(BatchSizeError, match=r"no world size keeps it with trainer.accumulate 3$"):
        plan_batch(64, 2, 3)


def test_accumulation_counts_in_the_divisor() -> None:
    with pytest.raises(BatchSizeError, match=r"world size 2 x trainer.accumulate 3 = 6; nearest valid: 60 or 66"):
        plan_batch(64, 2, 3)


def test_batch_smaller_than_divisor_offers_only_positive_sizes() -> None:
    with pytest.raises(BatchSizeError, match=r"nearest valid: 8; "):
        plan_batch(3, 8, 1)


@pytest.mark.parametrize(("b", "w", "a", "key"), [(0, 1, 1, "data.batch_size"), (8, 1, 0, "trainer.accumulate"),
                                                   (8, 0, 1, "world size")])
def test_nonpositive_values(b: int, w: int, a: int, key: str) -> None:
    with pytest.raises(BatchSizeError, match=key):
        plan_batch(b, w, a)


@given(st.integers(1, 10_000), st.integers(1, 64), st.integers(1, 16))
def test_fuzz_valid_iff_divisible(b: int, w: int, a: int) -> None:
    try:
        plan = plan_batch(b, w, a)
    except BatchSizeError:
        assert b % (w * a) != 0
        assert all(v % (w * a) == 0 for v in nearest_valid(b, w * a))
    else:
        assert plan.micro * a * w == b
