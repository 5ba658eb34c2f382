"""The loop in one process, through the Python API: accumulation, AMP, EMA, early stopping,
channels_last, compile, exact mid-epoch resume, outputs."""

from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

import harness
from harness import checkpoint
from harness.config import ConfigError, TrainerConfig
from harness.data.datasets import Digits
from harness.engine import check_trainer, fit
from harness.models import MLP, SmallCNN

ASSET = Path(harness.__file__).parent / "data" / "assets" / "digits.npz"
BASE = TrainerConfig(epochs=2, log_every=5, progress=False)


def _run(tmp_path: Path, trainer: TrainerConfig, *, model_cls: type = MLP, batch: int = 64, lr: float = 0.05,
         loss_fn=None) -> tuple[torch.nn.Module, harness.FitResult]:
    torch.manual_seed(0)
    model = model_cls()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    result = fit(model=model, optimizer=opt, loss_fn=loss_fn or torch.nn.CrossEntropyLoss(),
                 metric=harness.Accuracy(), train_set=Digits(ASSET, "train"), val_set=Digits(ASSET, "val"),
                 batch=harness.plan_batch(batch, 1, trainer.accumulate), trainer=trainer, device=torch.device("cpu"),
                 run_dir=tmp_path)
    return model, result


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_accumulation_matches_the_full_batch(tmp_path: Path) -> None:
    full, _ = _run(tmp_path / "a", BASE)
    micro, _ = _run(tmp_path / "b", replace(BASE, accumulate=4))
    for k, v in _weights(full).items():
        torch.testing.assert_close(_weights(micro)[k], v, rtol=1e-4, atol=1e-5)


def test_outputs_and_checkpoint_contents(tmp_path: Path) -> None:
    _, result = _run(tmp_path, replace(BASE, ema=True, ema_tau=10))
    assert result.epochs == 2 and result.steps == 44 and result.stopped == ""
    assert (tmp_path / "results.png").stat().st_size > 1000
    with open(tmp_path / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["epoch", "step", "train_loss", "val_loss", "val_accuracy", "val_samples", "lr",
                             "epoch_time", "samples_per_s"]
    state = checkpoint.load(tmp_path)
    assert state["progress"]["epoch"] == 2 and state["progress"]["step"] == 44 and state["ema"]["updates"] == 44
    assert state["scheduler"]["last_epoch"] == 44 and len(state["rng"]["ranks"]) == 1
    assert (tmp_path / "checkpoints" / "best").is_file()


def test_cosine_schedule_ends_at_min_lr(tmp_path: Path) -> None:
    _, result = _run(tmp_path, replace(BASE, warmup_steps=5, min_lr_ratio=0.1))
    assert result.last["lr"] == pytest.approx(0.005)


def test_bf16_autocast_on_cpu(tmp_path: Path) -> None:
    _, result = _run(tmp_path, replace(BASE, amp="bf16"), model_cls=SmallCNN)
    assert torch.isfinite(torch.tensor(result.last["train_loss"])) and result.last["val_accuracy"] > 0.5


def test_channels_last_and_clipping(tmp_path: Path) -> None:
    _, result = _run(tmp_path, replace(BASE, channels_last=True, grad_clip=1.0), model_cls=SmallCNN)
    assert result.last["val_accuracy"] > 0.5


@pytest.mark.slow
def test_compile_with_aot_eager(tmp_path: Path) -> None:
    eager, _ = _run(tmp_path / "eager", replace(BASE, epochs=1))
    compiled, _ = _run(tmp_path / "compiled", replace(BASE, epochs=1, compile=True, compile_backend="aot_eager"))
    for k, v in _weights(eager).items():
        torch.testing.assert_close(_weights(compiled)[k], v, rtol=1e-4, atol=1e-5)


def test_early_stopping(tmp_path: Path) -> None:
    calls = {"n": 0}

    def worsening(out: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, int]:
        calls["n"] += 1  # the validation metric gets worse with every batch: the best epoch is the first
        return torch.tensor(1000.0 - calls["n"]), 1

    torch.manual_seed(0)
    model = MLP()
    result = fit(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.01),
                 loss_fn=torch.nn.CrossEntropyLoss(), metric=worsening, train_set=Digits(ASSET, "train"),
                 val_set=Digits(ASSET, "val"), batch=harness.plan_batch(64, 1),
                 trainer=replace(BASE, epochs=10, patience=2), device=torch.device("cpu"), run_dir=tmp_path)
    assert result.stopped == "early" and result.epochs == 3


def test_options_that_need_cuda_are_refused_on_cpu() -> None:
    cpu = torch.device("cpu")
    with pytest.raises(ConfigError, match="trainer.amp=fp16 needs CUDA"):
        check_trainer(replace(BASE, amp="fp16"), cpu)
    with pytest.raises(ConfigError, match="trainer.sync_bn=true needs CUDA"):
        check_trainer(replace(BASE, sync_bn=True), cpu)


class Crash(RuntimeError):
    pass


def test_mid_epoch_resume_is_exact(tmp_path: Path) -> None:
    trainer = replace(BASE, epochs=3, save_every_steps=5, ema=True, ema_tau=10)
    reference, _ = _run(tmp_path / "ref", trainer, model_cls=SmallCNN)

    calls = {"n": 0}

    def crashing_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        calls["n"] += torch.is_grad_enabled()  # training steps only, not evaluation
        if calls["n"] == 37:  # step 37 of 66, in epoch 2, after the step-35 checkpoint
            raise Crash("simulated failure")
        return torch.nn.functional.cross_entropy(out, y)

    with pytest.raises(Crash):
        _run(tmp_path / "run", trainer, model_cls=SmallCNN, loss_fn=crashing_loss)
    saved = checkpoint.load(tmp_path / "run")["progress"]
    assert (saved["epoch"], saved["step_in_epoch"], saved["step"]) == (1, 13, 35)
    resumed, result = _run(tmp_path / "run", trainer, model_cls=SmallCNN)  # trainer.resume=auto
    assert result.epochs == 3 and result.steps == 66
    for k, v in _weights(reference).items():
        assert (resumed.state_dict()[k].double() - v.double()).abs().max().item() <= 1e-6, k
    with open(tmp_path / "run" / "metrics.csv", newline="") as f:
        assert [r["epoch"] for r in csv.DictReader(f)] == ["1", "2", "3"]


def test_resume_from_a_missing_path_names_it(tmp_path: Path) -> None:
    with pytest.raises(checkpoint.CheckpointError, match="trainer.resume='/nope.pt': no such checkpoint file"):
        _run(tmp_path, replace(BASE, resume="/nope.pt"))


def test_user_metric_and_generated_dataset(tmp_path: Path) -> None:
    x = torch.randn(200, 64)
    y = (x[:, 0] > 0).long()

    def error_rate(out: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, int]:
        return (out.argmax(1) != t).sum(), t.numel()

    torch.manual_seed(0)
    model = MLP(num_classes=2)
    result = fit(model=model, optimizer=torch.optim.Adam(model.parameters(), 1e-2), loss_fn=torch.nn.CrossEntropyLoss(),
                 metric=error_rate, train_set=TensorDataset(x, y), val_set=TensorDataset(x[:37], y[:37]),
                 batch=harness.plan_batch(20, 1), trainer=replace(BASE, epochs=5), device=torch.device("cpu"),
                 run_dir=tmp_path)
    assert result.last["val_samples"] == 37 and result.last["val_metric"] < 0.3


def test_tensorboard_logger_writes_events(tmp_path: Path) -> None:
    _run(tmp_path, replace(BASE, epochs=1, logger="tensorboard"))
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def test_deterministic_mode_is_switched_on_for_the_run(tmp_path: Path) -> None:
    from harness.runtime import session

    before = torch.are_deterministic_algorithms_enabled()
    try:
        with session(device="cpu", run_root=tmp_path, run_id_override="det", deterministic=True):
            assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(before)
    import logging

    log = logging.getLogger("harness")  # the session gave the logger back as it found it
    assert log.handlers == [] and log.propagate and log.level == logging.NOTSET


def test_monitor_a_loss_with_min_picks_best_and_stops_on_it(tmp_path: Path) -> None:
    # at this learning rate the val loss is lowest at epoch 5 and the accuracy highest at epoch 6
    _, result = _run(tmp_path, replace(BASE, epochs=6, monitor="val_loss", patience=1), lr=0.5)
    losses = [row["val_loss"] for row in result.history]
    accuracy = [row["val_accuracy"] for row in result.history]
    assert losses.index(min(losses)) == 4 and accuracy.index(max(accuracy)) == 5, (losses, accuracy)
    best = checkpoint.Store(tmp_path / "checkpoints").pointed("best")
    assert checkpoint.info(best)[0]["epoch"] == 5  # auto mode: "loss" in the key means lower is better
    assert checkpoint.load(best)["progress"]["best"] == min(losses)
    assert result.stopped == "early"  # epoch 6 was worse than 5: patience 1 spent (accuracy would not stop)


def test_monitor_mode_max_on_a_loss_and_an_unknown_key(tmp_path: Path) -> None:
    _, result = _run(tmp_path / "a", replace(BASE, epochs=3, monitor="train_loss", monitor_mode="max"))
    worst = [row["train_loss"] for row in result.history]
    best = checkpoint.Store(tmp_path / "a" / "checkpoints").pointed("best")
    assert checkpoint.info(best)[0]["epoch"] == worst.index(max(worst)) + 1  # as asked, even for a loss
    with pytest.raises(ConfigError, match=r"trainer.monitor='val_acc' is not a key of the metrics row; the keys: "
                                          r"epoch, step, train_loss, val_loss, val_accuracy, val_samples, lr"):
        _run(tmp_path / "b", replace(BASE, monitor="val_acc"))
    with pytest.raises(ConfigError, match=r"trainer.monitor_mode='lowest' is not one of auto, max, min"):
        replace(BASE, monitor_mode="lowest")
