"""Atomic checkpoints that load with weights_only=True, and clear errors for bad files."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

from harness import checkpoint
from harness.models import SmallCNN


def test_round_trip_weights_only(tmp_path: Path) -> None:
    model = SmallCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 1, 8, 8)).sum().backward()
    opt.step()
    path = tmp_path / "ck" / "last.pt"
    checkpoint.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 3,
                     "config": "seed: 0\n"}, path)
    state = checkpoint.load(path)
    assert state["epoch"] == 3 and state["config"] == "seed: 0\n"
    for k, v in model.state_dict().items():
        assert torch.equal(state["model"][k], v)
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]  # no temporary left behind


def test_failed_save_keeps_previous_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    checkpoint.save({"epoch": 1}, path)
    with pytest.raises((pickle.PicklingError, AttributeError)):
        checkpoint.save({"epoch": 2, "bad": lambda: 0}, path)  # unpicklable: the save fails midway
    assert checkpoint.load(path)["epoch"] == 1
    assert os.listdir(tmp_path) == ["last.pt"]


def test_corrupt_and_foreign_files_name_the_file(tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(checkpoint.CheckpointError, match="corrupt.pt is corrupt"):
        checkpoint.load(corrupt)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.ones(1)}, foreign)
    with pytest.raises(checkpoint.CheckpointError, match="foreign.pt is not a harness-checkpoint-1 file"):
        checkpoint.load(foreign)
    with pytest.raises(checkpoint.CheckpointError, match="missing.pt does not exist"):
        checkpoint.load(tmp_path / "missing.pt")


WRITER = """
import sys, torch
from pathlib import Path
from harness import checkpoint
path = Path(sys.argv[1])
i = int(sys.argv[2])
while True:
    i += 1
    checkpoint.save({"epoch": i, "blob": torch.full((4_000_000,), float(i))}, path)
    print(i, flush=True)
"""


@pytest.mark.slow
def test_kill_during_save_leaves_the_previous_checkpoint(tmp_path: Path) -> None:
    import random
    import signal
    import subprocess
    import sys
    import time

    path = tmp_path / "last.pt"
    checkpoint.save({"epoch": 0, "blob": torch.zeros(4_000_000)}, path)
    rng = random.Random(0)
    for attempt in range(6):
        before = checkpoint.load(path)["epoch"]
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(before)], stdout=subprocess.PIPE,
                                text=True)
        assert proc.stdout is not None
        proc.stdout.readline()  # at least one save went through; the next one is under way
        time.sleep(rng.uniform(0.0, 0.15))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        state = checkpoint.load(path)  # never a half-written file
        assert state["epoch"] > before
        assert torch.all(state["blob"] == float(state["epoch"])), attempt
    checkpoint.save({"epoch": -1}, path)  # the next save sweeps the killed saves' temporaries away
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]
