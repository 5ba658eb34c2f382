"""bench/ (`make bench`): that the driver runs both sides for a few steps and writes its results,
and the CPU-independent parts of scripts/gpu_check.sh. No timing assertions: timings belong to
`make bench`, never to `make test`."""

from __future__ import annotations

import atexit
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench.data import StepClock, Synthetic, sync_mode
from bench.runs import Spec
from tests.conftest import REPO, clean_env

GPU_CHECK = REPO / "scripts" / "gpu_check.sh"


def test_sync_mode_exempts_first_last_and_logging_steps() -> None:
    modes = [sync_mode(k, steps=13, log_every=4) for k in range(13)]
    # batch k starts the step that ends with optimizer step k + 1; steps 4, 8, 12 log
    assert [k for k, m in enumerate(modes) if m == "default"] == [0, 3, 7, 11, 12]
    assert set(modes) == {"default", "error"}


def test_step_clock_sets_the_sync_mode_per_fetch(tmp_path: Path) -> None:
    seen: list[str] = []
    clock = StepClock(tmp_path, steps=5, log_every=2, check_sync=True, set_sync_mode=seen.append)
    ds = Synthetic(split="train", steps=5, batch=4)
    ds.clock = clock
    for k in range(5):
        assert len(ds.__getitems__([k * 4 + i for i in range(4)])) == 4
    assert seen == ["default", "default", "error", "default", "default"]
    clock.write()
    atexit.unregister(clock.write)
    record = json.loads((tmp_path / "rank0.json").read_text())
    assert len(record["fetch_times"]) == 5 and record["sync_modes"] == {"default": 4, "error": 1}


def test_spec_checks_name_the_numbers() -> None:
    with pytest.raises(ValueError, match="N=30 must be a multiple of log_every=20.*nearest: 20"):
        Spec(n=30, log_every=20)
    with pytest.raises(ValueError, match="needs device=cuda"):
        Spec(check_sync=True)


def test_gpu_check_parses() -> None:
    assert subprocess.run(["bash", "-n", str(GPU_CHECK)], capture_output=True).returncode == 0


@pytest.mark.skipif(shutil.which("timeout") is None, reason="needs coreutils timeout")
def test_gpu_check_without_cuda_says_so_and_exits_2() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible: scripts/gpu_check.sh would run for real")
    proc = subprocess.run(["bash", str(GPU_CHECK)], capture_output=True, text=True, timeout=120,
                          env=clean_env(PYTHON=sys.executable))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "no CUDA device" in proc.stderr and "CUDA build of torch" in proc.stderr


@pytest.mark.slow
def test_bench_runs_both_sides_for_a_few_steps(tmp_path: Path) -> None:
    # world 2 only: both sides' multi-process paths, in separate commands and in bench.inproc
    args = ["--worlds", "2", "--pairs", "1", "--warmup", "0", "--n", "10", "--log-every", "10",
            "--launcher-rounds", "0", "--zero-first-rounds", "2", "--inproc-rounds", "1", "--budget-s", "150",
            "--out", str(tmp_path)]
    proc = subprocess.run([sys.executable, "-m", "bench.run", *args], cwd=REPO, env=clean_env(),
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "steady ms/step" in proc.stdout and "zero_first release latency" in proc.stdout
    (result,) = tmp_path.glob("*.json")
    data = json.loads(result.read_text())
    assert [(s["world"], len(s["pairs"])) for s in data["settings"]] == [(2, 1)]
    for setting in data["settings"]:
        pair = setting["pairs"][0]
        assert pair["weights_max_abs_diff"] == 0.0  # both sides did the same work, bit for bit
        assert all(len(pair[side]["peak_rss_mib"]) == setting["world"] for side in ("reference", "harness"))
    assert len(data["zero_first"]["latency_ms"]["zero_first"]) == 2
    assert [ip["weights_equal_rounds"] for ip in data["inproc"]] == [2]  # the warm-up round and the measured one
    assert all(set(ip["watchdog_ab"]["cpu"]) == {"p10", "p50"} for ip in data["inproc"])
    assert "liveness watchdog A/B" in proc.stdout and "last step to exit s" in proc.stdout
    assert "calls per step (mlp x2" in proc.stdout
    # the output ends with one JSON object per setting, for scripts (and scripts/gpu_check.sh prints them)
    tail = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{"bench": "run"')]
    assert [t["name"] for t in tail] == ["mlp x2", "inproc mlp x2", "calls per step mlp x2"]
    calls = tail[2]["sides"]  # counted, not timed: the same on any machine, within the logging steps' share
    assert calls["harness"]["torch"] - calls["reference"]["torch"] < 1.0
    assert proc.stdout.rstrip().endswith("}") and tail[0]["git"] == data["machine"]["git_commit"]
    assert set(tail[0]["ratios"]) == {"steady_ms", "steady_cpu_ms", "first_step_s", "exit_s", "wall_s"}
