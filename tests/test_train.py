"""`python -m harness.train` end to end, with real processes: in-process, launcher with 2 gloo
workers (elastic_launch), torchrun, multirun, and the errors that must stop before any worker."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from harness import checkpoint
from tests.conftest import REPO, clean_env, harness_cmd
from tests.runs import assert_no_process_left, digests, metrics, only_run_dir

pytestmark = pytest.mark.slow
TIMEOUT = 240


def run(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, env=clean_env(**env), capture_output=True, text=True, timeout=TIMEOUT)






def assert_rank0_files(run_dir: Path, epochs: int) -> None:
    for name in ("config.yaml", "train.log", "metrics.csv", "checkpoints/latest", "checkpoints/best"):
        assert (run_dir / name).is_file(), name
    config = (run_dir / "config.yaml").read_text()
    assert "${" not in config and "harness.data.datasets.Digits" in config  # fully resolved
    rows = metrics(run_dir)
    assert [int(r["epoch"]) for r in rows] == list(range(1, epochs + 1))
    assert all(int(r["val_samples"]) == 359 for r in rows)  # every val sample exactly once
    assert checkpoint.load(run_dir)["progress"]["epoch"] == epochs


def test_default_job_in_process(tmp_path: Path, cache_dir: Path) -> None:
    proc = run(harness_cmd("trainer.epochs=2"), tmp_path)
    assert proc.returncode == 0, proc.stderr
    run_dir = only_run_dir(tmp_path / "runs")
    assert_rank0_files(run_dir, epochs=2)
    assert sorted(p.name for p in (run_dir / "logs").iterdir()) == ["rank0.log"]
    assert "harness " in proc.stdout and "torch 2" in proc.stdout and "CPU (" in proc.stdout  # the banner
    assert "per-rank batch 64" in proc.stdout
    assert float(metrics(run_dir)[-1]["val_accuracy"]) > 0.9
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "runs"]  # Hydra wrote nothing of its own
    assert (cache_dir / "0f03c9de50199cd2" / "digits.npz").is_file()


def _check_two_rank_run(run_dir: Path, epochs: int) -> dict[int, str]:
    assert_rank0_files(run_dir, epochs)
    d = digests(run_dir)
    assert set(d) == {0, 1} and d[0] == d[1]  # identical final weights on every rank
    assert "OMP_NUM_THREADS=1" in (run_dir / "logs" / "rank1.log").read_text()
    assert "per-rank batch 32" in (run_dir / "train.log").read_text()
    return d


def test_launcher_starts_two_gloo_workers(tmp_path: Path, cache_dir: Path) -> None:
    proc = run(harness_cmd("device=cpu", "dist.nproc=2", "trainer.epochs=2", "model=mlp",
                           f"run_root={tmp_path}/runs"), tmp_path)
    assert proc.returncode == 0, proc.stderr
    run_dir = only_run_dir(tmp_path / "runs")
    _check_two_rank_run(run_dir, epochs=2)
    assert "(torchrun, world size 2, backend gloo)" in (run_dir / "train.log").read_text()
    assert_no_process_left(str(tmp_path))

    # each rank trained on its own shard of the same global batches: the weights equal a 1-process run's
    single = run(harness_cmd("trainer.epochs=2", "model=mlp", f"run_root={tmp_path}/one"), tmp_path)
    assert single.returncode == 0, single.stderr
    a = checkpoint.load(run_dir)["model"]
    b = checkpoint.load(only_run_dir(tmp_path / "one"))["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_torchrun_runs_the_same_job(tmp_path: Path, cache_dir: Path) -> None:
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "harness.train",
            "device=cpu", "trainer.epochs=1"]
    proc = run(args, tmp_path)
    assert proc.returncode == 0, proc.stderr
    run_dir = only_run_dir(tmp_path / "runs")
    assert run_dir.name.startswith("elastic-")
    _check_two_rank_run(run_dir, epochs=1)


@pytest.mark.parametrize(("device", "words"), [
    ("0,1", "device='0,1' asks for CUDA GPUs, but none is visible"),  # reached our parser, not Hydra's sweep
    ("[0,1]", "device='0,1' asks for CUDA GPUs"),
    ("abc", "device='abc' is malformed"),
    ("0,0", "device='0,0' names GPU 0 more than once"),
])
def test_bad_devices_stop_before_any_worker(tmp_path: Path, device: str, words: str) -> None:
    proc = run(harness_cmd(f"device={device}", "dist.nproc=2"), tmp_path)
    assert proc.returncode == 2 and words in proc.stderr, proc.stderr
    assert not (tmp_path / "runs").exists()


def test_non_divisible_batch_stops_before_any_worker(tmp_path: Path) -> None:
    proc = run(harness_cmd("device=cpu", "dist.nproc=2", "trainer.accumulate=2", "data.batch_size=30"), tmp_path)
    assert proc.returncode == 2
    assert ("data.batch_size=30 (the global batch) is not divisible by world size 2 x trainer.accumulate 2 = 4; "
            "nearest valid: 28 or 32") in proc.stderr
    assert not (tmp_path / "runs").exists()


def test_unknown_key_names_the_key(tmp_path: Path) -> None:
    proc = run(harness_cmd("trainer.foo=1"), tmp_path)
    assert proc.returncode != 0 and "Key 'foo' not in 'TrainerConfig'" in proc.stderr


def test_multirun_one_directory_per_job(tmp_path: Path, cache_dir: Path) -> None:
    proc = run(harness_cmd("-m", "trainer.epochs=1,2", "model=mlp"), tmp_path)
    assert proc.returncode == 0, proc.stderr
    dirs = sorted(p for p in (tmp_path / "runs").iterdir() if p.is_dir())
    assert [d.name.rsplit("_", 1)[1] for d in dirs] == ["0", "1"]
    assert [len(metrics(d)) for d in dirs] == [1, 2]


def test_failing_worker_is_reported_and_leaves_no_process(tmp_path: Path, cache_dir: Path) -> None:
    proc = run(harness_cmd("device=cpu", "dist.nproc=2", "model._target_=harness.models.NoSuchModel",
                           f"run_root={tmp_path}/runs"), tmp_path)
    assert proc.returncode == 1
    assert "NoSuchModel" in proc.stderr and "worker(s) failed" in proc.stderr
    assert_no_process_left(str(tmp_path))


def test_bring_your_own_model_and_data_example(tmp_path: Path, cache_dir: Path) -> None:
    example = REPO / "examples" / "custom"
    proc = run(harness_cmd("--config-dir", "conf", "experiment=spirals", "device=cpu", "dist.nproc=2",
                           "trainer.epochs=10", f"run_root={tmp_path}/runs"), example)
    assert proc.returncode == 0, proc.stderr
    run_dir = only_run_dir(tmp_path / "runs")
    assert "spirals.models.SpiralNet" in (run_dir / "config.yaml").read_text()
    assert float(metrics(run_dir)[-1]["val_accuracy"]) > 0.8

    api = run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "train_spirals.py"],
              example, HARNESS_RUN_ID=f"api-{tmp_path.name}")
    assert api.returncode == 0, api.stderr
    assert re.search(r"val accuracy 0\.9\d\d|val accuracy 1\.000", api.stdout), api.stdout
    import shutil

    shutil.rmtree(example / "runs" / f"api-{tmp_path.name}")
