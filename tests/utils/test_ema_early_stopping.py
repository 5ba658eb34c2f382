"""harness.utils ModelEMA (against a hand-computed update) and EarlyStopping (sequences, and under 2 real
gloo ranks started by torchrun)."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from harness.utils.torch_utils import EarlyStopping, ModelEMA

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


# --- ModelEMA ---------------------------------------------------------------------------------------


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).double()


def perturb(model: nn.Module, k: float) -> None:
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.add_(k * (i + 1)).mul_(1 + 0.1 * k)
        model[1].running_mean.add_(k)
        model[1].running_var.mul_(1 + k)
        model[1].num_batches_tracked += 5


def test_ema_matches_hand_computed_updates():
    model = small_model()
    ema = ModelEMA(model, decay=0.9, tau=10)
    expect = {k: v.clone() for k, v in model.state_dict().items()}
    for step in (1, 2, 3):
        perturb(model, 0.5 * step)
        ema.update(model)
        d = 0.9 * (1 - math.exp(-step / 10))  # the ramp, written out
        assert ema.decay(step) == pytest.approx(d, rel=1e-15)
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                expect[k] = d * expect[k] + (1 - d) * v
        got = ema.ema.state_dict()
        for k, v in expect.items():
            assert torch.allclose(got[k], v, rtol=1e-12, atol=1e-12), (step, k)
    assert ema.updates == 3
    assert ema.ema[1].num_batches_tracked.item() == 0  # integer buffers are not averaged


def test_ema_copy_is_frozen_eval_and_separate():
    model = small_model().train()
    ema = ModelEMA(model)
    assert ema.ema is not model and not ema.ema.training
    assert all(not p.requires_grad for p in ema.ema.parameters())
    assert all(p.requires_grad for p in model.parameters())
    assert ema.decay(1) < 1e-3 and ema.decay(10**6) == pytest.approx(0.9999)  # ramps from ~0 to decay


def test_ema_converges_to_a_constant_model_and_unwraps_parallel():
    model = small_model()
    ema = ModelEMA(copy.deepcopy(model), decay=0.5, tau=1)
    wrapped = nn.DataParallel(model)
    for _ in range(80):
        ema.update(wrapped)
    for k, v in model.state_dict().items():
        if v.dtype.is_floating_point:
            assert torch.allclose(ema.ema.state_dict()[k], v, atol=1e-12), k


def test_ema_state_dict_resumes_the_ramp():
    model = small_model()
    a = ModelEMA(model, decay=0.9, tau=10)
    for k in range(3):
        perturb(model, k)
        a.update(model)
    b = ModelEMA(small_model(), decay=0.9, tau=10)
    b.load_state_dict(a.state_dict())
    perturb(model, 7)
    a.update(model)
    b.update(model)
    assert b.updates == a.updates == 4
    for k, v in a.ema.state_dict().items():
        assert torch.equal(b.ema.state_dict()[k], v)


def test_ema_update_attr_and_bad_arguments():
    model = small_model()
    ema = ModelEMA(model)
    model.names, model.process_group = ["a", "b"], object()  # as DDP training adds them
    ema.update_attr(model)
    assert ema.ema.names == ["a", "b"] and not hasattr(ema.ema, "process_group")
    with pytest.raises(ValueError, match="decay=1"):
        ModelEMA(model, decay=1.0)
    with pytest.raises(ValueError, match="tau=0"):
        ModelEMA(model, tau=0)


# --- EarlyStopping: sequences -----------------------------------------------------------------------


def run(es: EarlyStopping, fitness: list[float]) -> list[bool]:
    return [es(epoch, f) for epoch, f in enumerate(fitness)]


def test_stops_after_patience_epochs_without_improvement():
    es = EarlyStopping(patience=3)
    assert run(es, [0.1, 0.3, 0.2, 0.25, 0.29]) == [False, False, False, False, True]
    assert (es.best_epoch, es.best_fitness) == (1, 0.3)


def test_possible_stop_warns_one_epoch_ahead():
    es = EarlyStopping(patience=3)
    flags = []
    for epoch, f in enumerate([0.5, 0.4, 0.4, 0.4]):
        es(epoch, f)
        flags.append(es.possible_stop)
    assert flags == [False, False, True, True]


def test_equal_fitness_counts_as_improvement():
    es = EarlyStopping(patience=2)
    assert not any(run(es, [0.5] * 10))
    assert es.best_epoch == 9


def test_patience_zero_never_stops():
    es = EarlyStopping(patience=0)
    assert es.patience == math.inf
    assert not any(run(es, [1.0] + [0.0] * 200))


def test_patience_one():
    assert run(EarlyStopping(patience=1), [0.5, 0.4]) == [False, True]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0, 1), min_size=1, max_size=30), st.integers(1, 6))
def test_matches_reference(fitness, patience):
    """Reference: stop at the first epoch that is `patience` epochs after the latest best so far."""
    es = EarlyStopping(patience=patience)
    for epoch, f in enumerate(fitness):
        best = max(fitness[: epoch + 1])
        best_epoch = max(i for i in range(epoch + 1) if fitness[i] == best)
        assert es(epoch, f) == (epoch - best_epoch >= patience)
        assert es.best_epoch == best_epoch


# --- EarlyStopping: 2 gloo ranks under torchrun ---------------------------------------------------------


@pytest.mark.slow
def test_every_rank_takes_rank0_decision(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(HERE / "early_stop_ranks.py"), str(tmp_path)]
    inherited = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "TORCHELASTIC_RUN_ID", "GROUP_RANK")
    env = {k: v for k, v in os.environ.items() if k not in inherited and not k.startswith("SLURM_")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r in results:
        assert (r["stopped"], r["best_epoch"], r["best_fitness"]) == (3, 1, 0.5), results
    assert results[0]["possible"] == results[1]["possible"] == [False, False, True, True]


def test_min_mode_counts_a_lower_value_as_better_and_starts_from_infinity():
    es = EarlyStopping(patience=2, mode="min")
    assert [es(epoch, loss) for epoch, loss in enumerate([3.0, 2.0, 2.5, 1.0, 1.5, 1.2], start=1)] == \
        [False, False, False, False, False, True]
    assert es.best_epoch == 4 and es.best_fitness == 1.0
    with pytest.raises(ValueError, match="EarlyStopping mode='lowest' is not one of max, min"):
        EarlyStopping(mode="lowest")
