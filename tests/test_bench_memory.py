"""bench/memory.py (`make bench-memory`): that its ranks' byte counts add up and its peaks measure
what they claim. Real processes (torchrun, gloo), a tiny Tower. No timing assertions: timings
belong to `make bench-memory`, never to `make test`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.memory import compare
from tests.conftest import REPO, clean_env


@pytest.mark.slow
def test_fsdp_ranks_hold_the_ddp_bytes_between_them(tmp_path: Path) -> None:
    args = ["--width", "32", "--depth", "2", "--worlds", "1,2", "--warmup", "1", "--steps", "1",
            "--ckpt-rounds", "1", "--out", str(tmp_path)]
    proc = subprocess.run([sys.executable, "-m", "bench.memory", *args], cwd=REPO, env=clean_env(),
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    settings = {s["name"]: s for s in lines}
    assert list(settings) == ["ddp-x1", "fsdp-x1", "ddp-x2", "fsdp-x2"]
    assert settings["ddp-x1"]["resolved"] == "none"  # what the harness runs for ddp at world size 1
    tower = 64 * 32 + 32 + 2 * (32 * 32 + 32 + 2 * 32) + 32 * 10 + 10  # stem, 2 blocks (fc + norm), head
    for s in settings.values():
        assert s["model"]["parameters"] == tower
        assert s["git"] and s["machine"]["torch"]
        assert len(s["ranks"]) == s["world"]
        assert s["ckpt_files"] >= 1 and s["save_s"]["n"] == s["load_s"]["n"] == 1
    whole = settings["ddp-x1"]["ranks"][0]
    assert whole["param_bytes"] == whole["grad_bytes"] == 4 * tower
    assert whole["optim_bytes"] == 2 * 4 * tower + whole["optim_scalar_bytes"]  # exp_avg, exp_avg_sq, steps
    for name in ("fsdp-x1", "ddp-x2", "fsdp-x2"):
        ranks = settings[name]["ranks"]
        sharded = name.startswith("fsdp")
        for key in ("param_bytes", "grad_bytes", "sharded_optim"):
            held = [r[key] for r in ranks]
            assert (sum(held) if sharded else held[0]) == whole[key], (name, key, held)
            assert sharded or held == [whole[key]] * len(ranks)  # ddp: every rank holds it all
        assert all(r["optim_scalar_bytes"] == whole["optim_scalar_bytes"] for r in ranks)  # `step`, kept whole
    assert all(c["sums_match"] for c in (settings["fsdp-x1"]["comparison"], settings["fsdp-x2"]["comparison"]))
    assert "sum exactly to ddp's" in proc.stdout and "Checkpointer" in proc.stdout
    (result,) = tmp_path.glob("*-memory.json")
    assert [s["name"] for s in json.loads(result.read_text())["settings"]] == list(settings)


def test_compare_names_shards_that_do_not_add_up() -> None:
    def setting(strategy: str, per_rank: list[int]) -> dict:
        ranks = [{"param_bytes": b, "grad_bytes": b, "optim_bytes": 2 * b + 8, "sharded_optim": 2 * b,
                  "optim_scalar_bytes": 8, "build_peak": b, "train_peak": 4 * b} for b in per_rank]
        return {"strategy": strategy, "world": 2, "ranks": ranks, "step_ms": {"median": 10.0},
                "step_cpu_ms": {"median": 5.0}}

    ddp = setting("ddp", [100, 100])
    good = compare(ddp, setting("fsdp", [50, 50]))
    assert good["sums_match"] and good["ratios"]["param_bytes"] == 0.5 and good["ratios"]["step_ms"] == 1.0
    bad = compare(ddp, setting("fsdp", [50, 49]))
    assert not bad["sums_match"] and bad["sums"]["param_bytes"] == [99, 100]
    assert compare(ddp, setting("fsdp", [60, 40]))["ratios"]["param_bytes"] == 0.6  # the largest rank decides


PEAK_PROBE = """
import torch
from bench.memory_rank import Resident
r = Resident()
r.exact()
base = r.now()
r.reset_peak()
x = torch.ones(8 * 2**20)  # 32 MiB, written
del x
print(r.resettable, r.peak() - base, r.now() - base, r.malloc)
"""


def test_peak_is_reset_and_freed_tensors_leave_the_resident_set() -> None:
    proc = subprocess.run([sys.executable, "-c", PEAK_PROBE], cwd=REPO, env=clean_env(), capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    resettable, peak, after, malloc = proc.stdout.split(maxsplit=3)
    if resettable != "True":
        pytest.skip("no /proc/self/clear_refs here: the peak is the process's lifetime peak")
    assert 32 * 2**20 <= int(peak) < 40 * 2**20  # the tensor, not the imports before the reset
    if malloc.strip() != "default":  # glibc: the freed tensor was unmapped
        assert int(after) < 4 * 2**20
