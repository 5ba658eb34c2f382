"""The toolbox on CUDA: time_sync, profile, select_device's mask, fusion with TF32 off, EMA, model_info,
and EarlyStopping over NCCL. Skipped without CUDA (tests/conftest.py)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from harness.devices import DeviceError
from harness.utils import torch_utils as tu

pytestmark = pytest.mark.gpu

REPO = Path(__file__).resolve().parents[2]
CUDA0 = torch.device("cuda", 0)


@pytest.fixture
def no_tf32():
    """Full float32 matmuls and convolutions: the fusion tolerance (1e-5) is below TF32's precision."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_time_sync_waits_for_queued_work():
    x = torch.randn(4096, 4096, device=CUDA0)
    torch.cuda.synchronize()
    for _ in range(8):
        x = x @ x.T / 4096
    tu.time_sync()
    assert torch.cuda.current_stream().query()  # nothing left in flight after the timestamp


def test_profile_on_cuda():
    conv = nn.Conv2d(16, 32, 3, padding=1, bias=False)
    rows = tu.profile(torch.randn(8, 16, 64, 64), [conv, nn.SiLU(), lambda t: t.argmax(1)], n=3, device=CUDA0)
    p, gflops, mem, tf, tb, s_in, s_out = rows[0]
    assert p == 16 * 32 * 9 and s_in == (8, 16, 64, 64) and s_out == (8, 32, 64, 64)
    assert gflops * 1e9 == pytest.approx(2 * 8 * 32 * 64 * 64 * 16 * 9, rel=1e-12)
    assert mem > 0 and tf > 0 and tb > 0 and math.isfinite(tb)
    assert math.isnan(rows[2][4])
    assert next(conv.parameters()).device.type == "cuda"


def _select_in_fresh_process(device: str) -> dict:
    code = ("import json, os, torch; from harness.utils.torch_utils import select_device; "
            f"d = select_device({device!r}, batch_size=8 * torch.cuda.device_count()); "
            "print(json.dumps({'device': str(d), 'mask': os.environ.get('CUDA_VISIBLE_DEVICES'), "
            "'name': torch.cuda.get_device_name(d)}))")
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    return {**json.loads(lines[-1]), "banner": "\n".join(lines[:-1])}


def test_select_device_in_a_fresh_process():
    n = torch.cuda.device_count()
    last = _select_in_fresh_process(str(n - 1))
    assert (last["device"], last["mask"]) == (f"cuda:{n - 1}", None)  # the id itself; no mask written
    assert f"CUDA:{n - 1} ({last['name']}, " in last["banner"] and "MiB)" in last["banner"]
    assert _select_in_fresh_process("cuda")["device"] == "cuda:0"
    if n >= 2:
        assert _select_in_fresh_process("cuda:1,0")["device"] == "cuda:1"


def test_select_device_ids(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    n = torch.cuda.device_count()
    assert tu.select_device(str(n - 1), verbose=False) == torch.device("cuda", n - 1)
    assert "CUDA_VISIBLE_DEVICES" not in os.environ
    with pytest.raises(DeviceError, match=f"GPU {n}, but only {n} visible"):
        tu.select_device(str(n))
    with pytest.raises(DeviceError, match=f"GPU {10 * n}"):  # YOLOv5 counted the characters of '10'
        tu.select_device(str(10 * n))


@pytest.mark.parametrize("stride,padding,dilation,groups,bias", [
    (1, 1, 1, 1, False), (2, 3, 3, 1, True), (1, 2, 2, 4, False), (1, 1, 1, 16, True), (3, 0, 1, 2, True),
])
def test_fusion_on_cuda(no_tf32, stride, padding, dilation, groups, bias):
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 32, 3, stride=stride, padding=padding, dilation=dilation, groups=groups,
                     bias=bias).to(CUDA0)
    bn = nn.BatchNorm2d(32).to(CUDA0)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.2, 3)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    bn.eval()
    fused = tu.fuse_conv_and_bn(conv, bn)
    assert fused.weight.device.type == "cuda"
    x = torch.randn(4, 16, 33, 35, device=CUDA0)
    with torch.no_grad():
        ref, out = bn(conv(x)), fused(x)
    assert ((out - ref).abs().max() / ref.abs().max()).item() <= 1e-5


def test_model_info_and_ema_on_cuda():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU()).to(CUDA0)
    assert tu.model_info(model, img_size=32)[3] * 1e9 == pytest.approx(2 * 8 * 30 * 30 * 3 * 9, rel=1e-12)
    ema = tu.ModelEMA(model, decay=0.9, tau=10)
    before = {k: v.clone() for k, v in ema.ema.state_dict().items()}
    with torch.no_grad():
        model[0].weight.add_(1)
    ema.update(model)
    d = ema.decay(1)
    expect = d * before["0.weight"] + (1 - d) * model[0].weight
    assert ema.ema[0].weight.device.type == "cuda"
    assert torch.allclose(ema.ema[0].weight, expect, rtol=1e-6, atol=1e-7)


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs for 2 NCCL ranks")
def test_early_stopping_over_nccl(tmp_path):
    script = REPO / "tests" / "utils" / "early_stop_ranks.py"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(script), str(tmp_path), "nccl"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for r in (0, 1):
        res = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert (res["stopped"], res["best_epoch"], res["best_fitness"]) == (3, 1, 0.5)
