"""The checkpoint package: the format and its migration, the store's layout (entries, pointers,
retention), the parts' own states, and the tools. Resume through the loop, in one process:
fallback past an unreadable checkpoint, `trainer.resume=never` and `=<path>`, a version-1 run
directory, early-stopping state. (Other world sizes, with real processes: test_resume_world.py.)"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import harness
from harness import checkpoint
from harness.checkpoint import format as fmt
from harness.checkpoint.rng import RankStreams
from harness.checkpoint.store import Store, entry_name
from harness.config import TrainerConfig
from harness.data.datasets import Digits
from harness.data.sampler import GlobalBatchSampler
from harness.engine import fit
from harness.models import MLP
from harness.utils.early_stopping import EarlyStopping

ASSET = Path(harness.__file__).parent / "data" / "assets" / "digits.npz"
BASE = TrainerConfig(epochs=3, log_every=5, progress=False)  # 22 steps per epoch at batch 64


class Crash(RuntimeError):
    pass


def _fit(run_dir: Path, trainer: TrainerConfig, *, crash_at: int = 0, metric=None,
         dropout: float = 0.0) -> tuple[MLP, harness.FitResult]:
    """MLP on the digits in this process; `crash_at`: the training step that raises Crash."""
    calls = {"n": 0}

    def loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        calls["n"] += torch.is_grad_enabled()
        if calls["n"] == crash_at:
            raise Crash(f"simulated failure at step {crash_at}")
        return torch.nn.functional.cross_entropy(out, y)

    torch.manual_seed(0)
    model = MLP(dropout=dropout)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    result = fit(model=model, optimizer=opt, loss_fn=loss, metric=metric or harness.Accuracy(),
                 train_set=Digits(ASSET, "train"), val_set=Digits(ASSET, "val"), batch=harness.plan_batch(64, 1),
                 trainer=trainer, device=torch.device("cpu"), run_dir=run_dir)
    return model, result


def _max_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    sb = b.state_dict()
    return max((v.double() - sb[k].double()).abs().max().item() for k, v in a.state_dict().items())


def _epochs(run_dir: Path) -> list[int]:
    import csv

    with open(run_dir / "metrics.csv", newline="") as f:
        return [int(r["epoch"]) for r in csv.DictReader(f)]


def _state(step: int, blob: float = 0.0) -> dict:
    parts = {"model": {"w": torch.full((3,), blob)}, "optimizer": {}, "scheduler": {},
             "progress": {"epoch": 0, "step_in_epoch": step, "step": step, "epoch_loss": 0.0, "best": 0.0}}
    return fmt.pack(parts, world_size=1, metrics={}, config="seed: 0\n")


def _commit(store: Store, step: int, *, best: bool = False, blob: float = 0.0) -> Path:
    state = _state(step, blob)
    return store.commit(step, lambda d: fmt.write(state, d / fmt.STATE_FILE), best=best)


# ---------------------------------------------------------------- format and store


def test_round_trip_weights_only(tmp_path: Path) -> None:
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 64)).sum().backward()
    opt.step()
    progress = {"epoch": 3, "step_in_epoch": 0, "step": 66, "epoch_loss": 0.0, "best": 0.9}
    state = fmt.pack({"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": {},
                      "progress": progress}, world_size=2, metrics={"val_loss": 0.5}, config="seed: 0\n")
    fmt.write(state, tmp_path / "state.pt")
    loaded = torch.load(tmp_path / "state.pt", weights_only=True)  # plain torch reads it, nothing unpickled
    assert loaded["format"] == checkpoint.FORMAT and loaded["meta"]["world_size"] == 2
    assert loaded["progress"] == progress and loaded["meta"]["config"] == "seed: 0\n"
    for k, v in model.state_dict().items():
        assert torch.equal(loaded["model"][k], v)
    assert os.listdir(tmp_path) == ["state.pt"]


def test_corrupt_foreign_and_missing_files_name_the_file(tmp_path: Path) -> None:
    (tmp_path / "corrupt.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(checkpoint.CheckpointError, match="corrupt.pt is corrupt"):
        checkpoint.read(tmp_path / "corrupt.pt")
    torch.save({"weights": torch.ones(1)}, tmp_path / "foreign.pt")
    with pytest.raises(checkpoint.CheckpointError, match="foreign.pt is not a harness checkpoint .format None"):
        checkpoint.read(tmp_path / "foreign.pt")
    with pytest.raises(checkpoint.CheckpointError, match="missing.pt does not exist"):
        checkpoint.read(tmp_path / "missing.pt")


def test_version_1_files_are_migrated(tmp_path: Path) -> None:
    rng = [checkpoint.rng_state()]
    v1 = {"format": checkpoint.LEGACY_FORMAT, "model": {"w": torch.ones(2)}, "optimizer": {}, "scheduler": {},
          "scaler": {}, "ema": None, "epoch": 1, "step_in_epoch": 5, "step": 27, "epoch_loss": 3.5, "best": 0.8,
          "world_size": 1, "early_stopping": {"best_fitness": 0.8, "best_epoch": 1}, "config": "seed: 0\n",
          "metrics": {"val_loss": 0.4}, "rng": rng}
    torch.save(v1, tmp_path / "last.pt")
    state = checkpoint.read(tmp_path / "last.pt")
    assert state["progress"] == {"epoch": 1, "step_in_epoch": 5, "step": 27, "epoch_loss": 3.5, "best": 0.8}
    assert state["early_stopping"] == {"best_fitness": 0.8, "best_epoch": 1} and "ema" not in state
    assert state["rng"]["world_size"] == 1 and len(state["rng"]["ranks"]) == 1
    assert state["meta"]["written_as"] == checkpoint.LEGACY_FORMAT


def test_commit_points_prunes_and_keeps_best(tmp_path: Path) -> None:
    store = Store(tmp_path / "checkpoints")
    for step in (10, 20, 30, 40, 50):
        _commit(store, step, best=step == 20)
        store.prune(keep=2)
    assert [e.name for e in store.entries()] == [entry_name(s) for s in (20, 40, 50)]
    assert store.pointed("latest") == store.root / entry_name(50)
    assert store.pointed("best") == store.root / entry_name(20)
    assert sorted(os.listdir(store.root)) == ["best", "latest", *(entry_name(s) for s in (20, 40, 50))]
    assert store.candidates() == [store.root / entry_name(s) / "state.pt" for s in (50, 40, 20)]


def test_a_failed_save_keeps_the_previous_and_a_same_step_save_replaces(tmp_path: Path) -> None:
    store = Store(tmp_path)
    _commit(store, 5, blob=1.0)
    with pytest.raises(RuntimeError, match="disk full"):
        store.commit(6, lambda d: (_ for _ in ()).throw(RuntimeError("disk full")), best=False)
    assert store.pointed("latest").name == entry_name(5) and sorted(os.listdir(tmp_path)) == ["latest", entry_name(5)]
    _commit(store, 5, blob=2.0)  # mid-epoch, then again at the end of the epoch
    assert checkpoint.load(tmp_path)["model"]["w"][0] == 2.0 and len(store.entries()) == 1


def test_a_pointer_to_a_lost_entry_falls_back_to_the_newest_there_is(tmp_path: Path) -> None:
    store = Store(tmp_path)
    for step in (10, 20):
        _commit(store, step)
    (tmp_path / "latest").write_text(entry_name(30) + "\n")  # a crash kept the pointer's rename, not the entry's
    assert store.candidates()[0] == tmp_path / entry_name(20) / "state.pt"
    assert checkpoint.load(tmp_path)["progress"]["step"] == 20


def test_set_aside_keeps_one_line_of_saves(tmp_path: Path) -> None:
    store = Store(tmp_path)
    for step in (10, 20, 30):
        _commit(store, step, best=step == 30)
    assert store.set_aside(10, current=tmp_path / entry_name(10)) == [entry_name(20), entry_name(30)]
    assert [e.name for e in store.entries()] == [entry_name(10)] and store.pointed("best") is None
    assert store.pointed("latest") == tmp_path / entry_name(10)
    assert sorted(os.listdir(tmp_path / "superseded")) == [entry_name(20), entry_name(30)]
    (tmp_path / "last.pt").write_bytes(b"a version-1 file")
    assert store.set_aside(0, current=None) == [entry_name(10), "last.pt"]  # a start from scratch
    assert store.candidates() == [] and store.pointed("latest") is None


def test_every_way_to_name_a_checkpoint(tmp_path: Path) -> None:
    store = Store(tmp_path / "run" / "checkpoints")
    _commit(store, 1, best=True)
    _commit(store, 2)
    newest, older = (store.root / entry_name(s) / "state.pt" for s in (2, 1))
    assert checkpoint.resolve(tmp_path / "run") == [newest, older]
    assert checkpoint.resolve(store.root) == [newest, older]
    assert checkpoint.resolve(store.root / "best") == [older]
    assert checkpoint.resolve(store.root / entry_name(2)) == [newest] == checkpoint.resolve(newest)
    assert checkpoint.resolve(tmp_path) == []


# ---------------------------------------------------------------- the parts


class _Counters:
    def __init__(self) -> None:
        self.state = {"epoch": 0, "step_in_epoch": 0, "step": 0, "epoch_loss": 0.0, "best": 0.0}

    def state_dict(self) -> dict:
        return dict(self.state)

    def load_state_dict(self, state: dict) -> None:
        self.state = dict(state)


def _parts(seed: int) -> dict:
    torch.manual_seed(seed)
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return {"model": model, "optimizer": opt, "scheduler": torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
            "scaler": torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=1),
            "early_stopping": EarlyStopping(patience=3), "sampler": GlobalBatchSampler(1000, 96, seed=seed),
            "progress": _Counters(), "rng": RankStreams(0, 1)}


def _checkpointer(parts: dict, directory: Path) -> checkpoint.Checkpointer:
    return checkpoint.Checkpointer(parts, directory=directory, rank=0, world_size=1, keep=2, config="",
                                   device=torch.device("cpu"))


def test_grad_scaler_early_stopping_and_counters_come_back(tmp_path: Path) -> None:
    saved = _parts(0)
    saved["scaler"].scale(saved["model"](torch.randn(2, 64)).sum()).backward()
    saved["scaler"].step(saved["optimizer"])
    saved["scaler"].update()  # finite gradients, growth_interval 1: the scale doubles
    saved["early_stopping"](epoch=4, fitness=0.75)
    saved["progress"].state.update(epoch=4, step=40)
    _checkpointer(saved, tmp_path).save(best=False, metrics={})
    fresh = _parts(1)
    fresh["sampler"] = GlobalBatchSampler(1000, 96, seed=0)
    assert _checkpointer(fresh, tmp_path).restore("auto") == tmp_path / entry_name(40) / "state.pt"
    assert fresh["scaler"].state_dict() == saved["scaler"].state_dict() and fresh["scaler"].get_scale() == 2048.0
    assert (fresh["early_stopping"].best_epoch, fresh["early_stopping"].best_fitness) == (4, 0.75)
    assert fresh["progress"].state == saved["progress"].state
    assert _max_diff(fresh["model"], saved["model"]) == 0.0
    assert fresh["rng"].pending is not None  # same world size: this rank's streams, applied by the loop


def test_another_sequence_of_global_batches_is_refused(tmp_path: Path) -> None:
    _checkpointer(_parts(0), tmp_path).save(best=False, metrics={})
    other = _parts(0)
    other["sampler"] = GlobalBatchSampler(1000, 64, seed=0)
    with pytest.raises(checkpoint.CheckpointError, match=r"its sampler state does not fit.*global_batch 96 -> 64"):
        _checkpointer(other, tmp_path).restore("auto")


def test_another_world_size_says_once_which_streams_restart(caplog: pytest.LogCaptureFixture) -> None:
    saved = {"world_size": 2, "ranks": [checkpoint.rng_state()] * 2}
    streams = RankStreams(0, 3)
    with caplog.at_level(logging.WARNING, logger="harness"):
        streams.load_state_dict(saved)
        RankStreams(1, 3).load_state_dict(saved)  # only rank 0 says it
    assert streams.pending is None
    (line,) = [r.getMessage() for r in caplog.records]
    assert "on 3 rank(s) from a checkpoint saved on 2" in line and "torch (CPU), CUDA, numpy, python" in line


# ---------------------------------------------------------------- resume through the loop


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> MLP:
    return _fit(tmp_path_factory.mktemp("ref"), BASE)[0]


def test_unreadable_newest_falls_back_to_the_previous(tmp_path: Path, reference: MLP,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(Crash):
        _fit(tmp_path, BASE, crash_at=50)  # saved at steps 22 and 44
    newest = tmp_path / "checkpoints" / entry_name(44) / "state.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated (a full disk, a bad copy)
    with caplog.at_level(logging.WARNING, logger="harness"):
        resumed, result = _fit(tmp_path, BASE)
    previous = tmp_path / "checkpoints" / entry_name(22) / "state.pt"
    assert f"the newest checkpoint {newest} is unreadable; resuming from the previous valid one, {previous}" \
        in caplog.text
    assert result.epochs == 3 and _epochs(tmp_path) == [1, 2, 3]
    assert _max_diff(resumed, reference) <= 1e-6
    assert (tmp_path / "checkpoints" / "superseded" / entry_name(44)).is_dir()  # kept for a look, not tried again


def test_no_valid_checkpoint_names_the_files_and_never(tmp_path: Path, reference: MLP) -> None:
    with pytest.raises(Crash):
        _fit(tmp_path, BASE, crash_at=50)
    for step in (22, 44):
        (tmp_path / "checkpoints" / entry_name(step) / "state.pt").write_bytes(b"garbage")
    with pytest.raises(checkpoint.CheckpointError) as err:
        _fit(tmp_path, BASE)
    assert f"{entry_name(44)}/state.pt is corrupt" in str(err.value)
    assert f"{entry_name(22)}/state.pt is corrupt" in str(err.value) and "trainer.resume=never" in str(err.value)
    restarted, result = _fit(tmp_path, replace(BASE, resume="never"))  # starts over in the same directory
    assert result.epochs == 3 and _epochs(tmp_path) == [1, 2, 3] and _max_diff(restarted, reference) == 0.0
    assert sorted(os.listdir(tmp_path / "checkpoints" / "superseded")) == [entry_name(22), entry_name(44)]


def test_resume_from_a_path(tmp_path: Path, reference: MLP) -> None:
    _fit(tmp_path / "a", replace(BASE, save_every_steps=10, keep_checkpoints=10))
    entry = tmp_path / "a" / "checkpoints" / entry_name(30)  # epoch 2, 8 of its 22 batches done
    resumed, result = _fit(tmp_path / "b", replace(BASE, resume=str(entry)))
    assert result.epochs == 3 and _epochs(tmp_path / "b") == [2, 3]
    assert _max_diff(resumed, reference) == 0.0


def test_a_version_1_run_directory_resumes(tmp_path: Path, reference: MLP) -> None:
    with pytest.raises(Crash):
        _fit(tmp_path, BASE, crash_at=30)
    ck = tmp_path / "checkpoints"
    state = checkpoint.read(ck / entry_name(22) / "state.pt")
    p = state["progress"]
    v1 = {"format": checkpoint.LEGACY_FORMAT, **{k: state[k] for k in ("model", "optimizer", "scheduler", "scaler")},
          "ema": None, "early_stopping": None, "epoch": p["epoch"], "step_in_epoch": p["step_in_epoch"],
          "step": p["step"], "epoch_loss": p["epoch_loss"], "best": p["best"], "world_size": 1,
          "config": "", "metrics": state["meta"]["metrics"], "rng": state["rng"]["ranks"]}
    shutil.rmtree(ck)
    ck.mkdir()
    torch.save(v1, ck / "last.pt")  # what the harness wrote before harness-checkpoint-2
    resumed, result = _fit(tmp_path, BASE)
    assert result.epochs == 3 and _epochs(tmp_path) == [1, 2, 3] and _max_diff(resumed, reference) == 0.0
    assert sorted(os.listdir(ck / "superseded")) == ["last.pt"]  # the new entries supersede it
    assert checkpoint.info(ck / "superseded" / "last.pt")[0]["format"] == checkpoint.LEGACY_FORMAT


def test_with_dropout_only_the_restored_rng_makes_a_resume_exact(tmp_path: Path) -> None:
    reference, _ = _fit(tmp_path / "ref", BASE, dropout=0.3)
    with pytest.raises(Crash):
        _fit(tmp_path / "run", BASE, crash_at=30, dropout=0.3)
    shutil.copytree(tmp_path / "run", tmp_path / "no-rng")
    resumed, _ = _fit(tmp_path / "run", BASE, dropout=0.3)
    assert _max_diff(resumed, reference) == 0.0
    entry = tmp_path / "no-rng" / "checkpoints" / entry_name(22) / "state.pt"
    state = checkpoint.read(entry)
    del state["rng"]  # the control: the same checkpoint without the generators
    fmt.write(state, entry)
    unseeded, _ = _fit(tmp_path / "no-rng", BASE, dropout=0.3)
    assert _max_diff(unseeded, reference) > 1e-3  # other dropout masks: the test above has teeth


def test_early_stopping_state_survives_a_resume(tmp_path: Path) -> None:
    def worsening() -> object:
        calls = {"n": 0}

        def metric(out: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, int]:
            calls["n"] += 1  # worse with every batch: epoch 1 stays the best, patience 2 stops after epoch 3
            return torch.tensor(1000.0 - calls["n"]), 1
        return metric

    trainer = replace(BASE, epochs=10, patience=2, save_every_steps=5)
    _, uninterrupted = _fit(tmp_path / "ref", trainer, metric=worsening())
    assert uninterrupted.stopped == "early" and uninterrupted.epochs == 3
    metric = worsening()  # one for both halves of the interrupted run: it goes on getting worse
    with pytest.raises(Crash):
        _fit(tmp_path / "run", trainer, crash_at=32, metric=metric)  # in epoch 2, after the step-30 save
    _, result = _fit(tmp_path / "run", trainer, metric=metric)
    # without the restored best epoch (1), epoch 2 would count as the best and the run stop after epoch 4
    assert result.stopped == "early" and result.epochs == 3
    assert checkpoint.load(tmp_path / "run")["early_stopping"]["best_epoch"] == 1


# ---------------------------------------------------------------- tools


def test_info_and_export_from_the_command_line(tmp_path: Path) -> None:
    from harness.checkpoint.tools import main

    model, _ = _fit(tmp_path / "run", replace(BASE, epochs=1, ema=True))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(harness.__file__).parents[1]),
                                                         os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "harness.checkpoint", "info", str(tmp_path / "run"), "--json"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    (row,) = json.loads(proc.stdout)
    assert row["valid"] and row["latest"] and row["best"] and row["format"] == checkpoint.FORMAT
    assert (row["epoch"], row["step"], row["world_size"]) == (1, 22, 1) and row["size"] > 10_000
    assert row["metrics"]["val_accuracy"] > 0.5 and "ema" in row["parts"]
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "model.pt")]) == 0
    plain = torch.load(tmp_path / "model.pt", weights_only=True)  # one process, no process group, only tensors
    fresh = MLP()
    fresh.load_state_dict(plain)
    assert _max_diff(fresh, model) == 0.0
    ema = checkpoint.export_model(tmp_path / "run" / "checkpoints" / "best", tmp_path / "ema.pt", ema=True)
    assert torch.load(ema, weights_only=True).keys() == plain.keys()


def test_info_marks_an_unreadable_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from harness.checkpoint.tools import main

    store = Store(tmp_path / "checkpoints")
    _commit(store, 7)
    (store.root / entry_name(7) / "state.pt").write_bytes(b"x")
    assert main(["info", str(tmp_path)]) == 1
    assert f"{entry_name(7)}  (latest)\n  INVALID: checkpoint" in capsys.readouterr().out
    assert main(["info", str(tmp_path / "nothing")]) == 2
    assert main(["export", str(tmp_path), str(tmp_path / "m.pt")]) == 1 and not (tmp_path / "m.pt").exists()


WRITER = """
import sys, torch
from pathlib import Path
from harness.checkpoint import format as fmt
from harness.checkpoint.store import Store
store, step = Store(Path(sys.argv[1])), int(sys.argv[2])
while True:
    step += 1
    parts = {"model": {"blob": torch.full((2_000_000,), float(step))}, "optimizer": {}, "scheduler": {},
             "progress": {"epoch": 0, "step_in_epoch": step, "step": step, "epoch_loss": 0.0, "best": 0.0}}
    state = fmt.pack(parts, world_size=1, metrics={}, config="")
    store.commit(step, lambda d: fmt.write(state, d / fmt.STATE_FILE), best=step % 3 == 0)
    store.prune(2)
    print(step, flush=True)
"""


@pytest.mark.slow
def test_kill_during_save_leaves_a_whole_checkpoint(tmp_path: Path) -> None:
    import random
    import signal
    import time

    _commit(Store(tmp_path), 0)
    rng = random.Random(0)
    for attempt in range(5):
        before = checkpoint.load(tmp_path)["progress"]["step"]
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), str(before)], stdout=subprocess.PIPE,
                                text=True)
        assert proc.stdout is not None
        proc.stdout.readline()  # at least one save went through; the next one is under way
        time.sleep(rng.uniform(0.0, 0.1))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        state = checkpoint.load(tmp_path)  # `latest` always names a whole entry
        step = state["progress"]["step"]
        assert step > before and torch.all(state["model"]["blob"] == float(step)), attempt
        assert len(Store(tmp_path).entries()) <= 4  # the newest two and the best, plus one a kill left unpruned
    _commit(Store(tmp_path), 10_000)  # the next save sweeps the killed saves' partial directories away
    Store(tmp_path).prune(2)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")] and len(Store(tmp_path).entries()) <= 3
