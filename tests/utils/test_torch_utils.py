"""harness.utils.torch_utils: the YOLOv5 names, select_device, time_sync, model_info, profile, small helpers.

Fusion, classifiers, EMA and early stopping have their own test files next to this one; the CUDA
paths are in tests/gpu/test_torch_utils_gpu.py.
"""

from __future__ import annotations

import logging
import math
import os
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import harness.utils.device as udevice
from harness import zero_first
from harness.batching import BatchSizeError
from harness.devices import DeviceError
from harness.utils import meta
from harness.utils import torch_utils as tu

YOLOV5_NAMES = ("select_device", "time_sync", "profile", "model_info", "fuse_conv_and_bn",
                "initialize_weights", "find_modules", "scale_img", "EarlyStopping", "date_modified",
                "git_describe", "torch_distributed_zero_first", "load_classifier",
                "reshape_classifier_output", "ModelEMA", "de_parallel", "is_parallel", "copy_attr",
                "smart_inference_mode")


@pytest.fixture
def quiet_logger():
    """No handlers on the `harness` logger, so the toolbox prints (captured by capsys)."""
    log = logging.getLogger(udevice.LOGGER)
    saved = log.handlers[:], log.propagate, log.level
    log.handlers, log.propagate = [], False
    yield
    log.handlers, log.propagate, log.level = saved[0], saved[1], saved[2]


def test_every_yolov5_name_is_importable():
    for name in YOLOV5_NAMES:
        assert callable(getattr(tu, name)), name
    assert tu.torch_distributed_zero_first is zero_first.torch_distributed_zero_first
    assert tu.date_modified is meta.date_modified and tu.git_describe is meta.git_describe


def test_git_describe_and_date_modified(tmp_path):
    assert tu.git_describe(tmp_path) == ""  # not a repository
    f = tmp_path / "f.txt"
    f.write_text("x")
    assert re.fullmatch(r"\d{4}-\d{1,2}-\d{1,2}", tu.date_modified(f))


# --- select_device ----------------------------------------------------------------------------------


def test_select_device_cpu_prints_banner(quiet_logger, capsys):
    assert tu.select_device("cpu") == torch.device("cpu")
    out = capsys.readouterr().out
    assert f"torch {torch.__version__}" in out and "CPU" in out and "cores" in out and "GB RAM" in out
    assert tu.select_device("cpu", batch_size=7, verbose=False).type == "cpu"  # one process: any batch
    assert capsys.readouterr().out == ""


def test_the_banner_is_built_one_way_for_select_device_a_session_and_info(quiet_logger, capsys, tmp_path):
    import harness
    from harness.info import report
    from harness.utils.meta import describe_version

    tu.select_device("cpu")
    printed = capsys.readouterr().out.strip()
    assert printed == udevice.banner_for([]) and printed.startswith(f"harness {describe_version()} torch ")
    assert report({}).splitlines()[0] == printed
    with harness.session(device="cpu", run_root=tmp_path, run_id_override="b", environ={"PATH": "/usr/bin"}):
        pass
    assert printed in (tmp_path / "b" / "train.log").read_text()


def test_select_device_logs_through_a_configured_logger(quiet_logger, capsys, caplog):
    logging.getLogger(udevice.LOGGER).propagate = True
    with caplog.at_level(logging.INFO, logger=udevice.LOGGER):
        tu.select_device("cpu")
    assert capsys.readouterr().out == ""
    assert any("CPU" in r.getMessage() for r in caplog.records)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU errors")
@pytest.mark.parametrize("device", ["0", "cuda", "cuda:0", "0,1", [0, 1]])
def test_select_device_gpu_request_without_gpu_fails(device):
    with pytest.raises(DeviceError, match="none is visible"):
        tu.select_device(device)


@pytest.mark.parametrize("device", ["0,,1", "tpu", "0,0", "-1"])
def test_select_device_malformed(device):
    with pytest.raises(DeviceError, match="valid"):
        tu.select_device(device)


@pytest.fixture
def two_fake_gpus(monkeypatch):
    """A 2-GPU machine, for the checks that fail before any CUDA call (the real path: tests/gpu)."""
    monkeypatch.setattr(udevice, "count_visible_gpus", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    def no_cuda(*a, **k):
        raise AssertionError("CUDA touched before the request was checked")

    monkeypatch.setattr(torch.cuda, "get_device_properties", no_cuda)


def test_select_device_counts_ids_not_characters(two_fake_gpus):
    # YOLOv5 asserted device_count() >= len('10') and accepted GPU 10 on a 2-GPU machine
    with pytest.raises(DeviceError, match="GPU 10, but only 2 visible"):
        tu.select_device("10")
    with pytest.raises(DeviceError, match="GPU 2, but only 2 visible"):
        tu.select_device("cuda:0,2")


def test_select_device_returns_the_requested_id_and_leaves_the_mask(two_fake_gpus, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    assert tu.select_device("cuda:1", batch_size=4, verbose=False) == torch.device("cuda", 1)
    assert tu.select_device([1, 0], verbose=False) == torch.device("cuda", 1)
    assert tu.select_device("", verbose=False) == torch.device("cuda", 0)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "4,5"


def test_select_device_batch_check(two_fake_gpus):
    with pytest.raises(BatchSizeError, match="not divisible by world size 2.*nearest valid: 2 or 4"):
        tu.select_device("0,1", batch_size=3)


# --- time_sync ----------------------------------------------------------------------------------------


def test_time_sync_is_a_monotonic_seconds_clock():
    a = tu.time_sync()
    b = tu.time_sync()
    assert isinstance(a, float) and b >= a


# --- model_info -------------------------------------------------------------------------------------


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = self.conv2(F.relu(self.bn(self.conv1(x))))
        return self.fc(self.pool(x).flatten(1))


def conv_flops(cin, cout, k, groups, h_out, w_out):
    """2 x multiply-adds: each output element needs (cin / groups) x k x k of them."""
    return 2 * cout * h_out * w_out * (cin // groups) * k * k


def test_model_info_counts_by_hand(quiet_logger, capsys):
    m = Tiny()
    hand = 3 * 8 * 3 * 3 + 2 * 8 + (8 // 2) * 16 * 3 * 3 + 16 + 16 * 5 + 5
    assert hand == 909
    layers, params, grads, gflops = tu.model_info(m, img_size=32)
    assert (layers, params, grads) == (6, hand, hand)
    # conv1: 32 -> 30; conv2 (stride 2, pad 1): 30 -> 15; fc: 16 x 5 multiply-adds
    expect = conv_flops(3, 8, 3, 1, 30, 30) + conv_flops(8, 16, 3, 2, 15, 15) + 2 * 16 * 5
    assert gflops * 1e9 == pytest.approx(expect, rel=1e-9)
    assert "Tiny summary: 6 layers, 909 parameters, 909 gradients" in capsys.readouterr().out

    m.fc.requires_grad_(False)
    assert tu.model_info(m, img_size=32)[2] == hand - 85


def test_model_info_conv_flops_formula_at_image_sizes():
    conv = nn.Conv2d(3, 16, 5, stride=2, padding=2, dilation=1, bias=False)
    for img_size, (h, w) in ((64, (32, 32)), ([48, 80], (24, 40)), ((33, 17), (17, 9))):
        gflops = tu.model_info(conv, img_size=img_size)[3]
        assert gflops * 1e9 == pytest.approx(conv_flops(3, 16, 5, 1, h, w), rel=1e-12), img_size
    assert tu.count_flops(conv, torch.zeros(2, 3, 64, 64)) == 2 * conv_flops(3, 16, 5, 1, 32, 32)


def test_model_info_leaves_model_unchanged_and_explicit_shape():
    m = Tiny().train()
    m.bn.running_mean.fill_(0.25)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    tu.model_info(m, img_size=64)
    assert m.training and m.bn.training
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(12, 4))
    assert tu.model_info(mlp, input_shape=(1, 3, 2, 2))[3] * 1e9 == pytest.approx(2 * 12 * 4, rel=1e-12)
    assert tu.model_info(nn.Sequential(nn.Embedding(10, 4)))[3] is None  # integer input: no guess


def test_model_info_falls_back_to_real_tensors():
    class NeedsValues(nn.Module):  # .item() cannot run on the meta device
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3, bias=False)

        def forward(self, x):
            return self.conv(x) * float(x.abs().mean().item() + 1)

    gflops = tu.model_info(NeedsValues(), img_size=10)[3]
    assert gflops * 1e9 == pytest.approx(conv_flops(1, 2, 3, 1, 8, 8), rel=1e-12)


def test_model_info_verbose_table(quiet_logger, capsys):
    tu.model_info(Tiny(), verbose=True, img_size=8)
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["layer", "name", "gradient", "parameters", "shape", "mu", "sigma"]
    rows = [line.split() for line in out[1:-1]]
    assert [r[1] for r in rows] == [n for n, _ in Tiny().named_parameters()]
    assert rows[0][:5] == ["0", "conv1.weight", "True", "216", "[8,"]


# --- profile ----------------------------------------------------------------------------------------


def test_profile_rows(quiet_logger, capsys):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)

    def broken(x):
        raise RuntimeError("this op is broken")

    x = torch.randn(2, 3, 16, 16)
    rows = tu.profile([x, x[:1]], [conv, nn.ReLU(), lambda t: t.argmax(1), broken], n=2, device="cpu")
    out = capsys.readouterr().out
    assert len(rows) == 8 and rows[3] is None and rows[7] is None
    assert "RuntimeError: this op is broken" in out
    assert out.count("GPU_mem (GB)") == 1 and "forward (ms)" in out and "backward (ms)" in out
    p, gflops, mem, tf, tb, s_in, s_out = rows[0]
    assert (p, mem, s_in, s_out) == (108, 0.0, (2, 3, 16, 16), (2, 4, 16, 16))
    assert gflops * 1e9 == pytest.approx(2 * conv_flops(3, 4, 3, 1, 16, 16), rel=1e-12)
    assert tf > 0 and tb > 0 and math.isfinite(tb)
    assert rows[1][0] == 0 and math.isfinite(rows[1][4])  # ReLU: no parameters, has backward
    assert rows[2][6] == (2, 16, 16) and math.isnan(rows[2][4])  # argmax: no backward -> NaN
    assert rows[4][5] == (1, 3, 16, 16)
    assert rows[4][1] * 1e9 == pytest.approx(conv_flops(3, 4, 3, 1, 16, 16), rel=1e-12)
    assert not x.requires_grad  # the caller's tensor is left alone


def test_profile_rejects_zero_runs():
    with pytest.raises(ValueError, match="n=0"):
        tu.profile(torch.zeros(1), nn.ReLU(), n=0, device=torch.device("cpu"))


# --- small helpers ---------------------------------------------------------------------------------


def test_initialize_weights():
    m = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2), nn.ReLU(), nn.SiLU(), nn.LeakyReLU(),
                      nn.Hardswish(), nn.ReLU6(), nn.BatchNorm1d(2), nn.ELU())
    w = m[0].weight.clone()
    tu.initialize_weights(m)
    for bn in (m[1], m[7]):
        assert (bn.eps, bn.momentum) == (1e-3, 0.03)
    assert all(m[i].inplace for i in range(2, 7))
    assert not m[8].inplace  # not in YOLOv5's list
    assert torch.equal(m[0].weight, w)


def test_find_modules():
    m = nn.Sequential(nn.Conv2d(1, 2, 1), nn.ReLU(), nn.Conv2d(2, 2, 1))
    assert tu.find_modules(m) == [1, 3]  # modules() order: the Sequential itself is 0
    assert tu.find_modules(m, nn.ReLU) == [2]

    class Darknet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.module_list = nn.ModuleList([nn.ReLU(), nn.Conv2d(1, 1, 1), nn.Conv2d(1, 1, 1)])

    assert tu.find_modules(Darknet()) == [1, 2]


@pytest.mark.parametrize("ratio,same_shape,gs,expect", [
    (0.5, False, 32, (32, 64)),  # 32x40 padded up to multiples of 32
    (0.67, False, 32, (64, 64)),  # int(42.88) x int(53.6) = 42x53, padded up
    (0.5, True, 32, (64, 80)),  # back to the input size
    (0.3, False, 8, (24, 24)),  # 19x24 -> multiples of 8
])
def test_scale_img_shapes_and_padding(ratio, same_shape, gs, expect):
    img = torch.rand(2, 3, 64, 80)
    out = tu.scale_img(img, ratio, same_shape, gs)
    h, w = int(64 * ratio), int(80 * ratio)
    assert out.shape == (2, 3, *expect)
    ref = F.interpolate(img, size=(h, w), mode="bilinear", align_corners=False)
    assert torch.equal(out[..., :h, :w], ref)
    pad = torch.cat([out[..., h:, :].flatten(), out[..., :h, w:].flatten()])
    assert pad.numel() == out[0, 0].numel() * 6 - h * w * 6
    assert torch.all(pad == torch.tensor(0.447))


def test_scale_img_ratio_one_is_identity():
    img = torch.rand(1, 3, 10, 10)
    assert tu.scale_img(img, 1.0) is img


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.compile's import of torch.jit
def test_de_parallel(tmp_path):
    m = nn.Linear(2, 2)
    assert tu.de_parallel(m) is m and not tu.is_parallel(m)
    dp = nn.DataParallel(m)
    assert tu.is_parallel(dp) and tu.de_parallel(dp) is m
    assert tu.de_parallel(torch.compile(m)) is m  # compiles lazily: nothing is compiled here

    import torch.distributed as dist

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(m)
        assert tu.is_parallel(ddp) and tu.de_parallel(ddp) is m
    finally:
        dist.destroy_process_group()


def test_copy_attr():
    a, b = nn.Module(), nn.Module()
    b.names, b.stride, b._private, b.process_group = ["cat"], 8, 1, "pg"
    tu.copy_attr(a, b, exclude=("process_group",))
    assert (a.names, a.stride) == (["cat"], 8)
    assert not hasattr(a, "_private") and not hasattr(a, "process_group")
    c = nn.Module()
    tu.copy_attr(c, b, include=("stride",))
    assert c.stride == 8 and not hasattr(c, "names")


def test_smart_inference_mode():
    w = torch.ones(2, requires_grad=True)

    @tu.smart_inference_mode()
    def f():
        return w * 2

    @tu.smart_inference_mode(torch_1_9=False)
    def g():
        return w * 2

    assert f().is_inference() and not f().requires_grad
    assert not g().is_inference() and not g().requires_grad
