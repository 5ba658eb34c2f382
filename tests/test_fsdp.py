"""`trainer.strategy=fsdp` with real processes (gloo): built on the meta device with DDP's initial
weights, ends where DDP ends, evaluates a validation set that does not divide without deadlocking,
and writes sharded checkpoints that `info` and `export` read and a DDP run refuses.

Resume on other world sizes (2 -> 3 -> 2, 2 -> 1, bit-exact on the same one) runs for both
strategies in tests/test_resume_world.py; preemption and a killed worker in test_resilience.py; a
frozen rank under fsdp in test_watchdog.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from harness import checkpoint
from harness.models import MLP
from tests.conftest import REPO, clean_env, harness_cmd
from tests.runs import digests, metrics

pytestmark = pytest.mark.slow
TIMEOUT = 240
FEW = ["data.dataset._target_=tests.sharding.parts.FewDigits", "+data.dataset.val_samples=65"]


def train(tmp: Path, run_id: str, nproc: int, *overrides: str) -> Path:
    env = clean_env(HARNESS_RUN_ID=run_id, HARNESS_CACHE=str(tmp / "cache"), PYTHONPATH=str(REPO))
    proc = subprocess.run(harness_cmd("device=cpu", f"dist.nproc={nproc}", f"run_root={tmp}/runs", *overrides),
                          cwd=tmp, env=env, text=True, capture_output=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return tmp / "runs" / run_id


def test_built_on_the_meta_device_with_ddps_initial_weights_one_shard_per_rank() -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "tests/sharding/build_worker.py"]
    proc = subprocess.run(cmd, cwd=REPO, env=clean_env(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1"), text=True,
                          capture_output=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [r["model"] for r in rows] == ["SmallCNN", "Tower", "Tower-by-size"]
    for row in rows:
        assert row["equal"] and row["rng_after"], row  # bit for bit, and the generator where DDP's is
        assert sum(row["local"]) == row["total"], row  # every parameter on exactly one rank
        assert max(row["local"]) <= row["total"] / 2 + 1024, row  # about half each (dim-0 chunks)


# (overrides, rtol): reduce-scatter sums the same two numbers as all-reduce, so the plain job agrees
# bit for bit here; clipping takes the norm over shards (another summation order), and bf16 rounds
# inside every layer, so those are held to a looser tolerance
CASES = {
    "plain": (["model=mlp"], 1e-6),
    "accumulate-clip-ema-units": (["model=mlp", "trainer.accumulate=2", "trainer.grad_clip=0.5", "trainer.ema=true",
                                   "trainer.ema_tau=20", "trainer.warmup_steps=5", "trainer.fsdp.wrap=[Linear]"], 1e-4),
    "bf16-cnn": (["trainer.amp=bf16", "trainer.fsdp.min_params=1000"], 1e-3),
}


@pytest.mark.parametrize("case", list(CASES))
def test_fsdp_ends_with_the_weights_ddp_ends_with(case: str, tmp_path: Path) -> None:
    overrides, rtol = CASES[case]
    job = [*overrides, "trainer.epochs=2"]
    sharded = train(tmp_path, "fsdp", 2, *job, "trainer.strategy=fsdp")
    replicated = train(tmp_path, "ddp", 2, *job, "trainer.strategy=ddp")
    a, b = checkpoint.load(sharded), checkpoint.load(replicated)
    assert checkpoint.load(sharded)["meta"]["sharded"] and not b["meta"]["sharded"]
    for k in b["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=rtol, atol=rtol / 10)
    for ra, rb in zip(metrics(sharded), metrics(replicated), strict=True):
        assert ra["val_samples"] == rb["val_samples"]
        assert float(ra["val_loss"]) == pytest.approx(float(rb["val_loss"]), rel=rtol * 10)
    assert len(set(digests(sharded).values())) == 1  # every rank gathered the same full weights
    if "trainer.ema=true" in overrides:  # the sharded EMA, gathered, is DDP's ModelEMA
        for path in (sharded, replicated):
            checkpoint.export_model(path, path / "ema.pt", ema=True)
        ea, eb = (torch.load(p / "ema.pt", weights_only=True) for p in (sharded, replicated))
        for k in eb:
            torch.testing.assert_close(ea[k], eb[k], rtol=rtol, atol=rtol / 10)
        assert not torch.equal(ea["net.1.weight"], a["model"]["net.1.weight"])


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_accumulating_two_micro_steps_end_where_one_process_does(strategy: str, tmp_path: Path) -> None:
    # the same global batches; the non-final micro-step skips the gradient sync (DDP's no_sync, FSDP's
    # set_requires_gradient_sync(False)) and the final one reduces the sum: the same mean gradient
    job = ["model=mlp", "trainer.epochs=2", "data.batch_size=64"]
    one = train(tmp_path, "one", 1, *job)
    two = train(tmp_path, "two", 2, *job, "trainer.accumulate=2", f"trainer.strategy={strategy}")
    assert "2 rank(s) x 2 micro-step(s) x 16 samples" in (two / "train.log").read_text()
    a, b = checkpoint.load(two)["model"], checkpoint.load(one)["model"]
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("nproc", "batch"), [(2, 64), (3, 63)])
def test_65_validation_samples_are_each_counted_once_and_no_rank_waits(nproc: int, batch: int,
                                                                        tmp_path: Path) -> None:
    # per-rank batch 32 on 2 ranks (shards of 33 and 32), 21 on 3 (22, 22, 21): without padding the
    # short shard runs one forward fewer and its peers wait in an all-gather until dist.timeout
    job = [*FEW, "model=mlp", f"data.batch_size={batch}", "trainer.epochs=1", "dist.timeout=60"]
    sharded = train(tmp_path, "fsdp", nproc, *job, "trainer.strategy=fsdp")
    replicated = train(tmp_path, "ddp", nproc, *job, "trainer.strategy=ddp")
    (ra,), (rb,) = metrics(sharded), metrics(replicated)
    assert ra["val_samples"] == rb["val_samples"] == "65"
    assert float(ra["val_loss"]) == pytest.approx(float(rb["val_loss"]), rel=1e-5)
    assert float(ra["val_accuracy"]) == pytest.approx(float(rb["val_accuracy"]), abs=1e-9)


def test_sharded_checkpoints_are_inspected_exported_and_refused_by_a_ddp_run(tmp_path: Path) -> None:
    run = train(tmp_path, "job", 2, "model=mlp", "trainer.epochs=1", "trainer.ema=true", "trainer.strategy=fsdp")
    entry = checkpoint.Store(run / "checkpoints").pointed("latest")
    assert sorted(p.name for p in (entry / "shards").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    out = subprocess.run([sys.executable, "-m", "harness.checkpoint", "info", str(run), "--json"],
                         capture_output=True, text=True, check=True).stdout
    (row,) = json.loads(out)
    assert row["valid"] and row["sharded"] == ["model", "optimizer", "ema"] and row["world_size"] == 2
    assert {"model", "optimizer", "ema", "rng"} <= set(row["parts"])

    dest = tmp_path / "model.pt"
    subprocess.run([sys.executable, "-m", "harness.checkpoint", "export", str(run), str(dest)], check=True,
                   capture_output=True)
    model = MLP()
    model.load_state_dict(torch.load(dest, weights_only=True))  # strict: every key, full shapes
    assert all(torch.equal(v, checkpoint.load(run)["model"][k]) for k, v in model.state_dict().items())

    env = clean_env(HARNESS_RUN_ID="job", HARNESS_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run(harness_cmd("device=cpu", "dist.nproc=2", f"run_root={tmp_path}/runs", "model=mlp",
                                      "trainer.epochs=2", "trainer.strategy=ddp"),
                          cwd=tmp_path, env=env, text=True, capture_output=True, timeout=TIMEOUT)
    assert proc.returncode != 0
    said = proc.stdout + proc.stderr
    assert "was saved sharded (trainer.strategy=fsdp), and this run is whole (trainer.strategy=ddp" in said, said
    assert checkpoint.Store(run / "checkpoints").pointed("latest") == entry  # nothing was touched
