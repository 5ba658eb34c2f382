"""Resume on another world size, and bit for bit on the same one, with real processes: gloo workers
started by `python -m harness.train device=cpu dist.nproc=N`, the same run id finding the same run
directory (as in test_resilience.py). Every test runs for both strategies: ddp (whole checkpoints
written by rank 0) and fsdp (sharded checkpoints, written by every rank and resharded on load; at
one process fsdp runs on a one-rank mesh).

Where a run stops is made deterministic: a reference run saves every 5 steps and keeps every entry,
and "the run stopped at step K" is a copy of its directory as a run stopped right after its step-K
save leaves it (later entries gone, `latest` naming step-K, no logs). Its metrics.csv keeps the rows
of later epochs on purpose: the resumed run must drop them and write every epoch once.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from harness import checkpoint
from harness.checkpoint.store import Store, entry_name, step_of
from tests.conftest import clean_env, harness_cmd
from tests.runs import assert_no_process_left, digests, epochs

pytestmark = pytest.mark.slow
# global batch 96: 14 global batches per epoch, 42 steps; the MLP has neither BatchNorm nor dropout,
# so per-rank batch statistics cannot differ between world sizes
JOB = ["device=cpu", "model=mlp", "data.batch_size=96", "trainer.epochs=3", "trainer.log_every=7",
       "trainer.save_every_steps=5", "trainer.keep_checkpoints=20"]
TIMEOUT = 240
RESTART = "these random streams restart from the seed"


def train(root: Path, run_id: str, nproc: int, *extra: str) -> subprocess.CompletedProcess[str]:
    root.mkdir(parents=True, exist_ok=True)
    env = clean_env(HARNESS_RUN_ID=run_id, HARNESS_CACHE=str(root / "cache"))
    return subprocess.run(harness_cmd(*JOB, f"dist.nproc={nproc}", f"run_root={root}/runs", *extra), cwd=root,
                          env=env, text=True, capture_output=True, timeout=TIMEOUT)


def trained(root: Path, run_id: str, nproc: int, *extra: str) -> Path:
    proc = train(root, run_id, nproc, *extra)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root / "runs" / run_id


def stopped_at(run_dir: Path, root: Path, run_id: str, step: int) -> Path:
    """A copy of `run_dir` as a run that stopped right after its step-`step` save would have left it."""
    copy = root / "runs" / run_id
    shutil.copytree(run_dir, copy)
    store = Store(copy / "checkpoints")
    for entry in store.entries():
        if step_of(entry) > step:
            shutil.rmtree(entry)
    (store.root / "latest").write_text(entry_name(step) + "\n")
    if store.pointed("best") is not None and not store.pointed("best").is_dir():
        (store.root / "best").unlink()
    shutil.rmtree(copy / "logs")
    (copy / "train.log").unlink()
    return copy


def compare(a: Path, b: Path) -> tuple[float, float]:
    """Max absolute and max relative difference of two runs' final model weights."""
    wa, wb = checkpoint.load(a)["model"], checkpoint.load(b)["model"]
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-6)
    diff = max((wa[k].double() - wb[k].double()).abs().max().item() for k in wa)
    rel = max(((wa[k].double() - wb[k].double()).abs() / wb[k].double().abs().clamp_min(1e-12)).max().item()
              for k in wa)
    return diff, rel


def check_resumed(run_dir: Path, step: int, nproc: int, saved_on: int) -> None:
    log = (run_dir / "train.log").read_text()
    assert f"resumed from {run_dir}/checkpoints/{entry_name(step)}/state.pt" in log, log
    assert log.count(RESTART) == (1 if nproc != saved_on else 0), log  # said once, naming the streams
    assert f"resuming on {nproc} rank(s) from a checkpoint saved on {saved_on}" in log or nproc == saved_on
    assert epochs(run_dir) == [1, 2, 3]  # every epoch once: the copied rows after the resumed epoch were dropped
    d = digests(run_dir)
    assert sorted(d) == list(range(nproc)) and len(set(d.values())) == 1  # the same weights on every rank


@pytest.fixture(scope="module", params=["ddp", "fsdp"])
def strategy(request: pytest.FixtureRequest) -> str:
    return f"trainer.strategy={request.param}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, strategy: str) -> Path:
    """The uninterrupted 2-rank run."""
    return trained(tmp_path_factory.mktemp("ref"), "ref", 2, strategy)


def test_two_to_three_to_two_ranks(tmp_path: Path, reference: Path, strategy: str) -> None:
    # 2 -> 3: stopped in epoch 2 (6 of its 14 global batches done), resumed on 3 ranks
    run_dir = stopped_at(reference, tmp_path, "three", 20)
    trained(tmp_path, "three", 3, strategy)
    check_resumed(run_dir, 20, nproc=3, saved_on=2)
    diff, rel = compare(run_dir, reference)
    print(f"2 -> 3 ranks: max |diff| {diff:.3g}, max relative {rel:.3g}")

    # 3 -> 2: from the step-30 checkpoint those 3 ranks wrote (epoch 3, 2 of 14 done), back on 2 ranks
    assert checkpoint.load(run_dir / "checkpoints" / entry_name(30))["meta"]["world_size"] == 3
    back = stopped_at(run_dir, tmp_path, "two", 30)
    trained(tmp_path, "two", 2, strategy)
    check_resumed(back, 30, nproc=2, saved_on=3)
    diff, rel = compare(back, reference)
    print(f"3 -> 2 ranks: max |diff| {diff:.3g}, max relative {rel:.3g}")
    assert_no_process_left(str(tmp_path))


def test_two_to_one_rank(tmp_path: Path, reference: Path, strategy: str) -> None:
    run_dir = stopped_at(reference, tmp_path, "one", 35)  # epoch 3, 7 of 14 done
    trained(tmp_path, "one", 1, strategy)
    check_resumed(run_dir, 35, nproc=1, saved_on=2)
    diff, rel = compare(run_dir, reference)
    print(f"2 -> 1 rank: max |diff| {diff:.3g}, max relative {rel:.3g}")


def test_a_world_size_that_does_not_divide_the_global_batch_is_refused(tmp_path: Path, reference: Path,
                                                                      strategy: str) -> None:
    run_dir = stopped_at(reference, tmp_path, "five", 20)
    proc = train(tmp_path, "five", 5, strategy)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert re.search(r"error: data.batch_size=96 .* world size 5 .*world sizes that keep it \(as resuming a run "
                     r"must\): 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 96", proc.stderr), proc.stderr
    assert checkpoint.load(run_dir)["progress"]["step"] == 20  # nothing was touched
    assert not (run_dir / "logs").exists()


def test_same_world_size_is_bit_exact_with_dropout_and_early_stopping(tmp_path: Path, strategy: str) -> None:
    extra = ("model.dropout=0.3", "trainer.patience=2", "trainer.amp=off", strategy)
    reference = trained(tmp_path / "ref", "ref", 2, *extra)
    run_dir = stopped_at(reference, tmp_path / "run", "job", 25)  # epoch 2, 11 of 14 done
    trained(tmp_path / "run", "job", 2, *extra)
    check_resumed(run_dir, 25, nproc=2, saved_on=2)
    final, expected = checkpoint.load(run_dir), checkpoint.load(reference)
    assert all(torch.equal(final["model"][k], v) for k, v in expected["model"].items())  # bit for bit
    assert digests(run_dir) == digests(reference)
    assert final["early_stopping"] == expected["early_stopping"] and final["scaler"] == expected["scaler"]
    assert final["rng"]["world_size"] == 2
